"""Prometheus metrics (prometheus-client) and the rolling latency window behind ``/dashboard``.

With several worker processes, set ``PROMETHEUS_MULTIPROC_DIR`` (``pam serve --workers N`` does)
and ``/metrics`` aggregates every worker's files.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

NO_COMBINATION = "none"  # label of requests refused before a combination was known
_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025,
            0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUESTS = Counter("pam_requests_total", "Inference requests, by combination and HTTP status",
                   ["combination", "status"])
REQUEST_SECONDS = Histogram("pam_request_duration_seconds", "Inference request duration, end to end in the server",
                            ["combination", "status"], buckets=_BUCKETS)
EXECUTE_SECONDS = Histogram("pam_execute_duration_seconds", "ExecuTorch execute duration of the combination's method",
                            ["combination", "status"], buckets=_BUCKETS)
IN_FLIGHT = Gauge("pam_requests_in_flight", "Inference requests being handled", multiprocess_mode="livesum")
QUEUE_REJECTED = Counter("pam_queue_rejected_total", "Requests refused with 503 because the runtime queue was full")
MODEL_INFO = Gauge("pam_model_info", "The model being served (value 1)", ["model", "version"],
                   multiprocess_mode="liveall")
METHOD_MACS = Gauge("pam_method_macs", "Multiply-accumulates per image of each combination's method",
                    ["combination"], multiprocess_mode="liveall")


_Children = tuple[Any, Any, Any]
_bound: dict[tuple[str, int], _Children] = {}


def children(combination: str, status: int) -> _Children:
    """The (requests counter, request histogram, execute histogram) children of one label combination,
    bound once: ``labels()`` costs a lock, a tuple of str() and a dict lookup per call (profiled)."""
    ch = _bound.get((combination, status))
    if ch is None:
        code = str(status)
        ch = (REQUESTS.labels(combination, code), REQUEST_SECONDS.labels(combination, code),
              EXECUTE_SECONDS.labels(combination, code))
        _bound[(combination, status)] = ch
    return ch


def observe(combination: str, status: int, total_s: float, execute_s: float | None) -> None:
    requests, request_seconds, execute_seconds = children(combination, status)
    requests.inc()
    request_seconds.observe(total_s)
    if execute_s is not None:
        execute_seconds.observe(execute_s)


def render() -> tuple[bytes, str]:
    """The exposition text (all workers' figures in multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


class LatencyWindow:
    """The last ``size`` successful latencies per combination, for live p50/p95 (this process)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._total: dict[str, deque[float]] = {}
        self._execute: dict[str, deque[float]] = {}
        self._count: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, combination: str, total_ms: float, execute_ms: float) -> None:
        with self._lock:
            if combination not in self._total:
                self._total[combination] = deque(maxlen=self.size)
                self._execute[combination] = deque(maxlen=self.size)
                self._count[combination] = 0
            self._total[combination].append(total_ms)
            self._execute[combination].append(execute_ms)
            self._count[combination] += 1

    def summary(self) -> dict[str, dict[str, float]]:
        with self._lock:
            snap = {c: (sorted(self._total[c]), sorted(self._execute[c]), self._count[c]) for c in self._total}
        return {
            c: {"count": n, "window": len(tot), "p50_ms": _quantile(tot, 0.5), "p95_ms": _quantile(tot, 0.95),
                "execute_p50_ms": _quantile(ex, 0.5), "execute_p95_ms": _quantile(ex, 0.95)}
            for c, (tot, ex, n) in snap.items()
        }
