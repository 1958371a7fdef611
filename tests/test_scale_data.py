"""Streaming image folders: the same data as the eager path, with memory that does not grow with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from merging.data import load_dataset
from merging.data.stream import LoaderConfig, StreamingData
from merging.errors import MergingError
from pam_app.bench.scale import loader_pass_in_child, write_image_folder


def _folder(root: Path, n: int = 40) -> Path:
    rng = np.random.default_rng(0)
    rows = ["image,shape,color"]
    for i in range(n):
        Image.fromarray((rng.random((10, 12, 3)) * 255).astype(np.uint8)).save(root / f"img{i}.png")
        rows.append(f"img{i}.png,{['round', 'square'][i % 2]},{['red', 'green', 'blue'][i % 3]}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_gives_the_eager_data_in_the_same_order(tmp_path: Path, workers: int) -> None:
    _folder(tmp_path)
    eager = load_dataset("folder", root=tmp_path, size=(8, 8), channels=3, stream=False)
    lazy = load_dataset("folder", root=tmp_path, size=(8, 8), channels=3, stream=True,
                        loader=LoaderConfig(workers=workers))
    assert isinstance(lazy.train, StreamingData) and lazy.info["streaming"] and not eager.info["streaming"]
    np.testing.assert_allclose(lazy.preprocessing.mean, eager.preprocessing.mean, rtol=1e-5)
    np.testing.assert_allclose(lazy.preprocessing.std, eager.preprocessing.std, rtol=1e-4)
    for part in ("train", "val", "test"):
        e, s = getattr(eager, part), getattr(lazy, part)
        assert len(e) == len(s) and s.x.shape == e.x.shape
        batches = zip(e.batches(7, True, torch.Generator().manual_seed(2)),
                      s.batches(7, True, torch.Generator().manual_seed(2)), strict=True)
        for (xe, ye), (xs, ys) in batches:
            torch.testing.assert_close(xs, xe, rtol=1e-4, atol=1e-4)
            assert all(torch.equal(ye[k], ys[k]) for k in ye)
    torch.testing.assert_close(lazy.val.in_memory().x, eager.val.x, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lazy.train.x[torch.tensor([3, 1])], eager.train.x[torch.tensor([3, 1])],
                               rtol=1e-4, atol=1e-4)
    sub = lazy.train.subset([2, 0]).select_tasks(("color",))
    torch.testing.assert_close(sub.x[:2], eager.train.x[torch.tensor([2, 0])], rtol=1e-4, atol=1e-4)


def test_streaming_reports_missing_and_broken_images(tmp_path: Path) -> None:
    _folder(tmp_path, n=8)
    (tmp_path / "img3.png").unlink()
    with pytest.raises(MergingError) as e:
        load_dataset("folder", root=tmp_path, size=(8, 8))
    assert e.value.code == "missing_image"
    (tmp_path / "img3.png").write_bytes(b"not an image")
    with pytest.raises(MergingError) as e:
        load_dataset("folder", root=tmp_path, size=(8, 8), loader=LoaderConfig(workers=0))
    assert e.value.code == "bad_image"


@pytest.mark.slow  # ~20 s; the 20,000-image check beside it is the thorough one
def test_streaming_memory_stays_below_the_data(tmp_path: Path) -> None:
    """1,500 images of 64x64 RGB: 70 MB of float32 pixels, which the eager path holds at least twice
    at its peak (decoded, normalised); streaming holds an 8 MB cache and the batches in flight.
    (Eager vs streaming side by side, at 20,000 images: ``pam bench-scale``.)"""
    root = write_image_folder(tmp_path / "f", 1500, 64)
    streaming = loader_pass_in_child(root, 64, True, 0, 8.0)
    assert streaming["images"] == 1500
    assert streaming["rss_growth_mb"] < 80, streaming


@pytest.mark.slow
def test_folder_loader_over_20000_images_grows_rss_under_200mb(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "f", 20_000, 64)
    for workers in (0, 2):
        p = loader_pass_in_child(root, 64, True, workers, LoaderConfig().cache_mb)
        assert p["images"] == 20_000 and p["rss_growth_mb"] < 200, p
