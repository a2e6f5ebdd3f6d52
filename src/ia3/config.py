"""`IA3Config`: what an (IA)^3 adapter targets, in the fields and JSON of PEFT's `adapter_config.json`."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from ia3.hub import resolve_file
from ia3.serialization import atomic_write_text

CONFIG_NAME = "adapter_config.json"
PEFT_TYPE = "IA3"
# The PEFT release whose adapter format ia3 reads and writes; written as `peft_version` so that PEFT
# loads our adapters without a "created with a newer version" warning.
PEFT_FORMAT_VERSION = "0.17.0"
ALL_LINEAR = "all-linear"


class TaskType(StrEnum):
    """The task types PEFT knows; they pick the `PeftModel` subclass `get_peft_model` returns."""

    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PeftType(StrEnum):
    """PEFT's adapter types, of which ia3 has one; a `str` enum as PEFT's, so `PeftType.IA3 == "IA3"` and
    `config.peft_type.value` both hold, and JSON shows the plain string."""

    IA3 = PEFT_TYPE


class ConfigKeyError(TypeError, ValueError):
    """An adapter config lacks a key every config must have (`peft_type`): a TypeError as PEFT raises it, and a
    ValueError as ia3 raises every other refused config, so callers catching either see it."""


# PEFT's words for dropped `runtime_config` keys and for keys a config class does not know (matched on purpose:
# code written against PEFT checks them).
RUNTIME_CONFIG_WARNING = (
    "The configuration file contains a `runtime_config` key. This is ignored. Runtime configurations are only valid "
    "at runtime."
)
UNEXPECTED_KEYS_WARNING = (
    "Unexpected keyword arguments {keys} for class {cls}, these are ignored. This probably means that you're loading "
    "a configuration file that was saved using a higher version of the library and additional parameters have been "
    "introduced since. It is highly recommended to upgrade the PEFT version before continuing (e.g. by running `pip "
    "install -U peft`)."
)


# Keys that PEFT writes for other methods or in other versions and that carry no meaning for (IA)^3;
# accepted on load and dropped, so that adapter configs written by any PEFT release load.
_IGNORED_KEYS = {"peft_version", "auto_mapping", "target_parameters", "layers_to_transform", "layers_pattern"}


def _as_names(value: Any, field_name: str, problems: list[str]) -> list[str] | str | None:
    """Normalise a module-name field: None, a regex string, or a sorted list of unique names."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        bad = [v for v in value if not isinstance(v, str) or not v]
        if bad:
            problems.append(f"`{field_name}` must hold non-empty strings; got {bad!r}")
            return None
        return sorted(set(value))
    problems.append(
        f"`{field_name}` must be a list of module names, a regex string or None; got {type(value).__name__} {value!r}"
    )
    return None


def names_overlap(name: str, names: list[str]) -> bool:
    """True when module-name entry `name` and some entry of `names` can name the same module: equal, or one is a
    dotted suffix of the other (`"wo"` and `"encoder.block.0.layer.1.DenseReluDense.wo"`, as `all-linear` resolves)."""
    return any(n == name or n.endswith("." + name) or name.endswith("." + n) for n in names)


def _check_has_peft_type(data: dict[str, Any], class_name: str) -> None:
    if "peft_type" not in data:
        raise ConfigKeyError(
            f"The {class_name} config that is trying to be loaded is missing required keys: {{'peft_type'}}. "
            f"(This adapter has peft_type=None; ia3 loads only (IA)^3 adapters, peft_type {PEFT_TYPE!r}.)"
        )


class PeftConfig:
    """PEFT's entry point for reading any adapter config: `PeftConfig.from_pretrained(folder)` returns the config of
    the adapter's `peft_type`. ia3 knows one type, so the answer is an `IA3Config` (the only subclass), or a
    ValueError naming the other type."""

    @classmethod
    def from_json_file(cls, path_json_file: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
        """The JSON object of an `adapter_config.json` file, as a dict (not yet checked).

        Raises:
            ValueError: the file is not valid JSON.
        """
        path = Path(path_json_file)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as err:  # JSONDecodeError, huge ints, deep nesting
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if isinstance(data, dict) and "runtime_config" in data:
            warnings.warn(RUNTIME_CONFIG_WARNING, UserWarning, stacklevel=2)
            del data["runtime_config"]
        return data  # type: ignore[no-any-return]

    @classmethod
    def from_peft_type(cls, **kwargs: Any) -> IA3Config:
        """Build the config that `kwargs["peft_type"]` names (keys as in `adapter_config.json`).

        Keys this version does not know (from a newer PEFT) are dropped with a warning, as PEFT does.
        """
        return IA3Config.from_dict(kwargs)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        **kwargs: Any,
    ) -> IA3Config:
        """Read `adapter_config.json` from a folder or a Hub repo; `kwargs` override fields."""
        path = resolve_file(
            pretrained_model_name_or_path, CONFIG_NAME, subfolder=subfolder, revision=revision, token=token
        )
        data = cls.from_json_file(path)  # type: ignore[arg-type]
        if isinstance(data, dict):
            data.update(kwargs)
            _check_has_peft_type(data, cls.__name__)
        return IA3Config.from_dict(data)


