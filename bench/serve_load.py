"""Load test of `ia3 serve` on loopback: N concurrent clients, requests spread over several adapters.

Builds a small T5 (random weights, the tests' word-level tokenizer) and K adapters with random vectors, computes
every request's answer offline (a `PeftModel`, the request alone with its adapter active), then serves the same
requests in four ways, each by a fresh server process on 127.0.0.1:

* mixed:        dynamic batching, adapters mixed in a batch (the default);
* per-adapter:  dynamic batching, but a batch holds one adapter only (`mix_adapters=False`);
* sequential:   mixed batching, but the clients send one adapter's requests at a time (group after group);
* unbatched:    `max_batch_size=1`.

Reports throughput, client-side latency p50/p99, batch statistics from /metrics, and whether every request got
exactly one answer equal to the offline one. Bounded: `--requests` in all, `--time-limit` seconds per scenario.
Prints a table and writes JSON (default bench/results/serve_load.json).

Usage: python bench/serve_load.py [--clients 8] [--requests 96] [--adapters 4] [--max-new-tokens 8] [--d-model 128]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the offline word-level tokenizer the tests use

SERVER = """
import json, sys
from ia3.serve import ServeConfig
from ia3.serve.app import run
run(ServeConfig(**json.loads(sys.argv[1])), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def build(folder: Path, n_adapters: int, d_model: int, layers: int) -> tuple[Path, Path]:
    import transformers as tf
    from tiny_dirs import tokenizer

    from ia3 import IA3Config, get_peft_model

    torch.manual_seed(0)
    tok = tokenizer()
    cfg = tf.T5Config(
        vocab_size=len(tok),
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=4 * d_model,
        num_layers=layers,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    model_dir = folder / "model"
    tf.T5ForConditionalGeneration(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    adapters = folder / "adapters"
    for i in range(n_adapters):
        torch.manual_seed(100 + i)
        base = tf.AutoModelForSeq2SeqLM.from_pretrained(model_dir)
        get_peft_model(base, IA3Config(task_type="SEQ_2_SEQ_LM", init_ia3_weights=False)).save_pretrained(
            adapters / f"adapter{i}"
        )
    return model_dir, adapters


def workload(n_requests: int, n_adapters: int, seed: int) -> list[tuple[str, str]]:
    with open(ROOT / "src" / "ia3" / "demo" / "finsent.csv", encoding="utf-8") as handle:
        texts = [row["text"] for row in csv.DictReader(handle)]
    rng = random.Random(seed)
    return [(f"adapter{rng.randrange(n_adapters)}", rng.choice(texts)) for _ in range(n_requests)]


@torch.no_grad()
def offline_answers(model_dir: Path, adapters: Path, requests, max_new_tokens: int) -> list[str]:
    import transformers as tf

    from ia3 import PeftModel

    tok = tf.AutoTokenizer.from_pretrained(model_dir)
    names = sorted({a for a, _ in requests})
    model = PeftModel.from_pretrained(
        tf.AutoModelForSeq2SeqLM.from_pretrained(model_dir), adapters / names[0], adapter_name=names[0]
    )
    for name in names[1:]:
        model.load_adapter(adapters / name, name)
    model.eval()
    out = []
    for adapter, text in requests:
        model.set_adapter(adapter)
        ids = tok(text, return_tensors="pt", truncation=True, max_length=512)["input_ids"]
        gen = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tok.pad_token_id,
        )
        out.append(tok.decode(gen[0], skip_special_tokens=True))
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(config: dict, threads: int) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-c", SERVER, json.dumps(config), str(port)], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited during start")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start within 120 s")


def drive(url: str, requests, order: list[list[int]], clients: int, max_new_tokens: int, time_limit: float) -> dict:
    """Send `requests` (in phases: each list of `order` is sent by `clients` threads, then the next)."""
    import httpx

    answers: list[list[str] | None] = [None] * len(requests)
    statuses: list[int | None] = [None] * len(requests)
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + time_limit
    start = time.perf_counter()
    for phase in order:
        queue = list(reversed(phase))

        def client(queue: list[int] = queue) -> None:
            with httpx.Client(base_url=url, timeout=60) as http:
                while time.monotonic() < deadline:
                    with lock:
                        if not queue:
                            return
                        i = queue.pop()
                    adapter, text = requests[i]
                    t0 = time.perf_counter()
                    r = http.post(
                        "/v1/generate",
                        json={"adapter": adapter, "inputs": text, "parameters": {"max_new_tokens": max_new_tokens}},
                    )
                    elapsed = time.perf_counter() - t0
                    with lock:
                        statuses[i] = r.status_code
                        if r.status_code == 200:
                            answers[i] = [o["text"] for o in r.json()["outputs"]]
                            latencies.append(elapsed)

        with ThreadPoolExecutor(clients) as pool:
            for future in [pool.submit(client) for _ in range(clients)]:
                future.result()
    wall = time.perf_counter() - start
    metrics = httpx.get(f"{url}/metrics", timeout=10).json()
    return {"wall": wall, "answers": answers, "statuses": statuses, "latencies": sorted(latencies), "metrics": metrics}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--time-limit", type=float, default=180.0, help="seconds per scenario")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads, offline and in the server (OMP_NUM_THREADS); 1 avoids OpenMP "
        "spinning on a shared machine",
    )
    parser.add_argument("--scenarios", default="mixed,per-adapter,sequential,unbatched")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_load.json"))
    args = parser.parse_args()
    if not (1 <= args.clients <= 64 and 1 <= args.requests <= 5000 and 1 <= args.adapters <= 64):
        parser.error("keep it bounded: clients 1-64, requests 1-5000, adapters 1-64")

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, adapters = build(Path(tmp), args.adapters, args.d_model, args.layers)
        requests = workload(args.requests, args.adapters, args.seed)
        t0 = time.perf_counter()
        expected = offline_answers(model_dir, adapters, requests, args.max_new_tokens)
        offline_s = time.perf_counter() - t0
        base = {
            "model": str(model_dir),
            "adapters_dir": str(adapters),
            "task": "seq2seq",
            "max_batch_size": args.max_batch_size,
            "max_wait_ms": args.max_wait_ms,
            "max_queue": 4096,
            "request_timeout_s": 120.0,
            "max_new_tokens": max(args.max_new_tokens, 1),
            "device": "cpu",
        }
        everything = [list(range(len(requests)))]
        by_adapter = [
            [i for i, (a, _) in enumerate(requests) if a == name] for name in sorted({a for a, _ in requests})
        ]
        scenarios = {
            "mixed": ({}, everything),
            "per-adapter": ({"mix_adapters": False}, everything),
            "sequential": ({}, by_adapter),
            "unbatched": ({"max_batch_size": 1}, everything),
        }
        rows = []
        for name in [s.strip() for s in args.scenarios.split(",") if s.strip()]:
            overrides, order = scenarios[name]
            proc, url = start_server({**base, **overrides}, args.threads)
            try:
                run = drive(url, requests, order, args.clients, args.max_new_tokens, args.time_limit)
            finally:
                proc.terminate()
                proc.wait(30)
            answered = sum(a is not None for a in run["answers"])
            one_answer = sum(a is not None and len(a) == 1 for a in run["answers"])
            correct = sum(a is not None and a == [e] for a, e in zip(run["answers"], expected))
            batches = run["metrics"]["batches"]
            rows.append(
                {
                    "scenario": name,
                    "requests": len(requests),
                    "answered": answered,
                    "one_answer": one_answer,
                    "correct": correct,
                    "errors": sorted({s for s in run["statuses"] if s not in (None, 200)}),
                    "wall_s": round(run["wall"], 3),
                    "throughput_rps": round(answered / run["wall"], 2),
                    "p50_ms": round(1000 * pct(run["latencies"], 0.5), 1) if run["latencies"] else None,
                    "p99_ms": round(1000 * pct(run["latencies"], 0.99), 1) if run["latencies"] else None,
                    "batches": batches["count"],
                    "mean_batch": batches["mean_size"],
                    "max_batch": batches["max_size"],
                    "multi_adapter_batches": batches["multi_adapter"],
                    "server_busy_s": batches["busy_s"],
                }
            )
            print(f"  {name}: {rows[-1]['throughput_rps']} req/s, {correct}/{len(requests)} correct", flush=True)

    header = [
        "scenario",
        "throughput_rps",
        "p50_ms",
        "p99_ms",
        "batches",
        "mean_batch",
        "multi_adapter_batches",
        "correct",
        "wall_s",
    ]
    print()
    print(" | ".join(f"{h:>14}" for h in header))
    for row in rows:
        cells = {**row, "correct": f"{row['correct']}/{row['requests']}"}
        print(" | ".join(f"{str(cells[h]):>14}" for h in header))
    result = {
        "settings": vars(args),
        "offline_seconds": round(offline_s, 3),
        "scenarios": rows,
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {out}")
    if any(r["correct"] != r["requests"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
