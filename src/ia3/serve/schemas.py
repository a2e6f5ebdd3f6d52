"""The request and response bodies of every API of `ia3 serve` (pydantic models; FastAPI validates requests
against them and documents them in `/openapi.json`).

The native API (`/v1/generate`, `/v1/classify`, `/v1/adapters`) is strict: unknown fields and values of the wrong
JSON type are refused. The OpenAI-compatible bodies follow OpenAI's field names and defaults.
"""

# no `from __future__ import annotations`: pydantic and FastAPI read these annotations at run time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for completions


# -- the native API ------------------------------------------------------------------------------------------------
class StrictBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class GenerateParameters(StrictBody):
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


class GenerateRequest(StrictBody):
    adapter: str = Field(..., description="a loaded adapter's name, or '__base__' for the base model")
    inputs: str | list[str] = Field(..., description="one text or a list of texts")
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)


class ClassifyParameters(StrictBody):
    labels: list[str] | None = Field(
        None, description="label strings to rank (seq2seq/causal); default: the server's label names"
    )


class ClassifyRequest(StrictBody):
    adapter: str = Field(..., description="a loaded adapter's name, or '__base__' for the base model")
    inputs: str | list[str] = Field(..., description="one text or a list of texts")
    parameters: ClassifyParameters = Field(default_factory=ClassifyParameters)


class AdapterLoadRequest(StrictBody):
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


# -- the OpenAI-compatible API -------------------------------------------------------------------------------------
class OpenAIBody(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(OpenAIBody):
    include_usage: bool = False


class OpenAIRequest(OpenAIBody):
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


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(DEFAULT_COMPLETION_TOKENS, ge=1)
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(OpenAIBody):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # `name`, `tool_call_id`, ... play no part here
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class ChatRequest(OpenAIRequest):
    messages: list[Message] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


class LoadLoraRequest(BaseModel):
    """vLLM's `POST /v1/load_lora_adapter` body (other vLLM fields, e.g. `load_inplace`, are accepted and ignored)."""

    lora_name: str = Field(description="the adapter's name, as requests will give it in `model`")
    lora_path: str = Field(description="its folder: inside the server's adapters folder (relative or absolute)")


class UnloadLoraRequest(BaseModel):
    """vLLM's `POST /v1/unload_lora_adapter` body."""

    lora_name: str
    lora_int_id: int | None = None
