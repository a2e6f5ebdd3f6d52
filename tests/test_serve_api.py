"""`ia3 serve` for real traffic, on a live loopback server with a tiny causal LM and adapters a, b, c:

* the OpenAI-compatible API with the official `openai` client (models, completions, chat, streaming, `n`, `seed`,
  `stop`, `usage`), answers equal to the offline reference run alone;
* continuous batching: requests with different `max_new_tokens`, adapters and settings share decode steps, and each
  answer equals the same request run alone;
* isolation: a poisoned request batched with innocent ones fails alone; an internal error answers 500 with a request
  id and keeps the connection open;
* limits: header and body deadlines (408), the connection cap, the compute budget, truncation, cancellation when the
  client goes away;
* operations: Prometheus metrics, the startup summary.
"""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from live_server import LiveServer  # noqa: E402
from serve_setup import TEXTS, Setup, one_torch_thread, serve_config  # noqa: E402, F401

from ia3 import BASE_ADAPTER  # noqa: E402
from ia3.serve import ServeConfig  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}Sentiment :{% endif %}"
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    setup = Setup(tmp_path_factory.mktemp("serve-api"), "causal")
    setup.tokenizer.chat_template = CHAT_TEMPLATE
    setup.tokenizer.save_pretrained(setup.model_dir)
    return setup


def _config(causal: Setup, **overrides) -> ServeConfig:
    return serve_config(causal, **{"max_input_chars": 400, **overrides})


@pytest.fixture(scope="module")
def server(causal):
    srv = LiveServer(_config(causal))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


@torch.no_grad()
def reference(causal: Setup, adapter: str, ids: list[int], max_new_tokens: int) -> tuple[str, str]:
    """(text, finish_reason) of greedy decoding of `ids` alone with `adapter` (PEFT-style: set_adapter)."""
    tensor = torch.tensor([ids])
    out = causal._alone(
        adapter,
        lambda: causal.ref.generate(
            input_ids=tensor,
            attention_mask=torch.ones_like(tensor),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=causal.tokenizer.pad_token_id,
        ),
    )[0, len(ids) :].tolist()
    eos = causal.tokenizer.eos_token_id
    reason = "stop" if eos in out else "length"
    out = out[: out.index(eos)] if eos in out else out
    return causal.tokenizer.decode(out, skip_special_tokens=True), reason


def raw_ids(causal: Setup, text: str) -> list[int]:
    return causal.tokenizer(text, add_special_tokens=False)["input_ids"]


# -- the OpenAI API --------------------------------------------------------------------------------------------------
def test_models_list(client, causal):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == str(causal.model_dir) and sorted(ids[1:]) == ["a", "b", "c"]
    assert client.models.retrieve("b").id == "b"
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="nope", prompt="Sales", max_tokens=2)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"


