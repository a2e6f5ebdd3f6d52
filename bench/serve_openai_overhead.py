"""What logprobs and structured output cost (issue 22): the same completions served plain, with `logprobs: 5`, and
with a JSON schema, in one run on one server, each variant generating the same number of tokens.

A fresh `ia3 serve` (SmolLM2-135M by default, 8 adapters with vectors 1 + 0.1 N(0, 1)) answers `--requests`
completions of PhraseBank sentences + "\\nSentiment:" from `--clients` concurrent clients, greedy, `max_tokens`
`--max-new`, three times: plain, `logprobs: 5`, and `response_format` json_schema.

Equal work. Every variant must generate exactly `--requests` x `--max-new` tokens, or seconds per token would
compare answers of different lengths (a short answer carries more of its prompt's prefill per token):

* plain and logprobs send `ignore_eos: true`, so no answer ends early at EOS;
* the schema (`SCHEMA`) is an object whose second field is a free string of at least 100,000 characters:
  `{"sentiment": "<one of three labels>", "reason": "...`. The grammar cannot finish within `max_tokens`, so each
  answer runs to the limit, and it still exercises the structural tokens (the key names, the enum) before the free
  text. The tokens masked per step are those of a real schema: a few allowed at the structure, most at the text;
* each variant's completion tokens are checked against `--requests` x `--max-new` (the `equal_work` column); a
  variant with fewer is reported, not hidden.

Each variant is warmed up first with a few requests of its own (the first structured request builds xgrammar's
view of the vocabulary and compiles the schema, a one-time cost per server and per schema), so the rows compare
steady-state decoding. Reported per variant: completion tokens, wall time, seconds per token (wall), the server
process's CPU seconds per token (its user + system time from /proc, steadier than wall on a shared machine), and
both over plain's. Targets: logprobs <= 1.05 x plain, JSON schema <= 1.15 x plain (seconds per token). Prints a
table and writes JSON (default bench/results/serve_openai_overhead.json). Run it alone on a quiet machine.

Usage: python bench/serve_openai_overhead.py [--model smollm2|t5] [--threads 2] [--clients 16] [--requests 64]
           [--max-new 32]
(`--model t5`: the tests' tiny T5 with a word-level vocabulary, which has no `{` or `"` token and so cannot write
JSON: the server refuses the schema with 400, and the json_schema row is skipped.)
"""

from __future__ import annotations

import argparse
import asyncio
import os
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
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
        "reason": {"type": "string", "minLength": 100_000},  # never closes within max_tokens
    },
    "required": ["sentiment", "reason"],
    "additionalProperties": False,
}
VARIANTS = {
    "plain": {"ignore_eos": True},
    "logprobs_5": {"logprobs": 5, "ignore_eos": True},
    "json_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}},
}


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` so far (Linux /proc); None where there is no /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_variant(port: int, texts: list[tuple[str, str]], clients: int, max_new: int, extra: dict) -> dict:
    """Every request once (`clients` at a time); completion tokens, wall time, failures (with the first error)."""
    queue = list(texts)
    tokens = failures = 0
    error = None

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, failures, error
        while queue:
            adapter, text = queue.pop()
            body = {"model": adapter, "prompt": text + "\nSentiment:", "max_tokens": max_new, "temperature": 0}
            r = await http.post("/v1/completions", json={**body, **extra})
            if r.status_code != 200:
                failures += 1
                error = error or f"{r.status_code} {r.text[:300]}"
                continue
            tokens += r.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as http:
        await asyncio.gather(*[client(http) for _ in range(clients)])
    wall = time.perf_counter() - start
    return {"tokens": tokens, "wall_s": wall, "failures": failures, "error": error}


def measure(port: int, pid: int, texts: list[tuple[str, str]], args: argparse.Namespace) -> dict[str, dict]:
    """Each variant after its own warm-up, then `args.rounds` rounds over the variants in alternating order (A B C,
    C B A, ...), summed: tokens, wall, the server's CPU seconds, whether the work was equal."""
    variants = [v for v in VARIANTS if not (v == "json_schema" and args.model == "t5")]
    if len(variants) < len(VARIANTS):
        print("json_schema: skipped (the tiny T5's word-level vocabulary cannot spell JSON)", flush=True)
    for variant in variants:
        asyncio.run(run_variant(port, texts[:4], 4, args.max_new, VARIANTS[variant]))  # warm-up (grammar, compile)
    rows: dict[str, dict] = {
        v: {"tokens": 0, "wall_s": 0.0, "failures": 0, "error": None, "cpu_s": 0.0} for v in variants
    }
    for turn in range(args.rounds):
        for variant in variants if turn % 2 == 0 else variants[::-1]:
            cpu = cpu_seconds(pid)
            run = asyncio.run(run_variant(port, texts, args.clients, args.max_new, VARIANTS[variant]))
            after = cpu_seconds(pid)
            row = rows[variant]
            row["tokens"] += run["tokens"]
            row["wall_s"] += run["wall_s"]
            row["failures"] += run["failures"]
            row["error"] = row["error"] or run["error"]
            row["cpu_s"] = None if None in (cpu, after, row["cpu_s"]) else row["cpu_s"] + after - cpu
            print(turn, variant, run, flush=True)
    for row in rows.values():
        row["equal_work"] = row["tokens"] == len(texts) * args.max_new * args.rounds
    return rows


def table(rows: dict[str, dict]) -> None:
    """Ratios to plain (seconds per token, wall and CPU); print the markdown table."""
    plain = rows["plain"]
    for row in rows.values():
        row["s_per_token"] = row["wall_s"] / max(row["tokens"], 1)
        row["cpu_s_per_token"] = None if row["cpu_s"] is None else row["cpu_s"] / max(row["tokens"], 1)
    for row in rows.values():
        row["vs_plain"] = round(row["s_per_token"] / plain["s_per_token"], 3)
        cpu, base = row["cpu_s_per_token"], plain["cpu_s_per_token"]
        row["cpu_vs_plain"] = None if cpu is None or not base else round(cpu / base, 3)
    print(
        "\n| variant | completion tokens | equal work | wall (s) | s / token | vs plain | CPU s / token | CPU vs plain |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for variant, r in rows.items():
        cpu = "-" if r["cpu_s_per_token"] is None else f"{r['cpu_s_per_token']:.4f}"
        print(
            f"| {variant} | {r['tokens']} | {r['equal_work']} | {r['wall_s']:.2f} | {r['s_per_token']:.4f} "
            f"| {r['vs_plain']} | {cpu} | {r['cpu_vs_plain']} |"
        )
    for variant, r in rows.items():
        if r["failures"]:
            print(f"{variant}: {r['failures']} failed requests, the first: {r['error']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["smollm2", "t5"], default="smollm2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-new", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the variants, the order alternating")
    parser.add_argument("--dtype", default="auto", help="the server's --dtype")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_openai_overhead.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        name, task, adapters = build(Path(tmp), args.model, 8)
        texts = [(r.adapter, r.text) for r in workload(args.requests, 8, 1, 1, seed=0)]
        config = {"model": name, "adapters_dir": str(adapters), "task": task, "device": "cpu", "dtype": args.dtype}
        proc, port = start_server(config, args.threads)
        try:
            rows = measure(port, proc.pid, texts, args)
        finally:
            proc.terminate()
            proc.wait(60)
    table(rows)
    save_report(args.out, {"settings": vars(args), "schema": SCHEMA, "rows": rows})


if __name__ == "__main__":
    main()
