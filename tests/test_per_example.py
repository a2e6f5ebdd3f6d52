"""Per-example adapters: `adapter_names` gives each batch row its own adapter (or none) in one pass."""

from __future__ import annotations

import models as M
import pytest
import torch
from conftest import randomize

import ia3

ROWS = ["a", "b", "__base__", "a", "b"]


def _model(name: str, scale: float = 1.0) -> ia3.PeftModel:
    task = M.TASK[name]
    model = ia3.get_peft_model(M.ALL[name](), ia3.IA3Config(task_type=task), adapter_name="a")
    # b targets other layers too (all-linear), so rows differ in which layers they scale
    extra = {"target_modules": "all-linear", "feedforward_modules": []} if name != "bert" else {}
    model.add_adapter("b", ia3.IA3Config(task_type=task, **extra))
    randomize(model, "a", seed=1, spread=0.9)
    randomize(model, "b", seed=2, spread=0.9)
    with torch.no_grad():  # distinct classification heads per adapter
        for pname, p in model.named_parameters():
            if ".ia3_l." in pname:
                p.mul_(scale)
        for pname, p in model.named_parameters():
            if ".modules_to_save.a." in pname:
                p.add_(0.5)
            elif ".modules_to_save.b." in pname:
                p.sub_(0.5)
    return model.eval()


def _row(batch: dict, i: int) -> dict:
    return {k: v[i : i + 1] for k, v in batch.items()}


def _alone(model: ia3.PeftModel, adapter: str, fn):
    if adapter == ia3.BASE_ADAPTER:
        with model.disable_adapter():
            return fn()
    previous = model.active_adapters
    model.set_adapter(adapter)
    try:
        return fn()
    finally:
        model.set_adapter(previous)


@pytest.mark.parametrize("name", ["t5", "gpt2", "llama", "bert"])
def test_per_example_forward_equals_rows_alone(name):
    model = _model(name)
    batch = M.batch(name, batch_size=len(ROWS))
    with torch.no_grad():
        mixed = model(**batch, adapter_names=ROWS).logits
        rows = [_alone(model, adapter, lambda i=i: model(**_row(batch, i)).logits) for i, adapter in enumerate(ROWS)]
    for i, expected in enumerate(rows):
        torch.testing.assert_close(mixed[i : i + 1], expected, atol=1e-5, rtol=0, msg=f"row {i} ({ROWS[i]})")
    # rows with different adapters really differ (same input gives different outputs per adapter)
    with torch.no_grad():
        same_input = {k: v[:1].repeat(3, *([1] * (v.dim() - 1))) for k, v in batch.items()}
        per = model(**same_input, adapter_names=["a", "b", "__base__"]).logits
    assert (per[0] - per[1]).abs().max() > 1e-3 and (per[0] - per[2]).abs().max() > 1e-3
    # the state is cleared after the call: a plain forward uses the active adapter again
    with torch.no_grad():
        plain = model(**batch).logits
        all_a = model(**batch, adapter_names=["a"] * len(ROWS)).logits
    torch.testing.assert_close(plain, all_a, atol=1e-5, rtol=0)
    assert all(layer._row_scales is None for layer in model.modules() if isinstance(layer, ia3.IA3Layer))


def _gen_inputs(name: str, rows: int = 4) -> dict:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 99, (rows, 6), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


GEN_ROWS = ["a", "__base__", "b", "a"]
GEN_KW = dict(max_new_tokens=5, min_new_tokens=5)  # fixed length: batch rows and single rows line up


@pytest.mark.parametrize("name", ["t5", "gpt2"])
@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_per_example_generate_equals_rows_alone(name, mode):
    # tiny GPT-2's tied embeddings dominate its logits; larger vectors make adapters change what it generates
    model = _model(name, scale=10.0 if name == "gpt2" else 1.0)
    inputs = _gen_inputs(name)
    kwargs = dict(GEN_KW, do_sample=False, return_dict_in_generate=True, output_scores=True)
    if mode == "beam":
        kwargs.update(num_beams=3, num_return_sequences=2)
    per_row = kwargs.get("num_return_sequences", 1)
    with torch.no_grad():
        mixed = model.generate(**inputs, adapter_names=GEN_ROWS, **kwargs)
        assert mixed.sequences.shape[0] == len(GEN_ROWS) * per_row
        for i, adapter in enumerate(GEN_ROWS):
            alone = _alone(model, adapter, lambda i=i: model.generate(**_row(inputs, i), **kwargs))
            rows = slice(i * per_row, (i + 1) * per_row)
            assert torch.equal(mixed.sequences[rows], alone.sequences), f"row {i} ({adapter})"
            if mode == "beam":
                torch.testing.assert_close(mixed.sequences_scores[rows], alone.sequences_scores, atol=1e-4, rtol=0)
            else:
                for step_mixed, step_alone in zip(mixed.scores, alone.scores, strict=True):
                    torch.testing.assert_close(step_mixed[i : i + 1], step_alone, atol=1e-4, rtol=0)
        # the adapters generate different continuations from the same prompt (so the test can tell them apart)
        same = {k: v[:1].repeat(3, 1) for k, v in inputs.items()}
        three = model.generate(
            **same,
            adapter_names=["a", "b", "__base__"],
            do_sample=False,
            return_dict_in_generate=True,
            output_scores=True,
            **GEN_KW,
        )
    seqs, first = three.sequences, three.scores[0]
    assert not (torch.equal(seqs[0], seqs[1]) and torch.equal(seqs[0], seqs[2]))
    finite = torch.isfinite(first).all(0)  # min_new_tokens masks EOS with -inf
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert (first[i] - first[j])[finite].abs().max() > 1e-3


