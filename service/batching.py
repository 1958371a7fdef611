"""The dynamic batcher's data and its one decision: a request waiting for the runtime (:class:`Waiting`),
what its execute gave it (:class:`Execution`), and which method runs next for which waiting requests
(:func:`plan_batch`). ``runtime_pool`` owns the queue and runs the plan."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from service.model_loading import LoadedModel


@dataclass
class Execution:
    """What one request got from the execute that served it."""

    outputs: list[np.ndarray]  # one (N, K) array per task of the method that ran, manifest order
    queue_s: float  # from admission to the start of the execute that served this request
    execute_s: float  # that execute (the whole batch when batched)
    batch_rows: int = 0  # rows of that execute (this request's own rows when not batched)
    method: str = ""  # the method that ran (a cheaper union method when batching joined combinations)
    tasks: list[str] = field(default_factory=list)  # its tasks, one per output


@dataclass(eq=False)
class Waiting:
    """A request waiting for the batcher."""

    model: LoadedModel
    method: str
    x: np.ndarray
    fut: asyncio.Future[Execution]
    submitted: float
    tasks: frozenset[str]  # the tasks this request needs (a union method may answer them)
    union_ok: bool  # False for strict requests: only their own method may answer
    timer: asyncio.TimerHandle | None = None

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])


def plan_batch(queue: Iterable[Waiting], head: Waiting, limit: int, batch_union: bool) -> tuple[str, list[Waiting]]:
    """The method to run and the requests it answers: the head's method with every waiting request
    for it, or, with ``batch_union``, one execute of the cheapest method covering the tasks of
    several combinations when the measured costs say it beats one execute per method."""
    model = head.model
    same: list[Waiting] = []
    rows = 0
    for w in queue:
        if w.method == head.method and w.model is model and not w.fut.done() and rows + w.rows <= limit:
            same.append(w)
            rows += w.rows
    if not (batch_union and head.union_ok and model.costs):
        return head.method, same
    cand: list[Waiting] = []
    rows = 0
    for w in queue:
        if w.model is model and w.union_ok and not w.fut.done() and rows + w.rows <= limit:
            cand.append(w)
            rows += w.rows
    per_method: dict[str, int] = {}
    for w in cand:
        per_method[w.method] = per_method.get(w.method, 0) + w.rows
    if len(per_method) < 2:
        return head.method, same
    need = frozenset().union(*(w.tasks for w in cand))
    covering = [m.name for m in model.manifest.methods if need <= set(m.tasks) and m.name in model.costs]
    if not covering:
        return head.method, same
    union = min(covering, key=lambda m: model.cost(m, rows) or float("inf"))
    separate = sum(model.cost(m, r) or float("inf") for m, r in per_method.items())
    if (model.cost(union, rows) or float("inf")) < separate:
        return union, cand
    return head.method, same
