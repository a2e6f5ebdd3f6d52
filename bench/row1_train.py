"""Row 1: one training step (forward, backward, AdamW step), ia3 vs peft, same model, batch, data and vectors.

Both sides wrap one base model (the peft side runs a module tree over the same weight tensors), start from the same
random vectors (init_ia3_weights=False, ia3's copied into peft) and use AdamW(lr 8e-3, weight decay 0.01). Their
losses must agree at every step (atol 1e-5); the check is recorded with each figure.

A third side, "floor", times the bare base model with the backward (IA)^3 needs but no adapter ops and no optimizer
step (`workloads.FloorTrainer`): floor / peft bounds the ratio any implementation could reach (in the JSON).

Models: tiny T5, MT5, GPT-2 (batch 8 x 32 tokens), MiniLM as a 3-label classifier (16 x 48) [target <= 0.85]; the
mt0-large architecture at full size with random weights (2 x 32, 3 label tokens) [<= 0.90], bf16 autocast on a GPU;
the real SmolLM2-135M (8 x 48, the loss over the last 3 tokens) [<= 1.0].

Usage: python bench/row1_train.py [--quick | --full] [--models t5,minilm]
"""

from __future__ import annotations

import gc
import sys

import common
import torch
import workloads as W
from common import Mode, Result

LOSS_ATOL = 1e-5
TARGET = {"mt0-large": 0.90, "smollm2": 1.0}  # real models: the base's compute dominates both sides
DEFAULT_TARGET = 0.85


def bench_model(name: str, mode: Mode) -> Result:
    big = name == "mt0-large"
    ours, theirs, bare = W.pair(name, floor=True)
    batch = W.train_batch(name)
    autocast = big and torch.cuda.is_available()  # the GPU run of mt0-large is in bf16 autocast
    sides = {
        "ia3": W.Trainer(ours, batch, autocast),
        "peft": W.Trainer(theirs, batch, autocast),
        "floor": W.FloorTrainer(bare, batch, autocast, targets=W.adapted_modules(ours)),
    }
    repeats, warmup = (mode.big_steps, mode.big_warmup) if big else (mode.repeats, mode.warmup)
    times = common.interleaved({k: t.step for k, t in sides.items()}, repeats, warmup)
    losses = {k: t.finish() for k, t in sides.items() if k != "floor"}
    diff = max(abs(a - b) for a, b in zip(losses["ia3"], losses["peft"]))
    agree = diff <= LOSS_ATOL
    rows, length = W.BATCH[name]
    ms = times.medians_ms()
    extra = {
        "batch": rows,
        "tokens": length,
        "steps_timed": repeats,
        "warmup_steps": warmup,
        "losses_agree_atol_1e-5": agree,
        "max_loss_diff": diff,
        "losses": losses,
        **times.to_json(),
        "trainable": sum(p.numel() for p in ours.parameters() if p.requires_grad),
        "floor_ms": ms["floor"],
        "best_possible_ratio": ms["floor"] / ms["peft"],
        "adapter_overhead": {k: 1 - ms["floor"] / ms[k] for k in ("ia3", "peft")},
        "device": str(W.device()),
        "bf16_autocast": autocast,
    }
    if big:
        tokens = W.batch_tokens(batch)
        extra["tokens_per_s_wall"] = {k: tokens / common.median(v) for k, v in times.wall.items()}
    check = "losses agree" if agree else "**losses differ**"
    result = Result(
        "1",
        f"train step, {W.LABEL[name]} ({rows}x{length}); {check} (max diff {diff:.1e})",
        ms["ia3"],
        ms["peft"],
        "ms",
        "peft",
        TARGET.get(name, DEFAULT_TARGET),
        extra,
    )
    del ours, theirs, bare, sides
    gc.collect()
    return result


def run(mode: Mode, models: tuple[str, ...] = W.TRAIN_MODELS) -> list[Result]:
    results = []
    for name in models:
        results.append(bench_model(name, mode))
        r = results[-1]
        print(
            f"  row 1 {name}: ia3 {r.ia3:.2f} ms, peft {r.ref:.2f} ms, ratio {r.ratio:.3f}; floor (base model, "
            f"no adapter ops) {r.extra['floor_ms']:.2f} ms: best possible ratio {r.extra['best_possible_ratio']:.3f}",
            flush=True,
        )
    return results


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    models = W.TRAIN_MODELS
    if "--models" in argv:
        i = argv.index("--models")
        models = tuple(argv[i + 1].split(","))
        del argv[i : i + 2]
    return common.row_main("1", __doc__.splitlines()[0], lambda mode: run(mode, models), argv)


if __name__ == "__main__":
    sys.exit(main())
