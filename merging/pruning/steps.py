"""What one prune step removes, found by name (``PruneConfig.removes``) in :data:`STEPS`: whole
channels (``prune_step``) or (channel, task) pairs (``merging.pruning.regroup.regroup_step``: a
channel leaves a task's set before it goes). Both take (net, data, cfg, fraction, frozen) and
return the step's record."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from merging.data.base import MultitaskData
from merging.distributed import broadcast_object
from merging.errors import MergingError
from merging.network import MultitaskNet
from merging.pruning.config import PruneConfig
from merging.pruning.importance import score_channels, weighted_macs
from merging.pruning.prices import price_rule_of
from merging.pruning.regroup import regroup_step
from merging.pruning.surgery import cut_channels

Step = Callable[[MultitaskNet, MultitaskData, PruneConfig, float, int], dict[str, Any]]


def prune_step(
    net: MultitaskNet, data: MultitaskData, cfg: PruneConfig, fraction: float, frozen: int = 0
) -> dict[str, Any]:
    """Remove about ``fraction`` of the expected MACs of the groups serving no ``frozen`` task
    (a task mask), lowest importance per unit cost first (in place)."""
    price = price_rule_of(cfg)
    scores = score_channels(net, data, cfg)
    everything = float(sum(float(sc.cost.sum()) for sc in scores)) or 1.0
    scores = [sc for sc in scores if not sc.mask & frozen]
    prunable = float(sum(float(sc.cost.sum()) for sc in scores))
    entries: list[tuple[float, float, int, int, int]] = []  # (score, cost, layer, mask, index)
    for sc in scores:
        ratio = sc.importance / price(sc, scores)
        entries.extend((float(ratio[j]), float(sc.cost[j]), sc.layer, sc.mask, j) for j in range(len(ratio)))
    entries.sort(key=lambda e: (e[0], e[2], e[3], e[4]))
    target = fraction * weighted_macs(net) * prunable / everything
    chosen: dict[tuple[int, int], list[int]] = {}
    removed = 0.0
    for _, cost, l, mask, j in entries:
        if removed >= target:
            break
        chosen.setdefault((l, mask), []).append(j)
        removed += cost
    chosen = broadcast_object(chosen)  # which channels go: rank 0 decides for every rank
    removed_groups = cut_channels(net, chosen, {(sc.layer, sc.mask): sc.importance for sc in scores})
    return {
        "fraction": fraction,
        "channels": sum(len(v) for v in chosen.values()),
        "removed_groups": removed_groups,
        "frozen": frozen,
    }


STEPS: dict[str, Step] = {"channels": prune_step, "pairs": regroup_step}


def step_of(cfg: PruneConfig) -> Step:
    """The step function ``cfg.removes`` names."""
    step = STEPS.get(cfg.removes)
    if step is None:
        raise MergingError("bad_argument", f"unknown prune step {cfg.removes!r} (known: {', '.join(STEPS)})")
    return step
