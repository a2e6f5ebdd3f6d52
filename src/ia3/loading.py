"""Loading a base model and its tokenizer for a task: what the recipe trains on and the server serves.

`ModelSource` says where a model comes from (a Hub id, a local folder, a `.gguf` file or `module:<package>`, see
`ia3.base_models`) and how to load it; the task class (`ia3.tasks`) says which transformers class and settings it
needs. Nothing here knows about the recipe's or the server's settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ia3.base_models import BaseModelRef, load_pretrained, resolve_base_model
from ia3.quantization import (
    check_backend,
    keep_4bit_weights_trainable_on_cpu,
    prepare_model_for_kbit_training,
    quantization_config,
)
from ia3.tasks import Task
from ia3.tuner import TASK_HEADS

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class ModelSource:
    """Where a base model (and its tokenizer) loads from.

    Attributes:
        name: a Hub id, a local folder, a `.gguf` file path, or `module:<package>` (see `ia3.base_models`).
        revision: branch, tag or commit of `name` on the Hub (None: the default branch).
        gguf_file: name of the .gguf file inside the `name` folder.
        trust_remote_code: run the model repository's own Python code.
        quantization: load the base quantised (`int8`, `nf4`, ..., see `ia3.quantization`) or `none`.
    """

    name: str
    revision: str | None = None
    gguf_file: str | None = None
    trust_remote_code: bool = False
    quantization: str = "none"

    def reference(self) -> BaseModelRef:
        """Where `name` (and `gguf_file`) point: a folder, a .gguf file or a Hub id, resolved."""
        return resolve_base_model(self.name, self.gguf_file)


def default_device() -> torch.device:
    """The device a model runs on when none is named: the GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bfloat16_units(device: torch.device) -> bool:
    """Whether `device` has matrix units for bfloat16: a GPU that supports it, or a CPU with AMX or AVX512-BF16
    (read from `/proc/cpuinfo`'s flags; False where that cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (`/proc/cpuinfo`); empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def load_tokenizer(source: ModelSource, task: type[Task]) -> PreTrainedTokenizerBase:
    """The model's tokenizer, prepared for `task` (e.g. a pad token for causal LMs).

    Raises:
        ValueError: no tokenizer loads, or the one that does knows only special tokens (a model folder without
            its tokenizer files).
    """
    from transformers import AutoTokenizer

    ref = source.reference()
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            ref.path,
            revision=source.revision,
            trust_remote_code=source.trust_remote_code,
            **ref.from_pretrained_kwargs(),
        )
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(
            f"Could not load a tokenizer for model {source.name!r}: {err}. The recipe needs the model's tokenizer "
            "files (tokenizer.json or a vocabulary) beside its weights."
        ) from None
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)) + 1:
        raise ValueError(
            f"Model {source.name!r} has no tokenizer: the one loaded knows only its {len(tokenizer)} special tokens. "
            "The recipe needs the model's tokenizer files (tokenizer.json, vocab.txt, spiece.model, ...) beside its "
            "weights; copy them from the model this one was made from."
        )
    task.prepare_tokenizer(tokenizer, source.name)
    return tokenizer


def load_base_model(
    source: ModelSource, task: type[Task], label_names: list[str], dtype: torch.dtype | None = None
) -> nn.Module:
    """The base model for `task` (a `.gguf` base is dequantised by transformers).

    With `source.quantization` other than `none`, transformers quantises the base while loading it (its
    `BitsAndBytesConfig` / `TorchAoConfig`; see `ia3.quantization`), keeping a classifier head that trains in full
    in full precision, and the model goes through `prepare_model_for_kbit_training` (without gradient
    checkpointing). A missing backend package is reported before anything is loaded.

    Args:
        source: where the model loads from.
        task: the task class; it picks the transformers auto class and its loading settings.
        label_names: the classes (a classifier's head has one output per name).
        dtype: the weights' dtype (None: the checkpoint's).
    """
    import transformers

    check_backend(source.quantization, "--model.quantization")
    kwargs = {
        "revision": source.revision,
        "trust_remote_code": source.trust_remote_code,
        **task.model_kwargs(label_names),
    }
    if dtype is not None:
        kwargs["dtype"] = dtype
    if source.quantization != "none":
        heads = TASK_HEADS.get(task.peft_task_type or "")
        kwargs["quantization_config"] = quantization_config(source.quantization, dtype or torch.float32, heads)
        # bitsandbytes and torchao quantise on the device the weights are loaded to: this process's accelerator
        kwargs["device_map"] = {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}
    model = load_pretrained(getattr(transformers, task.auto_class), source.reference(), **kwargs)
    if source.quantization != "none":
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_4bit_weights_trainable_on_cpu(model)  # evaluation between epochs must not break the next epoch
    task.prepare_model(model)
    return model
