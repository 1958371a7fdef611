"""The user's own data: an image folder with a labels CSV, or CelebA's attribute file."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from merging.data.base import MultitaskData, Preprocessing, Splits, register_dataset, split_indices
from merging.data.stream import ImageFiles, LazyImages, LoaderConfig, StreamingData, channel_stats, read_image01
from merging.errors import MergingError
from merging.tasks import TaskSpec


def _check_listed(root: Path, names: list[str]) -> None:
    if not names:
        raise MergingError("bad_data", "no images listed")
    for name in names:
        if not (root / name).is_file():
            raise MergingError("missing_image", f"image {name!r} listed in the labels is not in {root}")


def _load_images(root: Path, names: list[str], size: tuple[int, int], channels: int) -> torch.Tensor:
    """The eager path: every image decoded into one tensor (memory grows with the data set)."""
    _check_listed(root, names)
    bar = tqdm(names, desc="images", leave=False, disable=None)
    arrays = [read_image01(root / name, size, channels) for name in bar]
    return torch.from_numpy(np.stack(arrays))


def _split(name: str, tasks: tuple[TaskSpec, ...], x: torch.Tensor | ImageFiles, y: dict[str, torch.Tensor],
           pre: Preprocessing, split_seed: int, info: dict[str, object]) -> Splits:
    if len(x) < 5:
        raise MergingError("bad_data", f"{name}: need at least 5 images to split, got {len(x)}")
    full: MultitaskData
    if isinstance(x, ImageFiles):
        x.pre = pre
        full = StreamingData(tasks, LazyImages(x), y)  # type: ignore[arg-type]
    else:
        full = MultitaskData(tasks, pre.normalise(x), y)
    tr, va, te = split_indices(len(full), split_seed)
    return Splits(name, full.subset(tr), full.subset(va), full.subset(te), pre,
                  info={**info, "streaming": isinstance(x, ImageFiles)})


def _streams(stream: bool | None, n: int, size: tuple[int, int], channels: int, loader: LoaderConfig | None) -> bool:
    """Whether to stream: as asked, or (``None``) only when the decoded images would not fit."""
    if stream is not None:
        return stream
    decoded_mb = n * channels * size[0] * size[1] * 4 / 2**20
    return decoded_mb > (loader or LoaderConfig()).memory_mb


@register_dataset("folder")
def folder(
    root: str | Path,
    labels_csv: str | Path | None = None,
    image_column: str = "image",
    tasks: tuple[str, ...] | None = None,
    size: tuple[int, int] = (32, 32),
    channels: int = 1,
    split_seed: int = 0,
    stream: bool | None = None,
    loader: LoaderConfig | None = None,
) -> Splits:
    """Images under ``root`` and a CSV (``root/labels.csv`` by default) with an image column and
    one column per task; each task's classes are the distinct values of its column, sorted.

    ``stream``: read images on demand (``merging.data.stream``; memory bounded by ``loader``'s
    cache); ``False``: decode them all into memory first; ``None``: decode them into memory when
    they fit in ``loader.memory_mb`` (training then runs at the speed of its arithmetic)."""
    root = Path(root)
    csv_path = Path(labels_csv) if labels_csv else root / "labels.csv"
    if not csv_path.is_file():
        raise MergingError("missing_labels", f"no labels CSV at {csv_path}")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    if image_column not in header:
        raise MergingError("missing_column", f"{csv_path} has no {image_column!r} column (columns: {header})")
    wanted = tasks or tuple(c for c in header if c != image_column)
    missing = [t for t in wanted if t not in header]
    if missing:
        raise MergingError("missing_column", f"{csv_path} lacks task column(s) {missing} (columns: {header})")
    if not wanted:
        raise MergingError("missing_column", f"{csv_path} has no task column besides {image_column!r}")
    specs: list[TaskSpec] = []
    y: dict[str, torch.Tensor] = {}
    for t in wanted:
        values = [(r.get(t) or "").strip() for r in rows]
        if any(v == "" for v in values):
            raise MergingError("bad_data", f"{csv_path}: task {t!r} has empty cells")
        classes = sorted(set(values))
        if len(classes) < 2:
            raise MergingError("bad_data", f"{csv_path}: task {t!r} has a single class {classes}")
        specs.append(TaskSpec(t, "classes", tuple(classes)))
        y[t] = torch.tensor([classes.index(v) for v in values], dtype=torch.long)
    names = [r[image_column] for r in rows]
    info: dict[str, object] = {"root": str(root), "labels": str(csv_path)}
    if _streams(stream, len(names), size, channels, loader):
        _check_listed(root, names)
        files = ImageFiles(root, names, size, channels, loader=loader)
        mean, std = channel_stats(files)
        pre = Preprocessing(size=size, channels=channels, mean=mean, std=std)
        return _split("folder", tuple(specs), files, y, pre, split_seed, info)
    x01 = _load_images(root, names, size, channels)
    mean = tuple(float(m) for m in x01.mean(dim=(0, 2, 3)))
    std = tuple(max(float(s), 1e-3) for s in x01.std(dim=(0, 2, 3)))
    pre = Preprocessing(size=size, channels=channels, mean=mean, std=std)
    return _split("folder", tuple(specs), x01, y, pre, split_seed, info)


def parse_celeba_attrs(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """``list_attr_celeba.txt``: a count line, a line of attribute names, then ``file v1 v2 ...`` (+1/-1)."""
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        count = int(lines[0].split()[0])
        attrs = lines[1].split()
    except (OSError, ValueError, IndexError, UnicodeDecodeError) as e:
        raise MergingError("bad_attr_file", f"{path} is not a CelebA attribute file: {e}") from e
    files: list[str] = []
    values: list[list[int]] = []
    for n, ln in enumerate(lines[2:], start=3):
        parts = ln.split()
        if len(parts) != len(attrs) + 1 or any(v not in ("1", "-1") for v in parts[1:]):
            raise MergingError("bad_attr_file", f"{path}:{n}: expected a file name and {len(attrs)} values of 1/-1")
        files.append(parts[0])
        values.append([int(v) for v in parts[1:]])
    if len(files) != count:
        raise MergingError("bad_attr_file", f"{path}: header says {count} images, found {len(files)}")
    return attrs, files, np.array(values, dtype=np.int64).reshape(len(files), len(attrs))


def parse_task_groups(text: str) -> dict[str, list[str]]:
    """``"face=Smiling,Male;hair=Black_Hair,Blond_Hair"`` -> {"face": [...], "hair": [...]}."""
    groups: dict[str, list[str]] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        if "=" not in part:
            raise MergingError("bad_task_groups", f"expected name=attr,attr in {part!r}")
        name, attrs = part.split("=", 1)
        groups[name.strip()] = [a.strip() for a in attrs.split(",") if a.strip()]
    if not groups:
        raise MergingError("bad_task_groups", "no task groups given")
    return groups


@register_dataset("celeba")
def celeba(
    attr_file: str | Path,
    image_dir: str | Path,
    task_groups: dict[str, list[str]] | str,
    size: tuple[int, int] = (32, 32),
    channels: int = 3,
    limit: int | None = None,
    split_seed: int = 0,
    stream: bool | None = None,
    loader: LoaderConfig | None = None,
) -> Splits:
    """CelebA-format attributes; each task is a named group of binary attributes (images streamed
    from disk or decoded into memory as for :func:`folder`)."""
    groups = parse_task_groups(task_groups) if isinstance(task_groups, str) else task_groups
    attrs, files, values = parse_celeba_attrs(Path(attr_file))
    if limit:
        files, values = files[:limit], values[:limit]
    specs: list[TaskSpec] = []
    y: dict[str, torch.Tensor] = {}
    for name, members in groups.items():
        unknown = [a for a in members if a not in attrs]
        if unknown or not members:
            raise MergingError("unknown_attribute", f"task {name!r}: unknown attribute(s) {unknown}; known: {attrs}")
        specs.append(TaskSpec(name, "attributes", tuple(members)))
        cols = [attrs.index(a) for a in members]
        y[name] = torch.from_numpy((values[:, cols] == 1).astype(np.float32))
    pre = Preprocessing(size=size, channels=channels, mean=(0.5,) * channels, std=(0.5,) * channels)
    x: torch.Tensor | ImageFiles
    if _streams(stream, len(files), size, channels, loader):
        _check_listed(Path(image_dir), files)
        x = ImageFiles(Path(image_dir), files, size, channels, loader=loader)
    else:
        x = _load_images(Path(image_dir), files, size, channels)
    return _split("celeba", tuple(specs), x, y, pre, split_seed, {"attr_file": str(attr_file)})
