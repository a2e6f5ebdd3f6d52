"""Helpers shared by the benchmark rows: modes, interleaved timing, memory, machine facts, tables and JSON.

Every row module exposes `run(mode) -> list[Result]` and a `main()` that prints its table and writes its JSON;
`bench/run.py` runs the rows in one process and writes the combined `bench/results/bench.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# offline: nothing in the suite may reach the Hub (set before transformers is imported)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
DATA = ROOT.parent / "shared" / "data" / "financial_phrasebank" / "Sentences_AllAgree.txt"
for _path in (str(ROOT / "tests"), str(BENCH)):  # tests/models.py and tests/tiny_dirs.py hold the tiny builders
    if _path not in sys.path:
        sys.path.insert(0, _path)


def quiet_warnings() -> None:
    """Silence the known, harmless warnings (peft's fan_in_fan_out note for GPT-2, missing Hub configs offline)."""
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
    warnings.filterwarnings("ignore", message=".*Could not find a config file.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass


# -- modes ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mode:
    """How hard each row works. `quick` fits the whole suite in ~10 minutes on 2 cores; `full` is steadier."""

    name: str
    repeats: int  # timed repeats per side for millisecond-scale workloads
    warmup: int  # untimed calls per side first
    big_steps: int  # timed training steps per side on the full-size mt0-large architecture
    big_warmup: int
    recipe_cap: int | None  # row 2: first N training examples (None: the whole epoch)
    recipe_repeats: int  # row 2: epochs per side (interleaved)
    load_repeats: int  # row 6: from_pretrained loads per side
    memory_steps: int  # row 5: training steps in each memory subprocess
    memory_repeats: int  # row 5: subprocesses per side and model (interleaved; the median is reported)


QUICK = Mode(
    "quick",
    repeats=40,
    warmup=3,
    big_steps=2,
    big_warmup=1,
    recipe_cap=600,
    recipe_repeats=3,
    load_repeats=10,
    memory_steps=3,
    memory_repeats=1,
)
FULL = Mode(
    "full",
    repeats=120,
    warmup=10,
    big_steps=6,
    big_warmup=2,
    recipe_cap=None,
    recipe_repeats=5,
    load_repeats=40,
    memory_steps=5,
    memory_repeats=3,
)


# -- results --------------------------------------------------------------------------------------------------------
@dataclass
class Result:
    """One line of the table: ia3's figure against a reference (peft, the bare base model, or another ia3 run).

    `ratio` is `ia3 / ref` unless `ratio_override` is given; `met` is `ratio <= target` (None without a target).
    """

    row: str
    name: str
    ia3: float
    ref: float
    unit: str
    ref_name: str = "peft"
    target: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.ia3 / self.ref if self.ref else float("nan")

    @property
    def met(self) -> bool | None:
        return None if self.target is None else bool(self.ratio <= self.target)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "met": self.met}


def _fmt(value: float, unit: str) -> str:
    if unit == "bytes":
        return f"{value:,.0f} B"
    if unit == "MiB":
        return f"{value:,.1f} MiB"
    if unit in ("ms", "s"):
        return f"{value:.3f} {unit}" if value < 10 else f"{value:.1f} {unit}"
    return f"{value:.4g} {unit}".strip()


def table(results: list[Result]) -> str:
    """The markdown table: row, what, ia3, reference, ratio, target, met?"""
    lines = ["| row | what | ia3 | peft / base | ratio | target | met? |", "|---|---|---|---|---|---|---|"]
    for r in results:
        target = f"<= {r.target:g}" if r.target is not None else "-"
        met = {True: "yes", False: "**no**", None: "-"}[r.met]
        ratio = f"{r.ratio:.3f}"
        if r.target is not None and ratio == f"{r.target:.3f}":  # 1.050 would read as met when it is 1.0503
            ratio = f"{r.ratio:.4f}"
        lines.append(
            f"| {r.row} | {r.name} | {_fmt(r.ia3, r.unit)} | {r.ref_name}: {_fmt(r.ref, r.unit)} | "
            f"{ratio} | {target} | {met} |"
        )
    return "\n".join(lines)


# -- timing ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Collect once, then keep the cyclic garbage collector out of the timed region (as `timeit` does)."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# The clock the figures use. "cpu" (process CPU time) is the default on a CPU with one torch thread: on a shared,
# oversubscribed 2-core machine wall time mostly measures the neighbours, while the CPU time a single-threaded
# process burns is what the code costs. "wall" (perf_counter, after a CUDA sync) elsewhere. Both go to the JSON.
CLOCK = {"name": "wall"}


def set_clock(name: str) -> None:
    if name not in ("cpu", "wall"):
        raise ValueError(name)
    CLOCK["name"] = name


def now() -> float:
    """The current reading of the chosen clock, in seconds."""
    return time.process_time() if CLOCK["name"] == "cpu" else time.perf_counter()


@dataclass
class Timings:
    """Seconds per call of each side: `main` on the chosen clock, plus both clocks for the JSON."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]

    @property
    def main(self) -> dict[str, list[float]]:
        return self.cpu if CLOCK["name"] == "cpu" else self.wall

    def medians_ms(self) -> dict[str, float]:
        return {k: 1000 * statistics.median(v) for k, v in self.main.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "clock": CLOCK["name"],
            "wall_ms": {k: spread([1000 * t for t in v]) for k, v in self.wall.items()},
            "cpu_ms": {k: spread([1000 * t for t in v]) for k, v in self.cpu.items()},
        }


def interleaved(
    fns: dict[str, Callable[..., Any]], repeats: int, warmup: int, prepare: dict[str, Callable[[], Any]] | None = None
) -> Timings:
    """Time each function, interleaved: every repeat calls each once, the order rotating from repeat to repeat
    (for two: A B, B A, A B, ...), so drifts of a shared, noisy machine hit all sides alike.

    With `prepare`, each call is `fns[name](prepare[name]())` and only `fns[name]` is timed (e.g. a fresh base
    model to load an adapter onto)."""
    names = list(fns)

    def call(name: str) -> Callable[[], Any]:
        if prepare is None:
            return fns[name]
        arg = prepare[name]()
        return lambda: fns[name](arg)

    for _ in range(warmup):
        for name in names:
            call(name)()
    sync()
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    with no_gc():
        for r in range(repeats):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                fn = call(name)
                w, c = time.perf_counter(), time.process_time()
                fn()
                sync()
                cpu[name].append(time.process_time() - c)
                wall[name].append(time.perf_counter() - w)
    return Timings(wall, cpu)


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> dict[str, float]:
    """Median and interquartile range, for the JSON."""
    if len(values) < 2:
        return {"median": values[0], "q1": values[0], "q3": values[0], "n": len(values)}
    q = statistics.quantiles(values, n=4)
    return {"median": statistics.median(values), "q1": q[0], "q3": q[2], "n": len(values)}


# -- memory ---------------------------------------------------------------------------------------------------------
def proc_status_kib(key: str) -> int:
    """A `kB` field of /proc/self/status (VmHWM: peak resident set; VmRSS: current)."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def run_child(args: list[str], timeout: float = 900) -> dict[str, Any]:
    """Run `python <args>` in a fresh process; it prints one JSON object as its last stdout line."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- facts about the run --------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def code_fingerprint() -> dict[str, Any]:
    """Which ia3 code was measured: the commit, whether src/ differs from it, and a hash of src/ia3's sources
    (another engineer may be changing src/ia3/layer.py while the suite runs)."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "src" / "ia3").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return {
        "commit": _git("rev-parse", "--short", "HEAD"),
        "src_dirty": bool(_git("status", "--porcelain", "src")),
        "src_sha256": digest.hexdigest()[:16],
    }


