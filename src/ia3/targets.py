"""Which modules of a model get an (IA)^3 vector, and on which side.

The default tables equal PEFT's (`TRANSFORMERS_MODELS_TO_IA3_*_MAPPING`), so that an adapter trained with either
library without `target_modules` targets the same modules and loads in the other.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

from ia3.config import ALL_LINEAR, IA3Config, names_overlap
from ia3.layer import IA3Layer

# model_type -> modules that get a vector (attention keys/values and the feed-forward layer, per the paper)
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "RefinedWebModel": ["query_key_value", "dense_4h_to_h"],
    "RefinedWeb": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}

# model_type -> targets whose vector scales the input (the feed-forward layer's intermediate activation)
DEFAULT_FEEDFORWARD_MODULES: dict[str, list[str]] = {
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"],
    "opt": ["fc2"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"],
    "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"],
    "llama": ["down_proj"],
    "llama4": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "bert": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "deberta": ["output.dense"],
    "RefinedWeb": ["dense_4h_to_h"],
    "RefinedWebModel": ["dense_4h_to_h"],
    "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
}

SUPPORTED_LAYERS = (nn.Linear, Conv1D, nn.Conv2d, nn.Conv3d)


def matches(names: list[str] | str | None, key: str) -> bool:
    """True when module `key` is named by `names`: a regex matching all of `key`, or a list of exact names / dotted
    suffixes (`"output.dense"` matches `"encoder.layer.0.output.dense"`, not `"encoder.layer.0.attention.outputdense"`)."""
    if not names:
        return False
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return any(key == name or key.endswith("." + name) for name in names)


def _in_modules_to_save(modules_to_save: list[str] | None, key: str) -> bool:
    """A module inside (or equal to) a `modules_to_save` module is trained in full, so never gets a vector."""
    if not modules_to_save:
        return False
    parts = key.split(".")
    return any(
        parts[i : i + len(name.split("."))] == name.split(".") for name in modules_to_save for i in range(len(parts))
    )


def model_type_of(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) if config is not None else None


def linear_module_names(model: nn.Module) -> list[str]:
    """Full names of the layers ia3 can wrap (`nn.Linear`, `Conv1D`, `nn.Conv2d`, `nn.Conv3d`)."""
    return [name for name, module in model.named_modules() if isinstance(module, SUPPORTED_LAYERS) and name]


def _output_layer_names(model: nn.Module, task_type: str | None) -> set[str]:
    heads: list[nn.Module] = []
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    if out_emb is not None:
        heads.append(out_emb)
    elif task_type == "SEQ_CLS":
        for attr in ("classifier", "score"):
            head = getattr(model, attr, None)
            if isinstance(head, nn.Module):
                heads.append(head)
                break
    return {name for name, module in model.named_modules() if any(module is h for h in heads)}


@dataclass(frozen=True)
class Target:
    """One module that gets a vector: its full name and whether its vector scales the input."""

    name: str
    is_feedforward: bool


def resolve_config(config: IA3Config, model: nn.Module) -> IA3Config:
    """Fill the fields a config leaves to the model (default targets, `all-linear`, `fan_in_fan_out`).

    Returns a new config; `config` itself is never changed.

    Raises:
        ValueError: the model type has no default targets, naming the model's linear layers to pick from.
    """
    changes: dict[str, object] = {}
    model_type = model_type_of(model)
    if config.target_modules is None:
        if model_type not in DEFAULT_TARGET_MODULES:
            suffixes = sorted({name.rsplit(".", 1)[-1] for name in linear_module_names(model)})
            raise ValueError(
                f"ia3 has no default target modules for model type {model_type!r}; pass "
                f"IA3Config(target_modules=[...]) naming some of this model's layers: {suffixes}"
            )
        changes["target_modules"] = sorted(DEFAULT_TARGET_MODULES[model_type])
    elif config.target_modules == ALL_LINEAR:
        excluded = _output_layer_names(model, config.task_type)
        changes["target_modules"] = sorted(
            name
            for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, Conv1D)) and name and name not in excluded
        )
    if config.feedforward_modules is None:
        # As PEFT: the model type's feed-forward defaults apply whenever feedforward_modules is not given, also
        # with explicit target_modules; defaults that name none of the listed targets are dropped (PEFT keeps them,
        # writing an adapter_config.json that fails its own subset check on load).
        defaults = DEFAULT_FEEDFORWARD_MODULES.get(model_type, []) if model_type else []
        targets = changes.get("target_modules", config.target_modules)
        if isinstance(targets, list):
            defaults = [name for name in defaults if names_overlap(name, targets)]
        changes["feedforward_modules"] = sorted(defaults)
    resolved = dataclasses.replace(config, **changes) if changes else config
    uses_conv1d = any(isinstance(model.get_submodule(t.name), Conv1D) for t in find_targets(resolved, model))
    if uses_conv1d != resolved.fan_in_fan_out:
        resolved = dataclasses.replace(resolved, fan_in_fan_out=uses_conv1d)
    return resolved


def find_targets(config: IA3Config, model: nn.Module) -> list[Target]:
    """The modules of `model` that `config` (resolved) targets, in module order.

    Raises:
        ValueError: a targeted module is of a type ia3 cannot wrap, or nothing matches.
    """
    found: list[Target] = []
    unsupported: list[str] = []
    wrapped: list[str] = []  # names of existing IA3Layers: their inner `base_layer` is never a target itself
    for name, module in model.named_modules():
        if not name or any(name.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(module, IA3Layer):
            wrapped.append(name)
        if not matches(config.target_modules, name):
            continue
        if matches(config.exclude_modules, name) or _in_modules_to_save(config.modules_to_save, name):
            continue
        if isinstance(module, IA3Layer):
            module = module.base_layer
        if isinstance(module, SUPPORTED_LAYERS):
            found.append(Target(name, matches(config.feedforward_modules, name)))
        elif isinstance(config.target_modules, list) or not any(True for _ in module.children()):
            unsupported.append(f"{name} ({type(module).__name__})")
    if unsupported:
        raise ValueError(
            f"target_modules names module(s) ia3 cannot wrap: {unsupported}. Supported layers: nn.Linear, "
            "transformers' Conv1D, nn.Conv2d, nn.Conv3d; name those layers instead."
        )
    if not found:
        suffixes = sorted({name.rsplit(".", 1)[-1] for name in linear_module_names(model)})
        raise ValueError(
            f"target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}) matches no layer "
            f"of this {type(model).__name__}; its linear layers are named {suffixes}"
        )
    return found
