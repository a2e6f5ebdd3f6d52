"""The OpenAI-compatible API: `/v1/models`, `/v1/completions`, `/v1/chat/completions`.

`model` names a loaded adapter (as vLLM's and LoRAX's multi-adapter servers do), or the base model (its id as
`/v1/models` lists it, or `__base__`). Completions take the prompt as it is (the recipe's `--prompt` template is for
`/v1/generate` and `/v1/classify`); chat renders the messages with the tokenizer's chat template. `stream: true`
answers with Server-Sent Events, one chunk per decoded piece of text (UTF-8 safe), then `data: [DONE]`.

Supported, per row inside continuous batching: `max_tokens` (chat: also `max_completion_tokens`; completions: 0
with `echo`), `temperature` (0: greedy), `top_p`, `n`, `stop`, `seed`, `stream`, `stream_options.include_usage`,
`logprobs` (completions: k; chat: `logprobs` + `top_logprobs`), `echo`, `presence_penalty`, `frequency_penalty`,
`logit_bias`, `best_of`, `response_format` (json_object / json_schema), and vLLM's `top_k`, `min_p`,
`repetition_penalty`, `min_tokens`, `ignore_eos`, `guided_*`, `structured_outputs`, `return_tokens_as_token_ids`;
`user` and vLLM's other extras are ignored (named in the `ia3-ignored-fields` header). `suffix` and tools are
refused. Invalid requests answer 400, as OpenAI's API and vLLM do (the app maps this router's 422s to 400). vLLM's
`/tokenize`, `/detokenize` and `/tokenizer_info` live here too.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ia3.serve.decoding import Sampling, TokenLogprob
from ia3.serve.dependencies import ServiceDep, client_gone, mark_client_gone, require_key, watch
from ia3.serve.errors import ApiError
from ia3.serve.guided import GuideSpec
from ia3.serve.routes import INFERENCE
from ia3.serve.schemas import (
    DEFAULT_COMPLETION_TOKENS,
    IGNORED_EXTRAS,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    OpenAIRequest,
    TokenizeRequest,
)
from ia3.serve.service import ClientGone, Completion, GenerationRequest, Prompt, Service, StreamEvent, check_text
from ia3.tuner import BASE_ADAPTER

router = APIRouter(dependencies=[Depends(require_key)])


# -- checks and conversions ----------------------------------------------------------------------------------------
def _bad(message: str, param: str | None = None) -> ApiError:
    """A 400 as OpenAI's API answers a request it cannot take."""
    return ApiError(400, "invalid_request_error", message, param=param)


def _refuse_unsupported(body: OpenAIRequest) -> None:
    """400 for an OpenAI field this server does not implement, set to something other than its neutral value."""
    neutral = {"suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none", "auto")}
    for name, allowed in neutral.items():
        if getattr(body, name, None) not in allowed:
            raise _bad(f"{name} is not supported by this server", name)


def _ignored(body: OpenAIRequest) -> list[str]:
    """vLLM's extra fields that were set and play no part here (named in the `ia3-ignored-fields` header)."""
    return [f for f in IGNORED_EXTRAS if getattr(body, f, None) is not None and f != "return_tokens_as_token_ids"]


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


