"""Per-example adapters: each batch row runs through its own adapter (or none) in one forward pass.

Every `IA3Layer` gets a `(batch, F)` table of per-row vectors (`IA3Layer.set_row_scales`); every
`ModulesToSaveWrapper` gets the row's adapter names and runs each adapter's copy on its rows. Each adapter's vectors
are copied once into a row of a table for the whole model (per device and dtype) the first time a batch uses it; a
batch gathers its adapters' rows with one `index_select`. So a step's cost depends on the batch's rows, not on how many
adapters the model holds, and a server whose batch mix changes at every step builds nothing per step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

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
    """Layers whose vectors share a device and dtype, and so one table of per-adapter vectors.

    `table` row `slots[name]` holds adapter `name`'s vectors of these layers, concatenated (ones where it has none);
    a row is written the first time a batch uses the adapter and again only when one of its vectors changed
    (`stamps`: the vectors' identities and version counters). A step gathers the rows of its batch's adapters only,
    so its cost does not depend on how many adapters the model holds or on which mix the batch has.
    """

    device: torch.device
    dtype: torch.dtype
    layers: list[IA3Layer]
    width: int
    slots: dict[str, int] = field(default_factory=dict)
    stamps: dict[str, tuple] = field(default_factory=dict)
    table: torch.Tensor | None = None  # (capacity, width), outside autograd

    def slot(self, name: str) -> int:
        """`name`'s row of the table, (re)written when missing or stale."""
        vectors = [layer.ia3_l[name] for layer in self.layers if name in layer.ia3_l]
        stamp = tuple((id(v), v._version) for v in vectors)
        row = self.slots.get(name)
        if row is not None and self.stamps[name] == stamp:
            return row
        # the table lives across calls made with and without inference mode: keep it a normal tensor (one made in
        # inference mode could not be written outside it)
        with torch.inference_mode(False), torch.no_grad():
            if row is None:
                row = len(self.slots)
                if self.table is None or row >= self.table.shape[0]:
                    grown = torch.ones(max(8, 2 * row), self.width, device=self.device, dtype=self.dtype)
                    if self.table is not None:
                        grown[:row] = self.table[:row]
                    self.table = grown
                self.slots[name] = row
            self.table[row] = _row_table(self.layers, [name], self.dtype)[0]
        self.stamps[name] = stamp
        return row


class PerExampleAdapters:
    """Routes batch rows to adapters for an `IA3Model`, keeping one table of per-adapter vectors per device and
    dtype, filled as adapters are first used.

    Args:
        max_adapters: rows a table keeps at most; beyond, it starts again empty.
    """

    def __init__(self, max_adapters: int = 4096) -> None:
        self.max_adapters = max_adapters
        self._groups: list[_Group] | None = None

    def clear(self) -> None:
        """Forget every table; call when adapters are added, removed or switched."""
        self._groups = None

    @contextmanager
    def rows(
        self,
        layers: Sequence[tuple[str, IA3Layer]],
        wrappers: Sequence[ModulesToSaveWrapper],
        adapter_names: list[str],
        tokens: torch.Tensor | None = None,
    ) -> Iterator[None]:
        """Inside the block, batch row `i` of every layer and wrapper uses adapter `adapter_names[i]`.

        Args:
            layers: (name, layer) for every (IA)^3 layer of the model; none may be merged.
            wrappers: every `ModulesToSaveWrapper` of the model.
            adapter_names: one adapter name per batch row, already checked against the model's adapters; names a
                layer lacks (e.g. `BASE_ADAPTER`) use ones there.
            tokens: a packed batch's token rows (`IA3Layer.set_row_scales`).

        Raises:
            ValueError: some layer is merged, or `tokens` with wrappers (whose copies run by batch row).
        """
        check_packable(tokens, wrappers)
        merged = [name for name, layer in layers if layer.merged_adapters]
        if merged:
            raise ValueError(
                f"Per-example adapters need unmerged layers, but {merged[:3]} are merged; call unmerge_adapter()"
            )
        unique = list(dict.fromkeys(adapter_names))
        plain_layers = [layer for _, layer in layers]
        with kept_rows(plain_layers, wrappers):
            self._set_row_scales(plain_layers, unique, [unique.index(n) for n in adapter_names], tokens)
            for wrapper in wrappers:
                wrapper.set_row_adapters(adapter_names)
            yield

    def _plan(self, layers: list[IA3Layer]) -> list[_Group]:
        """The groups of the model's layers, (re)built when missing, too full, or when vectors moved device."""
        groups = self._groups
        fresh = groups is not None and all(_device(g.layers[0]) == g.device for g in groups)
        if groups is not None and fresh and all(len(g.slots) < self.max_adapters for g in groups):
            return groups
        by_key: dict[tuple[torch.device, torch.dtype], list[IA3Layer]] = {}
        for layer in layers:
            ref = _reference(layer)
            by_key.setdefault((ref.device, ref.dtype), []).append(layer)
        groups = [
            _Group(device, dtype, group, sum(layer.num_features for layer in group))
            for (device, dtype), group in by_key.items()
        ]
        self._groups = groups
        return groups

    def _set_row_scales(
        self, layers: list[IA3Layer], unique: list[str], rows: list[int], tokens: torch.Tensor | None = None
    ) -> None:
        """Give every layer its `(batch, F)` per-row vectors with a few tensor ops for the whole model.

        Layers are grouped by device and vector dtype; each group's table row of an adapter is every layer's vector
        concatenated (ones where the adapter does not touch a layer). The batch's rows are gathered from the table
        once and each layer handed a column slice. When some vector of the batch's adapters trains (autograd on), the
        batch's table is built from the live vectors instead, as part of the graph.

        Args:
            layers: every (IA)^3 layer of the model.
            unique: the distinct adapter names of the batch, in first-seen order.
            rows: for each batch row, its adapter's index in `unique`.
        """
        grad = torch.is_grad_enabled()
        for group in self._plan(layers):
            if grad and any(
                n in layer.ia3_l and layer.ia3_l[n].requires_grad for layer in group.layers for n in unique
            ):
                table = _row_table(group.layers, unique, group.dtype)  # part of the autograd graph
                index = rows
            else:
                slots = [group.slot(n) for n in unique]
                table = group.table
                index = [slots[r] for r in rows]
            assert table is not None
            hand_out(group.layers, table.index_select(0, torch.tensor(index, device=group.device)), tokens)


def check_packable(tokens: torch.Tensor | None, wrappers: Sequence[ModulesToSaveWrapper]) -> None:
    """ValueError for a packed batch (`tokens`) where `wrappers` would need its rows apart."""
    if tokens is not None and wrappers:
        raise ValueError("a packed batch cannot run modules_to_save copies by row")


@contextmanager
def kept_rows(layers: Sequence[IA3Layer], wrappers: Sequence[ModulesToSaveWrapper]) -> Iterator[None]:
    """The per-row vectors and adapter names that `layers` and `wrappers` have on entry come back on exit, so
    blocks that set their own may nest or interleave (a static batch paused between its steps while the decoder
    runs one of its own)."""
    scales_before = [(layer.row_scales, layer.row_tokens) for layer in layers]
    names_before = [wrapper.row_adapters for wrapper in wrappers]
    try:
        yield
    finally:
        for layer, (scales, tokens) in zip(layers, scales_before):
            layer.set_row_scales(scales, tokens)
        for wrapper, names in zip(wrappers, names_before):
            wrapper.set_row_adapters(names)


def hand_out(layers: Sequence[IA3Layer], gathered: torch.Tensor, tokens: torch.Tensor | None = None) -> None:
    """Give each layer its columns of `gathered` (`(batch, sum of F)`, the layers' vectors side by side, in order)
    as its per-row vectors (with `tokens`, each token's row of a packed batch: `IA3Layer.set_row_scales`)."""
    offset = 0
    for layer in layers:
        layer.set_row_scales(gathered[:, offset : offset + layer.num_features], tokens)
        offset += layer.num_features


def _reference(layer: IA3Layer) -> torch.Tensor:
    ref = next(iter(layer.ia3_l.values()), None)
    return layer.vector_or_ones(None) if ref is None else ref


def _device(layer: IA3Layer) -> torch.device:
    return _reference(layer).device


def _row_table(layers: list[IA3Layer], unique: list[str], dtype: torch.dtype) -> torch.Tensor:
    """`(len(unique), sum of F)`: row `i` is adapter `unique[i]`'s vectors of `layers`, concatenated."""
    return torch.stack([torch.cat([layer.vector_or_ones(n).to(dtype) for layer in layers]) for n in unique])
