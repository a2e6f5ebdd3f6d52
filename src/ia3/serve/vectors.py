"""The served adapters' (IA)^3 vectors, one row each of preallocated tables.

A server may hold thousands of adapters. Each is one row of a table per (device, dtype) of the model's (IA)^3
layers: its vectors of those layers side by side, ones where it has none. Installing an adapter copies its file's
tensors into a free row, under a lock, from any thread: no module of the model changes, so a load runs beside the
decode loop instead of waiting for a pause between its steps. Evicting one frees its row. A batch gathers its rows'
vectors with one `index_select` per table and hands each layer its columns, so a step costs the same whether 2 or
2,000 adapters are resident and whatever mix of them it has.

Row 0 is all ones: the base model's rows, and the rows of an adapter removed while a row of it was still in a batch
(a cancelled request's row, which the decoder drops at its next step).

The tables cover the layers the model has; the engine injects new layers (an adapter targeting other modules) and
calls `relayout`, which widens the tables and keeps every row's vectors.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ia3.layer import IA3Layer
from ia3.modules_to_save import ModulesToSaveWrapper
from ia3.per_example import hand_out, kept_rows


@dataclass
class _Table:
    """The rows of every adapter for layers sharing a device and a vector dtype."""

    device: torch.device
    dtype: torch.dtype
    layers: list[IA3Layer]
    data: torch.Tensor  # (capacity, sum of the layers' features); row 0 all ones, rows from `_next` on unused


@dataclass(frozen=True)
class Column:
    """Where one layer's vector lies in the tables, keyed by its PEFT key (`base_model.model.<path>.ia3_l`)."""

    table: int
    start: int
    features: int
    is_feedforward: bool


