"""Price rules: what a channel's importance is divided by when the pruner ranks channels.

Each rule is a small class behind one contract, found by name (``PruneConfig.price``) in
:data:`PRICES`; see ``merging.pruning.importance`` for the cost and share a channel carries.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

from merging.errors import MergingError
from merging.pruning.config import PruneConfig
from merging.pruning.importance import ChannelScores


class PriceRule(ABC):
    @abstractmethod
    def __call__(self, sc: ChannelScores, scores: Sequence[ChannelScores]) -> Tensor:
        """(width,) positive prices of the channels of ``sc``, given every scored group ``scores``."""


class SharePrice(PriceRule):
    """The channel's share of paying combinations relative to its layer's mean: a channel shared by
    many tasks is dearer than an exclusive one of the same layer; layers compete on importance alone."""

    def __call__(self, sc: ChannelScores, scores: Sequence[ChannelScores]) -> Tensor:
        layer = torch.cat([s.share for s in scores if s.layer == sc.layer])
        return (sc.share / max(float(layer.mean()), 1e-12)).clamp_min(1e-12)


class MacsPrice(PriceRule):
    """Expected MACs relative to the mean channel's (the old rule: it starved whole layers, since
    early convs bring the most MACs per channel)."""

    def __call__(self, sc: ChannelScores, scores: Sequence[ChannelScores]) -> Tensor:
        avg = float(torch.cat([s.cost for s in scores]).mean())
        return (sc.cost / max(avg, 1e-12)).clamp_min(1e-12)


class NoPrice(PriceRule):
    """Cost-blind: importance alone ranks channels."""

    def __call__(self, sc: ChannelScores, scores: Sequence[ChannelScores]) -> Tensor:
        return torch.ones_like(sc.importance)


PRICES: dict[str, type[PriceRule]] = {"share": SharePrice, "macs": MacsPrice, "none": NoPrice}


def price_rule_of(cfg: PruneConfig) -> PriceRule:
    """The price rule ``cfg.price`` names."""
    rule = PRICES.get(cfg.price)
    if rule is None:
        raise MergingError("bad_argument", f"unknown price rule {cfg.price!r} (known: {', '.join(PRICES)})")
    return rule()
