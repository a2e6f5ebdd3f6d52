"""Model families: how a decoder-only LM and an encoder-decoder LM are called, row by row.

Everything here depends on the family's calling convention and on nothing else: how rows are padded (decoder-only
rows on the left, with position ids that count real tokens only; encoder rows on the right), where the key/value cache
comes back and under which argument it goes in (transformers 5 renamed `past_key_values` to `cache`), and how a
running batch's cache grows by new rows and shrinks when rows leave. The tasks (`ia3.tasks`) use these helpers for
training, rank classification and generation; the server's continuous decoder (`ia3.serve.decoding`) keeps one
`DecodeState` of the task's family and never looks inside it, in the manner of text-generation-inference's
`CausalLMBatch` / `Seq2SeqLMBatch`.

A `DecodeState` holds the running rows' model state: the cache, the attention mask, and per family the position ids
(decoder-only) or the encoder states (encoder-decoder). Its methods:

* `prefill(model, prompts, ...)`: run new rows' prompts once; the state of those rows and their next-token logits;
* `extend(other)`: join another state's rows after this one's (the caches padded to a common width);
* `filter(keep)`: keep only the rows at `keep`, dropping cache columns that no kept row attends to;
* `step(model, tokens)`: feed each row's last token, return the logits of the next;
* `plan_join(prompts)` / `step_join(model, tokens, prompts, plan)` (decoder-only): a step and joining prompts in
  one packed forward (`ia3.packed`).

A decoder-only model's running batch keeps its cache in preallocated buffers (`BufferLayer`), so steps, joins and
drops write in place instead of copying the whole cache (transformers' own cache concatenates at every step).

A greedy row's tokens do not depend on the other rows: padding is masked and positions count real tokens only.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import BaseModelOutput

from ia3.packed import PACKED_ATTENTION, PackedPlan, attention_of


# -- padding -------------------------------------------------------------------------------------------------------
def pad_rows(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    """`(len(rows), longest)` long tensor of `rows`, padded with `value` on the right (or left)."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            if left:
                out[i, width - len(row) :] = torch.tensor(row)
            else:
                out[i, : len(row)] = torch.tensor(row)
    return out


def attention_mask(rows: list[list[int]], left: bool = False) -> torch.Tensor:
    """1 for the real tokens of `rows` as `pad_rows` lays them out, 0 for padding."""
    return pad_rows([[1] * len(r) for r in rows], 0, left)


def left_padded(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Decoder-only input: left-padded `rows` with position ids that count real tokens only (so padding changes
    nothing), as `input_ids`, `attention_mask` and `position_ids`, each `(B, longest)`."""
    mask = attention_mask(rows, left=True)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": pad_rows(rows, pad_id, left=True), "attention_mask": mask, "position_ids": positions}


def _pad(tensor: torch.Tensor, width: int, dim: int, left: bool) -> torch.Tensor:
    extra = width - tensor.shape[dim]
    if extra == 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - 1 - dim) + ([extra, 0] if left else [0, extra])
    return F.pad(tensor, pad)


# -- calling a transformers model ----------------------------------------------------------------------------------
def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under process wrappers (DDP) and a `PeftModel` (whose forward takes `**kwargs` and so
    hides the signature)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    inner = getattr(model, "get_base_model", None)
    return inner() if callable(inner) else model


def forward_takes(model: nn.Module, argument: str) -> bool:
    """Whether the forward of the transformers model in `model` takes `argument` (looked up once per model class:
    this runs every decode step)."""
    return _forward_takes(type(unwrap(model)), argument)


@functools.cache
def _forward_takes(model_class: type, argument: str) -> bool:
    try:
        return argument in inspect.signature(model_class.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return False


def keep_logits(model: nn.Module, positions: int) -> dict[str, int]:
    """`logits_to_keep`: the LM head runs at the last `positions` positions only (where the model takes it)."""
    return {"logits_to_keep": positions} if forward_takes(model, "logits_to_keep") else {}


def cache_argument(model: nn.Module) -> str:
    """The forward argument that takes a key/value cache (`cache` in transformers 5, `past_key_values` before)."""
    return "cache" if forward_takes(model, "cache") else "past_key_values"


def cache_of(output: Any) -> Any:
    """The key/value cache a forward returned."""
    return output.cache if "cache" in output else output.past_key_values


def eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """The token ids that end an answer: the generation config's EOS (one id or several), else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


class UnsupportedCache(RuntimeError):
    """The model's cache cannot be joined and split by row (sliding windows, linear attention, ...)."""


def _self_layers(cache: Any) -> list:
    """The (decoder) self-attention cache layers of a decoder-only or encoder-decoder cache."""
    return list(getattr(cache, "self_attention_cache", cache).layers)


def _check_cache(cache: Any) -> None:
    if hasattr(cache, "self_attention_cache"):  # encoder-decoder: both halves must be plain
        layers = list(cache.self_attention_cache.layers) + list(cache.cross_attention_cache.layers)
    else:
        layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers or []}) or [type(cache).__name__]
        raise UnsupportedCache(f"continuous batching needs a plain dynamic key/value cache; this model uses {kinds}")


