"""Continuous batching: rows join and leave the running decode batch at token boundaries (decoder-only models, and
encoder-decoders with relative positions: T5, mT5).

`Decoder` schedules; the running rows' model state (their key/value cache, mask and positions) is one `DecodeState`
of the model's family (`ia3.families`), which knows how to prefill, extend, filter and step it. Each `step()`:

1. admits waiting rows while the batch has room (`max_rows`) and the step's prefill budget (`max_prefill_tokens`)
   allows, round-robin over the clients with waiting rows (the least recently served client first) and at most
   `max_rows_per_request` rows of one request at a time (its other rows wait until its earlier ones finish), so a
   big request cannot take every row from the others: their prompts run once (each row with its own adapter) and
   their state joins the running batch's;
2. runs one decode step for every running row, each with its own adapter (`per_example`);
3. picks each row's next token with its own settings (greedy, or sampling with its own temperature / top-p / top-k
   and its own seeded generator), decodes its text incrementally (UTF-8 safe: an incomplete multi-byte character is
   held back), and checks its stop sequences, EOS and `max_new_tokens`;
4. drops finished and cancelled rows from the batch (and the cache columns no row needs any more).

So requests with different `max_new_tokens`, stop sequences and sampling settings share every decode step, and a
short request leaves the batch as soon as it is done. A greedy row's tokens do not depend on the other rows: padding
is masked and positions count real tokens only, so each answer equals the same request run alone (to float rounding
of the batched matrix products).

Only the worker thread calls a `Decoder`'s `step`; `add` and `Row.cancel` may be called from any thread.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ia3.families import DecodeState, eos_ids
from ia3.serve.errors import ApiError

log = logging.getLogger("ia3.serve")
# a temperature below this is greedy decoding (the limit of sampling as the temperature goes to 0); smaller ones
# overflow the division of the logits (float32 underflows below ~1e-45; transformers' sampling below ~1e-4)
GREEDY_TEMPERATURE = 1e-4


@dataclass(frozen=True)
class Sampling:
    """How a row picks its tokens. `temperature` below `GREEDY_TEMPERATURE` (0 included) is greedy; `top_k` 0 keeps
    every token."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


class RowError(Exception):
    """A row failed on its own (e.g. its sampling settings gave no distribution); the batch goes on."""


@dataclass(eq=False)
class Row:
    """One sequence to generate: a prompt (token ids), its adapter and its own settings.

    `on_text(row, piece)` (optional) gets each newly decoded piece of text as soon as it is stable; `on_done(row)`
    is called once when the row finishes (`finish_reason` is "stop" or "length"), fails (`error` set) or is
    cancelled (`finish_reason` "cancelled"). Both run on the worker thread and must not block.
    """

    prompt: list[int]
    adapter: str
    max_new_tokens: int
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = ()
    on_text: Callable[[Row, str], None] | None = None
    on_done: Callable[[Row], None] | None = None
    index: int = 0  # which choice of its request (the seed is offset by it)
    client: str = ""  # who asked (fair admission is round-robin over clients)
    request: int = 0  # which request of its client (the row cap applies per request)
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # decoded so far (a stop sequence and what follows it cut off)
    emitted: int = 0  # characters of `text` already handed to `on_text`
    finish_reason: str | None = None
    error: BaseException | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Stop generating this row at the next token boundary (any thread)."""
        self.cancelled = True


class Detokenizer:
    """Incremental text of a growing token list: the full decode each time (exact for every tokenizer), with the
    trailing replacement characters of an incomplete UTF-8 sequence held back until it completes."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def text(self, tokens: list[int], final: bool = False) -> str:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if not final:
            text = text.rstrip("\ufffd")
        return text


