"""Row 3: inference overhead. `generate` (greedy, batch 8) on tiny T5 and tiny GPT-2 (3 new tokens) and on the real
SmolLM2-135M (16 new tokens): ia3 unmerged and ia3 merged (`merge_adapter()`, layers still wrapped) against the bare
base model.

Targets: unmerged / base <= 1.05 (SmolLM2: 1.03); merged / base <= 1.02 (SmolLM2: 1.01). peft's unmerged time is in
the JSON for reference. Every variant produces exactly the same number of tokens (min_new_tokens), so all do the
same work.

A control runs beside them: a second, plain copy of the base (`base copy`), timed like the others. Its ratio to the
base is what this machine's noise and memory placement alone give two identical models: a target tighter than that
spread cannot be told from it (measured here on SmolLM2: 0.95-1.06 between runs).

Usage: python bench/row3_inference.py [--quick | --full]
"""

from __future__ import annotations

import copy
import sys

import common
import models as tiny
import torch
import workloads as W
from common import Mode, Result

NEW_TOKENS = {"t5": 3, "gpt2": 3, "smollm2": 16}
ROWS, LENGTH = 8, 32
VOCAB = {"t5": 99, "gpt2": 99, "smollm2": W.SMOLLM2_VOCAB}
TARGETS = {"smollm2": (1.03, 1.01)}  # (unmerged, merged); the tiny models: (1.05, 1.02)


def variants(name: str) -> dict[str, torch.nn.Module]:
    """The same base weights five ways (copies: merging changes weights); the adapters have random vectors
    (N(0, 1) on the tiny models, near 1 on SmolLM2: `W.trained_like`). `base copy` is the control."""
    task = W.TASK[name]
    base = getattr(tiny, name)(0) if name in W.TINY else W.base_model(name).eval()
    unmerged = W.wrap("ia3", copy.deepcopy(base), task)
    if name not in W.TINY:
        W.trained_like(unmerged)
    merged = W.wrap("ia3", copy.deepcopy(base), task)
    merged.load_state_dict(unmerged.state_dict())  # the same vectors (they were drawn at random)
    merged.merge_adapter()
    theirs = W.wrap("peft", copy.deepcopy(base), task)
    W.copy_adapters(unmerged, theirs)
    control = copy.deepcopy(base)
    return {"base": base, "ia3 unmerged": unmerged, "ia3 merged": merged, "peft unmerged": theirs, "base copy": control}


def bench_model(name: str, mode: Mode) -> list[Result]:
    models = {k: m.to(W.device()).eval() for k, m in variants(name).items()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB[name], (ROWS, LENGTH), generator=g).to(W.device())
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    kwargs = {
        "max_new_tokens": NEW_TOKENS[name],
        "min_new_tokens": NEW_TOKENS[name],
        "do_sample": False,
        "num_beams": 1,
        "pad_token_id": 0,
    }

    def gen(model):
        @torch.no_grad()
        def call():
            return model.generate(**inputs, **kwargs)

        return call

    outputs = {k: gen(m)() for k, m in models.items()}
    same = bool(
        torch.equal(outputs["ia3 unmerged"], outputs["ia3 merged"])
        and torch.equal(outputs["ia3 unmerged"], outputs["peft unmerged"])
    )
    times = common.interleaved({k: gen(m) for k, m in models.items()}, mode.repeats * 2, mode.warmup)
    ms = times.medians_ms()
    extra = {
        "rows": ROWS,
        "tokens": LENGTH,
        "new_tokens": NEW_TOKENS[name],
        "repeats": mode.repeats * 2,
        "adapted_outputs_agree": same,
        "ms": ms,
        **times.to_json(),
        "peft_unmerged_over_base": ms["peft unmerged"] / ms["base"],
        "control_over_base": ms["base copy"] / ms["base"],
    }
    label = f"generate {NEW_TOKENS[name]} tokens, {W.LABEL[name]} ({ROWS}x{LENGTH})"
    unmerged_target, merged_target = TARGETS.get(name, (1.05, 1.02))
    return [
        Result("3", f"{label}, ia3 unmerged", ms["ia3 unmerged"], ms["base"], "ms", "base", unmerged_target, extra),
        Result("3", f"{label}, ia3 merged", ms["ia3 merged"], ms["base"], "ms", "base", merged_target, extra),
        Result(
            "3", f"{label}, control: another copy of the base", ms["base copy"], ms["base"], "ms", "base", None, extra
        ),
    ]


def run(mode: Mode) -> list[Result]:
    results = []
    for name in ("t5", "gpt2", "smollm2"):
        results += bench_model(name, mode)
        print(
            f"  row 3 {name}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in results[-1].extra["ms"].items()), flush=True
        )
    return results


def main(argv: list[str] | None = None) -> int:
    return common.row_main("3", __doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    sys.exit(main())
