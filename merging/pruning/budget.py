"""The accuracy budget: is a network within ``budget`` points of its reference, on the check set?

A point estimate on a few hundred images is noise (one point of 359 validation images is 3.6
images), and a pruner that accepts or rejects dozens of steps on the same check set keeps the
luckiest one: measured before this module, networks within budget on the check set lost up to 3.9
points on test. So the budget is a one-sided non-inferiority test on the *paired* difference:

    drop = mean_i (ref_correct_i - net_correct_i)        (per source image, its shifted copies averaged)
    accept  iff  drop + z * SE(drop) <= budget            (z from ``PruneConfig.confidence``)

Pairing (the same images scored by the reference and the candidate) makes the SE the noise of the
*disagreements*, not of each accuracy; clustering by source image keeps the shifted copies from
counting as independent evidence. Without per-image reference correctness (a plain dict of
accuracies), the reference is taken as exact and the SE is that of the candidate's accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import torch
from torch import Tensor

from merging.data.base import MultitaskData
from merging.network import MultitaskNet
from merging.train import correctness


class Reference(dict[str, float]):
    """Per-task reference accuracy (percent) on a check set, plus each sample's correctness there
    (what the paired test needs). Behaves as the plain ``{task: accuracy}`` dict everywhere else."""

    def __init__(self, accuracy: Mapping[str, float], correct: Mapping[str, Tensor] | None = None) -> None:
        super().__init__(accuracy)
        self.correct: dict[str, Tensor] = dict(correct or {})


def reference_accuracy(nets: Sequence[MultitaskNet], checks: MultitaskData) -> Reference:
    """Each unpruned single-task network on the check set: the budget's reference."""
    correct: dict[str, Tensor] = {}
    for net in nets:
        correct.update(correctness(net, checks.select_tasks(net.task_names)))
    return Reference({t: 100.0 * float(c.mean()) for t, c in correct.items()}, correct)


@dataclass(frozen=True)
class Verdict:
    accuracy: dict[str, float]  # check-set accuracy per task (percent)
    drop: dict[str, float]  # reference minus accuracy (points; negative: better than the reference)
    upper: dict[str, float]  # one-sided upper confidence bound of the drop (points)
    failing: tuple[str, ...]  # tasks whose upper bound exceeds the budget

    @property
    def ok(self) -> bool:
        return not self.failing


def z_value(confidence: float) -> float:
    """One-sided normal quantile; confidence 0.5 gives 0 (the bare point estimate)."""
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    return NormalDist().inv_cdf(confidence)


def _per_image(c: Tensor, images: int | None) -> Tensor:
    if images is None or images <= 0 or c.numel() % images:
        return c
    return c.reshape(-1, images).mean(0)  # copies of image i sit at i, i + images, ...


def judge(
    net_correct: Mapping[str, Tensor], reference: Mapping[str, float], budget: float, confidence: float,
    images: int | None = None,
) -> Verdict:
    """The verdict for per-sample correctness ``net_correct`` against ``reference``."""
    z = z_value(confidence)
    ref_correct = getattr(reference, "correct", {})
    acc: dict[str, float] = {}
    drop: dict[str, float] = {}
    upper: dict[str, float] = {}
    for t, c in net_correct.items():
        acc[t] = 100.0 * float(c.mean())
        if t in ref_correct and ref_correct[t].shape == c.shape:
            d = _per_image(ref_correct[t].float() - c.float(), images)
        else:
            d = float(reference[t]) / 100.0 - _per_image(c.float(), images)
        se = float(d.std(unbiased=True)) / max(1, d.numel()) ** 0.5 if d.numel() > 1 else 0.0
        # Unpaired: the exact difference of accuracies (the mean of d equals it only up to rounding).
        drop[t] = 100.0 * float(d.mean()) if t in ref_correct else float(reference[t]) - acc[t]
        upper[t] = drop[t] + z * 100.0 * se
    failing = tuple(t for t in net_correct if upper[t] > budget + 1e-9)
    return Verdict(acc, drop, upper, failing)


def assess(
    net: MultitaskNet, checks: MultitaskData, reference: Mapping[str, float], budget: float, confidence: float,
    tasks: Sequence[str] | None = None,
) -> Verdict:
    """Run ``net`` on the check set and judge it (see the module docstring)."""
    with torch.no_grad():
        return judge(correctness(net, checks, tasks), reference, budget, confidence, checks.images)
