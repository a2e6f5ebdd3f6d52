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
ECHO_TOKENS = 2048  # prompt tokens per forward that scores echoed prompts (their every position's logits are kept)
CANDIDATES = 64  # the most likely tokens of each sampled row that its filters see first (`distributions`)
# a prefill forward's fixed cost in prompt positions: joining prompts of different lengths go in one padded batch
# unless splitting them saves more padded positions than this per extra forward (`padding_groups`). Measured for
# SmolLM2 in fp32 on 2 cores: a forward of 8 / 16 / 32 / 64 positions took 77 / 90 / 109 / 151 ms (~60 ms fixed,
# ~1.4 ms a position), and a burst of 27 prompts (755 positions) prefilled in 1,670 ms as one batch padded to the
# longest, 1,103-1,117 ms in 2-3 groups (this cost 32-64), 1,236 ms in 4 (16), 2,755 ms one by one
FORWARD_TOKENS = 48
WIDE_CANDIDATES = 1024  # the most likely tokens they see next, when the first ones cannot decide (one row's topk)
NO_DISTRIBUTION = "the sampling settings give no valid distribution over tokens"


@dataclass(frozen=True)
class Sampling:
    """How a row picks its tokens. `temperature` below `GREEDY_TEMPERATURE` (0 included) is greedy; `top_k` 0 keeps
    every token; `min_p` 0 keeps every token.

    The row's logits are shaped first (`shape`), in this order: `logit_bias` added (token id -> bias),
    `repetition_penalty` (vLLM's and transformers' rule: a token seen in the prompt or the output has its logit
    divided by the penalty when positive, multiplied when negative), `frequency_penalty` x (times the token was
    generated) and `presence_penalty` x (generated at all) subtracted (OpenAI's rule, over the output only), EOS
    forbidden while fewer than `min_tokens` tokens were generated, then the row's structured-output mask. Logprobs
    are read from the shaped logits, before the temperature, top-k, top-p and min-p.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def shapes(self) -> bool:
        """Whether the logits change before the pick (penalties, bias, min_tokens)."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or self.min_tokens
        )


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the `top` most likely tokens at its position (id, logprob), best first."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


class Guide:
    """A row's structured-output constraint (`ia3.serve.guided` makes them). Before each pick, `mask_rows` sets
    the tokens each constraint forbids to -inf in its row of the step's logits (one call for all the step's rows
    with a constraint of one class); after it, `accept(token)` -> False when the constraint refuses the token."""

    @classmethod
    def mask_rows(cls, logits: torch.Tensor, rows: list[int], guides: list[Any]) -> list[int]:
        """Mask `guides[k]`'s forbidden tokens in row `rows[k]` of `logits` (B, V), in place; the rows whose
        constraint allows no token at all."""
        raise NotImplementedError

    def accept(self, token: int) -> bool:
        raise NotImplementedError


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
    logprobs: int | None = None  # None: no logprobs; k: each token's logprob and its k most likely alternatives
    echo: bool = False  # score the prompt too (`prompt_logprobs`, the first token's None)
    guide: Guide | None = None  # structured output
    token_logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token taken (EOS included)
    prompt_logprobs: list[TokenLogprob] | None = None
    pending: TokenLogprob | None = None  # the logprob of the token picked, until it is taken
    stop_reason: str | None = None  # the stop sequence that ended the row
    eos: frozenset[int] = frozenset()  # the model's end tokens (set when the row is added to a decoder)

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


def mask_guided(logits: torch.Tensor, rows: list[Row]) -> dict[int, RowError]:
    """Mask, in place, the tokens each constrained row's guide forbids in its row of `logits` (B, V), all the rows
    of one guide class in one call. The mask adds 0 or -inf, so it commutes with the shaping that follows (`shape`:
    a finite bias, a positive penalty, -inf for EOS), and the rows' picks and logprobs are those of the order
    `Sampling` documents. Returns a `RowError` for each row whose constraint allows no token at all or fails (a
    failure of the batched call is retried row by row, so only the culprit fails)."""
    classes: dict[type[Guide], list[int]] = {}
    for i, row in enumerate(rows):
        if row.guide is not None:
            classes.setdefault(type(row.guide), []).append(i)
    stuck: dict[int, RowError] = {}
    for cls, indices in classes.items():
        try:
            dead = cls.mask_rows(logits, indices, [rows[i].guide for i in indices])
        except Exception:
            dead = []
            for i in indices:
                try:
                    dead += cls.mask_rows(logits, [i], [rows[i].guide])
                except Exception as err:
                    stuck[i] = RowError(f"structured output failed: {type(err).__name__}: {err}")
        for i in dead:
            stuck[i] = RowError(
                "structured output: no token of the model's vocabulary continues the output here; the vocabulary "
                "cannot spell what the constraint requires"
            )
    return stuck


