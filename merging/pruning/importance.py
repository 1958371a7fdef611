"""Channel importance and channel cost for pruning a multitask network.

Importance: Torch-Pruning's group Taylor importance (first-order, on the *joint* loss of all
tasks, summed over the dependency group: the block's own filter and every consumer's input
slice) and group magnitude, each normalised by its mean over the layer's channels so layers of
different sizes compete fairly (global raw scores starve whichever layer has small weights).

Cost: a channel of group S at layer l is paid for by every combination that meets S. Its
*weighted cost* is the MACs it brings (its own filter, plus its slice in every block or head
that reads it) times the share of combinations that pay each of those parts, i.e. its expected
MACs over a uniformly drawn combination; its *share* is that over the MACs it would cost if every
combination paid. The pruner prices a channel by its share relative to its layer's mean
(``PruneConfig.price="share"``): a channel shared by many tasks is dearer than an exclusive one of
the same layer, while layers compete on normalised importance alone. Pricing by raw expected MACs
(``price="macs"``) starved whole layers: early convs bring the most MACs per channel, so it pruned
almost only the first conv and never the dense layer (measured on the demo's zoo).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import Tensor

from merging.data.base import MultitaskData
from merging.network import MultitaskNet
from merging.pruning.config import PruneConfig
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
    """Importance and weighted cost of every channel of every group."""
    module = net.for_combination(None)
    example = data.x[:2]
    graph = tp.DependencyGraph().build_dependency(module, example_inputs=example, verbose=False)
    use_taylor = cfg.criterion in ("taylor", "taylor+magnitude")
    use_mag = cfg.criterion in ("magnitude", "taylor+magnitude")
    if use_taylor:
        accumulate_gradients(net, data, cfg)
    taylor = tp.importance.GroupTaylorImportance(normalizer=None)
    magnitude = tp.importance.GroupMagnitudeImportance(p=2, normalizer=None)
    costs = channel_costs(net)
    full = channel_costs(net, weighted=False)
    raw: list[tuple[int, int, Tensor | None, Tensor | None]] = []
    # One score per pruning unit, on its producer: Torch-Pruning's group spans the depthwise convs
    # and additions that share its channels.
    for unit in net.graph().units():
        key = unit[0]
        conv = net.block(key.layer, key.mask).conv
        idxs = list(range(net.group_width(key.layer, key.mask)))
        group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=idxs)
        t = taylor(group).detach().abs() if use_taylor else None
        m = magnitude(group).detach() if use_mag else None
        raw.append((key.layer, key.mask, t, m))
    net.zero_grad(set_to_none=True)
    out: list[ChannelScores] = []
    for l in range(len(net.layout)):
        here = [r for r in raw if r[0] == l]
        if not here:
            continue  # every group of this layer belongs to a unit scored at an earlier layer
        imp_parts: list[list[Tensor]] = [[] for _ in here]
        for which, weight in ((2, 1.0), (3, cfg.magnitude_weight if use_taylor else 1.0)):
            vals = [r[which] for r in here]
            if vals[0] is None:
                continue
            present: list[Tensor] = [v for v in vals if isinstance(v, Tensor)]
            mean = torch.cat(present).mean().clamp_min(1e-12)
            for k, v in enumerate(vals):
                imp_parts[k].append(weight * v / mean)  # type: ignore[operator]
        for k, (_, mask, _, _) in enumerate(here):
            imp = torch.stack(imp_parts[k]).sum(0)  # type: ignore[misc]
            cost = torch.full_like(imp, costs[(l, mask)])
            share = torch.full_like(imp, costs[(l, mask)] / max(full[(l, mask)], 1e-12))
            out.append(ChannelScores(l, mask, imp, cost, share))
    return out
