"""Several adapters on one model: switching, combining, disabling, deleting, weighting; training; vector dtypes."""

from __future__ import annotations

import models as M
import peft
import pytest
import torch
from conftest import base_weights, ia3_layers, randomize
from torch import nn

import ia3

T5 = "SEQ_2_SEQ_LM"


def _t5_with(*adapters: str, **kwargs) -> ia3.PeftModel:
    model = ia3.get_peft_model(M.t5(), ia3.IA3Config(task_type=T5, **kwargs), adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, ia3.IA3Config(task_type=T5, **kwargs))
    for i, name in enumerate(adapters):
        randomize(model, name, seed=i + 1)
    return model


def _logits(model, name="t5", **kwargs):
    with torch.no_grad():
        return model(**M.batch(name), **kwargs).logits


def test_add_and_set_adapter_switch_outputs():
    model = _t5_with("a", "b")
    assert model.active_adapter == "a"  # add_adapter does not activate
    out_a = _logits(model)
    model.set_adapter("b")
    assert model.active_adapter == "b" and model.active_adapters == ["b"]
    out_b = _logits(model)
    assert (out_a - out_b).abs().max() > 1e-3
    model.set_adapter("a")
    assert torch.equal(_logits(model), out_a)
    # only the active adapter trains
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".ia3_l.a") for n in trainable)
    # each output equals a fresh single-adapter model with the same vectors (peft as the oracle)
    oracle = peft.get_peft_model(M.t5(), peft.IA3Config(task_type=T5))
    with torch.no_grad():
        for name, p in oracle.named_parameters():
            if name.endswith(".ia3_l.default"):
                p.copy_(model.state_dict()[name.replace(".default", ".b")])
    torch.testing.assert_close(_logits(oracle), out_b, atol=1e-6, rtol=0)


def test_several_active_adapters_multiply():
    model = _t5_with("a", "b", "prod")
    with torch.no_grad():
        for layer in ia3_layers(model).values():
            layer.ia3_l["prod"].copy_(layer.ia3_l["a"] * layer.ia3_l["b"])
    model.set_adapter("prod")
    expected = _logits(model)
    model.set_adapter(["a", "b"])
    assert model.active_adapters == ["a", "b"] and model.active_adapter == ["a", "b"]
    torch.testing.assert_close(_logits(model), expected, atol=1e-6, rtol=1e-6)
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"a", "b"}
    model.set_adapter("a")
    assert (_logits(model) - expected).abs().max() > 1e-3


def test_active_adapters_touching_different_layers():
    model = ia3.get_peft_model(M.t5(), ia3.IA3Config(task_type=T5, target_modules=["q"]), adapter_name="q")
    model.add_adapter("v", ia3.IA3Config(task_type=T5, target_modules=["v"]))
    model.add_adapter("qv", ia3.IA3Config(task_type=T5, target_modules=["q", "v"]))
    randomize(model, "q", seed=1)
    randomize(model, "v", seed=2)
    with torch.no_grad():
        for layer in ia3_layers(model).values():
            src = "q" if "q" in layer.ia3_l else "v"
            layer.ia3_l["qv"].copy_(layer.ia3_l[src])
    model.set_adapter("qv")
    expected = _logits(model)
    model.set_adapter(["q", "v"])
    torch.testing.assert_close(_logits(model), expected, atol=1e-6, rtol=0)


def test_disable_adapter_gives_exact_base_output():
    for name in ("t5", "gpt2", "bert"):
        untouched = M.ALL[name]()
        model = ia3.get_peft_model(M.ALL[name](), ia3.IA3Config(task_type=M.TASK[name]))
        randomize(model)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if ".modules_to_save." in pname:
                    p.add_(0.5)
        adapted = _logits(model, name)
        with model.disable_adapter():
            disabled = _logits(model, name)
        base = _logits(untouched, name)
        assert torch.equal(disabled, base), name
        assert (adapted - base).abs().max() > 1e-3
        assert torch.equal(_logits(model, name), adapted)  # enabled again after the block


def test_disable_adapter_restores_after_exception():
    model = _t5_with("a")
    adapted = _logits(model)
    with pytest.raises(RuntimeError, match="boom"), model.disable_adapter():
        raise RuntimeError("boom")
    assert torch.equal(_logits(model), adapted)


def test_delete_adapter():
    model = _t5_with("a", "b")
    out_b = None
    model.set_adapter("b")
    out_b = _logits(model)
    model.set_adapter("a")
    model.delete_adapter("a")
    assert list(model.peft_config) == ["b"]
    assert model.active_adapter == "b"  # falls back to a remaining adapter
    assert not any(n.endswith(".ia3_l.a") for n in model.state_dict())
    assert torch.equal(_logits(model), out_b)
    model.add_adapter("a", ia3.IA3Config(task_type=T5))  # the name can be reused
    assert list(model.peft_config) == ["b", "a"]


