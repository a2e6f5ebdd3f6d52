"""`ia3 serve` on Ray Serve (`ia3[ray]`): two replicas on a local Ray instance behind Ray's HTTP proxy, driven by the
official `openai` client (streaming included); requests for an adapter land on a replica that holds it
(multiplexing by the OpenAI `model` field); one replica killed mid-stream and under load: every request is answered
or ends in a clean retryable error, none hangs, and Serve brings the replica back. One Ray start (~20-40 s).

"Clean" (what a client can act on; anything else fails the test):
* before the answer's headers: HTTP 503 with a JSON body `{"error": {"type": "replica_unavailable", ...}}` and
  `Retry-After` (the ingress's answer when the replica it called died);
* after the headers of an event stream: the stream's last event is `data: {"error": {"type":
  "replica_unavailable", ...}}`, with no `data: [DONE]` (OpenAI's clients raise it);
* after the headers of any other body: the connection closes before the body is complete (httpx raises a
  transport error), never a body that ends as if complete.
An answer is 200 with the same text as before the kill (a stream: its pieces, then `data: [DONE]`). No request may
take longer than `TIMEOUT_S` (a hang fails it) or go missing.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serve_setup import TEXTS, Setup  # noqa: E402

from ia3.serve import ServeConfig  # noqa: E402

TIMEOUT_S = 30  # per request: none may hang
RECOVERY_S = 90  # the killed replica is replaced within this
LONG = {"max_tokens": 140, "ignore_eos": True, "temperature": 0}  # ~0.5 s of tokens: still streaming at the kill


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _replicas() -> dict[str, str]:
    """The live `Ia3Replica` actors: {replica id: actor name} (Serve names them `SERVE_REPLICA::app#Deployment#id`)."""
    actors = ray.util.list_named_actors(all_namespaces=True)
    return {
        a["name"].rsplit("#", 1)[1]: a["name"] for a in actors if a["name"].startswith("SERVE_REPLICA::ia3#Ia3Replica#")
    }


def _events(body: bytes) -> list[str]:
    return [line[len("data: ") :] for line in body.decode().split("\n") if line.startswith("data: ")]


def _stream_text(events: list[str]) -> str:
    return "".join(json.loads(e)["choices"][0]["text"] for e in events if e != "[DONE]" and "choices" in e)


def _outcome(status: int, headers: dict, body: bytes, stream: bool, want: str) -> str:
    """'answered' or 'retryable' (see the module docstring); AssertionError for anything else."""
    if status == 503:
        error = json.loads(body)["error"]
        assert error["type"] == "replica_unavailable" and headers.get("retry-after"), (headers, body)
        return "retryable"
    assert status == 200, (status, body[:300])
    if not stream:
        assert json.loads(body)["choices"][0]["text"] == want, body[:300]
        return "answered"
    events = _events(body)
    if events and events[-1] == "[DONE]":
        assert _stream_text(events) == want
        return "answered"
    assert events and json.loads(events[-1])["error"]["type"] == "replica_unavailable", body[-300:]
    return "retryable"


def _load(url: str, wants: dict, stop: threading.Event, outcomes: list, seed: int) -> None:
    """Requests one after another (adapters a, b, c; streamed or not) until `stop`; each outcome appended."""
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=TIMEOUT_S) as http:
        while not stop.is_set():
            adapter, stream = rng.choice("abc"), rng.random() < 0.5
            body = {"model": adapter, "prompt": TEXTS[1], "max_tokens": 6, "temperature": 0, "stream": stream}
            started = time.monotonic()
            try:
                with http.stream("POST", "/v1/completions", json=body) as r:
                    data = r.read()
                outcomes.append(_outcome(r.status_code, r.headers, data, stream, wants[adapter]))
            except httpx.TimeoutException:
                outcomes.append(f"hung ({time.monotonic() - started:.1f} s)")
            except httpx.TransportError as err:  # a body cut off: clean when it was not an event stream
                outcomes.append("retryable" if not stream else f"stream cut without an error event: {err!r}")
            except AssertionError as err:
                outcomes.append(f"unclean: {err}")


def _kill_mid_stream(url: str) -> str:
    """Start a long stream for adapter a, kill its replica once the first piece has come, check the stream ends
    with the retryable error event; the killed replica's id."""
    body = {"model": "a", "prompt": TEXTS[0], "max_tokens": 1, "temperature": 0}
    holder = httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT_S).headers["ia3-replica"]
    actor = ray.get_actor(_replicas()[holder], namespace="serve")  # looked up ahead: the kill is quick
    with (
        httpx.Client(base_url=url, timeout=TIMEOUT_S) as http,
        http.stream("POST", "/v1/completions", json={"model": "a", "prompt": TEXTS[0], "stream": True, **LONG}) as r,
    ):
        assert r.status_code == 200
        replica = r.headers["ia3-replica"]
        if replica != holder:  # (a holds on one replica: multiplexing sends the stream there)
            actor = ray.get_actor(_replicas()[replica], namespace="serve")
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        ray.kill(actor, no_restart=True)
        rest = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    assert rest and "[DONE]" not in rest, rest[-3:]
    assert json.loads(rest[-1])["error"]["type"] == "replica_unavailable", rest[-1]
    return replica


