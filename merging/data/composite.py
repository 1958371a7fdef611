"""A multi-label composite of digits, built the way the paper built its Fashion-MNIST benchmark.

Each image is a ``grid x grid`` tiling of 8x8 digits (a tile may be blank); task ``low`` has one
binary attribute per digit 0-4 (present or not), task ``high`` one per digit 5-9. Tiles of the
training images come only from training digits, and likewise for validation and test.
"""

from __future__ import annotations

import numpy as np
import torch

from merging.data.base import MultitaskData, Preprocessing, Splits, register_dataset, split_indices
from merging.data.digits import raw_digits
from merging.tasks import TaskSpec


def _compose(
    images: np.ndarray, digits: np.ndarray, pool: list[int], n: int, grid: int, p_blank: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    out = np.zeros((n, grid * 8, grid * 8), dtype=np.float32)
    present = np.zeros((n, 10), dtype=np.float32)
    for i in range(n):
        for r in range(grid):
            for c in range(grid):
                if rng.random() < p_blank:
                    continue
                j = pool[int(rng.integers(len(pool)))]
                out[i, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] = images[j]
                present[i, digits[j]] = 1.0
    return out, present


@register_dataset("composite")
def composite(
    grid: int = 2,
    p_blank: float = 0.25,
    sizes: tuple[int, int, int] = (4000, 1500, 1500),
    seed: int = 0,
    split_seed: int = 0,
) -> Splits:
    images, digits = raw_digits()
    pre = Preprocessing(size=(grid * 8, grid * 8), channels=1, mean=(0.2,), std=(0.35,))
    tasks = (
        TaskSpec("low", "attributes", tuple(f"has_{d}" for d in range(5))),
        TaskSpec("high", "attributes", tuple(f"has_{d}" for d in range(5, 10))),
    )
    rng = np.random.default_rng(seed)
    parts = []
    for pool, n in zip(split_indices(len(digits), split_seed, stratify=digits.tolist()), sizes, strict=True):
        imgs, present = _compose(images, digits, pool, n, grid, p_blank, rng)
        x = pre.normalise(torch.from_numpy(imgs).unsqueeze(1))
        y = {"low": torch.from_numpy(present[:, :5]), "high": torch.from_numpy(present[:, 5:])}
        parts.append(MultitaskData(tasks, x, y))
    return Splits("composite", parts[0], parts[1], parts[2], pre, info={"grid": grid, "seed": seed})
