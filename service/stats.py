"""Per-method inference statistics in the shape of Triton's statistics extension
(``GET /v2/models/{name}/stats``): request counts and durations, executes, and executes per batch size.

One process's figures (with ``--workers N`` each worker answers for itself; Prometheus sums them).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, n: int = 1) -> None:
        self.count += n
        self.ns += int(seconds * 1e9)

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class _MethodStats:
    last_inference_ms: int = 0
    inference_count: int = 0  # images answered
    execution_count: int = 0  # executes run (one per batch)
    success: _Duration = field(default_factory=_Duration)
    fail: _Duration = field(default_factory=_Duration)
    queue: _Duration = field(default_factory=_Duration)
    compute_input: _Duration = field(default_factory=_Duration)
    compute_infer: _Duration = field(default_factory=_Duration)
    compute_output: _Duration = field(default_factory=_Duration)
    batches: dict[int, _Duration] = field(default_factory=lambda: defaultdict(_Duration))


class Statistics:
    """Thread-safe counters per method; rendered as Triton's ``model_stats`` entries."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._methods: dict[str, _MethodStats] = defaultdict(_MethodStats)

    def execution(self, method: str, rows: int, execute_s: float, requests: int) -> None:
        with self._lock:
            m = self._methods[method]
            m.execution_count += 1
            m.batches[rows].add(execute_s)
            m.compute_infer.add(execute_s, requests)

    def request(self, method: str, *, ok: bool, images: int, total_s: float, queue_s: float = 0.0,
                preprocess_s: float = 0.0, postprocess_s: float = 0.0) -> None:
        with self._lock:
            m = self._methods[method]
            if ok:
                m.success.add(total_s)
                m.queue.add(queue_s)
                m.compute_input.add(preprocess_s)
                m.compute_output.add(postprocess_s)
                m.inference_count += images
                m.last_inference_ms = int(time.time() * 1000)
            else:
                m.fail.add(total_s)

    def _entry(self, name: str, version: str, ms: list[_MethodStats]) -> dict[str, Any]:
        def total(attr: str) -> dict[str, int]:
            d = _Duration()
            for m in ms:
                x = getattr(m, attr)
                d.count += x.count
                d.ns += x.ns
            return d.as_dict()

        batches: dict[int, _Duration] = defaultdict(_Duration)
        for m in ms:
            for size, d in m.batches.items():
                batches[size].count += d.count
                batches[size].ns += d.ns
        return {
            "name": name, "version": version,
            "last_inference": max((m.last_inference_ms for m in ms), default=0),
            "inference_count": sum(m.inference_count for m in ms),
            "execution_count": sum(m.execution_count for m in ms),
            "inference_stats": {k: total(k) for k in ("success", "fail", "queue", "compute_input",
                                                      "compute_infer", "compute_output")},
            "batch_stats": [{"batch_size": size, "compute_infer": d.as_dict()} for size, d in sorted(batches.items())],
        }

    def model_stats(self, model: str, version: str, methods: list[str]) -> dict[str, Any]:
        """Triton's entry for the model (all methods summed), with one entry per method under ``methods``."""
        with self._lock:
            per = {m: self._methods.get(m) or _MethodStats() for m in methods}
            entry = self._entry(model, version, list(per.values()))
            entry["methods"] = [self._entry(name, version, [st]) for name, st in per.items()]
        return entry
