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
    # unknown fields are refused; strings are not read as numbers or booleans (as OpenAI's and vLLM's servers)
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(OpenAIBody):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's extension; usage comes once, at the end


class StructuredOutputs(OpenAIBody):
    """vLLM's newer form of the guided-decoding fields: exactly one of them."""

    json_: str | dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


# vLLM's extra request fields that play no part here: accepted, ignored, named in the `ia3-ignored-fields` header
IGNORED_EXTRAS = (
    "use_beam_search",
    "length_penalty",
    "early_stopping",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "add_special_tokens",
    "priority",
    "request_id",
    "guided_decoding_backend",
    "guided_whitespace_pattern",
    "cache_salt",
    "return_tokens_as_token_ids",
    "chat_template",
    "chat_template_kwargs",
    "add_generation_prompt",
    "continue_final_message",
    "documents",
    "parallel_tool_calls",
    "store",
    "metadata",
    "service_tier",
    "reasoning_effort",
    "vllm_xargs",
)


class OpenAIRequest(OpenAIBody):
    model: str = Field(..., description="a loaded adapter's name, or the base model (its id, or '__base__')")
    temperature: float = Field(1.0, ge=0, le=2, description="0: greedy decoding")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, description="vLLM's extension: keep the k most likely tokens (0 or -1: all)")
    min_p: float = Field(0.0, ge=0, le=1, description="vLLM's extension: drop tokens below min_p x the best's")
    n: int = Field(1, ge=1, description="completions per prompt")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=10, description="vLLM's extension (1: none)")
    logit_bias: dict[str, float] | None = Field(None, description="token id (a string) -> bias in [-100, 100]")
    min_tokens: int = Field(0, ge=0, description="vLLM's extension: no EOS before this many tokens")
    ignore_eos: bool = Field(False, description="vLLM's extension: generate past EOS")
    response_format: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None
    use_beam_search: bool | None = None
    length_penalty: float | None = None
    early_stopping: bool | str | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    add_special_tokens: bool | None = None
    priority: int | None = None
    request_id: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    cache_salt: str | None = None
    return_tokens_as_token_ids: bool | None = None
    vllm_xargs: dict[str, Any] | None = None


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(DEFAULT_COMPLETION_TOKENS, ge=0, description="0: only with echo")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, description="k: each token's logprob and the k most likely tokens")
    best_of: int | None = Field(None, ge=1)
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
    top_logprobs: int | None = Field(None, ge=0)
    tools: list[Any] | None = None
    tool_choice: Any = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    documents: list[Any] | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None


class TokenizeRequest(OpenAIBody):
    """vLLM's `POST /tokenize`: a text (or chat `messages`), and whether special tokens (BOS) are added."""

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(OpenAIBody):
    model: str | None = None
    tokens: list[int]


class LoadLoraRequest(BaseModel):
    """vLLM's `POST /v1/load_lora_adapter` body (other vLLM fields, e.g. `load_inplace`, are accepted and ignored)."""

    lora_name: str = Field(description="the adapter's name, as requests will give it in `model`")
    lora_path: str = Field(description="its folder: inside the server's adapters folder (relative or absolute)")


class UnloadLoraRequest(BaseModel):
    """vLLM's `POST /v1/unload_lora_adapter` body."""

    lora_name: str
    lora_int_id: int | None = None
