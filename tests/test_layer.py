"""`IA3Layer` on its own: forward against hand-computed formulas, active adapters, merge / unmerge, to_module.

The references are written out with plain torch ops on the base layer's own weight `W` and bias `b`:
output side `l * (W x + b)`, input side `W (l * x) + b`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import ia3
from ia3 import IA3Layer, WeightLayout


def _conv1d_gpt2() -> Conv1D:
    layer = Conv1D(3, 5)  # nf=3 outputs, nx=5 inputs: weight (5, 3); its bias starts at zero
    with torch.no_grad():
        layer.bias.normal_()
    return layer


# name -> (base layer, input)
BASES = {
    "linear": (lambda: nn.Linear(5, 3), (2, 7, 5)),
    "linear-nobias": (lambda: nn.Linear(5, 3, bias=False), (2, 7, 5)),
    "gpt2-Conv1D": (_conv1d_gpt2, (2, 7, 5)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1), (2, 4, 5, 5)),
    "conv2d-grouped": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (2, 4, 5, 5)),
    "conv2d-nobias": (lambda: nn.Conv2d(4, 6, 3, stride=2, bias=False), (2, 4, 6, 6)),
    "nn.Conv1d-grouped": (lambda: nn.Conv1d(4, 6, 3, padding=1, groups=2), (2, 4, 9)),
    "conv3d-grouped": (lambda: nn.Conv3d(4, 6, 3, padding=1, groups=2), (2, 4, 4, 4, 4)),
}
SIDES = pytest.mark.parametrize("feedforward", [False, True], ids=["output-side", "input-side"])


def _make(name: str, feedforward: bool, adapters: tuple[str, ...] = ("a",)) -> tuple[IA3Layer, torch.Tensor]:
    torch.manual_seed(0)
    factory, shape = BASES[name]
    layer = IA3Layer.from_module(factory(), is_feedforward=feedforward)
    for adapter in adapters:
        layer.add_adapter(adapter, init_ones=False)
    return layer, torch.randn(shape)


def _reference(base: nn.Module, x: torch.Tensor, vector: torch.Tensor, feedforward: bool) -> torch.Tensor:
    """`l * (W x + b)` or `W (l * x) + b`, written out for each kind of base layer."""
    W, b = base.weight, base.bias
    l = vector.reshape(-1)  # noqa: E741 (the paper's name)
    if isinstance(base, nn.Linear):

        def apply(inp):
            return F.linear(inp, W, b)  # W (out, in)
    elif isinstance(base, Conv1D):

        def apply(inp):
            return inp @ W + b  # W (in, out)
    else:
        conv = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}[type(base)]
        l = l.reshape((1, -1) + (1,) * (x.dim() - 2))  # noqa: E741 (one factor per channel)

        def apply(inp):
            return conv(inp, W, b, stride=base.stride, padding=base.padding, groups=base.groups)

    return apply(x * l) if feedforward else apply(x) * l


def _weights(layer: IA3Layer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


# -- forward -----------------------------------------------------------------------------------------------------
def test_standalone_layer_runs():
    """The scenario that used to raise AttributeError: 'IA3Layer' object has no attribute 'active_adapters'."""
    layer = IA3Layer.from_module(nn.Linear(5, 3), is_feedforward=False)
    layer.add_adapter("a", init_ones=False)
    x = torch.randn(4, 5)
    out = layer(x)
    assert out.shape == (4, 3)
    assert layer.active_adapters == ["a"]
    torch.testing.assert_close(out, _reference(layer.base_layer, x, layer.ia3_l["a"], False))


@SIDES
@pytest.mark.parametrize("name", BASES)
def test_forward_matches_hand_computed_formula(name, feedforward):
    layer, x = _make(name, feedforward)
    vector = layer.ia3_l["a"]
    assert vector.shape == layer.vector_shape()
    assert not torch.allclose(vector, torch.ones_like(vector))
    expected = _reference(layer.base_layer, x, vector, feedforward)
    assert not torch.allclose(expected, layer.base_layer(x), atol=1e-3)  # the adapter has an effect to check
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize(
    ("name", "feedforward", "shape"),
    [
        ("linear", False, (3, 1)),
        ("linear", True, (1, 5)),
        ("gpt2-Conv1D", False, (3, 1)),
        ("gpt2-Conv1D", True, (1, 5)),
        ("conv2d", False, (1, 6, 1, 1)),
        ("conv2d", True, (1, 4, 1, 1)),
        ("nn.Conv1d-grouped", False, (1, 6, 1)),
        ("conv3d-grouped", True, (1, 4, 1, 1, 1)),
    ],
)
def test_vector_shapes_as_peft(name, feedforward, shape):
    layer, _ = _make(name, feedforward)
    assert layer.vector_shape() == shape == tuple(layer.ia3_l["a"].shape)


@SIDES
@pytest.mark.parametrize("name", ["conv2d-grouped", "nn.Conv1d-grouped"])
def test_unbatched_conv_input(name, feedforward):
    layer, x = _make(name, feedforward)
    with torch.no_grad():
        torch.testing.assert_close(layer(x[0]), layer(x)[0])


def test_weight_layouts():
    assert WeightLayout.of(nn.Linear(2, 3)) is WeightLayout.LINEAR
    assert WeightLayout.of(Conv1D(3, 2)) is WeightLayout.TRANSPOSED
    for conv in (nn.Conv1d(2, 3, 1), nn.Conv2d(2, 3, 1), nn.Conv3d(2, 3, 1)):
        assert WeightLayout.of(conv) is WeightLayout.CONV
    with pytest.raises(TypeError, match="Embedding"):
        IA3Layer.from_module(nn.Embedding(4, 2))


# -- active adapters ---------------------------------------------------------------------------------------------
@SIDES
@pytest.mark.parametrize("name", ["linear", "gpt2-Conv1D", "conv2d-grouped"])
def test_two_active_adapters_multiply(name, feedforward):
    layer, x = _make(name, feedforward, adapters=("a", "b"))
    assert layer.active_adapters == ["a"]  # the first adapter became active; adding "b" left it alone
    la, lb = layer.ia3_l["a"], layer.ia3_l["b"]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _reference(layer.base_layer, x, la, feedforward))
        layer.set_adapter(["a", "b"])
        torch.testing.assert_close(layer(x), _reference(layer.base_layer, x, la * lb, feedforward))
        layer.set_adapter("b")
        torch.testing.assert_close(layer(x), _reference(layer.base_layer, x, lb, feedforward))
        layer.set_adapter([])
        assert torch.equal(layer(x), layer.base_layer(x))


def test_set_adapter_rejects_unknown_names():
    layer, _ = _make("linear", False, adapters=("a", "b"))
    with pytest.raises(ValueError, match=r"\['nope'\].*\['a', 'b'\]"):
        layer.set_adapter(["a", "nope"])
    assert layer.active_adapters == ["a"]


def test_delete_keeps_the_other_active_adapters():
    layer, x = _make("linear", False, adapters=("a", "b", "c"))
    layer.set_adapter(["a", "b"])
    layer.delete_adapter("a")
    assert layer.active_adapters == ["b"]
    assert list(layer.ia3_l) == ["b", "c"]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _reference(layer.base_layer, x, layer.ia3_l["b"], False))
    layer.delete_adapter("b")  # the last active one: the first remaining adapter takes over
    assert layer.active_adapters == ["c"]
    layer.delete_adapter("c")
    assert layer.active_adapters == [] and not len(layer.ia3_l)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_delete_refuses_unknown_or_merged_adapters():
    layer, _ = _make("linear", False, adapters=("a", "b"))
    with pytest.raises(ValueError, match="'nope'"):
        layer.delete_adapter("nope")
    layer.merge(["a"])
    with pytest.raises(ValueError, match="merged"):
        layer.delete_adapter("a")
    layer.delete_adapter("b")
    assert list(layer.ia3_l) == ["a"]


# -- merging -----------------------------------------------------------------------------------------------------
@SIDES
@pytest.mark.parametrize("name", BASES)
def test_merge_same_forward_and_exact_unmerge(name, feedforward):
    layer, x = _make(name, feedforward, adapters=("a", "b"))
    layer.set_adapter(["a", "b"])
    original = _weights(layer)
    with torch.no_grad():
        unmerged = layer(x)
    layer.merge()
    assert layer.merged_adapters == ["a", "b"]
    base = layer.base_layer
    assert not torch.equal(base.weight, original["base_layer.weight"])
    if base.bias is not None:  # the bias is scaled on the output side only
        assert torch.equal(base.bias, original["base_layer.bias"]) == feedforward
    with torch.no_grad():
        torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
        layer.merge()  # merging again is a no-op
        torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert layer.merged_adapters == []
    _assert_same(_weights(layer), original)  # bit for bit
    with torch.no_grad():
        assert torch.equal(layer(x), unmerged)


def test_merge_one_adapter_then_another():
    layer, x = _make("conv2d-grouped", True, adapters=("a", "b"))
    original = _weights(layer)
    layer.set_adapter(["a", "b"])
    with torch.no_grad():
        both = layer(x)
    layer.merge(["a"])
    layer.merge(["b"])
    assert layer.merged_adapters == ["a", "b"]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), both, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    _assert_same(_weights(layer), original)


def test_safe_merge_refuses_non_finite_and_changes_nothing():
    layer, _ = _make("linear", False)
    with torch.no_grad():
        layer.ia3_l["a"][1, 0] = float("inf")
    original = _weights(layer)
    assert not layer.check_merge()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(safe_merge=True)
    assert layer.merged_adapters == []
    _assert_same(_weights(layer), original)
    with pytest.raises(ValueError, match="'nope'"):
        layer.merge(["nope"])


# -- to_module ---------------------------------------------------------------------------------------------------
@SIDES
@pytest.mark.parametrize("name", BASES)
def test_to_module_folds_adapters_and_leaves_layer_unchanged(name, feedforward):
    layer, x = _make(name, feedforward)
    before = _weights(layer)
    with torch.no_grad():
        expected = layer(x)
    module = layer.to_module()
    assert type(module) is type(layer.base_layer)
    assert not any(isinstance(m, IA3Layer) for m in module.modules())
    with torch.no_grad():
        torch.testing.assert_close(module(x), expected, atol=1e-5, rtol=1e-5)
    # the layer is unchanged, and shares no tensor with the new module
    _assert_same(_weights(layer), before)
    assert layer.merged_adapters == [] and layer.active_adapters == ["a"]
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(2)
        assert torch.equal(layer(x), expected)
    _assert_same(_weights(layer), before)


def test_to_module_of_given_adapters_and_of_merged_layer():
    layer, x = _make("gpt2-Conv1D", False, adapters=("a", "b"))
    with torch.no_grad():
        layer.set_adapter(["a", "b"])
        both = layer(x)
        layer.set_adapter("a")
        torch.testing.assert_close(layer.to_module(["a", "b"])(x), both, atol=1e-5, rtol=1e-5)
        layer.merge()  # "a" merged into the base
        merged = layer.to_module()
        assert torch.equal(merged.weight, layer.base_layer.weight)
        assert torch.equal(merged.bias, layer.base_layer.bias)
        assert merged.weight.data_ptr() != layer.base_layer.weight.data_ptr()
        torch.testing.assert_close(layer.to_module(["b"])(x), both, atol=1e-5, rtol=1e-5)  # "b" folded on top
    assert layer.merged_adapters == ["a"]


# -- inside IA3Model ---------------------------------------------------------------------------------------------
class _Net(nn.Module):
    """A model whose untargeted parameters have names containing `.ia3_l.` and `.modules_to_save.`."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.block = nn.Module()
        self.block.ia3_l = nn.Linear(4, 4)
        self.block.modules_to_save = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.modules_to_save(self.block.ia3_l(self.proj(x)))


def test_model_freezes_by_type_not_by_name():
    model = ia3.get_peft_model(_Net(), ia3.IA3Config(target_modules=["proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"base_model.model.proj.ia3_l.default"}


def test_model_delete_keeps_other_adapters_active_in_layers():
    model = ia3.get_peft_model(_Net(), ia3.IA3Config(target_modules=["proj"]), adapter_name="a")
    model.add_adapter("b", ia3.IA3Config(target_modules=["proj"]))
    model.set_adapter(["a", "b"])
    model.delete_adapter("a")
    layer = model.get_base_model().proj
    assert model.active_adapters == ["b"] == layer.active_adapters
    assert layer.ia3_l["b"].requires_grad


def test_merge_and_unload_puts_the_base_layers_back_without_copies():
    model = ia3.get_peft_model(_Net(), ia3.IA3Config(target_modules=["proj"], init_ia3_weights=False))
    base = model.get_base_model().proj.base_layer
    x = torch.randn(3, 4)
    with torch.no_grad():
        expected = model(x)
    plain = model.merge_and_unload()
    assert plain.proj is base
    with torch.no_grad():
        torch.testing.assert_close(plain(x), expected, atol=1e-5, rtol=1e-5)
