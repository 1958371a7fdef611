"""Data sets: derived digit tasks, the composite, user folders with a CSV, CelebA's attribute file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from merging.data import load_dataset
from merging.data.digits import partitions, raw_digits
from merging.data.files import parse_task_groups
from merging.errors import MergingError


def test_digits_tasks_follow_the_digit(digits_splits) -> None:
    s = digits_splits
    assert s.train.task_names == ("digit", "parity", "large", "prime", "loop")
    assert (len(s.train), len(s.val), len(s.test)) == (1078, 359, 360)
    d = s.test.y["digit"]
    assert torch.equal(s.test.y["parity"], d % 2)
    assert torch.equal(s.test.y["large"], (d >= 5).long())
    assert torch.equal(s.test.y["prime"], sum((d == p).long() for p in (2, 3, 5, 7)))
    assert torch.equal(s.test.y["loop"], sum((d == p).long() for p in (0, 6, 8, 9)))
    again = load_dataset("digits")
    assert torch.equal(again.val.x, s.val.x), "the split is fixed for a seed"
    other = load_dataset("digits", split_seed=1)
    assert not torch.equal(other.val.x, s.val.x)
    # Splits are disjoint: no image of the test split appears in training.
    train_rows = {tuple(r.tolist()) for r in s.train.x.flatten(1)}
    assert not any(tuple(r.tolist()) in train_rows for r in s.test.x.flatten(1)[:50])


def test_partitions_are_balanced_distinct_and_seeded() -> None:
    p = partitions(5, 1234)
    assert p == partitions(5, 1234) and p != partitions(5, 99)
    assert all(len(side) == 5 for side in p)
    keys = {min(side, tuple(sorted(set(range(10)) - set(side)))) for side in p}
    assert len(keys) == 5
    s = load_dataset("digits-partitions")
    digit = load_dataset("digits").train.y["digit"]  # same split seed -> same images in the same order
    for i, side in enumerate(p):
        expected = torch.tensor([int(int(v) in side) for v in digit])
        assert torch.equal(s.train.y[f"p{i}"], expected)
        assert expected.float().mean().item() == pytest.approx(0.5, abs=0.06)


def test_composite_labels_mark_the_digits_present() -> None:
    s = load_dataset("composite", sizes=(40, 10, 10), seed=3)
    assert s.train.x.shape == (40, 1, 16, 16)
    assert [t.name for t in s.tasks] == ["low", "high"] and s.tasks[0].kind == "attributes"
    images, digits = raw_digits()
    x01 = s.train.x * 0.35 + 0.2  # undo normalisation
    for i in range(5):
        present = set()
        for r in range(2):
            for c in range(2):
                tile = x01[i, 0, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8].numpy()
                if tile.max() > 1e-4:
                    matches = np.where(np.abs(images - tile).reshape(len(images), -1).max(1) < 1e-4)[0]
                    assert len(matches) >= 1
                    present.add(int(digits[matches[0]]))
        labels = torch.cat([s.train.y["low"][i], s.train.y["high"][i]])
        assert {d for d in range(10) if labels[d] == 1} == present


def _write_folder(root: Path, n: int = 12, columns: tuple[str, ...] = ("image", "shape", "color")) -> None:
    rng = np.random.default_rng(0)
    rows = [",".join(columns)]
    for i in range(n):
        arr = (rng.random((10, 12, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(root / f"img{i}.png")
        vals = {"image": f"img{i}.png", "shape": ["round", "square"][i % 2], "color": ["red", "green", "blue"][i % 3]}
        rows.append(",".join(vals[c] for c in columns))
    (root / "labels.csv").write_text("\n".join(rows) + "\n")


def test_folder_with_csv(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    s = load_dataset("folder", root=tmp_path, size=(8, 8), channels=3)
    assert [t.name for t in s.tasks] == ["shape", "color"]
    assert s.tasks[1].labels == ("blue", "green", "red")
    assert s.train.x.shape[1:] == (3, 8, 8)
    assert len(s.train) + len(s.val) + len(s.test) == 12
    _write_folder(tmp_path, columns=("image", "shape"))
    with pytest.raises(MergingError) as e:
        load_dataset("folder", root=tmp_path, tasks=("shape", "color"))
    assert e.value.code == "missing_column" and "color" in e.value.message


def test_celeba_attribute_file(tmp_path: Path) -> None:
    attrs = ["Smiling", "Male", "Black_Hair", "Blond_Hair"]
    lines = ["6", " ".join(attrs)]
    for i in range(6):
        Image.fromarray(np.full((9, 9, 3), i * 30, dtype=np.uint8)).save(tmp_path / f"{i:06d}.jpg")
        lines.append(f"{i:06d}.jpg " + " ".join("1" if (i + k) % 2 else "-1" for k in range(4)))
    (tmp_path / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    s = load_dataset("celeba", attr_file=tmp_path / "list_attr_celeba.txt", image_dir=tmp_path,
                     task_groups="face=Smiling,Male;hair=Black_Hair,Blond_Hair", size=(8, 8))
    assert [t.name for t in s.tasks] == ["face", "hair"]
    all_y = torch.cat([s.train.y["face"], s.val.y["face"], s.test.y["face"]])
    assert sorted(all_y[:, 0].tolist()).count(1.0) == 3
    with pytest.raises(MergingError) as e:
        load_dataset("celeba", attr_file=tmp_path / "list_attr_celeba.txt", image_dir=tmp_path,
                     task_groups="face=Smiling,Beard")
    assert e.value.code == "unknown_attribute"
    (tmp_path / "bad.txt").write_text("3\nA B\nx.jpg 1 2\n")
    with pytest.raises(MergingError):
        load_dataset("celeba", attr_file=tmp_path / "bad.txt", image_dir=tmp_path, task_groups="a=A")
    assert parse_task_groups("a=X,Y; b=Z") == {"a": ["X", "Y"], "b": ["Z"]}


def test_unknown_dataset_and_task() -> None:
    with pytest.raises(MergingError) as e:
        load_dataset("imagenet")
    assert e.value.code == "unknown_dataset"
    with pytest.raises(MergingError) as e:
        load_dataset("digits", tasks=("digit", "age"))
    assert e.value.code == "unknown_task"


def test_folder_decodes_into_memory_when_it_fits_and_streams_when_it_does_not(tmp_path: Path) -> None:
    from merging.data.stream import LoaderConfig, StreamingData

    _write_folder(tmp_path)
    fits = load_dataset("folder", root=tmp_path, size=(8, 8), channels=3)
    assert not fits.info["streaming"] and not isinstance(fits.train, StreamingData)
    tight = load_dataset("folder", root=tmp_path, size=(8, 8), channels=3, loader=LoaderConfig(memory_mb=1e-4))
    assert tight.info["streaming"] and isinstance(tight.train, StreamingData)
    torch.testing.assert_close(tight.val.in_memory().x, fits.val.x, rtol=1e-4, atol=1e-4)
