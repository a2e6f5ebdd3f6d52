"""Quantised base models: (IA)^3 over bitsandbytes 8-bit / 4-bit linears and torchao-quantised linears.

(IA)^3 never changes a base weight while it trains: a vector scales a layer's input or output
(`y = l * (W x + b)` or `y = W (l * x) + b`), so an `IA3Layer` wraps a quantised linear exactly as it wraps
`nn.Linear` and calls the quantised kernel unchanged. bitsandbytes' `Linear8bitLt` and `Linear4bit` are `nn.Linear`
subclasses; torchao's `quantize_` leaves an `nn.Linear` whose weight is a torchao tensor subclass. Both backends are
optional: nothing here imports them unless a model already holds their layers (or a recipe asks for them).

What does not carry over is merging: folding `l` into a weight stored as 8-bit or 4-bit codes means dequantising,
scaling and quantising again, which rounds the merged weight a second time. `IA3Layer.merge` (and `to_module`,
`merge_and_unload`) refuse such a layer with `QuantizedMergeError`; merge on a full-precision load of the same base
instead (the adapter file is the same either way).

`prepare_model_for_kbit_training` has PEFT's signature and semantics (ia3's own implementation).
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import warnings
from typing import Any

import torch
import transformers
from torch import nn

# The recipe's `model.quantization` values: name -> (the backend package it needs, what it is)
QUANTIZATIONS: dict[str, tuple[str | None, str]] = {
    "none": (None, "full precision (the checkpoint's weights as they are)"),
    "int8": ("bitsandbytes", "bitsandbytes LLM.int8() (Linear8bitLt)"),
    "nf4": ("bitsandbytes", "bitsandbytes 4-bit NormalFloat (Linear4bit, quant_type nf4)"),
    "torchao-int8": ("torchao", "torchao int8 weight-only (Int8WeightOnlyConfig)"),
}


class QuantizedMergeError(ValueError):
    """Merging an adapter into a quantised base layer, which ia3 refuses (see the module docstring)."""


def quantization_of(module: nn.Module) -> str | None:
    """What quantised `module`'s weight, in words (`"bitsandbytes 8-bit (Linear8bitLt)"`), or None for a plain layer.

    Looks only at backends already imported: a model cannot hold their layers otherwise.
    """
    # imported here, and only when already loaded: importing bitsandbytes or torchao is slow and prints notices
    if "bitsandbytes" in sys.modules:
        import bitsandbytes as bnb

        if isinstance(module, bnb.nn.Linear8bitLt):
            return "bitsandbytes 8-bit (Linear8bitLt)"
        if isinstance(module, bnb.nn.Linear4bit):
            kind = getattr(module.weight, "quant_type", None) or "4-bit"
            return f"bitsandbytes 4-bit {kind} (Linear4bit)"
    weight = getattr(module, "weight", None)
    if "torchao" in sys.modules and isinstance(weight, torch.Tensor):
        from torchao.utils import TorchAOBaseTensor

        if isinstance(weight, TorchAOBaseTensor):
            return f"torchao {type(weight).__name__}"
    if isinstance(weight, torch.Tensor) and not weight.dtype.is_floating_point:
        return f"{weight.dtype} weights ({type(module).__name__})"
    return None


def is_quantized(module: nn.Module) -> bool:
    """True when `module`'s weight is quantised (see `quantization_of`)."""
    return quantization_of(module) is not None


def check_mergeable(base_layer: nn.Module, what: str = "merge") -> None:
    """Raise `QuantizedMergeError` when `base_layer` is quantised, saying why and what to do instead.

    Args:
        base_layer: the layer an `IA3Layer` wraps.
        what: the operation refused, for the message (`merge`, `to_module`).
    """
    kind = quantization_of(base_layer)
    if kind is None:
        return
    raise QuantizedMergeError(
        f"Cannot {what} an (IA)^3 adapter into a quantised layer ({kind}): its weight is stored as quantised codes, "
        "and folding the vector in would mean dequantising, scaling and quantising again, rounding the merged "
        "weight a second time. Keep the adapter unmerged (it runs on the quantised base as it is), or load the "
        "base in full precision (recipe: --model.quantization none) and merge there; the adapter file is the same."
    )


def float_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype of vectors and ones for a layer with this weight: the weight's own when it is a float, else float32
    (bitsandbytes stores int8 / packed uint8 codes)."""
    return weight.dtype if weight.dtype.is_floating_point else torch.float32


# -- prepare_model_for_kbit_training -------------------------------------------------------------------------------
def _quantization_method(model: nn.Module) -> str | None:
    """transformers' `model.quantization_method` (a str enum) as a lower-case string, or None."""
    method = getattr(model, "quantization_method", None)
    if getattr(model, "hqq_quantized", False):
        return "hqq"
    return str(getattr(method, "value", method)).lower() if method is not None else None


