"""Full trainable copies of whole modules (e.g. a new classification head), one per adapter."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class ModulesToSaveWrapper(nn.Module):
    """Holds the original module and one trainable copy per adapter; state-dict keys as in PEFT
    (`<path>.original_module.*`, `<path>.modules_to_save.<adapter>.*`)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self._row_adapters: list[str] | None = None  # per-example adapters, one name per batch row

    def add_adapter(self, adapter_name: str) -> None:
        """Add a trainable copy of the original module for `adapter_name`."""
        copy_ = copy.deepcopy(self.original_module)
        copy_.requires_grad_(True)
        self.modules_to_save[adapter_name] = copy_

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop `adapter_name`'s copy (if any); the original module runs when it was the active one."""
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def set_active(self, adapter_names: list[str]) -> None:
        """The first of `adapter_names` that has a copy here becomes active (the original module when none)."""
        self.active_adapter = next((n for n in adapter_names if n in self.modules_to_save), None)

    @property
    def row_adapters(self) -> list[str] | None:
        """The per-row adapter names in force (`set_row_adapters`), None when the active adapter applies."""
        return self._row_adapters

    def set_row_adapters(self, adapter_names: list[str] | None) -> None:
        """Give each batch row its own adapter's copy (one name per row); None returns to `active_adapter`."""
        self._row_adapters = adapter_names

    def module_for(self, adapter_name: str | None) -> nn.Module:
        """The module that runs for `adapter_name`: its copy, or the original when it has none or is disabled."""
        if self.disabled or adapter_name is None or adapter_name not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[adapter_name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The active adapter's copy (or per-example copies, row by row) applied to `x` of shape `(batch, ...)`."""
        rows = self._row_adapters
        if rows is None or self.disabled:
            return self.module_for(self.active_adapter)(x, *args, **kwargs)
        # Per-example adapters: a full module per adapter cannot be gathered like a vector, so each adapter's copy
        # runs on its own rows (usually a small head, run once per distinct adapter in the batch).
        batch = x.shape[0]
        if batch % len(rows):
            raise ValueError(f"adapter_names gives {len(rows)} rows but {type(self).__name__} sees a batch of {batch}")
        repeat = batch // len(rows)
        names = [n for n in rows for _ in range(repeat)]
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(name, []).append(i)
        if len(groups) == 1:
            return self.module_for(names[0])(x, *args, **kwargs)
        out = None
        for name, idx in groups.items():
            index = torch.tensor(idx, device=x.device)
            part = self.module_for(name)(x.index_select(0, index), *args, **kwargs)
            if not isinstance(part, torch.Tensor):
                raise TypeError("per-example adapters through modules_to_save need a module that returns a tensor")
            if out is None:
                out = part.new_empty((batch,) + part.shape[1:])
            out.index_copy_(0, index, part)
        return out
