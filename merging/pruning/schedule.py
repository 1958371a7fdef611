"""The step schedule the prune loop asks: how much to cut next, and whether to go on after a rejection."""

from __future__ import annotations

from dataclasses import dataclass, field

from merging.pruning.config import PruneConfig


@dataclass
class HalvingSchedule:
    """Cut ``start`` of the expected MACs per step; a rejected step halves the size, and below
    ``min_step`` the loop stops (or freezes the failing tasks and ``restart``s at full size).
    At most ``max_steps`` steps, accepted or not."""

    start: float
    min_step: float
    max_steps: int
    size: float = field(init=False)

    def __post_init__(self) -> None:
        self.size = self.start

    @classmethod
    def from_config(cls, cfg: PruneConfig) -> HalvingSchedule:
        return cls(cfg.step, cfg.min_step, cfg.max_steps)

    def steps(self) -> range:
        return range(self.max_steps)

    def rejected(self) -> bool:
        """Halve the step after a rejection; whether the halved step is still worth trying."""
        self.size /= 2
        return self.size >= self.min_step

    def restart(self) -> None:
        """Back to the full step (pruning goes on with fewer groups after a freeze)."""
        self.size = self.start