@pytest.mark.parametrize("name", ["t5", "gpt2"])
def test_per_example_sampling_runs(name):
    """Sampling with several sequences per row: every sampled copy of row `i` runs with adapter `i` (its first-step
    scores, which no sampling has touched yet, are those of row `i` generated alone with that adapter)."""
    model = _model(name, scale=10.0 if name == "gpt2" else 1.0)
    inputs = _gen_inputs(name, rows=3)
    adapters = ["a", "b", "__base__"]
    torch.manual_seed(0)
    with torch.no_grad():
        sampled = model.generate(
            **inputs,
            adapter_names=adapters,
            do_sample=True,
            num_return_sequences=3,
            top_k=0,
            return_dict_in_generate=True,
            output_scores=True,
            **GEN_KW,
        )
        kwargs = dict(GEN_KW, do_sample=False, return_dict_in_generate=True, output_scores=True)
        alone = [
            _alone(model, adapter, lambda i=i: model.generate(**_row(inputs, i), **kwargs)).scores[0]
            for i, adapter in enumerate(adapters)
        ]
    first = sampled.scores[0]
    finite = torch.isfinite(first).all(0)  # min_new_tokens masks EOS with -inf
    for i, expected in enumerate(alone):
        for copy in range(3):
            got = first[3 * i + copy : 3 * i + copy + 1]
            torch.testing.assert_close(got[:, finite], expected[:, finite], atol=1e-4, rtol=0, msg=adapters[i])
    # and another adapter gives row 0 other scores, so a mix-up would show
    with torch.no_grad():
        for other in adapters[1:]:
            wrong = _alone(model, other, lambda: model.generate(**_row(inputs, 0), **kwargs)).scores[0]
            assert (wrong - alone[0])[:, finite].abs().max() > 1e-3, other
    out = sampled.sequences
    assert out.shape[0] == 9
    if name == "gpt2":
        assert out.shape[1] == inputs["input_ids"].shape[1] + 5
        assert torch.equal(out[:, :6], inputs["input_ids"].repeat_interleave(3, dim=0))
    else:
        assert out.shape[1] == 6  # decoder start + 5 tokens
    assert all(layer._row_scales is None for layer in model.modules() if isinstance(layer, ia3.IA3Layer))


def test_per_example_on_merged_model_raises():
    model = _model("gpt2")
    model.merge_adapter(["a"])
    batch = M.batch("gpt2")
    with pytest.raises(ValueError, match="merged"):
        model(**batch, adapter_names=["a", "b", "__base__"])
    with pytest.raises(ValueError, match="merged"):
        model.generate(**_gen_inputs("gpt2", rows=3), adapter_names=["a", "b", "a"], **GEN_KW)
    model.unmerge_adapter()
    model(**batch, adapter_names=["a", "b", "__base__"])


def test_per_example_gradients_reach_each_rows_adapter():
    """Training with mixed rows: adapter a's vectors get gradient only from a's rows."""
    model = _model("gpt2")
    model.set_adapter(["a", "b"])  # both trainable
    batch = M.batch("gpt2", batch_size=3)
    loss = model(**batch, adapter_names=["a", "a", "__base__"]).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if ".ia3_l." in n}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.endswith(".a"))
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if n.endswith(".b"))


def test_per_example_table_first_filled_in_inference_mode_serves_later_calls():
    """A server scores under `torch.inference_mode` and decodes under `no_grad`: the adapters' table filled by the
    first call must serve the second (and equal each row alone)."""
    model = _two_adapter_gpt2()
    x = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with torch.inference_mode():  # fills the table with a's row only; b's row is written by the next call
        first = model(input_ids=x, adapter_names=["a", "a"]).logits
    with torch.no_grad():
        second = model(input_ids=x, adapter_names=["b", "a"]).logits
        for out, names in ((first, ["a", "a"]), (second, ["b", "a"])):
            for i, name in enumerate(names):
                model.set_adapter(name)
                assert torch.allclose(out[i], model(input_ids=x[i : i + 1]).logits[0], atol=1e-6)


def _two_adapter_gpt2():
    import transformers as tf

    torch.manual_seed(0)
    base = tf.GPT2LMHeadModel(
        tf.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0)
    )
    model = ia3.get_peft_model(base, ia3.IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False), "a").eval()
    model.add_adapter("b", ia3.IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False))
    return model


def test_per_example_blocks_interleave_each_rows_adapters_return_on_exit():
    """A block entered inside another (the server's decoder stepping while a paused beam search holds its block)
    leaves the outer block's per-row adapters in force when it exits."""
    model = _model("gpt2")
    batch = M.batch("gpt2", batch_size=2)
    with torch.no_grad(), model.base_model.per_example(["b", "b"]):
        before = model(**batch).logits
        with model.base_model.per_example(["a", ia3.BASE_ADAPTER]):
            inner = model(**batch).logits
        after = model(**batch).logits
    assert not torch.allclose(inner, before)  # the inner block changed the rows' adapters
    assert torch.equal(after, before)  # and they came back
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, before)  # outside every block: the active adapter ("a")