def _join_layers(mine: list, theirs: list, width: int, left: bool) -> None:
    for a, b in zip(mine, theirs):
        a.keys = torch.cat([_pad(a.keys, width, 2, left), _pad(b.keys, width, 2, left)])
        a.values = torch.cat([_pad(a.values, width, 2, left), _pad(b.values, width, 2, left)])


def _select_layers(layers: list, index: torch.Tensor, columns: slice) -> None:
    for layer in layers:
        layer.keys = layer.keys.index_select(0, index)[:, :, columns]
        layer.values = layer.values.index_select(0, index)[:, :, columns]


# -- the running rows' cache in preallocated buffers -----------------------------------------------------------------
class BufferLayer(DynamicLayer):
    """One layer's self-attention cache in preallocated buffers `(row capacity, heads, column capacity, head dim)`:
    the running rows are the first `rows` slots, their tokens the columns `[start, end)`. A step writes its new
    column in place (transformers' `DynamicLayer` concatenates, copying the whole cache every step) and the model
    attends over views of the window; columns outside a row's tokens are masked (their values are stale but finite:
    the buffers start as zeros)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: int, start: int, end: int) -> None:
        super().__init__()
        self.key_buffer, self.value_buffer = keys, values
        self.device = keys.device
        self.is_initialized = True
        self.packed: PackedPlan | None = None  # set for a packed step: where its tokens go
        self.window(rows, start, end)

    def window(self, rows: int, start: int, end: int) -> None:
        """Make the first `rows` slots and the columns `[start, end)` the cache the model sees."""
        self.rows, self.start, self.end = rows, start, end
        self.keys = self.key_buffer[:rows, :, start:end]
        self.values = self.value_buffer[:rows, :, start:end]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple:
        plan = self.packed
        if plan is not None:  # one sequence `(1, KV, N, d)`: each token to its row and column
            self.key_buffer[plan.token_rows, :, plan.columns] = key_states[0].transpose(0, 1)
            self.value_buffer[plan.token_rows, :, plan.columns] = value_states[0].transpose(0, 1)
            self.window(*plan.window)
            return self.keys, self.values
        new = key_states.shape[-2]
        self.key_buffer[: self.rows, :, self.end : self.end + new] = key_states
        self.value_buffer[: self.rows, :, self.end : self.end + new] = value_states
        self.window(self.rows, self.start, self.end + new)
        return self.keys, self.values


def buffered(layers: list, rows: int, start: int, end: int, room: tuple[int, int, int] = (0, 0, 0)) -> list:
    """The first `rows` rows of `layers` (dynamic, or buffered with the window `[start, end)`) copied into new
    zeroed buffers with room to grow: `room` = (rows, columns before the window, columns after it) needed at least;
    row capacity the power of two >= that (8 at least), column capacity twice what is needed (64 at least), the
    window placed after the columns needed before it and a quarter of the spare ones."""
    width = end - start
    want_rows, before, after = max(rows, room[0]), room[1], room[2]
    row_capacity = max(8, 1 << (want_rows - 1).bit_length())
    columns = max(64, 2 * (before + width + after))
    left = before + (columns - before - width - after) // 4
    out = []
    for layer in layers:
        if isinstance(layer, BufferLayer):
            keys, values = layer.key_buffer[:rows, :, start:end], layer.value_buffer[:rows, :, start:end]
        else:
            keys, values = layer.keys[:rows], layer.values[:rows]
        key_buffer = keys.new_zeros((row_capacity, keys.shape[1], columns, keys.shape[3]))
        value_buffer = values.new_zeros((row_capacity, values.shape[1], columns, values.shape[3]))
        key_buffer[:rows, :, left : left + width] = keys
        value_buffer[:rows, :, left : left + width] = values
        out.append(BufferLayer(key_buffer, value_buffer, rows, left, left + width))
    return out


# -- running decode batches ----------------------------------------------------------------------------------------
class DecodeState:
    """The model state of the rows of a running decode batch (see the module docstring). Subclasses per family."""

    chunked: ClassVar[bool] = False
    """True when a long prompt can be prefilled piece by piece (`prefill` of its start, then `feed`)."""

    packs: ClassVar[bool] = False
    """True when joining prompts can run in one forward with the running rows' step (`plan_join`, `step_join`)."""

    def __init__(self, cache: Any, mask: torch.Tensor) -> None:
        self.cache = cache
        self.mask = mask  # (B, T) 1 for the real tokens of the (decoder) self-attention cache

    @classmethod
    def prefill(
        cls, model: nn.Module, prompts: list[list[int]], pad_id: int, device: torch.device
    ) -> tuple[DecodeState, torch.Tensor]:
        """Run `prompts` once; their state and the `(B, V)` logits of each row's first new token."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds: its buffers whole (free room included), or its tensors."""
        layers = _self_layers(self.cache) + list(
            getattr(getattr(self.cache, "cross_attention_cache", None), "layers", [])
        )
        total = 0
        for layer in layers:
            names = ("key_buffer", "value_buffer") if isinstance(layer, BufferLayer) else ("keys", "values")
            for tensor in (getattr(layer, name, None) for name in names):
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total

    def extend(self, other: DecodeState) -> None:
        """Append `other`'s rows after this state's rows."""
        raise NotImplementedError

    def filter(self, keep: list[int]) -> None:
        """Keep only the rows at indices `keep` (non-empty, ascending)."""
        raise NotImplementedError

    def step(self, model: nn.Module, tokens: list[int]) -> torch.Tensor:
        """Feed each row's last token; the `(B, V)` logits of the next token."""
        raise NotImplementedError

    @classmethod
    def prompt_logits(
        cls, model: nn.Module, prompts: list[list[int]], pad_id: int, device: torch.device
    ) -> list[torch.Tensor]:
        """Each prompt's `(len(prompt), V)` logits at the positions that read it (position t predicts token t + 1),
        for prompt log-probabilities (OpenAI's `echo`)."""
        raise NotImplementedError(f"{cls.__name__} has no logits over its prompt")

    def feed(self, model: nn.Module, tokens: list[int]) -> torch.Tensor:
        """One-row state: run more of its prompt after the tokens already cached; the `(1, V)` logits of the token
        after them (chunked prefill; only where `chunked`)."""
        raise NotImplementedError(f"{type(self).__name__} prefills a prompt whole")

    @classmethod
    def probe(cls, model: nn.Module, device: torch.device) -> None:
        """Raise `UnsupportedCache` (or the model's own error) unless the model's cache can be batched by row."""
        raise NotImplementedError

    @classmethod
    def unsupported(cls, model: nn.Module, device: torch.device) -> str | None:
        """None when `model` can decode in such a state, else the reason it cannot (tried on a 2-token prompt)."""
        try:
            with torch.inference_mode():
                cls.probe(model, device)
        except UnsupportedCache as err:
            return str(err)
        except Exception as err:
            return f"{type(err).__name__}: {err}"
        return None

    def plan_join(self, prompts: list[list[int]]) -> PackedPlan:
        """Make room for `prompts` joining at the next step; the plan of that packed step (only where `packs`)."""
        raise NotImplementedError(f"{type(self).__name__} has no packed steps")

    def step_join(
        self, model: nn.Module, tokens: list[int], prompts: list[list[int]], plan: PackedPlan
    ) -> torch.Tensor:
        """Feed each row's last token and run the joining `prompts` in one forward; they join after the running
        rows. The `(B + len(prompts), V)` logits of each row's next token (only where `packs`)."""
        raise NotImplementedError(f"{type(self).__name__} has no packed steps")

    @classmethod
    def unpacked(cls, model: nn.Module, device: torch.device, rows_context: Any) -> str | None:
        """None when packed steps give `model` the logits of the plain path (prompts, then a step), else why not.
        `rows_context(rows, tokens)`: the context a batch of base-model rows runs in."""
        if not cls.packs:
            return f"{cls.__name__} has no packed steps"
        try:
            with torch.inference_mode():
                cls._probe_packed(model, device, rows_context)
        except Exception as err:
            return f"{type(err).__name__}: {err}"
        return None

    @classmethod
    def _probe_packed(cls, model: nn.Module, device: torch.device, rows_context: Any) -> None:
        """Two rows, a step, then two prompts joining: packed against plain; raises where they differ."""
        running, joining = [[1, 2, 3], [4, 5]], [[6, 7, 8, 9], [3]]
        results = []
        for packed in (False, True):
            with rows_context(2):
                state, logits = cls.prefill(model, running, 0, device)
                state.step(model, logits.argmax(-1).tolist())
            if packed:
                plan = state.plan_join(joining)
                with rows_context(4, plan.token_rows):
                    results.append(state.step_join(model, [1, 2], joining, plan))
                continue
            with rows_context(2):
                plain = state.step(model, [1, 2])
            with rows_context(2):
                _, first = cls.prefill(model, joining, 0, device)
            results.append(torch.cat([plain, first]))
        plain, packed = (r.float() for r in results)
        tolerance = max(1e-3, 16 * torch.finfo(results[0].dtype).eps) * (1 + plain.abs().max().item())
        difference = (plain - packed).abs().max().item()
        if not difference <= tolerance:
            raise RuntimeError(f"packed logits differ from the plain path's by {difference:.3g}")

    def _trim_start(self, index: torch.Tensor) -> int:
        """Select the kept rows of the mask; the leading cache columns that are padding for all of them."""
        self.mask = self.mask.index_select(0, index)
        start = int((self.mask.sum(0) > 0).nonzero()[0])
        self.mask = self.mask[:, start:]
        return start