def next_tokens(logits: torch.Tensor, rows: list[Row]) -> list[int | BaseException]:
    """One token per row from its last-position `logits` (B, V): plain greedy rows in one argmax, the sampled rows'
    distributions together (`distributions`), each row with its own shaping (`Sampling`), constraint, settings and
    generator. A row that asks for logprobs gets the pick's (`Row.pending`). A row whose settings give no valid
    distribution gets a `RowError`."""
    logits = logits.float()
    stuck = mask_guided(logits, rows)  # constrained rows: all masked at once, in place (float32 logits)
    picks: list[int | BaseException] = logits.argmax(-1).tolist()
    sampled: list[tuple[int, Row, torch.Tensor]] = []
    for i, row in enumerate(rows):
        s = row.sampling
        if i in stuck:
            picks[i] = stuck[i]
            continue
        plain = not s.shapes  # a constrained row's logits are masked already
        if plain and s.greedy and row.logprobs is None:
            continue
        try:
            scores = logits[i] if plain else shape(logits[i], row)
            if not s.greedy:
                sampled.append((i, row, scores))
                continue
            picks[i] = int(scores.argmax())
            if row.logprobs is not None:
                row.pending = logprob_of(scores.log_softmax(-1), picks[i], row.logprobs)
        except Exception as err:  # this row's problem only
            picks[i] = _row_error(err)
    if sampled:
        kept = distributions(torch.stack([scores for _, _, scores in sampled]), [r.sampling for _, r, _ in sampled])
        for (i, row, scores), dist in zip(sampled, kept):
            if isinstance(dist, RowError):
                picks[i] = dist
                continue
            try:
                ids, probs = dist
                pick = draw(probs, row.generator)
                picks[i] = pick if ids is None else int(ids[pick])
                if row.logprobs is not None:
                    row.pending = logprob_of(scores.log_softmax(-1), picks[i], row.logprobs)
            except Exception as err:  # this row's problem only
                picks[i] = _row_error(err)
    return picks


def _row_error(err: Exception) -> RowError:
    return err if isinstance(err, RowError) else RowError(f"sampling failed: {type(err).__name__}: {err}")


def shape(scores: torch.Tensor, row: Row) -> torch.Tensor:
    """The row's logits (V,) after its bias, penalties and `min_tokens` (no token of `row.eos`) (see `Sampling`;
    the constraint's mask is applied before, by `mask_guided`)."""
    s, vocab = row.sampling, scores.numel()
    scores = scores.clone()
    if s.logit_bias:
        ids = torch.tensor([t for t, _ in s.logit_bias if t < vocab], dtype=torch.long)
        scores.index_add_(0, ids, torch.tensor([b for t, b in s.logit_bias if t < vocab], dtype=scores.dtype))
    if s.repetition_penalty != 1.0:
        seen = torch.tensor(sorted({t for t in (*row.prompt, *row.tokens) if t < vocab}), dtype=torch.long)
        values = scores[seen]
        scores[seen] = torch.where(values > 0, values / s.repetition_penalty, values * s.repetition_penalty)
    if (s.frequency_penalty or s.presence_penalty) and row.tokens:
        counts = torch.bincount(torch.tensor(row.tokens), minlength=vocab)[:vocab].to(scores.dtype)
        scores -= counts * s.frequency_penalty + (counts > 0).to(scores.dtype) * s.presence_penalty
    if len(row.tokens) < s.min_tokens and not s.ignore_eos:
        banned = [t for t in row.eos if t < vocab]
        if banned:
            scores[banned] = float("-inf")
    return scores


