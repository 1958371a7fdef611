"""Regrouping: removing a *task* from a channel's set, not only the channel.

A channel of group S serves the tasks of S. When task t no longer needs it, the channel moves to
the group of S - {t} in every member of its pruning unit (the same channel through depthwise
convs and additions, docs/graph.md): its weights into every reader that serves t (the dense
blocks reading any member whose set contains t, and t's head) are cut, and the combinations
without the other tasks of S stop paying for it. When S = {t}, the channel is simply removed. The
edit itself is :func:`merging.pruning.surgery.narrow_channels`, over the channel table of
:mod:`merging.pruning.channel_table`; this module decides which pairs go.

Which pairs (channel c, task t) go: first-order Taylor on the joint loss of cutting c's weights
into every reader that serves t (a reader may serve other tasks too), normalised over the units
of its space, divided by the pair's *saving* (the expected MACs, over a uniformly drawn
combination, of everything that stops being paid: c's filters in every member of its unit for the
combinations that meet S but not S - {t}, and c's slice of every dense reader serving t, for the
combinations that run that reader) relative to the mean saving there. Units are keyed by their
first member (its producer), ``unit[0]`` in ``GroupGraph.units()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from merging.data.base import MultitaskData
from merging.network import MultitaskNet
from merging.pruning.channel_table import ChannelTable, rebuild, table_of
from merging.pruning.config import PruneConfig
from merging.pruning.importance import combination_share, weighted_macs
from merging.pruning.surgery import narrow_channels, narrow_to_served
from merging.train import joint_loss

__all__ = [
    "ChannelTable",
    "drop_tasks",
    "narrow_to_served",
    "pair_importance",
    "pair_savings",
    "rebuild",
    "regroup_step",
    "table_of",
]


def drop_tasks(
    net: MultitaskNet, removals: Mapping[tuple[int, int], Sequence[tuple[int, int]]], frozen: int = 0
) -> int:
    """Remove task ``t`` from channel ``c`` of group (layer, mask) for every (c, t) in ``removals``, in
    every member of its unit, then narrow every set to what it serves (see
    :func:`merging.pruning.surgery.narrow_channels`). In place; returns the number of pairs applied."""
    return narrow_channels(net, removals, frozen)


def pair_savings(net: MultitaskNet) -> dict[tuple[int, int], Tensor]:
    """(layer, mask) of a unit's first member -> (n_tasks,) expected MACs saved per channel of that
    unit by removing task t from its set (0 for tasks not in the set): its filters in every member
    for the combinations that meet the set but not the set without t, and its slice of every dense
    reader serving t."""
    n = len(net.tasks)
    out: dict[tuple[int, int], Tensor] = {}
    graph = net.graph()
    for unit in graph.units():
        mask = unit[0].mask
        own, readers = graph.channel_parts(unit[0])
        save = torch.zeros(n)
        for t in range(n):
            if mask >> t & 1:
                rest = mask & ~(1 << t)
                s = own * (combination_share(mask, n) - (combination_share(rest, n) if rest else 0.0))
                save[t] = s + sum(macs * combination_share(m, n) for m, macs in readers if m >> t & 1)
        out[(unit[0].layer, mask)] = save
    return out


def pair_importance(net: MultitaskNet, data: MultitaskData, cfg: PruneConfig) -> dict[tuple[int, int], Tensor]:
    """(layer, mask) of a unit's first member -> (width, n_tasks): first-order change of the *joint*
    loss if channel c stopped feeding every dense reader that serves t (what removing t from c's set
    does), i.e. |sum over those readers of W[:, c] * dL/dW[:, c]|, summed over ``cfg.taylor_batches``
    batches. A reader serving t may serve other tasks too (a shared block), so the joint loss."""
    n = len(net.tasks)
    graph = net.graph()
    units = graph.units()
    scores = {(u[0].layer, u[0].mask): torch.zeros(graph.widths[u[0]], n) for u in units}
    readers = {(u[0].layer, u[0].mask): graph.input_readers(u[0]) for u in units}
    gen = torch.Generator().manual_seed(cfg.seed)
    was_training = net.training
    net.eval()
    try:
        for b, (xb, yb) in enumerate(data.batches(128, shuffle=True, generator=gen)):
            if b >= cfg.taylor_batches:
                break
            net.zero_grad(set_to_none=True)
            joint_loss(net, net(xb), yb).backward()
            for key, cons in readers.items():
                width = scores[key].shape[0]
                per_task = torch.zeros(width, n)
                for r in cons:
                    conv = net.conv_of(r.node.key)
                    if conv.weight.grad is None:
                        continue
                    wg = (conv.weight * conv.weight.grad)[:, r.offset : r.offset + width].sum((0, 2, 3)).detach()
                    for t in range(n):
                        if r.node.serves >> t & 1:
                            per_task[:, t] += wg
                scores[key] += per_task.abs()
    finally:
        net.zero_grad(set_to_none=True)
        net.train(was_training)
    return scores


def _ranked_pairs(
    net: MultitaskNet,
    imp: dict[tuple[int, int], Tensor],
    save: dict[tuple[int, int], Tensor],
    cfg: PruneConfig,
    frozen: int,
) -> list[tuple[float, float, int, int, int, int]]:
    """(score, saving, layer, mask, channel, task) of every candidate pair, cheapest first; scores
    and savings are normalised over the units of one space (units keyed by the same first layer)."""
    n = len(net.tasks)
    entries: list[tuple[float, float, int, int, int, int]] = []
    for layer in sorted({k[0] for k in imp}):
        keys = [k for k in imp if k[0] == layer and not k[1] & frozen]
        if not keys:
            continue
        vals = torch.cat([imp[k][:, [t for t in range(n) if k[1] >> t & 1]].flatten() for k in keys])
        svals = torch.cat([save[k][[t for t in range(n) if k[1] >> t & 1]] for k in keys])
        imean = max(float(vals.mean()), 1e-12)
        smean = max(float(svals.mean()), 1e-12)
        for k in sorted(keys):
            for t in range(n):
                if not k[1] >> t & 1:
                    continue
                s = float(save[k][t])
                price = max(s / smean, 1e-6) if cfg.price != "none" else 1.0
                for c in range(imp[k].shape[0]):
                    entries.append((float(imp[k][c, t]) / imean / price, s, layer, k[1], c, t))
    entries.sort(key=lambda e: (e[0], e[2], e[3], e[4], e[5]))
    return entries


def regroup_step(
    net: MultitaskNet, data: MultitaskData, cfg: PruneConfig, fraction: float, frozen: int = 0
) -> dict[str, Any]:
    """Remove about ``fraction`` of the expected MACs by dropping (channel, task) pairs, lowest
    importance per unit of saving first. Pairs touching a group that serves a frozen task are left
    alone (that group's channels, order and weights are what the frozen task computes with)."""
    entries = _ranked_pairs(net, pair_importance(net, data, cfg), pair_savings(net), cfg, frozen)
    target = fraction * weighted_macs(net)
    graph = net.graph()
    last = len(net.layout) - 1
    # Units the heads read (their channels are the last layer's): a head keeps at least one input.
    feeds_heads = {(u[0].layer, u[0].mask) for u in graph.units() if any(k.layer == last for k in u)}
    last_input = {t: sum(w for m, w in net.layout[last].items() if m >> t & 1) for t in range(len(net.tasks))}
    # A space keeps at least one live channel: its readers need something to read (on the small
    # widths of a MobileNetV2 block the cheapest pairs can empty a whole expansion).
    live = {l: sum(net.layout[l].values()) for l in {u[0].layer for u in graph.units()}}
    left: dict[tuple[int, int, int], int] = {}  # (layer, mask, channel) -> its set after the pairs chosen
    chosen: dict[tuple[int, int], list[tuple[int, int]]] = {}
    removed = 0.0
    for _, s, l, mask, c, t in entries:
        if removed >= target:
            break
        rest = left.get((l, mask, c), mask) & ~(1 << t)
        if ((l, mask) in feeds_heads and last_input[t] <= 1) or (not rest and live[l] <= 1):
            continue
        last_input[t] -= (l, mask) in feeds_heads
        live[l] -= not rest
        left[(l, mask, c)] = rest
        chosen.setdefault((l, mask), []).append((c, t))
        removed += s
    pairs = drop_tasks(net, chosen, frozen)
    return {"fraction": fraction, "pairs": pairs, "frozen": frozen, "regroup": True}