class CausalDecodeState(DecodeState):
    """Decoder-only LMs: the cache left-padded to a common length, with per-row position ids.

    A running batch (once it steps or grows) keeps its cache in preallocated buffers (`BufferLayer`), a slot per
    row in row order: a step writes its column in place; rows joining are written into the free slots after the
    last; when rows leave, only the rows after the first one that left move down (the batch's row order is the
    order the per-row adapters follow). Only growth beyond the buffers' capacity (geometric) copies the whole cache.
    A prompt's state (`prefill`, `feed`) stays dynamic."""

    chunked = True
    packs = True

    def __init__(self, cache: Any, mask: torch.Tensor, positions: torch.Tensor) -> None:
        super().__init__(cache, mask)
        self.positions = positions  # (B,) position id of each row's next token
        self.buffered = False  # the cache is in `BufferLayer`s (a running batch); else dynamic (a prompt's)

    @classmethod
    def prefill(cls, model, prompts, pad_id, device):
        inputs = {k: v.to(device) for k, v in left_padded(prompts, pad_id).items()}
        out = model(**inputs, use_cache=True, **keep_logits(model, 1))
        cache = cache_of(out)
        _check_cache(cache)
        mask = inputs["attention_mask"]
        return cls(cache, mask, mask.sum(-1)), out.logits[:, -1]

    def _room(self, rows: int, before: int, after: int) -> list[BufferLayer]:
        """The buffered layers, with room for `rows` rows and `before` / `after` more columns around the window
        (moved into buffers on first use, regrown when full)."""
        layers = _self_layers(self.cache)
        first = layers[0]
        if not self.buffered:
            self.buffered = True
            layers = buffered(layers, len(self.mask), 0, self.mask.shape[1], (rows, before, after))
        elif rows > first.key_buffer.shape[0] or first.start < before or first.end + after > first.key_buffer.shape[2]:
            layers = buffered(layers, first.rows, first.start, first.end, (rows, before, after))
        else:
            return layers
        self.cache.layers[:] = layers
        return layers

    def extend(self, other):
        assert isinstance(other, CausalDecodeState) and not other.buffered, "rows join from a prompt's state"
        rows, width, new = len(self.mask), self.mask.shape[1], len(other.mask)
        before = max(0, other.mask.shape[1] - width)
        layers = self._room(rows + new, before, 0)
        start, end = layers[0].start - before, layers[0].end
        for layer, joining in zip(layers, _self_layers(other.cache)):
            columns = joining.keys.shape[2]
            layer.key_buffer[rows : rows + new, :, end - columns : end] = joining.keys
            layer.value_buffer[rows : rows + new, :, end - columns : end] = joining.values
            layer.window(rows + new, start, end)
        width += before
        self.mask = torch.cat([_pad(self.mask, width, 1, True), _pad(other.mask, width, 1, True)])
        self.positions = torch.cat([self.positions, other.positions])

    def filter(self, keep):
        layers = self._room(len(self.mask), 0, 0)
        first = next((slot for slot, row in enumerate(keep) if slot != row), len(keep))  # the first row that left
        start, end = layers[0].start, layers[0].end
        if first < len(keep):  # every kept row after it moves down: one gather and one slice write per buffer
            source = torch.tensor(keep[first:], device=self.mask.device)
            for layer in layers:
                for buffer in (layer.key_buffer, layer.value_buffer):
                    window = buffer[:, :, start:end]
                    window[first : len(keep)] = window.index_select(0, source)
        index = torch.tensor(keep, device=self.mask.device)
        start += self._trim_start(index)
        self.positions = self.positions.index_select(0, index)
        for layer in layers:
            layer.window(len(keep), start, end)

    def step(self, model, tokens):
        self._room(len(self.mask), 0, 1)
        mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        last = torch.tensor(tokens, device=mask.device)[:, None]
        out = model(
            input_ids=last,
            attention_mask=mask,
            position_ids=self.positions[:, None],
            use_cache=True,
            **keep_logits(model, 1),
            **{cache_argument(model): self.cache},
        )
        self.cache, self.mask, self.positions = cache_of(out), mask, self.positions + 1
        return out.logits[:, -1]

    def plan_join(self, prompts: list[list[int]]) -> PackedPlan:
        """Make room in the buffers for `prompts` joining at the next step; the plan of that packed step."""
        rows, width = self.mask.shape
        longest = max(map(len, prompts))
        layers = self._room(rows + len(prompts), max(0, longest - 1 - width), 1)
        return PackedPlan.build(self.mask, layers[0].start, layers[0].end, [len(p) for p in prompts])

    def step_join(
        self, model: nn.Module, tokens: list[int], prompts: list[list[int]], plan: PackedPlan
    ) -> torch.Tensor:
        """One packed forward (`ia3.packed`): each running row's last token and the joining `prompts` (planned by
        `plan_join`), which join the batch after the running rows; the `(B + len(prompts), V)` logits of each row's
        next token. On failure the state is as before."""
        layers = _self_layers(self.cache)
        rows, start, end = layers[0].rows, layers[0].start, layers[0].end
        device = self.mask.device
        ids = torch.tensor([*tokens, *(t for p in prompts for t in p)], device=device)
        positions = torch.cat([self.positions, *(torch.arange(len(p), device=device) for p in prompts)])
        for layer in layers:
            layer.packed = plan
        try:
            with attention_of(unwrap(model).config, PACKED_ATTENTION):
                out = model(
                    input_ids=ids[None],
                    position_ids=positions[None],
                    use_cache=True,
                    ia3_packed=plan,
                    **({"logits_to_keep": plan.last} if forward_takes(model, "logits_to_keep") else {}),
                    **{cache_argument(model): self.cache},
                )
        except BaseException:
            for layer in layers:
                layer.window(rows, start, end)
            raise
        finally:
            for layer in layers:
                layer.packed = None
        width = plan.window[2] - plan.window[1]
        joining = [torch.cat([self.mask.new_zeros(width - len(p)), self.mask.new_ones(len(p))]) for p in prompts]
        running = torch.cat([_pad(self.mask, width - 1, 1, True), self.mask.new_ones((rows, 1))], dim=1)
        self.mask = torch.cat([running, torch.stack(joining)]) if joining else running
        lengths = torch.tensor([len(p) for p in prompts], dtype=self.positions.dtype, device=device)
        self.positions = torch.cat([self.positions + 1, lengths])
        logits = out.logits[0]
        return logits if logits.shape[0] == len(plan.last) else logits.index_select(0, plan.last)

    @classmethod
    def prompt_logits(cls, model, prompts, pad_id, device):
        inputs = {k: v.to(device) for k, v in left_padded(prompts, pad_id).items()}
        logits = model(**inputs, use_cache=False).logits
        width = logits.shape[1]
        return [logits[i, width - len(p) :] for i, p in enumerate(prompts)]

    def feed(self, model, tokens):
        assert self.mask.shape[0] == 1 and not self.buffered, "feed continues the prompt of a one-row state"
        device = self.mask.device
        mask = torch.cat([self.mask, self.mask.new_ones((1, len(tokens)))], dim=1)
        out = model(
            input_ids=torch.tensor([tokens], device=device),
            attention_mask=mask,
            position_ids=self.positions[:, None] + torch.arange(len(tokens), device=device),
            use_cache=True,
            **keep_logits(model, 1),
            **{cache_argument(model): self.cache},
        )
        self.cache, self.mask, self.positions = cache_of(out), mask, self.positions + len(tokens)
        return out.logits[:, -1]

    @classmethod
    def probe(cls, model, device):
        ids = torch.tensor([[1, 2]], device=device)
        _check_cache(cache_of(model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)))


