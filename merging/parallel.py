"""Independent jobs (one network trained or pruned each) side by side in worker processes.

These networks are tiny: one intra-op thread per process is as fast as two threads in one, so two
cores are used by running two independent jobs at once. Workers are spawned (forking a process that
already started torch's thread pools is unsafe) and run one thread each. Results come back in job
order; an exception in a job is raised here with its traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

R = TypeVar("R")


def default_workers() -> int:
    """One worker per core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def run_jobs(fn: Callable[..., R], jobs: Sequence[tuple[Any, ...]], workers: int | None = None) -> list[R]:
    """``[fn(*job) for job in jobs]``, on up to ``workers`` processes (``fn`` must be importable:
    a module-level function). With one worker or one job, in this process."""
    n = min(len(jobs), workers if workers is not None else default_workers())
    if n <= 1:
        return [fn(*job) for job in jobs]
    with ProcessPoolExecutor(n, mp_context=mp.get_context("spawn"), initializer=_init_worker) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        return [f.result() for f in futures]
