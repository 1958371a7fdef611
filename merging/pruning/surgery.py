"""Structural clean-ups of a multitask network that keep every combination's outputs unchanged."""

from __future__ import annotations

from merging.network import MultitaskNet


def remove_dead_groups(net: MultitaskNet) -> list[tuple[int, int]]:
    """Remove groups no block or head reads (their MACs buy nothing); returns the (layer, mask) removed.

    A group of set S at layer l is read only by groups of subsets of S at layer l + 1; when pruning
    or regrouping leaves none, the block is computed for nothing. Top-down, so removals cascade.
    """
    removed: list[tuple[int, int]] = []
    for l in range(len(net.layout) - 2, -1, -1):
        for mask in list(net.layout[l]):
            if mask in net.layout[l] and not net.consumers(l, mask):
                net.select_channels(l, mask, [])
                removed.append((l, mask))
    return removed
