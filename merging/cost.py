"""The cost of a combination: MACs and parameters of every block it runs.

Computed from the structure alone (group widths, reads, resolved spatial sizes), never by
running the network, so a cost table is exact and instant; tests cross-check it against
``torch.utils.flop_counter.FlopCounterMode`` on the exported-form module.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from merging.network import MultitaskNet
from merging.tasks import all_combinations, combination_name, mask_of


@dataclass(frozen=True)
class Cost:
    macs: int  # multiply-accumulates of every conv/dense block run (FLOPs ~ 2 x MACs)
    params: int  # parameters of those blocks (weights, biases, BN affine)


def _conv_macs(out_ch: int, in_ch: int, kernel: tuple[int, int], conv_hw: tuple[int, int]) -> int:
    return out_ch * in_ch * kernel[0] * kernel[1] * conv_hw[0] * conv_hw[1]


def block_cost(net: MultitaskNet, layer: int, mask: int) -> Cost:
    block = net.block(layer, mask)
    r = net.resolved[layer]
    macs = _conv_macs(block.conv.out_channels, block.conv.in_channels, r.kernel, r.conv_hw)
    return Cost(macs, sum(p.numel() for p in block.parameters()))


def head_cost(net: MultitaskNet, task: str) -> Cost:
    head = net.head(task)
    k = net.resolved[-1].out_hw
    macs = _conv_macs(head.conv.out_channels, head.conv.in_channels, k, (1, 1))
    return Cost(macs, sum(p.numel() for p in head.parameters()))


def combination_cost(net: MultitaskNet, combination: Iterable[str] | str | None = None) -> Cost:
    combo = net.resolve_combination(combination)
    cmask = mask_of(combo, net.task_names)
    macs = params = 0
    for l, groups in enumerate(net.layout):
        for mask in groups:
            if mask & cmask:
                c = block_cost(net, l, mask)
                macs, params = macs + c.macs, params + c.params
    for t in combo:
        c = head_cost(net, t)
        macs, params = macs + c.macs, params + c.params
    return Cost(macs, params)


def cost_table(net: MultitaskNet) -> dict[str, Cost]:
    """Canonical combination name -> cost, for every combination of the network's tasks."""
    return {combination_name(c): combination_cost(net, c) for c in all_combinations(net.task_names)}
