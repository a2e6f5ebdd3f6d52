"""The OpenAI-compatible API: `/v1/models`, `/v1/completions`, `/v1/chat/completions`.

`model` names a loaded adapter (as vLLM's and LoRAX's multi-adapter servers do), or the base model (its id as
`/v1/models` lists it, or `__base__`). Completions take the prompt as it is (the recipe's `--prompt` template is for
`/v1/generate` and `/v1/classify`); chat renders the messages with the tokenizer's chat template. `stream: true`
answers with Server-Sent Events, one chunk per decoded piece of text (UTF-8 safe), then `data: [DONE]`.

Supported: `max_tokens` (chat: also `max_completion_tokens`), `temperature` (0: greedy), `top_p`, `top_k` (an
extension, as in vLLM), `n`, `stop`, `seed`, `stream`, `stream_options.include_usage`, `user` (ignored). OpenAI
fields this server cannot honour (`logprobs`, `echo`, `suffix`, penalties, `logit_bias`, `best_of` > 1, tools,
response formats) are refused with 422 naming the field, unless they have their neutral value.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from ia3.serve.decoding import Sampling
from ia3.serve.dependencies import ServiceDep, client_gone, mark_client_gone, require_key, watch
from ia3.serve.errors import ApiError
from ia3.serve.routes import INFERENCE
from ia3.serve.schemas import DEFAULT_COMPLETION_TOKENS, ChatRequest, CompletionRequest, OpenAIRequest
from ia3.serve.service import ClientGone, Completion, GenerationRequest, Prompt, Service, StreamEvent, check_text
from ia3.tuner import BASE_ADAPTER

router = APIRouter(dependencies=[Depends(require_key)])


# -- checks and conversions ----------------------------------------------------------------------------------------
def _neutral(body: BaseModel) -> None:
    """422 for an OpenAI field this server does not implement, set to something other than its neutral value."""
    neutral = {
        "frequency_penalty": 0.0,
        "presence_penalty": 0.0,
        "logit_bias": (None, {}),
        "echo": False,
        "logprobs": (None, False, 0),
        "top_logprobs": (None, 0),
        "best_of": (None, 1),
        "suffix": (None, ""),
        "tools": (None, []),
        "tool_choice": (None, "none", "auto"),
        "response_format": (None, {"type": "text"}),
    }
    for name, allowed in neutral.items():
        if name not in type(body).model_fields:
            continue
        value = getattr(body, name)
        ok = value in allowed if isinstance(allowed, tuple) else value == allowed
        if not ok:
            raise ApiError(422, "invalid_request", f"{name} is not supported by this server", param=name)


def _sse(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


def _adapter_of(svc: Service, model: str) -> str:
    if model in (BASE_ADAPTER, svc.config.model):
        return BASE_ADAPTER
    if svc.has_adapter(model):
        return model
    raise ApiError(
        404,
        "invalid_request_error",
        f"The model {model[:100]!r} does not exist here; GET /v1/models lists the adapters and the base",
        param="model",
        code="model_not_found",
    )


def _sampling(body: OpenAIRequest) -> Sampling:
    if body.temperature == 0:
        return Sampling()
    return Sampling(body.temperature, body.top_p, body.top_k, body.seed)


def _max_tokens(svc: Service, requested: int | None, default: int) -> int:
    value = default if requested is None else requested
    if value > svc.config.max_new_tokens:
        raise ApiError(
            422,
            "invalid_request",
            f"max_tokens is {value}; this server generates at most {svc.config.max_new_tokens} (--max-new-tokens)",
            param="max_tokens",
        )
    return value


def _usage(prompts: list[Prompt], completion_tokens: int) -> dict[str, int]:
    prompt_tokens = sum(len(p.ids) for p in prompts)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _check(svc: Service, body: OpenAIRequest, rows: int) -> None:
    _neutral(body)
    svc.check_generates()
    if body.n > svc.config.max_choices:
        raise ApiError(422, "invalid_request", f"n: at most {svc.config.max_choices}", param="n")
    if rows > svc.config.max_inputs:
        raise ApiError(413, "too_many_inputs", f"{rows} prompts x n; at most {svc.config.max_inputs}", param="prompt")


def _truncated(prompts: list[Prompt]) -> dict[str, Any]:
    dropped = [p.dropped for p in prompts]
    return {"ia3": {"truncated_prompt_tokens": dropped}} if any(dropped) else {}


# -- answer shapes -------------------------------------------------------------------------------------------------
class CompletionShape:
    """How `/v1/completions` writes a choice, whole and streamed."""

    object, chunk, opening = "text_completion", "text_completion", None

    @staticmethod
    def choice(index: int, text: str, finish: str | None) -> dict:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

    delta = choice


class ChatShape:
    """How `/v1/chat/completions` writes a choice, whole and streamed (a first chunk with the role)."""

    object, chunk = "chat.completion", "chat.completion.chunk"

    @staticmethod
    def choice(index: int, text: str, finish: str | None) -> dict:
        message = {"role": "assistant", "content": text}
        return {"index": index, "message": message, "logprobs": None, "finish_reason": finish}

    @staticmethod
    def opening(index: int) -> dict:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    @staticmethod
    def delta(index: int, text: str, finish: str | None) -> dict:
        return {"index": index, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": finish}


def _sse(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


async def _respond(
    svc: Service,
    body: OpenAIRequest,
    request: Request,
    job: GenerationRequest,
    shape: type[CompletionShape | ChatShape],
) -> Any:
    """The JSON answer, or the event stream, of a completion or chat request."""
    rid = ("chatcmpl-" if shape is ChatShape else "cmpl-") + secrets.token_hex(12)
    head = {"id": rid, "created": int(time.time()), "model": body.model}
    if not body.stream:
        try:
            outputs: list[Completion] = await svc.generate(job, watch(request))
        except ClientGone:
            return client_gone()
        choices = [shape.choice(o.prompt * job.n + o.index, o.text, o.finish_reason) for o in outputs]
        usage = _usage(job.prompts, sum(o.tokens for o in outputs))
        return {**head, "object": shape.object, "choices": choices, "usage": usage, **_truncated(job.prompts)}
    events = svc.stream(job, watch(request))
    first = await events.__anext__()  # admission errors (queue full, ...) are still plain HTTP errors here
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    chunks = _chunks(request, job, shape, head, first, events, include_usage)
    return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _chunks(
    request: Request,
    job: GenerationRequest,
    shape: type[CompletionShape | ChatShape],
    head: dict,
    first: StreamEvent,
    events: AsyncIterator[StreamEvent],
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """The server-sent events of a streamed answer, ending with `data: [DONE]` (or with an error event)."""
    produced = 0
    started: set[int] = set()
    try:
        event: StreamEvent | None = first
        while event is not None:
            if event.index not in started and shape.opening is not None:
                started.add(event.index)
                yield _sse({**head, "object": shape.chunk, "choices": [shape.opening(event.index)]})
            if event.finish_reason is not None:
                produced += event.tokens
            if event.text or event.finish_reason is not None:
                piece = shape.delta(event.index, event.text, event.finish_reason)
                chunk = {**head, "object": shape.chunk, "choices": [piece]}
                if include_usage:
                    chunk["usage"] = None
                yield _sse(chunk)
            event = await anext(events, None)
        if include_usage:
            yield _sse({**head, "object": shape.chunk, "choices": [], "usage": _usage(job.prompts, produced)})
        yield _sse("[DONE]")
    except ApiError as err:  # after the headers: the error is the stream's last event
        yield _sse(err.body())
    except BaseException:
        mark_client_gone(request)
        raise
    finally:
        await events.aclose()  # type: ignore[attr-defined]


# -- endpoints -----------------------------------------------------------------------------------------------------
@router.get("/v1/models")
async def list_models(svc: ServiceDep) -> dict:
    """The base model, every resident adapter, then every adapter loadable on demand from the adapters folder, as
    OpenAI's model list (adapters with `parent` the base model, as vLLM lists LoRA adapters)."""
    base = svc.config.model
    started = int(svc.metrics.started)
    data = [{"id": base, "object": "model", "created": started, "owned_by": "ia3"}]
    for info in svc.adapter_infos():
        created = int(info["loaded_at"])
        data.append(
            {"id": info["name"], "object": "model", "created": created, "owned_by": "ia3", "parent": base, "root": base}
        )
    for name in svc.loadable_adapters():
        data.append(
            {"id": name, "object": "model", "created": started, "owned_by": "ia3", "parent": base, "root": base}
        )
    return {"object": "list", "data": data}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, svc: ServiceDep) -> dict:
    """One model of the list: the base, a resident adapter or one loadable on demand."""
    adapter = _adapter_of(svc, model)
    base = svc.config.model
    if adapter == BASE_ADAPTER:
        return {"id": base, "object": "model", "created": int(svc.metrics.started), "owned_by": "ia3"}
    info = next((i for i in svc.adapter_infos() if i["name"] == adapter), None)
    created = int(info["loaded_at"] if info is not None else svc.metrics.started)
    return {"id": adapter, "object": "model", "created": created, "owned_by": "ia3", "parent": base, "root": base}


