"""Row 4: per-example adapters. A batch of 64 rows spread over 16 adapters (row i uses adapter i % 16) on tiny T5,
forward (with labels) and generate (3 tokens, greedy); and on the real SmolLM2-135M, 32 rows over 16 adapters,
generate (8 tokens, greedy) [vs peft <= 1.0, vs one adapter <= 1.05]:

* ia3 in one pass: `model(..., adapter_names=[...])`;
* peft's only way: for each of the 16 adapters, `set_adapter` and a forward (or generate) on its 4 rows, the
  outputs put back in row order [ia3 / peft <= 0.15];
* ia3's mixed batch against ia3 with one adapter for the whole batch of 64 [<= 1.10].

Both libraries hold the same 16 adapters (random vectors, near 1 on SmolLM2; ia3's copied into peft); the outputs must agree.

Usage: python bench/row4_per_example.py [--quick | --full]
"""

from __future__ import annotations

import sys

import common
import models as tiny
import torch
import workloads as W
from common import Mode, Result

ADAPTERS = 16
NAMES = [f"task{i:02d}" for i in range(ADAPTERS)]  # not "a3": peft warns about names inside "ia3_"
# per model: rows, prompt tokens, new tokens, whether the forward is timed too, targets (vs peft, vs one adapter)
SPECS = {
    "t5": {"rows": 64, "length": 32, "new_tokens": 3, "forward": True, "targets": (0.15, 1.10)},
    "smollm2": {"rows": 32, "length": 32, "new_tokens": 8, "forward": False, "targets": (1.0, 1.05)},
}


def models(name: str):
    """(ia3, peft) models over the same base weights with the same 16 adapters, eval mode, on `W.device()`."""
    import peft

    import ia3

    task = W.TASK[name]
    base = tiny.t5(0) if name == "t5" else W.base_model(name)
    twin = tiny.t5(0) if name == "t5" else W.share_weights_copy(base)  # the same weight tensors, unwrapped
    ours = W.wrap("ia3", base, task, adapter=NAMES[0])
    theirs = W.wrap("peft", twin, task, adapter=NAMES[0])
    for adapter in NAMES[1:]:
        ours.add_adapter(adapter, ia3.IA3Config(task_type=task, init_ia3_weights=False))
        theirs.add_adapter(adapter, peft.IA3Config(task_type=task, init_ia3_weights=False))
    if name != "t5":
        W.trained_like(ours)
    W.copy_adapters(ours, theirs)
    ours.set_adapter(NAMES[0])
    theirs.set_adapter(NAMES[0])
    return ours.to(W.device()).eval(), theirs.to(W.device()).eval()


def _batch(name: str, rows: int, length: int) -> dict[str, torch.Tensor]:
    if name == "t5":
        return tiny.batch("t5", rows, length, seed=0)
    ids = torch.randint(5, W.SMOLLM2_VOCAB, (rows, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def run(mode: Mode) -> list[Result]:
    return [result for name in SPECS for result in bench_model(name, mode)]


def bench_model(name: str, mode: Mode) -> list[Result]:
    spec = SPECS[name]
    n_rows, length, new_tokens = spec["rows"], spec["length"], spec["new_tokens"]
    ours, theirs = models(name)
    batch = {k: v.to(W.device()) for k, v in _batch(name, n_rows, length).items()}
    rows = [NAMES[i % ADAPTERS] for i in range(n_rows)]
    groups = {name: torch.tensor([i for i, r in enumerate(rows) if r == name], device=W.device()) for name in NAMES}
    gen_kwargs = {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
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
                out = part.new_empty((n_rows,) + part.shape[1:])
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
    logits_diff = float((forward["ia3 mixed"]() - forward["peft grouped"]()).abs().max()) if spec["forward"] else None
    tokens_same = bool(torch.equal(generate["ia3 mixed"](), generate["peft grouped"]()))
    results = []
    timed = [("forward", forward)] if spec["forward"] else []
    for what, fns in (*timed, (f"generate {new_tokens} tokens", generate)):
        times = common.interleaved(fns, mode.repeats, mode.warmup)
        ms = times.medians_ms()
        print(f"  row 4 {what}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()), flush=True)
        extra = {
            "rows": n_rows,
            "tokens": length,
            "adapters": ADAPTERS,
            "ms": ms,
            **times.to_json(),
            "max_logits_diff_vs_peft": logits_diff,
            "generated_tokens_agree": tokens_same,
        }
        label = f"{what}, {W.LABEL[name]}, {n_rows} rows over {ADAPTERS} adapters"
        results += [
            Result(
                "4",
                f"{label}: ia3 one pass vs peft set_adapter per group",
                ms["ia3 mixed"],
                ms["peft grouped"],
                "ms",
                "peft",
                spec["targets"][0],
                extra,
            ),
            Result(
                "4",
                f"{label}: ia3 mixed vs ia3 one adapter",
                ms["ia3 mixed"],
                ms["ia3 single"],
                "ms",
                "ia3 single",
                spec["targets"][1],
                extra,
            ),
        ]
    return results


def main(argv: list[str] | None = None) -> int:
    return common.row_main("4", __doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    sys.exit(main())
