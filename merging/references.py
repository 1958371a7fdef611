"""The yardsticks: the cheapest networks a careful engineer could ship *instead* of a merged one.

- ``c_alone(t)``: the smallest network for task t alone within the budget, the best of three
  independent routes (all judged by the same :mod:`merging.pruning.budget` test on the check set):

  (a) ``project``: the project's pruner on t's network alone;
  (b) ``torch-pruning``: Torch-Pruning's own iterative global pruning (``MetaPruner``, group Taylor
      importance, mean-normalised, no cost weighting) with a fine schedule, fine-tuned after every
      step, stopped at the last step within budget;
  (c) ``width-grid``: the narrowest of a grid of width multipliers of t's architecture, trained
      from scratch with the zoo's recipe, that meets the budget (the benchmark runs it after (a) and
      (b) and trains no width dearer than their best: such a width could not be ``c_alone``).

- ``c_spec(C)``: the specialist limit of a combination, a hard-shared trunk trained jointly for
  exactly the tasks of C (one head each) and pruned by the project's pruner; ``c_spec(t) = c_alone(t)``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch_pruning as tp

from merging.cost import combination_cost
from merging.data.base import MultitaskData, Splits
from merging.mergers import create_merger
from merging.network import MultitaskNet
from merging.pruning import PruneConfig, missed_at_start, prune
from merging.pruning.importance import accumulate_gradients
from merging.pruning.rule import BudgetRule
from merging.train import TrainConfig, fit, seed_everything

GRID = "width-grid"
ROUTES = ("project", "torch-pruning", GRID)
WIDTH_GRID = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)  # multipliers of the zoo's widths


@dataclass(frozen=True)
class TpSchedule:
    """Torch-Pruning's iterative schedule for route (b)."""

    pruning_ratio: float = 0.95  # channel share removed after the last step (per layer, global ranking)
    iterative_steps: int = 24  # steps to get there (about 4% of the channels each)
    finetune_epochs: int = 5  # after every step
    retry_epochs: int = 5  # one more fine-tune before a step that misses the budget ends the run


@dataclass
class AloneResult:
    task: str
    macs: dict[str, int | None]  # route -> MACs of its smallest network within budget (None: none met it)
    widths: dict[str, list[int] | None]  # route -> per-layer widths of that network
    best: str  # the route with the fewest MACs
    net: MultitaskNet  # that network

    @property
    def c_alone(self) -> int:
        v = self.macs[self.best]
        assert v is not None
        return v


def _widths(net: MultitaskNet) -> list[int]:
    return [sum(g.values()) for g in net.layout]


def _rule(splits: Splits, reference: Mapping[str, float], cfg: PruneConfig, tasks: Sequence[str]) -> BudgetRule:
    return BudgetRule(splits.val.select_tasks(tuple(tasks)), reference, cfg)


def prune_with_torch_pruning(
    net: MultitaskNet, splits: Splits, cfg: PruneConfig, reference: Mapping[str, float],
    schedule: TpSchedule | None = None,
) -> MultitaskNet | None:
    """Route (b) on a single-task network; None if even the unpruned network misses the budget."""
    schedule = schedule or TpSchedule()
    tasks = net.task_names
    train = splits.train.select_tasks(tasks)
    rule = _rule(splits, reference, cfg, tasks)
    ok = rule.steer
    net = copy.deepcopy(net)
    if not ok(net):
        return None
    module = net.for_combination(None)
    heads = [net.head(t).conv for t in tasks]
    pruner = tp.pruner.MetaPruner(
        module, train.x[:2], importance=tp.importance.GroupTaylorImportance(), global_pruning=True,
        pruning_ratio=schedule.pruning_ratio, iterative_steps=schedule.iterative_steps, ignored_layers=heads,
    )
    best = copy.deepcopy(net)
    trajectory = [best]
    tc = TrainConfig(epochs=schedule.finetune_epochs, batch_size=cfg.batch_size, lr=cfg.lr, progress=False,
                     epoch_samples=cfg.epoch_samples)
    for k in range(schedule.iterative_steps):
        accumulate_gradients(net, train, replace(cfg, seed=cfg.seed + k))
        pruner.step()
        net.zero_grad(set_to_none=True)
        net.sync_layout()
        fit(net, train, replace(tc, seed=cfg.seed + 1000 + k))
        if not ok(net) and schedule.retry_epochs > 0:
            fit(net, train, replace(tc, epochs=schedule.retry_epochs, seed=cfg.seed + 2000 + k))
        if not ok(net):
            break
        best = copy.deepcopy(net)
        trajectory.append(best)
    certified = rule.certify(trajectory[::-1])  # the same rule as the pruner's: back off until certified
    if certified is None:
        return None
    certified.meta = {**certified.meta, "route": "torch-pruning"}
    return certified


