"""Calls of ia3's public API, type-checked by tests/test_typing.py with mypy; never run (pytest does not collect it).

`assert_type` pins the type mypy must infer. A method that `PeftModel` lacked would be reached through its
`__getattr__` pass-through and typed `Any`, which fails `assert_type`; so each line checks the method is real.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from typing import Any, Literal, assert_type

import torch
from torch import nn

import ia3
from ia3 import IA3Config, IA3Layer, IA3Model, PeftModel, WeightLayout, get_peft_model


def peft_model_api(base: nn.Module, folder: str | os.PathLike[str]) -> None:
    config = IA3Config(
        task_type="CAUSAL_LM", target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]
    )
    model = get_peft_model(base, config)
    assert_type(model, PeftModel)
    assert_type(model.base_model, IA3Model)
    model.print_trainable_parameters()
    assert_type(model.get_nb_trainable_parameters(), tuple[int, int])
    assert_type(model.peft_config["default"], IA3Config)
    assert_type(model.targeted_module_names, list[str])

    model.add_adapter("other", IA3Config(task_type="CAUSAL_LM"))
    assert_type(model.set_adapter("default"), None)
    model.set_adapter(["default", "other"])
    assert_type(model.active_adapters, list[str])
    assert_type(model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix"), None)
    assert_type(model.delete_adapter("other"), None)

    assert_type(model.merge_adapter(), None)
    model.merge_adapter(["mix"], safe_merge=True)
    assert_type(model.merged, bool)
    assert_type(model.unmerge_adapter(), None)

    disabled: AbstractContextManager[None] = model.disable_adapter()
    with disabled as nothing:
        assert_type(nothing, None)  # `Any` if disable_adapter came through __getattr__
    with model.per_example(["default", ia3.BASE_ADAPTER]) as nothing:
        assert_type(nothing, None)

    ids = torch.ones(2, 4, dtype=torch.long)
    generated: Any = model.generate(input_ids=ids, adapter_names=["default", ia3.BASE_ADAPTER], max_new_tokens=3)
    del generated
    model(input_ids=ids, adapter_names=["mix", "default"])
    passed_through: tuple[Any, Any] = (model.config, model.generation_config)  # the wrapped model's, as in PEFT
    del passed_through

    assert_type(model.save_pretrained(folder), None)
    model.save_pretrained(folder, selected_adapters=["default"])
    loaded = PeftModel.from_pretrained(base, folder, is_trainable=True)
    assert_type(loaded, PeftModel)
    loaded.load_adapter(folder, "again")

    assert_type(model.get_base_model(), nn.Module)
    assert_type(model.merge_and_unload(), nn.Module)
    assert_type(model.merge_and_unload(safe_merge=True, adapter_names=["default"]), nn.Module)
    assert_type(loaded.unload(), nn.Module)


def layer_api() -> None:
    layer = IA3Layer.from_module(nn.Linear(5, 3), is_feedforward=False)
    assert_type(layer, IA3Layer)
    assert_type(layer.add_adapter("a", init_ones=False), None)
    layer.add_adapter("b", dtype=torch.float32)
    assert_type(layer.set_adapter(["a", "b"]), None)
    layer.set_adapter("a")
    assert_type(layer.active_adapters, list[str])
    assert_type(layer.layout, WeightLayout)
    assert_type(layer.forward(torch.randn(2, 5)), torch.Tensor)
    assert_type(layer.merge(), None)
    layer.merge(["b"], safe_merge=True)
    assert_type(layer.unmerge(), None)
    assert_type(layer.to_module(), nn.Module)
    layer.to_module(["a", "b"])
    layer.delete_adapter("b")
    assert_type(WeightLayout.of(nn.Conv1d(4, 6, 3)), WeightLayout)
    assert_type(IA3Layer.from_module(nn.Conv2d(4, 6, 3), is_feedforward=True).vector_shape(), tuple[int, ...])


def peft_functions_api(base: nn.Module, folder: str | os.PathLike[str]) -> None:
    """PEFT's functions and the rest of `PeftModel`'s methods (tests/test_peft_api.py checks them against peft)."""
    model = get_peft_model(base, IA3Config(task_type="CAUSAL_LM"), revision="main", low_cpu_mem_usage=False)
    state = ia3.get_peft_model_state_dict(model, adapter_name="default")
    assert_type(state, dict[str, torch.Tensor])
    result = ia3.set_peft_model_state_dict(model, state, adapter_name="default", low_cpu_mem_usage=False)
    assert_type(result.missing_keys, list[str])
    assert_type(ia3.get_base_model_state_dict(model), dict[str, torch.Tensor])
    assert_type(ia3.set_base_model_state_dict(model, {}, strict=False).unexpected_keys, list[str])
    assert_type(ia3.load_peft_weights(folder, device="cpu"), dict[str, torch.Tensor])
    assert_type(ia3.inject_adapter_in_model(IA3Config(target_modules=["c_attn"]), nn.Linear(2, 2)), nn.Module)
    assert_type(ia3.cast_mixed_precision_params(model, torch.bfloat16), None)
    assert_type(ia3.PeftConfig.from_pretrained(folder), IA3Config)
    assert_type(ia3.PeftConfig.from_peft_type(peft_type="IA3"), IA3Config)
    assert_type(IA3Config.from_json_file("adapter_config.json"), dict[str, Any])
    assert_type(ia3.get_layer_status(model), list[ia3.TunerLayerStatus])
    assert_type(ia3.get_model_status(model), ia3.TunerModelStatus)
    assert_type(model.get_model_status().enabled, bool | Literal["irregular"])

    model.add_adapter("half", IA3Config(task_type="CAUSAL_LM"), low_cpu_mem_usage=False, autocast_adapter_dtype=True)
    loaded = model.load_adapter(
        folder, "again", torch_device="cpu", autocast_adapter_dtype=True, low_cpu_mem_usage=True
    )
    assert_type(loaded.missing_keys, list[str])
    again = PeftModel.from_pretrained(base, folder, torch_device="cpu", low_cpu_mem_usage=True, device_map="auto")
    assert_type(again, PeftModel)
    assert_type(model.disable_adapter_layers(), None)
    assert_type(model.enable_adapter_layers(), None)
    assert_type(model.set_requires_grad(["half"], requires_grad=False), None)
    assert_type(model.prepare_model_for_gradient_checkpointing(base), nn.Module)
    assert_type(model.active_peft_config, IA3Config)
    assert_type(model.modules_to_save, set[str] | None)
    assert_type(model.get_layer_status(), list[ia3.TunerLayerStatus])
