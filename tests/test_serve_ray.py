"""`ia3 serve` on Ray Serve (`ia3[ray]`): two replicas on a local Ray instance behind Ray's HTTP proxy, driven by the
official `openai` client (streaming included); requests for an adapter land on a replica that holds it
(multiplexing by the OpenAI `model` field). One Ray start (~40 s)."""

from __future__ import annotations

import socket

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serve_setup import TEXTS, Setup  # noqa: E402

from ia3.serve import ServeConfig  # noqa: E402

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_replicas_on_ray_serve(tmp_path):
    from ray import serve

    from ia3.serve.ray import build_app

    setup = Setup(tmp_path, "causal")
    config = ServeConfig(
        model=str(setup.model_dir), adapters_dir=str(setup.adapters), task="causal", max_new_tokens=8, dtype="float32"
    )
    port = _free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(
            build_app(config, num_replicas=2, max_adapters_per_replica=2, replica_actor_options={"num_cpus": 1}),
            name="ia3",
            route_prefix="/",
        )
        url = f"http://127.0.0.1:{port}"
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=2, timeout=60)
        want = {a: setup.generate(a, TEXTS[0], max_new_tokens=6) for a in ("a", "b")}
        for adapter in ("a", "b", "a", "b"):
            r = httpx.post(
                url + "/v1/generate",
                json={"adapter": adapter, "inputs": TEXTS[0], "parameters": {"max_new_tokens": 6}},
                timeout=60,
            )
            assert r.status_code == 200 and r.json()["outputs"][0]["text"] == want[adapter], r.text
        done = client.completions.create(model="c", prompt=TEXTS[1], max_tokens=6, temperature=0)
        pieces = client.completions.create(model="c", prompt=TEXTS[1], max_tokens=6, temperature=0, stream=True)
        assert "".join(p.choices[0].text for p in pieces) == done.choices[0].text
        models = client.models.list().data
        assert {"a", "b", "c"} <= {m.id for m in models}
        # multiplexing: every request for `a` is answered by one replica, the one that had it
        replicas = set()
        for _ in range(6):
            r = httpx.get(url + "/metrics?format=json", headers={"serve_multiplexed_model_id": "a"}, timeout=30)
            replicas.add(r.json()["uptime_s"] > 0 and tuple(r.json()["adapters"]["resident"]))
        assert len(replicas) == 1 and "a" in next(iter(replicas)), replicas
    finally:
        serve.shutdown()
        ray.shutdown()
