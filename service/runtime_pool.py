"""The concurrency design: one ExecuTorch runtime per process behind a bounded admission queue.

Measured here (docs/service.md, ``results/serve-*.json``): ExecuTorch's ``execute`` holds the GIL,
so a second runtime thread cannot overlap two inferences; it only adds hand-off cost. Each
process therefore owns *one* runtime thread (``executor="thread"``, so the event loop keeps
accepting and parsing requests, and a queued request can time out) or runs execute on the event
loop itself (``executor="inline"``, cheapest for tiny models). Parallelism across cores comes from
worker processes (``workers``) or from XNNPACK's own threads inside one execute (``threads``).
At most ``queue_bound`` requests wait for the runtime; the next one gets 503 + Retry-After.

Dynamic batching (``batching``, on by default): requests wait in one FIFO; whenever the runtime
thread is free, the oldest request's method runs on it together with every other waiting request
for the same method that fits in ``batch_max`` rows (the manifest's ``max_batch`` by default), as one
execute of the concatenated inputs. With ``batch_window_us`` > 0 the runtime also waits up to that
long after the oldest request arrived for more to join (Triton's ``max_queue_delay``); with 0 it
adds no wait and batches only what queued while it was busy. Each request's ``Execution`` keeps its
own queue time (arrival to start of its execute) and the execute time and row count of the batch.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mobile_export.errors import ExportError
from mobile_export.manifest import Manifest
from service import metrics
from service.core.config import Settings
from service.errors import ServiceError
from service.stats import Statistics

log = logging.getLogger("pam.service")


@dataclass
class LoadedModel:
    """One bundle, loaded: what a request needs, swapped as a whole on reload."""

    bundle_dir: Path
    manifest: Manifest
    runtime: Any  # mobile_export.runtime.BundleRuntime
    loaded_at: float = field(default_factory=time.time)


@dataclass
class Execution:
    outputs: list[np.ndarray]  # one (N, K) array per task of the method, manifest order
    queue_s: float  # from admission to the start of the execute that served this request
    execute_s: float  # that execute (the whole batch when batched)
    batch_rows: int = 0  # rows of that execute (this request's own rows when not batched)


@dataclass
class _Waiting:
    """A request waiting for the batcher."""

    model: LoadedModel
    method: str
    x: np.ndarray
    fut: asyncio.Future[Execution]
    submitted: float

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])


def verify_bundle(bundle_dir: Path, settings: Settings) -> Manifest:
    """Manifest schema, program magic + sha256, and (optionally) a crash-safe child-process probe."""
    from mobile_export.runtime import check_program, probe_bundle

    manifest = Manifest.load(bundle_dir)
    check_program(bundle_dir / manifest.program, manifest.program_sha256)
    if settings.probe:
        result = probe_bundle(bundle_dir, timeout_s=settings.probe_timeout_s)
        if not result.ok:
            raise ExportError("probe_failed", result.error or f"probe of {bundle_dir} failed")
    return manifest


def load_model(bundle_dir: Path, settings: Settings, *, probe: bool) -> LoadedModel:
    """Verify then load a bundle (blocking; call it off the event loop)."""
    from mobile_export.runtime import BundleRuntime

    verify_bundle(bundle_dir, settings.model_copy(update={"probe": probe}))
    runtime = BundleRuntime(bundle_dir, lazy=settings.lazy, max_loaded=settings.max_loaded)
    return LoadedModel(bundle_dir=bundle_dir, manifest=runtime.manifest, runtime=runtime)


class RuntimePool:
    """The process's runtime: the current model, its admission queue, and hot reload."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model: LoadedModel | None = None
        self.state = "loading"  # loading | ready | failed
        self.error: str | None = None
        self._waiting = 0  # admitted requests not yet finished with the runtime
        self._executor = (
            concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pam-runtime")
            if settings.executor == "thread" else None
        )
        self._reload_lock = asyncio.Lock()
        self._threads_set = False
        self.stats = Statistics()
        self.executes = 0  # executes run (a batch counts once)
        self._batching = settings.batching and self._executor is not None
        self._queue: collections.deque[_Waiting] = collections.deque()
        self._busy = False
        self._window_timer: asyncio.TimerHandle | None = None

    # -------------------------------------------------------------------------- lifecycle
    def start_loading(self, bundle_dir: Path) -> threading.Thread:
        """Load in the background so /v2/health/live answers at once and ready turns true later."""
        t = threading.Thread(target=self._initial_load, args=(bundle_dir,), name="pam-load", daemon=True)
        t.start()
        return t

    def _initial_load(self, bundle_dir: Path) -> None:
        from mobile_export.runtime import set_threads

        try:
            if not self._threads_set:
                set_threads(self.settings.threads)  # only possible before the first program load
                self._threads_set = True
            model = load_model(bundle_dir, self.settings, probe=self.settings.probe)
        except (ExportError, OSError) as e:
            self.state, self.error = "failed", str(e)
            log.error("bundle %s failed to load: %s", bundle_dir, e)
            return
        self.model, self.state, self.error = model, "ready", None
        log.info("serving %s %s from %s (%d methods loaded)", model.manifest.model_name,
                 model.manifest.model_version, bundle_dir, len(model.runtime.loaded_methods()))

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.model is not None

    @property
    def waiting(self) -> int:
        return self._waiting

    def current(self) -> LoadedModel:
        if self.model is None:
            reason = self.error or "the model is still loading"
            raise ServiceError(503, "not_ready", reason, headers={"Retry-After": str(self.settings.retry_after_s)})
        return self.model

    # -------------------------------------------------------------------------- inference
    async def execute(self, model: LoadedModel, method: str, x: np.ndarray) -> Execution:
        """Run ``method`` on ``x`` through the bounded queue; 503 when full, 504 past the timeout."""
        if self._waiting >= self.settings.queue_bound:
            metrics.QUEUE_REJECTED.inc()
            raise ServiceError(503, "queue_full",
                               f"{self._waiting} requests wait for the runtime (bound {self.settings.queue_bound})",
                               headers={"Retry-After": str(self.settings.retry_after_s)})
        self._waiting += 1
        submitted = time.perf_counter()
        try:
            if self._executor is None:
                ex = _run(model, method, x, submitted)
                self._count(method, ex, 1)
                return ex
            if self._batching:
                return await self._execute_batched(model, method, x, submitted)
            fut = self._executor.submit(_run, model, method, x, submitted)
            try:
                ex = await asyncio.wait_for(asyncio.wrap_future(fut), self.settings.request_timeout_s)
            except TimeoutError as e:
                fut.cancel()  # a queued call never starts; a running one cannot be interrupted
                raise self._timeout() from e
            self._count(method, ex, 1)
            return ex
        finally:
            self._waiting -= 1

    def _timeout(self) -> ServiceError:
        return ServiceError(504, "timeout", f"no result within {self.settings.request_timeout_s:g} s",
                            headers={"Retry-After": str(self.settings.retry_after_s)})

    def _count(self, method: str, ex: Execution, requests: int) -> None:
        self.executes += 1
        self.stats.execution(method, ex.batch_rows, ex.execute_s, requests)

    # -------------------------------------------------------------------------- dynamic batching
    def batch_limit(self, model: LoadedModel) -> int:
        cap = model.manifest.input.max_batch
        return min(cap, self.settings.batch_max) if self.settings.batch_max else cap

    async def _execute_batched(self, model: LoadedModel, method: str, x: np.ndarray, submitted: float) -> Execution:
        loop = asyncio.get_running_loop()
        item = _Waiting(model, method, x, loop.create_future(), submitted)
        self._queue.append(item)
        self._dispatch()
        try:
            # cancelling the future on timeout leaves the item in the queue; the dispatcher skips it
            return await asyncio.wait_for(item.fut, self.settings.request_timeout_s)
        except TimeoutError as e:
            raise self._timeout() from e

    def _dispatch(self) -> None:
        """Start the next execute if the runtime is free (called on the event loop)."""
        while self._queue and self._queue[0].fut.done():
            self._queue.popleft()  # timed out while waiting
        if self._busy or not self._queue:
            return
        head = self._queue[0]
        limit = self.batch_limit(head.model)
        same = [w for w in self._queue if w.method == head.method and w.model is head.model and not w.fut.done()]
        window = self.settings.batch_window_us / 1e6
        waited = time.perf_counter() - head.submitted
        if window > 0 and waited < window and sum(w.rows for w in same) < limit:
            if self._window_timer is None:
                self._window_timer = asyncio.get_running_loop().call_later(window - waited, self._window_fired)
            return
        if self._window_timer is not None:
            self._window_timer.cancel()
            self._window_timer = None
        batch: list[_Waiting] = []
        rows = 0
        for w in same:
            if rows + w.rows <= limit:
                batch.append(w)
                rows += w.rows
        taken = {id(w) for w in batch}
        self._queue = collections.deque(w for w in self._queue if id(w) not in taken)
        self._busy = True
        assert self._executor is not None
        cf = self._executor.submit(_run_batch, head.model, head.method, [w.x for w in batch], time.perf_counter())
        loop = asyncio.get_running_loop()
        cf.add_done_callback(lambda f: loop.call_soon_threadsafe(self._finished, batch, f))

    def _window_fired(self) -> None:
        self._window_timer = None
        self._dispatch()

    def _finished(self, batch: list[_Waiting], cf: concurrent.futures.Future[tuple[list[np.ndarray], float, float]]
                  ) -> None:
        self._busy = False
        try:
            outputs, started, execute_s = cf.result()
        except BaseException as e:  # the runtime's error goes to every request of the batch
            for w in batch:
                if not w.fut.done():
                    w.fut.set_exception(e)
        else:
            rows = sum(w.rows for w in batch)
            self.executes += 1
            self.stats.execution(batch[0].method, rows, execute_s, len(batch))
            offset = 0
            for w in batch:
                part = [o[offset:offset + w.rows] for o in outputs]
                offset += w.rows
                if not w.fut.done():
                    w.fut.set_result(Execution(part, started - w.submitted, execute_s, rows))
        self._dispatch()

    # -------------------------------------------------------------------------- reload
    async def reload(self, bundle_dir: Path | None) -> tuple[bool, str, LoadedModel | None]:
        """Probe, load and warm a bundle off the event loop, then swap; a bad bundle changes nothing."""
        async with self._reload_lock:
            target = bundle_dir or (self.model.bundle_dir if self.model else self.settings.bundle_dir)
            if target is None:
                return False, "no bundle directory to reload", self.model
            try:
                new = await asyncio.to_thread(load_model, Path(target), self.settings, probe=True)
            except (ExportError, OSError, ValueError) as e:  # ValueError: e.g. a NUL byte in the path
                log.warning("reload of %s refused, still serving the previous model: %s", target, e)
                return False, f"reload refused, still serving the previous model: {e}", self.model
            self.model, self.state, self.error = new, "ready", None
            log.info("reloaded %s %s from %s", new.manifest.model_name, new.manifest.model_version, target)
            return True, f"now serving {new.manifest.model_name} {new.manifest.model_version}", new


def _run(model: LoadedModel, method: str, x: np.ndarray, submitted: float) -> Execution:
    import torch

    started = time.perf_counter()
    outs = model.runtime.run(method, torch.from_numpy(x))
    done = time.perf_counter()
    return Execution([o.numpy() for o in outs], started - submitted, done - started, int(x.shape[0]))


def _run_batch(model: LoadedModel, method: str, xs: list[np.ndarray], _dispatched: float
               ) -> tuple[list[np.ndarray], float, float]:
    """One execute of the concatenated inputs: (outputs, start time, execute seconds)."""
    import torch

    x = xs[0] if len(xs) == 1 else np.concatenate(xs, axis=0)
    started = time.perf_counter()
    outs = model.runtime.run(method, torch.from_numpy(x))
    done = time.perf_counter()
    return [o.numpy() for o in outs], started, done - started
