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

An adapter read from disk arrives as `RawVectors`: its file's bytes and where each tensor lies in them. A row is
put together from those bytes in Python and copied in with one torch call per table. On a busy server each torch
call (and each system call) lets go of the GIL and may wait up to the switch interval to get it back, so a load that
made a tensor per layer (three calls each, 90 layers for SmolLM2) took 10-40 ms under a burst of loads instead of 1.
"""

from __future__ import annotations

import json
import struct
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as safetensors_from_bytes

from ia3.layer import IA3Layer
from ia3.modules_to_save import ModulesToSaveWrapper
from ia3.per_example import check_packable, hand_out, kept_rows

SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class RawVectors:
    """A safetensors file's bytes and, per tensor, (dtype (None: not a float type), numel, start, end) of its data
    in them; parsed without making tensors (`parse`)."""

    data: bytes
    entries: dict[str, tuple[torch.dtype | None, int, int, int]] = field(default_factory=dict)

    @classmethod
    def parse(cls, data: bytes) -> RawVectors | None:
        """The entries of a well-formed little-endian safetensors file; None for anything else (the tensor reader
        then says what is wrong)."""
        try:
            length = struct.unpack("<Q", data[:8])[0]
            header = json.loads(data[8 : 8 + length])
            header.pop("__metadata__", None)
            entries, base = {}, 8 + length
            for key, info in header.items():
                start, end = (base + int(x) for x in info["data_offsets"])
                numel = 1
                for n in info["shape"]:
                    numel *= int(n)
                dtype = SAFETENSORS_FLOATS.get(info["dtype"])
                size = numel * (dtype.itemsize if dtype is not None else 0)
                if not base <= start <= end <= len(data) or (dtype is not None and end - start != size):
                    return None
                entries[key] = (dtype, numel, start, end)
        except (ValueError, TypeError, KeyError, AttributeError, struct.error):
            return None
        return cls(data, entries) if sys.byteorder == "little" else None

    @property
    def nbytes(self) -> int:
        return sum(end - start for _, _, start, end in self.entries.values())

    def keys(self) -> Iterator[str]:
        return iter(self.entries)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The file's tensors (ValueError when the safetensors reader refuses the file)."""
        try:
            return safetensors_from_bytes(self.data)
        except Exception as err:  # the reader's own error types
            raise ValueError(f"not a readable safetensors file: {err}") from None

    def specs(self) -> dict[str, tuple[int, torch.dtype | None]]:
        return {key: (numel, dtype) for key, (dtype, numel, _, _) in self.entries.items()}

    def row(self, keys: list[str]) -> torch.Tensor | None:
        """The vectors of `keys` side by side, in one tensor made in one call from the bytes; None unless every key
        is here and all share one float dtype."""
        found = [self.entries.get(key) for key in keys]
        dtypes = {entry[0] for entry in found if entry is not None}
        if None in found or len(dtypes) != 1 or None in dtypes:
            return None
        view = memoryview(self.data)
        joined = bytearray().join(view[start:end] for _, _, start, end in found)  # type: ignore[misc]
        return torch.frombuffer(joined, dtype=dtypes.pop()) if joined else None


def specs_of(vectors: Mapping[str, torch.Tensor] | RawVectors) -> dict[str, tuple[int, torch.dtype | None]]:
    """(numel, dtype; None when not a float type) of each vector."""
    if isinstance(vectors, RawVectors):
        return vectors.specs()
    return {k: (t.numel(), t.dtype if t.dtype.is_floating_point else None) for k, t in vectors.items()}


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
    def problems(self, vectors: Mapping[str, torch.Tensor] | RawVectors) -> list[str]:
        """Why `vectors` (PEFT key -> vector, or a file's `RawVectors`) cannot be copied into a row as they are;
        empty when they can."""
        found = []
        for key, (numel, dtype) in specs_of(vectors).items():
            column = self._columns.get(key)
            if column is None:
                found.append(f"{key} is no (IA)^3 layer of the served model")
            elif numel != column.features or dtype is None:
                kind = "non-float" if dtype is None else str(dtype)
                found.append(f"{key} has {numel} {kind} values; the layer takes {column.features}")
        return found

    def add(self, name: str, vectors: Mapping[str, torch.Tensor] | RawVectors) -> None:
        """Copy adapter `name`'s vectors into a row of its own (replacing the vectors of a resident `name`); the
        layers it has no vector for get ones. From `RawVectors` that cover a table's layers in one dtype, the row
        is made from the file's bytes in one call.

        Raises:
            ValueError: `problems(vectors)` found some; nothing changed.
        """
        with self._lock:
            problems = self.problems(vectors)
            if problems:
                raise ValueError("; ".join(problems[:3]))
            slot = self._slots.get(name)
            if slot is None:
                slot = self._free.pop() if self._free else self._new_slot()
            with torch.inference_mode(False), torch.no_grad():
                for index, table in enumerate(self._tables):  # the row whole, in one copy
                    table.data[slot].copy_(self._row(index, vectors))
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
    def rows(self, names: list[str], tokens: torch.Tensor | None = None) -> Iterator[None]:
        """Inside the block, batch row `i` of every covered layer scales by adapter `names[i]`'s vectors (ones for
        a name not here, such as `BASE_ADAPTER`), and every wrapper runs `names[i]`'s copy (its original module for
        a name it has no copy of). With `tokens`, the batch is packed: one sequence whose token `t` belongs to row
        `tokens[t]` (ValueError where a wrapper would need its rows apart). What was in force before comes back on
        exit."""
        with self._lock:
            index = [self._slots.get(name, 0) for name in names]
            tables, wrappers = self._tables, self._wrappers
            gathered = [t.data.index_select(0, torch.tensor(index, device=t.device)) for t in tables]
        check_packable(tokens, wrappers)
        with kept_rows([layer for t in tables for layer in t.layers], wrappers):
            for table, rows in zip(tables, gathered):
                hand_out(table.layers, rows, tokens)
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
    def _row(self, index: int, vectors: Mapping[str, torch.Tensor] | RawVectors) -> torch.Tensor:
        """Table `index`'s row for `vectors` (checked), ones where they have no vector."""
        keys, table = self._keys[index], self._tables[index]
        if isinstance(vectors, RawVectors):
            row = vectors.row(keys)
            if row is not None:
                return row
            vectors = vectors.tensors()
        return torch.cat(
            [vectors[k].reshape(-1).to(table.device, table.dtype) if k in vectors else self._ones(k) for k in keys]
        )

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
