"""Step schedules the prune loop asks: how much to cut next, and whether to go on after a rejection.

Each schedule is a small class behind one contract, found by name (``PruneConfig.schedule``) in
:data:`SCHEDULES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from merging.errors import MergingError
from merging.pruning.config import PruneConfig


@dataclass
class HalvingSchedule:
    """Cut ``start`` of the expected MACs per step; a rejected step halves the size, and below
    ``min_step`` the loop stops (or freezes the failing tasks and ``restart``s at full size).
    At most ``max_steps`` steps, accepted or not. The size never grows back: every rejection of
    the run counts towards the stop."""

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

    def accepted(self) -> None:
        """An accepted step leaves the size as it is."""

    def rejected(self) -> bool:
        """Halve the step after a rejection; whether the halved step is still worth trying."""
        self.size /= 2
        return self.size >= self.min_step

    def restart(self) -> None:
        """Back to the full step (pruning goes on with fewer groups after a freeze)."""
        self.size = self.start


@dataclass
class ReboundSchedule(HalvingSchedule):
    """Halving, but an accepted step doubles the size again (up to ``start``): only rejections in a
    row stop a task. A step decision is a noisy test, so under halving alone two or three unlucky
    rejections anywhere in a long run end it early and leave it taking small steps to the end."""

    def accepted(self) -> None:
        self.size = min(self.start, self.size * 2)


SCHEDULES: dict[str, type[HalvingSchedule]] = {"halving": HalvingSchedule, "rebound": ReboundSchedule}


def schedule_of(cfg: PruneConfig) -> HalvingSchedule:
    """A fresh schedule of the kind ``cfg.schedule`` names."""
    kind = SCHEDULES.get(cfg.schedule)
    if kind is None:
        raise MergingError("bad_argument", f"unknown step schedule {cfg.schedule!r} (known: {', '.join(SCHEDULES)})")
    return kind.from_config(cfg)
