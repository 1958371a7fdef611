"""Merge then prune: a merge whose network misses the budget before pruning is redone larger."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merging.data.base import MultitaskData
from merging.mergers import create_merger
from merging.mergers.base import Merger
from merging.mergers.pam import PamMerger
from merging.network import MultitaskNet
from merging.pipeline import merge_and_prune
from merging.pruning import PruneConfig, check_set, reference_accuracy
from tests.pam_support import tiny_zoo

CFG = PruneConfig(step=0.3, max_steps=1, finetune_epochs=1, retry_epochs=0, recover_epochs=0, taylor_batches=1,
                  check_shifts=1, progress=False, budget=1.0)


class _BrokenUntil(Merger):
    """``separate``, but with every head zeroed until attempt ``good`` (chance accuracy: over budget)."""

    name = "broken-until"

    def __init__(self, good: int, attempt: int = 0, limit: int = 5) -> None:
        self.good, self.attempt, self.limit = good, attempt, limit

    def merge(self, nets: Sequence[MultitaskNet], data: MultitaskData, seed: int = 0) -> MultitaskNet:
        net = create_merger("separate").merge(nets, data, seed)
        if self.attempt < self.good:
            with torch.no_grad():
                for head in net.heads.values():
                    for p in head.parameters():
                        p.zero_()
        return net

    def larger(self) -> Merger | None:
        return _BrokenUntil(self.good, self.attempt + 1, self.limit) if self.attempt + 1 < self.limit else None


def _reference(nets: Sequence[MultitaskNet], splits) -> dict[str, float]:  # type: ignore[no-untyped-def]
    return reference_accuracy(nets, check_set(splits.val, CFG.check_shifts, CFG.seed))


def test_a_merge_that_misses_the_budget_is_redone_larger() -> None:
    nets, splits = tiny_zoo()
    result = merge_and_prune(_BrokenUntil(good=2), nets, splits, CFG, _reference(nets, splits))
    assert [a["missed_budget"] for a in result.attempts] == [True, True, False]
    assert not result.missed_budget
    assert any(h["kind"] == "step" for h in result.history)  # the third merge met the budget: pruning ran
    assert sum(c.macs for c in result.merged_costs.values()) > 0


def test_the_loop_ends_when_the_merger_has_nothing_larger() -> None:
    nets, splits = tiny_zoo()
    logged: list[str] = []
    result = merge_and_prune(_BrokenUntil(good=9, limit=3), nets, splits, CFG, _reference(nets, splits),
                             log=logged.append)
    assert len(result.attempts) == 3 and all(a["missed_budget"] for a in result.attempts)
    assert result.missed_budget and len(logged) == 2


def test_pam_grows_its_floor_then_keeps_the_networks_apart() -> None:
    floors = []
    merger: Merger | None = PamMerger(min_keep=0.25)
    while isinstance(merger, PamMerger):
        floors.append(merger.config.min_keep)
        merger = merger.larger()
    assert floors == [0.25, 0.5, 1.0]
    assert merger is not None and merger.name == "separate"  # the last resort is exact: within any budget
    assert merger.larger() is None
