"""Training checkpoints: adapter + optimizer + scheduler + RNG + position in the data, written atomically.

A checkpoint is a folder `checkpoints/step-<N>` built under a temporary name and renamed into place, and
`checkpoints/latest` (written atomically) names the newest one; a crash at any moment leaves the previous
checkpoint intact. Tensors go to safetensors and the rest to JSON: loading never unpickles.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ia3.serialization import atomic_write_text, load_tensors, save_tensors

if TYPE_CHECKING:
    from torch.optim.lr_scheduler import LRScheduler

    from ia3 import PeftModel

LATEST = "latest"
KEEP = 2


def _optimizer_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            tensors[f"state.{index}.{name}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    return tensors, {"param_groups": state["param_groups"]}


def save_checkpoint(
    root: Path,
    step: int,
    peft_model: PeftModel,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler,
    progress: dict,
    adapter_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict | None = None,
) -> Path:
    """Write checkpoint `step` under `root` and point `root/latest` at it; keeps the newest `KEEP`.

    `adapter_state` / `optimizer_state`: whole tensors gathered from sharded ones (`ia3.recipe.sharding`), written
    instead of the live parameters and `optimizer.state_dict()`."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    # half-written checkpoints (and `latest` temp files) of a run killed mid-save; one process writes here
    for stale in [*root.glob(".tmp-step-*"), *root.glob(f".{LATEST}.*.tmp")]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    tmp.mkdir()
    peft_model.save_pretrained(tmp / "adapter", state_dict=adapter_state)
    tensors, opt_meta = _optimizer_tensors(optimizer_state if optimizer_state is not None else optimizer.state_dict())
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    save_tensors(tensors, tmp / "trainer_state.safetensors")
    meta = {"step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict(), **progress}
    atomic_write_text(tmp / "trainer_state.json", json.dumps(meta, indent=1, default=float))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(root / LATEST, final.name + "\n")
    prune_checkpoints(root)
    return final


def prune_checkpoints(root: Path) -> None:
    """Delete all but the newest `KEEP` checkpoint folders under `root` (the checkpoints folder)."""
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path: Path) -> Path | None:
    """The checkpoint folder `path` names: a `step-*` folder, a `checkpoints` folder or a run's output folder."""
    for candidate in (path, path / "checkpoints"):
        if (candidate / "trainer_state.json").is_file():
            return candidate
        latest = candidate / LATEST
        if latest.is_file():
            target = candidate / latest.read_text().strip()
            if (target / "trainer_state.json").is_file():
                return target
    return None


def load_checkpoint(
    folder: Path, peft_model: PeftModel, optimizer: torch.optim.Optimizer, scheduler: LRScheduler
) -> dict:
    """Restore adapter weights, optimizer, scheduler and RNG; returns the saved progress dict."""
    load_adapter_weights(folder, peft_model)
    return load_trainer_state(folder, optimizer, scheduler)


def load_adapter_weights(folder: Path, peft_model: PeftModel) -> None:
    """The checkpoint's adapter into `peft_model` (before any sharding: the tensors are whole)."""
    from ia3.serialization import WEIGHTS_NAME

    peft_model.load_adapter_state_dict(load_tensors(folder / "adapter" / WEIGHTS_NAME), "default", str(folder))


def load_trainer_state(folder: Path, optimizer: torch.optim.Optimizer, scheduler: LRScheduler) -> dict:
    """Restore optimizer (cut into shards where its parameters are sharded), scheduler and RNG; returns the saved
    progress dict."""
    from ia3.recipe.sharding import shard_optimizer_state

    meta = json.loads((folder / "trainer_state.json").read_text())
    tensors = load_tensors(folder / "trainer_state.safetensors")
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    whole = {"state": state, "param_groups": meta["optimizer"]["param_groups"]}
    optimizer.load_state_dict(shard_optimizer_state(whole, optimizer))
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if states:
            torch.cuda.set_rng_state_all(states)
    return meta
