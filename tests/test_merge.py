"""Merging vectors into weights: same outputs, exact unmerge, safe_merge, merge_and_unload, unload."""

from __future__ import annotations

import models as M
import pytest
import torch
from conftest import assert_same_tensors, base_weights, ia3_layers, randomize
from torch import nn

import ia3


def _adapted(name: str, **kwargs) -> ia3.PeftModel:
    model = ia3.get_peft_model(M.ALL[name](), ia3.IA3Config(task_type=M.TASK[name], **kwargs))
    randomize(model, spread=0.9)
    return model


def _logits(model, name):
    with torch.no_grad():
        return model(**M.batch(name)).logits


@pytest.mark.parametrize("name", ["t5", "gpt2", "bert", "llama"])
def test_merge_same_outputs_and_exact_unmerge(name):
    kwargs = {"target_modules": "all-linear"} if name == "bert" else {}  # bert: also biased output-side layers
    model = _adapted(name, **kwargs)
    original = base_weights(model.get_base_model())
    unmerged = _logits(model, name)
    model.merge_adapter()
    assert model.base_model.merged
    assert all(layer.merged_adapters == ["default"] for layer in ia3_layers(model).values())
    merged_weights = base_weights(model.get_base_model())
    changed = [k for k in original if not torch.equal(original[k], merged_weights[k])]
    assert changed, "merging changed no weight"
    torch.testing.assert_close(_logits(model, name), unmerged, atol=1e-5, rtol=0)
    model.merge_adapter()  # merging again is a no-op
    assert_same_tensors(base_weights(model.get_base_model()), merged_weights)
    model.unmerge_adapter()
    assert not model.base_model.merged
    assert_same_tensors(base_weights(model.get_base_model()), original)  # bit for bit
    assert torch.equal(_logits(model, name), unmerged)


def test_merge_twice_unmerge_restores_original():
    model = _adapted("t5")
    model.add_adapter("b", ia3.IA3Config(task_type="SEQ_2_SEQ_LM"))
    randomize(model, "b", seed=3)
    original = base_weights(model.get_base_model())
    model.merge_adapter(["default"])
    model.merge_adapter(["b"])
    assert all(layer.merged_adapters == ["default", "b"] for layer in ia3_layers(model).values())
    model.set_adapter(["default", "b"])
    merged = _logits(model, "t5")
    model.unmerge_adapter()
    torch.testing.assert_close(_logits(model, "t5"), merged, atol=1e-5, rtol=0)
    assert_same_tensors(base_weights(model.get_base_model()), original)


def test_bias_scaled_only_on_output_side():
    # bert all-linear: output-side layers (query, key, ...) and input-side `output.dense` layers, all with bias
    model = _adapted("bert", target_modules="all-linear", feedforward_modules=["output.dense"])
    layers = ia3_layers(model)
    before = {n: (layer.base_layer.weight.clone(), layer.base_layer.bias.clone()) for n, layer in layers.items()}
    model.merge_adapter()
    sides = set()
    for name, layer in layers.items():
        weight, bias = before[name]
        vector = layer.ia3_l["default"].detach()
        sides.add(layer.is_feedforward)
        if layer.is_feedforward:
            assert torch.equal(layer.base_layer.bias, bias), name
            torch.testing.assert_close(layer.base_layer.weight, weight * vector)  # columns scaled
        else:
            torch.testing.assert_close(layer.base_layer.bias, bias * vector.reshape(-1))
            torch.testing.assert_close(layer.base_layer.weight, weight * vector)  # rows scaled
    assert sides == {True, False}


def test_gpt2_conv1d_merge_math():
    model = _adapted("gpt2")
    layers = ia3_layers(model)
    before = {n: (layer.base_layer.weight.clone(), layer.base_layer.bias.clone()) for n, layer in layers.items()}
    model.merge_adapter()
    for name, layer in layers.items():
        weight, bias = before[name]  # Conv1D weight is (in, out)
        vector = layer.ia3_l["default"].detach()
        torch.testing.assert_close(layer.base_layer.weight, weight * vector.T)
        if layer.is_feedforward:
            assert torch.equal(layer.base_layer.bias, bias)
        else:
            torch.testing.assert_close(layer.base_layer.bias, bias * vector.reshape(-1))


