"""Adapter names, where an adapter's files may come from, and what is loaded.

Names match `NAME_RE` (letters, digits, `_` and `-`, starting with a letter or digit, at most 64 characters): no
dots, slashes or `..`, so a name is always one folder below the adapters root, and its resolved path (symlinks
followed) must stay inside the root. Only `adapter_model.safetensors` is read, never a pickled `.bin`.

The loaded adapters are kept in least-recently-used order (`touch` moves one to the end); an adapter loaded from
somewhere other than `root/name` (a Hub repo, a `lora_path`) is remembered, so that it can be loaded again on demand
after an eviction.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from ia3.config import CONFIG_NAME, IA3Config
from ia3.serialization import PICKLE_WEIGHTS_NAME, WEIGHTS_NAME
from ia3.serve.errors import ApiError
from ia3.tasks import Task
from ia3.tuner import BASE_ADAPTER

log = logging.getLogger("ia3.serve")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
HUB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
REVISION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./-]{0,127}")


def _plain(path: Path) -> bool:
    """Whether `path` exists and is no symbolic link (one `lstat`)."""
    try:
        return not stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


def check_name(name: str) -> str:
    """`name` if it is a valid adapter name, else a 422 ApiError (`__base__` is reserved)."""
    if name == BASE_ADAPTER:
        raise ApiError(422, "invalid_adapter_name", f"{BASE_ADAPTER!r} is reserved for the base model")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ApiError(
            422,
            "invalid_adapter_name",
            f"Invalid adapter name {str(name)[:80]!r}: use 1-64 letters, digits, "
            "'_' or '-', starting with a letter or digit",
        )
    return name


@dataclass
class AdapterInfo:
    name: str
    source: str
    path: str
    task_type: str | None
    base_model: str | None
    loaded_at: float = field(default_factory=time.time)
    nbytes: int = 0

    def public(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "task_type": self.task_type,
            "base_model": self.base_model,
            "loaded_at": self.loaded_at,
            "bytes": self.nbytes,
        }


class Registry:
    """Where adapters come from (`root`, the Hub) and which are loaded (updated by the model's worker thread)."""

    def __init__(self, root: str | None, task: type[Task], allow_hub: bool = True) -> None:
        self.root = Path(root).resolve() if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise ValueError(f"adapters folder {root} does not exist or is not a folder")
        self.task = task
        self.allow_hub = allow_hub
        self._lock = threading.Lock()
        self._loaded: OrderedDict[str, AdapterInfo] = OrderedDict()  # least recently used first
        self._sources: dict[str, tuple[Path, str]] = {}  # adapters not at root/name: (folder, source)

    # -- what is loaded --------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """The loaded adapters, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def touch(self, name: str) -> None:
        """Mark `name` as just used (the end of the LRU order)."""
        with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)

    def resident_bytes(self) -> int:
        with self._lock:
            return sum(info.nbytes for info in self._loaded.values())

    def has(self, name: str) -> bool:
        with self._lock:
            return name in self._loaded

    def infos(self) -> list[dict]:
        with self._lock:
            return [info.public() for info in self._loaded.values()]

    def add(self, info: AdapterInfo) -> None:
        with self._lock:
            self._loaded[info.name] = info

    def remove(self, name: str) -> None:
        with self._lock:
            self._loaded.pop(name, None)

    # -- where adapters come from ----------------------------------------------------------------------------------
    def remember(self, name: str, folder: Path, source: str) -> None:
        """Load `name` from `folder` (not `root/name`) whenever it is loaded again on demand."""
        with self._lock:
            self._sources[name] = (folder, source)

    def forget(self, name: str) -> None:
        with self._lock:
            self._sources.pop(name, None)

    def remembered(self, name: str) -> tuple[Path, str] | None:
        with self._lock:
            return self._sources.get(name)

    def on_disk(self, name: str) -> bool:
        """Whether `root/name` looks like a loadable adapter (a quick check; `local_folder` checks fully)."""
        if self.root is None or not NAME_RE.fullmatch(name):
            return False
        return (self.root / name / WEIGHTS_NAME).is_file()

    def available(self, limit: int = 100_000) -> list[str]:
        """Names of the adapter folders under the root (at most `limit`), sorted; not checked beyond their name and
        weights file."""
        if self.root is None:
            return []
        names = []
        for child in sorted(self.root.iterdir()):
            if NAME_RE.fullmatch(child.name) and (child / WEIGHTS_NAME).is_file():
                names.append(child.name)
                if len(names) >= limit:
                    break
        return names

    def path_folder(self, path: str, anywhere: bool = False) -> Path:
        """The checked folder of a `lora_path`: it (and the files read there) must resolve inside the root unless
        `anywhere` (403 otherwise; 404 when it is not an adapter folder)."""
        if not isinstance(path, str) or not path or "\x00" in path:
            raise ApiError(422, "invalid_request", "lora_path must be a folder path", param="lora_path")
        folder = Path(path)
        if not folder.is_absolute() and self.root is not None:
            folder = self.root / folder
        if not anywhere:
            if self.root is None:
                raise ApiError(403, "forbidden_path", "This server has no adapters folder; lora_path is refused")
            target = folder.resolve()
            files = [target, *((folder / item).resolve() for item in (CONFIG_NAME, WEIGHTS_NAME))]
            if target == self.root or not all(f.is_relative_to(self.root) for f in files):
                raise ApiError(403, "forbidden_path", "lora_path must be a folder inside the adapters folder")
        if not folder.is_dir():
            raise ApiError(404, "adapter_not_found", "lora_path is not a folder", param="lora_path")
        self._check_files(folder, folder.name)
        return folder

    def startup_folders(self) -> list[tuple[str, Path]]:
        """(name, folder) for every subfolder of the root that looks like an adapter, sorted by name."""
        if self.root is None:
            return []
        found = []
        for child in sorted(self.root.iterdir()):
            if not child.is_dir() or not ((child / WEIGHTS_NAME).is_file() or (child / PICKLE_WEIGHTS_NAME).is_file()):
                continue
            if not NAME_RE.fullmatch(child.name):
                log.warning(
                    "skipping adapter folder %r: not a valid adapter name (letters, digits, '_', '-')", child.name
                )
            elif not (child / WEIGHTS_NAME).is_file():
                log.warning(
                    "skipping adapter folder %r: only a pickled %s (safetensors only)", child.name, PICKLE_WEIGHTS_NAME
                )
            elif self._outside(child):
                log.warning("skipping adapter folder %r: %s leads outside the adapters folder", *self._outside(child))
            else:
                found.append((child.name, child))
        return found

    def _outside(self, folder: Path) -> tuple[str, str] | None:
        """(name, what) when `folder` or one of the files the server reads there resolves (symlinks followed) to
        outside the root; None when all stay inside (a folder symlinked to another folder inside is fine). A plain
        folder right under the root and plain files in it are inside as they are: one `lstat` each, where resolving
        every path takes one per component (each system call lets go of the GIL, which a burst of loads waits for)."""
        assert self.root is not None
        name = folder.name
        if not (folder.parent == self.root and name not in ("", ".", "..") and _plain(folder)):
            target = folder.resolve()
            if target == self.root or not target.is_relative_to(self.root):
                return name, "its folder"
        for item in (CONFIG_NAME, WEIGHTS_NAME):
            path = folder / item
            if not _plain(path) and not path.resolve().is_relative_to(self.root):
                return name, f"{name}/{item}"
        return None

    def local_folder(self, name: str) -> Path:
        """The checked folder of adapter `name` under the root (404 when absent, 403 when it or its files lead
        outside)."""
        check_name(name)
        if self.root is None:
            raise ApiError(404, "adapter_not_found", "This server has no adapters folder; give a Hub id as 'source'")
        folder = self.root / name
        outside = self._outside(folder) if folder.is_symlink() or folder.exists() else None
        if outside is not None:
            what = f"Adapter folder {name!r}" if outside[1] == "its folder" else outside[1]
            raise ApiError(403, "forbidden_path", f"{what} leads outside the adapters folder")
        if not folder.is_dir():
            raise ApiError(404, "adapter_not_found", f"No adapter folder {name!r} in the adapters folder")
        self._check_files(folder, name)
        return folder

    def public_message(self, err: BaseException, folder: Path, label: str) -> str:
        """`err`'s message without the server's paths: the adapter's folder as `label`, the root as `adapters`."""
        text = str(err)
        places = {str(folder.resolve()): label, str(folder): label}
        if self.root is not None:
            places[str(self.root)] = "adapters"
        for path, name in sorted(places.items(), key=lambda p: -len(p[0])):
            text = text.replace(path, name)
        return text

    def _check_files(self, folder: Path, label: str) -> None:
        if not (folder / WEIGHTS_NAME).is_file():
            if (folder / PICKLE_WEIGHTS_NAME).is_file():
                raise ApiError(
                    422,
                    "unsupported_format",
                    f"Adapter {label!r} has only a pickled {PICKLE_WEIGHTS_NAME}; "
                    f"the server loads {WEIGHTS_NAME} only (convert it to safetensors)",
                )
            raise ApiError(404, "adapter_not_found", f"Adapter {label!r} has no {WEIGHTS_NAME}")
        if not (folder / CONFIG_NAME).is_file():
            raise ApiError(404, "adapter_not_found", f"Adapter {label!r} has no {CONFIG_NAME}")

    def hub_folder(self, repo_id: str, revision: str | None) -> Path:
        """Download the adapter files of Hub repo `repo_id` (config and safetensors only); the local snapshot."""
        if not self.allow_hub:
            raise ApiError(403, "hub_disabled", "Loading adapters from the Hub is disabled on this server")
        if not isinstance(repo_id, str) or not HUB_ID_RE.fullmatch(repo_id) or ".." in repo_id:
            raise ApiError(422, "invalid_source", f"Invalid Hub id {str(repo_id)[:100]!r}: expected 'owner/name'")
        if revision is not None and (not REVISION_RE.fullmatch(revision) or ".." in revision):
            raise ApiError(422, "invalid_source", f"Invalid revision {revision[:100]!r}")
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]))
        except Exception as err:  # offline, unknown repo, network: the client learns why, the server goes on
            missing = type(err).__name__ in (
                "RepositoryNotFoundError",
                "RevisionNotFoundError",
                "LocalEntryNotFoundError",
                "EntryNotFoundError",
                "GatedRepoError",
            )
            raise ApiError(
                404 if missing else 502,
                "adapter_not_found" if missing else "hub_error",
                f"Could not fetch {repo_id!r} from the Hub: {type(err).__name__}: {str(err)[:300]}",
            ) from None
        self._check_files(folder, repo_id)
        return folder

    def read_config(self, folder: Path, label: str) -> IA3Config:
        """The adapter's config, checked against the served task."""
        try:
            config = IA3Config.from_pretrained(folder)
        except (ValueError, OSError) as err:
            message = self.public_message(err, folder, label)
            raise ApiError(422, "invalid_adapter", f"Adapter {label!r}: {message[:500]}") from None
        want = self.task.peft_task_type
        if config.task_type not in (None, want):
            raise ApiError(
                422,
                "adapter_incompatible",
                f"Adapter {label!r} is for task {config.task_type}; this server serves {self.task.name} ({want})",
            )
        return config
