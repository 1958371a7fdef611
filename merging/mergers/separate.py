"""``separate``: no merging. Each task keeps its own network whole (the baseline)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merging.data.base import MultitaskData
from merging.graph import GroupKey
from merging.mergers.base import Merger, check_mergeable, register_merger, single_block
from merging.network import MultitaskNet


@register_merger
class SeparateMerger(Merger):
    name = "separate"

    def merge(self, nets: Sequence[MultitaskNet], data: MultitaskData, seed: int = 0) -> MultitaskNet:
        check_mergeable(nets)
        layout = [
            {1 << i: net.group_width(l, next(iter(net.layout[l]))) for i, net in enumerate(nets)}
            for l in range(len(nets[0].layout))
        ]
        tasks = [net.tasks[0] for net in nets]
        merged = MultitaskNet(tasks, nets[0].arch, layout, meta={"merger": self.name})
        with torch.no_grad():
            for i, net in enumerate(nets):
                for l in range(len(layout)):
                    merged.module_of(GroupKey(l, 1 << i)).load_state_dict(single_block(net, l).state_dict())
                merged.heads[tasks[i].name].load_state_dict(net.heads[tasks[i].name].state_dict())
        merged.eval()
        return merged
