"""Time, CPU and peak memory of each export phase, with a progress bar per phase.

``report.json`` keeps :meth:`Phases.as_dict`; ``python -m mobile_export.export_phases`` turns it
into ``results/export-phases-*``.
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Iterator
from typing import IO, Any


def peak_rss_mb() -> tuple[float, float]:
    """(this process, largest child so far) peak resident set size in MB (Linux: ru_maxrss in KB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    return own, child


def _cpu() -> tuple[float, float]:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime, c.ru_utime + c.ru_stime


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass


class Phases:
    """Records ``{phase: {wall_s, cpu_s, child_cpu_s, peak_rss_mb, items}}`` in order."""

    def __init__(self, terminal: IO[str] | None = None, progress: bool | None = None) -> None:
        self.terminal = terminal
        self.progress = progress
        self.records: dict[str, dict[str, Any]] = {}

    @contextlib.contextmanager
    def phase(self, name: str, items: int) -> Iterator[Any]:
        """Time a phase of ``items`` steps; yields a bar to ``update(1)`` per step."""
        t0 = time.perf_counter()
        c0, k0 = _cpu()
        bar: Any = _NoBar()
        if self.progress is not False and self.terminal is not None:
            import shutil

            from tqdm import tqdm

            # progress=None: the bar shows only on a terminal. The width is given: tqdm 4.70's own
            # guess came out as -1 (no bar at all) on a pseudo-terminal here.
            width = max(40, min(100, shutil.get_terminal_size((100, 24)).columns))
            bar = tqdm(total=items, desc=f"  {name}", unit="method" if items > 1 else "step", file=self.terminal,
                       disable=None if self.progress is None else False, leave=True, ncols=width)
        try:
            yield bar
        finally:
            if hasattr(bar, "close"):
                bar.close()
            c1, k1 = _cpu()
            own, child = peak_rss_mb()
            self.records[name] = {
                "wall_s": round(time.perf_counter() - t0, 3),
                "cpu_s": round(c1 - c0, 3),
                "child_cpu_s": round(k1 - k0, 3),  # of child processes that ended during the phase
                "peak_rss_mb": round(own, 1),  # this process, since it started
                "peak_child_rss_mb": round(child, 1),  # the largest child so far
                "items": items,
            }

    def add_detail(self, name: str, detail: dict[str, Any]) -> None:
        self.records[name].update(detail)

    def as_dict(self) -> dict[str, Any]:
        total = sum(r["wall_s"] for r in self.records.values())
        return {"total_wall_s": round(total, 3), **self.records}

    def summary(self) -> str:
        parts = [f"{k} {r['wall_s']:.1f}s" for k, r in self.records.items()]
        own = max((r["peak_rss_mb"] for r in self.records.values()), default=0.0)
        child = max((r["peak_child_rss_mb"] for r in self.records.values()), default=0.0)
        return (f"export phases: {', '.join(parts)}; peak RSS {own:.0f} MB (largest child {child:.0f} MB)")
