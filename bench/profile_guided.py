"""What structured output costs in the decoder's token pick (issue 22): CPU time per step of
`ia3.serve.decoding.next_tokens` on `--rows` rows of random bf16 logits over SmolLM2-135M's vocabulary (49,152
tokens), plain greedy rows against greedy rows constrained to bench/serve_openai_overhead.py's JSON schema.

Each constrained row takes the token it picks, so it walks its own answer (`{"sentiment": "<label>", "reason": "`,
then free text); every 32 steps a row starts over with a fresh matcher (staggered), so the structural positions,
where few tokens are allowed, recur. The parts of a constrained row's cost are timed on the same states: xgrammar's
bitmask fill, the mask's application (the decoder's batched bias, `XGrammarGuide.mask_rows`, against xgrammar's
`apply_token_bitmask_inplace` CPU kernel), and `accept_token`. CPU time (`time.process_time`), `--threads` torch
threads; no model runs, so this is the pick's cost alone (a SmolLM2 decode step of 16 rows is tens of ms).

It measures whatever `src/ia3` is on the path, so the same command on an older checkout gives the before figure:
    PYTHONPATH=<checkout>/src python bench/profile_guided.py

Usage: python bench/profile_guided.py [--rows 16] [--steps 160] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time

import common  # noqa: F401  (offline settings, sys.path)
import torch
from serve_load import SMOLLM2
from serve_openai_overhead import SCHEMA

from ia3.serve.decoding import Row, Sampling, next_tokens
from ia3.serve.guided import Grammars, GuideSpec

RESTART = 32  # steps before a constrained row starts over


def tokenizer():
    import transformers as tf

    from ia3.base_models import resolve_base_model

    ref = resolve_base_model(SMOLLM2)
    return tf.AutoTokenizer.from_pretrained(ref.path, **ref.from_pretrained_kwargs())


def pick_cost(rows: list[Row], pool: list[torch.Tensor], steps: int, make) -> float:
    """CPU seconds per step of `next_tokens` (and, for constrained rows, their `accept`) over `steps` steps."""
    spent = 0.0
    for step in range(steps):
        for k, row in enumerate(rows):
            if row.guide is not None and (step + 2 * k) % RESTART == 0:
                row.guide = make()
        logits = pool[step % len(pool)]
        start = time.process_time()
        picks = next_tokens(logits, rows)
        for row, pick in zip(rows, picks):
            if row.guide is not None:
                assert row.guide.accept(pick), pick
        spent += time.process_time() - start
    return spent / steps


def parts(rows: list[Row], vocab: int, repeats: int = 20) -> dict[str, float]:
    """Microseconds per constrained row of each part, on the rows' current matcher states."""
    import xgrammar as xgr

    guides = [r.guide for r in rows]
    bitmask = xgr.allocate_token_bitmask(len(rows), vocab)
    logits = torch.randn(len(rows), vocab)

    def clock(fn) -> float:
        start = time.process_time()
        for _ in range(repeats):
            fn()
        return (time.process_time() - start) / repeats / len(rows) * 1e6

    out = {
        "fill (xgrammar)": clock(lambda: [g.matcher.fill_next_token_bitmask(bitmask, k) for k, g in enumerate(guides)])
    }
    out["apply: xgrammar's CPU kernel"] = clock(
        lambda: xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab)
    )
    mask_rows = getattr(type(guides[0]), "mask_rows", None)
    if mask_rows is not None:  # fill + apply, as the decoder calls it
        out["fill + apply: mask_rows (batched bias)"] = clock(lambda: mask_rows(logits, list(range(len(rows))), guides))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tok = tokenizer()
    vocab = len(tok)
    make = Grammars(tok, vocab, [tok.eos_token_id], 100_000).compile(GuideSpec("json_schema", json.dumps(SCHEMA)))
    torch.manual_seed(0)
    pool = [torch.randn(args.rows, vocab).to(torch.bfloat16) * 4 for _ in range(8)]
    eos = frozenset({tok.eos_token_id})
    plain = [Row([1], "a", 10**6, Sampling(), eos=eos) for _ in range(args.rows)]
    guided = [Row([1], "a", 10**6, Sampling(), eos=eos) for _ in range(args.rows)]
    for row in guided:
        row.guide = make()
    pick_cost(guided, pool, RESTART, make)  # warm-up
    pick_cost(plain, pool, RESTART, make)
    base = pick_cost(plain, pool, args.steps, make)
    cost = pick_cost(guided, pool, args.steps, make)
    print(f"vocabulary {vocab}, {args.rows} rows, {args.steps} steps, {args.threads} torch thread(s), CPU time")
    print(f"next_tokens, plain greedy:       {base * 1e6 / args.rows:8.1f} us per row per step")
    print(f"next_tokens + accept, JSON schema: {cost * 1e6 / args.rows:8.1f} us per row per step")
    print(f"constrained row's extra cost:      {(cost - base) * 1e6 / args.rows:8.1f} us per row per step")
    for name, us in parts(guided, vocab).items():
        print(f"  {name:42s} {us:8.1f} us per row")


if __name__ == "__main__":
    main()
