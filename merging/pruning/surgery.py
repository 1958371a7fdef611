"""Every structural edit of a multitask network, in one place: cutting the channels a prune step chose
(``cut_channels``, through ``MultitaskNet.select_channels``, which keeps a pruning unit's members
consistent and slices every dense reader; Torch-Pruning only scores), removing dead groups (outputs
unchanged), and narrowing channels' task sets (regrouping's edit: exact against the network with the
cut weights zeroed).

Narrowing channel c of group S to S - {t} moves it to the group of S - {t} in every member of its
pruning unit (the same channel through depthwise convs and additions), and cuts its weights into
every dense reader that still serves t (blocks of any member's readers, and t's head). The wiring
rule stays exact: the channel keeps reading what it read (supersets of S are supersets of
S - {t}), and only readers whose set is a subset of S - {t} still read it. A reader inside the
unit (a projection conv reading a depthwise conv of the same unit) keeps the channel's own column:
that row is the channel itself, now in S - {t} too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from merging.graph import GroupGraph, GroupKey, HeadKey
from merging.network import MultitaskNet, is_superset
from merging.pruning.channel_table import ChannelTable, rebuild, table_of


def remove_dead_groups(net: MultitaskNet) -> list[tuple[int, int]]:
    """Remove groups no block or head reads (their MACs buy nothing); returns the (layer, mask) removed.

    A group of set S at layer l is read only by groups of subsets of S at layer l + 1; when pruning
    or regrouping leaves none, the block is computed for nothing. Top-down, so removals cascade.
    """
    removed: list[tuple[int, int]] = []
    while True:  # top-down: a removal can leave the group below unread in turn
        graph = net.graph()
        dead = [k for k in graph.groups() if not graph.readers(k)]
        if not dead:
            return removed
        key = max(dead)
        net.select_channels(key.layer, key.mask, [])
        removed.append((key.layer, key.mask))


@torch.no_grad()
def narrow_channels(
    net: MultitaskNet, removals: Mapping[tuple[int, int], Sequence[tuple[int, int]]], frozen: int = 0
) -> int:
    """Remove task ``t`` from channel ``c`` of group (layer, mask), in every member of its unit, for
    every (c, t) in ``removals`` (c indexes the group's channels, t the task; any member names the
    unit). Then every channel's set is narrowed to the tasks it still serves through non-zero weights
    (a channel serving nothing is removed), except in groups serving a ``frozen`` task. In place;
    returns the number of pairs applied."""
    table = table_of(net)
    rows = {key: table.group_rows(*key) for key in removals}  # c indexes the channels as given
    done = 0
    for (l, mask), pairs in removals.items():
        s = table.space_of[l]
        for c, t in pairs:
            r, bit = rows[(l, mask)][c], 1 << t
            if not table.spaces[s].masks[r] & bit:
                continue
            table.spaces[s].masks[r] &= ~bit
            done += 1
            # Readers that serve t now (one narrowed by an earlier pair keeps the column; so does the
            # channel's own row in a reader inside its unit: it is this channel, no longer serving t).
            for layer, conv in table.readers(s):
                for i, m in enumerate(table.spaces[table.space_of[layer]].masks):
                    if m & bit:
                        conv.weight[i, r] = 0
            if s == table.top:
                table.heads[net.task_names[t]][0][:, r] = 0
    narrow_to_served(net, table, frozen)
    rebuild(net, table)
    return done


Links = dict[int, torch.Tensor]  # dense layer -> (its channels, channels it reads) bool: reads through


def narrow_to_served(net: MultitaskNet, table: ChannelTable, frozen: int = 0) -> None:
    """A channel serves the tasks of the readers that read it through non-zero weights (a head serves
    its task); its set becomes exactly that, unless it serves a frozen task. Readers can sit on both
    sides of one space (a residual stage is read by a block whose second conv writes it again), so
    this is the least fixpoint, not one top-down pass (on a chain it is that pass). A reader whose
    weights are all zero still needs a group to read: the superset channels it may read keep serving
    it, and if none is left the nearest live channel takes its set on (exact: only who pays changes)."""
    start = [list(sp.masks) for sp in table.spaces]  # after the removals: narrowing only takes tasks away
    links: Links = {
        l: conv.weight.flatten(2).abs().sum(2) > 0
        for sp in table.spaces
        for l, conv in sp.convs.items()
        if conv.dense and conv.source >= 0
    }
    while True:
        masks = _served_fixpoint(net, table, start, links, frozen)
        if not _anchor_blank_rows(table, start, links, masks):
            break
    for sp, m in zip(table.spaces, masks, strict=True):
        sp.masks = m


def _served_fixpoint(
    net: MultitaskNet, table: ChannelTable, start: list[list[int]], links: Links, frozen: int
) -> list[list[int]]:
    n = len(net.task_names)
    top = table.top
    heads = [0] * len(start[top])
    for t, name in enumerate(net.task_names):
        used = table.heads[name][0].abs().flatten(2).sum((0, 2)) > 0
        for r, m in enumerate(start[top]):
            if m >> t & 1 and bool(used[r]):
                heads[r] |= 1 << t
    masks = [[m if m & frozen else 0 for m in sp] for sp in start]
    while True:
        served = [[0] * len(sp) for sp in start]
        served[top] = list(heads)
        for l, link in links.items():
            below = table.space_of[table.spaces[table.space_of[l]].convs[l].source]
            rows = torch.tensor(masks[table.space_of[l]], dtype=torch.long)
            for t in range(n):
                hit = (link & (rows >> t & 1).bool()[:, None]).any(0)
                for j in hit.nonzero().flatten().tolist():
                    served[below][j] |= 1 << t
        new = [
            [m if not m or m & frozen else m & s for m, s in zip(ms, ss, strict=True)]
            for ms, ss in zip(start, served, strict=True)
        ]
        if new == masks:
            return masks
        masks = new


def _anchor_blank_rows(table: ChannelTable, start: list[list[int]], links: Links, masks: list[list[int]]) -> bool:
    """Link every live channel whose weights are all zero to the superset channels it may read (or
    widen the nearest one to its set); True if anything changed (the fixpoint runs again)."""
    changed = False
    for l, link in links.items():
        conv = table.spaces[table.space_of[l]].convs[l]
        below = table.space_of[conv.source]
        blank = conv.weight.flatten(1).abs().sum(1) == 0
        for i, m in enumerate(masks[table.space_of[l]]):
            if not m or not bool(blank[i]):
                continue
            sup = [j for j, mb in enumerate(start[below]) if mb and is_superset(mb, m)]
            if not sup:
                anchor = _nearest(start[below], m)
                if anchor is None:
                    continue  # nothing alive below: rebuild reports it
                _expand(table, start, below, anchor, m)
                sup = [anchor]
                changed = True  # the sets it starts from grew: serve again
            if not bool(link[i, sup].all()):
                link[i, sup] = True
                changed = True
    return changed


def _nearest(masks: Sequence[int], m: int) -> int | None:
    """The live channel whose set overlaps ``m`` most (first on ties)."""
    live = [j for j, mb in enumerate(masks) if mb]
    return max(live, key=lambda j: (bin(masks[j] & m).count("1"), -j)) if live else None


def _expand(table: ChannelTable, start: list[list[int]], space: int, row: int, m: int) -> None:
    """Add task set ``m`` to a channel and, toward the input, to every channel its filters read
    (exact: no weight changes, only who pays; the wiring rule holds because sets only grow toward
    the input)."""
    start[space][row] |= m
    want = start[space][row]
    for conv in table.spaces[space].convs.values():
        if not conv.dense or conv.source < 0:
            continue  # a depthwise member reads this very channel
        below = table.space_of[conv.source]
        reads = [q for q in range(len(start[below])) if start[below][q] and float(conv.weight[row, q].abs().sum()) > 0]
        if not reads:
            q = _nearest(start[below], want)
            reads = [q] if q is not None else []
        for q in reads:
            if not is_superset(start[below][q], want):
                _expand(table, start, below, q, want)

def removal_closure(graph: GroupGraph, key: GroupKey) -> tuple[set[GroupKey], list[HeadKey]]:
    """What removing ``key``'s unit takes with it: the groups removed (the unit, then every block
    left reading only removed groups, in turn) and the heads left with no input."""
    gone = set(graph.unit(key))
    todo = list(gone)
    starved: list[HeadKey] = []
    while todo:
        for r in graph.readers(todo.pop()):
            node = r.node
            if not all(i in gone for i in node.inputs):
                continue  # it still reads something
            if isinstance(node.key, HeadKey):
                if node.key not in starved:
                    starved.append(node.key)
            elif node.key not in gone:
                unit = graph.unit(node.key)
                gone.update(unit)
                todo.extend(unit)
    return gone, starved


def removable(graph: GroupGraph, key: GroupKey) -> bool:
    """Whether removing ``key``'s unit (and whatever is left reading nothing) leaves every head an input."""
    return not removal_closure(graph, key)[1]


