"""The merger contract: N single-task networks (+ training data) -> one multitask network."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from merging.data.base import MultitaskData
from merging.errors import MergingError
from merging.graph import GroupKey
from merging.network import MultitaskNet
from merging.registry import Registry


class Merger(ABC):
    """One merging strategy. Subclasses take their options as keyword arguments."""

    name: ClassVar[str]

    @abstractmethod
    def merge(self, nets: Sequence[MultitaskNet], data: MultitaskData, seed: int = 0) -> MultitaskNet:
        """Merge ``nets`` (one per task, same architecture); ``data`` is the training split."""

    def larger(self) -> Merger | None:
        """The same merger set to keep more capacity, or None (see ``merging.pipeline``)."""
        return None


_REGISTRY: Registry[Callable[..., Merger]] = Registry("merger", "merger")


def register_merger(cls: type[Merger]) -> type[Merger]:
    _REGISTRY.add(cls.name, cls)
    return cls


def list_mergers() -> list[str]:
    return _REGISTRY.names()


def create_merger(name: str, **options: Any) -> Merger:
    return _REGISTRY.get(name)(**options)


def check_mergeable(nets: Sequence[MultitaskNet]) -> None:
    """Typed errors for inputs no merger can take: wrong count, multitask inputs, mismatches."""
    if len(nets) < 1:
        raise MergingError("no_networks", "need at least one single-task network to merge")
    names: list[str] = []
    for net in nets:
        if len(net.tasks) != 1 or any(len(g) != 1 for g in net.layout):
            raise MergingError("not_single_task", f"expected single-task networks, got one with tasks {net.task_names}")
        names.append(net.task_names[0])
    if len(set(names)) != len(names):
        raise MergingError("duplicate_task", f"two networks serve the same task: {names}")
    ref = nets[0].arch
    for net in nets[1:]:
        if net.arch.input_size != ref.input_size or net.arch.in_channels != ref.in_channels:
            raise MergingError(
                "mismatched_input",
                f"{net.task_names[0]} takes {net.arch.in_channels}x{net.arch.input_size}, "
                f"{names[0]} takes {ref.in_channels}x{ref.input_size}",
            )
        if not net.arch.same_structure(ref):
            raise MergingError(
                "mismatched_architecture", f"{net.task_names[0]} and {names[0]} have different layer structures"
            )


def single_block(net: MultitaskNet, layer: int) -> Any:
    """The one block a single-task network has at ``layer``."""
    (mask,) = net.layout[layer]
    return net.module_of(GroupKey(layer, mask))

