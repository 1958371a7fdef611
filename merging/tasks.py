"""Tasks, task sets (group keys) and combinations.

A *task set* is stored as a bit mask over the network's ordered task list: bit ``i`` set means
task ``tasks[i]`` is in the set. A *combination* is a non-empty task set that a caller asks for;
its canonical name is the sorted task names joined by ``+`` (``digit+parity``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations as _subsets
from typing import Literal

from merging.errors import MergingError
from pam_common.combinations import canonical_combination as validate_combination
from pam_common.combinations import combination_name

__all__ = [
    "TaskKind",
    "TaskSpec",
    "all_combinations",
    "canonical_combination",
    "combination_name",  # re-exported: defined once in pam_common for all three layers
    "mask_of",
    "names_of",
    "set_name",
]

TaskKind = Literal["classes", "attributes"]


@dataclass(frozen=True)
class TaskSpec:
    """One named prediction."""

    name: str  # identifier used in combinations, e.g. "digit"
    kind: TaskKind  # "classes": one softmax over labels; "attributes": one sigmoid per label
    labels: tuple[str, ...]  # class names (classes) or attribute names (attributes)

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "+,./ ") or not self.name.isprintable():
            raise MergingError("bad_task_name", f"invalid task name {self.name!r}: no '+', ',', '.', '/' or blanks")
        if self.kind == "classes" and len(self.labels) < 2:
            raise MergingError("bad_task", f"task {self.name!r} needs at least 2 classes")
        if self.kind == "attributes" and len(self.labels) < 1:
            raise MergingError("bad_task", f"task {self.name!r} needs at least 1 attribute")

    @property
    def out_dim(self) -> int:
        return len(self.labels)

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "kind": self.kind, "labels": list(self.labels)}

    @staticmethod
    def from_json(d: dict[str, object]) -> TaskSpec:
        labels = d.get("labels")
        kind = d.get("kind")
        if not isinstance(labels, list) or kind not in ("classes", "attributes"):
            raise MergingError("bad_task", f"malformed task entry {d!r}")
        return TaskSpec(str(d["name"]), kind, tuple(str(x) for x in labels))  # type: ignore[arg-type]


def canonical_combination(requested: Iterable[str] | str, known: Sequence[str]) -> tuple[str, ...]:
    """Validate and normalise a request: sorted, de-duplicated task names.

    Accepts ``"a,b"``, ``"a+b"`` or an iterable of names. Duplicates are dropped; unknown names
    and empty requests are a :class:`MergingError` (the rule is :func:`pam_common.canonical_combination`).
    """
    return validate_combination(requested, known, MergingError)


def mask_of(names: Iterable[str], tasks: Sequence[str]) -> int:
    mask = 0
    for n in names:
        mask |= 1 << tasks.index(n)
    return mask


def names_of(mask: int, tasks: Sequence[str]) -> tuple[str, ...]:
    return tuple(sorted(t for i, t in enumerate(tasks) if mask >> i & 1))


def set_name(mask: int, tasks: Sequence[str]) -> str:
    return combination_name(names_of(mask, tasks))


def all_combinations(tasks: Sequence[str]) -> list[tuple[str, ...]]:
    """Every non-empty combination, smallest first, each sorted."""
    names = sorted(tasks)
    out: list[tuple[str, ...]] = []
    for k in range(1, len(names) + 1):
        out.extend(tuple(c) for c in _subsets(names, k))
    return out
