"""One prune step's surgery: remove the chosen channels through ``MultitaskNet.select_channels``.

``select_channels`` keeps a pruning unit's members consistent (the same channels through
depthwise convs and additions) and slices every dense reader, so a partial cut and a whole-group
removal take the same path; Torch-Pruning is not needed to cut (only to score).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from merging.graph import GroupGraph, GroupKey, HeadKey
from merging.network import MultitaskNet
from merging.pruning.surgery import remove_dead_groups


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
