"""`IA3Layer`: a layer wrapped with one learned scaling vector per adapter.

(IA)^3 (Liu et al. 2022, https://arxiv.org/abs/2205.05638, eq. in section 3.3) rescales an activation
elementwise with a learned vector `l`. Next to a matrix product it can act on either side:

* output side: `y = l * (W x + b)`, with `l` of shape `(out, 1)`; merged as `W' = diag(l) W`, `b' = l * b`;
* input side (``is_feedforward``): `y = W (l * x) + b`, with `l` of shape `(1, in)`; merged as `W' = W diag(l)`.

Convolutions scale channels the same way, with vectors of shape `(1, C, 1, ...)` as in PEFT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module
from transformers.pytorch_utils import Conv1D


class IA3Layer(nn.Module):
    """Wraps `nn.Linear`, transformers' `Conv1D`, `nn.Conv2d` or `nn.Conv3d` by composition.

    Attributes:
        base_layer: the wrapped layer; its parameters stay frozen.
        ia3_l: one vector per adapter name (`nn.ParameterDict`), keys as in PEFT's state dict.
        is_feedforward: True when the vectors scale the input, False when they scale the output.
        active_adapters: adapters whose vectors apply (their product) in `forward`.
        merged_adapters: adapters folded into `base_layer`'s weights, in merge order.
    """

    def __init__(self, base_layer: nn.Module, is_feedforward: bool) -> None:
        super().__init__()
        if isinstance(base_layer, nn.Linear):
            self.kind = "linear"
            in_features, out_features = base_layer.in_features, base_layer.out_features
        elif isinstance(base_layer, Conv1D):
            self.kind = "conv1d"  # weight stored as (in, out)
            in_features, out_features = base_layer.weight.shape
        elif isinstance(base_layer, (nn.Conv2d, nn.Conv3d)):
            self.kind = "conv"
            in_features, out_features = base_layer.in_channels, base_layer.out_channels
        else:
            raise TypeError(
                f"ia3 cannot wrap {type(base_layer).__name__}; supported: nn.Linear, Conv1D, nn.Conv2d, nn.Conv3d"
            )
        self.base_layer = base_layer
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward = is_feedforward
        self.in_features = in_features
        self.out_features = out_features
        self._active: list[str] = []
        self._active_vectors: list[nn.Parameter] = []  # the active adapters' vectors, looked up once
        self.disabled = False
        self.merged_adapters: list[str] = []
        # Exact copies of the base weight and bias taken at the first merge, restored by `unmerge`.
        self._originals: tuple[torch.Tensor, torch.Tensor | None] | None = None
        # Per-example vectors, one row per batch element (set by `IA3Model.per_example`), and expansions of them
        # for batches grown by beam search or sampling (`num_beams` / `num_return_sequences` copies per row).
        self._row_scales: torch.Tensor | None = None
        self._row_cache: dict[int, torch.Tensor] = {}

    # -- construction ----------------------------------------------------------------------------------------------
    @classmethod
    def from_module(cls, module: nn.Module, is_feedforward: bool) -> IA3Layer:
        """Wrap `module` (no adapter yet; add one with `add_adapter`)."""
        return cls(module, is_feedforward)

    def to_module(self) -> nn.Module:
        """The base layer, with whatever adapters are merged into it."""
        return self.base_layer

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (models read `layer.weight.dtype` and the like)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def num_features(self) -> int:
        return self.in_features if self.is_feedforward else self.out_features

    def vector_shape(self) -> tuple[int, ...]:
        """Shape of one adapter's vector, as PEFT stores it."""
        if self.kind == "conv":
            return (1, self.num_features) + (1,) * (self.base_layer.weight.dim() - 2)
        return (1, self.in_features) if self.is_feedforward else (self.out_features, 1)

    def add_adapter(self, adapter_name: str, init_ones: bool = True, dtype: torch.dtype | None = None) -> None:
        """Create the vector of `adapter_name`: ones (the identity), or N(0, 1) draws when `init_ones` is False."""
        weight = self.base_layer.weight
        dtype = dtype or weight.dtype
        if init_ones:
            vector = torch.ones(self.vector_shape(), dtype=dtype, device=weight.device)
        else:
            vector = torch.randn(self.vector_shape()).to(device=weight.device, dtype=dtype)
        self.ia3_l[adapter_name] = nn.Parameter(vector)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"Adapter {adapter_name!r} is merged into {type(self.base_layer).__name__}; unmerge first")
        if adapter_name in self.ia3_l:
            del self.ia3_l[adapter_name]
        self.active_adapters = [a for a in self._active if a != adapter_name]

    # -- forward ---------------------------------------------------------------------------------------------------
    def scaling(self) -> torch.Tensor | None:
        """Product of the active adapters' vectors (None when no active adapter touches this layer)."""
        scale = None
        for name in self.active_adapters:
            vector = self.ia3_l.get(name, None)
            if vector is not None:
                scale = vector if scale is None else scale * vector
        return scale

    def vector_or_ones(self, adapter_name: str | None) -> torch.Tensor:
        """This layer's flat vector for `adapter_name`, or ones when the adapter does not touch it (shape `(F,)`)."""
        if adapter_name is not None and adapter_name in self.ia3_l:
            return self.ia3_l[adapter_name].reshape(-1)
        ref = next(iter(self.ia3_l.values()), None)
        dtype = ref.dtype if ref is not None else self.base_layer.weight.dtype
        return torch.ones(self.num_features, dtype=dtype, device=self.base_layer.weight.device)

    def set_row_scales(self, rows: torch.Tensor | None) -> None:
        """Give each batch row its own vector: `rows` has shape `(batch, F)`; None returns to `active_adapters`."""
        self._row_scales = rows
        self._row_cache = {}

    def _rows_for(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._row_scales
        assert rows is not None
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
        if self.kind == "conv":  # (B, C) -> (B, C, 1, ...) against (B, C, H, W, ...)
            return rows.view(rows.shape + (1,) * (x.dim() - 2))
        return rows.view((rows.shape[0],) + (1,) * (x.dim() - 2) + (rows.shape[1],))  # (B, 1, ..., F)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Apply the base layer with (IA)^3 scaling.

        Args:
            x: `(batch, ..., in)` for linear layers, `(batch, C_in, *spatial)` for convolutions.

        Returns:
            `(batch, ..., out)` or `(batch, C_out, *spatial)`, in `x`'s dtype for input-side and the base layer's
            output dtype for output-side scaling.
        """
        if self.disabled or self.merged_adapters:
            return self.base_layer(x, *args, **kwargs)
        if self._row_scales is not None:
            scale = self._rows_for(x)
        else:
            scale = self.scaling()
            if scale is None:
                return self.base_layer(x, *args, **kwargs)
            if self.kind != "conv":
                scale = scale.view(-1)
        if self.is_feedforward:
            scaled = x * scale if x.dtype == scale.dtype else (x.to(scale.dtype) * scale).to(x.dtype)
            return self._base(scaled, args, kwargs)
        result = self._base(x, args, kwargs)
        out = result * scale
        return out if out.dtype == result.dtype else out.to(result.dtype)

    def _base(self, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """The base layer's output; a plain `nn.Linear` without hooks is applied with `F.linear` directly, which
        skips a module call per layer (the same computation)."""
        base = self.base_layer
        if (
            type(base) is nn.Linear
            and not args
            and not kwargs
            and not (base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__)
            and not (_module._global_forward_hooks or _module._global_forward_pre_hooks)
        ):
            return F.linear(x, base.weight, base.bias)
        return base(x, *args, **kwargs)

    # -- merging ---------------------------------------------------------------------------------------------------
    def _weight_scale(self, vector: torch.Tensor) -> torch.Tensor:
        """The vector shaped to multiply `base_layer.weight` elementwise."""
        if self.kind == "linear":  # weight (out, in); vector (out, 1) or (1, in)
            return vector
        if self.kind == "conv1d":  # weight (in, out)
            return vector.T
        if not self.is_feedforward:  # weight (out, in/groups, *k); vector (1, out, 1, ...)
            return vector.transpose(0, 1)
        conv = self.base_layer
        groups = conv.groups
        in_per_group = conv.in_channels // groups
        # output channel o reads input channels of its group g = o // (out/groups): columns g*in_per_group + j
        per_group = vector.reshape(groups, in_per_group).repeat_interleave(conv.out_channels // groups, dim=0)
        return per_group.reshape((conv.out_channels, in_per_group) + (1,) * (conv.weight.dim() - 2))

    def _merged_tensors(
        self, adapter_names: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = self.base_layer.weight.data
        bias = self.base_layer.bias.data if getattr(self.base_layer, "bias", None) is not None else None
        for name in adapter_names:
            vector = self.ia3_l[name].data
            weight = torch.mul(weight, self._weight_scale(vector)).to(self.base_layer.weight.dtype)
            if bias is not None and not self.is_feedforward:
                bias = torch.mul(bias, vector.reshape(-1)).to(self.base_layer.bias.dtype)
        return weight, bias

    def mergeable(self, adapter_names: list[str]) -> list[str]:
        return [n for n in adapter_names if n in self.ia3_l and n not in self.merged_adapters]

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False, keep_original: bool = True) -> None:
        """Fold adapters into the base weights (all active adapters by default).

        Args:
            adapter_names: adapters to merge; those already merged or absent from this layer are skipped.
            safe_merge: refuse (ValueError, nothing changed) when the merged weights hold NaN or infinity.
            keep_original: keep an exact copy of the weight (and bias) so `unmerge` restores them bit for bit.
                Costs one copy of this layer's weight until unmerge; `merge_and_unload` passes False.
        """
        names = self.mergeable(self.active_adapters if adapter_names is None else adapter_names)
        if not names:
            return
        weight, bias = self._merged_tensors(names)
        if safe_merge and not (torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())):
            raise ValueError(
                f"Merging adapter(s) {names} gives non-finite weights in this {type(self.base_layer).__name__}; "
                "the adapter seems broken (check its vectors for NaN/inf or huge values)"
            )
        if keep_original and self._originals is None:
            b = self.base_layer.bias
            self._originals = (self.base_layer.weight.data.clone(), b.data.clone() if b is not None else None)
        self.base_layer.weight.data.copy_(weight)
        if bias is not None and not self.is_feedforward:
            self.base_layer.bias.data.copy_(bias)
        self.merged_adapters.extend(names)

    def check_merge(self, adapter_names: list[str] | None = None) -> bool:
        """True when merging would give finite weights (used by `safe_merge` to check every layer first)."""
        names = self.mergeable(self.active_adapters if adapter_names is None else adapter_names)
        if not names:
            return True
        weight, bias = self._merged_tensors(names)
        return bool(torch.isfinite(weight).all()) and (bias is None or bool(torch.isfinite(bias).all()))

    def unmerge(self) -> None:
        """Restore the weights as they were before the first merge, bit for bit."""
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
        return f"scale={side}, adapters={list(self.ia3_l.keys())}, merged={self.merged_adapters}"
