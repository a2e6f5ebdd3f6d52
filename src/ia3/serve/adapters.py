"""Which adapters are resident: loading on demand, least-recently-used eviction under a budget, pins.

A request names an adapter; `AdapterPool.acquire` makes it resident before the request's rows are queued and holds
it until `release` (when the request is answered or cut off), so an adapter is never evicted while a row of its is
queued or running. Loading is split in two so the decode loop does not wait for the disk:

1. on a loading thread: find the files (`Registry`), read the config and the safetensors weights, check them;
2. evict what the budget asks for, then install: for an adapter whose vectors fit the layers the model has (the
   usual case), a copy into the engine's vector tables on the same loading thread, beside the decode loop; for
   one that needs new layers or trains whole modules (`modules_to_save`), on the worker thread between decode
   steps.

Concurrent requests for one adapter that is not resident wait on one load (`_loading`). A load that fails (a
missing, corrupt or foreign file) fails the requests that waited on it, with a 4xx naming the adapter.

Budgets (`--max-loaded-adapters`, `--max-adapter-mb`) are soft: while more distinct adapters are in use than they
allow, they are exceeded, and the surplus is evicted as soon as its requests end (`release` trims). Pinned adapters
(`--pin`) are loaded at start and never evicted. An explicit unload (`DELETE /v1/adapters/{name}`,
`/v1/unload_lora_adapter`) is the operator's: it unloads at once, and the adapter's queued rows get 404.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ia3.serve.engine import AdapterFiles, Engine, read_adapter
from ia3.serve.errors import ApiError, adapter_not_found
from ia3.serve.registry import HUB_ID_RE, NAME_RE, AdapterInfo, Registry, check_name
from ia3.tuner import BASE_ADAPTER

log = logging.getLogger("ia3.serve")
OnWorker = Callable[[Callable[[], Any]], Awaitable[Any]]


class AdapterPool:
    """The resident adapters of one engine and the policy that keeps them.

    Args:
        registry: names, sources and the loaded set (LRU order).
        engine: installs and deletes adapters (on the worker thread where `Engine.fits` / `needs_worker` say so).
        max_loaded: adapters resident at most (soft, see the module docstring); None: no limit.
        max_bytes: bytes of adapter tensors resident at most (soft); None: no limit.
        pins: adapters never evicted.
        hub_on_demand: a request may name a Hub repo (`owner/name`) to load on demand.
    """

    def __init__(
        self,
        registry: Registry,
        engine: Engine,
        max_loaded: int | None = None,
        max_bytes: int | None = None,
        pins: list[str] | None = None,
        hub_on_demand: bool = False,
    ) -> None:
        self.registry = registry
        self.engine = engine
        self.max_loaded = max_loaded
        self.max_bytes = max_bytes
        self.pins = set(pins or [])
        self.hub_on_demand = hub_on_demand and registry.allow_hub
        self._lock = threading.Lock()
        self._in_use: Counter[str] = Counter()  # rows of queued or running requests, by adapter
        self._loading: dict[str, asyncio.Future] = {}
        self.loads = 0
        self.evictions = 0
        self.load_seconds: list[float] = []  # the last 1000 on-demand loads, read + install

    # -- what is known ---------------------------------------------------------------------------------------------
    def servable(self, name: str) -> bool:
        """Whether a request may name `name`: resident, or loadable on demand (a quick check, no file read)."""
        if name == BASE_ADAPTER or self.registry.has(name):
            return True
        if self.registry.remembered(name) is not None or self.registry.on_disk(name):
            return True
        return self.hub_on_demand and bool(HUB_ID_RE.fullmatch(name)) and ".." not in name

    def in_use(self) -> dict[str, int]:
        """Rows of queued or running requests by adapter (those waiting on a load included)."""
        with self._lock:
            return {name: n for name, n in self._in_use.items() if n > 0}

    # -- requests (event loop) -------------------------------------------------------------------------------------
    async def acquire(self, name: str, rows: int, on_worker: OnWorker) -> None:
        """Make `name` resident (loading it on demand) and hold it for `rows` rows until `release(name, rows)`."""
        if name == BASE_ADAPTER:
            return
        with self._lock:  # held from now, and checked under the lock eviction takes: resident stays resident
            self._in_use[name] += rows
            resident = self.registry.has(name)
        try:
            if not resident:
                await self._load_once(name, on_worker)
            self.registry.touch(name)
        except BaseException:
            self.release(name, rows)
            raise

    def release(self, name: str, rows: int, on_worker: OnWorker | None = None) -> None:
        """`rows` rows of `name` ended; when the pool is over budget, trims it on the worker (fire and forget)."""
        if name == BASE_ADAPTER:
            return
        with self._lock:
            self._in_use[name] -= rows
            if self._in_use[name] <= 0:
                del self._in_use[name]
        if self._over(0, 0):
            self._trim(worker=False)
            if on_worker is not None and self._over(0, 0):  # what is left may need the worker (modules to save)
                asyncio.ensure_future(on_worker(self._trim)).add_done_callback(_log_failure)

    async def _load_once(self, name: str, on_worker: OnWorker) -> None:
        future = self._loading.get(name)
        if future is None:
            future = asyncio.ensure_future(self._load(name, on_worker))
            self._loading[name] = future
            future.add_done_callback(lambda _: self._loading.pop(name, None))
        await asyncio.shield(future)

    async def _load(self, name: str, on_worker: OnWorker) -> None:
        started = time.perf_counter()
        read_and_installed = await asyncio.to_thread(self._read_and_install, name)
        if not isinstance(read_and_installed, dict):  # it needs the worker
            await on_worker(functools.partial(self.install, name, read_and_installed, False))
        self.load_seconds = [*self.load_seconds[-999:], time.perf_counter() - started]
        self.loads += 1

    async def load(self, name: str, folder: Path | None, source: str | None, on_worker: OnWorker) -> dict:
        """An explicit load (`POST /v1/adapters/{name}`, `/v1/load_lora_adapter`): from `folder` (already checked)
        or, when None, from where `name` is found; 409 when it is resident."""
        if self.registry.has(name):
            raise ApiError(409, "adapter_exists", f"Adapter {name!r} is already loaded; DELETE it first")
        if folder is not None:
            assert source is not None
            config = await asyncio.to_thread(self.registry.read_config, folder, name)
            files = await asyncio.to_thread(_read_checked, self.registry, name, folder, config, source)
        else:
            files = await asyncio.to_thread(self.read, name)
        info = await self._install(name, files, True, on_worker)
        if folder is not None and source is not None and not source.startswith("local:"):
            self.registry.remember(name, folder, source)
        return info

    async def unload(self, name: str, on_worker: OnWorker) -> None:
        """An explicit unload: at once (queued rows of `name` get 404); it stays loadable on demand from disk."""
        await on_worker(functools.partial(self._unload_now, name))
        self.registry.forget(name)

    async def _install(self, name: str, files: AdapterFiles, explicit: bool, on_worker: OnWorker) -> dict:
        """`install` on a loading thread when the engine can copy the adapter in beside the decode loop, else on the
        worker."""
        info = await asyncio.to_thread(self._install_beside, name, files, explicit)
        if info is None:
            info = await on_worker(functools.partial(self.install, name, files, explicit))
        return info

    def _read_and_install(self, name: str) -> dict | AdapterFiles:
        """Read adapter `name` and, when it fits the engine's vector tables, install it here (one trip to a loading
        thread); else its files, for the worker to install."""
        files = self.read(name)
        installed = self._install_beside(name, files, False)
        return files if installed is None else installed

    def _install_beside(self, name: str, files: AdapterFiles, explicit: bool) -> dict | None:
        """`install` here (a loading thread) when the adapter fits the engine's vector tables; None when not."""
        return self.install(name, files, explicit, worker=False) if self.engine.fits(files) else None

    # -- loading thread --------------------------------------------------------------------------------------------
    def read(self, name: str) -> AdapterFiles:
        """Find and read adapter `name` (any thread): a remembered source, `root/name`, or a Hub repo."""
        remembered = self.registry.remembered(name)
        if remembered is not None:
            folder, source = remembered
        elif NAME_RE.fullmatch(name):
            folder, source = self.registry.local_folder(name), f"local:{name}"
        elif self.hub_on_demand and "/" in name:
            folder, source = self.registry.hub_folder(name, None), f"hub:{name}"
        else:
            check_name(name)
            raise adapter_not_found(name)
        config = self.registry.read_config(folder, name)
        return _read_checked(self.registry, name, folder, config, source)

    # -- worker thread, a loading thread (`worker=False`), or before the worker starts ---------------------------
    def install(self, name: str, files: AdapterFiles, explicit: bool, worker: bool = True) -> dict:
        """Make room, then install `files` as adapter `name` (a no-op when it became resident meanwhile). Off the
        worker (`worker=False`) only adapters that `Engine.fits` install, and only evictions that need no worker."""
        if self.registry.has(name):
            if explicit:
                raise ApiError(409, "adapter_exists", f"Adapter {name!r} is already loaded; DELETE it first")
            return {}
        self._trim(1, files.nbytes, keep=name, worker=worker)
        try:
            self.engine.install_adapter(name, files)
        except (ValueError, TypeError, KeyError) as err:
            message = self.registry.public_message(err, files.folder, name)
            raise ApiError(422, "adapter_incompatible", f"Adapter {name!r}: {message[:1000]}") from None
        config = files.config
        info = AdapterInfo(
            name, files.source, str(files.folder), config.task_type, config.base_model_name_or_path, nbytes=files.nbytes
        )
        self.registry.add(info)
        return info.public()

    def preload(self, folders: list[tuple[str, Path]]) -> None:
        """At start: the pinned adapters, then the others in name order while the budget allows."""
        order = sorted(folders, key=lambda item: (item[0] not in self.pins, item[0]))
        for name, folder in order:
            pinned = name in self.pins
            if not pinned and self.max_loaded is not None and len(self.registry.names()) >= self.max_loaded:
                continue
            try:
                files = read_adapter(folder, self.registry.read_config(folder, name), f"local:{name}")
                over = self.max_bytes is not None and self.registry.resident_bytes() + files.nbytes > self.max_bytes
                if over and not pinned:
                    continue
                self.install(name, files, False)
            except (ApiError, ValueError) as err:
                log.warning("adapter %s not loaded: %s", name, getattr(err, "message", err))
        missing = sorted(self.pins - set(self.registry.names()))
        if missing:
            raise ValueError(f"--pin names adapters that could not be loaded: {missing}")

    def _over(self, count: int, nbytes: int) -> bool:
        over_count = self.max_loaded is not None and len(self.registry.names()) + count > self.max_loaded
        over_bytes = self.max_bytes is not None and self.registry.resident_bytes() + nbytes > self.max_bytes
        return over_count or over_bytes

    def _trim(self, count: int = 0, nbytes: int = 0, keep: str | None = None, worker: bool = True) -> None:
        """Evict least recently used adapters (not pinned, not in use, not `keep`; off the worker, only those whose
        deletion needs no worker) until `count` more adapters of `nbytes` more bytes fit, or nothing more can go."""
        while self._over(count, nbytes):
            with self._lock:  # chosen and marked gone at once: an `acquire` meanwhile would see it resident
                busy = set(self._in_use) | self.pins | {keep}
                names = (n for n in self.registry.names() if n not in busy)
                victim = next((n for n in names if worker or not self.engine.needs_worker(n)), None)
                if victim is None:
                    return
                self.registry.remove(victim)  # an acquire from now on loads it again, installed after this delete
                in_model = self.engine.needs_worker(victim)
                if not in_model:  # a row of the vector tables: freed here, before any reload can install it
                    self.engine.delete_adapter(victim)
            if in_model:  # on the worker, as is its reload
                self.engine.delete_adapter(victim)
            self.evictions += 1
            log.info("evicted adapter %s (least recently used)", victim)

    def _unload_now(self, name: str) -> None:
        if not self.registry.has(name):
            raise adapter_not_found(name)
        self.engine.delete_adapter(name)
        self.registry.remove(name)


def _read_checked(registry: Registry, name: str, folder: Path, config: Any, source: str) -> AdapterFiles:
    """`read_adapter`, its errors as a 422 naming the adapter (without the server's paths)."""
    try:
        return read_adapter(folder, config, source)
    except (ValueError, OSError) as err:
        message = registry.public_message(err, folder, name)
        raise ApiError(422, "invalid_adapter", f"Adapter {name!r}: {message[:500]}") from None


def _log_failure(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("trimming the adapters failed: %s", future.exception())
