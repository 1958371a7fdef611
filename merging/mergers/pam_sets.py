"""PAM's channel sets: each kept channel of a source network and the task set it ends up serving, and
the rules that make those sets obey the wiring rule (``cut``, ``expand``) and say which tasks stay exact."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor


@dataclass
class Channel:
    net: int  # index of the source network (= task index)
    index: int  # channel index in the source network's layer
    relevant: int = 0  # mask of tasks the MI test finds it relevant to
    final: int = 0  # mask of its group in the merged network (0: dropped)


def cap_paths(chans: list[Channel], single: Tensor, n_tasks: int, own_task: bool) -> None:
    """No task's path wider than its own network at this layer: where own channels (which serve
    their task under ``own_task``) and foreign picks add up to more, the foreign channels that know
    least about the task stop serving it."""
    for t in range(n_tasks):
        width = sum(1 for ch in chans if ch.net == t)
        on = [c for c, ch in enumerate(chans) if ch.relevant >> t & 1 or (own_task and ch.net == t and ch.relevant)]
        extra = len(on) - width
        if extra <= 0:
            continue
        foreign = sorted((c for c in on if chans[c].net != t), key=lambda c: (float(single[c, t]), c))
        for c in foreign[:extra]:
            chans[c].relevant &= ~(1 << t)


def expand_sets(layers: list[list[Channel]], reads: Sequence[tuple[int, int]], n_nets: int) -> None:
    """A channel's set also covers every kept channel that reads it in its own network (exact).

    Widening only, to a fixpoint: in a residual stage a unit both feeds and is fed by the convs
    between its additions, so one top-down pass is not enough (for a chain it is, and the second
    pass changes nothing).
    """
    for chans in layers:
        for ch in chans:
            ch.final = ch.relevant
    changed = True
    while changed:
        changed = False
        for layer, source in reversed(reads):
            above = [0] * n_nets  # union of the sets of each network's kept channels that read ``source``
            for ch in layers[layer]:
                above[ch.net] |= ch.final
            for p in layers[source]:
                if above[p.net] & ~p.final:
                    p.final |= above[p.net]
                    changed = True


def cut_sets(layers: list[list[Channel]], reads: Sequence[tuple[int, int]]) -> None:
    """Keep each channel's relevance set; a channel reads only the parents the wiring rule allows.

    Weights from a parent whose set is not a superset are cut (the paper's way). Where a group
    would have no superset group at all to read, the parents of its channels that already serve
    part of its set (or, failing that, all kept parents of the same networks) take on the group's
    set too, so every group has an input. Widening only, to a fixpoint (see :func:`expand_sets`).
    """
    for chans in layers:
        for ch in chans:
            ch.final = ch.relevant
    changed = True
    while changed:
        changed = False
        for layer, source in reversed(reads):
            groups = sorted({ch.final for ch in layers[layer] if ch.final}, key=lambda m: (-bin(m).count("1"), m))
            for mask in groups:
                below = layers[source]
                if any(p.final & mask == mask for p in below):
                    continue
                nets = {ch.net for ch in layers[layer] if ch.final == mask}
                parents = [p for p in below if p.net in nets and p.final & mask]
                parents = parents or [p for p in below if p.net in nets and p.final]
                parents = parents or [p for p in below if p.net in nets]
                for p in parents:
                    p.final |= mask
                changed = True


def reproduces(layers: list[list[Channel]], reads: Sequence[tuple[int, int]], t: int) -> bool:
    """Whether head t sees exactly its source network: every channel of net t kept, readable, uncut."""
    if any(not ch.final for chans in layers for ch in chans if ch.net == t):
        return False
    for layer, source in reads:
        own = [ch for ch in layers[layer] if ch.net == t]
        parents = [p for p in layers[source] if p.net == t]
        if any(p.final & ch.final != ch.final for ch in own for p in parents):
            return False
    return all(ch.final >> t & 1 for ch in layers[-1] if ch.net == t)
