"""One cost model for all the server's work, and the budgets it is held to.

The cost of a piece of work is the number of token positions the model computes for it:

* generation: every prompt's tokens and its new tokens, for each of its `n` choices and beams:
  `sum(len(prompt) + max_new_tokens) x n x beams`;
* classification: each input's tokens, plus, for a generating model, every label's tokens after it:
  `sum(len(input) + sum(len(label tokens)))`.

A request whose cost is over the request budget (`--max-request-tokens`) is refused up front with 413 naming the
limit, and so is a beam search whose first step (it prefills every beam's copy of the prompt at once and cannot be
cut) would stall the running streams for more than about a second (`Budgets.step_tokens`). A decode step prefills
at most `--max-prefill-tokens` prompt tokens (a longer prompt in pieces over several steps); static work
(classification, beam search) runs in batches of at most `--max-batch-tokens` (by default the same as a step's
prefill), each between two decode steps, and a generation batch hands the model back to the decoder after each of
its steps, so it slows the running streams by one bounded slice at a time and stops at the next slice once its
request is gone.

Unset budgets are derived at start-up from the loaded model's measured speed (`Speed`: a short prefill and a few
decode steps on the worker's device), so that a request the defaults admit finishes, alone, within half the request
timeout, and one step's prefill stalls the running rows for about a quarter of a second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ia3.serve.config import ServeConfig

PREFILL_STEP_S = 0.25  # the stall one step's prefill may add to the running rows' inter-token gap
STEP_STALL_S = 1.0  # the longest stall one step that cannot be cut (a beam search's prefill) may add
SHARE_OF_TIMEOUT = 0.5  # a request the default budget admits takes at most this share of the request timeout alone


@dataclass(frozen=True)
class Speed:
    """Measured speed of the loaded model: prompt tokens per second in one prefill, and generated tokens per second
    when `rows` rows decode together (None when the server does not decode row by row)."""

    prefill_tps: float
    decode_tps: float | None = None
    rows: int = 1


def generation_cost(prompt_lengths: list[int], max_new_tokens: int, n: int = 1, beams: int = 1) -> int:
    """Token positions a generation request computes."""
    return sum(length + max_new_tokens for length in prompt_lengths) * n * beams


def classify_cost(prompt_lengths: list[int], choice_lengths: list[int]) -> int:
    """Token positions a classification request computes (`choice_lengths`: empty for a classifier head)."""
    return sum(length + sum(choice_lengths) for length in prompt_lengths)


@dataclass(frozen=True)
class Budgets:
    """The budgets in force (set by flags, else derived from `speed`), and the speed they came from."""

    request_tokens: int
    batch_tokens: int
    prefill_tokens: int
    speed: Speed | None = None
    step_tokens: int = 4096  # tokens one uncut step (a beam search's prefill of all its beams) may compute

    @classmethod
    def of(cls, config: ServeConfig, speed: Speed | None, max_input_tokens: int) -> Budgets:
        """The budgets of `config`, its unset ones derived from `speed` (or the historical defaults without)."""
        floor = max_input_tokens + config.max_new_tokens  # one ordinary request always fits
        if speed is None:
            derived_request, derived_prefill = config.max_batch_size * (max_input_tokens + config.max_new_tokens), 4096
        else:
            rate = min(speed.prefill_tps, speed.decode_tps or math.inf)
            derived_request = int(rate * config.request_timeout_s * SHARE_OF_TIMEOUT)
            derived_prefill = int(speed.prefill_tps * PREFILL_STEP_S) // 16 * 16
        request = config.max_request_tokens or max(floor, derived_request)
        prefill = config.max_prefill_tokens or min(4096, max(64, derived_prefill))
        batch = config.max_batch_tokens or prefill
        step = 4096 if speed is None else max(batch, int(speed.prefill_tps * STEP_STALL_S))
        return cls(request, batch, prefill, speed, step)

    def describe(self) -> str:
        """The budgets as the start-up summary shows them."""
        text = (
            f"{self.request_tokens} tokens of work per request, {self.batch_tokens} per static batch, "
            f"{self.prefill_tokens} prompt tokens prefilled per step"
        )
        if self.speed is not None:
            decode = f", {self.speed.decode_tps:.0f} decoded ({self.speed.rows} rows)" if self.speed.decode_tps else ""
            text += f" (measured: {self.speed.prefill_tps:.0f} prompt tokens/s{decode})"
        return text
