"""The HTTP API (FastAPI): `create_app(config)` builds it, `run(config, host, port)` serves it with uvicorn.

    POST /v1/generate        {"adapter": "name" | "__base__", "inputs": "text" | ["text", ...], "parameters": {...}}
    POST /v1/classify        {"adapter": ..., "inputs": ..., "parameters": {"labels": [...]}}
    GET  /v1/adapters        loaded adapters
    POST /v1/adapters/{name} load `adapters_dir/name`, or {"source": "<hub id>", "revision": ...}
    DELETE /v1/adapters/{name}
    GET  /v1/models, POST /v1/completions, POST /v1/chat/completions   OpenAI-compatible (`model` = adapter name)
    GET  /health, GET /metrics (Prometheus text; ?format=json), GET /openapi.json, GET /docs

Every error is a 4xx/5xx with `{"error": {"type": ..., "message": ...}}`; the server keeps serving.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations, which name local objects
import hashlib
import hmac
import logging
import time
from contextlib import asynccontextmanager
from functools import partial
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ia3.serve.config import ServeConfig
from ia3.serve.decoding import Sampling
from ia3.serve.errors import ApiError
from ia3.serve.http import BodyLimit, Guard, uvicorn_config
from ia3.serve.metrics import Metrics
from ia3.serve.openai_api import add_openai_routes
from ia3.serve.registry import check_name
from ia3.serve.service import ClientGone, GenerationRequest, Service, Watch, check_text
from ia3.tuner import BASE_ADAPTER

log = logging.getLogger("ia3.serve")
DEFAULT_MAX_NEW_TOKENS = 32
CLIENT_GONE = 499  # the status recorded for a request whose client disconnected (nginx's convention)


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
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="sampling only: a seeded, reproducible sample")
    stop: list[str] | None = Field(None, description="stop sequences: the text ends before the first one found")


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
    finish_reason: str = Field(description="stop (EOS or a stop sequence) or length (max_new_tokens)")
    tokens: int = Field(description="tokens generated")
    truncated_input_tokens: int = Field(0, description="tokens dropped from the start of a too-long input")


class GenerateResponse(BaseModel):
    adapter: str
    outputs: list[GenerateOutput]
    parameters: dict[str, Any]
    usage: dict[str, int]


class ClassifyOutput(BaseModel):
    label: str
    scores: dict[str, float]
    truncated_input_tokens: int = 0


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
        (408, "request headers or body too slow"),
        (503, "queue full"),
        (504, "timed out"),
    ]
}


class RequestMetrics:
    """Counts every HTTP request by route and status; latency of answered generate/classify requests."""

    TIMED = ("/v1/generate", "/v1/classify", "/v1/completions", "/v1/chat/completions")
    ROUTES = (*TIMED, "/v1/models", "/v1/adapters", "/v1/adapters/{name}", "/health", "/metrics")

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
            if route not in self.ROUTES:
                route = "other"
            code = CLIENT_GONE if scope.get("state", {}).get("client_gone") else status["code"]
            seconds = time.perf_counter() - start if route in self.TIMED and code == 200 else None
            self.metrics.record_request(route, code, seconds)


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


def watch(request: Request) -> Watch:
    """A `Watch` that resolves when the request's client disconnects (the body has been read by then)."""

    async def disconnected() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                request.scope.setdefault("state", {})["client_gone"] = True
                return

    return Watch(disconnected)


