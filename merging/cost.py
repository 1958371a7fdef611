"""The cost of a combination: MACs and parameters of every block it runs.

Computed from the structure alone (group widths, reads, resolved spatial sizes), never by
running the network, so a cost table is exact and instant; tests cross-check it against
``torch.utils.flop_counter.FlopCounterMode`` on the exported-form module.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from merging.graph import Node
from merging.network import MultitaskNet
from merging.tasks import all_combinations, combination_name, mask_of


@dataclass(frozen=True)
class Cost:
    macs: int  # multiply-accumulates of every conv/dense block run (FLOPs ~ 2 x MACs)
    params: int  # parameters of those blocks (weights, biases, BN affine)


def node_params(net: MultitaskNet, node: Node) -> int:
    return sum(p.numel() for p in net.module_of(node.key).parameters())


def combination_cost(net: MultitaskNet, combination: Iterable[str] | str | None = None) -> Cost:
    combo = net.resolve_combination(combination)
    nodes = net.graph().run_by(mask_of(combo, net.task_names))
    return Cost(sum(n.macs for n in nodes), sum(node_params(net, n) for n in nodes))


def cost_table(net: MultitaskNet) -> dict[str, Cost]:
    """Canonical combination name -> cost, for every combination of the network's tasks."""
    graph = net.graph()
    params = {n.key: node_params(net, n) for n in graph}
    out: dict[str, Cost] = {}
    for c in all_combinations(net.task_names):
        nodes = graph.run_by(mask_of(c, net.task_names))
        out[combination_name(c)] = Cost(sum(n.macs for n in nodes), sum(params[n.key] for n in nodes))
    return out
