"""The dataset interface: images with one label tensor per task, split three ways."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from merging.errors import MergingError
from merging.registry import Registry
from merging.tasks import TaskSpec


@dataclass(frozen=True)
class Preprocessing:
    """How a raw image becomes the network's input (the manifest repeats this for devices)."""

    size: tuple[int, int]  # (height, width) to resize to
    channels: int  # 1: grayscale ("L"), 3: RGB
    mean: tuple[float, ...]  # per channel, on pixel values scaled to [0, 1]
    std: tuple[float, ...]  # per channel, on pixel values scaled to [0, 1]
    invert: bool = False  # 1 - pixel before normalising (digits are light strokes on dark)

    def normalise(self, x01: Tensor) -> Tensor:
        """(N, C, H, W) pixels in [0, 1] -> network input."""
        if self.invert:
            x01 = 1.0 - x01
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return (x01 - mean) / std

    def to_json(self) -> dict[str, Any]:
        return {
            "size": list(self.size),
            "channels": self.channels,
            "mean": list(self.mean),
            "std": list(self.std),
            "invert": self.invert,
        }


@dataclass
class MultitaskData:
    """Network inputs ``x`` (N, C, H, W) and labels ``y[task]``: (N,) class ids or (N, k) 0/1 floats."""

    tasks: tuple[TaskSpec, ...]
    x: Tensor
    y: dict[str, Tensor]
    # Distinct source images when samples are views of them (sample i shows image i % images), as in
    # the pruner's check set; None: every sample is its own image. Statistics cluster by image.
    images: int | None = None

    def __post_init__(self) -> None:
        for t in self.tasks:
            if t.name not in self.y or len(self.y[t.name]) != len(self.x):
                raise MergingError("bad_data", f"labels of task {t.name!r} missing or of the wrong length")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def subset(self, idx: Tensor | list[int]) -> MultitaskData:
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        return MultitaskData(self.tasks, self.x[idx_t], {k: v[idx_t] for k, v in self.y.items()})

    def select_tasks(self, names: tuple[str, ...]) -> MultitaskData:
        by_name = {t.name: t for t in self.tasks}
        return MultitaskData(tuple(by_name[n] for n in names), self.x, {n: self.y[n] for n in names}, self.images)

    def batch_indices(
        self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
        rank: int = 0, world: int = 1,
    ) -> Iterator[Tensor]:
        """Sample indices of each batch; with ``world > 1``, this rank's shard of every global batch.

        Sharding follows DistributedSampler: every rank draws the same permutation (same
        generator state), the order is padded by wrapping around to a multiple of ``world``, and
        each global batch of ``ceil(batch_size / world) * world`` samples is dealt out
        ``idx[rank::world]``, so every rank runs the same number of equal-sized steps (a rank
        with one step fewer would leave the others waiting in the gradient all-reduce).
        """
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        if world <= 1:
            for i in range(0, n, batch_size):
                yield order[i : i + batch_size]
            return
        padded = -(-n // world) * world
        if padded > n:
            order = torch.cat([order, order[: padded - n]]) if n else order
        step = -(-batch_size // world) * world
        for i in range(0, padded, step):
            yield order[i : i + step][rank::world]

    def batches(
        self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
        rank: int = 0, world: int = 1,
    ) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        for idx in self.batch_indices(batch_size, shuffle, generator, rank, world):
            yield self.x[idx], {k: v[idx] for k, v in self.y.items()}

    def in_memory(self) -> MultitaskData:
        """This data with its images as one tensor (already so here; streaming data loads them)."""
        return self


def batch_count(n: int, batch_size: int, world: int = 1) -> int:
    """Steps per epoch of ``MultitaskData.batch_indices`` (the same on every rank)."""
    if world <= 1:
        return -(-n // batch_size)
    return -(-(-(-n // world) * world) // (-(-batch_size // world) * world))


@dataclass
class Splits:
    name: str  # dataset name, e.g. "digits"
    train: MultitaskData
    val: MultitaskData
    test: MultitaskData
    preprocessing: Preprocessing
    info: dict[str, Any] = field(default_factory=dict)  # provenance: seeds, sizes, source files

    @property
    def tasks(self) -> tuple[TaskSpec, ...]:
        return self.train.tasks


DatasetFactory = Callable[..., Splits]
_REGISTRY: Registry[DatasetFactory] = Registry("dataset", "dataset")
register_dataset = _REGISTRY.register


def list_datasets() -> list[str]:
    return sorted(_REGISTRY.names())


def load_dataset(name: str, **kwargs: Any) -> Splits:
    return _REGISTRY.get(name)(**kwargs)


def split_indices(n: int, seed: int, fractions: tuple[float, float] = (0.6, 0.2), stratify: Any = None) -> tuple[
    list[int], list[int], list[int]
]:
    """Seeded train/val/test index split (stratified when labels are given)."""
    from sklearn.model_selection import train_test_split

    idx = list(range(n))
    train, rest = train_test_split(
        idx, train_size=fractions[0], random_state=seed, stratify=None if stratify is None else stratify
    )
    rest_strat = None if stratify is None else [stratify[i] for i in rest]
    val_share = fractions[1] / (1.0 - fractions[0])
    val, test = train_test_split(rest, train_size=val_share, random_state=seed + 1, stratify=rest_strat)
    return sorted(train), sorted(val), sorted(test)
