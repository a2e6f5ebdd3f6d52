"""Counters for `GET /metrics`: requests by endpoint and status, batch sizes, adapters per batch, latency."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # batch-size histogram: rows <= bucket


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

    def record_request(self, route: str, status: int, seconds: float | None = None) -> None:
        with self._lock:
            self.requests[(route, status)] += 1
            if seconds is not None:
                self.latencies.append(seconds)

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
            }
