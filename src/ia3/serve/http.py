"""The HTTP layer under the API: connection limits, read deadlines, body limits, error containment, request ids.

* `GuardedH11Protocol` (uvicorn's h11 protocol with deadlines): a connection must send each request's headers within
  `header_timeout_s` (a slow or silent client is answered 408 and closed); at most `max_connections` connections are
  open, and at most `max_connections_per_client` of one peer address (one more gets 503 and is closed at once,
  before it holds a file descriptor for long); kept-alive connections idle for `idle_timeout_s` are closed
  (uvicorn's keep-alive timeout).
* `raise_file_limit` and `listen_backlog`: the descriptor limit, the listen backlog and the connection cap sized
  together, so that a burst of connections accepted at once never makes accept() run out of descriptors below the
  cap (under a hard limit too low for `max_connections`, the cap is lowered, with a warning).
* `OncePerInterval`: a logging filter that lets one "Too many open files" record through per second (with the count
  of those it held back), so a flood of connections cannot flood the log.
* `BodyLimit`: the body is read before the app sees it, within `body_timeout_s` (408) and `max_body_bytes` (413).
* `Guard`: every response carries an `X-Request-Id`; a request cut off by the end of the graceful shutdown gets the
  JSON 503 `shutting_down`; an unexpected exception becomes a 500 JSON answer and one log line with that id, and is not re-raised, so the connection stays open for the client's next request (Starlette's
  outermost error middleware re-raises, which makes uvicorn close the connection).
* `uvicorn_config(app, config, ...)`: the uvicorn settings of a `ServeConfig` (used by `run` and the tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import secrets
import threading
import time
from collections import Counter
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ia3.serve.errors import ApiError, ShuttingDown

log = logging.getLogger("ia3.serve")
FILE_RESERVE = 128  # descriptors kept for everything but connections (model files, logs, the event loop)
MAX_BACKLOG = 2048  # uvicorn's default


def peer_host(transport: asyncio.BaseTransport) -> str:
    """The peer address of a connection (its host, without the port)."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, (tuple, list)) and peer:
        return str(peer[0])
    return str(peer or "unknown")


