"""Regrouping: removing a *task* from a channel's set, not only the channel.

A channel of group S at layer l serves the tasks of S. When task t no longer needs it, the channel
moves to the group of S - {t}: its weights into every reader that serves t (blocks at l + 1 whose
set contains t, and t's head) are cut, and the combinations without the other tasks of S stop
paying for it. When S = {t}, the channel is simply removed. The wiring rule stays exact: a channel
of S - {t} keeps reading what it read (supersets of S are supersets of S - {t}), and only readers
whose set is a subset of S - {t} still read it.

Surgery goes through a *channel table*: every layer as one dense weight matrix over the whole layer
below (zeros where a block does not read), one task set per channel. Edits change sets and zero
columns; :func:`rebuild` turns the table back into blocks, one per set, each reading exactly the
superset groups below that it has a non-zero weight from (a read whose weights are all zero buys
nothing, so it is dropped; the outputs are unchanged, the MACs fall).

Which pairs (channel c, task t) go: first-order Taylor on the joint loss of cutting c's weights
into every reader that serves t (a reader may serve other tasks too), layer-normalised, divided
by the pair's *saving* (the
expected MACs, over a uniformly drawn combination, of everything that stops being paid: c's filter
for the combinations that meet S but not S - {t}, and c's slice of every reader serving t, for the
combinations that run that reader) relative to its layer's mean saving.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from merging.data.base import MultitaskData
from merging.errors import MergingError
from merging.mergers.base import require_chain
from merging.network import MultitaskNet, is_superset
from merging.pruning.config import PruneConfig
from merging.pruning.importance import combination_share, weighted_macs
from merging.train import joint_loss


@dataclass
class LayerTable:
    masks: list[int]  # task set of every channel (0: removed)
    weight: Tensor  # (channels, channels of the layer below or image channels, kh, kw)
    bias: Tensor | None
    bn: dict[str, Tensor] | None  # weight, bias, running_mean, running_var (per channel)
    bn_tracked: Tensor | None  # num_batches_tracked of the first block (BN counters are not per channel)


@dataclass
class ChannelTable:
    layers: list[LayerTable]
    heads: dict[str, tuple[Tensor, Tensor | None]]  # task -> (weight over the last layer's channels, bias)

    def group_rows(self, layer: int, mask: int) -> list[int]:
        return [i for i, m in enumerate(self.layers[layer].masks) if m == mask]


def _offsets(net: MultitaskNet, layer: int) -> dict[int, tuple[int, int]]:
    """mask -> (start, end) of that group's channels in the table of ``layer`` (layout order)."""
    out: dict[int, tuple[int, int]] = {}
    pos = 0
    for mask, width in net.layout[layer].items():
        out[mask] = (pos, pos + width)
        pos += width
    return out


@torch.no_grad()
def table_of(net: MultitaskNet) -> ChannelTable:
    layers: list[LayerTable] = []
    for l, groups in enumerate(net.layout):
        below = _offsets(net, l - 1) if l > 0 else None
        n_in = net.arch.in_channels if below is None else sum(net.layout[l - 1].values())
        first = net.block(l, next(iter(groups)))
        k = first.conv.kernel_size
        width = sum(groups.values())
        weight = torch.zeros(width, n_in, *k)
        bias = torch.zeros(width) if first.conv.bias is not None else None
        bn = {n: torch.zeros(width) for n in ("weight", "bias", "running_mean", "running_var")} \
            if first.bn is not None else None
        masks: list[int] = []
        row = 0
        for mask, w in groups.items():
            block = net.block(l, mask)
            cols = torch.arange(n_in) if below is None else torch.cat(
                [torch.arange(*below[m]) for m in net.reads[(l, mask)]])
            weight[row : row + w][:, cols] = block.conv.weight
            if bias is not None and block.conv.bias is not None:
                bias[row : row + w] = block.conv.bias
            if bn is not None:
                assert block.bn is not None
                for n in bn:
                    bn[n][row : row + w] = getattr(block.bn, n)
            masks += [mask] * w
            row += w
        tracked = first.bn.num_batches_tracked.clone() if first.bn is not None else None  # type: ignore[union-attr]
        layers.append(LayerTable(masks, weight, bias, bn, tracked))
    last = _offsets(net, len(net.layout) - 1)
    n_last = sum(net.layout[-1].values())
    heads: dict[str, tuple[Tensor, Tensor | None]] = {}
    for i, t in enumerate(net.task_names):
        conv = net.head(t).conv
        hw = torch.zeros(conv.out_channels, n_last, *conv.kernel_size)
        hcols = torch.cat([torch.arange(*last[m]) for m in net.head_reads(i)])
        hw[:, hcols] = conv.weight
        heads[t] = (hw, None if conv.bias is None else conv.bias.clone())
    return ChannelTable(layers, heads)


