"""Row 5: peak memory while training row 1's models, each side in its own fresh subprocess.

A child process imports only its own library (ia3 or peft), builds the base model, wraps it, and runs a few
training steps (row 1's batch and AdamW); it reports its peak resident set (VmHWM of /proc/self/status) on a CPU, or
`torch.cuda.max_memory_allocated` on a GPU, plus the resident set after setup (before the first step), so the
growth during training is also shown. --full runs 3 children per side (alternating) and reports medians: the peak
of one child varies by a few MiB from run to run (the allocator), about 0.3% on these models.
Target: ia3 / peft peak <= 1.0.

Usage: python bench/row5_memory.py [--quick | --full] [--models t5,gpt2]
       python bench/row5_memory.py --child MODEL SIDE STEPS THREADS   (one measurement; prints JSON)
"""

from __future__ import annotations

import json
import sys

import common
from common import Mode, Result


def child(model: str, side: str, steps: int, threads: int) -> dict:
    """One side's measurement, in this (fresh) process."""
    common.quiet_warnings()
    import torch
    import workloads as W

    torch.set_num_threads(threads)
    gpu = torch.cuda.is_available()
    wrapped = W.wrap(side, W.base_model(model), W.TASK[model]).train()
    trainer = W.Trainer(wrapped, W.train_batch(model), autocast=gpu and model == "mt0-large")
    setup_kib = common.proc_status_kib("VmRSS")
    setup_hwm_kib = common.proc_status_kib("VmHWM")
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        setup_gpu = torch.cuda.memory_allocated()
    for _ in range(steps):
        trainer.step()
    out = {
        "model": model,
        "side": side,
        "steps": steps,
        "losses": trainer.finish(),
        "rss_after_setup_mib": setup_kib / 1024,
        "peak_rss_after_setup_mib": setup_hwm_kib / 1024,
        "peak_rss_mib": common.proc_status_kib("VmHWM") / 1024,
        "peft_imported": "peft" in sys.modules,
    }
    if gpu:
        out.update(
            gpu_allocated_after_setup_mib=setup_gpu / 2**20,
            gpu_peak_allocated_mib=torch.cuda.max_memory_allocated() / 2**20,
        )
    return out


def run(mode: Mode, models: tuple[str, ...] | None = None) -> list[Result]:
    import torch
    import workloads as W

    gpu = torch.cuda.is_available()
    results = []
    for model in models or W.TRAIN_MODELS:
        steps = min(mode.memory_steps, 2) if model == "mt0-large" and not gpu else mode.memory_steps
        runs: dict[str, list[dict]] = {"ia3": [], "peft": []}
        for r in range(mode.memory_repeats):  # one child at a time, the order alternating
            for side in ("ia3", "peft") if r % 2 == 0 else ("peft", "ia3"):
                runs[side].append(
                    common.run_child([__file__, "--child", model, side, str(steps), str(torch.get_num_threads())])
                )
        key = "gpu_peak_allocated_mib" if gpu else "peak_rss_mib"
        base = "gpu_allocated_after_setup_mib" if gpu else "rss_after_setup_mib"
        sides = {
            s: {key: common.median([x[key] for x in v]), base: common.median([x[base] for x in v])}
            for s, v in runs.items()
        }
        growth = {s: v[key] - v[base] for s, v in sides.items()}
        what = "peak GPU allocated" if gpu else "peak RSS"
        print(
            f"  row 5 {model}: {what} ia3 {sides['ia3'][key]:.1f} MiB, peft {sides['peft'][key]:.1f} MiB; "
            f"growth in training ia3 {growth['ia3']:.1f}, peft {growth['peft']:.1f} MiB",
            flush=True,
        )
        results.append(
            Result(
                "5",
                f"{what} training {W.LABEL[model]}, {steps} steps (growth after setup: ia3 {growth['ia3']:.1f}, "
                f"peft {growth['peft']:.1f} MiB)",
                sides["ia3"][key],
                sides["peft"][key],
                "MiB",
                "peft",
                1.0,
                {"children": runs, "growth_mib": growth, "measure": key, "repeats": mode.memory_repeats},
            )
        )
    return results


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        model, side, steps, threads = argv[1], argv[2], int(argv[3]), int(argv[4])
        print(json.dumps(child(model, side, steps, threads)))
        return 0
    models = None
    if "--models" in argv:
        i = argv.index("--models")
        models = tuple(argv[i + 1].split(","))
        del argv[i : i + 2]
    return common.row_main("5", __doc__.splitlines()[0], lambda mode: run(mode, models), argv)


if __name__ == "__main__":
    sys.exit(main())
