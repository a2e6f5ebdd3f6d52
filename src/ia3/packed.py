"""Packed steps: the running rows' next tokens and the joining rows' prompts in one forward.

A decode step of the running rows reads every weight of the model once, and so does a prefill of the prompts that
join: on a CPU, where a small model's forward costs its weight read before it computes anything, a step in which
rows join used to cost two forwards. A packed step lays the tokens of both side by side in one sequence, `(1, N)`,
so every linear layer runs once over all of them; only attention needs the rows apart, and a packed step's own
attention function (`packed_attention`, registered with transformers' attention interface under `PACKED_ATTENTION`
and used for that forward only) runs it per part: the running rows' one token each against their cached columns,
and the joining prompts, padded to the longest, causally against their own.

The keys and values of the step are written straight into the running batch's cache buffers (`ia3.families.
BufferLayer`) at each token's row and column (a `PackedPlan` says where), the joining rows in the free row slots
after the running ones, their prompts ending at the column where the running rows' new token goes. The (IA)^3
scaling follows the tokens' rows (`IA3Layer.set_row_scales` with `tokens`).

The sequence: the running rows' tokens first (one each, in row order), then each joining prompt whole, in order.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PACKED_ATTENTION = "ia3_packed"


@dataclass(eq=False)
class PackedPlan:
    """Where each token of a packed step belongs, and the attention masks of its two parts.

    Attributes:
        running: running rows, one token each, first in the sequence (cache rows `[0, running)`).
        lengths: the joining prompts' lengths, after them (cache rows `running + j`).
        token_rows: `(N,)` each token's row (`running` + j for prompt j's tokens).
        columns: `(N,)` each token's cache column (buffer coordinates).
        window: the cache window after the step: (rows, first column, end column).
        decode_from: the first column (window coordinates) the running rows attend from.
        decode_mask: `(running, 1, 1, columns)` bool: the cached columns each running row attends to, its new one
            included.
        gather: `(joining x longest,)` indices into the sequence laying the prompts out left-padded to the longest
            (padding repeats a token of the same prompt; its output is dropped).
        prompt_mask: `(joining, 1, longest, longest)` bool: causal within each prompt, padding masked (a padding
            query attends to itself only).
        valid: `(sum of lengths,)` the positions of `gather`'s layout that hold real tokens, in sequence order.
        last: `(running + joining,)` the sequence index of each row's last token (whose logits come back).
    """

    running: int
    lengths: list[int]
    token_rows: torch.Tensor
    columns: torch.Tensor
    window: tuple[int, int, int]
    decode_from: int
    decode_mask: torch.Tensor
    gather: torch.Tensor
    prompt_mask: torch.Tensor
    valid: torch.Tensor
    last: torch.Tensor

    @classmethod
    def build(cls, mask: torch.Tensor, start: int, end: int, lengths: list[int]) -> PackedPlan:
        """The plan for running rows whose cache `mask` `(B, end - start)` covers the buffer columns
        `[start, end)`, each adding its token at column `end`, joined by prompts of `lengths` that end there too."""
        device = mask.device
        running, joining = mask.shape[0], len(lengths)
        longest = max(lengths, default=0)
        first = min(start, end + 1 - longest)
        sizes = torch.tensor(lengths, device=device)
        rows = torch.arange(running, device=device)
        prompt_rows = torch.repeat_interleave(torch.arange(running, running + joining, device=device), sizes)
        offsets = [torch.arange(end + 1 - n, end + 1, device=device) for n in lengths]
        columns = torch.cat([torch.full((running,), end, device=device), *offsets])
        decode_mask = torch.cat([mask.bool(), mask.new_ones((running, 1), dtype=torch.bool)], dim=1)
        # the prompts left-padded to the longest: position p of prompt j is its token p - (longest - n)
        starts = sizes.cumsum(0) - sizes + running
        place = torch.arange(longest, device=device)
        pad = longest - sizes[:, None]  # (J, 1)
        real = place[None, :] >= pad  # (J, L)
        gather = (starts[:, None] + (place[None, :] - pad).clamp(min=0)).reshape(-1)
        causal = torch.ones(longest, longest, dtype=torch.bool, device=device).tril()
        prompt_mask = (causal[None] & real[:, None, :]) | torch.eye(longest, dtype=torch.bool, device=device)[None]
        ends = starts + sizes - 1
        return cls(
            running=running,
            lengths=list(lengths),
            token_rows=torch.cat([rows, prompt_rows]),
            columns=columns,
            window=(running + joining, first, end + 1),
            decode_from=start - first,
            decode_mask=decode_mask[:, None, None, :],
            gather=gather,
            prompt_mask=prompt_mask[:, None],
            valid=real.reshape(-1).nonzero().squeeze(1),
            last=torch.cat([rows, ends]),
        )


def packed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    ia3_packed: PackedPlan | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of a packed step (transformers' attention-function signature): `query` `(1, H, N, d)` for the
    sequence, `key` / `value` `(rows, KV, columns, d)` the cache window the step's `BufferLayer.update` returned."""
    plan = ia3_packed
    if plan is None:
        raise RuntimeError(f"the {PACKED_ATTENTION!r} attention runs only inside a packed step")
    heads, tokens, dim = query.shape[1:]
    gqa = heads != key.shape[1]
    q = query[0]
    out = query.new_empty(tokens, heads, dim)
    b = plan.running
    if b:
        q_run = q[:, :b].transpose(0, 1).unsqueeze(2)  # (B, H, 1, d)
        k_run, v_run = key[:b, :, plan.decode_from :], value[:b, :, plan.decode_from :]
        o = F.scaled_dot_product_attention(
            q_run, k_run, v_run, attn_mask=plan.decode_mask, scale=scaling, enable_gqa=gqa
        )
        out[:b] = o[:, :, 0]
    if plan.lengths:
        joining, longest = len(plan.lengths), plan.prompt_mask.shape[-1]
        q_new = q.index_select(1, plan.gather).view(heads, joining, longest, dim).transpose(0, 1)
        k_new, v_new = key[b:, :, key.shape[2] - longest :], value[b:, :, value.shape[2] - longest :]
        o = F.scaled_dot_product_attention(
            q_new, k_new, v_new, attn_mask=plan.prompt_mask, scale=scaling, enable_gqa=gqa
        )  # (J, H, L, d)
        out[b:] = o.transpose(1, 2).reshape(joining * longest, heads, dim).index_select(0, plan.valid)
    return out.unsqueeze(0), None


@functools.cache
def register() -> None:
    """Make `PACKED_ATTENTION` known to transformers (once)."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)


@contextlib.contextmanager
def attention_of(config: Any, name: str) -> Iterator[None]:
    """Inside the block the model `config` (its sub-configs follow it) names attention implementation `name`; a
    model whose modules keep configs of their own is caught by the start-up probe (`DecodeState.unpacked`)."""
    register()
    before = config._attn_implementation
    try:
        config._attn_implementation = name
        yield
    finally:
        config._attn_implementation = before