# encoder-decoders whose decoder has relative positions only (left padding of its cache changes nothing)
RELATIVE_SEQ2SEQ = ("t5", "mt5", "umt5")


class Seq2SeqDecodeState(DecodeState):
    """Encoder-decoders with relative positions (T5, mT5): each row's prompt runs through the encoder once; the
    encoder states and the cross-attention cache are kept per row (right-padded, masked), the decoder's
    self-attention cache left-padded as for a decoder-only model."""

    def __init__(self, cache: Any, mask: torch.Tensor, encoded: torch.Tensor, encoded_mask: torch.Tensor) -> None:
        super().__init__(cache, mask)
        self.encoded = encoded  # (B, S, d) encoder states, right-padded
        self.encoded_mask = encoded_mask  # (B, S)

    @classmethod
    def prefill(cls, model, prompts, pad_id, device):
        ids, mask = pad_rows(prompts, pad_id).to(device), attention_mask(prompts).to(device)
        start = torch.full((len(prompts), 1), unwrap(model).config.decoder_start_token_id, device=device)
        encoded = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        out = model(
            encoder_outputs=BaseModelOutput(last_hidden_state=encoded),
            attention_mask=mask,
            decoder_input_ids=start,
            decoder_attention_mask=torch.ones_like(start),
            use_cache=True,
            **keep_logits(model, 1),
        )
        cache = cache_of(out)
        _check_cache(cache)
        return cls(cache, torch.ones_like(start), encoded, mask), out.logits[:, -1]

    def extend(self, other):
        assert isinstance(other, Seq2SeqDecodeState)
        width = max(self.mask.shape[1], other.mask.shape[1])
        _join_layers(_self_layers(self.cache), _self_layers(other.cache), width, left=True)
        self.mask = torch.cat([_pad(self.mask, width, 1, True), _pad(other.mask, width, 1, True)])
        s = max(self.encoded.shape[1], other.encoded.shape[1])  # encoder side: padded on the right, masked
        _join_layers(self.cache.cross_attention_cache.layers, other.cache.cross_attention_cache.layers, s, left=False)
        self.encoded = torch.cat([_pad(self.encoded, s, 1, False), _pad(other.encoded, s, 1, False)])
        self.encoded_mask = torch.cat([_pad(self.encoded_mask, s, 1, False), _pad(other.encoded_mask, s, 1, False)])

    def filter(self, keep):
        index = torch.tensor(keep, device=self.mask.device)
        start = self._trim_start(index)
        _select_layers(_self_layers(self.cache), index, slice(start, None))
        encoded_mask = self.encoded_mask.index_select(0, index)
        end = int((encoded_mask.sum(0) > 0).nonzero()[-1]) + 1  # trailing encoder padding of every kept row
        _select_layers(list(self.cache.cross_attention_cache.layers), index, slice(None, end))
        self.encoded = self.encoded.index_select(0, index)[:, :end]
        self.encoded_mask = encoded_mask[:, :end]

    def step(self, model, tokens):
        mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        out = model(
            encoder_outputs=BaseModelOutput(last_hidden_state=self.encoded),
            attention_mask=self.encoded_mask,
            decoder_input_ids=torch.tensor(tokens, device=mask.device)[:, None],
            decoder_attention_mask=mask,
            use_cache=True,
            **keep_logits(model, 1),
            **{cache_argument(model): self.cache},
        )
        self.cache, self.mask = cache_of(out), mask
        return out.logits[:, -1]

    @classmethod
    def probe(cls, model, device):
        kind = getattr(unwrap(model).config, "model_type", None)
        if kind not in RELATIVE_SEQ2SEQ:
            raise UnsupportedCache(
                f"continuous batching of encoder-decoders is built for {list(RELATIVE_SEQ2SEQ)}; this is {kind!r}"
            )
        ids = torch.tensor([[1, 2]], device=device)
        start = torch.full((1, 1), unwrap(model).config.decoder_start_token_id, device=device)
        _check_cache(cache_of(model(input_ids=ids, decoder_input_ids=start, use_cache=True)))
