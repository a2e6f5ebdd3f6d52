"""Numerical and structural parity with the real `peft` package (the oracle)."""

from __future__ import annotations

import models as M
import peft
import pytest
import torch
import transformers as tf
from conftest import wrapped_shapes

import ia3

NAMES = ["t5", "mt5", "bart", "gpt2", "llama", "bert"]


def _pair(name: str, **kwargs):
    """The same tiny model (same seed) wrapped by ia3 and by peft, with ia3's random vectors copied into peft."""
    task = M.TASK[name]
    ours = ia3.get_peft_model(M.ALL[name](), ia3.IA3Config(task_type=task, init_ia3_weights=False, **kwargs))
    theirs = peft.get_peft_model(M.ALL[name](), peft.IA3Config(task_type=task, init_ia3_weights=False, **kwargs))
    # give the classification head copy distinct values, so that a wrong head would show
    with torch.no_grad():
        for pname, p in ours.named_parameters():
            if ".modules_to_save." in pname:
                p.add_(0.1 * torch.randn_like(p))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


@pytest.mark.parametrize("name", NAMES)
def test_default_config_parity(name):
    ours, theirs = _pair(name)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert ours.get_nb_trainable_parameters()[0] > 0
    assert set(ours.state_dict()) == set(theirs.state_dict())
    trainable_ours = {n for n, p in ours.named_parameters() if p.requires_grad}
    trainable_theirs = {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert trainable_ours == trainable_theirs
    assert any(".ia3_l.default" in n for n in trainable_ours)
    assert all(".ia3_l." in n or ".modules_to_save.default." in n for n in trainable_ours)
    assert wrapped_shapes(ours) == wrapped_shapes(theirs, peft_side=True)
    assert type(ours).__name__ == type(theirs).__name__

    batch = M.batch(name)
    out_ours, out_theirs = ours(**batch), theirs(**batch)
    assert out_ours.logits.dtype == torch.float32
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(out_ours.loss, out_theirs.loss, atol=1e-6, rtol=0)

    # the adapter actually does something: the base model's output differs
    with ours.disable_adapter():
        base_logits = ours(**batch).logits
    assert (base_logits - out_ours.logits).abs().max() > 1e-3

    out_ours.loss.backward()
    out_theirs.loss.backward()
    grads_theirs = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    checked = 0
    for n, p in ours.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n
            continue
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, grads_theirs[n], atol=1e-6, rtol=0)
        checked += 1
    assert checked == len(grads_theirs)
    if name == "bert":
        assert any("classifier.modules_to_save.default" in n for n in grads_theirs)


TARGET_CASES = [
    ("t5", dict(target_modules=["q", "o", "wi"], feedforward_modules=["wi"])),
    ("t5", dict(target_modules=["k", "v", "wo"])),  # feed-forward defaults still apply (wo scales its input)
    ("t5", dict(target_modules=r".*decoder.*(SelfAttention|EncDecAttention)\.(q|v)")),
    ("t5", dict(target_modules=r".*\.(k|wo)", feedforward_modules=r".*wo")),
    ("t5", dict(target_modules="all-linear")),
    ("t5", dict(target_modules="ALL-LINEAR", exclude_modules=["o", "wo"])),
    ("t5", dict(target_modules=["k", "v", "wi"], exclude_modules=r"decoder\..*")),
    ("mt5", dict(target_modules="all-linear")),
    ("bart", dict(target_modules="all-linear", exclude_modules=["fc1"])),
    ("bart", dict(target_modules=["k_proj", "fc1"], feedforward_modules=["fc1"])),
    ("gpt2", dict(target_modules="all-linear")),
    (
        "gpt2",
        dict(target_modules=["c_attn", "c_proj", "c_fc"], feedforward_modules=["c_proj"], exclude_modules=r".*\.0\..*"),
    ),
    ("llama", dict(target_modules="all-linear", feedforward_modules=["down_proj", "up_proj"])),
    ("llama", dict(target_modules=["q_proj", "k_proj"], exclude_modules=["layers.1.self_attn.k_proj"])),
    ("llama", dict(target_modules=["gate_proj", "up_proj", "down_proj"], feedforward_modules=["down_proj"])),
    ("bert", dict(target_modules="all-linear")),
    ("bert", dict(target_modules=["query", "intermediate.dense"], feedforward_modules=["intermediate.dense"])),
]


@pytest.mark.parametrize(("name", "kwargs"), TARGET_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(TARGET_CASES)])
def test_target_selection_parity(name, kwargs):
    ours, theirs = _pair(name, **kwargs)
    shapes = wrapped_shapes(ours)
    assert shapes, "nothing was wrapped"
    assert shapes == wrapped_shapes(theirs, peft_side=True)
    # the side of each vector is the same (shape alone is ambiguous for square layers)
    from conftest import ia3_layers, peft_ia3_layers

    sides = {n: layer.is_feedforward for n, layer in ia3_layers(ours).items()}
    assert sides == {n: layer.is_feedforward for n, layer in peft_ia3_layers(theirs).items()}
    if kwargs.get("feedforward_modules") or (
        name != "mt5" and kwargs["target_modules"] in (["k", "v", "wo"], "all-linear")
    ):
        assert any(sides.values()), "expected some input-side vectors"
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    target = kwargs.get("target_modules")
    if isinstance(target, str) and target.lower() == "all-linear":
        # the output layer (lm_head / classifier) is never targeted
        assert not any(n.endswith(("lm_head/default", "classifier/default")) for n in shapes)
    batch = M.batch(name)
    torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, atol=1e-6, rtol=0)


def _mt0_large_meta():
    cfg = tf.MT5Config(
        vocab_size=250112,
        d_model=1024,
        d_kv=64,
        d_ff=2816,
        num_layers=24,
        num_decoder_layers=24,
        num_heads=16,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    )
    cfg.tie_word_embeddings = False
    with torch.device("meta"):
        model = tf.MT5ForConditionalGeneration(cfg)
    # the real checkpoint shares the encoder/decoder embeddings with `shared`, but has an untied lm_head
    model.encoder.embed_tokens = model.shared
    model.decoder.embed_tokens = model.shared
    assert model.lm_head.weight is not model.shared.weight
    return model


MT0_LINE = "trainable params: 282,624 || all params: 1,229,863,936 || trainable%: 0.0230\n"


def test_mt0_large_trainable_parameters(capsys):
    model = ia3.get_peft_model(_mt0_large_meta(), ia3.IA3Config(task_type="SEQ_2_SEQ_LM"))
    capsys.readouterr()
    model.print_trainable_parameters()
    assert capsys.readouterr().out == MT0_LINE
    assert model.get_nb_trainable_parameters() == (282_624, 1_229_863_936)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_mt0_large_trainable_parameters_equal_peft(capsys):
    """MT0_LINE is what peft prints for the same meta model, and ia3 prints the same line because it wraps the same
    modules with vectors of the same shapes."""
    ours = ia3.get_peft_model(_mt0_large_meta(), ia3.IA3Config(task_type="SEQ_2_SEQ_LM"))
    theirs = peft.get_peft_model(_mt0_large_meta(), peft.IA3Config(task_type="SEQ_2_SEQ_LM"))
    capsys.readouterr()
    ours.print_trainable_parameters()
    line_ours = capsys.readouterr().out
    theirs.print_trainable_parameters()
    assert line_ours == capsys.readouterr().out == MT0_LINE
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    trainable = {n: tuple(p.shape) for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n: tuple(p.shape) for n, p in theirs.named_parameters() if p.requires_grad}
    assert wrapped_shapes(ours) == wrapped_shapes(theirs, peft_side=True)