class ConvNet(nn.Module):
    def __init__(self, groups: int = 2, dims: int = 2):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.conv = conv(4, 6, 3, groups=groups, padding=1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        y = self.conv(x)
        return self.head(y.flatten(2).mean(-1))


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("feedforward", [False, True], ids=["output-side", "input-side"])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_merge(dims, feedforward, groups):
    torch.manual_seed(0)
    net = ConvNet(groups=groups, dims=dims)
    pristine = {k: v.clone() for k, v in net.state_dict().items()}
    config = ia3.IA3Config(target_modules=["conv"], feedforward_modules=["conv"] if feedforward else None)
    model = ia3.get_peft_model(net, config)
    randomize(model, spread=0.9)
    layer = model.get_base_model().conv
    assert layer.is_feedforward == feedforward
    assert layer.ia3_l["default"].shape == (1, 4 if feedforward else 6) + (1,) * dims
    x = torch.randn(2, 4, *([5] * dims))
    unmerged = model(x)
    with model.disable_adapter():
        assert (model(x) - unmerged).abs().max() > 1e-4
    model.merge_adapter()
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=0)
    if feedforward:
        assert torch.equal(layer.base_layer.bias, pristine["conv.bias"])
    else:
        torch.testing.assert_close(layer.base_layer.bias, pristine["conv.bias"] * layer.ia3_l["default"].reshape(-1))
    model.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, pristine["conv.weight"])
    assert torch.equal(layer.base_layer.bias, pristine["conv.bias"])
    plain = model.merge_and_unload()
    assert isinstance(plain.conv, nn.Conv2d if dims == 2 else nn.Conv3d)
    torch.testing.assert_close(plain(x), unmerged, atol=1e-5, rtol=0)


def test_conv_merge_matches_peft_outputs():
    import peft

    for feedforward in (False, True):
        torch.manual_seed(0)
        ours = ia3.get_peft_model(
            ConvNet(), ia3.IA3Config(target_modules=["conv"], feedforward_modules=["conv"] if feedforward else [])
        )
        torch.manual_seed(0)
        theirs = peft.get_peft_model(
            ConvNet(), peft.IA3Config(target_modules=["conv"], feedforward_modules=["conv"] if feedforward else [])
        )
        randomize(ours, spread=0.9)
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(2, 4, 5, 5)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=0)


def test_safe_merge_with_nan_raises_and_changes_nothing():
    model = _adapted("t5")
    original = base_weights(model.get_base_model())
    layers = list(ia3_layers(model).values())
    with torch.no_grad():
        layers[-1].ia3_l["default"][0, 0] = float("nan")  # the last layer: all others would merge first
    with pytest.raises(ValueError, match="non-finite"):
        model.merge_adapter(safe_merge=True)
    assert not model.base_model.merged
    assert all(not layer.merged_adapters for layer in layers)
    assert_same_tensors(base_weights(model.get_base_model()), original)
    with pytest.raises(ValueError, match="non-finite"):
        model.merge_and_unload(safe_merge=True)
    assert ia3_layers(model)  # still wrapped
    assert_same_tensors(base_weights(model.get_base_model()), original)
    with torch.no_grad():
        layers[-1].ia3_l["default"][0, 0] = 1.0
    model.merge_adapter(safe_merge=True)
    assert model.base_model.merged


@pytest.mark.parametrize("name", ["t5", "gpt2", "bert"])
def test_merge_and_unload(name):
    model = _adapted(name)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if ".modules_to_save." in pname:
                p.add_(0.3)
    expected = _logits(model, name)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, (ia3.IA3Layer,)) for m in plain.modules())
    assert not any(type(m).__name__ == "ModulesToSaveWrapper" for m in plain.modules())
    assert type(plain) is type(M.ALL[name]())
    torch.testing.assert_close(_logits(plain, name), expected, atol=1e-5, rtol=0)
    assert set(plain.state_dict()) == set(M.ALL[name]().state_dict())


@pytest.mark.parametrize("merge_first", [False, True])
def test_unload_returns_original_weights(merge_first):
    model = _adapted("bert")
    pristine = M.bert_cls().state_dict()
    if merge_first:
        model.merge_adapter()
    plain = model.unload()
    assert not any(isinstance(m, ia3.IA3Layer) for m in plain.modules())
    assert_same_tensors({k: v for k, v in plain.state_dict().items()}, dict(pristine))
    assert torch.equal(_logits(plain, "bert"), _logits(M.bert_cls(), "bert"))


def test_disable_adapter_on_merged_model():
    model = _adapted("gpt2")
    adapted = _logits(model, "gpt2")
    base = _logits(M.gpt2(), "gpt2")
    model.merge_adapter()
    merged_weights = base_weights(model.get_base_model())
    with model.disable_adapter():
        assert torch.equal(_logits(model, "gpt2"), base)
    assert model.base_model.merged
    assert_same_tensors(base_weights(model.get_base_model()), merged_weights)
    torch.testing.assert_close(_logits(model, "gpt2"), adapted, atol=1e-5, rtol=0)


def test_merge_bf16_weights_unmerge_exact():
    model = ia3.get_peft_model(M.gpt2().to(torch.bfloat16), ia3.IA3Config(task_type="CAUSAL_LM"))
    randomize(model, spread=0.9)
    original = base_weights(model.get_base_model())
    model.merge_adapter()
    assert all(layer.base_layer.weight.dtype == torch.bfloat16 for layer in ia3_layers(model).values())
    model.unmerge_adapter()
    assert_same_tensors(base_weights(model.get_base_model()), original)
