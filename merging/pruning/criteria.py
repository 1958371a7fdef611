"""Channel importance criteria: small classes behind one contract, found by name in a registry.

A :class:`Term` reads one raw score per channel off a pruning unit's Torch-Pruning group (which
sums over the unit's coupled layers: the producer's filters, the depthwise convs and additions
that share its channels, and every reader's input slice). A :class:`Criterion` is a weighted sum
of terms, each normalised by its mean over the layer's channels, so layers of different sizes
compete fairly (global raw scores starve whichever layer has small weights).

A new criterion is one new :class:`Term` subclass and one line in :data:`CRITERIA`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch_pruning as tp
from torch import Tensor

from merging.errors import MergingError
from merging.pruning.config import PruneConfig


class Term(ABC):
    """One raw, non-negative score per channel of a pruning unit."""

    needs_gradients: ClassVar[bool] = False  # the joint loss's gradients must be in ``.grad`` first

    @abstractmethod
    def __call__(self, group: tp.Group) -> Tensor:
        """(width,) scores of the channels of ``group`` (the unit's producer's output channels)."""


class Taylor(Term):
    """First-order Taylor importance |w * dL/dw| on the joint loss of all tasks."""

    needs_gradients = True

    def __init__(self) -> None:
        self._imp = tp.importance.GroupTaylorImportance(normalizer=None)

    def __call__(self, group: tp.Group) -> Tensor:
        return self._imp(group).detach().abs()


class Magnitude(Term):
    """L2 norm of the weights that carry the channel."""

    def __init__(self) -> None:
        self._imp = tp.importance.GroupMagnitudeImportance(p=2, normalizer=None)

    def __call__(self, group: tp.Group) -> Tensor:
        return self._imp(group).detach()


@dataclass(frozen=True)
class Criterion:
    """Importance = sum over terms of weight * raw / (the term's mean over the layer's channels)."""

    terms: tuple[tuple[Term, float], ...]

    @property
    def needs_gradients(self) -> bool:
        return any(term.needs_gradients for term, _ in self.terms)

    def raw(self, group: tp.Group) -> list[Tensor]:
        """Every term's raw scores of one unit."""
        return [term(group) for term, _ in self.terms]

    def layer_importance(self, raws: Sequence[Sequence[Tensor]]) -> list[Tensor]:
        """Importance of the units of one layer, from their raw scores (``raw``), in the same order."""
        parts: list[list[Tensor]] = [[] for _ in raws]
        for t, (_, weight) in enumerate(self.terms):
            mean = torch.cat([r[t] for r in raws]).mean().clamp_min(1e-12)
            for k, r in enumerate(raws):
                parts[k].append(weight * r[t] / mean)
        return [torch.stack(p).sum(0) for p in parts]


CRITERIA: dict[str, Callable[[PruneConfig], Criterion]] = {
    "taylor": lambda cfg: Criterion(((Taylor(), 1.0),)),
    "magnitude": lambda cfg: Criterion(((Magnitude(), 1.0),)),
    "taylor+magnitude": lambda cfg: Criterion(((Taylor(), 1.0), (Magnitude(), cfg.magnitude_weight))),
}


def criterion_of(cfg: PruneConfig) -> Criterion:
    """The criterion ``cfg.criterion`` names."""
    make = CRITERIA.get(cfg.criterion)
    if make is None:
        raise MergingError(
            "bad_argument", f"unknown pruning criterion {cfg.criterion!r} (known: {', '.join(CRITERIA)})"
        )
    return make(cfg)