def _holdback(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop sequence (so cannot be emitted yet)."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


def next_tokens(logits: torch.Tensor, rows: list[Row]) -> list[int | BaseException]:
    """One token per row from its last-position `logits` (B, V): greedy rows in one argmax, sampling rows each with
    their own settings and generator. A row whose settings give no valid distribution gets a `RowError`."""
    logits = logits.float()
    picks: list[int | BaseException] = logits.argmax(-1).tolist()
    for i, row in enumerate(rows):
        s = row.sampling
        if s.greedy:
            continue
        try:
            scores = logits[i]
            # shift before dividing: the best token stays at 0, so even a tiny temperature cannot overflow to NaN
            scores = (scores - scores.max()) / s.temperature
            if 0 < s.top_k < scores.numel():
                kth = torch.topk(scores, s.top_k).values[-1]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            if s.top_p < 1.0:
                ordered, order = torch.sort(scores, descending=True)
                probs = ordered.softmax(-1)
                drop = probs.cumsum(-1) - probs > s.top_p  # keep the smallest prefix whose mass reaches top_p
                scores = scores.scatter(0, order[drop], float("-inf"))
            probs = scores.softmax(-1)
            if not torch.isfinite(probs).all() or probs.sum() <= 0:
                raise RowError("the sampling settings give no valid distribution over tokens")
            picks[i] = int(torch.multinomial(probs, 1, generator=row.generator))
        except Exception as err:  # this row's problem only
            picks[i] = err if isinstance(err, RowError) else RowError(f"sampling failed: {type(err).__name__}: {err}")
    return picks


class Decoder:
    """The running decode batch of a generating model, with its waiting rows (see the module docstring).

    The model-specific parts (prompt padding, the key/value cache and how it grows and shrinks by row, the decode
    step's inputs) belong to the model family's `DecodeState` (`ia3.families`); this class only schedules: admit,
    step, sample, stop, drop.

    Args:
        model: the transformers model (adapters already injected, if any).
        tokenizer: its tokenizer (for incremental decoding and EOS).
        device: where the model runs.
        rows_context: `rows_context(adapters)` -> a context manager under which batch row `i` uses `adapters[i]`.
        state_class: the model family's decode state (the task's `decode_state`).
        max_rows: rows decoded together at most.
        max_prefill_tokens: prompt tokens admitted in one step at most (one longer prompt is admitted alone), so a
            long prompt delays the running rows by one bounded prefill.
        max_positions: the model's position limit (a row stops with "length" there); None: no limit.
        max_rows_per_request: rows of one request decoded together at most (None: `max_rows`); its other rows
            wait for its earlier ones to finish.
        adapter_loaded: `adapter_loaded(name)` -> False once an adapter is unloaded: its rows, waiting or running,
            end with 404 at the next step, and the other rows go on.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        device: torch.device,
        rows_context: Callable[[list[str]], Any],
        state_class: type[DecodeState],
        max_rows: int = 32,
        max_prefill_tokens: int = 4096,
        max_positions: int | None = None,
        adapter_loaded: Callable[[str], bool] | None = None,
        max_rows_per_request: int | None = None,
    ) -> None:
        self.model = model
        self.adapter_loaded = adapter_loaded
        self.state_class = state_class
        self.device = device
        self.rows_context = rows_context
        self.max_rows = max_rows
        self.max_prefill_tokens = max_prefill_tokens
        self.max_positions = max_positions
        self.max_rows_per_request = max_rows_per_request or max_rows
        self.served: dict[str, int] = {}  # client -> when (admission count) it last had a row admitted
        self.admissions = 0
        self.detok = Detokenizer(tokenizer)
        self.eos = eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._lock = threading.Lock()
        self.waiting: deque[Row] = deque()
        self.running: list[Row] = []
        self.state: DecodeState | None = None  # the running rows' cache, in `running` order
        self.last: list[int] = []  # each running row's last token (the next step's input)
        self.steps = 0  # decode steps run
        self.tokens_out = 0
        self.row_steps = 0  # sum over decode steps of the rows decoded
        self.max_rows_seen = 0
        self.max_adapters_seen = 0

    # -- any thread --------------------------------------------------------------------------------------------
    def add(self, rows: list[Row]) -> None:
        for row in rows:
            if row.generator is None and not row.sampling.greedy:
                row.generator = torch.Generator(device="cpu")
                if row.sampling.seed is not None:
                    row.generator.manual_seed(row.sampling.seed + row.index)
                else:
                    row.generator.seed()
        with self._lock:
            self.waiting.extend(rows)

    def busy(self) -> bool:
        with self._lock:
            return bool(self.running or self.waiting)

    def counts(self) -> tuple[int, int]:
        """(running rows, waiting rows)."""
        with self._lock:
            return len(self.running), len(self.waiting)

    def adapter_rows(self) -> dict[str, int]:
        """Running rows by adapter."""
        with self._lock:
            return dict(Counter(r.adapter for r in self.running))

    # -- worker thread -----------------------------------------------------------------------------------------
    def step(self) -> None:
        """Admit what fits, run one decode step, retire finished rows."""
        self._drop_gone()
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)
        decoding = [r for r in self.running if r not in admitted]
        if decoding:
            self._decode()
        self._retire()

    def _drop_gone(self) -> None:
        loaded = self.adapter_loaded or (lambda name: True)
        with self._lock:
            gone = [r for r in self.waiting if r.cancelled or not loaded(r.adapter)]
            for r in gone:
                self.waiting.remove(r)
        for r in [*gone, *self.running]:
            if r.cancelled:
                self._finish(r, "cancelled")
            elif not loaded(r.adapter):  # unloaded while it waited or ran
                self._finish(r, None, ApiError(404, "adapter_not_found", f"Adapter {r.adapter!r} was unloaded"))
        if any(r.finish_reason or r.error for r in self.running):
            self._retire()

    def _admit(self) -> list[Row]:
        """Waiting rows to admit now: round-robin over clients (least recently served first), each request under
        its row cap, within the free rows and the prefill budget (one longer prompt is admitted alone)."""
        admitted: list[Row] = []
        budget = self.max_prefill_tokens
        with self._lock:
            queues = self._eligible()
            order = sorted(queues, key=lambda c: self.served.get(c, -1))  # stable: first arrival breaks ties
            rows = Counter((r.client, r.request) for r in self.running)
            while order and len(self.running) + len(admitted) < self.max_rows:
                client = order.pop(0)
                queue = queues[client]
                while queue and rows[client, queue[0].request] >= self.max_rows_per_request:
                    queue.popleft()  # this request has its share; its next rows wait
                if not queue:
                    continue
                row = queue[0]
                if admitted and len(row.prompt) > budget:
                    break
                admitted.append(queue.popleft())
                budget -= len(row.prompt)
                rows[client, row.request] += 1
                self.admissions += 1
                self.served[client] = self.admissions
                order.append(client)
            if admitted:
                taken = set(map(id, admitted))
                self.waiting = deque(r for r in self.waiting if id(r) not in taken)
            live = {r.client for r in (*self.waiting, *self.running, *admitted)}
            self.served = {c: t for c, t in self.served.items() if c in live}
        return admitted

    def _eligible(self) -> dict[str, deque[Row]]:  # with the lock held
        """The waiting rows by client, each client's in arrival order."""
        queues: dict[str, deque[Row]] = {}
        for row in self.waiting:
            queues.setdefault(row.client, deque()).append(row)
        return queues

    def _prefill(self, rows: list[Row]) -> None:
        """Run the new rows' prompts; join their state to the running batch's. A prompt that fails alone fails
        only its row: on a batch failure each row is retried by itself."""
        try:
            self._join(rows, *self._run_prompts(rows))
        except Exception:
            if len(rows) == 1:
                log.exception("prefill failed for one row")
                self._finish(rows[0], None, RowError("the model failed on this input"))
                return
            for row in rows:  # find the culprit(s); the others run
                try:
                    self._join([row], *self._run_prompts([row]))
                except Exception as err:
                    log.warning("prefill failed for one row: %s: %s", type(err).__name__, err)
                    self._finish(row, None, RowError("the model failed on this input"))

    def _run_prompts(self, rows: list[Row]) -> tuple[DecodeState, list[int | BaseException]]:
        with self.rows_context([r.adapter for r in rows]):
            state, logits = self.state_class.prefill(self.model, [r.prompt for r in rows], self.pad_id, self.device)
        return state, next_tokens(logits, rows)

    def _join(self, rows: list[Row], state: DecodeState, picks: list[int | BaseException]) -> None:
        last = [p if isinstance(p, int) else self.pad_id for p in picks]
        if self.state is None or not self.running:
            self.state, self.last, self.running = state, last, list(rows)
        else:
            self.state.extend(state)
            self.last, self.running = self.last + last, self.running + list(rows)
        for row, pick in zip(rows, picks):
            self._take(row, pick)

    def stats(self) -> dict:
        return {
            "steps": self.steps,
            "tokens": self.tokens_out,
            "mean_rows": round(self.row_steps / self.steps, 3) if self.steps else None,
            "max_rows": self.max_rows_seen,
            "max_adapters": self.max_adapters_seen,
        }

    def _decode(self) -> None:
        assert self.state is not None
        self.steps += 1
        self.row_steps += len(self.running)
        self.max_rows_seen = max(self.max_rows_seen, len(self.running))
        self.max_adapters_seen = max(self.max_adapters_seen, len({r.adapter for r in self.running}))
        with self.rows_context([r.adapter for r in self.running]):
            logits = self.state.step(self.model, self.last)
        fresh = [r.finish_reason is None and r.error is None for r in self.running]
        picks = next_tokens(logits, self.running)
        self.last = [p if isinstance(p, int) else self.pad_id for p in picks]
        for row, pick, live in zip(self.running, picks, fresh):
            if live:
                self._take(row, pick)

    def _take(self, row: Row, pick: int | BaseException) -> None:
        """Append the row's new token; emit its stable text; finish it on EOS, a stop sequence or a limit."""
        if row.finish_reason is not None or row.error is not None:
            return
        if isinstance(pick, BaseException):
            self._finish(row, None, pick)
            return
        if pick in self.eos:
            self._flush(row)
            self._finish(row, "stop")
            return
        row.tokens.append(pick)
        self.tokens_out += 1
        text = self.detok.text(row.tokens)
        reason = None
        for stop in row.stop:
            at = text.find(stop, max(0, row.emitted - len(stop)))
            if at >= 0:
                text, reason = text[:at], "stop"
        row.text = text
        if reason is None and len(row.tokens) >= row.max_new_tokens:
            reason = "length"
        position = len(row.prompt) + len(row.tokens)
        if reason is None and self.max_positions is not None and position >= self.max_positions:
            reason = "length"
        if reason == "length":
            self._flush(row)
        else:
            self._emit(row, len(row.text) if reason else len(row.text) - _holdback(row.text, row.stop))
        if reason:
            self._finish(row, reason)

    def _emit(self, row: Row, upto: int) -> None:
        if upto > row.emitted:
            piece = row.text[row.emitted : upto]
            row.emitted = upto
            if row.on_text is not None:
                _call(row.on_text, row, piece)

    def _flush(self, row: Row) -> None:
        """The row ends without a stop sequence: its whole text counts, an incomplete last character included."""
        row.text = self.detok.text(row.tokens, final=True)
        self._emit(row, len(row.text))

    def _finish(self, row: Row, reason: str | None, error: BaseException | None = None) -> None:
        if row.finish_reason is not None or row.error is not None:
            return
        row.finish_reason, row.error = reason, error
        if row.on_done is not None:
            _call(row.on_done, row)

    def _retire(self) -> None:
        """Drop rows that finished, failed or were cancelled (and the cache columns no remaining row needs)."""
        for row in self.running:
            if row.cancelled:
                self._finish(row, "cancelled")
        keep = [i for i, r in enumerate(self.running) if r.finish_reason is None and r.error is None]
        if len(keep) == len(self.running):
            return
        if not keep:
            self._reset()
            return
        assert self.state is not None
        self.state.filter(keep)
        self.last = [self.last[i] for i in keep]
        self.running = [self.running[i] for i in keep]

    def fail_all(self, error: BaseException, waiting: bool = False) -> None:
        """Fail every running row (the batch's model call itself failed), and with `waiting` the waiting rows too
        (shutting down); reset the batch."""
        if waiting:
            with self._lock:
                rows, self.waiting = list(self.waiting), deque()
            for row in rows:
                self._finish(row, None, error)
        for row in self.running:
            self._finish(row, None, error)
        self._reset()

    def _reset(self) -> None:
        self.running, self.state, self.last = [], None, []


def _call(fn: Callable[..., None], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:  # a callback's failure (e.g. a closed stream) must not stop the batch
        log.exception("row callback failed")
