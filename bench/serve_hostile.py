"""Hostile mix (issue 19): can one request within the server's limits stall the other clients?

A fresh `ia3 serve` (SmolLM2-135M by default, 8 adapters with vectors 1 + 0.1 N(0, 1), default limits and budgets)
gets four innocent streamed chat-style completions (short PhraseBank prompts, `max_tokens` 32, each on its own
connection) beside each hostile shape, sized to the largest the server admits (read from its budgets in
`GET /metrics?format=json`):

* prefill:  many long prompts with `max_tokens` 1 (`/v1/completions`), the prompt tokens filling the request budget;
* classify: many inputs x 64 labels (`/v1/classify`), filling the budget;
* beams:    long inputs with `num_beams` 8 (`/v1/generate`), filling the budget;
* rows:     `n` 8 x 4 prompts x up to 128 new tokens (`/v1/completions`).

Also each shape at 4x its largest admitted size, which must be refused up front with 413 naming the limit.

Reported per shape: the innocents' statuses, their time to first token against the same innocents alone, their
longest gap between two streamed pieces, the hostile request's status and time, and (when it timed out) how long the
worker stayed busy after its 504. Targets (issue 19): every innocent 200, longest gap <= 2 s, TTFT <= 3x alone; the
hostile request finishes or gets 413; the worker free within 1 s of a hostile timeout. Prints a table and writes JSON
(default bench/results/serve_hostile.json). Run it alone on a quiet machine.

Usage: python bench/serve_hostile.py [--model smollm2|t5] [--threads 2] [--shapes prefill,classify,beams,rows]
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
from serve_load import ROOT, build, start_server  # noqa: E402

INNOCENT_TEXTS = [
    "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn in the corresponding period in 2007 .",
    "The company said it will cut 40 jobs in Finland .",
    "Net sales fell by 5 % from the previous accounting period .",
    "The order is valued at some EUR 2 million .",
]
FILLER = "Finnish company reports quarterly results and comments on its outlook for the coming year . "


async def innocent(url: str, text: str, adapter: str, address: str) -> dict:
    """One streamed completion from its own client address (the server admits clients round-robin by address);
    its status, time to first piece and longest gap between pieces."""
    start = time.perf_counter()
    stamps: list[float] = []
    body = {"model": adapter, "prompt": text + "\nSentiment:", "max_tokens": 32, "temperature": 0, "stream": True}
    transport = httpx.AsyncHTTPTransport(local_address=address)
    try:
        async with (
            httpx.AsyncClient(base_url=url, timeout=120, transport=transport) as client,
            client.stream("POST", "/v1/completions", json=body) as r,
        ):
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    stamps.append(time.perf_counter())
            status = r.status_code
    except httpx.HTTPError as err:
        return {"status": None, "error": type(err).__name__}
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {
        "status": status,
        "ttft": stamps[0] - start if stamps else None,
        "max_gap": max(gaps) if gaps else 0.0,
        "pieces": len(stamps),
    }


def hostile_body(shape: str, budget: int, tok, scale: int, step: int | None = None) -> tuple[str, dict]:
    """The hostile request of `shape` at the largest size `budget` (and, for beams, the one-step budget `step`)
    admits (times `scale`)."""
    long_text = (FILLER * 40)[: 4000 - 1]
    long_len = len(tok(long_text, add_special_tokens=False)["input_ids"])
    if shape == "prefill":
        count = max(1, min(64, budget // (long_len + 1))) * scale
        return "/v1/completions", {"model": "adapter0", "prompt": [long_text] * min(count, 64 * scale), "max_tokens": 1}
    if shape == "classify":
        labels = [f"class {i}" for i in range(64)]
        label_tokens = sum(len(tok(" " + x, add_special_tokens=False)["input_ids"]) + 1 for x in labels)
        text = FILLER * 3
        text_len = len(tok(text, add_special_tokens=False)["input_ids"])
        count = max(1, min(64, budget // (text_len + label_tokens))) * scale
        return "/v1/classify", {"adapter": "adapter0", "inputs": [text] * count, "parameters": {"labels": labels}}
    if shape == "beams":  # inputs as long as the budgets let 8 beams of them (and 32 new tokens) run
        longest = min(budget // 8 - 32, (step or budget) // 8) - 8  # 8: room for the tokenizer's special tokens
        length = max(8, min(long_len, longest))
        text = tok.decode(tok(long_text, add_special_tokens=False)["input_ids"][:length])
        count = max(1, min(4, budget // (8 * (length + 40)))) * scale
        params = {"num_beams": 8, "max_new_tokens": 32}
        return "/v1/generate", {"adapter": "adapter0", "inputs": [text] * count, "parameters": params}
    text = FILLER * 2
    text_len = len(tok(text, add_special_tokens=False)["input_ids"])
    new = max(1, min(128, budget // 32 - text_len))
    prompts = 4 if scale == 1 else 8  # 8 x 8 rows: the most `--max-inputs` allows
    return "/v1/completions", {"model": "adapter0", "prompt": [text] * prompts, "n": 8, "max_tokens": new}


async def run_shape(port: int, shape: str | None, budget: int, tok, scale: int = 1, step: int | None = None) -> dict:
    """The innocents (and the hostile request of `shape`, sent 0.3 s before them)."""
    url = f"http://127.0.0.1:{port}"
    limits = httpx.Limits(max_connections=16)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        hostile = None
        started = time.perf_counter()
        if shape is not None:
            path, body = hostile_body(shape, budget, tok, scale, step)
            hostile = asyncio.ensure_future(client.post(path, json=body))
            await asyncio.sleep(0.3)
        innocents = await asyncio.gather(
            *[innocent(url, text, f"adapter{1 + i}", f"127.0.0.{2 + i}") for i, text in enumerate(INNOCENT_TEXTS)]
        )
        row: dict = {"shape": shape or "alone", "scale": scale, "innocents": innocents}
        if hostile is not None:
            response = await hostile
            row["hostile_status"] = response.status_code
            row["hostile_s"] = round(time.perf_counter() - started, 2)
            if response.status_code != 200:
                row["hostile_error"] = response.json().get("error", {}).get("message", "")[:160]
            if response.status_code == 504:  # how long the worker stays busy after the timeout
                answered = time.perf_counter()
                while True:
                    queue = (await client.get("/metrics?format=json")).json()["queue"]
                    if queue["decoding_rows"] == 0 and queue["pending_rows"] == 0:
                        break
                    await asyncio.sleep(0.05)
                row["busy_after_timeout_s"] = round(time.perf_counter() - answered, 2)
        return row


def summarise(row: dict, alone_ttft: float | None) -> dict:
    inn = row["innocents"]
    ttfts = [i["ttft"] for i in inn if i.get("ttft") is not None]
    out = {
        "shape": row["shape"],
        "scale": row["scale"],
        "innocent_200": sum(i["status"] == 200 for i in inn),
        "ttft_max_s": round(max(ttfts), 3) if ttfts else None,
        "ttft_vs_alone": round(max(ttfts) / alone_ttft, 2) if ttfts and alone_ttft else None,
        "max_gap_s": round(max(i.get("max_gap") or 0 for i in inn), 3),
        "hostile_status": row.get("hostile_status"),
        "hostile_s": row.get("hostile_s"),
        "busy_after_timeout_s": row.get("busy_after_timeout_s"),
    }
    if "hostile_error" in row:
        out["hostile_error"] = row["hostile_error"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["smollm2", "t5"], default="smollm2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="auto", help="the server's --dtype")
    parser.add_argument("--shapes", default="prefill,classify,beams,rows")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_hostile.json"))
    args = parser.parse_args()
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if not set(shapes) <= {"prefill", "classify", "beams", "rows"}:
        parser.error("--shapes: prefill, classify, beams, rows")
    from ia3.loading import ModelSource, load_tokenizer
    from ia3.tasks import TASKS

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        name, task, adapters = build(Path(tmp), args.model, 8)
        tok = load_tokenizer(ModelSource(name), TASKS[task])
        config = {"model": name, "adapters_dir": str(adapters), "task": task, "device": "cpu", "dtype": args.dtype}
        proc, port = start_server(config, args.threads)
        try:
            budgets = httpx.get(f"http://127.0.0.1:{port}/metrics?format=json", timeout=30).json()["budgets"]
            print(f"budgets: {budgets}", flush=True)
            asyncio.run(run_shape(port, None, budgets["request_tokens"], tok))  # warm-up (first requests, adapters)
            alone = asyncio.run(run_shape(port, None, budgets["request_tokens"], tok))
            alone_ttft = max(i["ttft"] for i in alone["innocents"] if i.get("ttft") is not None)
            rows.append(summarise(alone, alone_ttft))
            for shape in shapes:
                for scale in (1, 4):
                    row = summarise(
                        asyncio.run(
                            run_shape(port, shape, budgets["request_tokens"], tok, scale, budgets.get("step_tokens"))
                        ),
                        alone_ttft,
                    )
                    rows.append(row)
                    print(row, flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    header = ["shape", "scale", "innocent_200", "ttft_max_s", "ttft_vs_alone", "max_gap_s", "hostile_status",
              "hostile_s", "busy_after_timeout_s"]  # fmt: skip
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(r.get(h)) for h in header) + " |")
    save_report(args.out, {"settings": vars(args), "budgets": budgets, "rows": rows})


if __name__ == "__main__":
    main()