def distributions(
    scores: torch.Tensor, settings: list[Sampling]
) -> list[tuple[torch.Tensor | None, torch.Tensor] | RowError]:
    """Each sampled row's distribution from its shaped logits `scores` (B, V): (token ids, their probabilities)
    over the tokens its temperature, top-k, top-p and min-p keep (ids None: every token of the vocabulary, in order),
    or a `RowError` when the settings leave no valid distribution.

    The filters apply in this order, each renormalising what the previous kept: temperature, `top_k` (the k most
    likely), `top_p` (the smallest most-likely prefix whose mass reaches it), `min_p` (tokens at least `min_p` x the
    most likely's probability). The rows' softmax and their `CANDIDATES` most likely tokens are computed together;
    a row's filters then run over those candidates alone whenever they provably keep only candidates (its `top_k` is
    at most `CANDIDATES`, or the candidates' mass passes its `top_p`, or the last candidate falls under its `min_p`),
    else over its `WIDE_CANDIDATES` most likely tokens by the same rule (a flat distribution's top-p: a `topk` of
    the row costs a fifth of the full sort), else over the whole vocabulary (`full_distribution`, the plain
    computation, which the tests compare this with).
    """
    vocab = scores.shape[-1]
    temperature = torch.tensor([s.temperature for s in settings], dtype=scores.dtype).unsqueeze(1)
    # shift before dividing: the best token stays at 0, so even a tiny temperature cannot overflow to NaN
    scaled = (scores - scores.max(-1, keepdim=True).values) / temperature
    probs = scaled.softmax(-1)
    top, ids = probs.topk(min(CANDIDATES, vocab), dim=-1)
    best = top[:, 0]  # NaN (ranked first) or no mass when a row's logits give no distribution
    valid = (torch.isfinite(best) & (best > 0)).tolist()
    out: list[tuple[torch.Tensor | None, torch.Tensor] | RowError] = []
    for i, s in enumerate(settings):
        if not valid[i]:
            out.append(RowError(NO_DISTRIBUTION))
            continue
        kept = _among_candidates(probs[i], top[i], ids[i], s)
        if kept is None and vocab > WIDE_CANDIDATES:
            kept = _among_candidates(probs[i], *probs[i].topk(WIDE_CANDIDATES), s)
        try:
            out.append(kept if kept is not None else (None, full_distribution(scaled[i], s)))
        except RowError as err:
            out.append(err)
    return out


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """An index drawn with probabilities `probs` (by the inverse of their cumulative sum: one uniform number)."""
    cdf = probs.cumsum(0)
    u = torch.rand(1, generator=generator, dtype=cdf.dtype) * cdf[-1]
    return min(int(torch.searchsorted(cdf, u, right=True)), probs.numel() - 1)


def _among_candidates(
    probs: torch.Tensor, top: torch.Tensor, ids: torch.Tensor, s: Sampling
) -> tuple[torch.Tensor | None, torch.Tensor] | None:
    """The row's kept tokens and probabilities when its filters keep only tokens among its candidates (`top`,
    `ids`: the most likely, best first); (None, probs) when they keep the whole vocabulary; None when the candidates
    cannot decide (see `distributions`)."""
    vocab = probs.numel()
    limit = s.top_k if 0 < s.top_k < vocab else vocab
    if limit == vocab and s.top_p >= 1.0 and s.min_p <= 0.0:
        return None, probs
    inside = limit <= top.numel()  # the kept tokens are all candidates
    if inside:
        top, ids = top[:limit], ids[:limit]
    elif limit < vocab:
        return None
    p = top / top.sum() if inside else top  # renormalised over the top-k (the whole vocabulary's sum is 1)
    if s.top_p < 1.0:
        mass = p.cumsum(0)
        if not inside and not bool(mass[-1] > s.top_p):  # the next token might still be kept
            return None
        keep = mass - p <= s.top_p
        top, ids, inside = top[keep], ids[keep], True
        p = top / top.sum()
    if s.min_p > 0.0:
        floor = s.min_p * p[0]
        if not inside and not bool(p[-1] < floor):  # a token after the candidates might reach the floor
            return None
        keep = p >= floor
        top, ids = top[keep], ids[keep]
        p = top / top.sum()
    if not bool(torch.isfinite(p).all()) or not p.numel():
        raise RowError(NO_DISTRIBUTION)
    return ids, p


