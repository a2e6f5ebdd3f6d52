"""ia3's own API: `POST /v1/generate` and `POST /v1/classify` (the recipe's prompt around each input)."""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations
from typing import Any

from fastapi import APIRouter, Depends, Request

from ia3.serve.decoding import Sampling
from ia3.serve.dependencies import ServiceDep, client_gone, require_key, watch
from ia3.serve.errors import ApiError
from ia3.serve.routes import INFERENCE
from ia3.serve.schemas import ERRORS, ClassifyRequest, ClassifyResponse, GenerateRequest, GenerateResponse
from ia3.serve.service import ClientGone, GenerationRequest, check_text

DEFAULT_MAX_NEW_TOKENS = 32

router = APIRouter(dependencies=[Depends(require_key)], responses=ERRORS, tags=[INFERENCE])


@router.post("/v1/generate", response_model=GenerateResponse)
async def generate(body: GenerateRequest, request: Request, svc: ServiceDep) -> Any:
    """Generate text for each input with the adapter (greedy unless `do_sample`)."""
    cfg = svc.config
    svc.check_generates()
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


@router.post("/v1/classify", response_model=ClassifyResponse)
async def classify(body: ClassifyRequest, request: Request, svc: ServiceDep) -> Any:
    """Rank the label strings (seq2seq/causal: mean token log-probability) or apply the adapter's head (cls)."""
    texts = svc.check_inputs(body.inputs)
    svc.check_adapter(body.adapter)
    labels = _labels(body.parameters.labels, svc)
    try:
        outputs = await svc.classify(texts, body.adapter, tuple(labels), watch(request))
    except ClientGone:
        return client_gone()
    return {"adapter": body.adapter, "labels": list(labels), "outputs": outputs}


def _labels(labels: list[str] | None, svc: ServiceDep) -> list[str]:
    """The request's labels, checked, or the server's label names."""
    if labels is None:
        if not svc.label_names:
            raise ApiError(422, "invalid_request", "This server has no label names: pass parameters.labels")
        return svc.label_names
    max_labels = svc.config.max_labels
    if not svc.task.generates:
        raise ApiError(422, "invalid_request", "parameters.labels: a classifier's labels are its head's classes")
    if not labels or len(labels) > max_labels:
        raise ApiError(422, "invalid_request", f"parameters.labels: give 1 to {max_labels} labels")
    if any(not x.strip() or len(x) > 200 for x in labels) or len(set(labels)) != len(labels):
        raise ApiError(422, "invalid_request", "parameters.labels: distinct, non-empty, at most 200 characters")
    for i, label in enumerate(labels):
        check_text(label, f"parameters.labels[{i}]")
    return labels
