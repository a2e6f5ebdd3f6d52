"""`ia3 serve` on Ray Serve (`pip install 'ia3[ray]'`): N replicas of one engine behind Ray's HTTP proxy.

Two deployments:

* `Ia3Replica` (N replicas, or autoscaled): each runs the whole `ia3 serve` app in its process (its own engine,
  batcher and adapter LRU) and answers HTTP requests forwarded to it as plain dicts, streaming the response back.
  Its adapters are Ray Serve's multiplexed models: a replica that has an adapter reports it, and Ray routes later
  requests for that adapter to it (`max_adapters_per_replica` is Ray's per-replica model cap, and the replica's
  `--max-loaded-adapters` too, unless set).
* `Ia3Ingress`: Ray's HTTP proxy sends every request here; it reads the multiplexed model id (the
  `serve_multiplexed_model_id` header, else the JSON body's `model` (OpenAI) or `adapter` (native)) and forwards the
  request to a replica with `multiplexed_model_id` set. The base model and `__base__` route by load alone.

So every endpoint of `ia3 serve` (native, OpenAI, streaming, admin, metrics) works through Ray's proxy; admin calls
(`POST /v1/adapters/...`) and `/metrics` reach one replica. Every response names the replica that answered
(`ia3-replica`) and whether the request's adapter was already resident there (`ia3-adapter-resident`), and every
sample of a replica's `/metrics` carries `replica="<id>"`.

A replica that dies fails only what it was answering, cleanly: a request without an answer yet gets a JSON 503
`replica_unavailable` with `Retry-After`, an event stream under way ends with that error as its last event (no
`[DONE]`), any other body is cut off (see `relay`). Serve replaces the replica after its next health check.

Use: `serve.run(build_app(config, num_replicas=2))`, `ia3 serve --ray --replicas 2 ...`, or a `serve run` config
file whose `import_path` is `ia3.serve.ray:app_builder` with the `ServeConfig` fields as `args` (see README).
"""

# no `from __future__ import annotations`: FastAPI (through serve.ingress) reads the endpoint's annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from ia3.serve.config import ServeConfig
from ia3.tuner import BASE_ADAPTER

log = logging.getLogger("ia3.serve")
MODEL_ID_HEADER = "serve_multiplexed_model_id"
REPLICA_HEADER = "ia3-replica"
RESIDENT_HEADER = "ia3-adapter-resident"
RETRY_AFTER_S = 1
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
DEFAULT_ADAPTERS_PER_REPLICA = 64


@serve.deployment
class Ia3Replica:
    """One engine: the `ia3 serve` app in this process, fed forwarded requests."""

    def __init__(self, config: dict, max_adapters: int) -> None:
        from ia3.serve.app import create_app, tune_process

        settings = dict(config)
        settings.setdefault("max_loaded_adapters", max_adapters)
        self.app = create_app(ServeConfig(**settings))
        self.service = self.app.state.service
        self.service.batcher.start()
        tune_process()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.service.metrics.labels = {"replica": self.replica_id}  # every sample of its /metrics names it
        self.max_adapters = max_adapters
        service = self.service

        async def adapter(name: str) -> str:
            """Ray's multiplexed model: the adapter, made resident (ia3's own LRU keeps it or evicts it later)."""
            if service.has_adapter(name):
                await service.adapters.acquire(name, 1, service.on_worker)
                service.adapters.release(name, 1)
            return name

        self.adapter = serve.multiplexed(max_num_models_per_replica=max_adapters)(adapter)

    async def handle(self, request: dict) -> AsyncIterator[dict]:
        """Run `request` ({method, path, query, headers, body}) through the app: first {status, headers}, then
        {body} pieces as the app sends them (a stream stays a stream). The response names this replica
        (`ia3-replica`) and, for a request with an adapter, whether it was resident here when the request came
        (`ia3-adapter-resident`: 1, or 0 when this request loaded it)."""
        name = serve.get_multiplexed_model_id()
        extra = [(REPLICA_HEADER, self.replica_id)]
        if name:
            extra.append((RESIDENT_HEADER, "1" if self.service.registry.has(name) else "0"))
            try:
                await self.adapter(name)
            except Exception as err:  # the app answers the request itself (404, 422 ...)
                log.info("adapter %s not made resident ahead: %s", name, err)
        first = True
        async for message in asgi_call(self.app, request):
            if first:
                message["headers"] = [*message["headers"], *extra]
                first = False
            yield message

    def __del__(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.close()


async def asgi_call(app: Any, request: dict) -> AsyncIterator[dict]:
    """Drive the ASGI `app` with one HTTP request; yield its response start and body pieces as dicts."""
    queue: asyncio.Queue[dict | None] = asyncio.Queue()
    sent = {"body": False}
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": request["method"],
        "scheme": "http",
        "path": request["path"],
        "raw_path": request["path"].encode(),
        "query_string": request["query"].encode(),
        "root_path": "",
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request["headers"]],
        "client": (request.get("client") or "127.0.0.1", 0),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    done = asyncio.Event()

    async def receive() -> dict:
        if not sent["body"]:
            sent["body"] = True
            return {"type": "http.request", "body": request["body"], "more_body": False}
        await done.wait()  # the client "disconnects" once the response is over
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
            await queue.put({"status": message["status"], "headers": headers})
        elif message["type"] == "http.response.body" and message.get("body"):
            await queue.put({"body": message["body"]})

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await queue.put(None)

    task = asyncio.ensure_future(run())
    try:
        while (item := await queue.get()) is not None:
            yield item
        await task
    finally:
        done.set()
        if not task.done():
            task.cancel()