def _logit_bias(svc: Service, bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    if not bias:
        return ()
    if len(bias) > svc.config.max_logit_bias:
        raise _bad(f"logit_bias: at most {svc.config.max_logit_bias} entries (--max-logit-bias)", "logit_bias")
    vocab, out = svc.vocab_size(), []
    for key, value in bias.items():
        if not key.isdigit() or int(key) >= vocab:
            raise _bad(f"logit_bias: {key[:50]!r} is not a token id (0-{vocab - 1})", "logit_bias")
        if not -100 <= value <= 100:
            raise _bad(f"logit_bias[{key}]: {value} is outside [-100, 100]", "logit_bias")
        out.append((int(key), float(value)))
    return tuple(sorted(out))


def _sampling(svc: Service, body: OpenAIRequest) -> Sampling:
    shaping = dict(
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        logit_bias=_logit_bias(svc, body.logit_bias),
        min_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos,
    )
    if body.temperature == 0:
        return Sampling(**shaping)
    return Sampling(body.temperature, body.top_p, max(body.top_k, 0), body.seed, body.min_p, **shaping)


def _guide_spec(body: OpenAIRequest) -> GuideSpec | None:
    """The request's structured-output constraint, from `response_format`, vLLM's `guided_*` fields or
    `structured_outputs`; 400 when it names more than one."""
    found: list[GuideSpec] = []
    rf = body.response_format
    if rf is not None:
        kind = rf.get("type")
        if kind == "json_object":
            found.append(GuideSpec("json_object"))
        elif kind == "json_schema":
            inner = rf.get("json_schema")
            schema = inner.get("schema") if isinstance(inner, dict) else None
            if not isinstance(schema, dict | bool):
                raise _bad("response_format.json_schema.schema: a JSON schema (an object)", "response_format")
            found.append(GuideSpec("json_schema", json.dumps(schema), "response_format"))
        elif kind != "text":
            raise _bad(f"response_format.type: text, json_object or json_schema; got {kind!r}", "response_format")
    so = body.structured_outputs
    fields: list[tuple[str, str, Any]] = [
        ("guided_json", "json_schema", body.guided_json),
        ("guided_regex", "regex", body.guided_regex),
        ("guided_choice", "choice", body.guided_choice),
        ("guided_grammar", "grammar", body.guided_grammar),
    ]
    if so is not None:
        fields += [
            ("structured_outputs.json", "json_schema", so.json_),
            ("structured_outputs.regex", "regex", so.regex),
            ("structured_outputs.choice", "choice", so.choice),
            ("structured_outputs.grammar", "grammar", so.grammar),
        ]
        if so.json_object:
            found.append(GuideSpec("json_object", "", "structured_outputs.json_object"))
    for param, kind, value in fields:
        if value is not None:
            text = value if isinstance(value, str) and kind != "choice" else json.dumps(value)
            found.append(GuideSpec(kind, text, param))
    if len(found) > 1:
        raise _bad(f"structured output: give one constraint; got {', '.join(g.param for g in found)}", found[1].param)
    return found[0] if found else None


def _max_tokens(svc: Service, requested: int | None, default: int) -> int:
    value = default if requested is None else requested
    if value > svc.config.max_new_tokens:
        raise _bad(
            f"max_tokens is {value}; this server generates at most {svc.config.max_new_tokens} (--max-new-tokens)",
            "max_tokens",
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
    _refuse_unsupported(body)
    svc.check_generates()
    if body.n > svc.config.max_choices:
        raise _bad(f"n: at most {svc.config.max_choices}", "n")
    if body.stream_options is not None and not body.stream:
        raise _bad("stream_options: only with stream: true", "stream_options")
    if rows > svc.config.max_inputs:
        raise ApiError(413, "too_many_inputs", f"{rows} prompts x n; at most {svc.config.max_inputs}", param="prompt")


def _top(svc: Service, k: int | None, param: str) -> int | None:
    if k is not None and k > svc.config.max_top_logprobs:
        raise _bad(f"{param}: at most {svc.config.max_top_logprobs} (--max-top-logprobs)", param)
    return k


async def _job(svc: Service, body: OpenAIRequest, prompts: list[Prompt], new: int, logprobs: int | None) -> Any:
    """The generation request of a completion or chat body (its prompts already encoded)."""
    spec = _guide_spec(body)
    guide = await svc.guide(spec) if spec is not None else None
    job = GenerationRequest(prompts, _adapter_of(svc, body.model), new, body.n, 1, _sampling(svc, body))
    job.top_k_static, job.stop, job.logprobs, job.guide = body.top_k or 50, svc.check_stop(body.stop), logprobs, guide
    return job


def _truncated(prompts: list[Prompt]) -> dict[str, Any]:
    dropped = [p.dropped for p in prompts]
    return {"ia3": {"truncated_prompt_tokens": dropped}} if any(dropped) else {}


# -- answer shapes -------------------------------------------------------------------------------------------------
def _json_logprob(logprob: float | None) -> float | None:
    """A logprob as JSON can carry it: -inf (a token a structured-output constraint forbids, among the top ones
    when fewer are allowed than asked for) written -9999.0, as vLLM writes it."""
    return None if logprob is None else max(logprob, -9999.0)


async def _completion_logprobs(svc: Service, entries: list[TokenLogprob], start: int, as_ids: bool = False) -> dict:
    """OpenAI completions' `logprobs`: tokens, token_logprobs, top_logprobs (token -> logprob: the token's own and
    the k most likely) and text_offset (characters from the start of the choice's text). `as_ids` (vLLM's
    `return_tokens_as_token_ids`): each token written `token_id:<id>`."""
    pieces, offsets = await svc.token_pieces([e.token for e in entries], start)
    tops = await svc.token_pieces([t for e in entries for t, _ in e.top], None)
    if as_ids:
        pieces = [f"token_id:{e.token}" for e in entries]
        tops = ([f"token_id:{t}" for e in entries for t, _ in e.top], [])
    names, top_logprobs = iter(tops[0]), []
    for e, piece in zip(entries, pieces):
        best = {next(names): _json_logprob(lp) for _, lp in e.top}
        top_logprobs.append(None if e.logprob is None else {piece: _json_logprob(e.logprob), **best})
    return {
        "tokens": pieces,
        "token_logprobs": [_json_logprob(e.logprob) for e in entries],
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }


async def _chat_logprobs(svc: Service, entries: list[TokenLogprob]) -> dict:
    """OpenAI chat's `logprobs`: `content`, one entry per token with its `top_logprobs` (the k most likely)."""
    pieces, _ = await svc.token_pieces([e.token for e in entries], None)
    names = iter((await svc.token_pieces([t for e in entries for t, _ in e.top], None))[0])

    def item(token: str, logprob: float | None) -> dict:
        return {"token": token, "logprob": _json_logprob(logprob), "bytes": list(token.encode("utf-8", "replace"))}

    content = []
    for e, piece in zip(entries, pieces):
        content.append({**item(piece, e.logprob), "top_logprobs": [item(next(names), lp) for _, lp in e.top]})
    return {"content": content}


class CompletionShape:
    """How `/v1/completions` writes a choice, whole and streamed."""

    object, chunk, opening, chat = "text_completion", "text_completion", None, False

    @staticmethod
    def choice(index: int, text: str, finish: str | None, logprobs: dict | None = None, stop: Any = None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish, "stop_reason": stop}

    delta = choice


class ChatShape:
    """How `/v1/chat/completions` writes a choice, whole and streamed (a first chunk with the role)."""

    object, chunk, chat = "chat.completion", "chat.completion.chunk", True

    @staticmethod
    def choice(index: int, text: str, finish: str | None, logprobs: dict | None = None, stop: Any = None) -> dict:
        message = {"role": "assistant", "content": text}
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish, "stop_reason": stop}

    @staticmethod
    def opening(index: int) -> dict:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    @staticmethod
    def delta(index: int, text: str, finish: str | None, logprobs: dict | None = None, stop: Any = None) -> dict:
        delta = {"content": text} if text else {}
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish, "stop_reason": stop}


