"""The digit-scenes data set: RGB at 32x32 and 64x64, deterministic, disjoint sources, honest labels, learnable."""

from __future__ import annotations

import functools
import time

import numpy as np
import pytest
import torch

from merging.data import list_datasets, load_dataset
from merging.data.base import Splits
from merging.data.digits import raw_digits
from merging.data.scenes import BACKGROUNDS, INK_RGB, INKS, POSITIONS, make_scenes
from merging.errors import MergingError

TASKS = ("digit", "parity", "position", "ink", "background")


@functools.cache
def small(size: int, seed: int = 0) -> Splits:
    return make_scenes(size, sizes=(600, 200, 200), seed=seed)


def pixels(splits: Splits, part: str = "train") -> np.ndarray:
    """Back to [0, 1] RGB, (N, 3, H, W)."""
    pre = splits.preprocessing
    x = getattr(splits, part).x
    return (x * torch.tensor(pre.std).view(1, 3, 1, 1) + torch.tensor(pre.mean).view(1, 3, 1, 1)).numpy()


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_channels_tasks_and_normalisation(size: int) -> None:
    s = small(size)
    assert [len(s.train), len(s.val), len(s.test)] == [600, 200, 200]
    assert tuple(s.train.x.shape[1:]) == (3, size, size) and s.train.x.dtype == torch.float32
    pre = s.preprocessing
    assert pre.channels == 3 and pre.size == (size, size) and len(pre.mean) == len(pre.std) == 3
    assert tuple(t.name for t in s.tasks) == TASKS
    assert [t.out_dim for t in s.tasks] == [10, 2, len(POSITIONS), len(INKS), len(BACKGROUNDS)]
    for t in s.tasks:
        y = s.train.y[t.name]
        assert y.dtype == torch.long and set(y.tolist()) == set(range(t.out_dim))  # every class occurs
    # the fixed mean/std fit the generated pixels: the normalised input is about zero-mean, unit-std
    x = s.train.x
    assert x.mean(dim=(0, 2, 3)).abs().max() < 0.1
    assert (x.std(dim=(0, 2, 3)) - 1).abs().max() < 0.1
    assert pixels(s).min() >= -1e-5 and pixels(s).max() <= 1 + 1e-5


def test_registered_names_build_their_size_and_bad_sizes_are_coded_errors() -> None:
    assert {"scenes", "scenes-64"} <= set(list_datasets())
    s32 = load_dataset("scenes", sizes=(20, 10, 10), split_seed=1)
    s64 = load_dataset("scenes-64", sizes=(20, 10, 10), split_seed=1)
    assert (s32.name, s32.preprocessing.size) == ("scenes", (32, 32))
    assert (s64.name, s64.preprocessing.size) == ("scenes-64", (64, 64))
    assert load_dataset("scenes", size=(64, 64), sizes=(5, 5, 5)).name == "scenes-64"
    for bad in (30, 8, (32, 64)):
        with pytest.raises(MergingError) as e:
            make_scenes(bad, sizes=(5, 5, 5))  # type: ignore[arg-type]
        assert e.value.code == "bad_argument"


def test_same_seed_same_tensors_other_seed_other_images() -> None:
    a, b = make_scenes(32, sizes=(200, 50, 50), seed=3), make_scenes(32, sizes=(200, 50, 50), seed=3)
    for part in ("train", "val", "test"):
        pa, pb = getattr(a, part), getattr(b, part)
        assert torch.equal(pa.x, pb.x)
        assert all(torch.equal(pa.y[t], pb.y[t]) for t in TASKS)
    # the labels do not depend on the size: the same seed labels 32x32 and 64x64 images alike
    assert all(torch.equal(small(32).train.y[t], small(64).train.y[t]) for t in TASKS)
    c = make_scenes(32, sizes=(200, 50, 50), seed=4)
    assert not torch.equal(a.train.x, c.train.x)
    assert not torch.equal(a.train.y["position"], c.train.y["position"])


