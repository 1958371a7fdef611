"""A small digits zoo for the pam/pruning tests: 3 tasks, half-width LeNet, a few epochs (seconds)."""

from __future__ import annotations

import functools

import torch

from merging.arch import create_arch
from merging.data import load_dataset
from merging.data.base import Splits
from merging.network import MultitaskNet
from merging.train import TrainConfig, train_single_task

TASKS = ("digit", "parity", "loop")


@functools.cache
def tiny_zoo() -> tuple[tuple[MultitaskNet, ...], Splits]:
    torch.set_num_threads(1)
    splits = load_dataset("digits", tasks=TASKS)
    arch = create_arch("lenet", width_mult=0.5)
    cfg = TrainConfig(epochs=8, seed=0, progress=False)
    return tuple(train_single_task(t, arch, splits.train, cfg) for t in splits.tasks), splits
