"""Merge then prune, with the pruner's budget as the judge of the merge's capacity.

A merger that drops channels (PAM's per-task floor) guesses how much capacity each task needs;
the information estimate it works from saturates long before accuracy does, so the guess can be
too small for any retraining to bring a task back within the budget. When the pruner reports
that the merged network missed the budget before the first step (even after its recovery
retraining), the merge is redone with the merger's :meth:`~merging.mergers.base.Merger.larger`
setting (which may be another merger: PAM's last resort keeps the networks apart), until it
meets the budget or there is nothing larger. Decisions use the validation check set only, as
everywhere in pruning.

Never worse than not merging: given the separately pruned networks (``baseline``), a pruned merge
that costs more than they do on any combination of two or more tasks is not shipped; the
separately pruned networks are (larger merges only cost more), and the attempts say why. Single
tasks are left out of the rule: a task alone is always cheapest in its own network, and a merged
network is for screens that need several tasks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from merging.cost import Cost, cost_table
from merging.data.base import Splits
from merging.mergers.base import Merger
from merging.network import MultitaskNet
from merging.pruning import PruneConfig, missed_at_start, prune

REGROUP = "+regroup"  # route suffix: the same merger, pruned with regrouping (PruneConfig.removes = "pairs")


def split_route(name: str) -> tuple[str, str]:
    """A route's merger and what its prune steps remove (``PruneConfig.removes``):
    ``"pam+regroup"`` -> ("pam", "pairs"), ``"pam"`` -> ("pam", "channels")."""
    return (name[: -len(REGROUP)], "pairs") if name.endswith(REGROUP) else (name, "channels")


@dataclass
class MergePruneResult:
    merged: MultitaskNet  # the merged network the accepted attempt started from (before pruning)
    pruned: MultitaskNet
    history: list[dict[str, Any]]  # the pruner's history of the accepted attempt
    merged_costs: dict[str, Cost]  # cost of every combination before pruning
    attempts: list[dict[str, Any]] = field(default_factory=list)  # one row per merge tried

    chose: str = ""  # what was shipped and why, in one line

    @property
    def missed_budget(self) -> bool:
        return missed_at_start(self.history)


def dearer_than(net: MultitaskNet, baseline: MultitaskNet, min_tasks: int = 2) -> list[tuple[str, int, int]]:
    """(combination, MACs of ``net``, MACs of ``baseline``) wherever ``net`` costs more, over the
    combinations of at least ``min_tasks`` tasks."""
    mine, theirs = cost_table(net), cost_table(baseline)
    return [(c, mine[c].macs, theirs[c].macs) for c in mine
            if c.count("+") + 1 >= min_tasks and c in theirs and mine[c].macs > theirs[c].macs]


def merge_and_prune(
    merger: Merger,
    nets: Sequence[MultitaskNet],
    splits: Splits,
    cfg: PruneConfig,
    reference: Mapping[str, float],
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    baseline: MultitaskNet | None = None,
) -> MergePruneResult:
    """Merge ``nets`` and prune the result within ``cfg``'s budget of ``reference``, growing the
    merge while its network misses the budget before pruning, and shipping ``baseline`` (the
    separately pruned networks) where the result would cost more (see the module docstring)."""
    current: Merger | None = merger
    attempts: list[dict[str, Any]] = []
    result: MergePruneResult | None = None
    while current is not None:
        merged = current.merge(nets, splits.train, seed=seed)
        costs = cost_table(merged)
        pruned, history = prune(copy.deepcopy(merged), splits, cfg, reference=reference)
        attempts.append({"merger": current.name, "options": _options(current),
                         "macs_merged": max(c.macs for c in costs.values()), "missed_budget": missed_at_start(history)})
        result = MergePruneResult(merged, pruned, history, costs, attempts,
                                  chose=f"{current.name} {_options(current) or ''}".strip())
        if not result.missed_budget:
            if baseline is not None:
                result = never_dearer(result, baseline, log)
            break
        previous, current = current, current.larger()
        if current is not None and log is not None:
            changed = {k: v for k, v in _options(current).items() if _options(previous).get(k) != v}
            what = f"with {changed}" if current.name == previous.name else f"falling back to {current.name!r}"
            log(f"  {merger.name}: the merged network missed the budget before pruning; merging again {what}")
    assert result is not None  # the loop runs at least once
    return result


def never_dearer(
    result: MergePruneResult, baseline: MultitaskNet, log: Callable[[str], None] | None = None
) -> MergePruneResult:
    """``result``, or the separately pruned networks (``baseline``) where the pruned merge costs
    more than they do on any combination of two or more tasks (see the module docstring)."""
    if not result.attempts:
        return result
    if result.missed_budget:  # every rung missed the budget: never ship an out-of-budget network
        if log is not None:
            log(f"  {result.attempts[-1]['merger']} missed the budget at every rung; shipping the separately "
                "pruned networks")
        return MergePruneResult(result.merged, copy.deepcopy(baseline), result.history, result.merged_costs,
                                result.attempts, chose="separate (every merge missed the budget)")
    dearer = dearer_than(result.pruned, baseline)
    result.attempts[-1]["dearer_than_separate"] = [c for c, _, _ in dearer]
    if not dearer:
        return result
    worst = max(dearer, key=lambda d: d[1] / max(1, d[2]))
    name = result.attempts[-1]["merger"]  # the ladder's own last rung, ``separate`` too, is compared
    why = (f"{name} pruned costs more than the separately pruned networks on {len(dearer)} combination(s) of "
           f"two or more tasks (worst {worst[0]}: {worst[1]:,} vs {worst[2]:,} MACs)")
    if log is not None:
        log(f"  {why}; shipping the separately pruned networks")
    return MergePruneResult(result.merged, copy.deepcopy(baseline), result.history, result.merged_costs,
                            result.attempts, chose=f"separate ({why})")


def _options(merger: Merger) -> dict[str, Any]:
    config = getattr(merger, "config", None)
    return dict(vars(config)) if config is not None else {}