@torch.no_grad()
def rebuild(net: MultitaskNet, table: ChannelTable) -> None:
    """Replace ``net``'s blocks and heads (in place) by those the table describes."""
    layout: list[dict[int, int]] = []
    order: list[list[int]] = []  # per layer: table rows in the new layout order
    reads: dict[tuple[int, int], list[int]] = {}
    for l, lt in enumerate(table.layers):
        groups = sorted({m for m in lt.masks if m})
        rows = [i for m in groups for i in range(len(lt.masks)) if lt.masks[i] == m]
        layout.append({m: lt.masks.count(m) for m in groups})
        order.append(rows)
        if l == 0:
            continue
        below = table.layers[l - 1].masks
        for m in groups:
            mine = [i for i in range(len(lt.masks)) if lt.masks[i] == m]
            used = lt.weight[mine].abs().flatten(2).sum((0, 2))  # per channel below
            live = [g for g in layout[l - 1] if is_superset(g, m)]
            if not live:
                raise MergingError("wiring", f"regroup: layer {l} group {m} has no superset group below")
            nonzero = [g for g in live if any(float(used[j]) > 0 for j in range(len(below)) if below[j] == g)]
            reads[(l, m)] = nonzero or [max(live, key=lambda g: layout[l - 1][g])]
    for i, t in enumerate(net.task_names):
        if not any(m >> i & 1 for m in layout[-1]):
            raise MergingError("empty_task", f"regroup would leave task {t!r} with no input")
    fresh = MultitaskNet(net.tasks, net.arch, layout, reads=reads, meta=net.meta)
    for l, lt in enumerate(table.layers):
        below_rows = order[l - 1] if l > 0 else None
        below_masks = table.layers[l - 1].masks if l > 0 else None
        for m in layout[l]:
            rows = [i for i in order[l] if lt.masks[i] == m]
            block = fresh.block(l, m)
            if below_rows is None:
                cols = list(range(lt.weight.shape[1]))
            else:
                assert below_masks is not None
                cols = [j for g in fresh.reads[(l, m)] for j in below_rows if below_masks[j] == g]
            block.conv.weight.copy_(lt.weight[rows][:, cols])
            if lt.bias is not None:
                block.conv.bias.copy_(lt.bias[rows])  # type: ignore[union-attr]
            if lt.bn is not None and block.bn is not None:
                for name, v in lt.bn.items():
                    getattr(block.bn, name).copy_(v[rows])
                if lt.bn_tracked is not None:
                    block.bn.num_batches_tracked.copy_(lt.bn_tracked)  # type: ignore[union-attr]
    last_masks = table.layers[-1].masks
    for i, t in enumerate(net.task_names):
        w, b = table.heads[t]
        cols = [j for g in fresh.head_reads(i) for j in order[-1] if last_masks[j] == g]
        head = fresh.head(t).conv
        head.weight.copy_(w[:, cols])
        if b is not None:
            head.bias.copy_(b)  # type: ignore[union-attr]
    net.layout, net.reads = fresh.layout, fresh.reads
    net.blocks, net.heads = fresh.blocks, fresh.heads
    net.train(net.training)
    net.check_wiring()


@torch.no_grad()
def drop_tasks(
    net: MultitaskNet, removals: Mapping[tuple[int, int], Sequence[tuple[int, int]]], frozen: int = 0
) -> int:
    """Remove task ``t`` from channel ``c`` of group (layer, mask), for every (c, t) in ``removals``
    (c indexes the group's channels, t the task), cutting c's weights into every reader serving t.
    Then every channel's set is narrowed to the tasks it still serves through non-zero weights (a
    channel serving nothing is removed), except in groups serving a ``frozen`` task. In place;
    returns the number of pairs applied."""
    require_chain(net, "regrouping")
    table = table_of(net)
    top = len(table.layers) - 1
    done = 0
    for (l, mask), pairs in removals.items():
        rows = table.group_rows(l, mask)
        for c, t in pairs:
            r = rows[c]
            bit = 1 << t
            if not table.layers[l].masks[r] & bit:
                continue
            table.layers[l].masks[r] &= ~bit
            done += 1
            if l < top:
                above = table.layers[l + 1]
                for i, m in enumerate(above.masks):
                    if m & bit:
                        above.weight[i, r] = 0
            else:
                table.heads[net.task_names[t]][0][:, r] = 0
    narrow_to_served(net, table, frozen)
    rebuild(net, table)
    return done


