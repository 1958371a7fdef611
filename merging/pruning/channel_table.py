"""A multitask network as a channel table over its coupled spaces: what regrouping edits.

A *space* is a set of trunk layers that carry the same channels: a conv and the depthwise convs and
additions coupled to it (docs/graph.md; one space per layer on a chain). A channel has one task set,
shared by every member, so moving it to another group moves it in the whole pruning unit at once.
Every dense member holds one weight matrix over the whole space it reads (zeros where a block does
not read), a depthwise member one filter per channel, an addition nothing; heads one matrix over
the space of the last layer. Edits change sets and zero columns; :func:`rebuild` turns the table
back into blocks, one per set, each dense block reading exactly the superset groups below that it
has a non-zero weight from (a read whose weights are all zero buys nothing, so it is dropped: the
outputs are unchanged, the MACs fall).

Rows of a space, and columns of a matrix over it, are in ascending order of group mask (the
channels of a group in their block's order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from merging.errors import MergingError
from merging.network import MultitaskNet, is_superset

BN_STATS = ("weight", "bias", "running_mean", "running_var")


@dataclass
class ConvTable:
    """One conv layer (dense or depthwise) over all the channels of its space."""

    weight: Tensor  # dense: (channels, channels of the space read or image channels, kh, kw); dw: (channels, 1, kh, kw)
    bias: Tensor | None
    bn: dict[str, Tensor] | None  # BN_STATS, per channel
    bn_tracked: Tensor | None  # num_batches_tracked of the first block (BN counters are not per channel)
    source: int  # the layer it reads (-1: the image)
    dense: bool  # False: depthwise (channel c reads channel c of its source, a member of the same space)


@dataclass
class Space:
    layers: tuple[int, ...]  # coupled layers, ascending
    masks: list[int]  # task set of every channel (0: removed)
    convs: dict[int, ConvTable]  # layer -> its weights (additions have none)


@dataclass
class ChannelTable:
    spaces: list[Space]
    space_of: list[int]  # layer -> index of its space
    heads: dict[str, tuple[Tensor, Tensor | None]]  # task -> (weight over the last space's channels, bias)

    @property
    def top(self) -> int:
        """The space the heads read."""
        return self.space_of[-1]

    def group_rows(self, layer: int, mask: int) -> list[int]:
        return [i for i, m in enumerate(self.spaces[self.space_of[layer]].masks) if m == mask]

    def readers(self, space: int) -> list[tuple[int, ConvTable]]:
        """(layer, weights) of every dense conv that reads a member of ``space``."""
        return [
            (l, c)
            for sp in self.spaces
            for l, c in sp.convs.items()
            if c.dense and c.source >= 0 and self.space_of[c.source] == space
        ]


def coupled_spaces(net: MultitaskNet) -> list[int]:
    """layer -> index of its space (union of depthwise-input and addend relations), spaces numbered
    by their first layer."""
    parent = list(range(len(net.resolved)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for l, r in enumerate(net.resolved):
        for other in (r.source, r.skip) if r.kind in ("dw", "add") else ():
            if other is not None:
                a, b = find(l), find(other)
                parent[max(a, b)] = min(a, b)
    roots = sorted({find(l) for l in range(len(parent))})
    return [roots.index(find(l)) for l in range(len(parent))]


def _offsets(net: MultitaskNet, layer: int) -> dict[int, tuple[int, int]]:
    """mask -> (start, end) of that group's channels in a matrix over ``layer``'s space."""
    out: dict[int, tuple[int, int]] = {}
    pos = 0
    for mask in sorted(net.layout[layer]):
        out[mask] = (pos, pos + net.layout[layer][mask])
        pos += net.layout[layer][mask]
    return out


@torch.no_grad()
def _conv_table(net: MultitaskNet, layer: int, masks: list[int]) -> ConvTable:
    r = net.resolved[layer]
    groups = sorted(net.layout[layer])
    first = net.block(layer, groups[0])
    dense = r.kind != "dw"
    below = _offsets(net, r.source) if dense and r.source >= 0 else None
    n_in = 1 if not dense else net.arch.in_channels if below is None else sum(net.layout[r.source].values())
    width = len(masks)
    weight = torch.zeros(width, n_in, *first.conv.kernel_size)
    bias = torch.zeros(width) if first.conv.bias is not None else None
    bn = {n: torch.zeros(width) for n in BN_STATS} if first.bn is not None else None
    row = 0
    for mask in groups:
        block = net.block(layer, mask)
        w = net.layout[layer][mask]
        cols = (
            torch.arange(n_in)
            if below is None
            else torch.cat([torch.arange(*below[m]) for m in net.reads[(layer, mask)]])
        )
        weight[row : row + w][:, cols] = block.conv.weight
        if bias is not None and block.conv.bias is not None:
            bias[row : row + w] = block.conv.bias
        if bn is not None and block.bn is not None:
            for n in bn:
                bn[n][row : row + w] = getattr(block.bn, n)
        row += w
    tracked = first.bn.num_batches_tracked.clone() if first.bn is not None else None  # type: ignore[union-attr]
    return ConvTable(weight, bias, bn, tracked, r.source, dense)


@torch.no_grad()
def table_of(net: MultitaskNet) -> ChannelTable:
    space_of = coupled_spaces(net)
    spaces: list[Space] = []
    for s in range(max(space_of) + 1):
        layers = tuple(l for l, k in enumerate(space_of) if k == s)
        layout = net.layout[layers[0]]  # every member has it (the network checks)
        masks = [m for m in sorted(layout) for _ in range(layout[m])]
        convs = {l: _conv_table(net, l, masks) for l in layers if net.resolved[l].kind != "add" and layout}
        spaces.append(Space(layers, masks, convs))
    last = _offsets(net, len(net.layout) - 1)
    n_last = len(spaces[space_of[-1]].masks)
    heads: dict[str, tuple[Tensor, Tensor | None]] = {}
    for i, t in enumerate(net.task_names):
        conv = net.head(t).conv
        hw = torch.zeros(conv.out_channels, n_last, *conv.kernel_size)
        hw[:, torch.cat([torch.arange(*last[m]) for m in net.head_reads(i)])] = conv.weight
        heads[t] = (hw, None if conv.bias is None else conv.bias.clone())
    return ChannelTable(spaces, space_of, heads)


def _reads(
    table: ChannelTable, layouts: list[dict[int, int]], layer: int, conv: ConvTable, groups: dict[int, int]
) -> dict[tuple[int, int], list[int]]:
    """The superset groups below each group of a dense layer reads: those it has a non-zero weight
    from, else (all its weights are zero) the widest, so it still reads something."""
    below_space = table.space_of[conv.source]
    below = table.spaces[below_space].masks
    masks = table.spaces[table.space_of[layer]].masks
    out: dict[tuple[int, int], list[int]] = {}
    for m in groups:
        mine = [i for i, mi in enumerate(masks) if mi == m]
        used = conv.weight[mine].abs().flatten(2).sum((0, 2))  # per channel below
        live = [g for g in layouts[below_space] if is_superset(g, m)]
        if not live:
            raise MergingError("wiring", f"regroup: layer {layer} group {m} has no superset group below")
        nonzero = [g for g in live if any(float(used[j]) > 0 for j in range(len(below)) if below[j] == g)]
        out[(layer, m)] = nonzero or [max(live, key=lambda g: layouts[below_space][g])]
    return out


@torch.no_grad()
def rebuild(net: MultitaskNet, table: ChannelTable) -> None:
    """Replace ``net``'s blocks and heads (in place) by those the table describes."""
    layouts = [{m: sp.masks.count(m) for m in sorted({m for m in sp.masks if m})} for sp in table.spaces]
    order = [[i for m in layouts[s] for i, mi in enumerate(sp.masks) if mi == m] for s, sp in enumerate(table.spaces)]
    layout = [layouts[s] for s in table.space_of]
    reads: dict[tuple[int, int], list[int]] = {}
    for sp in table.spaces:
        for l, conv in sp.convs.items():
            if conv.dense and conv.source >= 0:
                reads.update(_reads(table, layouts, l, conv, layout[l]))
    for i, t in enumerate(net.task_names):
        if not any(m >> i & 1 for m in layout[-1]):
            raise MergingError("empty_task", f"regroup would leave task {t!r} with no input")
    fresh = MultitaskNet(net.tasks, net.arch, layout, reads=reads, meta=net.meta)
    for s, sp in enumerate(table.spaces):
        for l, conv in sp.convs.items():
            for m in layout[l]:
                rows = [i for i in order[s] if sp.masks[i] == m]
                block = fresh.block(l, m)
                if conv.dense and conv.source >= 0:
                    below = table.spaces[table.space_of[conv.source]].masks
                    cols = [j for g in fresh.reads[(l, m)] for j in order[table.space_of[conv.source]] if below[j] == g]
                    block.conv.weight.copy_(conv.weight[rows][:, cols])
                else:
                    block.conv.weight.copy_(conv.weight[rows])
                if conv.bias is not None:
                    block.conv.bias.copy_(conv.bias[rows])  # type: ignore[union-attr]
                if conv.bn is not None and block.bn is not None:
                    for name, v in conv.bn.items():
                        getattr(block.bn, name).copy_(v[rows])
                    if conv.bn_tracked is not None:
                        block.bn.num_batches_tracked.copy_(conv.bn_tracked)  # type: ignore[union-attr]
    top = table.spaces[table.top].masks
    for i, t in enumerate(net.task_names):
        w, b = table.heads[t]
        cols = [j for g in fresh.head_reads(i) for j in order[table.top] if top[j] == g]
        head = fresh.head(t).conv
        head.weight.copy_(w[:, cols])
        if b is not None:
            head.bias.copy_(b)  # type: ignore[union-attr]
    net.layout, net.reads = fresh.layout, fresh.reads
    net.blocks, net.heads = fresh.blocks, fresh.heads
    net.train(net.training)
    net.check_wiring()