def client_gone() -> Response:
    """What a request whose client went away gets (nobody reads it; the status keeps it out of the answered)."""
    return Response(status_code=CLIENT_GONE)


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
            await run_in_threadpool(svc.close)

    app = FastAPI(
        title="ia3 serve",
        version=_version(),
        lifespan=lifespan,
        description="One base model, many (IA)^3 adapters, mixed in every batch; an OpenAI-compatible API.",
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

    @app.post("/v1/generate", response_model=GenerateResponse, dependencies=auth, responses=ERRORS)
    async def generate(body: GenerateRequest, request: Request) -> Any:
        """Generate text for each input with the adapter (greedy unless `do_sample`)."""
        if not svc.engine.task.generates:
            raise ApiError(422, "unsupported", f"This server runs a classifier (task {cfg.task}); use /v1/classify")
        texts = svc.check_inputs(body.inputs)
        svc.check_adapter(body.adapter)
        p = body.parameters
        if p.num_beams > cfg.max_beams:
            raise ApiError(422, "invalid_request", f"parameters.num_beams: at most {cfg.max_beams}")
        stop = svc.check_stop(p.stop)
        max_new = min(p.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, cfg.max_new_tokens)
        sampling = Sampling(p.temperature, p.top_p, p.top_k, p.seed) if p.do_sample else Sampling()
        prompts = await svc.encode_inputs(texts)
        job = GenerationRequest(prompts, body.adapter, max_new, 1, p.num_beams, sampling, p.top_k, stop)
        try:
            outputs = await svc.generate(job, watch(request))
        except ClientGone:
            return client_gone()
        effective: dict[str, Any] = {"max_new_tokens": max_new, "num_beams": p.num_beams, "do_sample": p.do_sample}
        if p.do_sample:
            effective.update(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=p.seed)
        if stop:
            effective["stop"] = list(stop)
        prompt_tokens = sum(len(x.ids) for x in prompts)
        completion_tokens = sum(o.tokens for o in outputs)
        return {
            "adapter": body.adapter,
            "outputs": [
                {
                    "text": o.text,
                    "finish_reason": o.finish_reason,
                    "tokens": o.tokens,
                    "truncated_input_tokens": prompts[o.prompt].dropped,
                }
                for o in outputs
            ],
            "parameters": effective,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    @app.post("/v1/classify", response_model=ClassifyResponse, dependencies=auth, responses=ERRORS)
    async def classify(body: ClassifyRequest, request: Request) -> Any:
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
            for i, label in enumerate(labels):
                check_text(label, f"parameters.labels[{i}]")
        else:
            labels = svc.engine.label_names
            if not labels:
                raise ApiError(422, "invalid_request", "This server has no label names: pass parameters.labels")
        try:
            outputs = await svc.classify(texts, body.adapter, tuple(labels), watch(request))
        except ClientGone:
            return client_gone()
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

    @app.get("/metrics", dependencies=auth, response_model=None)
    async def metrics(format: str = "prometheus") -> Response:
        """Prometheus text metrics (requests, tokens per adapter, queue depth, batch occupancy, tokens/s);
        `?format=json` for the JSON view."""
        stats = svc.batcher.stats()
        if format == "json":
            return JSONResponse(
                {
                    **svc.metrics.snapshot(),
                    "queue": stats,
                    "adapters_loaded": len(svc.registry.names()),
                    "tokens_per_second": round(svc.metrics.tokens_per_second(), 3),
                    "decode": svc.engine.decoder.stats() if svc.engine.decoder is not None else None,
                }
            )
        if format != "prometheus":
            raise ApiError(422, "invalid_request", "format: prometheus (default) or json")
        decoder = svc.engine.decoder
        protocol = getattr(app.state, "protocol", None)
        gauges = {
            "queue_depth": ("requests admitted and not yet answered", stats["depth"]),
            "queue_capacity": ("requests admitted at most (--max-queue)", stats["capacity"]),
            "pending_rows": ("rows waiting to run", stats["pending_rows"]),
            "decoding_rows": ("rows in the continuous decode batch", stats["decoding_rows"]),
            "batch_occupancy": ("decoding rows / --max-batch-size", stats["decoding_rows"] / cfg.max_batch_size),
            "tokens_per_second": ("generated tokens per second over the last minute", svc.metrics.tokens_per_second()),
            "adapters_loaded": ("adapters loaded", len(svc.registry.names())),
        }
        counters = {
            "decode_steps_total": ("continuous decode steps", decoder.steps if decoder else 0),
            "connections_refused_total": (
                "connections closed at once: over --max-connections",
                getattr(protocol, "refused", 0),
            ),
            "header_timeouts_total": ("connections closed: headers too slow", getattr(protocol, "header_timeouts", 0)),
        }
        return PlainTextResponse(
            svc.metrics.prometheus(gauges, counters), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    add_openai_routes(app, svc, auth, watch, client_gone)

    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes, timeout_s=cfg.body_timeout_s)
    app.add_middleware(RequestMetrics, metrics=svc.metrics)
    app.add_middleware(Guard)
    return app


def _version() -> str:
    try:
        from ia3 import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "0"


def _raise_file_limit(wanted: int) -> None:
    """Let the process open `wanted` connections (plus files): raise the soft descriptor limit toward the hard one."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        need = wanted + 128
        if soft != resource.RLIM_INFINITY and soft < need:
            target = need if hard == resource.RLIM_INFINITY else min(need, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        if soft != resource.RLIM_INFINITY and soft < need:
            log.warning("--max-connections %d is near the file limit (%d): lower it or raise ulimit -n", wanted, soft)
    except (ImportError, ValueError, OSError):  # not on this platform
        pass


def run(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Load the model and adapters, then serve on `host:port` until interrupted (uvicorn)."""
    import uvicorn

    if not logging.getLogger("ia3.serve").handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logging.getLogger("ia3.serve").addHandler(handler)
        logging.getLogger("ia3.serve").setLevel(log_level.upper())
    if host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        log.warning("serving on %s without an API key: anyone who can reach this port can use it", host)
    _raise_file_limit(config.max_connections)
    app = create_app(config)
    log.info(app.state.service.summary())
    uvicorn.Server(uvicorn_config(app, config, host, port, log_level)).run()