def cut_channels(
    net: MultitaskNet, chosen: Mapping[tuple[int, int], Sequence[int]], importance: Mapping[tuple[int, int], Tensor]
) -> list[tuple[int, int]]:
    """Remove channels ``chosen[(layer, mask)]`` of each unit (named by its producer), in place.

    A unit whose every channel is chosen is removed with what reads only it, unless that would
    leave a head with no input: then it keeps its most important channel (``importance``).
    Groups left unread are removed too. Returns the (layer, mask) of every group removed.
    """
    emptied: list[tuple[int, int]] = []
    for (l, mask), idxs in chosen.items():
        width = net.group_width(l, mask)
        if len(idxs) >= width:
            emptied.append((l, mask))
            continue
        drop = set(idxs)
        net.select_channels(l, mask, [j for j in range(width) if j not in drop])
    removed: list[tuple[int, int]] = []
    for l, mask in sorted(emptied, reverse=True):  # top-down, as a removal cascades upwards
        if mask not in net.layout[l]:
            continue  # already removed with a group it read
        if removable(net.graph(), GroupKey(l, mask)):
            net.select_channels(l, mask, [])
            removed.append((l, mask))
        else:  # the last input of some head, directly or through the blocks above: keep its best channel
            imp = importance[(l, mask)]
            drop = set(chosen[(l, mask)])
            keep = [j for j in range(len(imp)) if j not in drop]
            net.select_channels(l, mask, keep or [int(imp.argmax())])
    removed += remove_dead_groups(net)
    net.check_wiring()
    return removed
