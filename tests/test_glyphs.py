"""The generated glyphs: deterministic per seed, independent draws, labels that follow the latents."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from merging.data import load_dataset
from merging.data.glyphs import ENCLOSED, LETTERS, glyphs, truth_split
from merging.errors import MergingError


def _hashes(x: torch.Tensor) -> set[str]:
    return {hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in x}


def test_same_seed_same_tensors_other_seed_other_images() -> None:
    a = glyphs(sizes=(300, 200, 200), seed=3)
    b = load_dataset("glyphs", sizes=(300, 200, 200), seed=3)
    c = glyphs(sizes=(300, 200, 200), seed=4)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.x, b.test.x)
    assert all(torch.equal(a.val.y[t], b.val.y[t]) for t in a.val.y)
    assert not torch.equal(a.train.x, c.train.x)
    # a bigger split leaves the others as they were: each split has its own stream
    d = glyphs(sizes=(300, 500, 200), seed=3)
    assert torch.equal(a.train.x, d.train.x) and torch.equal(a.test.x, d.test.x)


def test_splits_share_no_image() -> None:
    s = glyphs(sizes=(2000, 2000, 2000))
    truth = truth_split(2000)
    parts = [_hashes(p.x) for p in (s.train, s.val, s.test, truth)]
    assert all(len(p) == 2000 for p in parts)  # no repeated image within a split either
    for i in range(len(parts)):
        for j in range(i + 1, len(parts)):
            assert not parts[i] & parts[j]


def test_labels_follow_the_latents_and_every_class_is_drawn() -> None:
    s = glyphs(sizes=(3000, 10, 10))
    y = s.train.y
    enclosed = np.isin(np.asarray(LETTERS)[y["letter"].numpy()], list(ENCLOSED))
    assert np.array_equal(enclosed, y["enclosed"].numpy().astype(bool))
    for task in s.tasks:
        counts = torch.bincount(y[task.name], minlength=len(task.labels))
        assert counts.min() > 0.6 * len(y[task.name]) / len(task.labels)  # about uniform
    # style is drawn independently of identity: bold is as frequent among every letter
    bold_rate = [float(y["bold"][y["letter"] == k].float().mean()) for k in range(len(LETTERS))]
    assert max(bold_rate) - min(bold_rate) < 0.2


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(MergingError) as e:
        glyphs(size=(16, 20))
    assert e.value.code == "bad_argument"
    with pytest.raises(MergingError) as e:
        glyphs(sizes=(10, 0, 10))
    assert e.value.code == "bad_argument"
    with pytest.raises(MergingError) as e:
        glyphs(sizes=(10, 10, 10), tasks=("letter", "age"))
    assert e.value.code == "unknown_task"
