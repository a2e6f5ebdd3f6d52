"""Row 4: per-example adapters. A batch of 64 rows spread over 16 adapters (row i uses adapter i % 16) on tiny T5,
forward (with labels) and generate (3 tokens, greedy):

* ia3 in one pass: `model(..., adapter_names=[...])`;
* peft's only way: for each of the 16 adapters, `set_adapter` and a forward (or generate) on its 4 rows, the
  outputs put back in row order [ia3 / peft <= 0.15];
* ia3's mixed batch against ia3 with one adapter for the whole batch of 64 [<= 1.10].

Both libraries hold the same 16 adapters (random vectors, ia3's copied into peft); the outputs must agree.

Usage: python bench/row4_per_example.py [--quick | --full]
"""

from __future__ import annotations

import sys

import common
import models as tiny
import torch
import workloads as W
from common import Mode, Result

ROWS, LENGTH, ADAPTERS, NEW_TOKENS = 64, 32, 16, 3
NAMES = [f"task{i:02d}" for i in range(ADAPTERS)]  # not "a3": peft warns about names inside "ia3_"


def models():
    """(ia3, peft) tiny T5s with the same 16 adapters, eval mode, on `W.device()`."""
    import peft

    import ia3

    ours = W.wrap("ia3", tiny.t5(0), "SEQ_2_SEQ_LM", adapter=NAMES[0])
    theirs = W.wrap("peft", tiny.t5(0), "SEQ_2_SEQ_LM", adapter=NAMES[0])
    for name in NAMES[1:]:
        ours.add_adapter(name, ia3.IA3Config(task_type="SEQ_2_SEQ_LM", init_ia3_weights=False))
        theirs.add_adapter(name, peft.IA3Config(task_type="SEQ_2_SEQ_LM", init_ia3_weights=False))
    W.copy_adapters(ours, theirs)
    ours.set_adapter(NAMES[0])
    theirs.set_adapter(NAMES[0])
    return ours.to(W.device()).eval(), theirs.to(W.device()).eval()


def run(mode: Mode) -> list[Result]:
    ours, theirs = models()
    batch = {k: v.to(W.device()) for k, v in tiny.batch("t5", ROWS, LENGTH, seed=0).items()}
    rows = [NAMES[i % ADAPTERS] for i in range(ROWS)]
    groups = {name: torch.tensor([i for i, r in enumerate(rows) if r == name], device=W.device()) for name in NAMES}
    gen_kwargs = {
        "max_new_tokens": NEW_TOKENS,
        "min_new_tokens": NEW_TOKENS,
        "do_sample": False,
        "num_beams": 1,
        "pad_token_id": 0,
    }
    gen_inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}

    @torch.no_grad()
    def peft_grouped(call, inputs):
        out = None
        for name, index in groups.items():
            theirs.set_adapter(name)
            part = call({k: v.index_select(0, index) for k, v in inputs.items()})
            if out is None:
                out = part.new_empty((ROWS,) + part.shape[1:])
            out.index_copy_(0, index, part)
        return out

    forward = {
        "ia3 mixed": torch.no_grad()(lambda: ours(**batch, adapter_names=rows).logits),
        "peft grouped": lambda: peft_grouped(lambda b: theirs(**b).logits, batch),
        "ia3 single": torch.no_grad()(lambda: ours(**batch).logits),
    }
    generate = {
        "ia3 mixed": torch.no_grad()(lambda: ours.generate(**gen_inputs, adapter_names=rows, **gen_kwargs)),
        "peft grouped": lambda: peft_grouped(lambda b: theirs.generate(**b, **gen_kwargs), gen_inputs),
        "ia3 single": torch.no_grad()(lambda: ours.generate(**gen_inputs, **gen_kwargs)),
    }
    logits_diff = float((forward["ia3 mixed"]() - forward["peft grouped"]()).abs().max())
    tokens_same = bool(torch.equal(generate["ia3 mixed"](), generate["peft grouped"]()))
    results = []
    for what, fns in (("forward", forward), ("generate 3 tokens", generate)):
        times = common.interleaved(fns, mode.repeats, mode.warmup)
        ms = times.medians_ms()
        print(f"  row 4 {what}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()), flush=True)
        extra = {
            "rows": ROWS,
            "tokens": LENGTH,
            "adapters": ADAPTERS,
            "ms": ms,
            **times.to_json(),
            "max_logits_diff_vs_peft": logits_diff,
            "generated_tokens_agree": tokens_same,
        }
        label = f"{what}, tiny T5, {ROWS} rows over {ADAPTERS} adapters"
        results += [
            Result(
                "4",
                f"{label}: ia3 one pass vs peft set_adapter per group",
                ms["ia3 mixed"],
                ms["peft grouped"],
                "ms",
                "peft",
                0.15,
                extra,
            ),
            Result(
                "4",
                f"{label}: ia3 mixed vs ia3 one adapter",
                ms["ia3 mixed"],
                ms["ia3 single"],
                "ms",
                "ia3 single",
                1.10,
                extra,
            ),
        ]
    return results


def main(argv: list[str] | None = None) -> int:
    return common.row_main("4", __doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    sys.exit(main())