def _wait_for_replacement(killed: str) -> float:
    """Seconds until Serve runs two healthy replicas again, neither the killed one."""
    from ray import serve

    started = time.monotonic()
    while True:
        live = _replicas()
        status = serve.status().applications["ia3"].deployments["Ia3Replica"]
        running = status.replica_states == {"RUNNING": 2} and status.status == "HEALTHY"
        if killed not in live and len(live) == 2 and running:
            return time.monotonic() - started
        assert time.monotonic() - started < RECOVERY_S, (live, status)
        time.sleep(0.25)


def _affinity(url: str, n: int = 30) -> float:
    """Zipf(1) requests over a, b, c: the share of those for an adapter already requested that land on a replica
    holding it (`ia3-adapter-resident: 1`)."""
    rng, seen, hits, repeats = random.Random(5), set(), 0, 0
    for adapter in rng.choices("abc", weights=[1, 1 / 2, 1 / 3], k=n):
        body = {"model": adapter, "prompt": TEXTS[2], "max_tokens": 2, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT_S)
        assert r.status_code == 200 and r.headers["ia3-replica"] in _replicas(), r.text
        if adapter in seen:
            repeats += 1
            hits += r.headers["ia3-adapter-resident"] == "1"
        seen.add(adapter)
    return hits / repeats


def _batch_beyond_rays_default(url: str) -> int:
    """12 concurrent requests for adapter a reach its replica together (Ray's default `max_ongoing_requests`, 5,
    let 5 in at a time): the most rows its decode batch held."""
    body = {"model": "a", "prompt": TEXTS[3], **LONG, "max_tokens": 60}
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT_S), range(12)))
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200][:2]
    held = httpx.get(url + "/metrics?format=json", headers={"serve_multiplexed_model_id": "a"}, timeout=TIMEOUT_S)
    return held.json()["decode"]["max_rows"]


def _check_answers_and_metrics(url: str, setup: Setup) -> None:
    """The original checks: native and OpenAI calls, streaming, /v1/models, routing by adapter, labelled metrics."""
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
    # multiplexing: every request for `a` is answered by one replica, the one that had it; its metrics say which
    replicas = set()
    for _ in range(6):
        r = httpx.get(url + "/metrics?format=json", headers={"serve_multiplexed_model_id": "a"}, timeout=30)
        assert r.json()["replica"] == r.headers["ia3-replica"]
        replicas.add((r.json()["replica"], tuple(r.json()["adapters"]["resident"])))
    assert len(replicas) == 1 and "a" in next(iter(replicas))[1], replicas
    r = httpx.get(url + "/metrics", timeout=30)
    replica = r.headers["ia3-replica"]
    assert f'ia3_adapters_loaded{{replica="{replica}"}}' in r.text and 'replica=""' not in r.text
    samples = [line for line in r.text.splitlines() if line and not line.startswith("#")]
    assert samples and all(f'replica="{replica}"' in line for line in samples), samples[:5]


