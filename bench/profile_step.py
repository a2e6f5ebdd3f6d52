"""Where a training step spends its time, ia3 vs peft: torch.profiler's operator table (or cProfile's Python view)
for row 1's step on one model, both sides on the same shared base, same batch and vectors.

Usage: python bench/profile_step.py MODEL [--steps 10] [--threads 1] [--cprofile] [--top 20]
       MODEL: t5, mt5, gpt2, minilm, mt0-large
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time

import common
import torch
import workloads as W


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=W.TRAIN_MODELS)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--cprofile", action="store_true", help="Python-level profile instead of torch operators")
    args = parser.parse_args(argv)
    common.quiet_warnings()
    torch.set_num_threads(args.threads)
    ours, theirs = W.pair(args.model)
    batch = W.train_batch(args.model)
    for side, model in (("ia3", ours), ("peft", theirs)):
        trainer = W.Trainer(model, batch)
        for _ in range(3):
            trainer.step()
        start = time.perf_counter()
        if args.cprofile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.steps):
                trainer.step()
            prof.disable()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(args.top)
            report = text.getvalue()
        else:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(args.steps):
                    trainer.step()
            report = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
        per_step = 1000 * (time.perf_counter() - start) / args.steps
        print(f"\n=== {side}: {args.model}, {args.steps} steps, {per_step:.2f} ms/step (profiled) ===\n{report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
