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
    (what the paired test needs) and the reference networks themselves (what retraining can learn
    from: ``PruneConfig.distill``). Behaves as the plain ``{task: accuracy}`` dict everywhere else."""

    def __init__(
        self, accuracy: Mapping[str, float], correct: Mapping[str, Tensor] | None = None,
        nets: Sequence[MultitaskNet] = (),
    ) -> None:
        super().__init__(accuracy)
        self.correct: dict[str, Tensor] = dict(correct or {})
        self.nets: list[MultitaskNet] = list(nets)

    def subset(self, idx: Tensor) -> Reference:
        """The reference on the check-set samples ``idx`` (accuracy recomputed there)."""
        if not self.correct:
            return self
        correct = {t: c[idx] for t, c in self.correct.items()}
        return Reference({t: 100.0 * float(c.mean()) for t, c in correct.items()}, correct, self.nets)


def reference_accuracy(nets: Sequence[MultitaskNet], checks: MultitaskData) -> Reference:
    """Each unpruned single-task network on the check set: the budget's reference."""
    correct: dict[str, Tensor] = {}
    for net in nets:
        correct.update(correctness(net, checks.select_tasks(net.task_names)))
    return Reference({t: 100.0 * float(c.mean()) for t, c in correct.items()}, correct, nets)


def margin(disagreement: float, images: int, confidence: float) -> float:
    """Half-width (points) the paired test adds to a point drop: z * sqrt(p / n) for a network that
    disagrees with its reference on a share ``p`` of ``n`` independent images. A point drop can be
    certified within budget B only if it is at most B minus this."""
    if images <= 0:
        return float("inf")
    return 100.0 * z_value(confidence) * (max(disagreement, 0.0) / images) ** 0.5


def resolution_line(images: int, confidence: float, budget: float, disagreement: Sequence[float] = (0.02, 0.05)) -> str:
    """What a check set of ``images`` independent images can certify, said up front."""
    parts = [f"at {p:.0%} disagreement +-{margin(p, images, confidence):.2f} points "
             f"(point drops up to {budget - margin(p, images, confidence):.2f} certify)" for p in disagreement]
    return f"check set: {images:,} independent images, one-sided {confidence:.0%} test; " + "; ".join(parts)


def split_checks(checks: MultitaskData, share: float, seed: int) -> tuple[Tensor, Tensor]:
    """Sample indices of two disjoint parts of the check set, split by source image (the shifted
    copies of an image stay together): ``1 - share`` for the pruner's step decisions, ``share``
    held out for the one certification at the end."""
    images = checks.images or len(checks)
    gen = torch.Generator().manual_seed(20_000 + seed)
    held = torch.zeros(images, dtype=torch.bool)
    held[torch.randperm(images, generator=gen)[: round(share * images)]] = True
    sample_held = held[torch.arange(len(checks)) % images]
    return (~sample_held).nonzero().flatten(), sample_held.nonzero().flatten()


def check_subset(checks: MultitaskData, idx: Tensor) -> MultitaskData:
    """Samples ``idx`` of a check set from :func:`split_checks`, keeping the image clustering."""
    images = checks.images or len(checks)
    part = checks.subset(idx)
    # split_checks keeps whole images and the order i, i + images, ...: the part's copies of an
    # image sit len(part) // copies apart again.
    copies = len(checks) // images
    part.images = len(part) // copies if copies > 1 else None
    return part


@dataclass(frozen=True)
class Verdict:
    accuracy: dict[str, float]  # check-set accuracy per task (percent)
    drop: dict[str, float]  # reference minus accuracy (points; negative: better than the reference)
    upper: dict[str, float]  # one-sided upper confidence bound of the drop (points)
    failing: tuple[str, ...]  # tasks whose upper bound exceeds the budget
    disagreement: dict[str, float]  # share of images where the network and its reference differ in correctness
    images: int = 0  # independent images the verdict rests on

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
    disagree: dict[str, float] = {}
    n_images = 0
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
        disagree[t] = float(d.abs().gt(0).float().mean()) if t in ref_correct else float("nan")
        n_images = int(d.numel())
    failing = tuple(t for t in net_correct if upper[t] > budget + 1e-9)
    return Verdict(acc, drop, upper, failing, disagree, n_images)


def assess(
    net: MultitaskNet, checks: MultitaskData, reference: Mapping[str, float], budget: float, confidence: float,
    tasks: Sequence[str] | None = None,
) -> Verdict:
    """Run ``net`` on the check set and judge it (see the module docstring)."""
    with torch.no_grad():
        return judge(correctness(net, checks, tasks), reference, budget, confidence, checks.images)