def model_id(headers: dict[str, str], body: bytes, base: str) -> str:
    """The multiplexed model id of a request: the header, else the JSON body's `model` / `adapter`; "" for the base
    model or a body without one."""
    name = headers.get(MODEL_ID_HEADER, "")
    if not name and body[:1] == b"{":
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if isinstance(data, dict):
            value = data.get("model", data.get("adapter"))
            name = value if isinstance(value, str) else ""
    return "" if name in (BASE_ADAPTER, base) else name[:200]


async def relay(stream: Any, headers: dict[str, str]) -> AsyncIterator[bytes]:
    """The body pieces of a replica's answer. If the replica fails mid-answer, an event stream ends with an error
    event (`data: {"error": {...}}`, as `ia3 serve` ends a stream whose request failed after the headers: OpenAI's
    clients raise it); any other body is cut off (the connection closes before the body is complete, which HTTP
    clients report as an error), never ended as if complete."""
    try:
        async for item in stream:
            yield item["body"]
    except Exception as err:
        event_stream = any(k.lower() == "content-type" and "text/event-stream" in v for k, v in headers.items())
        if not event_stream:
            raise
        _, body, _ = replica_failure(err)
        yield b"data: " + json.dumps(body).encode() + b"\n\n"


def replica_failure(err: BaseException) -> tuple[int, dict, int | None]:
    """(status, JSON body, Retry-After seconds or None) for a replica call that failed: 503 `replica_unavailable`
    (retry: the replica died, is restarting or is overloaded; Ray routes the retry to a live one) or 500
    `replica_error` for anything else."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(err, (RayActorError, BackPressureError, DeploymentUnavailableError)):
        log.warning("replica unavailable: %s: %s", type(err).__name__, str(err)[:300])
        message = f"The replica serving this request is unavailable ({type(err).__name__}); retry"
        return 503, {"error": {"type": "replica_unavailable", "message": message}}, RETRY_AFTER_S
    log.error("replica call failed: %s: %s", type(err).__name__, str(err)[:1000])
    return 500, {"error": {"type": "replica_error", "message": f"The replica failed: {type(err).__name__}"}}, None


# defined before the ingress: `serve.ingress` pickles the app (and what its endpoint refers to) as it decorates
ingress_app = FastAPI(title="ia3 serve (Ray Serve)")


@serve.deployment
@serve.ingress(ingress_app)
class Ia3Ingress:
    """Ray's HTTP entry: forwards every request to an `Ia3Replica`, routed by its adapter."""

    def __init__(self, replica: DeploymentHandle, base_model: str) -> None:
        self.replica = replica
        self.base_model = base_model

    @ingress_app.api_route("/{path:path}", methods=METHODS)
    async def forward(self, path: str, request: Request) -> Response:
        body = await request.body()
        headers = dict(request.headers)
        request_dict = {
            "method": request.method,
            "path": "/" + path,
            "query": request.url.query,
            "headers": [(k, v) for k, v in request.headers.items() if k.lower() != MODEL_ID_HEADER],
            "body": body,
            "client": request.client.host if request.client else None,
        }
        name = model_id(headers, body, self.base_model)
        handle = self.replica.options(stream=True, multiplexed_model_id=name)
        stream = handle.handle.remote(request_dict)
        try:
            start = await stream.__anext__()
        except Exception as err:  # the replica died or is unreachable before answering: a retryable 503
            stream.cancel()
            status, body_out, retry = replica_failure(err)
            return JSONResponse(body_out, status_code=status, headers={"Retry-After": str(retry)} if retry else {})
        headers_out = {k: v for k, v in start["headers"] if k.lower() not in ("content-length", "transfer-encoding")}
        return StreamingResponse(relay(stream, headers_out), status_code=start["status"], headers=headers_out)


