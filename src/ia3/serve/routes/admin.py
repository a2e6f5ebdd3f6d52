"""Operating the server: the adapters (`GET /v1/adapters`, `POST` / `DELETE /v1/adapters/{name}`, and vLLM's
`POST /v1/load_lora_adapter` / `POST /v1/unload_lora_adapter` for (IA)^3 adapters) and liveness (`GET /health`, without
the API key, for load balancers)."""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations
from typing import Annotated

from fastapi import APIRouter, Body, Depends
from fastapi.responses import JSONResponse, PlainTextResponse

from ia3.serve.dependencies import ServiceDep, require_key
from ia3.serve.schemas import ERRORS, AdapterLoadRequest, LoadLoraRequest, UnloadLoraRequest
from ia3.tuner import BASE_ADAPTER

router = APIRouter(responses=ERRORS)
AUTH = [Depends(require_key)]  # every route but /health


@router.get("/v1/adapters", dependencies=AUTH)
async def list_adapters(svc: ServiceDep) -> dict:
    """The loaded adapters (and the name of the base model's pseudo-adapter)."""
    return {"base": BASE_ADAPTER, "adapters": svc.adapter_infos()}


@router.post("/v1/adapters/{name}", status_code=201, dependencies=AUTH)
async def load_adapter(name: str, svc: ServiceDep, body: Annotated[AdapterLoadRequest | None, Body()] = None) -> dict:
    """Load adapter `name` from the adapters folder, or from the Hub repo in `source`."""
    source = body.source if body is not None else None
    revision = body.revision if body is not None else None
    return {"adapter": await svc.load_adapter(name, source, revision)}


@router.delete("/v1/adapters/{name}", dependencies=AUTH)
async def delete_adapter(name: str, svc: ServiceDep) -> dict:
    """Unload adapter `name`; requests for it still queued get 404."""
    await svc.delete_adapter(name)
    return {"deleted": name}


@router.post("/v1/load_lora_adapter", dependencies=AUTH, response_class=PlainTextResponse)
async def load_lora_adapter(body: LoadLoraRequest, svc: ServiceDep) -> PlainTextResponse:
    """vLLM's dynamic loading: load the (IA)^3 adapter folder `lora_path` (inside the adapters folder) as
    `lora_name`; answers vLLM's plain-text success line."""
    await svc.load_lora_adapter(body.lora_name, body.lora_path)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", dependencies=AUTH, response_class=PlainTextResponse)
async def unload_lora_adapter(body: UnloadLoraRequest, svc: ServiceDep) -> PlainTextResponse:
    """vLLM's dynamic unloading of adapter `lora_name`."""
    await svc.delete_adapter(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


@router.get("/health")
async def health(svc: ServiceDep) -> JSONResponse:
    """Liveness: the worker thread is running."""
    alive = svc.alive()
    body = {
        "status": "ok" if alive else "unavailable",
        "model": svc.config.model,
        "task": svc.task.name,
        "device": str(svc.engine.device),
        "adapters": len(svc.adapter_infos()),
        "queue_depth": svc.batcher.depth(),
    }
    return JSONResponse(body, status_code=200 if alive else 503)
