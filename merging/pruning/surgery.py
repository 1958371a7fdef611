"""Structural clean-ups of a multitask network that keep every combination's outputs unchanged."""

from __future__ import annotations

from merging.network import MultitaskNet


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
