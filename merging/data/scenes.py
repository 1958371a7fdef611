"""Digit scenes: RGB images at 32x32 (``scenes``) or 64x64 (``scenes-64``) where MobileNet- and
ResNet-class families make sense, generated from scikit-learn's bundled digits (no download).

Each image is one handwritten digit, upscaled to 7/16 of the canvas and drawn in one of four ink
colours inside one of the four quadrants (with a random offset there), over a background of a random
dark colour carrying one of four textures (horizontal, vertical or diagonal stripes, or a checker
pattern) at a random period and phase, plus pixel noise. Five tasks, chosen for mixed relatedness:

- ``digit`` (10 classes): the digit's identity; needs shape features.
- ``parity`` (even/odd): strongly related to ``digit`` -- a function of it, so every feature that
  tells digits apart serves parity too (the pair PAM should share most).
- ``position`` (quadrant: top_left, top_right, bottom_left, bottom_right): unrelated to identity
  (drawn independently), but needs the same "where is the ink" localisation as ``ink``; it asks
  for spatial layout, which a global-average-pooled head must recover from padding and depth.
- ``ink`` (red, green, blue, yellow): unrelated to identity and position (drawn independently);
  needs colour read only where the strokes are, so it shares stroke detection with ``digit``
  and localisation with ``position`` but none of the shape features.
- ``background`` (horizontal, vertical, diagonal, checker): unrelated to every other task; needs
  oriented texture features that the other four tasks must learn to ignore.

Training, validation and test images are drawn from disjoint source digits (a stratified split of
the 1,797 digits), so a network cannot score by memorising strokes it saw in training. Every random
choice comes from ``seed`` (rendering) and ``split_seed`` (which digits go where): the same
arguments give the same tensors, and the labels do not depend on the size (``scenes`` and
``scenes-64`` with one seed label their images alike). Rendering is vectorised (NumPy)
and chunked: the default 10,000 images at 32x32 (120 MB) or 5,000 at 64x64 (245 MB) take 2-3 s,
and peak memory stays near the size of the result.

Which size to ask for by name: ``scenes`` (32x32) and ``scenes-64``, so that everything that reloads
a data set from a model's ``dataset`` name (``pam bench``) gets the size the model was trained at.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from merging.data.base import MultitaskData, Preprocessing, Splits, register_dataset, split_indices
from merging.data.digits import raw_digits
from merging.errors import MergingError
from merging.tasks import TaskSpec

POSITIONS = ("top_left", "top_right", "bottom_left", "bottom_right")
INKS = ("red", "green", "blue", "yellow")
BACKGROUNDS = ("horizontal", "vertical", "diagonal", "checker")
INK_RGB = np.array([[0.92, 0.18, 0.15], [0.2, 0.85, 0.25], [0.25, 0.4, 1.0], [0.95, 0.85, 0.15]], dtype=np.float32)

INK_JITTER = 0.06  # per-image, per-channel uniform shift of the ink colour (labels stay clean)
BG_LOW, BG_HIGH = 0.05, 0.45  # background base colour per channel: dark enough for every ink to stand out
TEXTURE_AMPLITUDE = 0.1
NOISE_STD = 0.03
CHUNK = 1024  # images rendered at a time: bounds the temporaries

# Per-channel mean and std measured on 20,000 (32x32) and 8,000 (64x64) training images, seed 0: fixed
# constants, because the manifest hands them to devices and they must not depend on a data set's seed.
_STATS: dict[int, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    32: ((0.269, 0.268, 0.26), (0.159, 0.154, 0.15)),
    64: ((0.272, 0.268, 0.259), (0.159, 0.153, 0.148)),
}


def _tasks() -> tuple[TaskSpec, ...]:
    return (
        TaskSpec("digit", "classes", tuple(str(d) for d in range(10))),
        TaskSpec("parity", "classes", ("even", "odd")),
        TaskSpec("position", "classes", POSITIONS),
        TaskSpec("ink", "classes", INKS),
        TaskSpec("background", "classes", BACKGROUNDS),
    )


def preprocessing(size: int) -> Preprocessing:
    mean, std = _STATS.get(size, _STATS[32])
    return Preprocessing(size=(size, size), channels=3, mean=mean, std=std)


def _upscaled_digits(images: np.ndarray, d: int) -> np.ndarray:
    """(n, 8, 8) in [0, 1] -> (n, d, d), bilinear: smooth strokes at the canvas' scale."""
    t = F.interpolate(torch.from_numpy(images).unsqueeze(1), size=(d, d), mode="bilinear", align_corners=False)
    return t.squeeze(1).clamp_(0.0, 1.0).numpy()