@router.post("/v1/completions", response_model=None, tags=[INFERENCE])
async def completions(body: CompletionRequest, request: Request, svc: ServiceDep) -> Any:
    """OpenAI completions: `prompt` as text, texts, token ids or lists of token ids."""
    prompt = body.prompt
    if isinstance(prompt, str):
        raw: list[Any] = [prompt]
    elif prompt and all(isinstance(x, int) for x in prompt):
        raw = [prompt]
    else:
        raw = list(prompt)
    if not raw:
        raise ApiError(422, "invalid_request", "prompt is empty", param="prompt")
    _check(svc, body, len(raw) * body.n)
    texts = [x for x in raw if isinstance(x, str)]
    if texts:
        svc.check_inputs(texts, "prompt")
    adapter = _adapter_of(svc, body.model)
    stop = svc.check_stop(body.stop)
    new = _max_tokens(svc, body.max_tokens, DEFAULT_COMPLETION_TOKENS)
    prompts = await svc.encode_prompts(raw, "prompt")
    job = GenerationRequest(prompts, adapter, new, body.n, 1, _sampling(body), body.top_k or 50, stop)
    return await _respond(svc, body, request, job, CompletionShape)


@router.post("/v1/chat/completions", response_model=None, tags=[INFERENCE])
async def chat_completions(body: ChatRequest, request: Request, svc: ServiceDep) -> Any:
    """OpenAI chat completions: the messages rendered with the tokenizer's chat template."""
    _check(svc, body, body.n)
    adapter = _adapter_of(svc, body.model)
    if not svc.has_chat_template():
        raise ApiError(
            422,
            "unsupported",
            "This model's tokenizer has no chat template; use /v1/completions with a prompt",
            param="messages",
        )
    messages = []
    max_chars = svc.config.max_input_chars
    for i, m in enumerate(body.messages):
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
        where = f"messages[{i}].content"
        if len(content) > max_chars:
            raise ApiError(413, "input_too_long", f"{where} has {len(content)} characters; at most {max_chars}")
        check_text(content, where)
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    stop = svc.check_stop(body.stop)
    new = _max_tokens(svc, body.max_completion_tokens or body.max_tokens, svc.config.max_new_tokens)
    prompts = await svc.encode_chat(messages)
    job = GenerationRequest(prompts, adapter, new, body.n, 1, _sampling(body), body.top_k or 50, stop)
    return await _respond(svc, body, request, job, ChatShape)