Shape = type[CompletionShape | ChatShape]


def _sse(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


async def _choice(
    svc: Service, job: GenerationRequest, shape: Shape, o: Completion, echoed: str | None, as_ids: bool
) -> dict:
    """One whole choice; `echoed`: the prompt's text, put before the answer (echo)."""
    logprobs = None
    if job.logprobs is not None:
        entries = (o.prompt_logprobs or []) + o.token_logprobs if echoed is not None else o.token_logprobs
        if shape.chat:
            logprobs = await _chat_logprobs(svc, entries)
        else:
            logprobs = await _completion_logprobs(svc, entries, 0, as_ids)
    text = o.text if echoed is None else echoed + o.text
    return shape.choice(o.prompt * job.n + o.index, text, o.finish_reason, logprobs, o.stop_reason)


async def _respond(
    svc: Service,
    body: OpenAIRequest,
    request: Request,
    job: GenerationRequest,
    shape: Shape,
    echoed: list[str] | None = None,
) -> Any:
    """The JSON answer, or the event stream, of a completion or chat request."""
    rid = ("chatcmpl-" if shape.chat else "cmpl-") + secrets.token_hex(12)
    head = {"id": rid, "created": int(time.time()), "model": body.model}
    ignored = _ignored(body)
    headers = {"ia3-ignored-fields": ",".join(ignored)} if ignored else {}
    if not body.stream:
        try:
            outputs: list[Completion] = await svc.generate(job, watch(request))
        except ClientGone:
            return client_gone()
        as_ids = bool(body.return_tokens_as_token_ids)
        choices = [await _choice(svc, job, shape, o, echoed[o.prompt] if echoed else None, as_ids) for o in outputs]
        usage = _usage(job.prompts, sum(o.tokens for o in outputs))
        answer = {**head, "object": shape.object, "choices": choices, "usage": usage, **_truncated(job.prompts)}
        return JSONResponse(answer, headers=headers)
    events = svc.stream(job, watch(request))
    first = await events.__anext__()  # admission errors (queue full, ...) are still plain HTTP errors here
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    chunks = _chunks(svc, request, job, shape, head, first, events, include_usage)
    headers["Cache-Control"] = "no-cache"
    return StreamingResponse(chunks, media_type="text/event-stream", headers=headers)


async def _chunks(
    svc: Service,
    request: Request,
    job: GenerationRequest,
    shape: Shape,
    head: dict,
    first: StreamEvent,
    events: AsyncIterator[StreamEvent],
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """The server-sent events of a streamed answer, ending with `data: [DONE]` (or with an error event)."""
    produced = 0
    started: set[int] = set()
    written: dict[int, int] = {}  # characters of each choice's text sent so far (its logprobs' text offsets)
    try:
        event: StreamEvent | None = first
        while event is not None:
            if event.index not in started and shape.opening is not None:
                started.add(event.index)
                yield _sse({**head, "object": shape.chunk, "choices": [shape.opening(event.index)]})
            if event.finish_reason is not None:
                produced += event.tokens
            if event.text or event.finish_reason is not None:
                logprobs = None
                if job.logprobs is not None:
                    at = written.get(event.index, 0)
                    if shape.chat:
                        logprobs = await _chat_logprobs(svc, event.logprobs)
                    else:
                        logprobs = await _completion_logprobs(svc, event.logprobs, at)
                written[event.index] = written.get(event.index, 0) + len(event.text)
                piece = shape.delta(event.index, event.text, event.finish_reason, logprobs, event.stop_reason)
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
        raise _bad("prompt is empty", "prompt")
    best_of = body.best_of or body.n
    _check(svc, body, len(raw) * max(body.n, best_of))
    if best_of < body.n or best_of > svc.config.max_choices:
        raise _bad(f"best_of: at least n ({body.n}) and at most {svc.config.max_choices}", "best_of")
    if best_of > body.n and body.stream:
        raise _bad("best_of > n cannot be streamed", "best_of")
    if body.echo and (body.stream or not svc.task.answer_follows_prompt):
        raise _bad("echo: not with stream, and only for a causal model", "echo")
    if body.max_tokens == 0 and not body.echo:
        raise _bad("max_tokens: 0 only with echo", "max_tokens")
    texts = [x for x in raw if isinstance(x, str)]
    if texts:
        svc.check_inputs(texts, "prompt")
    new = _max_tokens(svc, body.max_tokens, DEFAULT_COMPLETION_TOKENS)
    prompts = await svc.encode_prompts(raw, "prompt")
    job = await _job(svc, body, prompts, new, _top(svc, body.logprobs, "logprobs"))
    job.echo, job.best_of = body.echo, best_of if best_of > body.n else 0
    echoed = None
    if body.echo:
        echoed = [
            x if isinstance(x, str) and not p.dropped else await svc.detokenize(p.ids) for x, p in zip(raw, prompts)
        ]
    return await _respond(svc, body, request, job, CompletionShape, echoed)


@router.post("/v1/chat/completions", response_model=None, tags=[INFERENCE])
async def chat_completions(body: ChatRequest, request: Request, svc: ServiceDep) -> Any:
    """OpenAI chat completions: the messages rendered with the tokenizer's chat template."""
    _check(svc, body, body.n)
    if body.top_logprobs is not None and not body.logprobs:
        raise _bad("top_logprobs: only with logprobs: true", "top_logprobs")
    top = _top(svc, body.top_logprobs or 0, "top_logprobs") if body.logprobs else None
    _adapter_of(svc, body.model)
    if not svc.has_chat_template():
        raise _bad("This model's tokenizer has no chat template; use /v1/completions with a prompt", "messages")
    messages = []
    max_chars = svc.config.max_input_chars
    for i, m in enumerate(body.messages):
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
        where = f"messages[{i}].content"
        if len(content) > max_chars:
            raise ApiError(413, "input_too_long", f"{where} has {len(content)} characters; at most {max_chars}")
        check_text(content, where)
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    new = _max_tokens(svc, body.max_completion_tokens or body.max_tokens, svc.config.max_new_tokens)
    prompts = await svc.encode_chat(messages)
    job = await _job(svc, body, prompts, new, top)
    return await _respond(svc, body, request, job, ChatShape)


# -- vLLM's tokenizer endpoints (lm-eval's remote tokenizer reads them) ---------------------------------------------
@router.get("/tokenizer_info")
async def tokenizer_info(svc: ServiceDep) -> dict:
    """The served tokenizer: special tokens, chat template, limits."""
    return svc.tokenizer_info()


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, svc: ServiceDep) -> dict:
    """A text's (or chat messages') token ids, as the server tokenises them."""
    if (body.prompt is None) == (body.messages is None):
        raise _bad("give prompt or messages", "prompt")
    if body.messages is not None:
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str) else ""} for m in body.messages]
        tokens = (await svc.encode_chat(messages))[0].ids
    else:
        assert body.prompt is not None
        tokens = await svc.tokenize_text(body.prompt, body.add_special_tokens)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": svc.tokenizer_info()["model_max_length"]}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, svc: ServiceDep) -> dict:
    """The text of token ids."""
    return {"prompt": await svc.detokenize(body.tokens)}
