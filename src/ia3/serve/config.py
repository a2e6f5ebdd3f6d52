"""`ServeConfig`: what `ia3 serve` loads and the limits it enforces."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ia3.quantization import QUANTIZATIONS
from ia3.settings import Checks, field_types
from ia3.tasks import TASKS, Task

BATCHING = ("continuous", "static")
TRUNCATION = ("left", "refuse")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# fields whose `ia3 serve` flag is not derived from their name
FLAG_NAMES = {"adapters_dir": "--adapters", "allow_hub": "--no-hub", "pin_adapters": "--pin"}


def flag_name(field: str) -> str:
    """The `ia3 serve` flag of a `ServeConfig` field: `max_batch_size` -> `--max-batch-size`; a bool that is on by
    default gets the flag that turns it off (`mix_adapters` -> `--no-mix-adapters`)."""
    if field in FLAG_NAMES:
        return FLAG_NAMES[field]
    on = any(f.name == field and f.default is True for f in dataclasses.fields(ServeConfig))
    return ("--no-" if on else "--") + field.replace("_", "-")


@dataclass
class ServeConfig:
    """Settings of the server (each is a flag of `ia3 serve`: `max_batch_size` is `--max-batch-size`).

    Args:
        model: the base model: a Hub id, a local folder (with its tokenizer), a `.gguf` file path, or
            `module:<package>` (a package whose folder holds a model folder or one .gguf file).
        adapters_dir: folder of adapter folders; each subfolder whose name is a valid adapter name and that holds
            `adapter_model.safetensors` is an adapter of that name. At start the pinned ones, then the others in name
            order, are loaded up to `max_loaded_adapters` / `max_adapter_mb` (all of them when unbounded); any other
            is loaded on demand by the first request that names it (or `POST /v1/adapters/{name}`). None: no local
            adapters (Hub ids only, if `allow_hub`).
        task: `seq2seq`, `causal` or `cls` (a sequence classifier whose head each adapter brings).
        gguf_file: name of the .gguf file inside the `model` folder (a .gguf path or a module: package with one
            .gguf needs none).
        quantization: load the base quantised (`none`, `int8`, `nf4`, `torchao-int8`; the recipe's
            `model.quantization`), to serve a bigger model in the same memory; adapters stay unmerged.
        prompt: causal task: the text around each input, with `{text}` where it goes (the recipe's
            `data.prompt`); the default passes inputs through as they are.
        chat_template: causal task: wrap each input in the tokenizer's chat template as a user turn (the recipe's
            `data.chat_template`: serve adapters trained with it this way).
        label_names: labels `/v1/classify` ranks (seq2seq/causal) or the head's classes (cls). None: the first
            `recipe.yaml` (data.label_names) found among the adapters, else (cls) the model config's labels.
        device: `cpu`, `cuda`, `cuda:1`, ...; None picks cuda when available.
        dtype: the dtype the base model's weights and the adapters' vectors are served in: `float32`, `bfloat16`,
            `float16`, or `auto`: bfloat16 where the device has matrix units for it (a CPU with AMX or AVX512-BF16,
            a GPU that supports it), else float32 (and float32 for a quantised base, which computes in the dtype named).
        batching: `continuous` (generation on causal LMs and T5-family seq2seq models: requests join and leave
            the running decode batch at every token, whatever their parameters; beam search and classification
            run in shared static batches between decode steps) or `static` (every request waits for a batch of requests with the same
            parameters; for comparison).
        max_batch_size: rows (inputs) per forward / generate call; with continuous batching, rows decoded
            together.
        max_rows_per_request: continuous batching: rows of one request decoded together at most (its other rows
            wait until its earlier ones finish), so one big request (many inputs x `n`) leaves room for others; the
            waiting rows are admitted round-robin over clients (the API key with the peer address, or the peer
            address). None: half of `max_batch_size` (at least 1).
        max_prefill_tokens: continuous batching: prompt tokens prefilled in one step at most, which bounds how long
            new prompts delay the running rows: a longer prompt is prefilled in pieces over several steps, each
            followed by a decode step (decoder-only models; an encoder-decoder's prompt runs whole, alone). None:
            what the model prefills in about 0.25 s here (measured at start-up; 64 to 4096).
        max_wait_ms: how long the oldest waiting request may wait for others to fill its batch.
        burst_prefill: continuous batching: during a burst of arrivals (more rows of requests without a first token
            waiting than rows running) a step prefills up to this many times `max_prefill_tokens`, in proportion to
            that ratio, so a burst gets its first tokens in fewer steps, each stalling fewer running rows than it
            serves new ones. 1: the budget never grows.
        packed_steps: continuous batching: a step in which rows join runs the running rows' tokens and the joining
            prompts in one forward (decoder-only models whose attention it can drive, checked at start; see
            `ia3.packed`). False: the prompts run first, then the running rows' step (two forwards; for comparison).
        max_queue: requests admitted and not finished; one more is answered 503.
        max_inputs: inputs per request (413 beyond).
        max_input_chars: characters per input (413 beyond).
        max_input_tokens: the most tokens of an input (lowered to what the model's positions allow).
        truncation: an input longer than that: `left` drops its start (the end, next to the answer, stays; the
            response says how many tokens were dropped) or `refuse` (413).
        max_new_tokens: the cap on `parameters.max_new_tokens` (larger values are clamped to it).
        max_request_tokens: compute budget of one request, in token positions the model computes (413 beyond):
            generation counts (prompt tokens + new tokens) x choices x beams for every prompt, classification
            each input's tokens plus every label's tokens after it. None: what the loaded model computes in half
            of `request_timeout_s` here (measured at start-up; at least one longest input plus `max_new_tokens`).
        max_batch_tokens: compute budget of one static batch (beam search, classification), counted the same way;
            a request over it runs over several batches, each between decode steps (a single costlier row runs
            alone). None: the same as `max_prefill_tokens`, so a static batch stalls the running rows no longer
            than a step's prefill.
        max_stop: stop sequences per request.
        max_choices: completions per prompt (OpenAI `n`, and `best_of`).
        max_top_logprobs: the most alternatives per token an OpenAI request's `logprobs` / `top_logprobs` asks for.
        max_logit_bias: entries of an OpenAI request's `logit_bias` at most.
        max_schema_chars: characters of a structured-output constraint (a JSON schema, regex, grammar or the
            choices) at most; compiled grammars are cached (the 64 most recent).
        max_beams: the cap on `parameters.num_beams` (422 beyond).
        max_labels: label strings per classify request.
        max_label_tokens: tokens per label of a classify request.
        max_body_bytes: request bodies larger than this get 413 before parsing.
        request_timeout_s: a request not answered within this (queueing included) gets 504 and its work stops.
        header_timeout_s: a connection must send a request's headers within this (else it is closed); also the
            limit for the headers of each later request on a kept-alive connection.
        body_timeout_s: a request's body must arrive within this after its headers (else 408).
        idle_timeout_s: a kept-alive connection with no new request for this long is closed.
        max_connections: open connections at most; more are closed at once with 503. The listen backlog and the
            file-descriptor limit are sized with it, so accepting never fails below it.
        max_connections_per_client: open connections of one peer address at most (the API key is not known when a
            connection opens); more are closed at once with 503, so one client cannot hold every connection.
        shutdown_timeout_s: on shutdown, requests still running after this are cut off.
        api_key: when set, `/v1/*` and `/metrics` need `Authorization: Bearer KEY` or `X-API-Key: KEY`.
        allow_hub: let `POST /v1/adapters/{name}` with `{"source": "<hub id>"}` download an adapter.
        mix_adapters: batch requests of different adapters together (False: one adapter per batch; for comparison).
        save_tokenizer: write the served model's tokenizer to this folder at start (`save_pretrained`; for
            lm-eval's `tokenizer=` and other clients that tokenise themselves, also when the base is a GGUF file).
        max_loaded_adapters: adapters resident at most; loading one more evicts the least recently used adapter
            that no queued or running request uses and that is not pinned. None: no limit. While more distinct
            adapters are in use than the limit allows, it is exceeded; the surplus goes once their requests end.
        max_adapter_mb: the same bound on the resident adapters' tensors, in MiB (None: no limit).
        pin_adapters: adapters loaded at start and never evicted (`--pin a,b`).
        hub_on_demand: with `allow_hub`, a request naming a Hub repo (`owner/name`) that is not resident downloads
            and loads it on demand (off by default: any client could make the server fetch any public repo).
        lora_paths_anywhere: let `POST /v1/load_lora_adapter` read a `lora_path` outside the adapters folder
            (default: the path must resolve inside it, as the adapter folders must).
    """

    model: str
    adapters_dir: str | None = None
    task: str = "seq2seq"
    gguf_file: str | None = None
    quantization: str = "none"
    prompt: str = "{text}"
    chat_template: bool = False
    label_names: list[str] | None = None
    device: str | None = None
    dtype: str = "auto"
    batching: str = "continuous"
    max_batch_size: int = 32
    max_rows_per_request: int | None = None
    max_prefill_tokens: int | None = None
    max_wait_ms: float = 10.0
    burst_prefill: float = 8.0
    packed_steps: bool = True
    max_queue: int = 256
    max_inputs: int = 64
    max_input_chars: int = 4000
    max_input_tokens: int = 512
    truncation: str = "left"
    max_new_tokens: int = 128
    max_request_tokens: int | None = None
    max_batch_tokens: int | None = None
    max_stop: int = 4
    max_choices: int = 8
    max_top_logprobs: int = 20
    max_logit_bias: int = 300
    max_schema_chars: int = 32768
    max_beams: int = 8
    max_labels: int = 64
    max_label_tokens: int = 32
    max_body_bytes: int = 2 * 1024 * 1024
    request_timeout_s: float = 30.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    idle_timeout_s: float = 5.0
    max_connections: int = 512
    max_connections_per_client: int = 64
    shutdown_timeout_s: float = 10.0
    api_key: str | None = None
    allow_hub: bool = True
    mix_adapters: bool = True
    save_tokenizer: str | None = None
    max_loaded_adapters: int | None = None
    max_adapter_mb: float | None = None
    pin_adapters: list[str] | None = None
    hub_on_demand: bool = False
    lora_paths_anywhere: bool = False

    def __post_init__(self) -> None:
        c = Checks(self, flag_name)
        c.text("model", "a Hub id, a local folder, a .gguf file or module:<package>")
        c.choice("task", TASKS)
        c.gguf("gguf_file")
        c.choice("quantization", QUANTIZATIONS)
        c.choice("batching", BATCHING)
        c.choice("truncation", TRUNCATION)
        c.choice("dtype", DTYPES)
        if self.task in TASKS:
            c.problems += TASKS[self.task].check_settings(self.prompt, self.chat_template, flag_name)
        types = field_types(ServeConfig)
        for f in dataclasses.fields(self):
            if f.name.startswith("max_") and types[f.name] in (int, int | None):
                c.integer(f.name, 1)
            if f.name.endswith("_timeout_s"):
                value = getattr(self, f.name)
                if c.ok(f.name):
                    c.require(0 < value < float("inf"), f"{flag_name(f.name)} must be a number > 0; got {value!r}")
        if c.ok("max_wait_ms"):
            c.require(
                0 <= self.max_wait_ms < float("inf"), f"--max-wait-ms must be a number >= 0; got {self.max_wait_ms!r}"
            )
        if c.ok("burst_prefill"):
            value = self.burst_prefill
            c.require(1 <= value <= 64, f"--burst-prefill must be a number from 1 to 64; got {value!r}")
        c.names("label_names")
        c.names("pin_adapters")
        if c.ok("max_adapter_mb") and self.max_adapter_mb is not None:
            value = self.max_adapter_mb
            c.require(0 < value < float("inf"), f"--max-adapter-mb must be a number > 0; got {value!r}")
        if c.ok("api_key"):
            c.require(bool(self.api_key), "--api-key must not be empty (leave it unset for no key)")
        c.done("Invalid serve config")

    @property
    def task_class(self) -> type[Task]:
        """The task `task` names (checked when the config was made)."""
        return TASKS[self.task]

    @property
    def request_rows(self) -> int:
        """`max_rows_per_request`, or its default."""
        return self.max_rows_per_request or max(1, self.max_batch_size // 2)
