"""scikit-learn's bundled handwritten digits (8x8, no download) and tasks derived from them."""

from __future__ import annotations

import numpy as np
import torch

from merging.data.base import MultitaskData, Preprocessing, Splits, register_dataset, split_indices
from merging.errors import MergingError
from merging.tasks import TaskSpec

PRIMES = {2, 3, 5, 7}
LOOPS = {0, 6, 8, 9}
DIGITS_PREPROCESSING = Preprocessing(size=(8, 8), channels=1, mean=(0.3,), std=(0.4,))

# name -> (labels, digit -> class id)
DIGIT_TASKS: dict[str, tuple[tuple[str, ...], dict[int, int]]] = {
    "digit": (tuple(str(d) for d in range(10)), {d: d for d in range(10)}),
    "parity": (("even", "odd"), {d: d % 2 for d in range(10)}),
    "large": (("small", "large"), {d: int(d >= 5) for d in range(10)}),
    "prime": (("not_prime", "prime"), {d: int(d in PRIMES) for d in range(10)}),
    "loop": (("no_loop", "loop"), {d: int(d in LOOPS) for d in range(10)}),
}


def raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) pixels in [0, 1] and (1797,) digit labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def _build(
    name: str, tasks: dict[str, tuple[tuple[str, ...], dict[int, int]]], split_seed: int, fractions: tuple[float, float]
) -> Splits:
    images, digits = raw_digits()
    x = DIGITS_PREPROCESSING.normalise(torch.from_numpy(images).unsqueeze(1))
    specs = tuple(TaskSpec(n, "classes", labels) for n, (labels, _) in tasks.items())
    y = {n: torch.tensor([m[int(d)] for d in digits], dtype=torch.long) for n, (_, m) in tasks.items()}
    full = MultitaskData(specs, x, y)
    tr, va, te = split_indices(len(digits), split_seed, fractions, stratify=digits.tolist())
    return Splits(
        name,
        full.subset(tr),
        full.subset(va),
        full.subset(te),
        DIGITS_PREPROCESSING,
        info={"source": "sklearn.datasets.load_digits", "split_seed": split_seed, "digits": digits.tolist()},
    )


@register_dataset("digits")
def digits(
    tasks: tuple[str, ...] | None = None, split_seed: int = 0, fractions: tuple[float, float] = (0.6, 0.2)
) -> Splits:
    """The embedded default: ``digit`` (10 classes), ``parity``, ``large`` (>= 5), ``prime``, ``loop``."""
    chosen = tasks or tuple(DIGIT_TASKS)
    unknown = [t for t in chosen if t not in DIGIT_TASKS]
    if unknown:
        raise MergingError("unknown_task", f"digits has no task {unknown}; known: {', '.join(DIGIT_TASKS)}")
    return _build("digits", {t: DIGIT_TASKS[t] for t in chosen}, split_seed, fractions)


def partitions(n_tasks: int, seed: int) -> list[tuple[int, ...]]:
    """``n_tasks`` distinct balanced splits of the ten digits into two classes of five."""
    rng = np.random.default_rng(seed)
    seen: set[tuple[int, ...]] = set()
    out: list[tuple[int, ...]] = []
    while len(out) < n_tasks:
        side = tuple(sorted(int(d) for d in rng.permutation(10)[:5]))
        key = min(side, tuple(sorted(set(range(10)) - set(side))))
        if key not in seen:
            seen.add(key)
            out.append(side)
    return out


@register_dataset("digits-partitions")
def digits_partitions(
    n_tasks: int = 5, partition_seed: int = 1234, split_seed: int = 0, fractions: tuple[float, float] = (0.6, 0.2)
) -> Splits:
    """Tasks ``p0..p{n-1}``: each a fixed random balanced 5-vs-5 split of the digits (related, equally hard)."""
    tasks: dict[str, tuple[tuple[str, ...], dict[int, int]]] = {}
    for i, side in enumerate(partitions(n_tasks, partition_seed)):
        tasks[f"p{i}"] = (("a", "b"), {d: int(d in side) for d in range(10)})
    splits = _build("digits-partitions", tasks, split_seed, fractions)
    splits.info["partitions"] = [list(p) for p in partitions(n_tasks, partition_seed)]
    return splits
