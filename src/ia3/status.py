"""`get_layer_status` / `get_model_status`: the state of every adapter layer of a model, in PEFT's dataclasses.

A model whose layers disagree (some enabled, some not; different active adapters) reports `"irregular"` for that
field, as PEFT does: a sign that something changed layers one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from ia3.layer import IA3Layer
from ia3.model_card import is_transformers_model
from ia3.modules_to_save import ModulesToSaveWrapper
from ia3.tuner import is_peft_model

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    """One adapter layer: an `IA3Layer` or a `modules_to_save` wrapper.

    Attributes:
        name: its name in the model (`base_model.<path>` for a `PeftModel`, as in PEFT).
        module_type: its class name.
        enabled: False while adapters are disabled.
        active_adapters: the model's active adapters (PEFT lists them for every layer, also one that lacks some).
        merged_adapters: those folded into its weights.
        requires_grad: adapter name -> whether its parameters here train (`"irregular"` if only some do).
        available_adapters: every adapter it has, sorted.
        devices: adapter name -> the device types its parameters are on.
        quantization_backend: None: ia3 layers wrap unquantised weights.
    """

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    """All adapter layers of a model together; a field is `"irregular"` where the layers disagree."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Irregular


def _all_or_none(values: list[bool]) -> bool | Irregular:
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _layer_status(
    name: str, module: IA3Layer | ModulesToSaveWrapper, model_active: list[str] | None
) -> TunerLayerStatus:
    if isinstance(module, IA3Layer):
        params = {adapter: [vector] for adapter, vector in module.ia3_l.items()}
        active, merged = module.active_adapters, list(module.merged_adapters)
    else:
        params = {adapter: list(copy.parameters()) for adapter, copy in module.modules_to_save.items()}
        active = [module.active_adapter] if module.active_adapter is not None else []
        merged = []
    if model_active is not None:  # as PEFT: the model's active adapters, also where a layer lacks some of them
        active = list(model_active)
    return TunerLayerStatus(
        name=name,
        module_type=type(module).__name__,
        enabled=not module.disabled,
        active_adapters=active,
        merged_adapters=merged,
        requires_grad={a: _all_or_none([p.requires_grad for p in ps]) for a, ps in params.items() if ps},
        available_adapters=sorted(params),
        devices={a: sorted({p.device.type for p in ps}) for a, ps in params.items()},
        quantization_backend=None,
    )


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """The status of each `IA3Layer` and `modules_to_save` wrapper of `model` (a `PeftModel` or any model with
    (IA)^3 layers), in module order.

    Raises:
        ValueError: `model` has no adapter layer.
    """
    peft = is_peft_model(model)
    root = model.base_model if peft else model
    active = model.active_adapters if peft else None
    status = [
        _layer_status(name, module, active)
        for name, module in root.named_modules()
        if isinstance(module, (IA3Layer, ModulesToSaveWrapper))
    ]
    if not status:
        raise ValueError(  # PEFT's words, then what the model is
            "No adapter layers found in the model, please ensure that it's a PEFT model or that you have PEFT adapters "
            f"injected in the model. (This {type(model).__name__} has no (IA)^3 layers.)"
        )
    return status


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The status of `model`'s adapters as a whole (see `TunerModelStatus`).

    Raises:
        ValueError: `model` has no adapter layer.
    """
    layers = get_layer_status(model)
    if is_peft_model(model):
        base_type = type(model.get_base_model()).__name__
        adapter_type = type(model.base_model).__name__
        peft_types = {name: str(config.peft_type) for name, config in model.peft_config.items()}
    else:
        base_type = type(model).__name__ if is_transformers_model(model) else "other"
        adapter_type, peft_types = "None", {}
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)

    enabled = {s.enabled for s in layers}
    actives = {tuple(s.active_adapters) for s in layers}
    merged_somewhere = set().union(*(s.merged_adapters for s in layers))
    merged_everywhere = not any((set(s.available_adapters) - set(s.merged_adapters)) & merged_somewhere for s in layers)
    grads: dict[str, list[bool | Irregular]] = {}
    devices: dict[str, set[str]] = {}
    for s in layers:
        for adapter, value in s.requires_grad.items():
            grads.setdefault(adapter, []).append(value)
        for adapter, types in s.devices.items():
            devices.setdefault(adapter, set()).update(types)
    backends = {s.quantization_backend for s in layers}
    return TunerModelStatus(
        base_model_type=base_type,
        adapter_model_type=adapter_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=sum(p.numel() for p in params),
        num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=list(actives.pop()) if len(actives) == 1 else "irregular",
        merged_adapters=sorted(merged_somewhere) if merged_everywhere else "irregular",
        requires_grad={a: _all_or_none(v) for a, v in grads.items()},  # type: ignore[arg-type]
        available_adapters=sorted(set().union(*(s.available_adapters for s in layers))),
        devices={a: sorted(t) for a, t in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else "irregular",
    )
