"""Should the recipe's `precision: auto` pick bf16 on a CPU with bf16 matrix units? One (IA)^3 training step on
SmolLM2-135M (row 1's batch, 8 x 48, loss over the last 3 tokens; AdamW over fp32 vectors) in fp32 and under
bf16 autocast (what accelerate's `mixed_precision="bf16"` does on a CPU: fp32 weights and vectors, matmuls in
bf16), interleaved, after warm-ups; the median of each and their ratio.

Usage: python bench/train_precision.py [--repeats 4] [--threads 1] [--model smollm2]
The recipe's `auto` picks bf16 on such a CPU only where this ratio (fp32 / bf16) is >= 1.5 (see bench/README.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import common
import torch
import workloads as W


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=W.TRAIN_MODELS)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    common.quiet_warnings()
    torch.set_num_threads(args.threads)
    model, _ = W.pair(args.model)
    batch = W.train_batch(args.model)
    sides = {"fp32": W.Trainer(model, batch), "bf16 autocast": W.Trainer(model, batch, autocast=True)}
    times: dict[str, list[float]] = {name: [] for name in sides}
    for i in range(args.warmup + args.repeats):
        order = list(sides) if i % 2 == 0 else list(reversed(sides))
        for name in order:
            start = time.process_time()
            sides[name].step()
            if i >= args.warmup:
                times[name].append(time.process_time() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name}: median {1e3 * medians[name]:.0f} ms CPU/step  ({', '.join(f'{1e3 * x:.0f}' for x in t)})")
    print(f"fp32 / bf16 = {medians['fp32'] / medians['bf16 autocast']:.2f} ({args.threads} threads, {args.model})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