def _textures(kind: np.ndarray, axis: np.ndarray, w: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """(m, size, size) patterns in [-1, 1]; every one is a sum of outer products of 1-D sines (cheap)."""
    ph0, ph1 = phase[:, :1], phase[:, 1:]
    out = np.empty((len(kind), len(axis), len(axis)), dtype=np.float32)  # [image, y, x]
    for k in range(len(BACKGROUNDS)):
        rows = np.nonzero(kind == k)[0]
        wk, p0, p1 = w[rows], ph0[rows], ph1[rows]
        if k == 0:  # horizontal stripes: varies along y
            out[rows] = np.sin(wk * axis + p0)[:, :, None]
        elif k == 1:  # vertical stripes: varies along x
            out[rows] = np.sin(wk * axis + p0)[:, None, :]
        elif k == 2:  # diagonal: sin(a + b) = sin a cos b + cos a sin b, a along x, b along y
            a, b = wk * axis / np.sqrt(2) + p0, wk * axis / np.sqrt(2)
            out[rows] = np.sin(a)[:, None, :] * np.cos(b)[:, :, None] + np.cos(a)[:, None, :] * np.sin(b)[:, :, None]
        else:  # checker: product of a vertical and a horizontal wave
            out[rows] = np.sin(wk * axis + p0)[:, None, :] * np.sin(wk * axis + p1)[:, :, None]
    return out


def _render(
    glyphs: np.ndarray, size: int, source: np.ndarray, labels: dict[str, np.ndarray], rng: np.random.Generator
) -> np.ndarray:
    """(n, 3, size, size) pixels in [0, 1] for the drawn labels; ``glyphs`` are the upscaled digits."""
    n, d, half = len(source), glyphs.shape[1], size // 2
    # continuous nuisances, drawn for all images up front so chunking does not change the stream
    bg = rng.uniform(BG_LOW, BG_HIGH, size=(n, 3)).astype(np.float32)
    ink = (INK_RGB[labels["ink"]] + rng.uniform(-INK_JITTER, INK_JITTER, size=(n, 3))).astype(np.float32)
    period = rng.uniform(3.0, 6.0, size=n).astype(np.float32) * (size / 32)
    phase = rng.uniform(0.0, 2 * np.pi, size=(n, 2)).astype(np.float32)
    slack = half - d
    offset = rng.integers(0, slack + 1, size=(n, 2))
    noise_seed = int(rng.integers(2**63))

    quad = labels["position"]
    top = (quad // 2) * half + offset[:, 0]
    left = (quad % 2) * half + offset[:, 1]
    axis = np.arange(size, dtype=np.float32)
    out = np.empty((n, 3, size, size), dtype=np.float32)
    noise_rng = np.random.default_rng(noise_seed)
    ar = np.arange(d)
    for lo in range(0, n, CHUNK):
        s = slice(lo, min(n, lo + CHUNK))
        m = s.stop - s.start
        texture = _textures(labels["background"][s], axis, (2 * np.pi / period[s])[:, None], phase[s])
        alpha = np.zeros((m, size, size), dtype=np.float32)
        rows = (top[s][:, None] + ar)[:, :, None]
        cols = (left[s][:, None] + ar)[:, None, :]
        alpha[np.arange(m)[:, None, None], rows, cols] = glyphs[source[s]]
        back = bg[s][:, :, None, None] + TEXTURE_AMPLITUDE * texture[:, None]
        img = back + alpha[:, None] * (ink[s][:, :, None, None] - back)
        img += NOISE_STD * noise_rng.standard_normal(size=img.shape, dtype=np.float32)
        np.clip(img, 0.0, 1.0, out=out[s])
    return out


def _split(
    pool: list[int], n: int, digits: np.ndarray, glyphs: np.ndarray, size: int, pre: Preprocessing,
    rng: np.random.Generator,
) -> tuple[MultitaskData, np.ndarray]:
    source = np.asarray(pool, dtype=np.int64)[rng.integers(0, len(pool), size=n)]
    digit = digits[source]
    labels = {
        "digit": digit,
        "parity": digit % 2,
        "position": rng.integers(0, len(POSITIONS), size=n),
        "ink": rng.integers(0, len(INKS), size=n),
        "background": rng.integers(0, len(BACKGROUNDS), size=n),
    }
    x = _render(glyphs, size, source, labels, rng)
    mean = np.asarray(pre.mean, dtype=np.float32)[None, :, None, None]
    std = np.asarray(pre.std, dtype=np.float32)[None, :, None, None]
    for lo in range(0, n, CHUNK):  # normalise in place: no second copy of the whole set
        x[lo : lo + CHUNK] -= mean
        x[lo : lo + CHUNK] /= std
    y = {k: torch.from_numpy(v.astype(np.int64)) for k, v in labels.items()}
    return MultitaskData(_tasks(), torch.from_numpy(x), y), source


def make_scenes(
    size: int | tuple[int, int] = 32, sizes: tuple[int, int, int] | None = None, seed: int = 0, split_seed: int = 0
) -> Splits:
    """Build the data set. ``sizes``: images per split (default 6000/2000/2000 at 32x32, 3000/1000/1000
    above, about 120 and 245 MB of float32); ``seed``: rendering; ``split_seed``: which digits go where."""
    if isinstance(size, (tuple, list)):  # the (h, w) form the folder and CelebA sets take
        if len(size) != 2 or size[0] != size[1]:
            raise MergingError("bad_argument", f"scenes are square; got size {tuple(size)}")
        size = int(size[0])
    if size % 8 or not 16 <= size <= 128:
        raise MergingError("bad_argument", f"scenes size must be a multiple of 8 in 16..128, got {size}")
    counts = sizes if sizes is not None else ((6000, 2000, 2000) if size <= 32 else (3000, 1000, 1000))
    if len(counts) != 3 or min(counts) < 1:
        raise MergingError("bad_argument", f"sizes must be three positive image counts, got {counts}")
    images, digits = raw_digits()
    glyphs = _upscaled_digits(images, size * 7 // 16)
    pre = preprocessing(size)
    pools = split_indices(len(digits), split_seed, stratify=digits.tolist())
    parts: list[MultitaskData] = []
    sources: dict[str, list[int]] = {}
    for i, (part, pool, n) in enumerate(zip(("train", "val", "test"), pools, counts, strict=True)):
        data, source = _split(pool, int(n), digits, glyphs, size, pre, np.random.default_rng([seed, i]))
        parts.append(data)
        sources[part] = source.tolist()
    info: dict[str, Any] = {
        "source": "sklearn.datasets.load_digits", "size": size, "seed": seed, "split_seed": split_seed,
        "source_index": sources,  # per image, the index of its digit in load_digits()
    }
    name = "scenes" if size == 32 else f"scenes-{size}"  # the registered name that rebuilds this size
    return Splits(name, parts[0], parts[1], parts[2], pre, info)


@register_dataset("scenes")
def scenes(
    size: int | tuple[int, int] = 32, sizes: tuple[int, int, int] | None = None, seed: int = 0, split_seed: int = 0
) -> Splits:
    """RGB digit scenes, 32x32 by default: ``digit``, ``parity``, ``position``, ``ink``, ``background``."""
    return make_scenes(size, sizes, seed, split_seed)


@register_dataset("scenes-64")
def scenes_64(sizes: tuple[int, int, int] | None = None, seed: int = 0, split_seed: int = 0) -> Splits:
    """The same scenes at 64x64 (its own name, so a model's ``dataset`` meta reloads the right size)."""
    return make_scenes(64, sizes, seed, split_seed)