def narrow_to_served(net: MultitaskNet, table: ChannelTable, frozen: int = 0) -> None:
    """Top-down: a channel serves the tasks whose heads read it through non-zero weights; its set
    becomes exactly that (unless it serves a frozen task), and readers that may no longer read it
    get their weights from it cut (they were zero)."""
    top = len(table.layers) - 1
    served: list[int] = []
    for r, m in enumerate(table.layers[top].masks):
        s = 0
        for t, name in enumerate(net.task_names):
            if m >> t & 1 and float(table.heads[name][0][:, r].abs().sum()) > 0:
                s |= 1 << t
        served.append(s)
    for l in range(top, -1, -1):
        lt = table.layers[l]
        for r, m in enumerate(lt.masks):
            if m and not m & frozen:
                lt.masks[r] = m & served[r]
        if l == 0:
            break
        below = table.layers[l - 1]
        used = lt.weight.abs().flatten(2).sum(2)  # (channels here, channels below)
        for i, m in enumerate(lt.masks):
            if m and float(used[i].sum()) == 0.0:
                # All its input weights are zero (a merge or a removal cut them): it still needs a group to
                # read, so the superset channels it may read keep serving it (their output is ignored).
                # If a removal in this step left none, the nearest live channel below takes on its set.
                sup = [j for j, mb in enumerate(below.masks) if mb and is_superset(mb, m)]
                if not sup:
                    anchor = _nearest(below.masks, m)
                    if anchor is None:
                        continue  # nothing alive below: rebuild reports it
                    _expand(table, l - 1, anchor, m)
                    sup = [anchor]
                for j in sup:
                    used[i, j] = 1.0
        nxt: list[int] = []
        for j in range(len(below.masks)):
            s = 0
            for i, m in enumerate(lt.masks):
                if m and float(used[i, j]) > 0:
                    s |= m
            nxt.append(s)
        served = nxt


def _nearest(masks: Sequence[int], m: int) -> int | None:
    """The live channel whose set overlaps ``m`` most (first on ties)."""
    live = [j for j, mb in enumerate(masks) if mb]
    return max(live, key=lambda j: (bin(masks[j] & m).count("1"), -j)) if live else None


def _expand(table: ChannelTable, layer: int, row: int, m: int) -> None:
    """Add task set ``m`` to a channel and, down the stack, to every channel it reads (exact: no weight
    changes, only who pays; the wiring rule holds because readers' sets only grow toward inputs)."""
    lt = table.layers[layer]
    lt.masks[row] |= m
    if layer == 0:
        return
    below = table.layers[layer - 1]
    want = lt.masks[row]
    reads = [q for q in range(len(below.masks)) if float(lt.weight[row, q].abs().sum()) > 0 and below.masks[q]]
    if not reads:
        q = _nearest(below.masks, want)
        reads = [q] if q is not None else []
    for q in reads:
        if not is_superset(below.masks[q], want):
            _expand(table, layer - 1, q, want)


def pair_savings(net: MultitaskNet) -> dict[tuple[int, int], Tensor]:
    """(layer, mask) -> (n_tasks,) expected MACs saved per channel of that group by removing task t
    from its set (0 for tasks not in the set): its filter for the combinations that meet the set but
    not the set without t, and its slice of every reader serving t."""
    n = len(net.tasks)
    out: dict[tuple[int, int], Tensor] = {}
    graph = net.graph()
    for key in graph.groups():
        mask = key.mask
        own, readers = graph.channel_parts(key)
        save = torch.zeros(n)
        for t in range(n):
            if mask >> t & 1:
                rest = mask & ~(1 << t)
                s = own * (combination_share(mask, n) - (combination_share(rest, n) if rest else 0.0))
                save[t] = s + sum(macs * combination_share(m, n) for m, macs in readers if m >> t & 1)
        out[(key.layer, mask)] = save
    return out


