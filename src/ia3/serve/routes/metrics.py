"""`GET /metrics`: Prometheus text (requests, tokens per adapter, queue depth, batch occupancy, tokens/s), or
`?format=json`."""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from ia3.serve.dependencies import ServiceDep, require_key
from ia3.serve.errors import ApiError
from ia3.serve.schemas import ERRORS

router = APIRouter(dependencies=[Depends(require_key)], responses=ERRORS)


@router.get("/metrics", response_model=None)
async def metrics(request: Request, svc: ServiceDep, format: str = "prometheus") -> Response:
    """Prometheus text metrics (requests, tokens per adapter, queue depth, batch occupancy, tokens/s);
    `?format=json` for the JSON view."""
    stats = svc.batcher.stats()
    decoder = svc.engine.decoder
    if format == "json":
        return JSONResponse(
            {
                **svc.metrics.snapshot(),
                "queue": stats,
                "adapters_loaded": len(svc.adapter_infos()),
                "tokens_per_second": round(svc.metrics.tokens_per_second(), 3),
                "decode": decoder.stats() if decoder is not None else None,
                "budgets": svc.budgets(),
            }
        )
    if format != "prometheus":
        raise ApiError(422, "invalid_request", "format: prometheus (default) or json")
    protocol = getattr(request.app.state, "protocol", None)
    max_rows = svc.config.max_batch_size
    gauges = {
        "queue_depth": ("requests admitted and not yet answered", stats["depth"]),
        "queue_capacity": ("requests admitted at most (--max-queue)", stats["capacity"]),
        "pending_rows": ("rows waiting to run", stats["pending_rows"]),
        "decoding_rows": ("rows in the continuous decode batch", stats["decoding_rows"]),
        "batch_occupancy": ("decoding rows / --max-batch-size", stats["decoding_rows"] / max_rows),
        "tokens_per_second": ("generated tokens per second over the last minute", svc.metrics.tokens_per_second()),
        "adapters_loaded": ("adapters loaded", len(svc.adapter_infos())),
    }
    counters = {
        "decode_steps_total": ("continuous decode steps", decoder.steps if decoder else 0),
        "connections_refused_total": (
            "connections closed at once: over --max-connections or --max-connections-per-client",
            getattr(protocol, "refused", 0),
        ),
        "header_timeouts_total": ("connections closed: headers too slow", getattr(protocol, "header_timeouts", 0)),
    }
    return PlainTextResponse(
        svc.metrics.prometheus(gauges, counters), media_type="text/plain; version=0.0.4; charset=utf-8"
    )
