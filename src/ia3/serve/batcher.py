"""Dynamic batching: one worker thread owns the model; requests queue up and are served in shared batches.

A `Job` is one request: some rows (inputs) that all use one adapter, and a `key` saying which requests may share a
batch (same kind and compatible parameters, e.g. the same `max_new_tokens` and `num_beams`). The worker takes the
oldest waiting job, waits up to `max_wait_s` (from that job's arrival) for more rows with the same key, and then
runs up to `max_batch_size` rows, taken in arrival order, in one call, whatever their adapters. A request with more
rows than fit is spread over consecutive batches. Control tasks (loading or deleting an adapter) run on the same
thread between batches, so the model is never changed while it runs.

With a `Decoder` (continuous batching, `ia3.serve.decoding`), generation requests go to it instead (`submit_rows`):
while it has rows, the worker runs one decode step at a time, and between steps the control tasks and, alternating
with the steps, the static batches that are ready (classification, beam search), so neither side starves. A static
batch runs on a thread of its own that the worker hands the model to: a generation batch hands it back after each of
its steps (`Batcher.checkpoint`), so a beam search runs one step at a time between the decode steps instead of
stalling them for its whole length, and ends at its next step once every request in it gave up.

`max_queue` bounds the requests admitted and not yet answered: one more raises `QueueFull` (HTTP 503) at once.
A request that times out or whose client went away is cancelled: its rows not yet taken are dropped, its rows in the
decode batch leave it at the next token, and late results are discarded.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from ia3.serve.decoding import Decoder, Row
from ia3.serve.errors import ApiError, QueueFull, ShuttingDown

log = logging.getLogger("ia3.serve")
_ids = itertools.count()
STEP = "step"  # `_next`'s answer for one decode step of the continuous batch
SLICE = "slice"  # `_next`'s answer for the next step of the static batch in progress
_here = threading.local()  # on a static batch's thread: its `_Slice`


class _Slice:
    """A static batch on its own thread, run a step at a time: `go()` (the worker) runs it until its next
    `pause()` (its own thread, between two steps) or its end. Only one of the two threads runs at any time."""

    def __init__(self, run: Callable[[], None]) -> None:
        self.finished = False
        self.paused_s = 0.0  # time spent paused (not the batch's own)
        self._resume = threading.Event()
        self._paused = threading.Event()
        self._thread = threading.Thread(target=self._main, args=(run,), name="ia3-serve-static", daemon=True)

    def _main(self, run: Callable[[], None]) -> None:
        _here.slice = self
        try:
            run()
        finally:
            self.finished = True
            self._paused.set()

    def go(self) -> None:
        self._paused.clear()
        if self._thread.ident is None:
            self._thread.start()
        else:
            self._resume.set()
        self._paused.wait()

    def pause(self) -> None:
        start = time.perf_counter()
        self._paused.set()
        self._resume.wait()
        self._resume.clear()
        self.paused_s += time.perf_counter() - start


@dataclass(eq=False)
class Job:
    """One request: `rows` (the inputs), their `adapter`, the batching `key` and the parameters `params`."""

    kind: str
    key: Hashable
    rows: list[Any]
    adapter: str
    params: Any = None
    id: int = field(default_factory=lambda: next(_ids))
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    enqueued_at: float = field(default_factory=time.monotonic)
    taken: int = 0  # rows handed to batches so far
    done: int = 0  # rows with a result
    results: list[Any] = field(default_factory=list)
    closed: bool = False  # answered, failed or cancelled
    cost: int = 0  # compute per row (beams x new tokens), for the batch budget
    decoding: list[Row] = field(default_factory=list)  # continuous batching: the job's rows in the decoder


@dataclass
class Batch:
    """Rows of one or more jobs, run in one model call: `items[i] = (job, row index in the job)`."""

    kind: str
    key: Hashable
    items: list[tuple[Job, int]]

    @property
    def rows(self) -> list[Any]:
        return [job.rows[i] for job, i in self.items]

    @property
    def adapters(self) -> list[str]:
        return [job.adapter for job, _ in self.items]

    @property
    def params(self) -> Any:
        return self.items[0][0].params


class Batcher:
    """Queue + worker thread. `run_batch(batch)` returns one result per row (or an exception for that row)."""

    def __init__(
        self,
        run_batch: Callable[[Batch], list[Any]],
        *,
        max_batch_size: int = 32,
        max_wait_s: float = 0.01,
        max_queue: int = 256,
        on_batch: Callable[[Batch, float], None] | None = None,
        decoder: Decoder | None = None,
        max_batch_cost: int | None = None,
    ) -> None:
        self.run_batch = run_batch
        self.decoder = decoder
        self.max_batch_cost = max_batch_cost
        self._static_turn = False  # alternate static batches with decode steps
        self._slice: _Slice | None = None  # the static batch in progress, paused between two of its steps
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()  # jobs with rows not yet taken, in arrival order
        self._control: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._live = 0  # admitted jobs not yet closed
        self._max_live = 0
        self._paused = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="ia3-serve-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker; jobs still queued are failed with 503 (the batch running finishes first)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            stopped = not self._thread.is_alive()
            self._thread = None
            while stopped and self._slice is not None and not self._slice.finished:
                self._slice.go()  # its next checkpoint ends it (stopping), and its requests get their answers
        with self._cond:
            pending = list(self._pending)
            self._pending.clear()
            controls = list(self._control)
            self._control.clear()
        for job in pending:
            self._fail(job, ShuttingDown())
        for _, future in controls:
            if not future.done():
                future.set_exception(ShuttingDown())
        if self.decoder is not None:
            self.decoder.fail_all(ShuttingDown(), waiting=True)

    def alive(self) -> bool:
        """Whether the worker thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def pause(self) -> None:
        """Take no new batch (nor control task) until `resume`; requests keep queueing, within `max_queue`."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    # -- submitting ------------------------------------------------------------------------------------------------
    def submit(self, job: Job) -> concurrent.futures.Future:
        """Queue `job`; its future gets the list of per-row results. Raises `QueueFull` or `ShuttingDown`."""
        if not job.rows:
            raise ValueError("a job needs at least one row")
        with self._cond:
            self._admit(job)
            job.results = [None] * len(job.rows)
            self._pending.append(job)
            self._cond.notify_all()
        return job.future

    def _admit(self, job: Job) -> None:  # with the lock held
        if self._stopping:
            raise ShuttingDown()
        if self._live >= self.max_queue:
            raise QueueFull(self.max_queue)
        self._live += 1
        self._max_live = max(self._max_live, self._live)
        job.enqueued_at = time.monotonic()

    def submit_rows(self, job: Job, rows: list[Row]) -> concurrent.futures.Future:
        """Queue `job` for continuous decoding: its `rows` join the decoder's batch as room frees up. Its future
        gets the rows when every one has finished (each with its text, tokens, finish reason or error).
        Raises `QueueFull` or `ShuttingDown`."""
        if self.decoder is None:
            raise RuntimeError("this batcher has no decoder")
        if not rows:
            raise ValueError("a job needs at least one row")
        with self._cond:
            self._admit(job)
            job.decoding = rows
        for row in rows:
            row.on_done = self._chain(job, row.on_done)
        self.decoder.add(rows)
        with self._cond:
            self._cond.notify_all()
        return job.future

    def _chain(self, job: Job, then: Callable[[Row], None] | None) -> Callable[[Row], None]:
        def done(row: Row) -> None:
            if then is not None:
                then(row)
            with self._cond:
                job.done += 1
                finished = job.done == len(job.decoding) and not job.closed
                if finished:
                    self._close(job)
            if finished and not job.future.done():
                with contextlib.suppress(concurrent.futures.InvalidStateError):
                    job.future.set_result(job.decoding)

        return done

    def cancel(self, job: Job) -> None:
        """Give up on `job` (e.g. its request timed out): rows not yet run are dropped, late results discarded."""
        for row in job.decoding:
            row.cancel()
        if self._withdraw(job):
            job.future.cancel()

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn()` on the worker thread between batches (e.g. change the adapters); its future gets the result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                raise ShuttingDown()
            self._control.append((fn, future))
            self._cond.notify_all()
        return future

    # -- state -----------------------------------------------------------------------------------------------------
    def depth(self) -> int:
        """Requests admitted and not yet answered."""
        with self._cond:
            return self._live

    def stats(self) -> dict:
        running, waiting = self.decoder.counts() if self.decoder is not None else (0, 0)
        with self._cond:
            return {
                "depth": self._live,
                "max_depth": self._max_live,
                "capacity": self.max_queue,
                "pending_rows": sum(len(j.rows) - j.taken for j in self._pending) + waiting,
                "decoding_rows": running,
                "paused": self._paused,
            }

    # -- worker ----------------------------------------------------------------------------------------------------
    def _close(self, job: Job) -> None:  # with the lock held
        if not job.closed:
            job.closed = True
            self._live -= 1

    def _withdraw(self, job: Job) -> bool:
        """Close `job` and take it off the queue; False when it was already closed."""
        with self._cond:
            if job.closed:
                return False
            self._close(job)
            with contextlib.suppress(ValueError):
                self._pending.remove(job)
        return True

    def _fail(self, job: Job, error: BaseException) -> None:
        if not self._withdraw(job):
            return
        if not job.future.done():
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                job.future.set_exception(error)

    def _rows_waiting(self, key: Hashable) -> int:
        return sum(len(j.rows) - j.taken for j in self._pending if j.key == key)

    def _next(self) -> Batch | tuple[Callable[[], Any], concurrent.futures.Future] | str | None:
        """The next thing to run (a batch, a control task or `STEP`: one decode step); None when stopping. Waits
        as needed."""
        with self._cond:
            while True:
                if self._stopping:
                    return None
                decoding = self.decoder is not None and self.decoder.busy()
                if self._paused or (not self._pending and not self._control and not decoding and not self._slice):
                    self._cond.wait()
                    continue
                if self._control:
                    return self._control.popleft()
                if self._slice is not None:  # no new static batch until this one ends
                    if decoding and not self._static_turn:
                        self._static_turn = True
                        return STEP
                    self._static_turn = False
                    return SLICE
                if not self._pending:
                    return STEP
                first = self._pending[0]
                deadline = first.enqueued_at + self.max_wait_s
                now = time.monotonic()
                ready = self._rows_waiting(first.key) >= self.max_batch_size or now >= deadline
                if decoding and (not ready or not self._static_turn):
                    self._static_turn = True
                    return STEP
                if not ready:
                    self._cond.wait(deadline - now)
                    continue  # re-check: the first job may be gone, control may have arrived
                self._static_turn = False
                return self._take(first.key)

    def _take(self, key: Hashable) -> Batch:  # with the lock held
        items: list[tuple[Job, int]] = []
        room = self.max_batch_size
        budget = self.max_batch_cost
        kind = self._pending[0].kind
        for job in list(self._pending):
            if room == 0:
                break
            if job.key != key:
                continue
            n = min(room, len(job.rows) - job.taken)
            if budget is not None and job.cost > 0:
                n = min(n, budget // job.cost) if items else max(1, min(n, budget // job.cost))
                if n == 0:
                    break
                budget -= n * job.cost
            items.extend((job, i) for i in range(job.taken, job.taken + n))
            job.taken += n
            room -= n
            if job.taken == len(job.rows):
                self._pending.remove(job)
        return Batch(kind, key, items)

    def _loop(self) -> None:
        while True:
            item = self._next()
            if item is None:
                return
            if item is STEP:
                self._step()
                continue
            if item is SLICE:
                self._continue_slice()
                continue
            if isinstance(item, tuple):
                fn, future = item
                try:
                    result = fn()
                except BaseException as err:  # the control task failed; the worker goes on
                    future.set_exception(err)
                else:
                    future.set_result(result)
                continue
            self._slice = _Slice(lambda batch=item: self._run(batch))
            self._continue_slice()

    def _continue_slice(self) -> None:
        assert self._slice is not None
        self._slice.go()
        if self._slice.finished:
            self._slice = None

    def checkpoint(self, jobs: list[Job]) -> bool:
        """Between two steps of a static batch (its own thread): hand the model to the worker for a decode step,
        then whether the batch should end (every one of `jobs` gave up, or the server is stopping)."""
        current = getattr(_here, "slice", None)
        if current is not None and not self._stopping:
            current.pause()
        return self._stopping or all(job.closed for job in jobs)

    def _step(self) -> None:
        assert self.decoder is not None
        try:
            self.decoder.step()
        except BaseException as err:  # the model call of the whole decode batch failed: its rows fail
            log.error("decode step failed (%d rows): %s: %s", self.decoder.counts()[0], type(err).__name__, err)
            self.decoder.fail_all(err)

    def _run(self, batch: Batch) -> None:
        live = [(job, i) for job, i in batch.items if not job.closed]
        if not live:
            return
        batch = Batch(batch.kind, batch.key, live)
        start = time.perf_counter()
        try:
            results = self.run_batch(batch)
            if len(results) != len(batch.items):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch.items)} rows")
        except BaseException as err:  # a failed batch fails its requests; the worker goes on
            jobs = list(dict.fromkeys(job for job, _ in batch.items))
            if isinstance(err, ApiError):  # the requests' fault (e.g. labels too long), not the server's
                log.info("batch of %d rows refused: %s", len(batch.items), err.message)
            elif len(jobs) > 1:  # find the request(s) that cause it: each runs alone, the others get answers
                log.warning("batch of %d requests failed (%s); running each alone", len(jobs), type(err).__name__)
                for job in jobs:
                    self._run(Batch(batch.kind, batch.key, [(j, i) for j, i in batch.items if j is job]))
                return
            else:  # each request's handler logs it once, with its request id
                log.debug("batch of %d rows failed", len(batch.items), exc_info=True)
            for job in jobs:
                self._fail(job, err)
            return
        if self.on_batch is not None:
            current = getattr(_here, "slice", None)
            try:
                self.on_batch(batch, time.perf_counter() - start - (current.paused_s if current else 0.0))
            except Exception:  # metrics must never break serving
                log.exception("on_batch hook failed")
        finished: list[Job] = []
        failed: list[tuple[Job, BaseException]] = []
        with self._cond:
            for (job, i), result in zip(batch.items, results):
                if job.closed:
                    continue
                if isinstance(result, BaseException):
                    failed.append((job, result))
                    continue
                job.results[i] = result
                job.done += 1
                if job.done == len(job.rows):
                    self._close(job)
                    finished.append(job)
        for job, error in failed:
            self._fail(job, error)
        for job in finished:
            if not job.future.done():
                with contextlib.suppress(concurrent.futures.InvalidStateError):
                    job.future.set_result(job.results)
