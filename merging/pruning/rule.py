"""The budget rule: which check images decide, and how a result is certified.

The check set (validation, plus shifted copies while it is small) is split by image: the pruner's
many step decisions use one part; the other part is looked at once per candidate at the end, the
result first and then back along the accepted trajectory, so the steps cannot pick the luckiest
network of one check set (measured: ``pam budget-study``, results/budget-rule.md). Every route that
judges a budget (the project's pruner, Torch-Pruning's schedule, the width grid) uses this rule.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from merging.cost import combination_cost
from merging.data.base import MultitaskData
from merging.distributed import broadcast_object
from merging.network import MultitaskNet
from merging.pruning.budget import Reference, assess, check_subset, margin, resolution_line, split_checks
from merging.pruning.config import PruneConfig
from merging.train import random_shift


def check_set(val: MultitaskData, shifts: int, seed: int, shift_below: int = 5000) -> MultitaskData:
    """Validation data plus ``shifts`` randomly 1-pixel-shifted copies (deterministic for a seed);
    no copies once val has ``shift_below`` images or more (they add little to independent images)."""
    val = val.in_memory()  # the check set is built in memory (streaming data loads its images here)
    if shifts <= 0 or len(val) >= shift_below:
        return val
    gen = torch.Generator().manual_seed(10_000 + seed)
    xs = [val.x] + [random_shift(val.x, 1, gen) for _ in range(shifts)]
    ys = {k: torch.cat([v] * (shifts + 1)) for k, v in val.y.items()}
    return MultitaskData(val.tasks, torch.cat(xs), ys, images=len(val))


def images_of(checks: MultitaskData) -> int:
    return checks.images or len(checks)


class Certifier:
    """The held-out part of the check set and the one test each candidate gets there."""

    def __init__(self, checks: MultitaskData, ref: Mapping[str, float], cfg: PruneConfig) -> None:
        self.checks, self.ref, self.cfg = checks, ref, cfg

    def describe(self) -> str:
        return resolution_line(images_of(self.checks), self.cfg.confidence, self.cfg.budget)

    def certify(
        self, candidates: Sequence[MultitaskNet], history: list[dict[str, Any]]
    ) -> tuple[MultitaskNet, dict[str, Any]] | None:
        """The first candidate (the result, then back along the trajectory) within budget on the
        held-out part, with its certificate; None if not even the start network is."""
        for back, cand in enumerate(candidates):
            v = broadcast_object(assess(cand, self.checks, self.ref, self.cfg.budget, self.cfg.confidence))
            history.append({"kind": "certify", "back": back, "macs_all": combination_cost(cand).macs,
                            "drop": v.drop, "drop_upper": v.upper, "disagreement": v.disagreement,
                            "certified": v.ok})
            if v.ok:
                cert = {"images": v.images, "confidence": self.cfg.confidence, "budget": self.cfg.budget,
                        "back": back, "tasks": {t: {"drop": v.drop[t], "upper": v.upper[t],
                                                    "disagreement": v.disagreement[t],
                                                    "margin": margin(v.disagreement[t], v.images,
                                                                     self.cfg.confidence)}
                                                for t in v.drop}}
                return cand, cert
        return None


def decision_sets(
    checks: MultitaskData, ref: Mapping[str, float], cfg: PruneConfig
) -> tuple[MultitaskData, Mapping[str, float], Certifier | None]:
    """(steering check set, its reference, the certifier) from ``cfg.certify_share``."""
    if cfg.certify_share <= 0:
        return checks, ref, None
    steer_idx, held_idx = split_checks(checks, cfg.certify_share, cfg.seed)
    sub = (lambda idx: ref.subset(idx)) if isinstance(ref, Reference) else (lambda idx: ref)
    return (check_subset(checks, steer_idx), sub(steer_idx),
            Certifier(check_subset(checks, held_idx), sub(held_idx), cfg))


class BudgetRule:
    """The rule for routes that are not the pruner (they judge whole networks): ``steer`` on the
    decision part, then ``certify`` the candidates (best first) on the held-out part."""

    def __init__(self, val: MultitaskData, reference: Mapping[str, float], cfg: PruneConfig) -> None:
        full = check_set(val, cfg.check_shifts, cfg.seed, cfg.shift_below)
        self.checks, self.ref, self.certifier = decision_sets(full, reference, cfg)
        self.cfg = cfg

    def steer(self, net: MultitaskNet) -> bool:
        conf = self.cfg.steer_confidence or self.cfg.confidence
        return assess(net, self.checks, self.ref, self.cfg.budget, conf).ok

    def certify(self, candidates: Sequence[MultitaskNet]) -> MultitaskNet | None:
        if self.certifier is None:
            return candidates[0] if candidates else None
        found = self.certifier.certify(candidates, [])
        return found[0] if found else None

    def judge(self) -> Callable[[MultitaskNet], bool]:
        """One network judged alone: steered and certified (the width grid's candidates)."""
        return lambda net: self.steer(net) and self.certify([net]) is not None