class VectorBank:
    """Adapter name -> a row of vectors for every (IA)^3 layer; thread-safe.

    Args:
        capacity: adapters the tables hold before they first grow (they grow by half when full, never shrink).
    """

    def __init__(self, capacity: int = 64) -> None:
        self._lock = threading.Lock()
        self._capacity = max(1, capacity) + 1  # + the row of ones
        self._tables: list[_Table] = []
        self._columns: dict[str, Column] = {}
        self._keys: list[list[str]] = []  # each table's keys, in column order
        self._wrappers: list[ModulesToSaveWrapper] = []
        self._slots: dict[str, int] = {}
        self._free: list[int] = []
        self._next = 1

    # -- layout ----------------------------------------------------------------------------------------------------
    def relayout(self, layers: list[tuple[str, IA3Layer]], wrappers: list[ModulesToSaveWrapper]) -> None:
        """Cover exactly `layers` ((PEFT key, layer), in model order) and `wrappers`; every resident adapter keeps
        its vectors (ones for layers new to the tables)."""
        groups: dict[tuple[torch.device, torch.dtype], list[tuple[str, IA3Layer]]] = {}
        for key, layer in layers:
            groups.setdefault((layer.weight.device, layer.vector_or_ones(None).dtype), []).append((key, layer))
        with self._lock, torch.inference_mode(False), torch.no_grad():  # tables outlive any inference block
            tables: list[_Table] = []
            columns: dict[str, Column] = {}
            for (device, dtype), members in groups.items():
                width = sum(layer.num_features for _, layer in members)
                # rows never used stay untouched (no memory until an adapter takes one)
                data = torch.empty(self._capacity, width, device=device, dtype=dtype)
                data[: self._next].fill_(1)
                start = 0
                for key, layer in members:
                    columns[key] = Column(len(tables), start, layer.num_features, layer.is_feedforward)
                    old = self._columns.get(key)
                    if old is not None and old.features == layer.num_features:
                        data[: self._next, start : start + old.features] = self._view(old)[: self._next]
                    start += layer.num_features
                tables.append(_Table(device, dtype, [layer for _, layer in members], data))
            self._tables, self._columns, self._wrappers = tables, columns, list(wrappers)
            self._keys = [[k for k, c in columns.items() if c.table == t] for t in range(len(tables))]

    def columns(self) -> dict[str, Column]:
        """The layers the tables cover, by PEFT key."""
        return dict(self._columns)

    # -- adapters --------------------------------------------------------------------------------------------------
    def problems(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Why `tensors` (PEFT key -> vector) cannot be copied into a row as they are; empty when they can."""
        found = []
        for key, tensor in tensors.items():
            column = self._columns.get(key)
            if column is None:
                found.append(f"{key} is no (IA)^3 layer of the served model")
            elif tensor.numel() != column.features or not tensor.dtype.is_floating_point:
                found.append(f"{key} has {tensor.numel()} {tensor.dtype} values; the layer takes {column.features}")
        return found

    def add(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy adapter `name`'s vectors into a row of its own (replacing the vectors of a resident `name`); the
        layers it has no tensor for get ones.

        Raises:
            ValueError: `problems(tensors)` found some; nothing changed.
        """
        with self._lock:
            problems = self.problems(tensors)
            if problems:
                raise ValueError("; ".join(problems[:3]))
            slot = self._slots.get(name)
            if slot is None:
                slot = self._free.pop() if self._free else self._new_slot()
            with torch.inference_mode(False), torch.no_grad():
                for index, table in enumerate(self._tables):  # the row whole, in one copy
                    keys = self._keys[index]
                    parts = [
                        tensors[k].reshape(-1).to(table.device, table.dtype) if k in tensors else self._ones(k)
                        for k in keys
                    ]
                    table.data[slot].copy_(torch.cat(parts))
            self._slots[name] = slot

    def remove(self, name: str) -> bool:
        """Free `name`'s row; False when it was not here."""
        with self._lock:
            slot = self._slots.pop(name, None)
            if slot is not None:
                self._free.append(slot)
            return slot is not None

    def has(self, name: str) -> bool:
        return name in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def dtypes(self) -> set[torch.dtype]:
        """The dtypes the vectors are kept (and scale) in."""
        return {t.dtype for t in self._tables}

    @property
    def nbytes(self) -> int:
        """Bytes of the rows ever used (the rest of the capacity is allocated but never touched)."""
        return sum(self._next * t.data.shape[1] * t.data.element_size() for t in self._tables)

    # -- batches ---------------------------------------------------------------------------------------------------
    @contextmanager
    def rows(self, names: list[str]) -> Iterator[None]:
        """Inside the block, batch row `i` of every covered layer scales by adapter `names[i]`'s vectors (ones for
        a name not here, such as `BASE_ADAPTER`), and every wrapper runs `names[i]`'s copy (its original module for
        a name it has no copy of). What was in force before comes back on exit."""
        with self._lock:
            index = [self._slots.get(name, 0) for name in names]
            tables, wrappers = self._tables, self._wrappers
            gathered = [t.data.index_select(0, torch.tensor(index, device=t.device)) for t in tables]
        with kept_rows([layer for t in tables for layer in t.layers], wrappers):
            for table, rows in zip(tables, gathered):
                hand_out(table.layers, rows)
            for wrapper in wrappers:
                wrapper.set_row_adapters(names)
            yield

    @contextmanager
    def no_rows(self) -> Iterator[None]:
        """Inside the block no layer scales by rows (a batch of base-model rows, when no layer has an adapter of
        its own active: its layers run as the base layers, without multiplying by ones); what was in force before
        comes back on exit."""
        with self._lock:
            tables, wrappers = self._tables, self._wrappers
        layers = [layer for t in tables for layer in t.layers]
        with kept_rows(layers, wrappers):
            for layer in layers:
                layer.set_row_scales(None)
            for wrapper in wrappers:
                wrapper.set_row_adapters(None)
            yield

    # -- inside (lock held) ----------------------------------------------------------------------------------------
    def _ones(self, key: str) -> torch.Tensor:
        column = self._columns[key]
        table = self._tables[column.table]
        return torch.ones(column.features, device=table.device, dtype=table.dtype)

    def _view(self, column: Column) -> torch.Tensor:
        return self._tables[column.table].data[:, column.start : column.start + column.features]

    def _new_slot(self) -> int:
        if self._next >= self._capacity:
            grown = self._capacity + max(16, self._capacity // 2)
            with torch.inference_mode(False), torch.no_grad():
                for table in self._tables:
                    data = torch.empty(grown, table.data.shape[1], device=table.device, dtype=table.dtype)
                    data[: self._next] = table.data[: self._next]
                    table.data = data
            self._capacity = grown
        self._next += 1
        return self._next - 1