async def send_json(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def _raw_response(status: int, reason: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + data


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and connection caps, global and per peer address (class
    attributes, set by `uvicorn_config` on a subclass; `client_of(transport)` names a connection's client)."""

    header_timeout_s: float = 10.0
    max_connections: int = 512
    max_connections_per_client: int = 64
    client_of = staticmethod(peer_host)
    per_client: Counter[str] = Counter()  # open connections by client (a fresh Counter per subclass)
    refused = 0  # connections closed at once because of a cap (for metrics)
    refused_per_client = 0  # of which because of the per-client cap
    header_timeouts = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._client = type(self).client_of(transport)
        self.per_client[self._client] += 1
        mine = self.per_client[self._client] > self.max_connections_per_client
        if mine or len(self.connections) > self.max_connections:
            type(self).refused += 1
            type(self).refused_per_client += mine
            what = "open connections from this address" if mine else "open connections"
            body = ApiError(503, "overloaded", f"Too many {what}; retry shortly").body()
            transport.write(_raw_response(503, "Service Unavailable", body))
            transport.close()
            return
        self._arm()

    def _arm(self) -> None:
        if getattr(self, "_header_timer", None) is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _waiting_for_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not self._waiting_for_headers():
            return
        type(self).header_timeouts += 1
        if self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]:
            self.transport.close()  # nothing sent at all: just close, like an idle keep-alive connection
            return
        body = ApiError(408, "request_timeout", f"Request headers not received within {self.header_timeout_s:g} s")
        self.transport.write(_raw_response(408, "Request Timeout", body.body()))
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._waiting_for_headers():
            self._arm()  # a new request starts: its headers have a deadline (the first byte does not reset it)
        super().data_received(data)

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:  # a request's headers arrived
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()  # the idle (keep-alive) timer takes over until the next request's first byte

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        client = getattr(self, "_client", None)
        if client is not None:
            self._client = None
            self.per_client[client] -= 1
            if self.per_client[client] <= 0:
                del self.per_client[client]
        super().connection_lost(exc)


class OncePerInterval(logging.Filter):
    """Lets through one record per `interval_s` among those that report running out of file descriptors
    ("Too many open files", EMFILE/ENFILE from accept()), and notes how many it held back since; other records
    pass. Installed on the `asyncio` and `uvicorn.error` loggers by `uvicorn_config`."""

    MARKS = ("too many open files", "out of system resource")

    def __init__(self, interval_s: float = 1.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.suppressed = 0
        self._last = float("-inf")
        self._lock = threading.Lock()

    @classmethod
    def matches(cls, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        if isinstance(err, OSError) and err.errno in (errno.EMFILE, errno.ENFILE):
            return True
        text = record.getMessage().lower()
        return any(mark in text for mark in cls.MARKS)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.matches(record):
            return True
        now = time.monotonic()
        with self._lock:
            if now - self._last < self.interval_s:
                self.suppressed += 1
                return False
            self._last, held, self.suppressed = now, self.suppressed, 0
        err = record.exc_info[1] if record.exc_info else None
        record.msg = f"{record.getMessage()}{': ' + str(err) if err else ''} ({held} more like it held back)"
        record.args, record.exc_info, record.exc_text = (), None, None  # one line, not a traceback
        return True


def install_log_limit(interval_s: float = 1.0) -> None:
    """Put one `OncePerInterval` filter on the loggers that report accept() failures (once per process)."""
    for name in ("asyncio", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, OncePerInterval) for f in logger.filters):
            logger.addFilter(OncePerInterval(interval_s))


def raise_file_limit(max_connections: int) -> int | None:
    """Raise the soft descriptor limit toward what `max_connections` connections, a full listen backlog of refused
    ones and the server's own files need (up to the hard limit); the soft limit now (None: no limit or unknown)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        need = max_connections + MAX_BACKLOG + FILE_RESERVE
        if soft != resource.RLIM_INFINITY and soft < need:
            target = need if hard == resource.RLIM_INFINITY else min(need, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return None if soft == resource.RLIM_INFINITY else soft
    except (ImportError, ValueError, OSError):  # not on this platform
        return None


def listen_backlog(max_connections: int, file_limit: int | None) -> tuple[int, int]:
    """(listen backlog, connection cap) for `max_connections` under `file_limit` descriptors. The event loop accepts
    up to a backlog's worth of connections at once before the cap closes the extra ones, so the cap, the backlog
    and the reserve must fit in the limit together, else accept() fails with EMFILE below the cap: the backlog
    shrinks first (to 16), then the cap (with a warning)."""
    if file_limit is None:
        return MAX_BACKLOG, max_connections
    backlog = max(16, min(MAX_BACKLOG, file_limit - max_connections - FILE_RESERVE))
    cap = max(1, min(max_connections, file_limit - FILE_RESERVE - backlog))
    if cap < max_connections:
        log.warning(
            "--max-connections %d lowered to %d: the file limit is %d (raise ulimit -n)",
            max_connections,
            cap,
            file_limit,
        )
    return backlog, cap


class BodyLimit:
    """Reads the request body before the app sees it: at most `max_bytes` (413) within `timeout_s` (408)."""

    DRAIN_LIMIT = 64 * 1024 * 1024  # read (and drop) up to this much of a refused body, so the client sees the 413

    def __init__(self, app, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def _drain(self, receive, size: int, deadline: float) -> None:
        # closing a connection with unread data makes the kernel reset it, and the client may lose the answer
        while size <= self.DRAIN_LIMIT:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
            except TimeoutError:
                return
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = time.monotonic() + self.timeout_s
        too_large = ApiError(413, "body_too_large", f"Request body exceeds {self.max_bytes} bytes")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await send_json(send, 400, ApiError(400, "invalid_request", "Bad Content-Length").body())
                return
            if size > self.max_bytes:
                if size <= self.DRAIN_LIMIT:
                    await self._drain(receive, 0, deadline)
                await send_json(send, 413, too_large.body(), {"connection": "close"})
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
            except TimeoutError:
                late = ApiError(408, "request_timeout", f"Request body not received within {self.timeout_s:g} s")
                await send_json(send, 408, late.body(), {"connection": "close"})
                return
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                if message.get("more_body", False):
                    await self._drain(receive, size, deadline)
                await send_json(send, 413, too_large.body(), {"connection": "close"})
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class Guard:
    """Request ids and error containment (see the module docstring)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = "req-" + secrets.token_hex(6)
        scope.setdefault("state", {})["request_id"] = rid
        started = False

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            # uvicorn cancels the requests still running at the end of the graceful shutdown: answer the documented
            # 503 (or end a started stream) instead of letting uvicorn log a traceback and answer a plain-text 500
            log.warning("%s %s %s cut off by the shutdown", rid, scope.get("method"), scope.get("path"))
            with contextlib.suppress(Exception):
                if not started:
                    await send_json(send, 503, ShuttingDown().body(), {"x-request-id": rid, "connection": "close"})
                else:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
        except Exception as err:
            log.error("%s %s %s failed: %s: %s", rid, scope.get("method"), scope.get("path"), type(err).__name__, err)
            log.debug("%s traceback", rid, exc_info=True)
            if not started:
                body = ApiError(500, "internal_error", f"Internal error (request id {rid}); the server goes on")
                await send_json(send, 500, body.body(), {"x-request-id": rid})


def uvicorn_config(app, config, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **kwargs):
    """The `uvicorn.Config` that serves `app` with the limits of `config` (a `ServeConfig`)."""
    import uvicorn

    backlog, cap = listen_backlog(config.max_connections, _file_limit())
    protocol = type(
        "Protocol",
        (GuardedH11Protocol,),
        {
            "header_timeout_s": config.header_timeout_s,
            "max_connections": cap,
            "max_connections_per_client": config.max_connections_per_client,
            "per_client": Counter(),
        },
    )
    app.state.protocol = protocol
    install_log_limit()
    kwargs.setdefault("backlog", backlog)
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=protocol,
        timeout_keep_alive=max(1, round(config.idle_timeout_s)),
        timeout_graceful_shutdown=max(1, round(config.shutdown_timeout_s)),
        server_header=False,
        **kwargs,
    )


def _file_limit() -> int | None:
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return None if soft == resource.RLIM_INFINITY else soft
    except (ImportError, ValueError, OSError):
        return None