def test_add_weighted_adapter_same_targets():
    model = _t5_with("a", "b")
    model.add_weighted_adapter(["a", "b"], [0.3, 0.7], "mix")
    assert "mix" in model.peft_config
    for layer in ia3_layers(model).values():
        torch.testing.assert_close(layer.ia3_l["mix"], 0.3 * layer.ia3_l["a"] + 0.7 * layer.ia3_l["b"])
    model.set_adapter("mix")
    mixed = _logits(model)
    # equals a model whose single adapter holds those vectors
    single = _t5_with("x")
    with torch.no_grad():
        for name, layer in ia3_layers(single).items():
            other = model.get_submodule(name)
            layer.ia3_l["x"].copy_(0.3 * other.ia3_l["a"] + 0.7 * other.ia3_l["b"])
    torch.testing.assert_close(_logits(single), mixed, atol=1e-6, rtol=0)
    # the weighted adapter saves and loads like any other
    assert model.peft_config["mix"].task_type == T5


def test_add_weighted_adapter_untouched_layer_counts_as_one():
    model = ia3.get_peft_model(M.t5(), ia3.IA3Config(task_type=T5, target_modules=["k"]), adapter_name="a")
    model.add_adapter("b", ia3.IA3Config(task_type=T5, target_modules=["v", "wo"]))  # wo: input side (t5 default)
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    model.add_weighted_adapter(["a", "b"], [0.25, 2.0], "mix")
    layers = ia3_layers(model)
    seen = {"k": 0, "v": 0, "wo": 0}
    for name, layer in layers.items():
        kind = name.rsplit(".", 1)[-1]
        seen[kind] += 1
        mix = layer.ia3_l["mix"]
        if kind == "k":  # only a touches k: b counts as 1
            assert "b" not in layer.ia3_l
            torch.testing.assert_close(mix, 0.25 * layer.ia3_l["a"] + 2.0 * torch.ones_like(mix))
        else:  # only b touches v and wo: a counts as 1
            assert "a" not in layer.ia3_l
            torch.testing.assert_close(mix, 0.25 * torch.ones_like(mix) + 2.0 * layer.ia3_l["b"])
        assert layer.is_feedforward == (kind == "wo")
    assert all(seen.values())
    cfg = model.peft_config["mix"]
    assert all(name.rsplit(".", 1)[-1] == "wo" for name in cfg.feedforward_modules)


def test_add_weighted_adapter_argument_checks():
    model = _t5_with("a", "b")
    with pytest.raises(ValueError, match="one weight per adapter"):
        model.add_weighted_adapter(["a", "b"], [1.0], "mix")
    with pytest.raises(ValueError, match="already exists"):
        model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "a")
    assert list(model.peft_config) == ["a", "b"]


# -- training ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_training_changes_only_vectors(name):
    model = ia3.get_peft_model(M.ALL[name](), ia3.IA3Config(task_type=M.TASK[name]))
    # (left in eval mode: no dropout, so the loss curve is deterministic; gradients flow the same way)
    before_base = base_weights(model.get_base_model())
    before_vectors = {n: p.detach().clone() for n, p in model.named_parameters() if ".ia3_l." in n}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # all parameters: frozen ones must stay put
    batch = M.batch(name)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    after_base = base_weights(model.get_base_model())
    assert set(after_base) == set(before_base)
    assert all(torch.equal(after_base[k], before_base[k]) for k in before_base)
    changed = [n for n, p in model.named_parameters() if ".ia3_l." in n and not torch.equal(p, before_vectors[n])]
    assert len(changed) == len(before_vectors) > 0
    assert losses[-1] < losses[0] - 1e-3
    assert all(p.grad is None for n, p in model.named_parameters() if ".ia3_l." not in n)


# -- dtypes and shapes ---------------------------------------------------------------------------------------------
def test_vectors_float32_over_bf16_by_default():
    base = M.gpt2().to(torch.bfloat16)
    model = ia3.get_peft_model(base, ia3.IA3Config(task_type="CAUSAL_LM"))
    layers = ia3_layers(model)
    assert layers
    for layer in layers.values():
        assert layer.base_layer.weight.dtype == torch.bfloat16
        assert all(v.dtype == torch.float32 for v in layer.ia3_l.values())
    logits = _logits(model, "gpt2")
    assert logits.dtype == torch.bfloat16
    # peft makes the same choice, and gives the same outputs
    oracle = peft.get_peft_model(M.gpt2().to(torch.bfloat16), peft.IA3Config(task_type="CAUSAL_LM"))
    assert {n: p.dtype for n, p in oracle.named_parameters() if ".ia3_l." in n} == {
        n: p.dtype for n, p in model.named_parameters() if ".ia3_l." in n
    }
    randomize(model)
    oracle.load_state_dict(model.state_dict())
    torch.testing.assert_close(_logits(model, "gpt2"), _logits(oracle, "gpt2"), atol=0, rtol=0)


