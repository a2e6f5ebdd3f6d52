"""`IA3Layer`: a layer wrapped with one learned scaling vector per adapter.

(IA)^3 (Liu et al. 2022, https://arxiv.org/abs/2205.05638, eq. in section 3.3) rescales an activation
elementwise with a learned vector `l`. Next to a matrix product it can act on either side:

* output side: `y = l * (W x + b)`, with `l` of shape `(out, 1)`; merged as `W' = diag(l) W`, `b' = l * b`;
* input side (``is_feedforward``): `y = W (l * x) + b`, with `l` of shape `(1, in)`; merged as `W' = W diag(l)`.

Convolutions scale channels the same way, with vectors of shape `(1, C, 1, ...)` as in PEFT.

A layer works on its own (`from_module`, `add_adapter`, `set_adapter`, `merge` / `unmerge`, `to_module`);
`IA3Model` injects many of them into a model and keeps their active adapters in step.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from enum import Enum
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ia3.quantization import check_mergeable, float_dtype


class WeightLayout(Enum):
    """How a base layer stores its weight, which decides how a vector lines up with the weight and activations.

    Note the two "conv1d"s: transformers' `Conv1D` (GPT-2) is a linear layer with a transposed weight, while
    `nn.Conv1d` is a real convolution.
    """

    LINEAR = "linear"  # nn.Linear: weight (out, in), y = x W^T + b; features on x's last dim
    TRANSPOSED = "transposed"  # transformers' Conv1D: weight (in, out), y = x W + b; features on x's last dim
    CONV = "conv"  # nn.Conv1d / 2d / 3d: weight (out, in / groups, *kernel); channels just before the spatial dims

    @classmethod
    def of(cls, module: nn.Module) -> WeightLayout:
        """The layout of `module`'s weight.

        Raises:
            TypeError: `module` is none of the supported layer types.
        """
        if isinstance(module, nn.Linear):
            return cls.LINEAR
        if isinstance(module, Conv1D):
            return cls.TRANSPOSED
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return cls.CONV
        raise TypeError(
            f"ia3 cannot wrap {type(module).__name__}; supported: nn.Linear, transformers' Conv1D, nn.Conv1d, "
            "nn.Conv2d, nn.Conv3d"
        )


class IA3Layer(nn.Module):
    """Wraps `nn.Linear`, transformers' `Conv1D` or `nn.Conv1d` / `nn.Conv2d` / `nn.Conv3d` by composition.

    Active adapters: `forward` applies the product of the active adapters' vectors. `set_adapter` chooses them;
    a standalone layer never needs it for its first adapter, because `add_adapter` activates the new adapter when
    none is active, and `delete_adapter` of the last active adapter activates the first remaining one.
    `IA3Model` sets every layer's active adapters explicitly with `set_adapter`.

    Args:
        base_layer: the layer to wrap; its parameters' `requires_grad` is left as it is (`IA3Model` freezes them).
        is_feedforward: scale the input (True) or the output (False).

    Attributes:
        base_layer: the wrapped layer.
        ia3_l: one vector per adapter name (`nn.ParameterDict`), keys as in PEFT's state dict.
        layout: how `base_layer` stores its weight.
        is_feedforward: True when the vectors scale the input, False when they scale the output.
        disabled: when True, `forward` is the base layer alone (set by `IA3Model.disable_adapter`).
        merged_adapters: adapters folded into `base_layer`'s weights, in merge order.
    """

    def __init__(self, base_layer: nn.Module, is_feedforward: bool) -> None:
        super().__init__()
        self.layout = WeightLayout.of(base_layer)
        weight = base_layer.weight
        if self.layout is WeightLayout.TRANSPOSED:
            in_features, out_features = weight.shape
        elif self.layout is WeightLayout.LINEAR:
            in_features, out_features = base_layer.in_features, base_layer.out_features
        else:
            in_features, out_features = base_layer.in_channels, base_layer.out_channels
        self.base_layer = base_layer
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward = is_feedforward
        self.in_features: int = in_features
        self.out_features: int = out_features
        self._active_adapters: list[str] = []
        self.disabled = False
        self.merged_adapters: list[str] = []
        # Exact copies of the base weight and bias taken at the first merge, restored by `unmerge`.
        self._originals: tuple[torch.Tensor, torch.Tensor | None] | None = None
        # Per-example vectors, one row per batch element (set by `IA3Model.per_example`), and expansions of them
        # for batches grown by beam search or sampling (`num_beams` / `num_return_sequences` copies per row).
        self._row_scales: torch.Tensor | None = None
        self._row_cache: dict[int, torch.Tensor] = {}
        # For a packed batch (several rows' tokens flattened into one sequence): each token's row in `_row_scales`.
        self._row_tokens: torch.Tensor | None = None

    # -- construction ----------------------------------------------------------------------------------------------
    @classmethod
    def from_module(cls, module: nn.Module, is_feedforward: bool = False) -> IA3Layer:
        """Wrap `module` (no adapter yet; add one with `add_adapter`)."""
        return cls(module, is_feedforward)

    def to_module(self, adapter_names: Sequence[str] | None = None) -> nn.Module:
        """A new module of the base layer's type with adapters folded into its weights (as mlx's `to_linear`).

        The result starts from `base_layer` as it is now, so adapters already merged stay in, and `adapter_names`
        not yet merged are folded on top. This layer is left unchanged. On an unmerged layer,
        `to_module()(x)` equals `self(x)` (up to rounding); on a merged one, it is a copy of the merged base.

        Args:
            adapter_names: adapters to fold in; default: the active ones.

        Returns:
            A deep copy of `base_layer` (same type, dtype, device and `requires_grad`) with merged weight and bias.
        """
        names = self._unmerged(self._active_adapters if adapter_names is None else list(adapter_names))
        check_mergeable(self.base_layer, "fold adapters (to_module)")
        base = self.base_layer
        weight, bias = self._merged_tensors(names)
        # `_merged_tensors` returns fresh tensors only for what it scaled; copy the rest so nothing is shared
        weight = weight if names else weight.clone()
        if bias is not None and not (names and not self.is_feedforward):
            bias = bias.clone()
        memo: dict[int, Any] = {id(base.weight): nn.Parameter(weight, requires_grad=base.weight.requires_grad)}
        if bias is not None:
            memo[id(base.bias)] = nn.Parameter(bias, requires_grad=base.bias.requires_grad)
        return copy.deepcopy(base, memo)  # the memo hands the copy the new tensors instead of copying the old ones

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (models read `layer.weight.dtype` and the like)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias, or None."""
        return self.base_layer.bias

    @property
    def num_features(self) -> int:
        """Length of one adapter's vector: input features on the input side, output features otherwise."""
        return self.in_features if self.is_feedforward else self.out_features

    def vector_shape(self) -> tuple[int, ...]:
        """Shape of one adapter's vector, as PEFT stores it."""
        if self.layout is WeightLayout.CONV:
            return (1, self.num_features) + (1,) * self._spatial_dims()
        return (1, self.in_features) if self.is_feedforward else (self.out_features, 1)

    def _spatial_dims(self) -> int:
        return self.base_layer.weight.dim() - 2

    # -- adapters --------------------------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, init_ones: bool = True, dtype: torch.dtype | None = None) -> None:
        """Create the vector of `adapter_name` (replacing one of that name); active if no adapter is active yet.

        Args:
            adapter_name: key of the vector in `ia3_l`.
            init_ones: ones (the identity, as PEFT initialises), or N(0, 1) draws when False.
            dtype: the vector's dtype; default: the base weight's.
        """
        weight = self.base_layer.weight
        dtype = dtype or float_dtype(weight)
        if init_ones:
            vector = torch.ones(self.vector_shape(), dtype=dtype, device=weight.device)
        else:
            vector = torch.randn(self.vector_shape()).to(device=weight.device, dtype=dtype)
        self.ia3_l[adapter_name] = nn.Parameter(vector)
        if not self._active_adapters:
            self._active_adapters = [adapter_name]

    @property
    def active_adapters(self) -> list[str]:
        """Adapters whose vectors apply (their product) in `forward`, in order."""
        return list(self._active_adapters)

    def set_adapter(self, adapter_names: str | Sequence[str]) -> None:
        """Make these adapters active (an empty list: none, `forward` is the base layer).

        Raises:
            ValueError: a name is not an adapter of this layer.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_adapters(names)
        self._active_adapters = names

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove `adapter_name`'s vector; the other active adapters stay active.

        Raises:
            ValueError: the adapter is unknown here, or merged into the base weights (unmerge first).
        """
        self._check_adapters([adapter_name])
        if adapter_name in self.merged_adapters:
            raise ValueError(f"Adapter {adapter_name!r} is merged into {type(self.base_layer).__name__}; unmerge first")
        del self.ia3_l[adapter_name]
        self._active_adapters = [a for a in self._active_adapters if a != adapter_name]
        if not self._active_adapters and len(self.ia3_l):
            self._active_adapters = [next(iter(self.ia3_l.keys()))]

    def _check_adapters(self, names: Sequence[str]) -> None:
        unknown = [n for n in names if n not in self.ia3_l]
        if unknown:
            raise ValueError(
                f"Unknown adapter name(s) {unknown} for this IA3Layer over {type(self.base_layer).__name__}; "
                f"it has {list(self.ia3_l.keys())}"
            )

    # -- forward ---------------------------------------------------------------------------------------------------
    def scaling(self) -> torch.Tensor | None:
        """Product of the active adapters' vectors, in `vector_shape()` (None when no adapter is active)."""
        scale = None
        for name in self._active_adapters:
            vector = self.ia3_l[name]
            scale = vector if scale is None else scale * vector
        return scale

    def vector_or_ones(self, adapter_name: str | None) -> torch.Tensor:
        """This layer's flat vector for `adapter_name`, or ones when the adapter does not touch it (shape `(F,)`)."""
        if adapter_name is not None and adapter_name in self.ia3_l:
            return self.ia3_l[adapter_name].reshape(-1)
        ref = next(iter(self.ia3_l.values()), None)
        dtype = ref.dtype if ref is not None else float_dtype(self.base_layer.weight)
        return torch.ones(self.num_features, dtype=dtype, device=self.base_layer.weight.device)

    @property
    def row_scales(self) -> torch.Tensor | None:
        """The per-row vectors in force (`set_row_scales`), None when the active adapters apply to every row."""
        return self._row_scales

    @property
    def row_tokens(self) -> torch.Tensor | None:
        """Each token's row of `row_scales` in a packed batch (`set_row_scales`), else None."""
        return self._row_tokens

    def set_row_scales(self, rows: torch.Tensor | None, tokens: torch.Tensor | None = None) -> None:
        """Give each batch row its own vector: `rows` has shape `(batch, F)`; None returns to `active_adapters`.
        With `tokens` (a packed batch: one sequence holding several rows' tokens, `(1, N, F)` activations), token
        `t` scales by `rows[tokens[t]]`."""
        self._row_scales = rows
        self._row_tokens = tokens if rows is not None else None
        self._row_cache = {}

    def _rows_for(self, x: torch.Tensor) -> torch.Tensor:
        """The per-row vectors shaped to broadcast against `x` (rows repeated for batches grown by `generate`)."""
        rows = self._row_scales
        assert rows is not None
        if self._row_tokens is not None and self.layout is not WeightLayout.CONV:  # packed: a vector per token
            return rows.index_select(0, self._row_tokens).view(x.shape[:-1] + rows.shape[1:])
        batch = x.shape[0]
        if batch != rows.shape[0]:
            cached = self._row_cache.get(batch)
            if cached is None:
                if batch % rows.shape[0]:
                    raise ValueError(
                        f"adapter_names gives {rows.shape[0]} rows but this layer sees a batch of {batch}; pass one "
                        "adapter name per input row"
                    )
                # generate() expands each input row into consecutive copies (beams, return sequences)
                cached = rows.repeat_interleave(batch // rows.shape[0], dim=0)
                self._row_cache[batch] = cached
            rows = cached
        if self.layout is WeightLayout.CONV:  # (B, C) -> (B, C, 1, ...) against (B, C, *spatial)
            return rows.view(rows.shape + (1,) * (x.dim() - 2))
        return rows.view((rows.shape[0],) + (1,) * (x.dim() - 2) + (rows.shape[1],))  # (B, 1, ..., F)

    def _broadcastable(self, scale: torch.Tensor) -> torch.Tensor:
        """A vector of `vector_shape()` shaped to broadcast against the activations, batched or not."""
        if self.layout is WeightLayout.CONV:  # channels sit just before the spatial dims: (C, 1, ...)
            return scale.reshape((self.num_features,) + (1,) * self._spatial_dims())
        return scale.reshape(-1)  # features on the last dim

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Apply the base layer with (IA)^3 scaling.

        Args:
            x: `(..., in)` for linear layers, `(batch, C_in, *spatial)` (or unbatched `(C_in, *spatial)`) for
                convolutions.
            *args: passed to the base layer, as are `**kwargs`.

        Returns:
            `(..., out)` or `(batch, C_out, *spatial)`, in `x`'s dtype for input-side and the base layer's output
            dtype for output-side scaling.
        """
        if self.disabled or self.merged_adapters:
            return self.base_layer(x, *args, **kwargs)
        if self._row_scales is not None:
            scale = self._rows_for(x)
        else:
            vector = self.scaling()
            if vector is None:
                return self.base_layer(x, *args, **kwargs)
            scale = self._broadcastable(vector)
        if self.is_feedforward:
            scaled = x * scale if x.dtype == scale.dtype else (x.to(scale.dtype) * scale).to(x.dtype)
            return self.base_layer(scaled, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        out = result * scale
        return out if out.dtype == result.dtype else out.to(result.dtype)

    # -- merging ---------------------------------------------------------------------------------------------------
    def _weight_scale(self, vector: torch.Tensor) -> torch.Tensor:
        """The vector shaped to multiply `base_layer.weight` elementwise."""
        if self.layout is WeightLayout.LINEAR:  # weight (out, in); vector (out, 1) or (1, in)
            return vector
        if self.layout is WeightLayout.TRANSPOSED:  # weight (in, out)
            return vector.T
        if not self.is_feedforward:  # weight (out, in/groups, *k); vector (1, out, 1, ...)
            return vector.transpose(0, 1)
        conv = self.base_layer
        groups = conv.groups
        in_per_group = conv.in_channels // groups
        # output channel o reads input channels of its group g = o // (out/groups): columns g*in_per_group + j
        per_group = vector.reshape(groups, in_per_group).repeat_interleave(conv.out_channels // groups, dim=0)
        return per_group.reshape((conv.out_channels, in_per_group) + (1,) * self._spatial_dims())

    def _merged_tensors(self, adapter_names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The base weight and bias with `adapter_names` folded in (the base's own tensors when there are none)."""
        weight = self.base_layer.weight.data
        bias = self.base_layer.bias.data if getattr(self.base_layer, "bias", None) is not None else None
        for name in adapter_names:
            vector = self.ia3_l[name].data
            weight = torch.mul(weight, self._weight_scale(vector)).to(self.base_layer.weight.dtype)
            if bias is not None and not self.is_feedforward:
                bias = torch.mul(bias, vector.reshape(-1)).to(self.base_layer.bias.dtype)
        return weight, bias

    def _unmerged(self, adapter_names: Sequence[str]) -> list[str]:
        """`adapter_names` less those already merged (after checking they exist)."""
        self._check_adapters(adapter_names)
        return [n for n in dict.fromkeys(adapter_names) if n not in self.merged_adapters]

    def merge(
        self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False, keep_original: bool = True
    ) -> None:
        """Fold adapters into the base weights in place; `forward` then runs the base layer alone.

        Args:
            adapter_names: adapters to merge (default: the active ones); those already merged are skipped.
            safe_merge: refuse (ValueError, nothing changed) when the merged weights hold NaN or infinity.
            keep_original: keep an exact copy of the weight (and bias) so `unmerge` restores them bit for bit.
                Costs one copy of this layer's weight until unmerge; `merge_and_unload` passes False.

        Raises:
            ValueError: an unknown adapter name, or non-finite merged weights under `safe_merge`.
            QuantizedMergeError: `base_layer` is quantised (bitsandbytes, torchao); see `ia3.quantization`.
        """
        names = self._unmerged(self._active_adapters if adapter_names is None else adapter_names)
        if not names:
            return
        check_mergeable(self.base_layer)
        weight, bias = self._merged_tensors(names)
        if safe_merge and not _finite(weight, bias):
            raise ValueError(
                f"NaNs detected in the merged weights. The adapter {', '.join(names)} seems to be broken. "
                f"(Merging it gives non-finite weights in this {type(self.base_layer).__name__}; check its vectors "
                "for NaN/inf or huge values.)"
            )
        if keep_original and self._originals is None:
            b = self.base_layer.bias
            self._originals = (self.base_layer.weight.data.clone(), b.data.clone() if b is not None else None)
        self.base_layer.weight.data.copy_(weight)
        if bias is not None and not self.is_feedforward:
            self.base_layer.bias.data.copy_(bias)
        self.merged_adapters.extend(names)

    def check_merge(self, adapter_names: Sequence[str] | None = None) -> bool:
        """True when merging would give finite weights (used by `safe_merge` to check every layer first)."""
        names = self._unmerged(self._active_adapters if adapter_names is None else adapter_names)
        if names:
            check_mergeable(self.base_layer)
        return not names or _finite(*self._merged_tensors(names))

    def unmerge(self) -> None:
        """Restore the weights as they were before the first merge, bit for bit.

        Raises:
            RuntimeError: the layer was merged with `keep_original=False`.
        """
        if not self.merged_adapters:
            return
        if self._originals is None:
            raise RuntimeError("This layer was merged without keeping its original weights; it cannot be unmerged")
        weight, bias = self._originals
        self.base_layer.weight.data.copy_(weight)
        if bias is not None:
            self.base_layer.bias.data.copy_(bias)
        self._originals = None
        self.merged_adapters = []

    def extra_repr(self) -> str:
        side = "input" if self.is_feedforward else "output"
        return (
            f"scale={side}, adapters={list(self.ia3_l.keys())}, active={self._active_adapters}, "
            f"merged={self.merged_adapters}"
        )


def _finite(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return bool(torch.isfinite(weight).all()) and (bias is None or bool(torch.isfinite(bias).all()))
