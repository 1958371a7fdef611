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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mobile_export.errors import ExportError
from service import metrics
from service.batching import Execution, Waiting, plan_batch
from service.core.config import Settings
from service.errors import ServiceError
from service.model_loading import LoadedModel, check_files, load_bundle
from service.stats import Statistics

log = logging.getLogger("pam.service")


@dataclass
class ReloadResult:
    ok: bool
    detail: str
    model: LoadedModel | None
    status: int = 200  # the HTTP status of a refusal (422, 403 outside the bundle root, 504 read timeout)
    code: str = "reloaded"


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
            if settings.executor in ("thread", "auto") else None
        )
        self._reload_lock = asyncio.Lock()
        self._threads_set = False
        self.stats = Statistics()
        self.executes = 0  # executes run (a batch counts once)
        self.union_executes = 0  # executes of a union method that answered several combinations
        self._batching = settings.batching
        self._queue: collections.deque[Waiting] = collections.deque()
        self._busy = False
        self._scheduled = False
        self._window_timer: asyncio.TimerHandle | None = None
        self._resolved: dict[Any, Any] = {}  # query -> Resolved cache of the hot path (cleared on reload)

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
            model = load_bundle(bundle_dir, self.settings, probe=self.settings.probe)
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
    def inline(self, model: LoadedModel, method: str) -> bool:
        """Whether ``method`` executes on the event loop: always with ``executor=inline``, never with
        ``thread``; with ``auto`` when its measured execute is below ``inline_max_ms`` (the hand-off
        to a thread costs more than such an execute, and execute holds the GIL either way)."""
        ex = self.settings.executor
        if ex == "inline" or self._executor is None:
            return True
        if ex == "thread":
            return False
        c = model.costs.get(method)
        return c is not None and c[0] * 1e3 <= self.settings.inline_max_ms

    async def execute(self, model: LoadedModel, method: str, x: np.ndarray, *, tasks: Any = None,
                      strict: bool = True) -> Execution:
        """Run ``method`` on ``x`` through the bounded queue; 503 when full, 504 past the timeout.
        With ``tasks`` (the tasks the caller needs) and ``strict=False``, union batching may answer
        with a cheaper method that covers them (``Execution.method`` says which)."""
        if self._waiting >= self.settings.queue_bound:
            metrics.QUEUE_REJECTED.inc()
            raise ServiceError(503, "queue_full",
                               f"{self._waiting} requests wait for the runtime (bound {self.settings.queue_bound})",
                               headers={"Retry-After": str(self.settings.retry_after_s)})
        self._waiting += 1
        submitted = time.perf_counter()
        try:
            if self._batching:
                return await self._execute_batched(model, method, x, submitted, tasks, strict)
            if self.inline(model, method):
                ex = _run(model, method, x, submitted)
                self._count(method, ex, 1)
                return ex
            assert self._executor is not None
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

    async def _execute_batched(self, model: LoadedModel, method: str, x: np.ndarray, submitted: float,
                               tasks: Any, strict: bool) -> Execution:
        loop = asyncio.get_running_loop()
        want = (frozenset(tasks) if tasks else frozenset(model.tasks_of[method])) if self.settings.batch_union \
            else frozenset()
        item = Waiting(model, method, x, loop.create_future(), submitted, want, not strict)
        item.timer = loop.call_later(self.settings.request_timeout_s, self._expire, item)
        self._queue.append(item)
        self._schedule(loop)
        try:
            return await item.fut
        finally:
            item.timer.cancel()

    def _expire(self, item: Waiting) -> None:
        if not item.fut.done():  # still waiting (or its batch still runs): the caller gets 504
            item.fut.set_exception(self._timeout())

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        """Dispatch on the next loop turn, so requests parsed in this turn can join the batch."""
        if not self._scheduled and not self._busy:
            self._scheduled = True
            loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        """Start the next execute if the runtime is free (called on the event loop)."""
        self._scheduled = False
        while self._queue and self._queue[0].fut.done():
            self._queue.popleft()  # timed out while waiting
        if self._busy or not self._queue:
            return
        head = self._queue[0]
        window = self.settings.batch_window_us / 1e6
        if window > 0:
            waited = time.perf_counter() - head.submitted
            pending = sum(w.rows for w in self._queue if w.method == head.method and w.model is head.model)
            if waited < window and pending < self.batch_limit(head.model):
                if self._window_timer is None:
                    self._window_timer = asyncio.get_running_loop().call_later(window - waited, self._window_fired)
                return
        if self._window_timer is not None:
            self._window_timer.cancel()
            self._window_timer = None
        method, batch = plan_batch(self._queue, head, self.batch_limit(head.model), self.settings.batch_union)
        if len(batch) == len(self._queue):
            self._queue.clear()
        else:
            taken = set(map(id, batch))
            self._queue = collections.deque(w for w in self._queue if id(w) not in taken)
        self._busy = True
        xs = [w.x for w in batch]
        if self.inline(head.model, method):
            try:
                result = _run_batch(head.model, method, xs, 0.0)
            except BaseException as e:
                self._finished(batch, method, None, e)
            else:
                self._finished(batch, method, result, None)
            return
        assert self._executor is not None
        cf = self._executor.submit(_run_batch, head.model, method, xs, 0.0)
        loop = asyncio.get_running_loop()
        cf.add_done_callback(lambda f: loop.call_soon_threadsafe(self._thread_done, batch, method, f))

    def _window_fired(self) -> None:
        self._window_timer = None
        self._dispatch()

    def _thread_done(self, batch: list[Waiting], method: str, cf: concurrent.futures.Future[Any]) -> None:
        try:
            result = cf.result()
        except BaseException as e:
            self._finished(batch, method, None, e)
        else:
            self._finished(batch, method, result, None)

    def _finished(self, batch: list[Waiting], method: str, result: Any, error: BaseException | None) -> None:
        self._busy = False
        if error is not None:
            for w in batch:
                if not w.fut.done():
                    w.fut.set_exception(error)
        else:
            outputs, started, execute_s = result
            rows = sum(w.rows for w in batch)
            self.executes += 1
            if any(w.method != method for w in batch):
                self.union_executes += 1
            self.stats.execution(method, rows, execute_s, len(batch))
            tasks = batch[0].model.tasks_of[method] if batch else []
            offset = 0
            for w in batch:
                part = outputs if len(batch) == 1 else [o[offset:offset + w.rows] for o in outputs]
                offset += w.rows
                if not w.fut.done():
                    w.fut.set_result(Execution(part, started - w.submitted, execute_s, rows, method, tasks))
        if self._queue:
            self._schedule(asyncio.get_running_loop())

    # -------------------------------------------------------------------------- reload
    def bundle_root(self) -> Path | None:
        from service.bundle_guard import bundle_root

        served = self.settings.bundle_dir or (self.model.bundle_dir if self.model else None)
        return bundle_root(self.settings.bundle_root, served)

    async def reload(self, bundle_dir: Path | str | None) -> ReloadResult:
        """Check the files (bounded in time, outside the reload lock, so nothing can hang the reloads
        queued behind), then probe, load and warm the bundle off the event loop, then swap; a bad
        bundle changes nothing. Refusals never quote a file."""
        from service.bundle_guard import BundleRefused, resolve_bundle_dir

        keep = "reload refused, still serving the previous model: "
        try:
            if bundle_dir is None:
                target = self.model.bundle_dir if self.model else self.settings.bundle_dir
                if target is None:
                    return ReloadResult(False, "no bundle directory to reload", self.model, 422, "reload_refused")
            else:
                target = resolve_bundle_dir(bundle_dir, self.bundle_root())
            await asyncio.wait_for(asyncio.to_thread(check_files, Path(target), self.settings),
                                   self.settings.reload_read_timeout_s)
        except BundleRefused as e:
            log.warning("reload refused (%s): %s", e.code, e.message)
            return ReloadResult(False, keep + str(e), self.model, e.status, e.code)
        except ExportError as e:  # e.g. a bad public key setting
            return ReloadResult(False, keep + str(e), self.model, 422, e.code)
        except TimeoutError:
            log.warning("reload refused: the bundle's files were not read within %.3g s",
                        self.settings.reload_read_timeout_s)
            return ReloadResult(False, keep + f"the bundle's files were not read within "
                                f"{self.settings.reload_read_timeout_s:g} s", self.model, 422, "read_timeout")
        async with self._reload_lock:
            try:
                new = await asyncio.to_thread(load_bundle, Path(target), self.settings, probe=True)
            except (ExportError, OSError, ValueError) as e:  # ValueError: e.g. a NUL byte in the path
                msg = str(e) if isinstance(e, ExportError) else type(e).__name__
                log.warning("reload of %s refused, still serving the previous model: %s", target, msg)
                return ReloadResult(False, keep + msg, self.model, getattr(e, "status", 422), "reload_refused")
            self.model, self.state, self.error = new, "ready", None
            self._resolved.clear()
            log.info("reloaded %s %s from %s", new.manifest.model_name, new.manifest.model_version, target)
            return ReloadResult(True, f"now serving {new.manifest.model_name} {new.manifest.model_version}", new)


def _run(model: LoadedModel, method: str, x: np.ndarray, submitted: float) -> Execution:
    import torch

    started = time.perf_counter()
    outs = model.runtime.run(method, torch.from_numpy(x))
    done = time.perf_counter()
    return Execution([o.numpy() for o in outs], started - submitted, done - started, int(x.shape[0]), method,
                     model.tasks_of[method])


def _run_batch(model: LoadedModel, method: str, xs: list[np.ndarray], _dispatched: float
               ) -> tuple[list[np.ndarray], float, float]:
    """One execute of the concatenated inputs: (outputs, start time, execute seconds)."""
    import torch

    x = xs[0] if len(xs) == 1 else np.concatenate(xs, axis=0)
    started = time.perf_counter()
    outs = model.runtime.run(method, torch.from_numpy(x))
    done = time.perf_counter()
    return [o.numpy() for o in outs], started, done - started