def build_app(
    config: ServeConfig,
    num_replicas: int | str = 1,
    max_adapters_per_replica: int | None = None,
    autoscaling_config: dict | None = None,
    replica_actor_options: dict | None = None,
    deployment_options: dict | None = None,
) -> Any:
    """The Ray Serve application of `config`: `num_replicas` engines (or `autoscaling_config`, Ray's dict:
    `min_replicas`, `max_replicas`, `target_ongoing_requests`, ...) behind one ingress. `max_adapters_per_replica`:
    adapters each replica keeps (Ray's multiplexing cap and `--max-loaded-adapters` unless that is set; default
    `--max-loaded-adapters`, else 64). `replica_actor_options`: Ray actor options of each replica (e.g.
    `{"num_gpus": 1}`). `deployment_options`: more Serve deployment options of the replicas (e.g.
    `health_check_period_s`, default 10: how soon a dead replica is noticed and replaced; `max_ongoing_requests`,
    default `--max-queue`: requests a replica takes at once, the most its decode batch can hold from Ray)."""
    settings = dataclasses.asdict(config)
    per_replica = max_adapters_per_replica or config.max_loaded_adapters or DEFAULT_ADAPTERS_PER_REPLICA
    # a replica takes as many requests at once as its own queue admits (Ray's default, 5, would cap its decode
    # batch at 5 rows); the ingress only forwards, so it takes that many for every replica
    options: dict[str, Any] = {
        "max_ongoing_requests": config.max_queue,
        **(deployment_options or {}),
        "ray_actor_options": replica_actor_options or {},
    }
    if autoscaling_config is not None:
        options["autoscaling_config"] = autoscaling_config
        most = autoscaling_config.get("max_replicas", 1)
    else:
        options["num_replicas"] = num_replicas
        most = num_replicas if isinstance(num_replicas, int) else 1
    replica = Ia3Replica.options(**options).bind({k: v for k, v in settings.items() if v is not None}, per_replica)
    forwarding = max(1, most) * options["max_ongoing_requests"]
    return Ia3Ingress.options(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=forwarding).bind(
        replica, config.model
    )


def app_builder(args: dict) -> Any:
    """`serve run` / a Serve config file's `import_path: ia3.serve.ray:app_builder`: `args` holds the `ServeConfig`
    fields plus `num_replicas`, `max_adapters_per_replica`, `autoscaling_config`, `replica_actor_options`,
    `deployment_options`."""
    args = dict(args)
    extra = {
        k: args.pop(k)
        for k in (
            "num_replicas",
            "max_adapters_per_replica",
            "autoscaling_config",
            "replica_actor_options",
            "deployment_options",
        )
        if k in args
    }
    return build_app(ServeConfig(**args), **extra)


def run(config: ServeConfig, replicas: int, host: str, port: int, max_adapters_per_replica: int | None = None) -> None:
    """`ia3 serve --ray`: start (or join, with RAY_ADDRESS) a Ray cluster, serve on `host:port` until interrupted."""
    import time

    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(config, replicas, max_adapters_per_replica), name="ia3", route_prefix="/")
    log.info("ia3 serve on Ray Serve: %d replica(s) at http://%s:%d", replicas, host, port)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
