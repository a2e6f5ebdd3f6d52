"""`GET /metrics`: Prometheus text (requests, tokens per adapter, queue depth, batch occupancy, tokens/s), or
`?format=json`."""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations
import time

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
                "adapters": svc.adapter_stats(),
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
    adapters = svc.adapter_stats()
    gauges["adapters_resident_bytes"] = ("bytes of resident adapter tensors", adapters["resident_bytes"])
    counters["adapter_loads_total"] = ("adapters loaded on demand", adapters["loads"])
    counters["adapter_evictions_total"] = ("adapters evicted (least recently used)", adapters["evictions"])
    return PlainTextResponse(
        svc.metrics.prometheus(gauges, counters, adapter_gauges(adapters)),
        media_type="text/plain; version=0.0.4; charset=utf-8",
    )


def adapter_gauges(stats: dict) -> dict[str, tuple[str, list[tuple[dict[str, str], float]]]]:
    """The per-adapter gauges, and `ia3_lora_requests_info` in the form of vLLM's `vllm:lora_requests_info` (which
    the Kubernetes Gateway API Inference Extension reads for adapter affinity): labels `running_lora_adapters` and
    `waiting_lora_adapters` (comma-separated adapter names) and `max_lora`, value the time of the sample."""
    running, waiting = stats["running"], stats["waiting"]
    info = {
        "running_lora_adapters": ",".join(sorted(running)),
        "waiting_lora_adapters": ",".join(sorted(waiting)),
        "max_lora": str(stats["max_lora"]),
    }
    return {
        "adapter_resident": ("1 for each resident adapter", [({"adapter": a}, 1) for a in stats["resident"]]),
        "adapter_running_rows": (
            "rows of the adapter in the running decode batch",
            [({"adapter": a}, n) for a, n in sorted(running.items())],
        ),
        "adapter_waiting_rows": (
            "rows of the adapter queued, in a static batch or waiting on its load",
            [({"adapter": a}, n) for a, n in sorted(waiting.items())],
        ),
        "lora_requests_info": (
            "running and waiting adapters (as vLLM's vllm:lora_requests_info)",
            [(info, time.time())],
        ),
    }
