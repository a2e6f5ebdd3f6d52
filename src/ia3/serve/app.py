"""The HTTP app (FastAPI): `create_app(config)` assembles it, `run(config, host, port)` serves it with uvicorn.

    POST /v1/generate        {"adapter": "name" | "__base__", "inputs": "text" | ["text", ...], "parameters": {...}}
    POST /v1/classify        {"adapter": ..., "inputs": ..., "parameters": {"labels": [...]}}
    GET  /v1/adapters        loaded adapters
    POST /v1/adapters/{name} load `adapters_dir/name`, or {"source": "<hub id>", "revision": ...}
    DELETE /v1/adapters/{name}
    GET  /v1/models, POST /v1/completions, POST /v1/chat/completions   OpenAI-compatible (`model` = adapter name)
    POST /tokenize, POST /detokenize, GET /tokenizer_info               vLLM's tokenizer endpoints
    GET  /health, GET /metrics (Prometheus text; ?format=json), GET /openapi.json, GET /docs

The endpoints live in `ia3.serve.routes` (one router per API), their bodies in `ia3.serve.schemas`; this module
only puts them together with the `Service`, the error handlers and the ASGI middleware (body limit, request
metrics, request ids). Every error is a 4xx/5xx with `{"error": {"type": ..., "message": ...}}`; the server keeps
serving.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ia3.serve.config import ServeConfig
from ia3.serve.dependencies import CLIENT_GONE
from ia3.serve.errors import ApiError
from ia3.serve.http import BodyLimit, Guard, raise_file_limit, uvicorn_config
from ia3.serve.metrics import Metrics
from ia3.serve.routes import INFERENCE, admin, metrics, native, openai
from ia3.serve.service import Service

log = logging.getLogger("ia3.serve")


class RequestMetrics:
    """ASGI middleware: counts every HTTP request by route template and status, and times the answered requests of
    the routes tagged `inference`. The routes are read from the app, so a new endpoint is counted as it is added."""

    def __init__(self, app: Any, metrics: Metrics, routes: list[APIRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes
        self.timed = {r.path for r in routes if INFERENCE in r.tags}

    def route_of(self, scope: dict) -> str:
        """The template of the route that took the request; for a request refused before routing (a body too
        large, ...), the route its path and method would have gone to; else "other"."""
        matched = scope.get("route")  # set by the router when a route matched the request
        if isinstance(matched, APIRoute):
            return matched.path
        return next((r.path for r in self.routes if r.matches(scope)[0] != Match.NONE), "other")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def tracked(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        finally:
            route = self.route_of(scope)
            code = CLIENT_GONE if scope.get("state", {}).get("client_gone") else status["code"]
            seconds = time.perf_counter() - start if route in self.timed and code == 200 else None
            self.metrics.record_request(route, code, seconds)


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


# the OpenAI-compatible routes answer an invalid request 400, as OpenAI's API and vLLM do (the native API: 422)
OPENAI_PATHS = frozenset(r.path for r in openai.router.routes if isinstance(r, APIRoute))


def _status(request: Request, status: int) -> int:
    route = request.scope.get("route")
    return 400 if status == 422 and isinstance(route, APIRoute) and route.path in OPENAI_PATHS else status


async def _api_error(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, ApiError)
    return JSONResponse(err.body(), status_code=_status(request, err.status), headers=err.headers)


async def _invalid(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, RequestValidationError)
    status, kind, message = _validation_message(err)
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=_status(request, status))


async def _http(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, StarletteHTTPException)
    kind = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
    return JSONResponse(
        {"error": {"type": kind, "message": str(err.detail)}},
        status_code=err.status_code,
        headers=getattr(err, "headers", None),
    )


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    svc: Service = app.state.service
    svc.batcher.start()
    try:
        yield
    finally:
        await asyncio.to_thread(svc.close)


def create_app(config: ServeConfig | None = None, *, service: Service | None = None) -> FastAPI:
    """The FastAPI app serving `config` (loads the model and adapters now; the worker starts with the app)."""
    if service is None:
        if config is None:
            raise ValueError("create_app needs a ServeConfig (or a Service)")
        service = Service(config)
    app = FastAPI(
        title="ia3 serve",
        version=_version(),
        lifespan=_lifespan,
        description="One base model, many (IA)^3 adapters, mixed in every batch; an OpenAI-compatible API.",
    )
    app.state.service = service
    routers = (native.router, admin.router, metrics.router, openai.router)
    for router in routers:
        app.include_router(router)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http)
    routes = [r for router in routers for r in router.routes if isinstance(r, APIRoute)]
    app.add_middleware(BodyLimit, max_bytes=service.config.max_body_bytes, timeout_s=service.config.body_timeout_s)
    app.add_middleware(RequestMetrics, metrics=service.metrics, routes=routes)
    app.add_middleware(Guard)
    return app


def _version() -> str:
    try:
        return version("ia3")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "0"


def tune_process() -> None:
    """Process settings of a server: the start-up's objects frozen out of the garbage collector's sight (SmolLM2:
    ~470,000; a full collection over them took ~200 ms with the GIL held, stalling every thread)."""
    gc.collect()
    gc.freeze()


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
    raise_file_limit(config.max_connections)  # uvicorn_config sizes the listen backlog to the limit reached
    app = create_app(config)
    if config.save_tokenizer:
        log.info("tokenizer written to %s", app.state.service.save_tokenizer(config.save_tokenizer))
    log.info(app.state.service.summary())
    tune_process()
    uvicorn.Server(uvicorn_config(app, config, host, port, log_level)).run()
