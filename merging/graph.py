"""The group graph: the explicit structure of a multitask network that every algorithm asks.

A node is one block (a group's conv at one layer) or one task head. Keys are frozen values,
never strings to parse: :class:`GroupKey` (layer, task-set mask) for blocks, :class:`HeadKey`
for heads. Each node knows its operation, its inputs (concatenated in order) and the MACs it
costs, written once here, so cost tables, channel prices, regrouping and surgery all read the
same numbers. Readers of a group (its consumers) are found by asking the graph, not by
computing ``layer + 1``.

The graph is a snapshot: build it again after surgery (``MultitaskNet.graph()`` is cheap).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

NodeKind = Literal["conv", "fc", "dw", "add", "head"]


@dataclass(frozen=True, order=True)
class GroupKey:
    """The group of task set ``mask`` at trunk layer ``layer``."""

    layer: int
    mask: int

    @property
    def name(self) -> str:
        """The module name of its block (the one place this string is built)."""
        return f"L{self.layer}_g{self.mask}"

    @property
    def serves(self) -> int:
        return self.mask


@dataclass(frozen=True, order=True)
class HeadKey:
    """The head of the task at ``index`` in the network's task order."""

    index: int
    task: str

    @property
    def name(self) -> str:
        return self.task

    @property
    def serves(self) -> int:
        return 1 << self.index


NodeKey = GroupKey | HeadKey


@dataclass(frozen=True)
class Node:
    key: NodeKey
    kind: NodeKind
    inputs: tuple[GroupKey, ...]  # groups concatenated (in this order) as its input; () reads the image
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    out_hw: tuple[int, int]  # the conv's output map, where its MACs are spent
    groups: int = 1  # conv groups: the width for a depthwise conv (channel c reads input channel c)

    @property
    def serves(self) -> int:
        """Task-set mask of the combinations that run this node (those that meet it)."""
        return self.key.serves

    @property
    def macs_per_product(self) -> int:
        """MACs of one (input channel, output channel) pair that is connected; an add has none
        (element-wise sums are not multiply-accumulates, as FlopCounterMode counts)."""
        return 0 if self.kind == "add" else self.kernel[0] * self.kernel[1] * self.out_hw[0] * self.out_hw[1]

    @property
    def macs(self) -> int:
        return self.in_channels // self.groups * self.out_channels * self.macs_per_product

    @property
    def macs_per_input(self) -> int:
        """What one input channel costs this node (its slice of the weights)."""
        return self.out_channels // self.groups * self.macs_per_product

    @property
    def macs_per_output(self) -> int:
        """What one output channel (filter) of this node costs."""
        return self.in_channels // self.groups * self.macs_per_product

    @property
    def coupled(self) -> bool:
        """Its channel c is channel c of its input(s): pruned together with them."""
        return self.kind in ("dw", "add")


@dataclass(frozen=True)
class Reader:
    """A node that reads a group, and where that group's channels start in its input."""

    node: Node
    offset: int


class GroupGraph:
    """Nodes in execution order (trunk layer by layer, then heads) with producer/consumer queries."""

    def __init__(self, nodes: list[Node], widths: dict[GroupKey, int]) -> None:
        self.nodes: dict[NodeKey, Node] = {n.key: n for n in nodes}
        self.widths = widths
        self._readers: dict[GroupKey, list[Reader]] = {k: [] for k in widths}
        self._unit_of: dict[GroupKey, tuple[GroupKey, ...]] | None = None
        for n in nodes:
            off = 0
            for k in n.inputs:
                self._readers[k].append(Reader(n, off))
                off += widths[k]

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes.values())

    def __getitem__(self, key: NodeKey) -> Node:
        return self.nodes[key]

    def groups(self) -> list[GroupKey]:
        return list(self.widths)

    def producers(self, key: NodeKey) -> tuple[GroupKey, ...]:
        return self.nodes[key].inputs

    def readers(self, key: GroupKey) -> list[Reader]:
        """Every block or head that reads group ``key``, with the offset of its channels there."""
        return list(self._readers[key])

    def run_by(self, combination_mask: int) -> list[Node]:
        """The nodes combination ``combination_mask`` runs: those whose task set meets it."""
        return [n for n in self.nodes.values() if n.serves & combination_mask]

    def unit(self, key: GroupKey) -> tuple[GroupKey, ...]:
        """The groups whose channels are the same channels as ``key``'s, through depthwise convs and
        additions, in execution order: they are pruned, regrouped and removed together."""
        return self._units()[key]

    def units(self) -> list[tuple[GroupKey, ...]]:
        """Every pruning unit once, each in execution order (its first member is its producer)."""
        return sorted(set(self._units().values()))

    def _units(self) -> dict[GroupKey, tuple[GroupKey, ...]]:
        if self._unit_of is None:
            parent = {k: k for k in self.widths}

            def find(k: GroupKey) -> GroupKey:
                while parent[k] != k:
                    parent[k] = parent[parent[k]]
                    k = parent[k]
                return k

            for n in self.nodes.values():
                if n.coupled and isinstance(n.key, GroupKey):
                    for i in n.inputs:
                        a, b = find(n.key), find(i)
                        if a != b:
                            parent[max(a, b)] = min(a, b)
            members: dict[GroupKey, list[GroupKey]] = {}
            for k in self.widths:
                members.setdefault(find(k), []).append(k)
            self._unit_of = {k: tuple(sorted(members[find(k)])) for k in self.widths}
        return self._unit_of

    def input_readers(self, key: GroupKey) -> list[Reader]:
        """Where the channels of ``key``'s unit are read as input channels of a dense conv or head
        (inside the unit too: a 1x1 conv between a depthwise conv and an addition); depthwise and
        add members read them as their own channels instead."""
        return [r for k in self.unit(key) for r in self._readers[k] if not r.node.coupled]

    def channel_parts(self, key: GroupKey) -> tuple[int, list[tuple[int, int]]]:
        """The MACs one channel of ``key``'s pruning unit brings: its filters' in every member, and
        (reader's task set, MACs of its slice there) for every reader outside the unit."""
        own = sum(self.nodes[k].macs_per_output for k in self.unit(key))
        return own, [(r.node.serves, r.node.macs_per_input) for r in self.input_readers(key)]
