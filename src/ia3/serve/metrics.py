"""Counters for `GET /metrics`: requests by route and status, tokens and requests per adapter, batch sizes,
adapters per batch, decode steps, latency. `prometheus(...)` renders them in Prometheus' text format (what
`GET /metrics` answers); `snapshot()` is the JSON view (`GET /metrics?format=json`)."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # batch-size histogram: rows <= bucket
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # seconds


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = (len(sorted_values) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


class Metrics:
    """Thread-safe counters; latency percentiles over the last `window` answered inference requests."""

    def __init__(self, window: int = 10_000) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.latencies: deque[float] = deque(maxlen=window)
        self.batches = 0
        self.batch_rows = 0
        self.batch_requests = 0
        self.max_batch = 0
        self.histogram: Counter[int] = Counter()
        self.multi_adapter_batches = 0
        self.max_adapters = 0
        self.batch_seconds = 0.0
        self.prompt_tokens: Counter[str] = Counter()  # by adapter
        self.completion_tokens: Counter[str] = Counter()
        self.adapter_requests: Counter[str] = Counter()
        self.latency_buckets: Counter[float] = Counter()
        self.latency_sum = 0.0
        self.latency_count = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last minute, for tokens/s
        self.labels: dict[str, str] = {}  # added to every sample (a Ray Serve replica: {"replica": its id})

    def record_request(self, route: str, status: int, seconds: float | None = None) -> None:
        with self._lock:
            self.requests[(route, status)] += 1
            if seconds is not None:
                self.latencies.append(seconds)
                self.latency_sum += seconds
                self.latency_count += 1
                for bound in LATENCY_BUCKETS:
                    if seconds <= bound:
                        self.latency_buckets[bound] += 1

    def record_tokens(self, adapter: str, prompt: int, completion: int) -> None:
        """One generation request of `adapter` answered (or cut off) with these token counts."""
        now = time.monotonic()
        with self._lock:
            self.adapter_requests[adapter] += 1
            self.prompt_tokens[adapter] += prompt
            self.completion_tokens[adapter] += completion
            self._recent.append((now, completion))
            while self._recent and self._recent[0][0] < now - 60:
                self._recent.popleft()

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last minute (or since start, if sooner)."""
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - 60:
                self._recent.popleft()
            total = sum(n for _, n in self._recent)
        span = min(60.0, max(time.time() - self.started, 1e-3))
        return total / span

    def record_batch(self, rows: int, requests: int, adapters: int, seconds: float) -> None:
        bucket = next((b for b in BUCKETS if rows <= b), BUCKETS[-1] * 2)
        with self._lock:
            self.batches += 1
            self.batch_rows += rows
            self.batch_requests += requests
            self.max_batch = max(self.max_batch, rows)
            self.histogram[bucket] += 1
            self.max_adapters = max(self.max_adapters, adapters)
            self.multi_adapter_batches += adapters > 1
            self.batch_seconds += seconds

    def snapshot(self) -> dict:
        with self._lock:
            by_route: dict[str, dict[str, int]] = {}
            for (route, status), n in sorted(self.requests.items()):
                by_route.setdefault(route, {})[str(status)] = n
            lat = sorted(self.latencies)
            ms = {
                f"p{int(q * 100)}": (None if (v := _percentile(lat, q)) is None else round(v * 1000, 3))
                for q in (0.5, 0.9, 0.99)
            }
            return {
                **self.labels,
                "uptime_s": round(time.time() - self.started, 3),
                "requests": {"total": sum(self.requests.values()), "by_route": by_route},
                "batches": {
                    "count": self.batches,
                    "rows": self.batch_rows,
                    "requests": self.batch_requests,
                    "mean_size": round(self.batch_rows / self.batches, 3) if self.batches else None,
                    "max_size": self.max_batch,
                    "histogram": {f"<={b}": self.histogram[b] for b in sorted(self.histogram)},
                    "multi_adapter": self.multi_adapter_batches,
                    "max_adapters": self.max_adapters,
                    "busy_s": round(self.batch_seconds, 4),
                },
                "latency_ms": {"count": len(lat), **ms, "mean": round(1000 * sum(lat) / len(lat), 3) if lat else None},
                "tokens": {
                    "prompt": sum(self.prompt_tokens.values()),
                    "completion": sum(self.completion_tokens.values()),
                    "by_adapter": {
                        a: {
                            "requests": self.adapter_requests[a],
                            "prompt": self.prompt_tokens[a],
                            "completion": self.completion_tokens[a],
                        }
                        for a in sorted(self.adapter_requests)
                    },
                },
            }

    def prometheus(
        self,
        gauges: dict[str, tuple[str, float]],
        counters: dict[str, tuple[str, float]] | None = None,
        labeled: dict[str, tuple[str, list[tuple[dict[str, str], float]]]] | None = None,
    ) -> str:
        """Prometheus text exposition (format 0.0.4) of the counters, plus `gauges` and `counters` kept elsewhere
        ({name: (help, value)}) and `labeled` gauges ({name: (help, [(labels, value), ...])})."""
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, samples: list[tuple[dict[str, str], float]]) -> None:
            lines.append(f"# HELP ia3_{name} {help}")
            lines.append(f"# TYPE ia3_{name} {kind}")
            for labels, value in samples:
                tags = ",".join(f'{k}="{_escape(v)}"' for k, v in {**self.labels, **labels}.items())
                lines.append(f"ia3_{name}{{{tags}}} {_number(value)}" if tags else f"ia3_{name} {_number(value)}")

        with self._lock:
            metric(
                "requests_total",
                "counter",
                "HTTP requests by route and status",
                [({"route": r, "status": str(c)}, n) for (r, c), n in sorted(self.requests.items())],
            )
            for name, table, help in (
                ("adapter_requests_total", self.adapter_requests, "generation requests by adapter"),
                ("prompt_tokens_total", self.prompt_tokens, "prompt tokens of generation requests by adapter"),
                ("completion_tokens_total", self.completion_tokens, "generated tokens by adapter"),
            ):
                metric(name, "counter", help, [({"adapter": a}, n) for a, n in sorted(table.items())])
            metric("batches_total", "counter", "static batches run", [({}, self.batches)])
            metric("batch_rows_total", "counter", "rows in static batches", [({}, self.batch_rows)])
            metric(
                "busy_seconds_total",
                "counter",
                "seconds the worker spent in static batches",
                [({}, self.batch_seconds)],
            )
            lines.append("# HELP ia3_request_duration_seconds latency of answered generate/classify requests")
            lines.append("# TYPE ia3_request_duration_seconds histogram")
            own = "".join(f'{k}="{_escape(v)}",' for k, v in self.labels.items())
            for bound in LATENCY_BUCKETS:  # each observation was counted in every bucket it fits: cumulative
                lines.append(
                    f'ia3_request_duration_seconds_bucket{{{own}le="{bound:g}"}} {self.latency_buckets[bound]}'
                )
            lines.append(f'ia3_request_duration_seconds_bucket{{{own}le="+Inf"}} {self.latency_count}')
            tail = f"{{{own[:-1]}}}" if own else ""
            lines.append(f"ia3_request_duration_seconds_sum{tail} {self.latency_sum:g}")
            lines.append(f"ia3_request_duration_seconds_count{tail} {self.latency_count}")
        for name, (help, value) in (counters or {}).items():
            metric(name, "counter", help, [({}, value)])
        for name, (help, value) in gauges.items():
            metric(name, "gauge", help, [({}, value)])
        for name, (help, samples) in (labeled or {}).items():
            metric(name, "gauge", help, samples)
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    """`value` as Prometheus reads it: `%g`, except a large value (a Unix time) in full."""
    return f"{value:g}" if abs(value) < 1e6 else repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
