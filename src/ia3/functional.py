"""PEFT's functions on models and state dicts, for code that calls them by name: inject adapters into a plain model,
take an adapter's tensors out or put them back, the base model's own state dict, adapter weights from a file, and
mixed-precision casting.

Each function takes a `PeftModel` or a plain model with (IA)^3 layers injected (`inject_adapter_in_model`). Keys are
PEFT's: `base_model.model.<path>.ia3_l` for a `PeftModel`, `<path>.ia3_l` for a plain model (the adapter name is
left out, so an adapter can be loaded under any name).
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ia3.config import IA3Config, names_overlap
from ia3.hub import resolve_file
from ia3.layer import IA3Layer
from ia3.modules_to_save import ModulesToSaveWrapper
from ia3.serialization import PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, load_tensors
from ia3.tuner import IA3Model, is_peft_model

PREFIX = "base_model.model."
# Modules that torch's FSDP (version 1) and activation checkpointing insert between a module and its children; the
# state dicts they produce leave them out, and so do adapter keys.
WRAPPER_MODULES = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


class IncompatibleKeys(NamedTuple):
    """What loading a state dict left out (`missing_keys`) and did not use (`unexpected_keys`), as torch's
    `load_state_dict` reports it."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def unwrapped_name(name: str) -> str:
    """`name` without the modules FSDP and activation checkpointing insert."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_MODULES)


def _root(model: nn.Module) -> tuple[nn.Module, str]:
    """(the module whose children are the model's layers, the prefix of its names in `model.state_dict()`)."""
    if is_peft_model(model):
        return model.base_model.model, PREFIX  # type: ignore[return-value]
    return model, ""


def _adapter_keys(model: nn.Module, adapter_name: str) -> dict[str, tuple[str, torch.Tensor]]:
    """PEFT's key of each tensor of `adapter_name` -> (its key in `model.state_dict()`, the live tensor)."""
    root, prefix = _root(model)
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for name, module in root.named_modules():
        clean = unwrapped_name(name)
        # the keys of the full state dict leave out FSDP's and checkpointing's wrapper modules, as torch writes them
        if isinstance(module, IA3Layer) and adapter_name in module.ia3_l:
            out[f"{prefix}{clean}.ia3_l"] = (f"{prefix}{clean}.ia3_l.{adapter_name}", module.ia3_l[adapter_name])
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for key, tensor in module.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                key = unwrapped_name(key)
                out[f"{prefix}{clean}.{key}"] = (f"{prefix}{clean}.modules_to_save.{adapter_name}.{key}", tensor)
    return out


def _configs(model: nn.Module) -> dict[str, IA3Config]:
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        raise ValueError(
            f"This {type(model).__name__} has no (IA)^3 adapters: pass a PeftModel or a model that "
            "inject_adapter_in_model changed"
        )
    return configs


def _check_adapter(model: nn.Module, adapter_name: str) -> None:
    configs = _configs(model)
    if adapter_name not in configs:
        raise ValueError(f"Unknown adapter name {adapter_name!r}; this model has {list(configs)}")


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, torch.Tensor]:
    """The tensors of adapter `adapter_name`, under PEFT's keys (what `save_pretrained` writes).

    Args:
        model: a `PeftModel` (keys `base_model.model.<path>.ia3_l`) or a model changed by `inject_adapter_in_model`
            (keys `<path>.ia3_l`).
        state_dict: take the tensors from this full state dict of `model` instead of the live parameters, e.g.
            `accelerator.get_state_dict(model)` under FSDP or DeepSpeed ZeRO-3.
        adapter_name: the adapter.
        unwrap_compiled: `model` is a `torch.compile` result: use the module it compiled.
        save_embedding_layers: PEFT saves embedding layers it targets or that were resized; (IA)^3 never targets
            an embedding, so only `"auto"` and False are accepted.

    Raises:
        ValueError: unknown adapter, `state_dict` lacks an adapter tensor, or `save_embedding_layers=True`.
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    if save_embedding_layers is True:
        raise ValueError(
            "save_embedding_layers=True: ia3 saves only the adapter's own tensors ((IA)^3 never adapts an embedding); "
            "save a resized embedding with the base model instead"
        )
    _check_adapter(model, adapter_name)
    keys = _adapter_keys(model, adapter_name)
    if state_dict is None:
        return {key: tensor.detach() for key, (_, tensor) in keys.items()}
    missing = [full for full, _ in keys.values() if full not in state_dict]
    if missing:
        raise ValueError(f"state_dict lacks {len(missing)} tensor(s) of adapter {adapter_name!r}, e.g. {missing[:3]}")
    return {key: state_dict[full].detach() for key, (full, _) in keys.items()}


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> IncompatibleKeys:
    """Put PEFT-keyed adapter tensors (as `get_peft_model_state_dict` returns them) into adapter `adapter_name`.

    As in PEFT this is torch's non-strict `load_state_dict` on the whole model: it returns every key of `model` that
    got no tensor (`missing_keys`, base weights included) and every given key that fits no adapter
    (`unexpected_keys`). `PeftModel.load_adapter` is the strict way.

    Args:
        model: a `PeftModel` or a model changed by `inject_adapter_in_model`, with adapter `adapter_name` in place.
        peft_model_state_dict: the tensors, keys without the adapter name.
        adapter_name: the adapter to fill (any name: keys do not carry it).
        ignore_mismatched_sizes: skip tensors whose shape differs from the adapter's (with a warning) instead of
            raising.
        low_cpu_mem_usage: assign the given tensors instead of copying into the adapter's (needed when the adapter
            was created on the meta device); they are moved to their layer's device.

    Raises:
        ValueError: unknown adapter.
        RuntimeError: a shape mismatch (unless `ignore_mismatched_sizes`), as torch raises it.
    """
    _check_adapter(model, adapter_name)
    keys = _adapter_keys(model, adapter_name)
    if not is_peft_model(model):
        peft_model_state_dict = {k.removeprefix(PREFIX): v for k, v in peft_model_state_dict.items()}
    mapped: dict[str, torch.Tensor] = {}
    mismatched: list[str] = []
    for key, tensor in peft_model_state_dict.items():
        if key not in keys:
            mapped[key] = tensor
            continue
        full, live = keys[key]
        if ignore_mismatched_sizes and tuple(tensor.shape) != tuple(live.shape):
            mismatched.append(f"{key}: {tuple(tensor.shape)} in the state dict, {tuple(live.shape)} in the model")
            continue
        mapped[full] = tensor
    result = model.load_state_dict(mapped, strict=False, assign=low_cpu_mem_usage)
    if low_cpu_mem_usage:
        root, _ = _root(model)
        for module in root.modules():
            if isinstance(module, IA3Layer) and adapter_name in module.ia3_l:
                vector = module.ia3_l[adapter_name]
                device = module.base_layer.weight.device
                if vector.device != device:
                    module.ia3_l[adapter_name] = nn.Parameter(vector.to(device), requires_grad=vector.requires_grad)
        if is_peft_model(model):
            model.base_model._per_example.clear()  # type: ignore[union-attr]  # tables of the replaced vectors
    if mismatched:
        warnings.warn(
            "Skipped tensors whose shape does not fit (ignore_mismatched_sizes=True):\n  - "
            + "\n  - ".join(mismatched),
            UserWarning,
            stacklevel=2,
        )
    return IncompatibleKeys(list(result.missing_keys), list(result.unexpected_keys))


def inject_adapter_in_model(
    peft_config: IA3Config,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Wrap `model`'s targeted layers with (IA)^3 layers in place and return `model` itself (no `PeftModel`).

    The model gets a `peft_config` dict (adapter name -> resolved config), as PEFT gives it; the functions of this
    module and `get_layer_status` work on it.

    Args:
        peft_config: what to target.
        model: the model to change.
        adapter_name: the adapter's name.
        low_cpu_mem_usage: create the vectors on the meta device, to be assigned by
            `set_peft_model_state_dict(..., low_cpu_mem_usage=True)`.
        state_dict: target exactly the modules this adapter state dict (PEFT keys, with or without
            `base_model.model.`) has vectors for, instead of `peft_config.target_modules`; only the keys are read.
            Input-side modules still come from `feedforward_modules`.
    """
    if not isinstance(peft_config, IA3Config):
        raise TypeError(f"peft_config must be an ia3.IA3Config; got {type(peft_config).__name__}")
    if state_dict is not None:
        found: set[str] = set()
        for key in state_dict:
            key = key.removeprefix(PREFIX)
            if key.endswith(".ia3_l"):
                found.add(key.removesuffix(".ia3_l"))
            elif ".ia3_l." in key:  # a live state dict: the adapter name follows
                found.add(key.split(".ia3_l.")[0])
        names = sorted(found)
        if not names:
            raise ValueError("state_dict has no (IA)^3 vectors (keys ending in .ia3_l) to find the targets from")
        feedforward = peft_config.feedforward_modules
        if isinstance(feedforward, list):
            feedforward = [n for n in names if names_overlap(n, feedforward)]
        peft_config = dataclasses.replace(
            peft_config, target_modules=names, exclude_modules=None, feedforward_modules=feedforward
        )
    tuner = IA3Model(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    existing = getattr(model, "peft_config", None)
    configs = existing if isinstance(existing, dict) else {}
    configs.update(tuner.peft_config)
    model.peft_config = configs  # type: ignore[assignment]
    return model


def _original_key(root: nn.Module, key: str) -> str | None:
    """The key `key` of `root.state_dict()` had before (IA)^3 wrapped layers; None for an adapter tensor."""
    parts = key.split(".")
    kept: list[str] = []
    current: nn.Module | None = root
    for part in parts:
        child = getattr(current, part, None) if current is not None else None
        if isinstance(current, IA3Layer) and part == "ia3_l":
            return None
        if isinstance(current, ModulesToSaveWrapper) and part == "modules_to_save":
            return None
        if isinstance(current, IA3Layer) and part == "base_layer":
            current = child
            continue
        if isinstance(current, ModulesToSaveWrapper) and part == "original_module":
            current = child
            continue
        kept.append(part)
        current = child if isinstance(child, nn.Module) else None
    return ".".join(kept)


def _base_keys(model: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    root, _ = _root(model)
    mapping: dict[str, str] = {}
    for key in root.state_dict():
        original = _original_key(root, key)
        if original is not None:
            mapping[original] = key
    return root, mapping


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict under its own keys (no `.base_layer` / `.original_module`, no adapter
    tensors): what `model.get_base_model().state_dict()` was before (IA)^3 wrapped layers. Merged adapters are in
    the weights as they are now."""
    root, mapping = _base_keys(model)
    current = root.state_dict()
    return {original: current[key] for original, key in mapping.items()}


def set_base_model_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True
) -> IncompatibleKeys:
    """Load a state dict with the base model's own keys into the wrapped model (the counterpart of
    `get_base_model_state_dict`), e.g. base weights loaded after wrapping.

    Raises:
        RuntimeError: `strict` and keys are missing or unexpected (torch's exception type; nothing is loaded).
    """
    root, mapping = _base_keys(model)
    unexpected = [k for k in state_dict if k not in mapping]
    missing = [k for k in mapping if k not in state_dict]
    if strict and (missing or unexpected):
        problems = []
        if missing:
            problems.append(f"Missing key(s) in state_dict: {missing}")
        if unexpected:
            problems.append(f"Unexpected key(s) in state_dict: {unexpected}")
        raise RuntimeError("Error(s) in loading the base model's state_dict:\n\t" + "\n\t".join(problems))
    root.load_state_dict({mapping[k]: v for k, v in state_dict.items() if k in mapping}, strict=False)
    return IncompatibleKeys(missing, unexpected)


def _infer_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_weights_file(
    model_id: str | os.PathLike,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> Path:
    """The adapter weights file of a folder or Hub repo: `adapter_model.safetensors`, else a pickled
    `adapter_model.bin` (whether a pickle may be read is `load_tensors`' decision).

    Raises:
        FileNotFoundError: neither file is there.
    """
    for name in (WEIGHTS_NAME, PICKLE_WEIGHTS_NAME):
        path = resolve_file(model_id, name, subfolder=subfolder, revision=revision, token=token, missing_ok=True)
        if path is not None:
            return path
    raise FileNotFoundError(f"{model_id} has no {WEIGHTS_NAME} (nor {PICKLE_WEIGHTS_NAME})")


def load_peft_weights(
    model_id: str | os.PathLike,
    device: str | torch.device | None = None,
    key_mapping: dict[str, str] | None = None,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    allow_pickle: bool = False,
    **kwargs: Any,
) -> dict[str, torch.Tensor]:
    """The adapter tensors of a folder or Hub repo (`adapter_model.safetensors`, or a pickled `adapter_model.bin`
    with `allow_pickle=True`), under the keys of the file.

    Args:
        model_id: a folder saved by `save_pretrained` or a Hub repo id.
        device: where to put the tensors; None: the accelerator if there is one, else the CPU (as PEFT does).
        key_mapping: regex -> replacement applied to each key without its `base_model.model.` prefix (the first
            pattern that matches wins), for adapters saved from an older layout of a model.
        subfolder, revision, token: where on the Hub, as for `hf_hub_download`.
        allow_pickle: read a pickled `.bin` file (unpickling can run code: only for files you trust).
        kwargs: other `hf_hub_download` arguments PEFT passes; accepted and not used.

    Raises:
        FileNotFoundError: no adapter weights there.
        ValueError: a corrupt file, a pickle not allowed, or a key `key_mapping` cannot place.
    """
    path = resolve_weights_file(model_id, subfolder=subfolder, revision=revision, token=token)
    tensors = load_tensors(path, allow_pickle=allow_pickle)
    device = device if device is not None else _infer_device()
    tensors = {k: v.to(device) for k, v in tensors.items()}
    if not key_mapping:
        return tensors
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        prefix = PREFIX if key.startswith(PREFIX) else "base_model." if key.startswith("base_model.") else None
        if prefix is None:
            raise ValueError(f"key_mapping: the key {key!r} of {path} does not start with {PREFIX!r}")
        rest = key.removeprefix(prefix)
        for pattern, replacement in key_mapping.items():
            rest, count = re.subn(pattern, replacement, rest)
            if count:
                break
        out[prefix + rest] = tensor
    return out


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """For mixed-precision training: frozen parameters to `dtype` (float16 or bfloat16, saving memory), trainable
    ones (the vectors) to float32 (stable updates). Changes `model` in place."""
    for param in model.parameters():
        param.data = param.data.to(torch.float32 if param.requires_grad else dtype)
