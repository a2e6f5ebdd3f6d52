"""`ia3 serve`: a real uvicorn server on a loopback port, driven over HTTP (httpx), checked against offline runs.

Offline reference: a separate `PeftModel` in the test process with the same adapters, each request's inputs run
alone with its adapter set active (`disable_adapter` for `__base__`). Generated text and labels must be equal;
scores equal to float32 rounding.

State: the module's `s2s` setup (model, adapters folder a/b/c, spare adapter, reference) is built once and never
written to. Tests that only send requests share one server (`server`), checked before and after each such test to
still hold exactly a, b, c with an idle, running queue. Tests that load, delete or add adapters, pause the queue,
count batches or change limits get their own server on their own copy of the adapters folder (`own_server`,
`own_adapters`), so the tests pass in any order.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from live_server import LiveServer  # noqa: E402
from serve_setup import LABELS, TEXTS, Setup, one_torch_thread, save_adapter  # noqa: E402, F401
from tiny_dirs import make_model_dir  # noqa: E402

from ia3 import BASE_ADAPTER  # noqa: E402
from ia3.serve import ServeConfig  # noqa: E402
from ia3.serve.batcher import Batcher, Job  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="module")
def s2s(root):
    return Setup(root, "seq2seq")


def _s2s_server(s2s: Setup, adapters_dir: Path) -> LiveServer:
    return LiveServer(
        ServeConfig(
            model=str(s2s.model_dir),
            adapters_dir=str(adapters_dir),
            task="seq2seq",
            label_names=LABELS,
            max_wait_ms=20,
            max_inputs=8,
            max_input_chars=300,
            max_body_bytes=64 * 1024,
            max_new_tokens=12,
            dtype="float32",  # the answers are compared with float32 references
        )
    )


@pytest.fixture(scope="module")
def _shared_server(s2s):
    srv = _s2s_server(s2s, s2s.adapters)
    yield srv
    srv.close()


def _check_untouched(srv: LiveServer, s2s: Setup) -> None:
    assert sorted(p.name for p in s2s.adapters.iterdir()) == ["a", "b", "c"], "the shared adapters folder changed"
    assert sorted(a["name"] for a in srv.client.get("/v1/adapters").json()["adapters"]) == ["a", "b", "c"]
    stats = srv.service.batcher.stats()
    assert not stats["paused"] and srv.service.batcher.depth() == 0, stats


@pytest.fixture
def server(_shared_server, s2s):
    """The module's shared server, for tests that only send requests; a test that changed it fails here."""
    _check_untouched(_shared_server, s2s)
    yield _shared_server
    _check_untouched(_shared_server, s2s)


@pytest.fixture
def own_adapters(s2s, tmp_path) -> Path:
    """This test's own adapters folder, a copy of a, b and c, free to change."""
    for name in ("a", "b", "c"):
        shutil.copytree(s2s.adapters / name, tmp_path / "adapters" / name)
    return tmp_path / "adapters"


@pytest.fixture
def own_server(s2s, own_adapters):
    """A server of this test alone (its own queue, metrics and loaded adapters) on `own_adapters`."""
    srv = _s2s_server(s2s, own_adapters)
    yield srv
    srv.close()


