"""What logprobs and structured output cost (issue 22): the same streamed-free completions served plain, with
`logprobs: 5`, and with a JSON schema, in one run on one server.

A fresh `ia3 serve` (SmolLM2-135M by default, 8 adapters with vectors 1 + 0.1 N(0, 1)) answers `--requests`
completions of PhraseBank sentences + "\\nSentiment:" from `--clients` concurrent clients, greedy, `max_tokens`
`--max-new`, three times: plain, `logprobs: 5`, and `response_format` json_schema ({"sentiment": one of three
labels}). Reported: completion tokens, wall time, seconds per generated token, and each variant's seconds per token
over plain's (targets: logprobs <= 1.05, JSON schema <= 1.15). Prints a table and writes JSON (default
bench/results/serve_openai_overhead.json). Run it alone on a quiet machine.

Usage: python bench/serve_openai_overhead.py [--model smollm2|t5] [--threads 2] [--clients 16] [--requests 64]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_report  # noqa: E402
from serve_load import ROOT, build, start_server, workload  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {"sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]}},
    "required": ["sentiment"],
}
VARIANTS = {
    "plain": {},
    "logprobs_5": {"logprobs": 5},
    "json_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}},
}


async def run_variant(port: int, texts: list[tuple[str, str]], clients: int, max_new: int, extra: dict) -> dict:
    """Every request once (`clients` at a time); completion tokens, wall time, failures."""
    queue = list(texts)
    tokens = failures = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, failures
        while queue:
            adapter, text = queue.pop()
            body = {"model": adapter, "prompt": text + "\nSentiment:", "max_tokens": max_new, "temperature": 0}
            r = await http.post("/v1/completions", json={**body, **extra})
            if r.status_code != 200:
                failures += 1
                continue
            tokens += r.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as http:
        await asyncio.gather(*[client(http) for _ in range(clients)])
    wall = time.perf_counter() - start
    return {"tokens": tokens, "wall_s": round(wall, 2), "s_per_token": wall / max(tokens, 1), "failures": failures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["smollm2", "t5"], default="smollm2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-new", type=int, default=16)
    parser.add_argument("--dtype", default="auto", help="the server's --dtype")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_openai_overhead.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        name, task, adapters = build(Path(tmp), args.model, 8)
        texts = [(r.adapter, r.text) for r in workload(args.requests, 8, 1, 1, seed=0)]
        config = {"model": name, "adapters_dir": str(adapters), "task": task, "device": "cpu", "dtype": args.dtype}
        proc, port = start_server(config, args.threads)
        try:
            asyncio.run(run_variant(port, texts[:4], 4, args.max_new, {}))  # warm-up
            for variant, extra in VARIANTS.items():
                rows[variant] = asyncio.run(run_variant(port, texts, args.clients, args.max_new, extra))
                print(variant, rows[variant], flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    plain = rows["plain"]["s_per_token"]
    for row in rows.values():
        row["vs_plain"] = round(row["s_per_token"] / plain, 3)
        row["s_per_token"] = round(row["s_per_token"], 4)
    print("\n| variant | completion tokens | wall (s) | s / token | vs plain | failures |")
    print("|---|---|---|---|---|---|")
    for variant, r in rows.items():
        print(f"| {variant} | {r['tokens']} | {r['wall_s']} | {r['s_per_token']} | {r['vs_plain']} | {r['failures']} |")
    save_report(args.out, {"settings": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