def test_splits_draw_on_disjoint_source_digits_and_digit_labels_are_the_sources() -> None:
    s = small(32)
    _, digits = raw_digits()
    src = {part: np.asarray(s.info["source_index"][part]) for part in ("train", "val", "test")}
    assert not set(src["train"]) & set(src["val"])
    assert not set(src["train"]) & set(src["test"])
    assert not set(src["val"]) & set(src["test"])
    for part, idx in src.items():
        assert np.array_equal(getattr(s, part).y["digit"].numpy(), digits[idx]), part
    # another split seed moves digits between the splits
    other = make_scenes(32, sizes=(600, 200, 200), split_seed=1).info["source_index"]["train"]
    assert set(other) != set(src["train"].tolist())


def test_parity_follows_the_digit() -> None:
    s = small(32)
    for part in ("train", "val", "test"):
        y = getattr(s, part).y
        assert torch.equal(y["parity"], y["digit"] % 2)


@pytest.mark.parametrize("size", [32, 64])
def test_ink_of_the_labelled_colour_lies_in_the_labelled_quadrant(size: int) -> None:
    s = small(size)
    x = pixels(s).transpose(0, 2, 3, 1)  # (N, H, W, 3)
    ink = s.train.y["ink"].numpy()
    near = np.linalg.norm(x - INK_RGB[ink][:, None, None, :], axis=-1) < 0.25  # pixels of the ink's colour
    h = size // 2
    per_quadrant = np.stack([near[:, :h, :h].sum((1, 2)), near[:, :h, h:].sum((1, 2)),
                             near[:, h:, :h].sum((1, 2)), near[:, h:, h:].sum((1, 2))], axis=1)
    position = s.train.y["position"].numpy()
    assert (per_quadrant.argmax(1) == position).mean() > 0.98
    # and the labelled colour is the one there: other ink colours find (almost) nothing in that quadrant
    wrong = (ink + 1) % len(INKS)
    near_wrong = np.linalg.norm(x - INK_RGB[wrong][:, None, None, :], axis=-1) < 0.25
    assert near_wrong.sum() < 0.05 * near.sum()


def test_background_label_is_the_stripe_orientation() -> None:
    s = small(32)
    x = pixels(s).mean(1)  # grey, (N, H, W)
    # read the texture in the quadrant diagonally opposite the digit (no ink there)
    h = 16
    pos = s.train.y["position"].numpy()
    patches = np.stack([x[i, (1 - p // 2) * h:(2 - p // 2) * h, (1 - p % 2) * h:(2 - p % 2) * h]
                        for i, p in enumerate(pos)])
    along_y = patches.mean(2).var(1)  # row means vary: horizontal stripes
    along_x = patches.mean(1).var(1)  # column means vary: vertical stripes
    bg = s.train.y["background"].numpy()
    hor, ver, other = bg == 0, bg == 1, bg >= 2
    assert (along_y[hor] > 4 * along_x[hor]).mean() > 0.95
    assert (along_x[ver] > 4 * along_y[ver]).mean() > 0.95
    # diagonal and checker patterns vary along neither axis' mean as much as stripes do
    assert np.median(np.maximum(along_x, along_y)[other]) < 0.25 * np.median(along_y[hor])


@pytest.mark.slow  # ~100 s of training on a loaded 2-core machine
def test_a_small_lenet_learns_the_digit_well_above_chance() -> None:
    from merging.arch import create_arch
    from merging.train import TrainConfig, evaluate, train_single_task

    start = time.perf_counter()
    s = make_scenes(32, sizes=(2000, 10, 500), seed=1)
    arch = create_arch("lenet", in_channels=3, input_size=(32, 32), width_mult=0.5)
    task = next(t for t in s.tasks if t.name == "digit")
    cfg = TrainConfig(epochs=4, lr=1e-2, batch_size=32, shift=0, progress=False, seed=0)
    net = train_single_task(task, arch, s.train, cfg)
    acc = evaluate(net, s.test)["digit"]
    # 65% after 5 epochs when measured; test digits were never seen in training (disjoint sources)
    assert acc > 35.0, f"digit test accuracy {acc:.1f}% (chance 10%)"
    assert time.perf_counter() - start < 300  # about 15 s on an idle 2-core machine