def _at_width(net: MultitaskNet, mult: float) -> MultitaskNet:
    """A freshly initialised network of ``net``'s architecture with every layer ``mult`` times as wide."""
    arch = net.arch.with_widths([max(1, round(s.width * mult)) for s in net.arch.layers])
    every = (1 << len(net.task_names)) - 1
    return MultitaskNet(net.tasks, arch, [{every: s.width} for s in arch.layers],
                        meta={"route": GRID, "width_mult": mult})


def grid_stopped(net: MultitaskNet, grid: Sequence[float], max_macs: int | None) -> bool:
    """Whether :func:`narrowest_from_scratch` with ``max_macs`` leaves some width of ``grid`` untrained
    (MACs grow with the width, so exactly when the widest costs more)."""
    return max_macs is not None and combination_cost(_at_width(net, max(grid))).macs > max_macs


def narrowest_from_scratch(
    net: MultitaskNet, splits: Splits, cfg: PruneConfig, reference: Mapping[str, float], train_cfg: TrainConfig,
    grid: Sequence[float] = WIDTH_GRID, judge: Callable[[MultitaskNet], bool] | None = None,
    max_macs: int | None = None,
) -> tuple[MultitaskNet | None, float | None]:
    """Route (c): the narrowest multiplier of ``grid`` (ascending) whose network, trained from scratch
    with ``train_cfg``, meets the budget (or ``judge``); (None, None) if none does. With ``max_macs``
    (what the other routes already reached) the search stops before the first width that costs more:
    it could not be the smallest network any more, and training it from scratch is the route's cost."""
    tasks = net.task_names
    ok = judge or _rule(splits, reference, cfg, tasks).judge()
    for mult in sorted(grid):
        seed_everything(train_cfg.seed)
        cand = _at_width(net, mult)
        if max_macs is not None and combination_cost(cand).macs > max_macs:
            return None, None
        fit(cand, splits.train.select_tasks(tasks), replace(train_cfg, progress=False))
        if ok(cand):
            return cand, mult
    return None, None


def alone_route(
    net: MultitaskNet, splits: Splits, cfg: PruneConfig, reference: Mapping[str, float], train_cfg: TrainConfig,
    route: str, schedule: TpSchedule | None = None, grid: Sequence[float] = WIDTH_GRID,
    max_macs: int | None = None,
) -> MultitaskNet | None:
    """One ``c_alone`` route on a single-task network: its smallest network within budget, or None.
    The routes are independent jobs (the benchmark runs them side by side); the width grid stops above
    ``max_macs`` (see :func:`narrowest_from_scratch`)."""
    if route == "project":
        pruned, history = prune(copy.deepcopy(net), splits, cfg, reference=reference)
        return None if missed_at_start(history) else pruned
    if route == "torch-pruning":
        return prune_with_torch_pruning(net, splits, cfg, reference, schedule)
    if route == GRID:
        return narrowest_from_scratch(net, splits, cfg, reference, train_cfg, grid, max_macs=max_macs)[0]
    raise ValueError(f"unknown route {route!r}; known: {ROUTES}")


def choose_alone(net: MultitaskNet, found: Mapping[str, MultitaskNet | None], routes: Sequence[str]) -> AloneResult:
    """``c_alone`` of ``net``'s task from each route's network (``found``): the smallest wins."""
    (task,) = net.task_names
    found = dict(found)
    macs = {r: combination_cost(n).macs if n is not None else None for r, n in found.items()}
    candidates = {r: m for r, m in macs.items() if m is not None}
    if not candidates:  # cannot happen with "project" (the unpruned network is its own reference)
        found["unpruned"], candidates["unpruned"] = net, combination_cost(net).macs
        macs["unpruned"] = candidates["unpruned"]
    best = min(candidates, key=lambda r: (candidates[r], routes.index(r) if r in routes else len(routes)))
    chosen = found[best]
    assert chosen is not None
    return AloneResult(task, macs, {r: _widths(n) if n is not None else None for r, n in found.items()}, best, chosen)


def specialist(
    nets: Sequence[MultitaskNet], data_train: MultitaskData, splits: Splits, cfg: PruneConfig,
    reference: Mapping[str, float], train_cfg: TrainConfig, seed: int = 0,
) -> tuple[MultitaskNet, list[dict[str, Any]]]:
    """The specialist network of the combination of ``nets``' tasks: a hard-shared trunk trained
    jointly for exactly those tasks, pruned by the project's pruner. Returns (pruned, history)."""
    merger = create_merger("shared", train=replace(train_cfg, progress=False))
    trunk = merger.merge(nets, data_train, seed=seed)
    return prune(trunk, splits, replace(cfg, seed=seed), reference=reference)