def environment() -> dict[str, Any]:
    import peft
    import torch
    import transformers

    import ia3

    machine = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "clock": CLOCK["name"],
        "load_average": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name(0)
    return {
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "ia3": ia3.__version__,
        },
        "machine": machine,
        "code": code_fingerprint(),
    }


def write_json(path: Path, results: list[Result], mode: Mode, seconds: float, extra: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "mode": asdict(mode),
        "seconds": round(seconds, 1),
        **environment(),
        **(extra or {}),
        "results": [r.to_json() for r in results],
    }
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def save_report(path: str | Path, report: dict[str, Any]) -> None:
    """Write a bench's JSON report with the environment it ran in (versions, machine, code); say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**report, **environment()}, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\nwrote {path}")


# -- command line ---------------------------------------------------------------------------------------------------
def parse_mode(description: str, argv: list[str] | None = None) -> tuple[Mode, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=description)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="fewer repeats (the default)")
    group.add_argument("--full", action="store_true", help="more repeats, steadier numbers")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default on a CPU: 1, see CLOCK; on a GPU: torch's own choice)",
    )
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default=None,
        help="what the figures measure (default: cpu with one thread on a CPU, else wall)",
    )
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args(argv)
    configure(args.threads, args.clock)
    return (FULL if args.full else QUICK), args


def configure(threads: int | None, clock: str | None) -> None:
    """Set torch's threads and the clock (see CLOCK)."""
    import torch

    gpu = torch.cuda.is_available()
    if threads or not gpu:
        torch.set_num_threads(threads or 1)
    set_clock(clock or ("cpu" if not gpu and torch.get_num_threads() == 1 else "wall"))


def row_main(row: str, description: str, run: Callable[[Mode], list[Result]], argv: list[str] | None = None) -> int:
    """`main()` of a row module: run it, print its table, write bench/results/row<row>.json."""
    quiet_warnings()
    mode, args = parse_mode(description, argv)
    start = time.perf_counter()
    results = run(mode)
    print(table(results))
    out = Path(args.out) if args.out else RESULTS / f"row{row}.json"
    write_json(out, results, mode, time.perf_counter() - start)
    print(f"wrote {out}")
    return 0