def _check_error(response, status: int, kind: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and {"type", "message"} <= set(body["error"]) <= {"type", "message", "param", "code"}
    if kind is not None:
        assert body["error"]["type"] == kind, body
    return body["error"]


def _check_classify(setup: Setup, adapter: str, texts: list[str], body: dict) -> None:
    assert body["labels"] == LABELS and len(body["outputs"]) == len(texts)
    for text, out in zip(texts, body["outputs"]):
        label, scores = setup.classify(adapter, text)
        assert out["label"] == label, (adapter, text)
        assert [out["scores"][n] for n in LABELS] == pytest.approx(scores, abs=1e-4)


# -- answers equal offline runs --------------------------------------------------------------------------------------
def test_generate_and_classify_equal_offline(server, s2s):
    generated = {}
    for adapter in ("a", "b", BASE_ADAPTER):
        r = server.post("/v1/generate", json={"adapter": adapter, "inputs": TEXTS, "parameters": {"max_new_tokens": 6}})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["adapter"] == adapter and body["parameters"]["max_new_tokens"] == 6
        generated[adapter] = [o["text"] for o in body["outputs"]]
        assert generated[adapter] == [s2s.generate(adapter, t) for t in TEXTS]
        r = server.post("/v1/classify", json={"adapter": adapter, "inputs": TEXTS[:2]})
        assert r.status_code == 200, r.text
        _check_classify(s2s, adapter, TEXTS[:2], r.json())
    assert len({tuple(v) for v in generated.values()}) == 3  # the adapters matter
    # one string in, one output; beam search; max_new_tokens clamped to the server's cap (12)
    r = server.post(
        "/v1/generate", json={"adapter": "c", "inputs": TEXTS[2], "parameters": {"max_new_tokens": 500, "num_beams": 2}}
    )
    assert r.status_code == 200 and r.json()["parameters"]["max_new_tokens"] == 12
    assert [o["text"] for o in r.json()["outputs"]] == [s2s.generate("c", TEXTS[2], 12, num_beams=2)]
    # sampling with a seed runs alone and is reproducible
    sample = {"adapter": "a", "inputs": TEXTS[0], "parameters": {"do_sample": True, "seed": 3, "top_k": 5}}
    first, second = server.post("/v1/generate", json=sample), server.post("/v1/generate", json=sample)
    assert first.status_code == 200 and first.json()["outputs"] == second.json()["outputs"]
    # custom label strings per request
    r = server.post("/v1/classify", json={"adapter": "a", "inputs": "Sales", "parameters": {"labels": ["up", "down"]}})
    assert r.status_code == 200 and r.json()["labels"] == ["up", "down"]
    schema = server.client.get("/openapi.json").json()
    assert {"/v1/generate", "/v1/classify", "/v1/adapters", "/v1/adapters/{name}", "/health", "/metrics"} <= set(
        schema["paths"]
    )
    assert "GenerateRequest" in schema["components"]["schemas"]


def test_causal_left_padding_and_cls_heads(tmp_path):
    causal = Setup(tmp_path, "causal")
    srv = LiveServer(
        ServeConfig(
            model=str(causal.model_dir),
            adapters_dir=str(causal.adapters),
            task="causal",
            label_names=LABELS,
            max_wait_ms=50,
            max_new_tokens=16,
            max_label_tokens=8,
            dtype="float32",
        )
    )
    try:
        srv.service.batcher.pause()  # queue requests of different adapters and lengths, then run them as one batch
        jobs = [(adapter, TEXTS[i : i + 2]) for i, adapter in enumerate(["a", "b", BASE_ADAPTER])]
        with ThreadPoolExecutor(len(jobs)) as pool:
            futures = [
                pool.submit(
                    httpx.post,
                    f"{srv.url}/v1/generate",
                    timeout=30,
                    json={"adapter": a, "inputs": t, "parameters": {"max_new_tokens": 5}},
                )
                for a, t in jobs
            ]
            _wait_depth(srv, len(jobs))
            srv.service.batcher.resume()
            for (adapter, texts), future in zip(jobs, futures):
                r = future.result()
                assert r.status_code == 200, r.text
                assert [o["text"] for o in r.json()["outputs"]] == [causal.generate(adapter, t, 5) for t in texts]
        decode = srv.client.get("/metrics?format=json").json()["decode"]  # causal: continuous batching
        assert decode["max_rows"] == 6 and decode["max_adapters"] == 3, decode
        for adapter in ("a", "c"):
            r = srv.post("/v1/classify", json={"adapter": adapter, "inputs": TEXTS})
            assert r.status_code == 200, r.text
            _check_classify(causal, adapter, TEXTS, r.json())
    finally:
        srv.close()

    cls = Setup(tmp_path, "cls")
    srv = LiveServer(
        ServeConfig(
            model=str(cls.model_dir),
            adapters_dir=str(cls.adapters),
            task="cls",
            label_names=LABELS,
            max_wait_ms=50,
            dtype="float32",
        )
    )
    try:
        srv.service.batcher.pause()
        with ThreadPoolExecutor(3) as pool:  # each adapter brings its own head: one batch, three heads
            futures = {
                a: pool.submit(httpx.post, f"{srv.url}/v1/classify", json={"adapter": a, "inputs": TEXTS}, timeout=30)
                for a in ("a", "b", "c")
            }
            _wait_depth(srv, 3)
            srv.service.batcher.resume()
            for adapter, future in futures.items():
                assert future.result().status_code == 200, future.result().text
                _check_classify(cls, adapter, TEXTS, future.result().json())
        assert srv.client.get("/metrics?format=json").json()["batches"]["max_adapters"] == 3
        _check_error(srv.post("/v1/generate", json={"adapter": "a", "inputs": "x"}), 422, "unsupported")
    finally:
        srv.close()


def _wait_depth(srv: LiveServer, n: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while srv.service.batcher.depth() < n:
        assert time.monotonic() < deadline, f"queue depth {srv.service.batcher.depth()} never reached {n}"
        time.sleep(0.005)


# -- dynamic batching ----------------------------------------------------------------------------------------------
def test_concurrent_mixed_adapter_requests(own_server, s2s):
    server = own_server  # pauses the queue and counts batches: a server of its own
    requests = []
    for i in range(12):
        adapter = ["a", "b", "c", BASE_ADAPTER][i % 4]
        texts = [TEXTS[i % 4]] if i % 3 else [TEXTS[i % 4], TEXTS[(i + 1) % 4]]
        kind = "generate" if (i // 4) % 2 == 0 else "classify"
        requests.append((kind, adapter, texts))
    before = server.client.get("/metrics?format=json").json()["batches"]["count"]

    def send(req):
        kind, adapter, texts = req
        body = {"adapter": adapter, "inputs": texts}
        if kind == "generate":
            body["parameters"] = {"max_new_tokens": 6}
        with httpx.Client(base_url=server.url, timeout=30) as client:
            return client.post(f"/v1/{kind}", json=body)

    server.service.batcher.pause()  # let every request queue, so the batches are certainly mixed
    try:
        with ThreadPoolExecutor(len(requests)) as pool:
            futures = [pool.submit(send, r) for r in requests]
            _wait_depth(server, len(requests))
            server.service.batcher.resume()
            answers = [f.result() for f in futures]
    finally:
        server.service.batcher.resume()
    for (kind, adapter, texts), r in zip(requests, answers):
        assert r.status_code == 200, r.text
        if kind == "generate":
            assert [o["text"] for o in r.json()["outputs"]] == [s2s.generate(adapter, t) for t in texts]
        else:
            _check_classify(s2s, adapter, texts, r.json())
    metrics = server.client.get("/metrics?format=json").json()
    # generation decodes continuously (all its rows in the first decode steps, adapters mixed); classification is
    # one static batch
    assert metrics["batches"]["count"] - before == 1
    assert metrics["decode"]["max_rows"] == sum(len(t) for k, _, t in requests if k == "generate")
    assert metrics["decode"]["max_adapters"] == 4
    assert metrics["batches"]["multi_adapter"] >= 1 and metrics["batches"]["max_adapters"] == 4
    assert metrics["queue"]["depth"] == 0 and metrics["latency_ms"]["p99"] is not None

    # unpaused, real concurrency: every request gets exactly its own answer
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, requests))
    for (kind, adapter, texts), r in zip(requests, answers):
        assert r.status_code == 200, r.text
        if kind == "generate":
            assert [o["text"] for o in r.json()["outputs"]] == [s2s.generate(adapter, t) for t in texts]
        else:
            _check_classify(s2s, adapter, texts, r.json())


def test_batcher_groups_by_key_and_splits_big_requests():
    seen = []

    def run(batch):
        seen.append((batch.key, [(job.id, i) for job, i in batch.items]))
        return [f"{job.adapter}:{job.rows[i]}" for job, i in batch.items]

    batcher = Batcher(run, max_batch_size=4, max_wait_s=0, max_queue=10)
    jobs = [Job("g", "k1", ["x", "y", "z"], "a"), Job("g", "k2", ["u"], "b"), Job("g", "k1", ["v", "w"], "c")]
    batcher.pause()
    batcher.start()
    try:
        futures = [batcher.submit(job) for job in jobs]
        batcher.resume()
        assert [f.result(10) for f in futures] == [["a:x", "a:y", "a:z"], ["b:u"], ["c:v", "c:w"]]
    finally:
        batcher.stop()
    j1, j2, j3 = (job.id for job in jobs)
    assert seen == [("k1", [(j1, 0), (j1, 1), (j1, 2), (j3, 0)]), ("k2", [(j2, 0)]), ("k1", [(j3, 1)])]


# -- adapters loaded and unloaded during traffic ---------------------------------------------------------------------
def test_adapter_load_and_unload_during_traffic(own_server, own_adapters, s2s):
    server = own_server  # loads and deletes adapters: a server and adapters folder of its own
    expected = {(a, t): s2s.generate(a, t) for a in ("a", "b") for t in TEXTS}
    late_answers = [s2s.generate("late", t) for t in TEXTS]
    stop = threading.Event()
    problems: list[str] = []
    count = [0]

    def traffic(adapter: str) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            i = 0
            while not stop.is_set():
                text = TEXTS[i % len(TEXTS)]
                r = client.post(
                    "/v1/generate", json={"adapter": adapter, "inputs": text, "parameters": {"max_new_tokens": 6}}
                )
                if r.status_code != 200 or r.json()["outputs"][0]["text"] != expected[(adapter, text)]:
                    problems.append(f"{adapter} {text!r}: {r.status_code} {r.text[:200]}")
                count[0] += 1
                i += 1

    threads = [threading.Thread(target=traffic, args=(a,)) for a in ("a", "b")]
    for t in threads:
        t.start()
    try:
        _check_error(server.post("/v1/generate", json={"adapter": "late", "inputs": "x"}), 404, "adapter_not_found")
        shutil.copytree(s2s.spare / "late", own_adapters / "late")
        r = server.post("/v1/adapters/late")
        assert r.status_code == 201, r.text
        assert r.json()["adapter"]["name"] == "late"
        assert "late" in [a["name"] for a in server.client.get("/v1/adapters").json()["adapters"]]
        _check_error(server.post("/v1/adapters/late"), 409, "adapter_exists")
        r = server.post("/v1/generate", json={"adapter": "late", "inputs": TEXTS, "parameters": {"max_new_tokens": 6}})
        assert r.status_code == 200 and [o["text"] for o in r.json()["outputs"]] == late_answers
        assert server.client.delete("/v1/adapters/late").json() == {"deleted": "late"}
        _check_error(server.client.delete("/v1/adapters/late"), 404, "adapter_not_found")
        # unloaded, but its folder is still there: the next request that names it loads it again (on demand)
        r = server.post("/v1/generate", json={"adapter": "late", "inputs": TEXTS, "parameters": {"max_new_tokens": 6}})
        assert r.status_code == 200 and [o["text"] for o in r.json()["outputs"]] == late_answers
        assert server.client.delete("/v1/adapters/late").status_code == 200

        # a request already queued when its adapter is unloaded gets 404, not another adapter's answer
        assert server.post("/v1/adapters/late").status_code == 201
        server.service.batcher.pause()
        with ThreadPoolExecutor(2) as pool:
            queued = pool.submit(
                httpx.post, f"{server.url}/v1/generate", timeout=30, json={"adapter": "late", "inputs": "Sales"}
            )
            batcher = server.service.batcher
            while not any(row.adapter == "late" for row in list(batcher.decoder.waiting)):  # seq2seq decodes
                time.sleep(0.005)
            deleting = pool.submit(httpx.delete, f"{server.url}/v1/adapters/late", timeout=30)
            while not server.service.batcher._control:
                time.sleep(0.005)
            server.service.batcher.resume()
            assert deleting.result().status_code == 200
            _check_error(queued.result(), 404, "adapter_not_found")
        time.sleep(0.3)
    finally:
        server.service.batcher.resume()
        stop.set()
        for t in threads:
            t.join(30)
    assert not problems, problems[:3]
    assert count[0] >= 4


def test_no_adapters_at_start_then_load(s2s, tmp_path):
    empty = tmp_path / "empty-adapters"
    empty.mkdir()
    srv = LiveServer(
        ServeConfig(
            model=str(s2s.model_dir), adapters_dir=str(empty), task="seq2seq", label_names=LABELS, dtype="float32"
        )
    )
    try:
        body = {"inputs": TEXTS[:2], "parameters": {"max_new_tokens": 6}}
        r = srv.post("/v1/generate", json={"adapter": BASE_ADAPTER, **body})
        assert r.status_code == 200 and [o["text"] for o in r.json()["outputs"]] == [
            s2s.generate(BASE_ADAPTER, t) for t in TEXTS[:2]
        ]
        shutil.copytree(s2s.adapters / "b", empty / "b")
        assert srv.post("/v1/adapters/b").status_code == 201  # the first adapter wraps the model
        r = srv.post("/v1/generate", json={"adapter": "b", **body})
        assert r.status_code == 200 and [o["text"] for o in r.json()["outputs"]] == [
            s2s.generate("b", t) for t in TEXTS[:2]
        ]
        assert srv.client.delete("/v1/adapters/b").status_code == 200
        r = srv.post("/v1/classify", json={"adapter": BASE_ADAPTER, "inputs": TEXTS[:2]})
        assert r.status_code == 200
        _check_classify(s2s, BASE_ADAPTER, TEXTS[:2], r.json())
    finally:
        srv.close()


def test_adapter_endpoint_safety(own_server, own_adapters, s2s, tmp_path):
    server = own_server  # writes into its adapters folder: a server and folder of its own
    for name in ("bad.name", "__base__", "-x", "a" * 65, "%2E%2E", "..%5C..%5Cx", "a%00"):
        _check_error(server.post(f"/v1/adapters/{name}"), 422, "invalid_adapter_name")
    for path in ("/v1/adapters/../../etc", "/v1/adapters/a%2F..%2F..%2Fetc"):  # slashes: no such route
        _check_error(server.post(path), 404, "not_found")
    _check_error(server.post("/v1/adapters/nothere"), 404, "adapter_not_found")
    # a symlink in the adapters folder that leads outside it
    os.symlink(s2s.spare / "late", own_adapters / "evil")
    _check_error(server.post("/v1/adapters/evil"), 403, "forbidden_path")
    # pickled weights are refused
    pickled = own_adapters / "pickled"
    pickled.mkdir()
    shutil.copy(s2s.spare / "late" / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"not read")
    _check_error(server.post("/v1/adapters/pickled"), 422, "unsupported_format")
    # an adapter of another task / shape
    save_adapter("cls", make_model_dir(tmp_path / "other", "cls"), own_adapters / "wrongtask", 3)
    _check_error(server.post("/v1/adapters/wrongtask"), 422, "adapter_incompatible")
    # Hub ids: checked, and (offline here) a clear error
    _check_error(server.post("/v1/adapters/x", json={"source": "../../etc"}), 422, "invalid_source")
    error = _check_error(server.post("/v1/adapters/x", json={"source": "someone/missing-adapter"}), 404)
    assert "someone/missing-adapter" in error["message"]
    _check_error(server.post("/v1/adapters/x", json={"path": "/etc"}), 422, "invalid_request")
    _check_error(server.client.delete("/v1/adapters/__base__"), 422)
    assert {a["name"] for a in server.client.get("/v1/adapters").json()["adapters"]} == {"a", "b", "c"}


# -- bad input -------------------------------------------------------------------------------------------------------
def test_bad_inputs_are_json_4xx_and_server_keeps_serving(server):
    post = server.post
    json_headers = {"content-type": "application/json"}
    _check_error(
        post("/v1/generate", content=b'{"adapter": "a", "inputs": ', headers=json_headers), 400, "invalid_json"
    )
    _check_error(post("/v1/generate", content=b"", headers=json_headers), 422, "invalid_request")
    for body in [
        {"adapter": 3, "inputs": "x"},
        {"adapter": "a", "inputs": 5},
        {"adapter": "a", "inputs": ["x", 1]},
        {"adapter": "a", "inputs": "x", "parameters": {"max_new_tokens": "5"}},
        {"adapter": "a", "inputs": "x", "parameters": {"do_sample": "yes"}},
        {"adapter": "a", "inputs": "x", "parameters": {"max_new_tokens": 0}},
        {"adapter": "a", "inputs": "x", "parameters": {"num_beams": 99}},
        {"adapter": "a", "inputs": "x", "parameters": {"unknown": 1}},
        {"adapter": "a", "inputs": "x", "extra": True},
        {"inputs": "x"},
        [1, 2],
    ]:
        _check_error(post("/v1/generate", json=body), 422, "invalid_request")
    for inputs in ([], "", ["ok", "   "]):
        _check_error(post("/v1/classify", json={"adapter": "a", "inputs": inputs}), 422, "invalid_request")
    _check_error(post("/v1/classify", json={"adapter": "a", "inputs": "x", "parameters": {"labels": []}}), 422)
    _check_error(
        post("/v1/classify", json={"adapter": "a", "inputs": "x", "parameters": {"labels": ["up " * 40]}}),
        422,
        "invalid_labels",
    )  # more tokens than max_label_tokens
    _check_error(post("/v1/classify", json={"adapter": "nope", "inputs": "x"}), 404, "adapter_not_found")
    _check_error(post("/v1/generate", json={"adapter": "a", "inputs": ["x"] * 9}), 413, "too_many_inputs")
    _check_error(post("/v1/generate", json={"adapter": "a", "inputs": "word " * 100}), 413, "input_too_long")
    _check_error(post("/v1/generate", json={"adapter": "a", "inputs": "x" * 100_000}), 413, "body_too_large")
    chunks = (b"x" * 8192 for _ in range(12))  # chunked upload, no Content-Length
    _check_error(post("/v1/generate", content=chunks, headers=json_headers), 413, "body_too_large")
    _check_error(server.client.get("/v1/generate"), 405, "method_not_allowed")
    _check_error(server.client.get("/nowhere"), 404, "not_found")
    r = post("/v1/generate", json={"adapter": "a", "inputs": "Sales", "parameters": {"max_new_tokens": 6}})
    assert r.status_code == 200 and r.json()["outputs"][0]["text"]
    assert server.client.get("/health").json()["status"] == "ok"
    routes = server.client.get("/metrics?format=json").json()["requests"]["by_route"]
    assert routes["/v1/generate"]["413"] >= 4 and routes["/v1/generate"]["422"] >= 11


# -- queue, timeout, API key -----------------------------------------------------------------------------------------
def test_queue_full_timeout_and_api_key(s2s, own_adapters):
    key = "s3cret-key"
    srv = LiveServer(
        ServeConfig(
            model=str(s2s.model_dir),
            adapters_dir=str(own_adapters),
            task="seq2seq",
            label_names=LABELS,
            max_queue=1,
            request_timeout_s=1.0,
            api_key=key,
            dtype="float32",
        )
    )
    try:
        body = {"adapter": "a", "inputs": "Sales", "parameters": {"max_new_tokens": 6}}
        auth = {"Authorization": f"Bearer {key}"}
        _check_error(srv.post("/v1/generate", json=body), 401, "unauthorized")
        _check_error(srv.post("/v1/generate", json=body, headers={"Authorization": "Bearer wrong"}), 401)
        _check_error(srv.post("/v1/generate", json=body, headers={"X-API-Key": key[:-1]}), 401)
        _check_error(srv.client.get("/metrics?format=json"), 401)
        _check_error(srv.client.get("/v1/adapters"), 401)
        _check_error(srv.post("/v1/adapters/a"), 401)
        assert srv.client.get("/health").status_code == 200  # liveness needs no key
        r = srv.post("/v1/generate", json=body, headers={"X-API-Key": key})
        assert r.status_code == 200 and r.json()["outputs"][0]["text"] == s2s.generate("a", "Sales")

        srv.service.batcher.pause()  # a stalled worker: one request fills the queue
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(srv.post, "/v1/generate", json=body, headers=auth)
            _wait_depth(srv, 1)
            r = srv.post("/v1/generate", json=body, headers=auth)
            _check_error(r, 503, "overloaded")
            assert r.headers["retry-after"] == "1"
            _check_error(first.result(), 504, "timeout")  # request_timeout_s=1
        assert srv.service.batcher.depth() == 0  # the timed-out request left the queue
        srv.service.batcher.resume()
        r = srv.post("/v1/generate", json=body, headers=auth)
        assert r.status_code == 200 and r.json()["outputs"][0]["text"] == s2s.generate("a", "Sales")
        routes = srv.client.get("/metrics?format=json", headers=auth).json()["requests"]["by_route"]["/v1/generate"]
        assert routes["503"] == 1 and routes["504"] == 1 and routes["401"] == 3
    finally:
        srv.close()


# -- command line ------------------------------------------------------------------------------------------------------
def test_cli_serve_subprocess(s2s, own_adapters):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {
        **os.environ,
        "IA3_API_KEY": "k",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ia3",
            "serve",
            "--model",
            str(s2s.model_dir),
            "--adapters",
            str(own_adapters),
            "--dtype",
            "float32",
            "--port",
            str(port),
            "--label-names",
            ",".join(LABELS),
            "--max-batch-size",
            "4",
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "ia3 serve did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/classify",
            headers={"X-API-Key": "k"},
            timeout=30,
            json={"adapter": "b", "inputs": TEXTS[:2]},
        )
        assert r.status_code == 200, r.text
        _check_classify(s2s, "b", TEXTS[:2], r.json())
    finally:
        proc.terminate()
        proc.wait(20)