def _is_params4bit(param: torch.Tensor) -> bool:
    return type(param).__name__ == "Params4bit"


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict | None = None,
    auto_clear_cache: bool = True,
) -> nn.Module:
    """Get a quantised (k-bit) transformers model ready for adapter training, as PEFT's function of this name does.

    1. Freezes every parameter (the adapter added afterwards trains alone).
    2. Unless the weights are in a format that owns its dtypes (GPTQ, AQLM, EETQ, HQQ, torchao), casts every float16
       / bfloat16 parameter that is not a bitsandbytes 4-bit weight to float32: layer norms and the non-quantised
       layers then compute in full precision, which keeps training stable.
    3. For a model loaded in 8 or 4 bit (or by one of those formats) and `use_gradient_checkpointing`: makes the input
       embeddings' output require grad (re-entrant checkpointing needs an input that requires grad, and a frozen
       base has none) unless `use_reentrant=False` is asked for, then enables gradient checkpointing.

    Args:
        model: a transformers `PreTrainedModel` (any `nn.Module` works for steps 1 and 2).
        use_gradient_checkpointing: enable gradient checkpointing on a quantised model (less activation memory,
            one more forward in backward).
        gradient_checkpointing_kwargs: passed to `model.gradient_checkpointing_enable` (e.g. `{"use_reentrant":
            False}`), when that method takes them.
        auto_clear_cache: after the casts, empty the CUDA allocator's cache (memory it holds but no longer uses).

    Returns:
        `model`, changed in place.
    """
    kwargs = dict(gradient_checkpointing_kwargs or {})
    loaded_in_kbit = bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False))
    method = _quantization_method(model)
    owns_dtypes = method in ("gptq", "aqlm", "eetq", "hqq", "torchao")
    for param in model.parameters():
        param.requires_grad_(False)
    if not owns_dtypes:
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and not _is_params4bit(param):
                param.data = param.data.to(torch.float32)
        if auto_clear_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()
    if (loaded_in_kbit or owns_dtypes) and use_gradient_checkpointing:
        if kwargs.get("use_reentrant", True):
            _make_inputs_require_grad(model)
        enable = model.gradient_checkpointing_enable
        if "gradient_checkpointing_kwargs" in inspect.signature(enable).parameters:
            enable(gradient_checkpointing_kwargs=kwargs)
        else:
            if kwargs:
                warnings.warn(
                    f"{type(model).__name__}.gradient_checkpointing_enable takes no gradient_checkpointing_kwargs; "
                    f"ignoring {kwargs}",
                    stacklevel=2,
                )
            enable()
    return model


def _make_inputs_require_grad(model: nn.Module) -> None:
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
        return

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        output.requires_grad_(True)

    model.get_input_embeddings().register_forward_hook(hook)


def keep_4bit_weights_trainable_on_cpu(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel; returns the layers changed.

    On a CPU with AVX512-BF16, `Linear4bit.forward` in eval mode without grad rewrites its weight, in place, into
    the layout of a CPU inference kernel that has no backward; the next training step then fails ("a view of a leaf
    Variable that requires grad is being used in an in-place operation"), and layers narrower than a block (64
    inputs) fail at once. A training run that evaluates between epochs (the recipe) switches that off. GPUs never
    take this path.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


# -- loading (the recipe) ------------------------------------------------------------------------------------------
def check_backend(quantization: str, setting: str = "model.quantization") -> None:
    """Raise ValueError when `quantization` is unknown or its backend package is not installed (before any loading).

    Args:
        quantization: one of `QUANTIZATIONS`.
        setting: the name of the setting, for the message (`--model.quantization`).
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"{setting} must be one of {list(QUANTIZATIONS)}; got {quantization!r}")
    package = QUANTIZATIONS[quantization][0]
    if package is not None and importlib.util.find_spec(package) is None:
        others = [q for q, (p, _) in QUANTIZATIONS.items() if p is None or importlib.util.find_spec(p) is not None]
        raise ValueError(
            f"{setting} {quantization} ({QUANTIZATIONS[quantization][1]}) needs the {package} package, which is "
            f"not installed: pip install {package}, or pick one of {others}"
        )


def quantization_config(quantization: str, compute_dtype: torch.dtype = torch.float32, skip: list[str] | None = None):
    """transformers' quantisation config for a `model.quantization` value (None for `none`).

    Args:
        quantization: one of `QUANTIZATIONS`.
        compute_dtype: the dtype 4-bit layers compute in (the run's precision).
        skip: module names to keep in full precision (e.g. a classifier head that trains in full).
    """
    check_backend(quantization)
    if quantization == "none":
        return None
    if quantization == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    if quantization == "nf4":
        return transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=skip,
        )
    from torchao.quantization import Int8WeightOnlyConfig  # lazy: optional, and slow and noisy to import

    return transformers.TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=skip)