def full_distribution(scaled: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The row's probabilities over the whole vocabulary from its temperature-scaled logits `scaled` (V,), after
    its top-k, top-p and min-p (the plain computation `distributions` narrows)."""
    if 0 < s.top_k < scaled.numel():
        kth = torch.topk(scaled, s.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if s.top_p < 1.0:
        ordered, order = torch.sort(scaled, descending=True)
        probs = ordered.softmax(-1)
        drop = probs.cumsum(-1) - probs > s.top_p  # keep the smallest prefix whose mass reaches top_p
        scaled = scaled.scatter(0, order[drop], float("-inf"))
    if s.min_p > 0.0:
        probs = scaled.softmax(-1)
        scaled = scaled.masked_fill(probs < s.min_p * probs.max(), float("-inf"))
    probs = scaled.softmax(-1)
    if not torch.isfinite(probs).all() or probs.sum() <= 0:
        raise RowError(NO_DISTRIBUTION)
    return probs


def logprob_of(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`token`'s entry in a position's log-probabilities (V,), with the `top` most likely tokens."""
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        values, ids = torch.topk(logprobs, min(top, logprobs.numel()))
        best = tuple(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), best)


def prompt_logprobs(logprobs: torch.Tensor, prompt: list[int], top: int) -> list[TokenLogprob]:
    """Each prompt token's entry, from the log-probabilities (len(prompt), V) of the positions that read the prompt
    (position t predicts token t + 1); the first token has no logprob (None)."""
    entries = [TokenLogprob(prompt[0], None)]
    for t in range(1, len(prompt)):
        entries.append(logprob_of(logprobs[t - 1], prompt[t], top))
    return entries


