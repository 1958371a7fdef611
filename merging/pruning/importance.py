"""Channel importance and channel cost for pruning a multitask network.

Importance (``PruneConfig.criterion``, the classes in ``merging.pruning.criteria``): Torch-Pruning's
group Taylor importance (first-order, on the *joint* loss of all tasks, summed over the dependency
group: the block's own filter and every consumer's input slice) and group magnitude, each
normalised by its mean over the layer's channels so layers of different sizes compete fairly
(global raw scores starve whichever layer has small weights).

Cost: a channel of group S at layer l is paid for by every combination that meets S. Its
*weighted cost* is the MACs it brings (its own filter, plus its slice in every block or head
that reads it) times the share of combinations that pay each of those parts, i.e. its expected
MACs over a uniformly drawn combination; its *share* is that over the MACs it would cost if every
combination paid. The pruner prices a channel by its share relative to its layer's mean
(``PruneConfig.price="share"``; the rules are in ``merging.pruning.prices``): a channel shared by
many tasks is dearer than an exclusive one of the same layer, while layers compete on normalised
importance alone. Pricing by raw expected MACs (``price="macs"``) starved whole layers: early convs
bring the most MACs per channel, so it pruned almost only the first conv and never the dense
layer (measured on the demo's zoo).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import Tensor

from merging.data.base import MultitaskData
from merging.graph import GroupKey
from merging.network import MultitaskNet
from merging.pruning.config import PruneConfig
from merging.pruning.criteria import criterion_of
from merging.train import joint_loss


def combination_share(mask: int, n_tasks: int) -> float:
    """Share of the 2^N - 1 combinations that meet task set ``mask``."""
    k = bin(mask).count("1")
    total = (1 << n_tasks) - 1
    return ((1 << n_tasks) - (1 << (n_tasks - k))) / total


@dataclass
class ChannelScores:
    layer: int
    mask: int
    importance: Tensor  # (width,) layer-normalised importance
    cost: Tensor  # (width,) expected MACs per channel over combinations
    share: Tensor  # (width,) cost / the channel's MACs if every combination paid for it: in (0, 1]


def channel_costs(net: MultitaskNet, weighted: bool = True) -> dict[tuple[int, int], float]:
    """(layer, mask) -> MACs one channel of that group brings: its own filter plus its slice of every
    reader, each part times the share of combinations that run it (``weighted``; otherwise each part
    counts once), i.e. its expected MACs over a uniformly drawn combination."""
    n = len(net.tasks)
    share = (lambda m: combination_share(m, n)) if weighted else (lambda m: 1.0)
    out: dict[tuple[int, int], float] = {}
    graph = net.graph()
    for key in graph.groups():
        own, readers = graph.channel_parts(key)
        out[(key.layer, key.mask)] = float(own * share(key.mask) + sum(macs * share(m) for m, macs in readers))
    return out


def weighted_macs(net: MultitaskNet) -> float:
    """Expected MACs of a uniformly drawn combination (the quantity each prune step cuts)."""
    from merging.cost import cost_table

    table = cost_table(net)
    return sum(c.macs for c in table.values()) / len(table)


def accumulate_gradients(net: MultitaskNet, data: MultitaskData, cfg: PruneConfig) -> None:
    net.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    net.eval()  # gradients of the deployed function (BN in inference mode)
    for b, (xb, yb) in enumerate(data.batches(128, shuffle=True, generator=gen)):
        if b >= cfg.taylor_batches:
            break
        joint_loss(net, net(xb), yb).backward()


def score_channels(net: MultitaskNet, data: MultitaskData, cfg: PruneConfig) -> list[ChannelScores]:
    """Importance (``cfg.criterion``, see ``merging.pruning.criteria``) and weighted cost of every
    channel of every group. The one Torch-Pruning dependency graph of a prune step is built here."""
    criterion = criterion_of(cfg)
    module = net.for_combination(None)
    graph = tp.DependencyGraph().build_dependency(module, example_inputs=data.x[:2], verbose=False)
    if criterion.needs_gradients:
        accumulate_gradients(net, data, cfg)
    # One score per pruning unit, on its producer: Torch-Pruning's group spans the depthwise convs
    # and additions that share its channels.
    raw: dict[GroupKey, list[Tensor]] = {}
    for unit in net.graph().units():
        key = unit[0]
        idxs = list(range(net.group_width(key.layer, key.mask)))
        group = graph.get_pruning_group(net.block(key.layer, key.mask).conv, tp.prune_conv_out_channels, idxs=idxs)
        raw[key] = criterion.raw(group)
    net.zero_grad(set_to_none=True)
    costs = channel_costs(net)
    full = channel_costs(net, weighted=False)
    out: list[ChannelScores] = []
    for l in range(len(net.layout)):
        here = [k for k in raw if k.layer == l]  # none: every group here is in a unit of an earlier layer
        for key, imp in zip(here, criterion.layer_importance([raw[k] for k in here]) if here else [], strict=True):
            c = costs[(l, key.mask)]
            cost = torch.full_like(imp, c)
            share = torch.full_like(imp, c / max(full[(l, key.mask)], 1e-12))
            out.append(ChannelScores(l, key.mask, imp, cost, share))
    return out
