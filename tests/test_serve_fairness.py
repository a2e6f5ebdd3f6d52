"""Issue 19, "no request can stall the others": fair admission to the decode batch (round-robin over clients, a row
cap per request), per-client connection caps, a bounded log under file-descriptor exhaustion, and smaller faults
(shutdown answers, tiny temperatures, token counters of cut-off requests, adapter symlinks, error paths)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from live_server import LiveServer  # noqa: E402
from serve_setup import AUTO, TEXTS, Setup, one_torch_thread, serve_config  # noqa: E402, F401

from ia3 import BASE_ADAPTER  # noqa: E402
from ia3.families import DecodeState  # noqa: E402
from ia3.serve import ServeConfig  # noqa: E402
from ia3.serve.decoding import Decoder, Row, Sampling  # noqa: E402
from ia3.serve.http import OncePerInterval, listen_backlog  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
OTHER_HOST = "127.0.0.2"  # Linux routes all of 127/8 to loopback: a second client address on one machine


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    return Setup(tmp_path_factory.mktemp("serve-fair"), "causal")


def _config(causal: Setup, **overrides) -> ServeConfig:
    return serve_config(causal, **{"max_wait_ms": 5, **overrides})


@pytest.fixture(scope="module")
def server(causal):
    srv = LiveServer(_config(causal))
    yield srv
    srv.close()


def _client(url: str, host: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=30, transport=httpx.HTTPTransport(local_address=host))


# -- fair admission ----------------------------------------------------------------------------------------------
def _decoder(max_rows: int, per_request: int, prefill: int = 4096) -> Decoder:
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=1)
    return Decoder(
        torch.nn.Module(), tokenizer, torch.device("cpu"), None, DecodeState, max_rows, prefill, None, None, per_request
    )


def _rows(client: str, request: int, count: int, prompt: int = 3) -> list[Row]:
    return [Row([5] * prompt, "a", 4, client=client, request=request, index=i) for i in range(count)]


def test_admission_is_round_robin_over_clients_with_a_row_cap_per_request():
    decoder = _decoder(max_rows=8, per_request=4)
    big = _rows("attacker", 1, 32)  # one request filling the batch four times over
    decoder.add(big)
    decoder.add(_rows("attacker", 2, 2))
    decoder.add(_rows("alice", 3, 1))
    decoder.add(_rows("bob", 4, 2))
    first = decoder._admit()
    who = [(r.client, r.request) for r in first]
    assert who[:3] == [("attacker", 1), ("alice", 3), ("bob", 4)]  # one row per client per turn
    assert who.count(("alice", 3)) == 1 and who.count(("bob", 4)) == 2
    assert who.count(("attacker", 1)) <= 4 and len(first) == 8  # the cap holds; the free rows are used
    decoder.running = list(first)
    assert decoder._admit() == []  # full
    decoder.running = [r for r in first if r.client != "bob"]  # bob's rows finish: two free rows
    again = decoder._admit()  # request 1 has its 4 rows running: only request 2's last row may join
    assert [(r.client, r.request) for r in again] == [("attacker", 2)]


def test_admission_keeps_the_prefill_budget():
    decoder = _decoder(max_rows=8, per_request=8, prefill=10)
    decoder.add(_rows("x", 1, 4, prompt=4))
    assert len(decoder._admit()) == 2  # 4 + 4 tokens; a third would pass 10
    decoder = _decoder(max_rows=8, per_request=8, prefill=10)
    decoder.add(_rows("x", 1, 2, prompt=30))
    assert len(decoder._admit()) == 1  # a longer prompt joins alone


def test_tiny_temperatures_are_greedy():
    assert Sampling(1e-50).greedy and Sampling(0.0).greedy and Sampling(9e-5).greedy
    assert not Sampling(1e-3).greedy


def test_an_innocent_request_is_admitted_beside_a_big_one(causal):
    """One client's request of 8 rows (the whole batch) and another client's small request arrive together: the
    big one gets at most half the rows, the small one is admitted at once and answered long before the big one;
    every answer equals the same request run alone (greedy)."""
    srv = LiveServer(_config(causal, max_batch_size=8))
    big_texts = [TEXTS[i % 4] + " x" * i for i in range(8)]
    try:
        srv.service.batcher.pause()  # both arrive before the first step
        with _client(srv.url, OTHER_HOST) as other, ThreadPoolExecutor(2) as pool:
            body = {"adapter": "a", "inputs": big_texts, "parameters": {"max_new_tokens": 24}}
            big = pool.submit(srv.post, "/v1/generate", json=body)
            decoder = srv.service.engine.decoder
            while decoder.counts()[1] < 8:
                time.sleep(0.001)
            small_body = {"adapter": "b", "inputs": TEXTS[1], "parameters": {"max_new_tokens": 3}}
            small = pool.submit(other.post, "/v1/generate", json=small_body)
            while decoder.counts()[1] < 9:
                time.sleep(0.001)
            srv.service.batcher.resume()
            answer = small.result()
            assert answer.status_code == 200 and not big.done(), "the small request waited for the big one"
            assert answer.json()["outputs"][0]["text"] == causal.generate("b", TEXTS[1], 3)
            outputs = big.result().json()["outputs"]
        assert [o["text"] for o in outputs] == [causal.generate("a", t, 24) for t in big_texts]
        assert decoder.stats()["max_rows"] <= 5  # 4 rows of the big request at most, and the small one
    finally:
        srv.close()


# -- connections -------------------------------------------------------------------------------------------------
def test_one_address_cannot_hold_every_connection(causal):
    srv = LiveServer(_config(causal, max_connections=10, max_connections_per_client=2))
    host, port = srv.url.removeprefix("http://").split(":")
    try:
        held = [socket.create_connection((host, int(port)), timeout=10) for _ in range(2)]
        try:
            time.sleep(0.1)
            with socket.create_connection((host, int(port)), timeout=10) as extra:
                answer = extra.recv(4096)
                assert answer.startswith(b"HTTP/1.1 503") and b"from this address" in answer, answer
            with _client(srv.url, OTHER_HOST) as other:  # another address is served meanwhile
                r = other.post("/v1/generate", json={"adapter": "a", "inputs": "Sales"})
                assert r.status_code == 200, r.text
        finally:
            for sock in held:
                sock.close()
        assert srv.app.state.protocol.refused_per_client == 1
    finally:
        srv.close()


def test_600_keyless_sockets_leave_a_keyed_client_answered(causal):
    """One address without the API key keeps 600 sockets open (reopening each one the server closes) at the
    default connection limits; a client with the key, from another address, gets every answer."""
    srv = LiveServer(_config(causal, api_key="sesame"))
    host, port = srv.url.removeprefix("http://").split(":")
    stop = threading.Event()
    opened = [0]

    def flood():
        held: list[socket.socket] = []
        try:
            while not stop.is_set():
                held = [s for s in held if s.fileno() >= 0]
                while len(held) < 600 and not stop.is_set():
                    try:
                        sock = socket.create_connection((host, int(port)), timeout=5, source_address=(OTHER_HOST, 0))
                    except OSError:
                        break
                    held.append(sock)
                    opened[0] += 1
                for sock in list(held):  # the ones the server refused or closed are reopened
                    sock.setblocking(False)
                    try:
                        if sock.recv(4096) == b"":
                            sock.close()
                    except BlockingIOError:
                        pass
                    except OSError:
                        sock.close()
                time.sleep(0.05)
        finally:
            for sock in held:
                sock.close()

    flooder = threading.Thread(target=flood, daemon=True)
    try:
        flooder.start()
        deadline = time.monotonic() + 30
        while opened[0] < 600:
            assert time.monotonic() < deadline, opened
            time.sleep(0.05)
        with _client(srv.url, "127.0.0.3") as keyed:
            answers = [
                keyed.post(
                    "/v1/completions",
                    headers={"Authorization": "Bearer sesame"},
                    json={"model": "a", "prompt": TEXTS[i % len(TEXTS)], "max_tokens": 2, "temperature": 0},
                )
                for i in range(20)
            ]
        assert [r.status_code for r in answers] == [200] * 20, [r.text for r in answers if r.status_code != 200]
        assert srv.app.state.protocol.refused_per_client > 0  # the flood was there, beyond its address's share
    finally:
        stop.set()
        flooder.join(10)
        srv.close()


def test_backlog_cap_and_file_limit_fit_together():
    assert listen_backlog(512, None) == (2048, 512)
    assert listen_backlog(512, 20000) == (2048, 512)
    backlog, cap = listen_backlog(512, 1024)
    assert cap == 512 and 512 + backlog + 128 <= 1024
    backlog, cap = listen_backlog(512, 256)  # the hard limit is too low: the cap comes down
    assert backlog == 16 and cap + backlog + 128 <= 256


def test_descriptor_exhaustion_is_logged_once_a_second():
    limit = OncePerInterval(1.0)
    err = OSError(24, "Too many open files")
    records = [
        logging.LogRecord("asyncio", logging.ERROR, "x", 1, "socket.accept() out of system resource", (), None)
        for _ in range(50)
    ]
    for record in records[:25]:
        record.exc_info = (OSError, err, None)
    passed = [r for r in records if limit.filter(r)]
    assert len(passed) == 1 and passed[0].exc_info is None and "Too many open files" in passed[0].getMessage()
    assert limit.suppressed == 49
    other = logging.LogRecord("asyncio", logging.ERROR, "x", 1, "something else", (), None)
    assert limit.filter(other)
    limit._last -= 1.0
    assert limit.filter(records[0]) and "49 more like it" in records[0].getMessage()


SERVER_SCRIPT = """
import sys
from ia3.serve import ServeConfig
from ia3.serve.app import run
config = ServeConfig(model=sys.argv[1], task="causal", max_connections=512, max_connections_per_client=1000)
run(config, port=int(sys.argv[2]), log_level="info")
"""


@pytest.mark.slow
def test_a_socket_flood_under_a_low_file_limit_keeps_the_log_small(causal, tmp_path):
    """A server under `ulimit -n 256` (below what --max-connections 512 needs) flooded by 600 sockets for 3 s: a
    line per second at most about running out of descriptors, and it answers afterwards."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = tmp_path / "server.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVER_SCRIPT, str(causal.model_dir), str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)),
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        stop = time.monotonic() + 3

        def flood() -> None:
            held: list[socket.socket] = []
            while time.monotonic() < stop:
                with contextlib.suppress(OSError):
                    held.append(socket.create_connection(("127.0.0.1", port), timeout=1))
                if len(held) >= 100:
                    for s in held[:50]:
                        s.close()
                    held = held[50:]
            for s in held:
                s.close()

        threads = [threading.Thread(target=flood) for _ in range(6)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.monotonic() - started
        time.sleep(1.5)
        r = httpx.post(url + "/v1/generate", json={"adapter": "__base__", "inputs": "Sales"}, timeout=30)
        assert r.status_code == 200, r.text
        metrics = httpx.get(url + "/metrics", timeout=10).text
        refused = next(line for line in metrics.splitlines() if line.startswith("ia3_connections_refused_total"))
        assert float(refused.split()[-1]) > 0, "the flood must pass the connection cap"
    finally:
        proc.terminate()
        proc.wait(15)
    text = log_path.read_text(errors="replace")
    assert "lowered to" in text  # the cap came down to what the descriptors allow
    emfile = [line for line in text.splitlines() if "Too many open files" in line]
    assert len(emfile) <= seconds + 3, emfile[:5]
    assert len(text) < 200_000


# -- smaller faults ----------------------------------------------------------------------------------------------
def test_a_request_cut_by_the_shutdown_gets_the_json_503(causal, caplog):
    srv = LiveServer(_config(causal, shutdown_timeout_s=1.0))
    try:
        srv.service.batcher.pause()  # the request never finishes on its own
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(srv.post, "/v1/generate", json={"adapter": "a", "inputs": "Sales"})
            while srv.service.batcher.depth() == 0:
                time.sleep(0.01)
            with caplog.at_level("WARNING"):
                srv.server.should_exit = True
                r = pending.result()
        assert r.status_code == 503 and r.json()["error"]["type"] == "shutting_down", r.text
        assert not [rec for rec in caplog.records if rec.exc_info], "no traceback"
    finally:
        srv.close()


def test_tiny_temperatures_decode_greedily(server, causal):
    for temperature in (1e-50, 1e-46, 1e-5):
        body = {"model": "a", "prompt": TEXTS[0], "max_tokens": 6, "temperature": temperature}
        r = server.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        body = {"adapter": "a", "inputs": TEXTS[0], "parameters": {"max_new_tokens": 6, "do_sample": True}}
        body["parameters"]["temperature"] = temperature
        native = server.post("/v1/generate", json=body)
        assert native.status_code == 200, native.text
        assert native.json()["outputs"][0]["text"] == causal.generate("a", TEXTS[0], 6)
        body["parameters"]["num_beams"] = 2  # the static path
        assert server.post("/v1/generate", json=body).status_code == 200


def test_tokens_of_a_timed_out_request_are_counted(causal):
    srv = LiveServer(_config(causal, request_timeout_s=1.0, max_new_tokens=120))
    decoder = srv.service.engine.decoder
    step = decoder.step

    def slow_step() -> None:
        time.sleep(0.05)
        step()

    decoder.step = slow_step
    try:
        body = {"adapter": "c", "inputs": TEXTS[2], "parameters": {"max_new_tokens": 120}}
        assert srv.post("/v1/generate", json=body).status_code == 504
        time.sleep(0.2)
        tokens = srv.service.metrics.completion_tokens["c"]
        assert tokens > 0, "the tokens generated before the deadline must count"
    finally:
        srv.close()


def test_adapter_symlinks_and_error_paths(server, causal, tmp_path):
    root = causal.adapters
    shutil.copytree(root / "a", root / "group" / "inner")
    (root / "alias").symlink_to(root / "group" / "inner")  # inside the adapters folder: fine
    r = server.post("/v1/adapters/alias")
    assert r.status_code == 201, r.text
    leak = root / "leak"
    leak.mkdir()
    shutil.copy(root / "a" / "adapter_config.json", leak)
    (leak / "adapter_model.safetensors").symlink_to(causal.spare / "late" / "adapter_model.safetensors")
    r = server.post("/v1/adapters/leak")
    assert r.status_code == 403 and "leak/adapter_model.safetensors" in r.json()["error"]["message"], r.text
    dangling = root / "dangling"
    dangling.mkdir()
    shutil.copy(root / "a" / "adapter_config.json", dangling)
    (dangling / "adapter_model.safetensors").symlink_to(tmp_path / "missing.safetensors")
    assert server.post("/v1/adapters/dangling").status_code == 403
    broken = root / "broken"
    broken.mkdir()
    shutil.copy(root / "a" / "adapter_config.json", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    r = server.post("/v1/adapters/broken")
    assert r.status_code in (404, 422), r.text
    assert str(root) not in r.text and str(root.resolve()) not in r.text, r.text
    bad_config = root / "badconfig"
    shutil.copytree(root / "a", bad_config)
    (bad_config / "adapter_config.json").write_text("{not json")
    r = server.post("/v1/adapters/badconfig")
    assert r.status_code == 422 and str(root.resolve()) not in r.text, r.text


# -- chunked prefill ---------------------------------------------------------------------------------------------
def test_a_long_prompt_is_prefilled_in_pieces_while_running_rows_decode(causal):
    """A prompt longer than the step's prefill budget is prefilled a piece per step; every step also decodes the
    running row, and both rows' greedy tokens equal each run alone."""
    from ia3.families import CausalDecodeState

    model = AUTO["causal"].from_pretrained(causal.model_dir).eval()
    tok = causal.tokenizer
    decoder = Decoder(
        model, tok, torch.device("cpu"), lambda adapters: contextlib.nullcontext(), CausalDecodeState, 8, 4
    )
    short = Row(tok("Net sales fell", add_special_tokens=False)["input_ids"], BASE_ADAPTER, 16)
    long_ids = tok(" ".join(TEXTS * 3), add_special_tokens=False)["input_ids"]
    assert len(long_ids) > 12
    long = Row(long_ids, BASE_ADAPTER, 4)
    decoder.add([short])
    with torch.inference_mode():
        decoder.step()
        decoder.add([long])
        pieces = 0
        while decoder.partial is not None or long in decoder.waiting:
            before = len(short.tokens)
            decoder.step()
            pieces += 1
            assert short.finish_reason is not None or len(short.tokens) == before + 1  # decoded every step
        assert pieces == -(-len(long_ids) // 4)  # 4 prompt tokens a step
        while decoder.busy():
            decoder.step()
    for row in (short, long):
        alone = causal.generate(BASE_ADAPTER, tok.decode(row.prompt), max_new_tokens=row.max_new_tokens)
        assert row.text == alone


def test_chunked_prefill_over_http_equals_runs_alone(causal):
    """Long prompts and short ones, mixed adapters, a prefill budget of 8 tokens a step: every answer equals the
    same request run alone."""
    srv = LiveServer(_config(causal, max_prefill_tokens=8))
    try:
        long_text = " ".join(TEXTS * 2)
        jobs = [(["a", "b", BASE_ADAPTER][i % 3], [long_text, TEXTS[i % 4]][i % 2]) for i in range(6)]
        with ThreadPoolExecutor(6) as pool:
            answers = list(
                pool.map(
                    lambda job: srv.post(
                        "/v1/generate",
                        json={"adapter": job[0], "inputs": job[1], "parameters": {"max_new_tokens": 5}},
                    ),
                    jobs,
                )
            )
        for (adapter, text), r in zip(jobs, answers):
            assert r.status_code == 200, r.text
            assert r.json()["outputs"][0]["text"] == causal.generate(adapter, text, max_new_tokens=5)
    finally:
        srv.close()


# -- one cost model ----------------------------------------------------------------------------------------------
def test_prompt_tokens_and_labels_count_in_the_request_budget(causal):
    """Prompt tokens count (x n), so many long prompts with max_tokens 1 are refused up front; classification counts
    inputs and their labels; a request within the budget is answered."""
    srv = LiveServer(_config(causal, max_request_tokens=40))
    try:
        long_text = " ".join(TEXTS)
        n_tokens = len(causal.tokenizer(long_text, add_special_tokens=False)["input_ids"])
        assert 2 * (n_tokens + 1) > 40 >= n_tokens + 1
        r = srv.post("/v1/completions", json={"model": "a", "prompt": [long_text] * 2, "max_tokens": 1})
        assert r.status_code == 413 and "--max-request-tokens" in r.json()["error"]["message"], r.text
        r = srv.post("/v1/completions", json={"model": "a", "prompt": long_text, "max_tokens": 1})
        assert r.status_code == 200, r.text
        r = srv.post("/v1/completions", json={"model": "a", "prompt": long_text, "max_tokens": 1, "n": 2})
        assert r.status_code == 413, r.text
        labels = [f"label number {i}" for i in range(12)]
        body = {"adapter": "a", "inputs": ["Sales"] * 3, "parameters": {"labels": labels}}
        r = srv.post("/v1/classify", json=body)
        assert r.status_code == 413 and "labels" in r.json()["error"]["message"], r.text
        body["parameters"]["labels"] = labels[:2]
        assert srv.post("/v1/classify", json=body).status_code == 200
    finally:
        srv.close()


def test_unset_budgets_come_from_the_measured_speed(server):
    budgets = server.service.engine.budgets
    speed = budgets.speed
    assert speed is not None and speed.prefill_tps > 0 and speed.decode_tps > 0
    cfg = server.service.config
    rate = min(speed.prefill_tps, speed.decode_tps)
    floor = server.service.engine.max_input_tokens + cfg.max_new_tokens
    assert budgets.request_tokens == max(floor, int(rate * cfg.request_timeout_s * 0.5))
    assert budgets.batch_tokens == budgets.prefill_tokens  # static work in slices no longer than a step's prefill
    assert budgets.step_tokens == max(budgets.batch_tokens, int(speed.prefill_tps))  # an uncut step: about 1 s
    assert 64 <= budgets.prefill_tokens <= 4096 and budgets.prefill_tokens % 16 == 0
    assert server.service.engine.decoder.max_prefill_tokens == budgets.prefill_tokens
    assert "measured" in server.service.summary()


@pytest.mark.parametrize("shape", ["prefill", "classify", "beams", "one_beam_search"])
def test_innocent_streams_finish_beside_a_heavy_request(causal, shape):
    """A heavy request the budgets admit (many long prompts; many inputs x labels; long inputs with beams; one
    long beam search, a single `generate` call) runs in bounded pieces between decode steps: an innocent stream
    from another client, sent after it, is answered correctly before the heavy request is done, and the heavy
    request is answered too, as it is alone."""
    srv = LiveServer(_config(causal, max_prefill_tokens=16, max_batch_tokens=64, max_new_tokens=24))
    long_text = " ".join(TEXTS * 3)
    heavy = {
        "prefill": ("/v1/completions", {"model": "a", "prompt": [long_text] * 24, "max_tokens": 1, "temperature": 0}),
        "classify": (
            "/v1/classify",
            {"adapter": "a", "inputs": [long_text] * 48, "parameters": {"labels": [f"label {i}" for i in range(16)]}},
        ),
        "beams": (
            "/v1/generate",
            {"adapter": "a", "inputs": [long_text] * 24, "parameters": {"num_beams": 4, "max_new_tokens": 8}},
        ),
        "one_beam_search": (  # one batch: it hands the model back to the decoder after each of its steps
            "/v1/generate",
            {"adapter": "b", "inputs": [TEXTS[0]], "parameters": {"num_beams": 4, "max_new_tokens": 24}},
        ),
    }[shape]
    finished: dict[str, float] = {}
    beam_steps: list[int] = []  # at each step of the beam search: the decode steps run so far
    if shape == "one_beam_search":  # each of the 4 beams' steps slowed so that it cannot end before the innocent

        def slow_beams(module, args, kwargs):
            if kwargs["input_ids"].shape[0] == 4:
                beam_steps.append(srv.service.engine.decoder.steps)
                time.sleep(0.02)

        srv.service.engine.base.register_forward_pre_hook(slow_beams, with_kwargs=True)

    def send_heavy():
        r = srv.post(heavy[0], json=heavy[1])
        finished["heavy"] = time.monotonic()
        return r

    def send_innocent():
        with _client(srv.url, OTHER_HOST) as client:
            r = client.post(
                "/v1/completions",
                json={"model": "b", "prompt": TEXTS[1], "max_tokens": 4, "temperature": 0, "stream": True},
            )
        finished["innocent"] = time.monotonic()
        return r

    try:
        with ThreadPoolExecutor(2) as pool:
            heavy_future = pool.submit(send_heavy)
            deadline = time.monotonic() + 30
            while srv.service.batcher.depth() == 0:  # the heavy request is in before the innocent one
                assert time.monotonic() < deadline
                time.sleep(0.002)
            innocent = pool.submit(send_innocent).result()
            heavy_response = heavy_future.result()
        assert heavy_response.status_code == 200, heavy_response.text
        assert innocent.status_code == 200, innocent.text
        pieces = [
            json.loads(line[6:])["choices"][0]["text"]
            for line in innocent.text.splitlines()
            if line.startswith("data: {")
        ]
        alone = srv.post("/v1/completions", json={"model": "b", "prompt": TEXTS[1], "max_tokens": 4, "temperature": 0})
        assert "".join(pieces) == alone.json()["choices"][0]["text"]  # the same request alone
        assert finished["innocent"] < finished["heavy"]
        if shape == "one_beam_search":  # the innocent's decode steps ran between two steps of the beam search
            assert beam_steps[-1] > beam_steps[0], beam_steps
        again = srv.post(heavy[0], json=heavy[1]).json()  # the heavy request alone
        answer = "choices" if shape == "prefill" else "outputs"
        assert again[answer] == heavy_response.json()[answer]
    finally:
        srv.close()


def test_a_beam_search_whose_first_step_is_too_long_is_refused_up_front(causal):
    srv = LiveServer(_config(causal))
    try:
        engine = srv.service.engine  # as if the model prefilled 64 tokens a second
        engine.budgets = dataclasses.replace(engine.budgets, step_tokens=64)
        text = " ".join(TEXTS * 2)
        tokens = len(engine.tokenizer(text)["input_ids"])
        assert 16 < tokens <= 64
        r = srv.post("/v1/generate", json={"adapter": "a", "inputs": text, "parameters": {"num_beams": 4}})
        assert r.status_code == 413 and "beam" in r.json()["error"]["message"], r.text
        assert "shorten the input or use fewer beams" in r.json()["error"]["message"]
        ok = srv.post("/v1/generate", json={"adapter": "a", "inputs": TEXTS[0], "parameters": {"num_beams": 2}})
        assert ok.status_code == 200, ok.text
    finally:
        srv.close()