def pair_importance(net: MultitaskNet, data: MultitaskData, cfg: PruneConfig) -> dict[tuple[int, int], Tensor]:
    """(layer, mask) -> (width, n_tasks): first-order change of the *joint* loss if channel c stopped
    feeding every reader that serves t (what removing t from c's set does), i.e.
    |sum over those readers of W[:, c] * dL/dW[:, c]|, summed over ``cfg.taylor_batches`` batches.
    A reader serving t may serve other tasks too (a shared block), so the joint loss, not t's alone."""
    n = len(net.tasks)
    scores = {(l, m): torch.zeros(w, n) for l, g in enumerate(net.layout) for m, w in g.items()}
    gen = torch.Generator().manual_seed(cfg.seed)
    was_training = net.training
    net.eval()
    graph = net.graph()
    readers = {(k.layer, k.mask): graph.readers(k) for k in graph.groups()}
    try:
        for b, (xb, yb) in enumerate(data.batches(128, shuffle=True, generator=gen)):
            if b >= cfg.taylor_batches:
                break
            net.zero_grad(set_to_none=True)
            joint_loss(net, net(xb), yb).backward()
            for (l, mask), cons in readers.items():
                width = net.layout[l][mask]
                per_task = torch.zeros(width, n)
                for r in cons:
                    conv = net.conv_of(r.node.key)
                    if conv.weight.grad is None:
                        continue
                    wg = (conv.weight * conv.weight.grad)[:, r.offset : r.offset + width].sum((0, 2, 3)).detach()
                    for t in range(n):
                        if r.node.serves >> t & 1:
                            per_task[:, t] += wg
                scores[(l, mask)] += per_task.abs()
    finally:
        net.zero_grad(set_to_none=True)
        net.train(was_training)
    return scores


def regroup_step(
    net: MultitaskNet, data: MultitaskData, cfg: PruneConfig, fraction: float, frozen: int = 0
) -> dict[str, Any]:
    """Remove about ``fraction`` of the expected MACs by dropping (channel, task) pairs, lowest
    importance per unit of saving first. Pairs touching a group that serves a frozen task are left
    alone (that group's channels, order and weights are what the frozen task computes with)."""
    imp = pair_importance(net, data, cfg)
    save = pair_savings(net)
    entries: list[tuple[float, float, int, int, int, int]] = []  # (score, saving, layer, mask, channel, task)
    for l, groups in enumerate(net.layout):
        keys = [(l, m) for m in groups if not m & frozen]
        if not keys:
            continue
        vals = torch.cat([imp[k][:, [t for t in range(len(net.tasks)) if k[1] >> t & 1]].flatten() for k in keys])
        svals = torch.cat([save[k][[t for t in range(len(net.tasks)) if k[1] >> t & 1]] for k in keys])
        imean = max(float(vals.mean()), 1e-12)
        smean = max(float(svals.mean()), 1e-12)
        for k in keys:
            for t in range(len(net.tasks)):
                if not k[1] >> t & 1:
                    continue
                s = float(save[k][t])
                price = max(s / smean, 1e-6) if cfg.price != "none" else 1.0
                for c in range(imp[k].shape[0]):
                    entries.append((float(imp[k][c, t]) / imean / price, s, l, k[1], c, t))
    entries.sort(key=lambda e: (e[0], e[2], e[3], e[4], e[5]))
    target = fraction * weighted_macs(net)
    chosen: dict[tuple[int, int], list[tuple[int, int]]] = {}
    removed = 0.0
    last_input: dict[int, int] = {}  # task -> channels left serving it at the last layer
    top = len(net.layout) - 1
    for t in range(len(net.tasks)):
        last_input[t] = sum(w for m, w in net.layout[top].items() if m >> t & 1)
    for _, s, l, mask, c, t in entries:
        if removed >= target:
            break
        if l == top:
            if last_input[t] <= 1:
                continue  # a head keeps at least one input
            last_input[t] -= 1
        chosen.setdefault((l, mask), []).append((c, t))
        removed += s
    pairs = drop_tasks(net, chosen, frozen)
    return {"fraction": fraction, "pairs": pairs, "frozen": frozen, "regroup": True}
