"""``shared``: hard parameter sharing. One trunk for all tasks, one head per task, trained jointly."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from merging.data.base import MultitaskData
from merging.mergers.base import Merger, check_mergeable, register_merger
from merging.network import MultitaskNet
from merging.train import TrainConfig, fit, seed_everything


@register_merger
class SharedMerger(Merger):
    name = "shared"

    def __init__(self, train: TrainConfig | None = None) -> None:
        self.train = train or TrainConfig()

    def merge(self, nets: Sequence[MultitaskNet], data: MultitaskData, seed: int = 0) -> MultitaskNet:
        check_mergeable(nets)
        arch = nets[0].arch
        full = (1 << len(nets)) - 1
        tasks = [net.tasks[0] for net in nets]
        seed_everything(seed)
        net = MultitaskNet(tasks, arch, [{full: s.width} for s in arch.layers], meta={"merger": self.name})
        fit(net, data.select_tasks(tuple(t.name for t in tasks)), replace(self.train, seed=seed), desc="train shared")
        return net