@pytest.mark.parametrize("adapter", ["a", "b", BASE_ADAPTER])
def test_completions_equal_the_reference(client, causal, adapter):
    out = client.completions.create(model=adapter, prompt=TEXTS[0], max_tokens=7, temperature=0)
    text, reason = reference(causal, adapter, raw_ids(causal, TEXTS[0]), 7)
    assert out.choices[0].text == text and out.choices[0].finish_reason == reason
    assert out.usage.prompt_tokens == len(raw_ids(causal, TEXTS[0]))
    assert out.usage.completion_tokens == 7 if reason == "length" else out.usage.completion_tokens < 7
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_completions_list_of_prompts_and_n(client, causal):
    out = client.completions.create(model="a", prompt=TEXTS[:3], max_tokens=5, temperature=0, n=2)
    assert [c.index for c in out.choices] == list(range(6))
    for c in out.choices:
        assert c.text == reference(causal, "a", raw_ids(causal, TEXTS[c.index // 2]), 5)[0]


def test_completions_stream_equals_the_whole_answer(client, causal):
    whole = client.completions.create(model="c", prompt=TEXTS[2], max_tokens=9, temperature=0)
    chunks = list(
        client.completions.create(
            model="c", prompt=TEXTS[2], max_tokens=9, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(pieces) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_completions_use_the_chat_template(client, causal):
    messages = [{"role": "user", "content": TEXTS[1]}]
    out = client.chat.completions.create(model="b", messages=messages, max_tokens=6, temperature=0)
    rendered = causal.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text, reason = reference(causal, "b", raw_ids(causal, rendered), 6)
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == text
    assert out.choices[0].finish_reason == reason
    stream = list(
        client.chat.completions.create(model="b", messages=messages, max_tokens=6, temperature=0, stream=True)
    )
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == text


def test_stop_sequences_cut_the_text(client, causal):
    text, _ = reference(causal, "a", raw_ids(causal, TEXTS[0]), 12)
    words = text.split()
    assert len(words) >= 3, text  # the tiny model writes a few words to stop at
    stop = " " + words[2]
    out = client.completions.create(model="a", prompt=TEXTS[0], max_tokens=12, temperature=0, stop=[stop])
    assert out.choices[0].text == text[: text.index(stop)] and out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="a", prompt=TEXTS[0], max_tokens=12, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == out.choices[0].text


def test_seeded_sampling_is_reproducible_under_load(client, server):
    def sample():
        return [
            c.text
            for c in client.completions.create(
                model="a", prompt=TEXTS[3], max_tokens=8, temperature=1.5, seed=1234, n=3
            ).choices
        ]

    alone = sample()
    assert len(set(alone)) > 1, "n=3 samples should differ from each other"
    with ThreadPoolExecutor(4) as pool:  # the same request while other requests share the decode batch
        noise = [pool.submit(server.post, "/v1/generate", json={"adapter": "b", "inputs": TEXTS}) for _ in range(3)]
        again = pool.submit(sample)
        assert again.result() == alone
        assert all(f.result().status_code == 200 for f in noise)


def test_unsupported_openai_fields_are_named(client):
    # OpenAI's routes answer an invalid request 400, as OpenAI's API and vLLM do (the native API keeps 422)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="a", prompt="Sales", max_tokens=2, suffix="!")
    assert "suffix" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="a", prompt="Sales", max_tokens=1000)
    assert "--max-new-tokens" in str(err.value)


# -- continuous batching ------------------------------------------------------------------------------------------
def test_mixed_requests_share_decode_steps_and_equal_runs_alone(server, causal):
    """16 requests, 3 adapters, max_new_tokens 2..24: they share decode steps (several adapters per step); each
    answer equals the request run alone; short requests are not held back by long ones."""
    before = server.client.get("/metrics?format=json").json()["decode"]
    jobs = [(["a", "b", "c", BASE_ADAPTER][i % 4], TEXTS[i % 4], 2 + (i * 7) % 23) for i in range(16)]

    def call(job):
        adapter, text, n = job
        start = time.monotonic()
        r = server.post("/v1/generate", json={"adapter": adapter, "inputs": text, "parameters": {"max_new_tokens": n}})
        return r, time.monotonic() - start

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, jobs))
    for (adapter, text, n), (r, _) in zip(jobs, results):
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        assert out["text"] == causal.generate(adapter, text, n), (adapter, text, n)
        assert out["finish_reason"] in ("stop", "length") and out["tokens"] <= n
    after = server.client.get("/metrics?format=json").json()["decode"]
    assert after["max_rows"] > 1 and after["max_adapters"] > 1, after
    assert after["steps"] - before["steps"] < sum(n for _, _, n in jobs), "rows must share decode steps"


def test_a_short_request_leaves_before_a_long_one(causal):
    srv = LiveServer(_config(causal, max_new_tokens=120))
    try:
        with ThreadPoolExecutor(2) as pool:
            body = {"adapter": "a", "inputs": TEXTS[0], "parameters": {"max_new_tokens": 120}}
            long = pool.submit(srv.post, "/v1/generate", json=body)
            while srv.service.engine.decoder.counts()[0] == 0:
                time.sleep(0.001)
            short = srv.post(
                "/v1/generate", json={"adapter": "b", "inputs": TEXTS[1], "parameters": {"max_new_tokens": 2}}
            )
            assert short.status_code == 200 and not long.done(), "the short request waited for the long one"
            assert long.result().status_code == 200
    finally:
        srv.close()


# -- isolation ---------------------------------------------------------------------------------------------------
def test_a_poisoned_request_fails_alone(causal):
    srv = LiveServer(_config(causal, max_wait_ms=200))
    try:
        srv.service.batcher.pause()
        raw = '{"adapter": "a", "inputs": ["Sales \\ud800 fell", "ok"]}'  # a lone surrogate, valid JSON
        label_raw = '{"adapter": "a", "inputs": "Sales", "parameters": {"labels": ["up", "do\\udc00wn"]}}'
        with ThreadPoolExecutor(12) as pool:
            innocent = [
                pool.submit(srv.post, "/v1/generate", json={"adapter": "b", "inputs": TEXTS[i % 4]}) for i in range(6)
            ] + [
                pool.submit(
                    srv.post,
                    "/v1/classify",
                    json={"adapter": "c", "inputs": TEXTS, "parameters": {"labels": ["up", "down"]}},
                )
                for _ in range(3)
            ]
            hostile = [
                pool.submit(srv.post, "/v1/generate", content=raw, headers={"content-type": "application/json"}),
                pool.submit(srv.post, "/v1/classify", content=label_raw, headers={"content-type": "application/json"}),
                pool.submit(
                    srv.post,
                    "/v1/generate",
                    json={"adapter": "a", "inputs": "Sales", "parameters": {"do_sample": True, "temperature": 1e-38}},
                ),
            ]
            time.sleep(0.3)
            srv.service.batcher.resume()
            assert all(f.result().status_code == 200 for f in innocent), [f.result().text for f in innocent]
            bad, bad_label, tiny_temperature = (f.result() for f in hostile)
        assert bad.status_code == 422 and "inputs[0]" in bad.json()["error"]["message"], bad.text
        assert bad_label.status_code == 422 and "labels[1]" in bad_label.json()["error"]["message"], bad_label.text
        assert tiny_temperature.status_code == 200, tiny_temperature.text  # the limit of sampling: greedy
    finally:
        srv.close()


def _raw_exchange(url: str, requests: list[bytes], timeout: float = 10.0) -> list[bytes]:
    """Send `requests` one after the other on ONE connection; the raw responses (Content-Length framed)."""
    host, port = url.removeprefix("http://").split(":")
    out = []
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        for request in requests:
            sock.sendall(request)
            data = b""
            while b"\r\n\r\n" not in data:
                data += sock.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(
                next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
            )
            while len(body) < length:
                body += sock.recv(65536)
            out.append(head + b"\r\n\r\n" + body)
    return out


def _post(path: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n"
    ).encode() + data


def test_an_internal_error_keeps_the_connection_open(causal, caplog):
    srv = LiveServer(_config(causal))
    try:
        engine = srv.service.engine
        real = engine.classify

        def broken(ids, adapters, labels):
            if len(ids) == 1 and len(ids[0]) == len(raw_ids(causal, "Sales")):
                raise RuntimeError("injected failure")
            return real(ids, adapters, labels)

        engine.classify = broken
        with caplog.at_level("ERROR", logger="ia3.serve"):
            first, second = _raw_exchange(
                srv.url,
                [
                    _post(
                        "/v1/classify", {"adapter": "a", "inputs": "Sales", "parameters": {"labels": ["up", "down"]}}
                    ),
                    _post("/v1/generate", {"adapter": "a", "inputs": TEXTS[0], "parameters": {"max_new_tokens": 2}}),
                ],
            )
        assert first.startswith(b"HTTP/1.1 500") and b"x-request-id: req-" in first.lower()
        rid = first.lower().split(b"x-request-id: ")[1].split(b"\r\n")[0].decode()
        assert rid in first.decode().lower().split("\r\n\r\n")[1]  # the body names the request id
        assert second.startswith(b"HTTP/1.1 200"), second  # same connection, next request answered
        assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 1  # one line, not a traceback flood
    finally:
        srv.close()


# -- limits ------------------------------------------------------------------------------------------------------
def test_slow_headers_slow_bodies_and_the_connection_cap(causal):
    srv = LiveServer(_config(causal, header_timeout_s=1.0, body_timeout_s=1.0, idle_timeout_s=1.0, max_connections=4))
    host, port = srv.url.removeprefix("http://").split(":")
    try:
        start = time.monotonic()
        with socket.create_connection((host, int(port)), timeout=10) as slow:  # headers never finish
            slow.sendall(b"POST /v1/generate HTTP/1.1\r\nhost: x\r\n")
            answer = slow.recv(4096)
            assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - start < 5, answer
            assert slow.recv(4096) == b""  # closed
        start = time.monotonic()
        with socket.create_connection((host, int(port)), timeout=10) as stalled:  # the body stalls
            stalled.sendall(b'POST /v1/generate HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{"adapter"')
            answer = stalled.recv(4096)
            assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - start < 5, answer
        start = time.monotonic()
        with socket.create_connection((host, int(port)), timeout=10) as idle:  # connects, says nothing
            assert idle.recv(4096) == b"" and time.monotonic() - start < 5
        held = [socket.create_connection((host, int(port)), timeout=10) for _ in range(4)]
        try:
            time.sleep(0.2)
            with socket.create_connection((host, int(port)), timeout=10) as extra:
                assert extra.recv(4096).startswith(b"HTTP/1.1 503")
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.2)
        r = httpx.post(srv.url + "/v1/generate", json={"adapter": "a", "inputs": "Sales"}, timeout=10)
        assert r.status_code == 200  # the server is fine afterwards
    finally:
        srv.close()


def test_compute_budget_and_truncation(causal):
    srv = LiveServer(_config(causal, max_request_tokens=40, max_input_tokens=6, truncation="refuse"))
    try:
        r = srv.post(
            "/v1/generate", json={"adapter": "a", "inputs": ["Sales"] * 3, "parameters": {"max_new_tokens": 20}}
        )
        assert r.status_code == 413 and "--max-request-tokens" in r.json()["error"]["message"], r.text
        r = srv.post("/v1/generate", json={"adapter": "a", "inputs": TEXTS[0], "parameters": {"max_new_tokens": 3}})
        assert r.status_code == 413 and "--max-input-tokens" in r.json()["error"]["message"], r.text
    finally:
        srv.close()
    srv = LiveServer(_config(causal, max_input_tokens=6, truncation="left"))
    try:
        r = srv.post("/v1/generate", json={"adapter": "a", "inputs": TEXTS[0], "parameters": {"max_new_tokens": 3}})
        assert r.status_code == 200, r.text
        ids = raw_ids(causal, TEXTS[0])
        out = r.json()["outputs"][0]
        assert out["truncated_input_tokens"] == len(ids) - 6
        assert out["text"] == reference(causal, "a", ids[-6:], 3)[0]  # the end of the input was kept
    finally:
        srv.close()


def test_a_client_that_goes_away_frees_the_worker(causal):
    srv = LiveServer(_config(causal, max_new_tokens=150))
    host, port = srv.url.removeprefix("http://").split(":")
    try:
        body = {"adapter": "a", "inputs": TEXTS[0], "parameters": {"max_new_tokens": 150}}
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall(_post("/v1/generate", body))
        decoder = srv.service.engine.decoder
        while decoder.counts()[0] == 0:
            time.sleep(0.001)
        sock.close()
        deadline = time.monotonic() + 10
        while decoder.counts() != (0, 0):
            assert time.monotonic() < deadline, "the abandoned request kept the decoder busy"
            time.sleep(0.01)
        assert decoder.tokens_out < 150
        routes = srv.client.get("/metrics?format=json").json()["requests"]["by_route"]["/v1/generate"]
        assert routes == {"499": 1}, routes  # not counted as answered
    finally:
        srv.close()


# -- operations --------------------------------------------------------------------------------------------------
def test_prometheus_metrics_and_summary(server):
    server.post("/v1/generate", json={"adapter": "b", "inputs": "Sales", "parameters": {"max_new_tokens": 3}})
    text = server.client.get("/metrics").text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['ia3_requests_total{route="/v1/generate",status="200"}'] >= 1
    assert samples['ia3_adapter_requests_total{adapter="b"}'] >= 1
    assert samples['ia3_completion_tokens_total{adapter="b"}'] >= 1
    assert "ia3_queue_depth" in samples and "ia3_batch_occupancy" in samples and "ia3_tokens_per_second" in samples
    summary = server.service.summary()
    assert "3 adapter(s): a, b, c" in summary and "batching continuous" in summary and "timeouts" in summary


def test_seq2seq_decodes_continuously_and_equals_runs_alone(tmp_path):
    """T5: encoder states and cross-attention caches kept per row; requests of different lengths and adapters
    share decode steps and each answer equals `generate` alone."""
    s2s = Setup(tmp_path, "seq2seq")
    srv = LiveServer(
        ServeConfig(
            model=str(s2s.model_dir), adapters_dir=str(s2s.adapters), task="seq2seq", max_new_tokens=16, dtype="float32"
        )
    )
    try:
        assert srv.service.engine.decoder is not None, srv.service.engine.static_reason
        jobs = [(["a", "b", "c", BASE_ADAPTER][i % 4], TEXTS[(i * 3) % 4], 2 + (i * 5) % 15) for i in range(12)]
        with ThreadPoolExecutor(12) as pool:
            answers = list(
                pool.map(
                    lambda j: srv.post(
                        "/v1/generate", json={"adapter": j[0], "inputs": j[1], "parameters": {"max_new_tokens": j[2]}}
                    ),
                    jobs,
                )
            )
        for (adapter, text, n), r in zip(jobs, answers):
            assert r.status_code == 200, r.text
            assert r.json()["outputs"][0]["text"] == s2s.generate(adapter, text, n), (adapter, text, n)
        decode = srv.client.get("/metrics?format=json").json()["decode"]
        assert decode["max_rows"] > 1 and decode["max_adapters"] > 1, decode
    finally:
        srv.close()
