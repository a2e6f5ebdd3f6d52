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
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ia3.serve.decoding import Sampling
from ia3.serve.errors import ApiError
from ia3.serve.service import ClientGone, Completion, GenerationRequest, Prompt, Service, StreamEvent, check_text
from ia3.tuner import BASE_ADAPTER

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for completions


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class _Common(_Body):
    model: str = Field(..., description="a loaded adapter's name, or the base model (its id, or '__base__')")
    temperature: float = Field(1.0, ge=0, le=2, description="0: greedy decoding")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="extension: keep the k most likely tokens (0: all)")
    n: int = Field(1, ge=1, description="completions per prompt")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # OpenAI fields accepted only at their neutral value
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(DEFAULT_COMPLETION_TOKENS, ge=1)
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # `name`, `tool_call_id`, ... play no part here
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class ChatRequest(_Common):
    messages: list[Message] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


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


def add_openai_routes(app: FastAPI, svc: Service, auth: list, watch, client_gone) -> None:
    """Add the OpenAI-compatible endpoints to `app` (`watch(request)` and `client_gone()` come from `create_app`)."""
    cfg = svc.config

    def adapter_of(model: str) -> str:
        if model in (BASE_ADAPTER, cfg.model):
            return BASE_ADAPTER
        if svc.registry.has(model):
            return model
        raise ApiError(
            404,
            "invalid_request_error",
            f"The model {model[:100]!r} does not exist here; GET /v1/models lists the adapters and the base",
            param="model",
            code="model_not_found",
        )

    def sampling(body: _Common) -> Sampling:
        if body.temperature == 0:
            return Sampling()
        return Sampling(body.temperature, body.top_p, body.top_k, body.seed)

    def max_tokens(requested: int | None, default: int) -> int:
        value = default if requested is None else requested
        if value > cfg.max_new_tokens:
            raise ApiError(
                422,
                "invalid_request",
                f"max_tokens is {value}; this server generates at most {cfg.max_new_tokens} (--max-new-tokens)",
                param="max_tokens",
            )
        return value

    def usage(prompts: list[Prompt], completion_tokens: int) -> dict[str, int]:
        prompt_tokens = sum(len(p.ids) for p in prompts)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def check(body: _Common, rows: int) -> None:
        _neutral(body)
        if not svc.engine.task.generates:
            raise ApiError(422, "unsupported", f"This server runs a classifier (task {cfg.task}); use /v1/classify")
        if body.n > cfg.max_choices:
            raise ApiError(422, "invalid_request", f"n: at most {cfg.max_choices}", param="n")
        if rows > cfg.max_inputs:
            raise ApiError(413, "too_many_inputs", f"{rows} prompts x n; at most {cfg.max_inputs}", param="prompt")

    def truncated(prompts: list[Prompt]) -> dict[str, Any]:
        dropped = [p.dropped for p in prompts]
        return {"ia3": {"truncated_prompt_tokens": dropped}} if any(dropped) else {}

    async def respond(body: _Common, request: Request, job: GenerationRequest, kind: str, render) -> Any:
        """The JSON answer, or the event stream, of a completion or chat request."""
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        head = {"id": rid, "created": created, "model": body.model}
        if not body.stream:
            try:
                outputs: list[Completion] = await svc.generate(job, watch(request))
            except ClientGone:
                return client_gone()
            choices = [render.choice(o.prompt * job.n + o.index, o.text, o.finish_reason) for o in outputs]
            return {
                **head,
                "object": render.object,
                "choices": choices,
                "usage": usage(job.prompts, sum(o.tokens for o in outputs)),
                **truncated(job.prompts),
            }
        events = svc.stream(job, watch(request))
        first = await events.__anext__()  # admission errors (queue full, ...) are still plain HTTP errors here
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def chunks() -> AsyncIterator[bytes]:
            produced = 0
            started: set[int] = set()
            try:
                event: StreamEvent | None = first
                while event is not None:
                    if event.index not in started and render.opening is not None:
                        started.add(event.index)
                        yield _sse({**head, "object": render.chunk, "choices": [render.opening(event.index)]})
                    if event.finish_reason is not None:
                        produced += event.tokens
                    piece = render.delta(event.index, event.text, event.finish_reason)
                    if event.text or event.finish_reason is not None:
                        chunk = {**head, "object": render.chunk, "choices": [piece]}
                        if include_usage:
                            chunk["usage"] = None
                        yield _sse(chunk)
                    event = await anext(events, None)
                if include_usage:
                    yield _sse({**head, "object": render.chunk, "choices": [], "usage": usage(job.prompts, produced)})
                yield _sse("[DONE]")
            except ApiError as err:  # after the headers: the error is the stream's last event
                yield _sse(err.body())
            except BaseException:
                request.scope.setdefault("state", {})["client_gone"] = True
                raise
            finally:
                await events.aclose()

        return StreamingResponse(chunks(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    class CompletionShape:
        object, chunk, opening = "text_completion", "text_completion", None

        @staticmethod
        def choice(index: int, text: str, finish: str | None) -> dict:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

        delta = choice

    class ChatShape:
        object, chunk = "chat.completion", "chat.completion.chunk"

        @staticmethod
        def choice(index: int, text: str, finish: str | None) -> dict:
            message = {"role": "assistant", "content": text}
            return {"index": index, "message": message, "logprobs": None, "finish_reason": finish}

        @staticmethod
        def opening(index: int) -> dict:
            return {
                "index": index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }

        @staticmethod
        def delta(index: int, text: str, finish: str | None) -> dict:
            return {
                "index": index,
                "delta": {"content": text} if text else {},
                "logprobs": None,
                "finish_reason": finish,
            }

    @app.get("/v1/models", dependencies=auth)
    async def list_models() -> dict:
        """The base model and every loaded adapter, as OpenAI's model list."""
        started = int(svc.metrics.started)
        data = [{"id": cfg.model, "object": "model", "created": started, "owned_by": "ia3"}]
        for info in svc.registry.infos():
            data.append(
                {
                    "id": info["name"],
                    "object": "model",
                    "created": int(info["loaded_at"]),
                    "owned_by": "ia3",
                    "parent": cfg.model,
                    "root": cfg.model,
                }
            )
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model:path}", dependencies=auth)
    async def get_model(model: str) -> dict:
        adapter = adapter_of(model)
        listed = (await list_models())["data"]
        return next(m for m in listed if m["id"] == (cfg.model if adapter == BASE_ADAPTER else adapter))

    @app.post("/v1/completions", dependencies=auth, response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
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
        check(body, len(raw) * body.n)
        texts = [x for x in raw if isinstance(x, str)]
        if texts:
            svc.check_inputs(texts, "prompt")
        adapter = adapter_of(body.model)
        stop = svc.check_stop(body.stop)
        new = max_tokens(body.max_tokens, DEFAULT_COMPLETION_TOKENS)

        def encode() -> list[Prompt]:
            where = (lambda i: f"prompt[{i}]") if len(raw) > 1 else (lambda i: "prompt")
            return [Prompt(*svc.engine.encode_raw(x, where(i))) for i, x in enumerate(raw)]

        prompts = await svc.tokenize(encode)
        job = GenerationRequest(prompts, adapter, new, body.n, 1, sampling(body), body.top_k or 50, stop)
        return await respond(body, request, job, "completion", CompletionShape)

    @app.post("/v1/chat/completions", dependencies=auth, response_model=None)
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        """OpenAI chat completions: the messages rendered with the tokenizer's chat template."""
        check(body, body.n)
        adapter = adapter_of(body.model)
        if not getattr(svc.engine.tokenizer, "chat_template", None):
            raise ApiError(
                422,
                "unsupported",
                "This model's tokenizer has no chat template; use /v1/completions with a prompt",
                param="messages",
            )
        messages = []
        for i, m in enumerate(body.messages):
            content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
            where = f"messages[{i}].content"
            if len(content) > cfg.max_input_chars:
                raise ApiError(
                    413, "input_too_long", f"{where} has {len(content)} characters; at most {cfg.max_input_chars}"
                )
            check_text(content, where)
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        stop = svc.check_stop(body.stop)
        new = max_tokens(body.max_completion_tokens or body.max_tokens, cfg.max_new_tokens)

        def encode() -> list[Prompt]:
            tok = svc.engine.request_task.tokenizer
            try:
                text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as err:
                raise ApiError(
                    422,
                    "invalid_request",
                    f"messages: the chat template refuses them ({str(err)[:200]})",
                    param="messages",
                ) from None
            ids = tok(text, add_special_tokens=False)["input_ids"]
            return [Prompt(*svc.engine.encode_raw(ids, "messages"))]

        prompts = await svc.tokenize(encode)
        job = GenerationRequest(prompts, adapter, new, body.n, 1, sampling(body), body.top_k or 50, stop)
        return await respond(body, request, job, "chat", ChatShape)
