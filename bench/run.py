"""Run the ia3-vs-peft benchmark suite and print one table (row, ia3, peft/base, ratio, target, met?).

    python bench/run.py --quick            # every row, ~5-10 minutes on 2 cores (the default mode)
    python bench/run.py --full             # more repeats, the whole recipe epoch: steadier numbers
    python bench/run.py --rows 1,3         # some rows only
    python bench/run.py --threads 2        # torch threads (default on a CPU: 1; see bench/README.md)

Writes bench/results/bench.json (figures, ratios, versions, machine, the ia3 code measured). See bench/README.md.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

import common
from common import FULL, QUICK, RESULTS

ROWS = {
    "1": ("row1_train", "training step, ia3 vs peft"),
    "2": ("row2_recipe", "seed recipe epoch, peft vs ia3.recipe.train"),
    "3": ("row3_inference", "generate overhead vs the base model"),
    "4": ("row4_per_example", "per-example adapters"),
    "5": ("row5_memory", "peak memory in training"),
    "6": ("row6_adapter_io", "adapter file size and load time"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="fewer repeats, a capped recipe epoch (default)")
    group.add_argument("--full", action="store_true", help="more repeats, the whole recipe epoch")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows to run (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default on a CPU: 1)")
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default=None,
        help="what timings measure (default: process CPU time with 1 thread on a CPU, else wall)",
    )
    parser.add_argument("--out", default=str(RESULTS / "bench.json"))
    args = parser.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {','.join(ROWS)}")
    common.quiet_warnings()
    common.configure(args.threads, args.clock)
    mode = FULL if args.full else QUICK
    import torch

    print(
        f"ia3 bench, {mode.name} mode: rows {','.join(rows)}; torch threads {torch.get_num_threads()}, "
        f"clock {common.CLOCK['name']}, device {'cuda' if torch.cuda.is_available() else 'cpu'}",
        flush=True,
    )
    start = time.perf_counter()
    results, seconds, errors = [], {}, {}
    for row in rows:
        module_name, title = ROWS[row]
        print(f"\n## row {row}: {title}", flush=True)
        row_start = time.perf_counter()
        try:
            row_results = importlib.import_module(module_name).run(mode)
        except Exception as err:  # keep going: one broken row should not hide the others
            traceback.print_exc()
            errors[row] = f"{type(err).__name__}: {err}"
            row_results = []
        seconds[row] = round(time.perf_counter() - row_start, 1)
        results += row_results
        if row_results:
            print(common.table(row_results), flush=True)
        print(f"(row {row}: {seconds[row]:.0f} s)", flush=True)
    total = time.perf_counter() - start
    print(
        f"\n# ia3 vs peft, {mode.name} mode ({total / 60:.1f} min; times are medians, "
        f"clock: {common.CLOCK['name']}, torch threads {torch.get_num_threads()})\n"
    )
    print(common.table(results))
    met = [r.met for r in results if r.met is not None]
    print(f"\n{sum(met)} of {len(met)} targets met.")
    for row, err in errors.items():
        print(f"row {row} FAILED: {err}")
    out = Path(args.out)
    common.write_json(
        out,
        results,
        mode,
        total,
        {"rows": rows, "row_seconds": seconds, "errors": errors, "targets_met": sum(met), "targets": len(met)},
    )
    print(f"wrote {out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