@dataclass
class IA3Config(PeftConfig):
    """Configuration of an (IA)^3 adapter (Liu et al. 2022, https://arxiv.org/abs/2205.05638).

    Args:
        task_type: One of `TaskType` (e.g. `"SEQ_2_SEQ_LM"`) or None for a bare model.
        target_modules: Modules that get a vector. A list matches a module whose name equals an entry or ends with
            `"." + entry`; a string is a regex that must match the whole module name; `"all-linear"` takes every
            `nn.Linear`/`Conv1D` but the output layer. None takes the defaults for the model type
            (`ia3.targets.DEFAULT_TARGET_MODULES`).
        exclude_modules: Modules never targeted, matched like `target_modules`.
        feedforward_modules: Targets whose vector scales the layer's input (shape `(1, in)`) instead of its output
            (shape `(out, 1)`). When both are lists, a subset of `target_modules`.
        fan_in_fan_out: True when the target stores its weight as `(in, out)` (GPT-2's `Conv1D`); ia3 sets it in
            the resolved config when a `Conv1D` is targeted.
        modules_to_save: Modules (e.g. a classification head) trained in full and saved with the adapter.
        init_ia3_weights: Start the vectors at 1 (the identity). False draws them from N(0, 1), for tests.
        base_model_name_or_path: Hub id or folder of the base model, filled in by `get_peft_model`.
        revision: Revision of the base model on the Hub.
        inference_mode: Load the adapter frozen.
    """

    task_type: TaskType | str | None = None
    peft_type: PeftType | str = PeftType.IA3
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        problems: list[str] = []
        if isinstance(self.peft_type, str) and self.peft_type == PEFT_TYPE:
            self.peft_type = PeftType.IA3  # PEFT's str enum, also when given as the string
        else:
            problems.append(f"`peft_type` must be {PEFT_TYPE!r} for an (IA)^3 adapter; got {self.peft_type!r}")
        if isinstance(self.task_type, TaskType):
            self.task_type = self.task_type.value
        if self.task_type is not None and (
            not isinstance(self.task_type, str) or self.task_type not in TaskType.__members__
        ):
            problems.append(
                f"`task_type` must be one of {sorted(TaskType.__members__)} or None; got {self.task_type!r}"
            )
        self.target_modules = _as_names(self.target_modules, "target_modules", problems)
        self.exclude_modules = _as_names(self.exclude_modules, "exclude_modules", problems)
        self.feedforward_modules = _as_names(self.feedforward_modules, "feedforward_modules", problems)
        if self.modules_to_save is not None:
            names = _as_names(self.modules_to_save, "modules_to_save", problems)
            if isinstance(names, str):
                problems.append(f"`modules_to_save` must be a list of module names; got the string {names!r}")
            elif names is not None:
                # keep the user's order: PEFT writes the list as given
                self.modules_to_save = list(dict.fromkeys(self.modules_to_save or []))
        for name in ("fan_in_fan_out", "init_ia3_weights", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"`{name}` must be true or false; got {getattr(self, name)!r}")
        for name in ("base_model_name_or_path", "revision"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                problems.append(f"`{name}` must be a string or None; got {value!r}")
        if isinstance(self.target_modules, str) and self.target_modules.lower() == ALL_LINEAR:
            self.target_modules = ALL_LINEAR
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            extra = sorted(f for f in self.feedforward_modules if not names_overlap(f, self.target_modules))
            if extra:
                problems.append(
                    f"`feedforward_modules` must be a subset of `target_modules`; {extra} are not targets "
                    f"(target_modules={self.target_modules})"
                )
        if problems:
            raise ValueError("Invalid IA3Config:\n  - " + "\n  - ".join(problems))

    # -- dict / JSON -----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The dict PEFT writes to `adapter_config.json` (same keys, same values)."""
        out = dataclasses.asdict(self)
        out["auto_mapping"] = None
        out["peft_version"] = PEFT_FORMAT_VERSION
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IA3Config:
        """Build a config from an `adapter_config.json` dict, refusing other adapter types.

        Keys that no (IA)^3 config of this version has (written by a newer PEFT) are dropped with a warning, as PEFT
        does, so that newer adapters still load.
        """
        if not isinstance(data, dict):
            raise ValueError(f"An adapter config must be a JSON object; got {type(data).__name__}")
        _check_has_peft_type(data, cls.__name__)
        peft_type = data.get("peft_type")
        if peft_type != PEFT_TYPE:
            raise ValueError(
                f"This adapter has peft_type={peft_type!r}; ia3 loads only (IA)^3 adapters (peft_type {PEFT_TYPE!r})"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - _IGNORED_KEYS, key=str)  # PEFT sorts the names
        if unknown:
            warnings.warn(
                UNEXPECTED_KEYS_WARNING.format(keys=unknown, cls=cls.__name__)
                + f" (IA)^3 configs accept {sorted(known)}; upgrade ia3 too if the adapter behaves unexpectedly.",
                UserWarning,
                stacklevel=2,
            )
        for key in ("target_parameters", "layers_to_transform", "layers_pattern"):
            if data.get(key):
                raise ValueError(f"The adapter config sets `{key}`={data[key]!r}, which ia3 does not support")
        return cls(**{k: v for k, v in data.items() if k in known})

    def save_pretrained(
        self, save_directory: str | os.PathLike, auto_mapping_dict: dict[str, str] | None = None
    ) -> None:
        """Write `adapter_config.json` into `save_directory` (atomically).

        `auto_mapping_dict`: written as `auto_mapping` (PEFT records the base model's class and module there for
        adapters without a `task_type`).
        """
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        if auto_mapping_dict is not None:
            data["auto_mapping"] = dict(auto_mapping_dict)
        atomic_write_text(path / CONFIG_NAME, json.dumps(data, indent=2) + "\n")
