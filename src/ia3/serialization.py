"""Crash-safe file writes and checked loading of adapter weights (safetensors; pickle only on request)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Write a file so that `path` always holds either the old content or the whole new one.

    `write` fills a temporary file in the same folder; it is flushed to disk and renamed over `path`, so a crash
    (even SIGKILL) at any point never leaves a truncated file at `path`.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_tensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Save tensors as safetensors, atomically. Tensors are made contiguous and moved to the CPU first."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, safetensors_bytes(cpu, metadata={"format": "pt", **(metadata or {})}))


def load_tensors(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load adapter tensors from a `.safetensors` file (or a pickled `.bin` when `allow_pickle=True`).

    Raises:
        ValueError: the file is truncated, corrupt, not safetensors, or a pickle the caller did not allow.
    """
    path = Path(path)
    if path.suffix == ".bin":
        if not allow_pickle:
            raise ValueError(
                f"{path} is a pickled PyTorch file; unpickling can run arbitrary code, so ia3 refuses it by default. "
                "Convert it to safetensors, or pass allow_pickle=True if you trust its source."
            )
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ValueError(f"{path} does not hold a dict of tensors")
        return obj
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                out[key] = handle.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        size = path.stat().st_size if path.exists() else 0
        raise ValueError(
            f"{path} is not a valid safetensors file ({size} bytes; {err}). It may be truncated or corrupt: "
            "save or download the adapter again."
        ) from None
    return out