@dataclass(eq=False)
class PartialPrefill:
    """A row whose long prompt is prefilled piece by piece: its state so far and how many prompt tokens it holds."""

    row: Row
    state: DecodeState | None = None
    done: int = 0


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
        max_prefill_tokens: prompt tokens prefilled in one step at most, so whatever arrives delays the running
            rows by one bounded prefill per step: a longer prompt is prefilled in pieces of at most this many
            tokens over several steps, each followed by a decode step of the running rows (families whose prompts
            cannot be cut, the encoder-decoders, prefill such a prompt whole, alone).
        max_positions: the model's position limit (a row stops with "length" there); None: no limit.
        max_rows_per_request: rows of one request decoded together at most (None: `max_rows`); its other rows
            wait for its earlier ones to finish.
        adapter_loaded: `adapter_loaded(name)` -> False once an adapter is unloaded: its rows, waiting or running,
            end with 404 at the next step, and the other rows go on.
        burst_prefill: during a burst (more rows of requests without a first token waiting than rows running), a
            step prefills up to this many times `max_prefill_tokens` (see `_prefill_limit`); 1: never more.
        on_idle: called (worker thread) when the running batch empties with no row waiting, its cache just freed
            (the engine hands freed memory back to the system there).
        packed: a step in which rows join runs their prompts and the running rows' tokens in one forward
            (`ia3.packed`; where the family `packs`); `rows_context` then takes each token's row as a second
            argument. A packed step that fails runs again apart (the prompts, then the step), where one bad prompt
            fails its row only; when apart every row succeeds, packing is turned off for good.
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
        burst_prefill: float = 1.0,
        on_idle: Callable[[], None] | None = None,
        packed: bool = False,
    ) -> None:
        self.model = model
        self.packed = packed and state_class.packs
        self.packed_steps = 0  # steps run packed (rows joined in them)
        self.burst_prefill = burst_prefill
        self.on_idle = on_idle
        self.adapter_loaded = adapter_loaded
        self.state_class = state_class
        self.device = device
        self.rows_context = rows_context
        self.max_rows = max_rows
        self.max_prefill_tokens = max_prefill_tokens
        self.max_positions = max_positions
        self.max_rows_per_request = max_rows_per_request or max_rows
        self.served: dict[str, int] = {}  # client -> when (admission count) it last had a row admitted
        self.answered: set[tuple[str, int]] = set()  # (client, request) with a first token and rows still to come
        self.admissions = 0
        self.detok = Detokenizer(tokenizer)
        self.eos = eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._lock = threading.Lock()
        self.waiting: deque[Row] = deque()
        self.running: list[Row] = []
        self.state: DecodeState | None = None  # the running rows' cache, in `running` order
        self.last: list[int] = []  # each running row's last token (the next step's input)
        self.partial: PartialPrefill | None = None  # a long prompt being prefilled piece by piece
        self.steps = 0  # decode steps run
        self.tokens_out = 0
        self.row_steps = 0  # sum over decode steps of the rows decoded
        self.max_rows_seen = 0
        self.max_adapters_seen = 0

    # -- any thread --------------------------------------------------------------------------------------------
    def add(self, rows: list[Row]) -> None:
        for row in rows:
            row.eos = frozenset(self.eos)
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
            return bool(self.running or self.waiting or self.partial)

    def counts(self) -> tuple[int, int]:
        """(running rows, waiting rows); a row whose prompt is being prefilled counts as running."""
        with self._lock:
            return len(self.running) + (self.partial is not None), len(self.waiting)

    def adapter_rows(self) -> dict[str, int]:
        """Running rows by adapter."""
        with self._lock:
            return dict(Counter(r.adapter for r in self.running))

    # -- worker thread -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        """Prefill within the step's budget (a piece of a long prompt, then newly admitted prompts), run one decode
        step, retire finished rows."""
        self._drop_gone()
        limit = self._prefill_limit()
        budget = self._continue_partial(limit)
        admitted = self._admit(budget, limit)
        decoded = None
        if admitted:
            decoded = self._step_packed(admitted)
            if not decoded:
                self._prefill(admitted)
            # a packed step failed: apart, did a row fail (its input), or none (packing itself)?
            if decoded is False and not any(r.error is not None for r in admitted):
                log.warning("packed steps turned off: one failed where its rows run apart")
                self.packed = False
            budget -= sum(len(r.prompt) for r in admitted)
        if self.partial is not None and self.partial.state is None:  # just started: its first piece now
            self._continue_partial(budget)
        if not decoded and any(r not in admitted for r in self.running):
            self._decode()
        self._retire()

    def _step_packed(self, admitted: list[Row]) -> bool | None:
        """The running rows' step and the admitted rows' prompts in one forward (`packed`): True when run; None when
        not tried (nothing running, packing off), False when it failed (either way the caller runs them apart)."""
        if not (self.packed and self.running and self.state is not None):
            return None
        prompts, rows = [r.prompt for r in admitted], [*self.running, *admitted]
        try:
            plan = self.state.plan_join(prompts)
            with self.rows_context([r.adapter for r in rows], plan.token_rows):
                logits = self.state.step_join(self.model, self.last, prompts, plan)
        except Exception as err:
            log.warning("packed step failed (%s: %s); running its prompts apart", type(err).__name__, err)
            return False
        self._count_step(rows)
        self.packed_steps += 1
        fresh = [r.finish_reason is None and r.error is None for r in rows]
        picks = next_tokens(logits, rows)
        self.running, self.last = rows, [p if isinstance(p, int) else self.pad_id for p in picks]
        for row, pick, live in zip(rows, picks, fresh):
            if live:
                self._take(row, pick)
        self.answered.update((r.client, r.request) for r in admitted)
        return True

    def _prefill_limit(self) -> int:
        """The step's prefill budget: `max_prefill_tokens`, or up to `burst_prefill` times it during a burst, when
        more rows of requests without a first token wait (and fit) than rows run: the stall it adds falls on fewer
        rows than it saves a step's wait (a decode step of the running rows) each. Under steady traffic a row or two
        arrives per step beside many running ones, and the budget stays as set."""
        if self.burst_prefill <= 1:
            return self.max_prefill_tokens
        running = len(self.running) + (self.partial is not None)
        with self._lock:
            fresh = sum((r.client, r.request) not in self.answered for r in self.waiting)
        fresh = min(fresh, self.max_rows - running)
        scale = min(self.burst_prefill, max(1.0, fresh / max(1, running)))
        return int(self.max_prefill_tokens * scale)

    def _continue_partial(self, budget: int) -> int:
        """Prefill the next piece (at most `budget` tokens) of the long prompt in progress; the budget left.
        Once its whole prompt is in, the row joins the running batch with its first token."""
        p = self.partial
        if p is None or budget <= 0:
            return budget
        row = p.row
        piece = row.prompt[p.done : p.done + budget]
        try:
            with self.rows_context([row.adapter]):
                if p.state is None:
                    p.state, logits = self.state_class.prefill(self.model, [piece], self.pad_id, self.device)
                else:
                    logits = p.state.feed(self.model, piece)
        except Exception as err:  # this row's problem only
            log.warning("prefill failed for one row: %s: %s", type(err).__name__, err)
            self.partial = None
            self._finish(row, None, RowError("the model failed on this input"))
            return budget
        p.done += len(piece)
        if p.done == len(row.prompt):
            self.partial = None
            self._join([row], p.state, next_tokens(logits, [row]))
        return budget - len(piece)

    def _drop_gone(self) -> None:
        loaded = self.adapter_loaded or (lambda name: True)
        with self._lock:
            gone = [r for r in self.waiting if r.cancelled or not loaded(r.adapter)]
            for r in gone:
                self.waiting.remove(r)
            if self.partial is not None and (self.partial.row.cancelled or not loaded(self.partial.row.adapter)):
                gone.append(self.partial.row)  # stops at the next piece
                self.partial = None
        for r in [*gone, *self.running]:
            if r.cancelled:
                self._finish(r, "cancelled")
            elif not loaded(r.adapter):  # unloaded while it waited or ran
                self._finish(r, None, ApiError(404, "adapter_not_found", f"Adapter {r.adapter!r} was unloaded"))
        if any(r.finish_reason or r.error for r in self.running):
            self._retire()

    def _admit(self, budget: int | None = None, limit: int | None = None) -> list[Row]:
        """Waiting rows to admit now: round-robin over clients (least recently served first), each request under
        its row cap, within the free rows and the step's prefill `budget` left of its `limit` (default: all of
        `max_prefill_tokens`). A prompt longer than the budget left starts a piece-by-piece prefill (`partial`) when
        none is in progress, or, for a family that prefills whole, is admitted alone in a step with the whole
        budget."""
        admitted: list[Row] = []
        limit = self.max_prefill_tokens if limit is None else limit
        budget = limit if budget is None else budget
        full = budget >= limit
        with self._lock:
            queues = self._eligible()
            order = sorted(queues, key=lambda c: self.served.get(c, -1))  # stable: first arrival breaks ties
            taken = [*self.running, *([self.partial.row] if self.partial else [])]
            rows = Counter((r.client, r.request) for r in taken)
            while order and len(taken) + len(admitted) < self.max_rows:
                client = order.pop(0)
                queue = queues[client]
                while queue and rows[client, queue[0].request] >= self.max_rows_per_request:
                    queue.popleft()  # this request has its share; its next rows wait
                if not queue:
                    continue
                row = queue[0]
                if len(row.prompt) > budget:
                    if self.state_class.chunked:
                        if self.partial is None:
                            self.partial = PartialPrefill(queue.popleft())
                            self._note_admission(client, row, rows)
                        break
                    if admitted or not full:
                        break
                admitted.append(queue.popleft())
                budget -= len(row.prompt)
                self._note_admission(client, row, rows)
                order.append(client)
            started = [self.partial.row] if self.partial is not None and self.partial.state is None else []
            if admitted or started:
                gone = set(map(id, [*admitted, *started]))
                self.waiting = deque(r for r in self.waiting if id(r) not in gone)
            live = {r.client for r in (*self.waiting, *taken, *admitted, *started)}
            self.served = {c: t for c, t in self.served.items() if c in live}
            pending = [*self.waiting, *([self.partial.row] if self.partial is not None else [])]
            self.answered &= {(r.client, r.request) for r in pending}  # only what `_prefill_limit` asks
        return admitted

    def _note_admission(self, client: str, row: Row, rows: Counter) -> None:  # with the lock held
        rows[client, row.request] += 1
        self.admissions += 1
        self.served[client] = self.admissions

    def _eligible(self) -> dict[str, deque[Row]]:  # with the lock held
        """The waiting rows by client, each client's in arrival order."""
        queues: dict[str, deque[Row]] = {}
        for row in self.waiting:
            queues.setdefault(row.client, deque()).append(row)
        return queues

    def _prefill(self, rows: list[Row]) -> None:
        """Run the new rows' prompts, in groups of similar length (`padding_groups`); join their state to the
        running batch's."""
        for group in padding_groups([len(r.prompt) for r in rows]):
            self._prefill_group([rows[i] for i in group])

    def _prefill_group(self, rows: list[Row]) -> None:
        """Run these rows' prompts together; join their state to the running batch's. A prompt that fails alone
        fails only its row: on a batch failure each row is retried by itself."""
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
        self.answered.update((r.client, r.request) for r in rows)

    def stats(self) -> dict:
        return {
            "steps": self.steps,
            "tokens": self.tokens_out,
            "mean_rows": round(self.row_steps / self.steps, 3) if self.steps else None,
            "max_rows": self.max_rows_seen,
            "max_adapters": self.max_adapters_seen,
            "cache_bytes": self.state.nbytes if self.state is not None else 0,
            "packed": self.packed,
            "packed_steps": self.packed_steps,
        }

    def _count_step(self, rows: list[Row]) -> None:
        self.steps += 1
        self.row_steps += len(rows)
        self.max_rows_seen = max(self.max_rows_seen, len(rows))
        self.max_adapters_seen = max(self.max_adapters_seen, len({r.adapter for r in rows}))

    def _decode(self) -> None:
        assert self.state is not None
        self._count_step(self.running)
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
        if row.echo and row.prompt_logprobs is None:
            self._echo()
        if isinstance(pick, BaseException):
            self._finish(row, None, pick)
            return
        if row.max_new_tokens == 0:  # echo only: the prompt's logprobs are the answer
            self._finish(row, "length")
            return
        if row.guide is not None and not row.guide.accept(pick):
            self._finish(row, None, RowError(f"token {pick} breaks the row's structured-output grammar"))
            return
        if row.pending is not None:
            row.token_logprobs.append(row.pending)
            row.pending = None
        # a constrained row ends at its end token even with ignore_eos: its grammar allows nothing after it
        if pick in self.eos and (not row.sampling.ignore_eos or row.guide is not None):
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
                text, reason, row.stop_reason = text[:at], "stop", stop
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

    def _echo(self) -> None:
        """Score the prompts of the running rows that echo and have no prompt logprobs yet (those just admitted):
        one forward with every position's logits, each row with its own adapter, in groups of at most
        `ECHO_TOKENS` prompt tokens. Only echo rows pay for it."""
        todo = [r for r in self.running if r.echo and r.prompt_logprobs is None]
        while todo:
            group, size = [], 0
            while todo and (not group or size + len(todo[0].prompt) <= ECHO_TOKENS):
                size += len(todo[0].prompt)
                group.append(todo.pop(0))
            with torch.inference_mode(), self.rows_context([r.adapter for r in group]):
                logits = self.state_class.prompt_logits(self.model, [r.prompt for r in group], self.pad_id, self.device)
            for row, own in zip(group, logits):
                row.prompt_logprobs = prompt_logprobs(own.float().log_softmax(-1), row.prompt, row.logprobs or 0)

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
                if self.partial is not None:
                    rows.append(self.partial.row)
                    self.partial = None
            for row in rows:
                self._finish(row, None, error)
        for row in self.running:
            self._finish(row, None, error)
        self._reset()

    def _reset(self) -> None:
        had_cache = self.state is not None
        self.running, self.state, self.last = [], None, []
        if had_cache and self.on_idle is not None and not self.busy():
            self.on_idle()


def padding_groups(lengths: list[int], forward_tokens: int = FORWARD_TOKENS) -> list[list[int]]:
    """Indices of `lengths` (prompt lengths) split into groups of similar length, each prefilled as one padded
    batch: the split that computes the fewest positions, a group costing its rows x its longest prompt plus
    `forward_tokens` for the forward's fixed cost (exact, over the lengths in order)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    best = [0] * (len(order) + 1)  # best[j]: the least cost of the j shortest
    cut = [0] * (len(order) + 1)  # where the last group of the j shortest starts
    for j in range(1, len(order) + 1):
        longest = lengths[order[j - 1]]
        best[j], cut[j] = min((best[i] + (j - i) * longest + forward_tokens, i) for i in range(j))
    groups, j = [], len(order)
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def _call(fn: Callable[..., None], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:  # a callback's failure (e.g. a closed stream) must not stop the batch
        log.exception("row callback failed")
