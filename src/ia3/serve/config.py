"""`ServeConfig`: what `ia3 serve` loads and the limits it enforces."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

TASKS = ("seq2seq", "causal", "cls")


@dataclass
class ServeConfig:
    """Settings of the server (the CLI flags of `ia3 serve` map one to one).

    Args:
        model: base model, a Hub id or a local folder (with its tokenizer).
        adapters_dir: folder of adapter folders; each subfolder whose name is a valid adapter name and that holds
            `adapter_model.safetensors` is loaded at start under that name. `POST /v1/adapters/{name}` loads
            `adapters_dir/name` later. None: no local adapters (Hub ids only, if `allow_hub`).
        task: `seq2seq`, `causal` or `cls` (a sequence classifier whose head each adapter brings).
        label_names: labels `/v1/classify` ranks (seq2seq/causal) or the head's classes (cls). None: the first
            `recipe.yaml` (data.label_names) found among the adapters, else (cls) the model config's labels.
        device: `cpu`, `cuda`, ...; None picks cuda when available.
        max_batch_size: rows (inputs) per forward / generate call.
        max_wait_ms: how long the oldest waiting request may wait for others to fill its batch.
        max_queue: requests admitted and not finished; one more is answered 503.
        max_inputs / max_input_chars: per request: number of inputs, characters per input (413 beyond).
        max_input_tokens: inputs are truncated to this many tokens (and to what the model's positions allow).
        max_new_tokens: the cap on `parameters.max_new_tokens` (larger values are clamped to it).
        max_beams: the cap on `parameters.num_beams` (422 beyond).
        max_labels / max_label_tokens: per classify request: label strings, tokens per label.
        max_body_bytes: request bodies larger than this get 413 before parsing.
        request_timeout_s: a request not answered within this (queueing included) gets 504.
        api_key: when set, `/v1/*` and `/metrics` need `Authorization: Bearer KEY` or `X-API-Key: KEY`.
        allow_hub: let `POST /v1/adapters/{name}` with `{"source": "<hub id>"}` download an adapter.
        mix_adapters: batch requests of different adapters together (False: one adapter per batch; for comparison).
    """

    model: str
    adapters_dir: str | None = None
    task: str = "seq2seq"
    label_names: list[str] | None = None
    device: str | None = None
    max_batch_size: int = 32
    max_wait_ms: float = 10.0
    max_queue: int = 256
    max_inputs: int = 64
    max_input_chars: int = 4000
    max_input_tokens: int = 512
    max_new_tokens: int = 128
    max_beams: int = 8
    max_labels: int = 64
    max_label_tokens: int = 32
    max_body_bytes: int = 2 * 1024 * 1024
    request_timeout_s: float = 30.0
    api_key: str | None = None
    allow_hub: bool = True
    mix_adapters: bool = True

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.task not in TASKS:
            problems.append(f"task must be one of {list(TASKS)}; got {self.task!r}")
        if not isinstance(self.model, str) or not self.model:
            problems.append("model must name a Hub id or a local folder")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("max_wait_ms", "request_timeout_s"):
                if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                    problems.append(f"{f.name} must be a number >= 0; got {value!r}")
            elif f.name.startswith("max_") and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                problems.append(f"{f.name} must be an integer >= 1; got {value!r}")
        if self.request_timeout_s == 0:
            problems.append("request_timeout_s must be > 0")
        if self.label_names is not None:
            names = list(self.label_names)
            if not names or any(not isinstance(n, str) or not n.strip() for n in names) or len(set(names)) != len(names):
                problems.append(f"label_names must be distinct non-empty strings; got {self.label_names!r}")
        if self.api_key is not None and not self.api_key:
            problems.append("api_key must not be empty (leave it unset for no key)")
        if problems:
            raise ValueError("Invalid serve config:\n  - " + "\n  - ".join(problems))
