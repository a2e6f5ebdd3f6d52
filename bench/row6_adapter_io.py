"""Row 6: adapter files. Size of `save_pretrained`'s adapter_model.safetensors (bytes; the whole folder in the JSON)
and the time of `PeftModel.from_pretrained` onto a fresh base model (the base's construction untimed), each side
saving and loading its own adapter; medians of interleaved repeats. Targets: ia3 / peft <= 1.0 for both.

Models: tiny T5, tiny MT5, tiny GPT-2 and MiniLM as a classifier (its adapter also holds the head, trained in full).

Usage: python bench/row6_adapter_io.py [--quick | --full]
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import common
import workloads as W
from common import Mode, Result

MODELS = ("t5", "mt5", "gpt2", "minilm")
LABEL = {"t5": "tiny T5", "mt5": "tiny MT5", "gpt2": "tiny GPT-2", "minilm": "MiniLM cls"}
WEIGHTS = "adapter_model.safetensors"


def bench_model(name: str, mode: Mode, root: Path) -> list[Result]:
    import peft

    import ia3

    prototype = W.base_model(name).eval()
    loaders = {"ia3": ia3.PeftModel.from_pretrained, "peft": peft.PeftModel.from_pretrained}
    folders, sizes, folder_sizes = {}, {}, {}
    ours, theirs = W.pair(name)
    for side, model in (("ia3", ours), ("peft", theirs)):
        folders[side] = root / f"{name}-{side}"
        model.save_pretrained(folders[side])
        sizes[side] = (folders[side] / WEIGHTS).stat().st_size
        folder_sizes[side] = {p.name: p.stat().st_size for p in folders[side].iterdir() if p.is_file()}
    del ours, theirs

    def fresh():
        return copy.deepcopy(prototype)

    fns = {side: (lambda base, side=side: loaders[side](base, folders[side])) for side in loaders}
    times = common.interleaved(fns, mode.load_repeats, max(1, mode.warmup // 2), prepare={s: fresh for s in fns})
    ms = times.medians_ms()
    print(
        f"  row 6 {name}: file ia3 {sizes['ia3']} B, peft {sizes['peft']} B; load ia3 {ms['ia3']:.2f} ms, "
        f"peft {ms['peft']:.2f} ms",
        flush=True,
    )
    extra = {"files": folder_sizes, "load_repeats": mode.load_repeats, **times.to_json()}
    return [
        Result(
            "6",
            f"adapter file size, {LABEL[name]}",
            sizes["ia3"],
            sizes["peft"],
            "bytes",
            "peft",
            1.0,
            {"files": folder_sizes},
        ),
        Result(
            "6", f"from_pretrained onto a fresh base, {LABEL[name]}", ms["ia3"], ms["peft"], "ms", "peft", 1.0, extra
        ),
    ]


def run(mode: Mode) -> list[Result]:
    results = []
    with tempfile.TemporaryDirectory(prefix="ia3-bench-io-") as tmp:
        for name in MODELS:
            results += bench_model(name, mode, Path(tmp))
    return results


def main(argv: list[str] | None = None) -> int:
    return common.row_main("6", __doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    sys.exit(main())
