"""The HTTP API (FastAPI): `create_app(config)` builds it, `run(config, host, port)` serves it with uvicorn.

    POST /v1/generate        {"adapter": "name" | "__base__", "inputs": "text" | ["text", ...], "parameters": {...}}
    POST /v1/classify        {"adapter": ..., "inputs": ..., "parameters": {"labels": [...]}}
    GET  /v1/adapters        loaded adapters
    POST /v1/adapters/{name} load `adapters_dir/name`, or {"source": "<hub id>", "revision": ...}
    DELETE /v1/adapters/{name}
    GET  /health, GET /metrics, GET /openapi.json, GET /docs

Every error is a 4xx/5xx with `{"error": {"type": ..., "message": ...}}`; the server keeps serving.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations, which name local objects
import asyncio
import hashlib
import hmac
import itertools
import logging
import time
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ia3.serve.batcher import Batch, Batcher, Job
from ia3.serve.config import ServeConfig
from ia3.serve.engine import Engine, GenerateParams, labels_from_recipes
from ia3.serve.errors import ApiError, adapter_not_found
from ia3.serve.metrics import Metrics
from ia3.serve.registry import AdapterInfo, Registry, check_name
from ia3.tuner import BASE_ADAPTER

log = logging.getLogger("ia3.serve")
DEFAULT_MAX_NEW_TOKENS = 32
_seeded = itertools.count()


# -- request and response bodies -----------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class GenerateParameters(_Strict):
    max_new_tokens: int | None = Field(
        None, ge=1, description="new tokens per input (default 32; clamped to the server's cap)"
    )
    num_beams: int = Field(1, ge=1, description="beam search width (1: greedy); capped by the server")
    do_sample: bool = Field(False, description="sample instead of greedy/beam decoding")
    temperature: float = Field(1.0, gt=0, le=100, description="sampling only")
    top_p: float = Field(1.0, gt=0, le=1, description="sampling only")
    top_k: int = Field(50, ge=0, description="sampling only")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="sampling only: run alone, seeded (reproducible)")


class GenerateRequest(_Strict):
    adapter: str = Field(..., description="a loaded adapter's name, or '__base__' for the base model")
    inputs: str | list[str] = Field(..., description="one text or a list of texts")
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)


class ClassifyParameters(_Strict):
    labels: list[str] | None = Field(
        None, description="label strings to rank (seq2seq/causal); default: the server's label names"
    )


class ClassifyRequest(_Strict):
    adapter: str = Field(..., description="a loaded adapter's name, or '__base__' for the base model")
    inputs: str | list[str] = Field(..., description="one text or a list of texts")
    parameters: ClassifyParameters = Field(default_factory=ClassifyParameters)


class AdapterLoadRequest(_Strict):
    source: str | None = Field(
        None,
        description="a Hub repo id ('owner/name'); absent: the folder of that name under the server's adapters folder",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit)")


class GenerateOutput(BaseModel):
    text: str


class GenerateResponse(BaseModel):
    adapter: str
    outputs: list[GenerateOutput]
    parameters: dict[str, Any]


class ClassifyOutput(BaseModel):
    label: str
    scores: dict[str, float]


class ClassifyResponse(BaseModel):
    adapter: str
    labels: list[str]
    outputs: list[ClassifyOutput]


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in [
        (400, "malformed JSON"),
        (401, "missing or wrong API key"),
        (404, "unknown adapter"),
        (413, "body, input or number of inputs too large"),
        (422, "invalid request"),
        (503, "queue full"),
        (504, "timed out"),
    ]
}


# -- the service: model, queue, adapters, metrics --------------------------------------------------------------------
class Service:
    """Everything behind the endpoints. `create_app` makes one; tests reach it as `app.state.service`."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.registry = Registry(config.adapters_dir, config.task, config.allow_hub)
        folders = self.registry.startup_folders()
        labels = config.label_names or labels_from_recipes([folder for _, folder in folders])
        self.engine = Engine(config, labels)
        self.metrics = Metrics()
        for name, folder in folders:
            try:
                info_config = self.registry.read_config(folder, name)
                self._load_now(name, folder, f"local:{name}", info_config)
            except ApiError as err:
                log.warning("adapter %s not loaded: %s", name, err.message)
        self.batcher = Batcher(
            self._run_batch,
            max_batch_size=config.max_batch_size,
            max_wait_s=config.max_wait_ms / 1000,
            max_queue=config.max_queue,
            on_batch=self._on_batch,
        )

    # -- adapters (the worker thread, or before it starts) ---------------------------------------------------------
    def _load_now(self, name: str, folder: Path, source: str, adapter_config) -> dict:
        if self.registry.has(name):
            raise ApiError(409, "adapter_exists", f"Adapter {name!r} is already loaded; DELETE it first")
        try:
            self.engine.load_adapter(name, folder)
        except FileNotFoundError as err:
            raise ApiError(404, "adapter_not_found", str(err)[:1000]) from None
        except (ValueError, TypeError) as err:
            raise ApiError(422, "adapter_incompatible", f"Adapter {name!r}: {str(err)[:1000]}") from None
        info = AdapterInfo(name, source, str(folder), adapter_config.task_type, adapter_config.base_model_name_or_path)
        self.registry.add(info)
        return info.public()

    def _delete_now(self, name: str) -> None:
        if not self.registry.has(name):
            raise adapter_not_found(name)
        self.engine.delete_adapter(name)
        self.registry.remove(name)

    # -- batches (the worker thread) -------------------------------------------------------------------------------
    def _run_batch(self, batch: Batch) -> list[Any]:
        results: list[Any] = [None] * len(batch.items)
        loaded = set(self.registry.names())
        run: list[int] = []
        for i, adapter in enumerate(batch.adapters):
            if adapter == BASE_ADAPTER or adapter in loaded:
                run.append(i)
            else:  # deleted while the request waited
                results[i] = ApiError(404, "adapter_not_found", f"Adapter {adapter!r} was unloaded")
        if not run:
            return results
        ids = self.engine.encode([batch.rows[i] for i in run])
        keep = []
        for i, row in zip(run, ids):
            if row:
                keep.append((i, row))
            else:
                results[i] = ApiError(422, "invalid_input", "An input gives no tokens")
        if not keep:
            return results
        index, rows = [i for i, _ in keep], [r for _, r in keep]
        adapters = [batch.adapters[i] for i in index]
        if batch.kind == "generate":
            outputs: list[Any] = self.engine.generate(rows, adapters, batch.params)
        else:
            labels = batch.params
            outputs = []
            for scores in self.engine.classify(rows, adapters, labels):
                best = max(range(len(scores)), key=scores.__getitem__)
                outputs.append({"label": labels[best], "scores": dict(zip(labels, scores))})
        for i, out in zip(index, outputs):
            results[i] = out
        return results

    def _on_batch(self, batch: Batch, seconds: float) -> None:
        self.metrics.record_batch(
            len(batch.items), len({id(job) for job, _ in batch.items}), len(set(batch.adapters)), seconds
        )

    # -- request side (event loop) ---------------------------------------------------------------------------------
    def check_inputs(self, inputs: str | list[str]) -> list[str]:
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        cfg = self.config
        if not texts:
            raise ApiError(422, "invalid_request", "inputs is empty: give a text or a non-empty list of texts")
        if len(texts) > cfg.max_inputs:
            raise ApiError(413, "too_many_inputs", f"{len(texts)} inputs; at most {cfg.max_inputs} per request")
        for i, text in enumerate(texts):
            if len(text) > cfg.max_input_chars:
                raise ApiError(
                    413, "input_too_long", f"inputs[{i}] has {len(text)} characters; at most {cfg.max_input_chars}"
                )
            if not text.strip():
                raise ApiError(422, "invalid_request", f"inputs[{i}] is empty")
        return texts

    def check_adapter(self, adapter: str) -> None:
        if adapter != BASE_ADAPTER and not self.registry.has(adapter):
            raise adapter_not_found(adapter[:100], self.registry.names())

    async def submit(self, kind: str, key: Any, texts: list[str], adapter: str, params: Any) -> list[Any]:
        if not self.config.mix_adapters:
            key = (key, adapter)
        job = Job(kind, key, texts, adapter, params)
        future = self.batcher.submit(job)
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), self.config.request_timeout_s)
        except TimeoutError:
            self.batcher.cancel(job)
            raise ApiError(504, "timeout", f"No answer within {self.config.request_timeout_s:g} s") from None
        except asyncio.CancelledError:
            self.batcher.cancel(job)
            raise

    async def on_worker(self, fn) -> Any:
        future = self.batcher.call(fn)
        try:
            return await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(future)), max(self.config.request_timeout_s, 60.0)
            )
        except TimeoutError:
            raise ApiError(504, "timeout", "The worker did not get to this in time; it will still run") from None