def test_replica_failures_are_clean_errors():
    """The ingress's answers when the replica it called fails (no Ray instance needed): before the headers a
    retryable 503 (a dead or overloaded replica) or a 500; after the headers of an event stream, a last error event;
    any other body is cut off (the exception goes on, so the connection closes mid-body)."""
    import asyncio

    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    from ia3.serve.ray import relay, replica_failure

    for err in (ActorDiedError(), BackPressureError(num_queued_requests=3, max_queued_requests=2)):
        status, body, retry = replica_failure(err)
        assert (status, body["error"]["type"], retry) == (503, "replica_unavailable", 1)
    assert replica_failure(ValueError("bug"))[:2] == (
        500,
        {"error": {"type": "replica_error", "message": "The replica failed: ValueError"}},
    )

    async def dies():
        yield {"body": b"data: {}\n\n"}
        raise ActorDiedError()

    async def drain(headers):
        return [piece async for piece in relay(dies(), headers)]

    pieces = asyncio.run(drain({"content-type": "text/event-stream; charset=utf-8"}))
    assert (
        pieces[0] == b"data: {}\n\n"
        and json.loads(pieces[1][len(b"data: ") :])["error"]["type"] == "replica_unavailable"
    )
    with pytest.raises(ActorDiedError):
        asyncio.run(drain({"content-type": "application/json"}))


@pytest.mark.slow
def test_two_replicas_on_ray_serve(tmp_path):
    from ray import serve

    from ia3.serve.ray import build_app

    setup = Setup(tmp_path, "causal")
    config = ServeConfig(
        model=str(setup.model_dir), adapters_dir=str(setup.adapters), task="causal", max_new_tokens=140, dtype="float32"
    )
    port = _free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(
            build_app(
                config,
                num_replicas=2,
                max_adapters_per_replica=2,
                replica_actor_options={"num_cpus": 1},
                deployment_options={"health_check_period_s": 1},  # a dead replica is noticed within a second
            ),
            name="ia3",
            route_prefix="/",
        )
        url = f"http://127.0.0.1:{port}"
        _check_answers_and_metrics(url, setup)
        affinity = _affinity(url)
        assert affinity >= 0.9, affinity
        rows = _batch_beyond_rays_default(url)
        assert rows > 5, rows
        # one replica killed mid-stream while three clients keep sending: each request answered or cleanly refused
        body = {"prompt": TEXTS[1], "max_tokens": 6, "temperature": 0}
        wants = {
            a: httpx.post(url + "/v1/completions", json={"model": a, **body}, timeout=TIMEOUT_S).json() for a in "abc"
        }
        wants = {a: w["choices"][0]["text"] for a, w in wants.items()}
        stop, outcomes = threading.Event(), []
        clients = [threading.Thread(target=_load, args=(url, wants, stop, outcomes, i), daemon=True) for i in range(3)]
        for c in clients:
            c.start()
        time.sleep(1)
        killed = _kill_mid_stream(url)
        time.sleep(2)  # the load goes on past the kill (one replica left, the dead one noticed) ...
        stop.set()
        for c in clients:
            c.join(TIMEOUT_S + 5)
        assert not any(c.is_alive() for c in clients), "a client hung"
        bad = [o for o in outcomes if o not in ("answered", "retryable")]
        assert not bad and outcomes.count("answered") >= 3, (bad, len(outcomes))
        recovered_s = _wait_for_replacement(killed)  # ... and Serve starts a new replica
        for adapter in "abc":  # and afterwards every adapter is answered again
            r = httpx.post(url + "/v1/completions", json={"model": adapter, **body}, timeout=TIMEOUT_S)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == wants[adapter], r.text
        print(f"affinity {affinity:.2f}; batch {rows} rows; outcomes {len(outcomes)}: {outcomes.count('retryable')} retryable; "
              f"replica back in {recovered_s:.1f} s")  # fmt: skip
    finally:
        serve.shutdown()
        ray.shutdown()
