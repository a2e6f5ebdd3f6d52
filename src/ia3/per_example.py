"""Per-example adapters: each batch row runs through its own adapter (or none) in one forward pass.

Every `IA3Layer` gets a `(batch, F)` table of per-row vectors (`IA3Layer.set_row_scales`); every
`ModulesToSaveWrapper` gets the row's adapter names and runs each adapter's copy on its rows. The tables for a mix of
adapters are built with a few tensor ops for the whole model and cached, so `generate` and a server that sees the
same mix again pay for them once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ia3.layer import IA3Layer
from ia3.modules_to_save import ModulesToSaveWrapper

BASE_ADAPTER = "__base__"  # in `adapter_names`: this row uses no adapter


def check_adapter_names(adapter_names: object) -> list[str]:
    """`adapter_names` as a list, after checking it is a non-empty list or tuple (one name per batch row).

    Raises:
        ValueError: anything else (a single string, an empty list, another type).
    """
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)) or not adapter_names:
        raise ValueError(f"adapter_names must be a non-empty list with one adapter name per row; got {adapter_names!r}")
    return list(adapter_names)


@dataclass
class _Group:
    """Layers whose vectors share a device and dtype, and so one table of per-adapter vectors."""

    device: torch.device
    dtype: torch.dtype
    layers: list[IA3Layer]
    vectors: list[nn.Parameter]  # the mix's vectors in these layers, whose versions tell when the table is stale
    versions: list[int] | None = None
    table: torch.Tensor | None = None  # (adapters in the mix, sum of the layers' F), built outside autograd


class PerExampleAdapters:
    """Routes batch rows to adapters for an `IA3Model`, keeping the vector tables of recent adapter mixes.

    Args:
        max_mixes: how many mixes' tables to keep (a server sees many mixes: the newest few stay).
    """

    def __init__(self, max_mixes: int = 8) -> None:
        self.max_mixes = max_mixes
        self._plans: dict[tuple[str, ...], list[_Group]] = {}

    def clear(self) -> None:
        """Forget every table; call when adapters are added, removed or switched."""
        self._plans = {}

    @contextmanager
    def rows(
        self,
        layers: Sequence[tuple[str, IA3Layer]],
        wrappers: Sequence[ModulesToSaveWrapper],
        adapter_names: list[str],
    ) -> Iterator[None]:
        """Inside the block, batch row `i` of every layer and wrapper uses adapter `adapter_names[i]`.

        Args:
            layers: (name, layer) for every (IA)^3 layer of the model; none may be merged.
            wrappers: every `ModulesToSaveWrapper` of the model.
            adapter_names: one adapter name per batch row, already checked against the model's adapters; names a
                layer lacks (e.g. `BASE_ADAPTER`) use ones there.

        Raises:
            ValueError: some layer is merged.
        """
        merged = [name for name, layer in layers if layer.merged_adapters]
        if merged:
            raise ValueError(
                f"Per-example adapters need unmerged layers, but {merged[:3]} are merged; call unmerge_adapter()"
            )
        unique = list(dict.fromkeys(adapter_names))
        plain_layers = [layer for _, layer in layers]
        try:
            self._set_row_scales(plain_layers, unique, [unique.index(n) for n in adapter_names])
            for wrapper in wrappers:
                wrapper.set_row_adapters(adapter_names)
            yield
        finally:
            for layer in plain_layers:
                layer.set_row_scales(None)
            for wrapper in wrappers:
                wrapper.set_row_adapters(None)

    def _plan(self, layers: list[IA3Layer], unique: list[str]) -> list[_Group]:
        """The cached groups of the mix `unique`, (re)built when missing or when vectors moved device."""
        plan = self._plans.get(tuple(unique))
        if plan is not None and not any(g.vectors and g.vectors[0].device != g.device for g in plan):
            return plan
        by_key: dict[tuple[torch.device, torch.dtype], list[IA3Layer]] = {}
        for layer in layers:
            ref = next(iter(layer.ia3_l.values()), None)
            ref = layer.vector_or_ones(None) if ref is None else ref
            by_key.setdefault((ref.device, ref.dtype), []).append(layer)
        plan = [
            _Group(device, dtype, group, [layer.ia3_l[n] for layer in group for n in unique if n in layer.ia3_l])
            for (device, dtype), group in by_key.items()
        ]
        if len(self._plans) >= self.max_mixes:
            self._plans.pop(next(iter(self._plans)))
        self._plans[tuple(unique)] = plan
        return plan

    def _set_row_scales(self, layers: list[IA3Layer], unique: list[str], rows: list[int]) -> None:
        """Give every layer its `(batch, F)` per-row vectors with a few tensor ops for the whole model.

        Layers are grouped by device and vector dtype; in each group every adapter's vectors (ones where it does not
        touch a layer) are concatenated into one flat vector, the adapters' flat vectors stacked into an
        `(adapters, total_F)` table, its rows gathered once, and each layer handed a column slice. Outside autograd
        the tables are cached and rebuilt only when a vector changes (tracked by the tensors' version counters).

        Args:
            layers: every (IA)^3 layer of the model.
            unique: the distinct adapter names of the batch, in first-seen order.
            rows: for each batch row, its adapter's index in `unique`.
        """
        grad = torch.is_grad_enabled()
        for group in self._plan(layers, unique):
            if grad and any(v.requires_grad for v in group.vectors):
                table = _row_table(group.layers, unique, group.dtype)  # part of the autograd graph
            else:
                versions = [v._version for v in group.vectors]
                if group.versions != versions or group.table is None:
                    with torch.no_grad():
                        group.table = _row_table(group.layers, unique, group.dtype)
                    group.versions = versions
                table = group.table
            gathered = table.index_select(0, torch.tensor(rows, device=group.device))  # (batch, total_F)
            offset = 0
            for layer in group.layers:
                layer.set_row_scales(gathered[:, offset : offset + layer.num_features])
                offset += layer.num_features


def _row_table(layers: list[IA3Layer], unique: list[str], dtype: torch.dtype) -> torch.Tensor:
    """`(len(unique), sum of F)`: row `i` is adapter `unique[i]`'s vectors of `layers`, concatenated."""
    return torch.stack([torch.cat([layer.vector_or_ones(n).to(dtype) for layer in layers]) for n in unique])