# -- middleware ------------------------------------------------------------------------------------------------------
async def _send_json(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    import json

    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


class BodyLimit:
    """Reads the request body up to `max_bytes` before the app sees it; more gets 413 (no JSON parsing)."""

    DRAIN_LIMIT = 64 * 1024 * 1024  # read (and drop) up to this much of a refused body, so the client sees the 413

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _drain(self, receive, size: int) -> None:
        # closing a connection with unread data makes the kernel reset it, and the client may lose the answer
        while size <= self.DRAIN_LIMIT:
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = ApiError(413, "body_too_large", f"Request body exceeds {self.max_bytes} bytes")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await _send_json(send, 400, ApiError(400, "invalid_request", "Bad Content-Length").body())
                return
            if size > self.max_bytes:
                if size <= self.DRAIN_LIMIT:
                    await self._drain(receive, 0)
                await _send_json(send, 413, too_large.body(), {"connection": "close"})
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                if message.get("more_body", False):
                    await self._drain(receive, size)
                await _send_json(send, 413, too_large.body(), {"connection": "close"})
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class RequestMetrics:
    """Counts every HTTP request by route and status; latency of answered generate/classify requests."""

    TIMED = ("/v1/generate", "/v1/classify")

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def tracked(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        finally:
            path = scope.get("path", "")
            route = "/v1/adapters/{name}" if path.startswith("/v1/adapters/") else path
            if route not in (*self.TIMED, "/v1/adapters", "/v1/adapters/{name}", "/health", "/metrics"):
                route = "other"
            seconds = time.perf_counter() - start if route in self.TIMED and status["code"] == 200 else None
            self.metrics.record_request(route, status["code"], seconds)


# -- the app ---------------------------------------------------------------------------------------------------------
def _validation_message(err: RequestValidationError) -> tuple[int, str, str]:
    errors = err.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return 400, "invalid_json", f"The body is not valid JSON{': ' + str(detail) if detail else ''}"
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return 422, "invalid_request", "; ".join(parts)


def create_app(config: ServeConfig | None = None, *, service: Service | None = None) -> FastAPI:
    """The FastAPI app serving `config` (loads the model and adapters now; the worker starts with the app)."""
    if service is None:
        if config is None:
            raise ValueError("create_app needs a ServeConfig (or a Service)")
        service = Service(config)
    svc = service
    cfg = svc.config

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc.batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(svc.batcher.stop)

    app = FastAPI(
        title="ia3 serve",
        version=_version(),
        lifespan=lifespan,
        description="One base model, many (IA)^3 adapters, mixed in every batch.",
    )
    app.state.service = svc

    bearer = HTTPBearer(auto_error=False)
    header = APIKeyHeader(name="X-API-Key", auto_error=False)
    key_digest = hashlib.sha256(cfg.api_key.encode()).digest() if cfg.api_key else None

    async def require_key(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
        api_key: Annotated[str | None, Depends(header)],
    ) -> None:
        if key_digest is None:
            return
        given = api_key if api_key is not None else (credentials.credentials if credentials else None)
        # compare digests in constant time: neither the key's content nor its length leaks through timing
        if given is None or not hmac.compare_digest(hashlib.sha256(given.encode()).digest(), key_digest):
            raise ApiError(
                401,
                "unauthorized",
                "Missing or wrong API key (Authorization: Bearer KEY or X-API-Key)",
                headers={"WWW-Authenticate": "Bearer"},
            )

    auth = [Depends(require_key)]

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        status, kind, message = _validation_message(err)
        return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return JSONResponse(
            {"error": {"type": kind, "message": str(err.detail)}},
            status_code=err.status_code,
            headers=getattr(err, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception) -> JSONResponse:
        log.exception("internal error")
        return JSONResponse(
            {"error": {"type": "internal_error", "message": f"{type(err).__name__}: {str(err)[:300]}"}}, status_code=500
        )

    @app.post("/v1/generate", response_model=GenerateResponse, dependencies=auth, responses=ERRORS)
    async def generate(body: GenerateRequest) -> dict:
        """Generate text for each input with the adapter (greedy unless `do_sample`)."""
        if not svc.engine.task.generates:
            raise ApiError(422, "unsupported", f"This server runs a classifier (task {cfg.task}); use /v1/classify")
        texts = svc.check_inputs(body.inputs)
        svc.check_adapter(body.adapter)
        p = body.parameters
        if p.num_beams > cfg.max_beams:
            raise ApiError(422, "invalid_request", f"parameters.num_beams: at most {cfg.max_beams}")
        max_new = min(p.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, cfg.max_new_tokens)
        if p.do_sample:
            params = GenerateParams(max_new, p.num_beams, True, p.temperature, p.top_p, p.top_k, p.seed)
        else:  # sampling settings do not matter: leave them out of the batching key
            params = GenerateParams(max_new, p.num_beams)
        key = ("generate", params, next(_seeded) if params.seed is not None else None)
        outputs = await svc.submit("generate", key, texts, body.adapter, params)
        effective = {"max_new_tokens": max_new, "num_beams": p.num_beams, "do_sample": p.do_sample}
        if p.do_sample:
            effective.update(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=p.seed)
        return {"adapter": body.adapter, "outputs": [{"text": t} for t in outputs], "parameters": effective}

    @app.post("/v1/classify", response_model=ClassifyResponse, dependencies=auth, responses=ERRORS)
    async def classify(body: ClassifyRequest) -> dict:
        """Rank the label strings (seq2seq/causal: mean token log-probability) or apply the adapter's head (cls)."""
        texts = svc.check_inputs(body.inputs)
        svc.check_adapter(body.adapter)
        labels = body.parameters.labels
        if labels is not None:
            if not svc.engine.task.generates:
                raise ApiError(
                    422, "invalid_request", "parameters.labels: a classifier's labels are its head's classes"
                )
            if not labels or len(labels) > cfg.max_labels:
                raise ApiError(422, "invalid_request", f"parameters.labels: give 1 to {cfg.max_labels} labels")
            if any(not x.strip() or len(x) > 200 for x in labels) or len(set(labels)) != len(labels):
                raise ApiError(422, "invalid_request", "parameters.labels: distinct, non-empty, at most 200 characters")
        else:
            labels = svc.engine.label_names
            if not labels:
                raise ApiError(422, "invalid_request", "This server has no label names: pass parameters.labels")
        labels_key = tuple(labels)
        outputs = await svc.submit("classify", ("classify", labels_key), texts, body.adapter, labels_key)
        return {"adapter": body.adapter, "labels": list(labels), "outputs": outputs}

    @app.get("/v1/adapters", dependencies=auth, responses=ERRORS)
    async def list_adapters() -> dict:
        """The loaded adapters (and the name of the base model's pseudo-adapter)."""
        return {"base": BASE_ADAPTER, "adapters": svc.registry.infos()}

    @app.post("/v1/adapters/{name}", status_code=201, dependencies=auth, responses=ERRORS)
    async def load_adapter(name: str, body: Annotated[AdapterLoadRequest | None, Body()] = None) -> dict:
        """Load adapter `name` from the adapters folder, or from the Hub repo in `source`."""
        check_name(name)
        if svc.registry.has(name):
            raise ApiError(409, "adapter_exists", f"Adapter {name!r} is already loaded; DELETE it first")
        if body is not None and body.source is not None:
            folder = await run_in_threadpool(svc.registry.hub_folder, body.source, body.revision)
            source = f"hub:{body.source}" + (f"@{body.revision}" if body.revision else "")
        else:
            if body is not None and body.revision is not None:
                raise ApiError(422, "invalid_request", "revision needs a Hub 'source'")
            folder = await run_in_threadpool(svc.registry.local_folder, name)
            source = f"local:{name}"
        adapter_config = await run_in_threadpool(svc.registry.read_config, folder, name)
        info = await svc.on_worker(partial(svc._load_now, name, folder, source, adapter_config))
        return {"adapter": info}

    @app.delete("/v1/adapters/{name}", dependencies=auth, responses=ERRORS)
    async def delete_adapter(name: str) -> dict:
        """Unload adapter `name`; requests for it still queued get 404."""
        check_name(name)
        await svc.on_worker(partial(svc._delete_now, name))
        return {"deleted": name}

    @app.get("/health")
    async def health() -> JSONResponse:
        """Liveness: the worker thread is running."""
        alive = svc.batcher._thread is not None and svc.batcher._thread.is_alive()
        body = {
            "status": "ok" if alive else "unavailable",
            "model": cfg.model,
            "task": cfg.task,
            "device": str(svc.engine.device),
            "adapters": len(svc.registry.names()),
            "queue_depth": svc.batcher.depth(),
        }
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics", dependencies=auth)
    async def metrics() -> dict:
        """Requests by route and status, batch sizes, adapters per batch, queue depth, latency percentiles."""
        return {**svc.metrics.snapshot(), "queue": svc.batcher.stats(), "adapters_loaded": len(svc.registry.names())}

    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=svc.metrics)
    return app


def _version() -> str:
    try:
        from ia3 import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "0"


def run(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Load the model and adapters, then serve on `host:port` until interrupted (uvicorn)."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        log.warning("serving on %s without an API key: anyone who can reach this port can use it", host)
    app = create_app(config)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=5, server_header=False)