def test_vectors_bf16_without_autocast():
    model = ia3.get_peft_model(M.t5().to(torch.bfloat16), ia3.IA3Config(task_type=T5), autocast_adapter_dtype=False)
    layers = ia3_layers(model)
    assert all(v.dtype == torch.bfloat16 for layer in layers.values() for v in layer.ia3_l.values())
    assert _logits(model).dtype == torch.bfloat16
    # a float32 base keeps float32 vectors either way
    model32 = ia3.get_peft_model(M.t5(), ia3.IA3Config(task_type=T5), autocast_adapter_dtype=False)
    assert all(p.dtype == torch.float32 for n, p in model32.named_parameters() if ".ia3_l." in n)


def test_vector_shapes_and_init():
    model = ia3.get_peft_model(
        M.t5(), ia3.IA3Config(task_type=T5, target_modules=["q", "wi"], feedforward_modules=["wi"])
    )
    for name, layer in ia3_layers(model).items():
        vector = layer.ia3_l["default"]
        lin = layer.base_layer
        if name.endswith(".wi"):
            assert vector.shape == (1, lin.in_features) == (1, 32)
        else:
            assert vector.shape == (lin.out_features, 1) == (32, 1)
        assert torch.equal(vector, torch.ones_like(vector))  # init_ia3_weights=True: identity
    # identity vectors: same output as the base model
    assert torch.equal(_logits(model), _logits(M.t5()))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 6, 3)
            self.vol = nn.Conv3d(6, 2, 1)

        def forward(self, x):
            return self.vol(self.conv(x).unsqueeze(2))

    out_side = ia3.get_peft_model(Net(), ia3.IA3Config(target_modules=["conv", "vol"]))
    assert out_side.get_base_model().conv.ia3_l["default"].shape == (1, 6, 1, 1)
    assert out_side.get_base_model().vol.ia3_l["default"].shape == (1, 2, 1, 1, 1)
    in_side = ia3.get_peft_model(
        Net(), ia3.IA3Config(target_modules=["conv", "vol"], feedforward_modules=["conv", "vol"])
    )
    assert in_side.get_base_model().conv.ia3_l["default"].shape == (1, 4, 1, 1)
    assert in_side.get_base_model().vol.ia3_l["default"].shape == (1, 6, 1, 1, 1)


def test_gpt2_conv1d_vector_shapes_and_fan_in_fan_out():
    model = ia3.get_peft_model(M.gpt2(), ia3.IA3Config(task_type="CAUSAL_LM"))
    assert model.peft_config["default"].fan_in_fan_out is True
    for name, layer in ia3_layers(model).items():
        if name.endswith("mlp.c_proj"):  # Conv1D 128 -> 32, input side
            assert layer.ia3_l["default"].shape == (1, 128)
        else:  # c_attn: Conv1D 32 -> 96, output side
            assert layer.ia3_l["default"].shape == (96, 1)


def test_init_false_draws_random_vectors():
    model = ia3.get_peft_model(M.t5(), ia3.IA3Config(task_type=T5, init_ia3_weights=False))
    vectors = [p for n, p in model.named_parameters() if ".ia3_l." in n]
    assert not any(torch.equal(v, torch.ones_like(v)) for v in vectors)


def test_peft_model_passes_attributes_through():
    base = M.t5()
    model = ia3.get_peft_model(base, ia3.IA3Config(task_type=T5))
    assert model.get_base_model() is base
    assert model.config is base.config
    assert isinstance(model, ia3.PeftModelForSeq2SeqLM)
    # the stored config is the resolved one: t5's default targets, written out (not a reference to mutable state)
    assert model.peft_config["default"] == ia3.IA3Config(
        task_type=T5, target_modules=["k", "v", "wo"], feedforward_modules=["wo"]
    )


def test_hooks_on_a_wrapped_base_layer_still_run():
    """The layer calls F.linear directly for plain nn.Linear bases; a hook (e.g. accelerate's offload) must
    switch that off so the hook runs and its effect shows."""
    model = ia3.get_peft_model(M.t5(), ia3.IA3Config(task_type="SEQ_2_SEQ_LM"))
    layer = next(m for m in model.modules() if isinstance(m, ia3.IA3Layer) and not m.is_feedforward)
    batch = M.batch("t5")
    with torch.no_grad():
        before = model(**batch).logits
    calls = []
    handle = layer.base_layer.register_forward_hook(lambda mod, inp, out: calls.append(1) or out * 2)
    with torch.no_grad():
        hooked = model(**batch).logits
    handle.remove()
    assert calls and not torch.allclose(before, hooked)
