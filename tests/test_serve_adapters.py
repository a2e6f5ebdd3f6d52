"""`ia3 serve` beyond RAM (issue 21): adapters loaded on demand, least-recently-used eviction under a budget, pins,
vLLM's load/unload endpoints, and the routing gauges; one tiny causal model, five adapters a-e in one folder.

Answers of a server holding at most two adapters are checked against a server with all five loaded and, for a, b
and c, against the offline reference (`Setup.generate`, each input run alone).
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import transformers

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from live_server import LiveServer  # noqa: E402
from serve_setup import TEXTS, Setup, one_torch_thread, save_adapter  # noqa: E402, F401

from ia3 import BASE_ADAPTER  # noqa: E402
from ia3.serve import ServeConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NAMES = ["a", "b", "c", "d", "e"]
PARAMS = {"max_new_tokens": 5}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    setup = Setup(tmp_path_factory.mktemp("serve-adapters"), "causal")
    for seed, name in ((11, "d"), (12, "e")):
        save_adapter("causal", setup.model_dir, setup.adapters / name, seed)
    return setup


def _server(setup: Setup, adapters: Path | None = None, **overrides) -> LiveServer:
    settings = dict(
        model=str(setup.model_dir),
        adapters_dir=str(adapters or setup.adapters),
        task="causal",
        max_wait_ms=5,
        max_new_tokens=8,
        dtype="float32",  # answers are compared with float32 references
    )
    settings.update(overrides)
    return LiveServer(ServeConfig(**settings))


@pytest.fixture(scope="module")
def full(setup):
    """Every adapter loaded at start (no budget): the answers a budgeted server must give."""
    srv = _server(setup)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def expected(full, setup) -> dict[tuple[str, str], str]:
    out = {}
    for name in NAMES:
        r = full.post("/v1/generate", json={"adapter": name, "inputs": TEXTS[:2], "parameters": PARAMS})
        assert r.status_code == 200, r.text
        for text, o in zip(TEXTS[:2], r.json()["outputs"]):
            out[name, text] = o["text"]
    for name in ("a", "b", "c"):  # and the offline reference, each input alone
        for text in TEXTS[:2]:
            assert out[name, text] == setup.generate(name, text, max_new_tokens=5)
    return out


def _answers(srv: LiveServer, adapter: str) -> list[str]:
    r = srv.post("/v1/generate", json={"adapter": adapter, "inputs": TEXTS[:2], "parameters": PARAMS})
    assert r.status_code == 200, r.text
    return [o["text"] for o in r.json()["outputs"]]


def _metrics(srv: LiveServer) -> str:
    return srv.client.get("/metrics").text


def test_on_demand_lru_budget_and_gauges(setup, expected, full):
    srv = _server(setup, max_loaded_adapters=2)
    try:
        svc = srv.service
        assert svc.registry.names() == ["a", "b"]  # loaded at start up to the budget, in name order
        assert "2 adapter(s): a, b (at most 2; 3 more on demand)" in svc.summary()
        models = srv.client.get("/v1/models").json()["data"]
        assert sorted(m["id"] for m in models[1:]) == NAMES and all(
            m["parent"] == str(setup.model_dir) for m in models[1:]
        )
        assert srv.client.get("/v1/models/e").json()["parent"] == str(setup.model_dir)
        # concurrent first requests for an adapter on disk but not loaded: answered, with one load
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda _: _answers(srv, "e"), range(3)))
        assert answers == [[expected["e", t] for t in TEXTS[:2]]] * 3
        assert svc.adapters.loads == 1 and svc.registry.names() == ["b", "e"]  # a was least recently used
        for _ in range(2):  # five adapters in rotation through two places
            for name in NAMES:
                assert _answers(srv, name) == [expected[name, t] for t in TEXTS[:2]], name
                assert len(svc.registry.names()) <= 2
        assert svc.registry.names() == ["d", "e"]
        text = _metrics(srv)
        assert 'ia3_adapter_resident{adapter="d"} 1' in text and 'ia3_adapter_resident{adapter="a"}' not in text
        assert 'ia3_lora_requests_info{running_lora_adapters="",waiting_lora_adapters="",max_lora="2"}' in text
        assert f"ia3_adapter_evictions_total {svc.adapters.evictions:g}" in text and svc.adapters.evictions == 11
        r = srv.post("/v1/generate", json={"adapter": "nothere", "inputs": "x"})
        assert r.status_code == 404 and r.json()["error"]["type"] == "adapter_not_found"
    finally:
        srv.close()


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def test_eviction_waits_for_rows_and_pins(setup, expected):
    srv = _server(setup, max_loaded_adapters=2, pin_adapters=["c"])
    svc = srv.service
    try:
        assert svc.registry.names() == ["c", "a"]  # the pin first, then name order up to the budget
        svc.batcher.pause()
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(_answers, srv, "a")
            _wait_for(lambda: svc.engine.decoder.counts()[1] == 2, "a's rows queued")
            second = pool.submit(_answers, srv, "b")  # b must load: a has rows queued, c is pinned: neither goes
            _wait_for(lambda: svc.adapters.in_use().get("b") == 2, "b waiting on its load")
            text = _metrics(srv)
            assert 'running_lora_adapters="",waiting_lora_adapters="a,b",max_lora="2"' in text
            assert 'ia3_adapter_waiting_rows{adapter="a"} 2' in text
            svc.batcher.resume()
            assert first.result() == [expected["a", t] for t in TEXTS[:2]]
            assert second.result() == [expected["b", t] for t in TEXTS[:2]]
        # over the budget while a and b both had rows; the surplus (a, least recently used) goes once they are done
        _wait_for(lambda: svc.registry.names() == ["c", "b"], f"trimmed to c, b: {svc.registry.names()}")
        assert svc.adapters.evictions == 1
        assert _answers(srv, "d") == [expected["d", t] for t in TEXTS[:2]]
        assert svc.registry.names() == ["c", "d"]  # the pin stays, though least recently used
    finally:
        svc.batcher.resume()
        srv.close()


def test_eviction_never_takes_an_adapter_a_request_found_resident(setup, expected):
    """Concurrent requests over three adapters through two places (an eviction every few requests): a request that
    found its adapter resident keeps it; none is answered 404 "unloaded". The eviction is slowed (5 ms) to widen
    the window in which an eviction chosen before the request came used to delete the adapter after it."""
    srv = _server(setup, max_loaded_adapters=2, max_wait_ms=1)
    delete = srv.service.engine.delete_adapter

    def slow_delete(name: str) -> None:
        time.sleep(0.005)
        delete(name)

    srv.service.engine.delete_adapter = slow_delete
    try:

        def client(seed: int) -> list[tuple[str, int, str]]:
            out = []
            for k in range(20):
                name = "abc"[(seed + k * (seed + 1)) % 3]
                r = srv.post("/v1/generate", json={"adapter": name, "inputs": TEXTS[0], "parameters": PARAMS})
                out.append((name, r.status_code, r.json()["outputs"][0]["text"] if r.status_code == 200 else r.text))
            return out

        with ThreadPoolExecutor(5) as pool:
            answers = [a for part in pool.map(client, range(5)) for a in part]
        assert all(status == 200 and text == expected[name, TEXTS[0]] for name, status, text in answers), [
            a for a in answers if a[1] != 200
        ][:3]
        assert srv.service.adapters.evictions >= 10
    finally:
        srv.close()


def test_vllm_load_unload_and_bad_files(setup, expected, full, tmp_path):
    root = tmp_path / "adapters"
    shutil.copytree(setup.adapters / "a", root / "nested" / "a-copy")
    corrupt = root / "corrupt"
    shutil.copytree(setup.adapters / "b", corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    srv = _server(setup, adapters=root, max_loaded_adapters=2)
    try:
        assert srv.service.registry.names() == []  # the corrupt one failed at start; nested is no adapter name
        r = srv.post("/v1/load_lora_adapter", json={"lora_name": "x1", "lora_path": "nested/a-copy"})
        assert r.status_code == 200 and r.text.startswith("Success"), r.text
        assert (
            srv.post("/v1/load_lora_adapter", json={"lora_name": "x1", "lora_path": "nested/a-copy"}).status_code == 409
        )
        body = {"prompt": TEXTS[0], "max_tokens": 5, "temperature": 0}
        want = full.post("/v1/completions", json={"model": "a", **body}).json()["choices"][0]["text"]
        r = srv.post("/v1/completions", json={"model": "x1", **body})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
        for path in (str(setup.adapters / "a"), "../x", "/etc"):  # outside the adapters folder
            r = srv.post("/v1/load_lora_adapter", json={"lora_name": "x2", "lora_path": path})
            assert r.status_code == 403 and r.json()["error"]["type"] == "forbidden_path", r.text
        r = srv.post("/v1/load_lora_adapter", json={"lora_name": "x3", "lora_path": "corrupt"})
        assert r.status_code == 422 and "x3" in r.json()["error"]["message"] and str(root) not in r.text
        r = srv.post("/v1/generate", json={"adapter": "corrupt", "inputs": "Sales"})  # on demand: 422, that request
        assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_adapter"
        assert _answers(srv, "x1") == [expected["a", t] for t in TEXTS[:2]]  # the server goes on
        assert srv.post("/v1/unload_lora_adapter", json={"lora_name": "x1"}).status_code == 200
        assert srv.post("/v1/unload_lora_adapter", json={"lora_name": "x1"}).status_code == 404
        assert srv.post("/v1/generate", json={"adapter": "x1", "inputs": "Sales"}).status_code == 404  # forgotten
    finally:
        srv.close()


def _hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """A Hugging Face Hub cache holding `folder`'s files as repo `repo_id` at `main` (what a past download left)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_on_demand_from_the_offline_cache(setup, expected, tmp_path, monkeypatch):
    """`--hub-on-demand`: a request naming `owner/name` loads that Hub repo on first use. The Hub is not reachable
    here, so the repo comes from huggingface_hub's cache under HF_HUB_OFFLINE=1 (the same resolution an online
    server does after its first download); a repo in no cache is a 404, not a 500."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    _hub_cache(cache, "someone/adapter-b", setup.adapters / "b")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # huggingface_hub read both at import
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    srv = _server(setup, hub_on_demand=True, max_loaded_adapters=2)
    try:
        assert srv.service.registry.names() == ["a", "b"]
        assert _answers(srv, "someone/adapter-b") == [expected["b", t] for t in TEXTS[:2]]  # the local folder's b
        info = {i["name"]: i for i in srv.client.get("/v1/adapters").json()["adapters"]}
        assert info["someone/adapter-b"]["source"] == "hub:someone/adapter-b"
        assert srv.service.adapters.loads == 1 and srv.service.registry.names() == ["b", "someone/adapter-b"]
        body = {"model": "someone/adapter-b", "prompt": TEXTS[0], "max_tokens": 5, "temperature": 0}
        r = srv.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected["b", TEXTS[0]], r.text
        for name in ("someone/not-cached", "nobody/x"):
            r = srv.post("/v1/generate", json={"adapter": name, "inputs": "Sales"})
            assert r.status_code == 404 and r.json()["error"]["type"] == "adapter_not_found", r.text
            assert name in r.json()["error"]["message"]
        r = srv.post("/v1/completions", json={**body, "model": "someone/not-cached"})
        assert r.status_code == 404, r.text
        assert srv.service.registry.names() == ["b", "someone/adapter-b"]  # the failures evicted nothing
        r = srv.post("/v1/unload_lora_adapter", json={"lora_name": "someone/adapter-b"})  # unloaded by its Hub id
        assert r.status_code == 200 and srv.service.registry.names() == ["b"], r.text
        assert _answers(srv, "someone/adapter-b") == [expected["b", t] for t in TEXTS[:2]]  # and loaded again
    finally:
        srv.close()
    off = _server(setup, max_loaded_adapters=2)  # without the option, a Hub name is an unknown adapter: 404
    try:
        r = off.post("/v1/generate", json={"adapter": "someone/adapter-b", "inputs": "Sales"})
        assert r.status_code == 404 and r.json()["error"]["type"] == "adapter_not_found", r.text
    finally:
        off.close()


def test_a_cold_load_runs_beside_the_decode_loop(setup, expected):
    """With the worker taking no task at all (paused), a request for an adapter on disk still gets it read,
    copied into the vector tables and the least recently used one evicted: none of it waits for the decode loop."""
    srv = _server(setup, max_loaded_adapters=2)
    svc = srv.service
    try:
        assert svc.registry.names() == ["a", "b"]
        svc.batcher.pause()
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(_answers, srv, "e")
            _wait_for(lambda: svc.registry.has("e"), "e installed while the worker is paused")
            assert svc.registry.names() == ["b", "e"] and svc.adapters.evictions == 1
            assert not answer.done()  # its rows wait for the worker
            svc.batcher.resume()
            assert answer.result() == [expected["e", t] for t in TEXTS[:2]]
    finally:
        svc.batcher.resume()
        srv.close()


def test_an_adapter_on_other_layers_widens_the_tables(setup, expected, tmp_path):
    """An adapter that targets layers the others do not (here GPT-2's attention output projection) is injected on
    the worker, the vector tables widen to its layers, and every adapter, old and new, still answers as alone."""
    from ia3 import IA3Config, get_peft_model

    root = tmp_path / "adapters"
    for name in ("a", "b"):
        shutil.copytree(setup.adapters / name, root / name)
    torch.manual_seed(21)
    base = transformers.AutoModelForCausalLM.from_pretrained(setup.model_dir)
    config = IA3Config(
        task_type="CAUSAL_LM", target_modules=["c_attn", "attn.c_proj"], feedforward_modules=[], init_ia3_weights=False
    )
    get_peft_model(base, config).save_pretrained(root / "w")
    setup.ref.load_adapter(root / "w", "w")
    srv = _server(setup, adapters=root, max_loaded_adapters=2)
    try:
        assert srv.service.registry.names() == ["a", "b"]
        with ThreadPoolExecutor(3) as pool:  # w loads (evicting a) while b's requests run
            answers = list(pool.map(lambda name: (name, _answers(srv, name)), ["b", "w", "b", "w"]))
        for name, got in answers:
            assert got == [setup.generate(name, t, max_new_tokens=5) for t in TEXTS[:2]], name
        assert srv.service.registry.has("w") and srv.service.engine.needs_worker("w") is False
        assert _answers(srv, "a") == [expected["a", t] for t in TEXTS[:2]]  # reloaded into the wider tables
        assert _answers(srv, "w") == [setup.generate("w", t, max_new_tokens=5) for t in TEXTS[:2]]
    finally:
        srv.close()


def test_the_first_adapter_of_an_empty_folder_loads_beside_the_decode_loop(setup, expected, tmp_path):
    """A server whose adapters folder is empty at start has its vector tables ready: the first adapter that appears
    and is asked for is copied in with the worker paused, like every later one, and answers as with all loaded."""
    root = tmp_path / "adapters"
    root.mkdir()
    srv = _server(setup, adapters=root)
    svc = srv.service
    try:
        assert svc.engine.vectors is not None and len(svc.engine.vectors) == 0
        assert svc.engine.peft is not None and not svc.engine.peft.peft_config  # layers only, no adapter in the model
        shutil.copytree(setup.adapters / "c", root / "c")
        svc.batcher.pause()
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(_answers, srv, "c")
            _wait_for(lambda: svc.registry.has("c"), "c installed while the worker is paused")
            svc.batcher.resume()
            assert answer.result() == [expected["c", t] for t in TEXTS[:2]]
        r = srv.post(
            "/v1/generate", json={"adapter": BASE_ADAPTER, "inputs": TEXTS[:2], "parameters": PARAMS}
        )  # the base model
        assert r.status_code == 200, r.text
        assert [o["text"] for o in r.json()["outputs"]] == [setup.generate(BASE_ADAPTER, t, 5) for t in TEXTS[:2]]
    finally:
        svc.batcher.resume()
        srv.close()
