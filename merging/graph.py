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

NodeKind = Literal["conv", "fc", "head"]


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

    @property
    def serves(self) -> int:
        """Task-set mask of the combinations that run this node (those that meet it)."""
        return self.key.serves

    @property
    def macs_per_product(self) -> int:
        """MACs of one (input channel, output channel) pair."""
        return self.kernel[0] * self.kernel[1] * self.out_hw[0] * self.out_hw[1]

    @property
    def macs(self) -> int:
        return self.in_channels * self.out_channels * self.macs_per_product

    @property
    def macs_per_input(self) -> int:
        """What one input channel costs this node (its slice of the weights)."""
        return self.out_channels * self.macs_per_product

    @property
    def macs_per_output(self) -> int:
        """What one output channel (filter) of this node costs."""
        return self.in_channels * self.macs_per_product


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

    def macs(self, combination_mask: int) -> int:
        return sum(n.macs for n in self.run_by(combination_mask))

    def channel_parts(self, key: GroupKey) -> tuple[int, list[tuple[int, int]]]:
        """The MACs one channel of group ``key`` brings: its own filter's, and (reader's task set,
        MACs of its slice there) for every reader."""
        return self.nodes[key].macs_per_output, [(r.node.serves, r.node.macs_per_input) for r in self._readers[key]]
