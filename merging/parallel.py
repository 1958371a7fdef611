"""Independent jobs (one network trained or pruned each) side by side in worker processes.

These networks are tiny: one intra-op thread per process is as fast as two threads in one, so two
cores are used by running two independent jobs at once. Workers are spawned (forking a process that
already started torch's thread pools is unsafe) and run one thread each. Results come back in job
order; an exception in a job is raised here with its traceback.

A job may wait for others (:class:`After`): its arguments are built from their results when they are
done, e.g. a search that may stop once it cannot beat what other routes already found.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TypeVar

R = TypeVar("R")


@dataclass(frozen=True)
class After:
    """A job that starts once the jobs at indices ``after`` are done, with ``build(results)`` as its
    arguments (``results``: index -> result of each finished job)."""

    after: tuple[int, ...]
    build: Callable[[Mapping[int, Any]], tuple[Any, ...]]


def default_workers() -> int:
    """One worker per core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _check(jobs: Sequence[tuple[Any, ...] | After]) -> None:
    for i, job in enumerate(jobs):
        if isinstance(job, After) and any(not 0 <= k < len(jobs) or k == i for k in job.after):
            raise ValueError(f"job {i} waits for {job.after}: not other jobs of this run")
    done: set[int] = set()
    while len(done) < len(jobs):  # every job can start once the ones it waits for are done
        ready = {i for i, j in enumerate(jobs) if i not in done and (not isinstance(j, After) or set(j.after) <= done)}
        if not ready:
            raise ValueError("jobs wait for each other in a cycle")
        done |= ready


def run_jobs(
    fn: Callable[..., R], jobs: Sequence[tuple[Any, ...] | After], workers: int | None = None
) -> list[R]:
    """``[fn(*job) for job in jobs]``, on up to ``workers`` processes (``fn`` must be importable:
    a module-level function). Jobs start in list order as workers free up, each :class:`After` job
    as soon as the jobs it waits for are done. With one worker or one job, in this process."""
    _check(jobs)
    n = min(len(jobs), workers if workers is not None else default_workers())
    results: dict[int, R] = {}
    pending = list(range(len(jobs)))

    def next_ready() -> tuple[int, tuple[Any, ...]] | None:
        for i in pending:
            job = jobs[i]
            if not isinstance(job, After):
                pending.remove(i)
                return i, job
            if all(k in results for k in job.after):
                pending.remove(i)
                return i, job.build(results)
        return None

    if n <= 1:
        while pending:
            got = next_ready()
            assert got is not None  # _check: no cycles
            results[got[0]] = fn(*got[1])
        return [results[i] for i in range(len(jobs))]
    with ProcessPoolExecutor(n, mp_context=mp.get_context("spawn"), initializer=_init_worker) as pool:
        running: dict[Future[R], int] = {}
        while pending or running:
            while len(running) < n and (got := next_ready()) is not None:
                running[pool.submit(fn, *got[1])] = got[0]
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                results[running.pop(f)] = f.result()
    return [results[i] for i in range(len(jobs))]
