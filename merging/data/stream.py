"""Image files read on demand: a ``Dataset`` over the files, ``DataLoader`` workers, a bounded cache.

The folder/CSV and CelebA loaders hand out :class:`StreamingData`: the same interface as the
in-memory :class:`~merging.data.base.MultitaskData` (labels in memory, a few bytes per image), but
the images stay on disk. Batches come in exactly the order the in-memory data would give for the
same generator (the index plan is drawn the same way), so streaming and eager training see the
same images in the same steps. Memory is bounded by the loader's cache (``cache_mb`` in all, split
between the main process and its workers) plus the batches in flight, whatever the number of images.

What still needs one tensor (the pruner's check set, built from the validation split) calls
:meth:`StreamingData.in_memory`; random access (``data.x[idx]`` for calibration or an example
input) loads just those images.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from merging.data.base import MultitaskData, Preprocessing
from merging.errors import MergingError


@dataclass(frozen=True)
class LoaderConfig:
    """How streaming data is read."""

    workers: int = 2  # DataLoader worker processes (0: read in the calling process)
    cache_mb: float = 32.0  # decoded-image cache in all, split evenly between the main process and each worker (LRU)
    prefetch: int = 2  # batches each worker reads ahead
    memory_mb: float = 2048.0  # with stream=None, images are decoded into memory when they take at most this


def read_image01(path: Path, size: tuple[int, int], channels: int) -> np.ndarray:
    """One image file -> (C, H, W) float32 in [0, 1], resized as the eager loader does."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as src:
            im = src.convert("L" if channels == 1 else "RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR)
            a = np.asarray(im, dtype=np.float32) / 255.0
    except FileNotFoundError as e:
        raise MergingError("missing_image", f"image {path.name!r} listed in the labels is not in {path.parent}") from e
    except (UnidentifiedImageError, OSError) as e:
        raise MergingError("bad_image", f"cannot read image {path}: {e}") from e
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


def _libc_trim() -> Any:
    """glibc's ``malloc_trim`` (None elsewhere). Once some library (scikit-learn's import does it)
    has raised glibc's dynamic mmap threshold, the batch-sized buffers freed each step stay in the
    heap: measured, a pass over 20,000 images left 780 MB resident that ``malloc_trim`` returned."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)


_TRIM = _libc_trim()
TRIM_EVERY = 16  # batches between heap trims while streaming


def trim_heap() -> None:
    if _TRIM is not None:
        _TRIM(0)


class _Decoder(Dataset[Tensor]):
    """Image ``i`` -> network input, with an LRU cache bounded in bytes. What the loader's workers
    get a copy of (it holds no loader itself: no reference cycle, so dropping the data stops the
    workers at once rather than at the next garbage collection, which took ~10 s)."""

    def __init__(self, root: Path, names: list[str], size: tuple[int, int], channels: int,
                 pre: Preprocessing | None, cache_mb: float) -> None:
        self.root, self.names, self.size, self.channels, self.pre = root, names, size, channels, pre
        self.budget = cache_mb * 2**20
        self.image_bytes = 4 * channels * size[0] * size[1]
        self.cache: OrderedDict[int, Tensor] = OrderedDict()
        self.loads = 0

    def __len__(self) -> int:
        return len(self.names)

    def load01(self, i: int) -> Tensor:
        return torch.from_numpy(read_image01(self.root / self.names[i], self.size, self.channels))

    def __getitem__(self, i: int) -> Tensor:
        hit = self.cache.get(i)
        if hit is not None:
            self.cache.move_to_end(i)
            return hit
        x = self.load01(i)
        self.loads += 1
        if self.loads % (TRIM_EVERY * 16) == 0:  # in a worker too: the decode buffers fragment its heap
            trim_heap()
        if self.pre is not None:
            x = self.pre.normalise(x[None])[0]
        if self.image_bytes <= self.budget:
            self.cache[i] = x
            while len(self.cache) * self.image_bytes > self.budget:
                self.cache.popitem(last=False)
        return x


class ImageFiles:
    """The network inputs of a list of image files, decoded on demand (bounded cache per process),
    read in batches by persistent ``DataLoader`` workers."""

    def __init__(self, root: Path, names: Sequence[str], size: tuple[int, int], channels: int,
                 pre: Preprocessing | None = None, loader: LoaderConfig | None = None) -> None:
        self.root, self.names, self.size, self.channels = root, list(names), size, channels
        self.loader = loader or LoaderConfig()
        # Each process keeps its own cache (workers are forked copies): split the budget between them.
        share = self.loader.cache_mb / (max(self.loader.workers, 0) + 1)
        self._decoder = _Decoder(root, self.names, size, channels, pre, share)
        self._plan = _Plan()
        self._dl: DataLoader[Tensor] | None = None
        self._busy = False

    @property
    def pre(self) -> Preprocessing | None:
        return self._decoder.pre

    @pre.setter
    def pre(self, value: Preprocessing | None) -> None:
        self.close()  # workers hold a copy of the decoder
        self._decoder.pre = value
        self._decoder.cache.clear()

    def __len__(self) -> int:
        return len(self.names)

    def close(self) -> None:
        """Stop this store's worker processes now (they also stop when it is dropped)."""
        it = getattr(self._dl, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._dl = None

    def __getitem__(self, i: int) -> Tensor:
        return self._decoder[i]

    def stack(self, idx: Sequence[int]) -> Tensor:
        if not len(idx):
            return torch.zeros(0, self.channels, *self.size)
        return torch.stack([self._decoder[int(i)] for i in idx])

    def batches(self, plan: list[list[int]]) -> Iterator[Tensor]:
        """Stacked images of each index list of ``plan``, read by the (persistent) workers."""
        if self.loader.workers <= 0 or self._busy or len(plan) <= 1:
            for k, idx in enumerate(plan):
                if k % TRIM_EVERY == TRIM_EVERY - 1:
                    trim_heap()
                yield self.stack(idx)
            return
        if self._dl is None:
            self._dl = DataLoader(self._decoder, batch_sampler=self._plan, num_workers=self.loader.workers,
                                  collate_fn=torch.stack, persistent_workers=True,
                                  prefetch_factor=self.loader.prefetch)
        self._busy, self._plan.batches = True, plan
        try:
            for k, xb in enumerate(self._dl):
                if k % TRIM_EVERY == TRIM_EVERY - 1:
                    trim_heap()
                yield xb
        except RuntimeError as e:  # a worker's MergingError arrives re-wrapped
            raise MergingError("bad_image", f"reading images under {self.root} failed: {e}") from e
        finally:
            self._busy = False


class _Plan(Sampler[list[int]]):
    """The index lists of the next pass (set before each pass; workers persist across passes)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class LazyImages:
    """The images of some samples of an :class:`ImageFiles`, looking enough like an (N, C, H, W)
    tensor for what reads ``data.x``: ``len``, ``shape`` and indexing (which loads the images)."""

    def __init__(self, files: ImageFiles, idx: Tensor | None = None) -> None:
        self.files = files
        self.idx = torch.arange(len(files)) if idx is None else idx.to(torch.long)

    def __len__(self) -> int:
        return len(self.idx)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), self.files.channels, *self.files.size))

    def view(self, idx: Tensor | Sequence[int]) -> LazyImages:
        return LazyImages(self.files, self.idx[torch.as_tensor(idx, dtype=torch.long)])

    def __getitem__(self, key: Any) -> Tensor:
        if isinstance(key, int):
            return self.files[int(self.idx[key])]
        picked = self.idx[key] if isinstance(key, slice) else self.idx[torch.as_tensor(key, dtype=torch.long)]
        return self.files.stack(picked.tolist())

    def materialise(self) -> Tensor:
        return self.files.stack(self.idx.tolist())


@dataclass
class StreamingData(MultitaskData):
    """:class:`MultitaskData` whose ``x`` is a :class:`LazyImages` (images read on demand)."""

    @property
    def lazy(self) -> LazyImages:
        return cast(LazyImages, self.x)

    def subset(self, idx: Tensor | list[int]) -> StreamingData:
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        return StreamingData(self.tasks, self.lazy.view(idx_t), {k: v[idx_t] for k, v in self.y.items()})  # type: ignore[arg-type]

    def select_tasks(self, names: tuple[str, ...]) -> StreamingData:
        by_name = {t.name: t for t in self.tasks}
        return StreamingData(tuple(by_name[n] for n in names), self.x, {n: self.y[n] for n in names}, self.images)

    def batches(
        self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
        rank: int = 0, world: int = 1,
    ) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        plan = list(self.batch_indices(batch_size, shuffle, generator, rank, world))
        lazy = self.lazy
        files_plan = [lazy.idx[idx].tolist() for idx in plan]
        for idx, xb in zip(plan, lazy.files.batches(files_plan), strict=True):
            yield xb, {k: v[idx] for k, v in self.y.items()}

    def in_memory(self) -> MultitaskData:
        return MultitaskData(self.tasks, self.lazy.materialise(), self.y, self.images)


def channel_stats(files: ImageFiles, batch: int = 64) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the [0, 1] pixels over every image, in one streaming pass
    (float64 running sums; the eager loader's float32 reductions agree within ~1e-6)."""
    raw = ImageFiles(files.root, files.names, files.size, files.channels, None, LoaderConfig(
        workers=files.loader.workers, cache_mb=0.0, prefetch=files.loader.prefetch))
    total = torch.zeros(files.channels, dtype=torch.float64)
    squares = torch.zeros(files.channels, dtype=torch.float64)
    n = 0
    plan = [list(range(i, min(i + batch, len(raw)))) for i in range(0, len(raw), batch)]
    from tqdm.auto import tqdm

    for xb in tqdm(raw.batches(plan), total=len(plan), desc="image statistics", leave=False, disable=None):
        total += xb.sum(dim=(0, 2, 3), dtype=torch.float64)
        squares += (xb * xb).sum(dim=(0, 2, 3), dtype=torch.float64)
        n += xb.shape[0] * xb.shape[2] * xb.shape[3]
    raw.close()
    if n == 0:
        raise MergingError("bad_data", "no images listed")
    mean = total / n
    var = (squares - n * mean * mean) / max(n - 1, 1)
    return tuple(float(m) for m in mean), tuple(max(float(s), 1e-3) for s in var.clamp_min(0).sqrt())
