"""Glyphs: a generated data set with as many independent images as asked (no download).

Every image is one capital letter rendered from a TrueType font that ships inside matplotlib's wheel
(DejaVu Sans, DejaVu Serif, DejaVu Sans Mono and STIX, in regular, bold, upright and slanted faces),
then placed with a random size, rotation and offset on a grey background carrying faint stripes and
pixel noise, with random contrast and polarity. Every image is an *independent draw* of every latent
and nuisance, so each split can be any size: the budget's check set is as large as the decision it
must resolve (DESIGN.md: a 1-point budget needs thousands of independent check images), and a truth
split of 50,000 measures the rule's error rates.

Five tasks of mixed relatedness, like attributes of a face:

- ``letter`` (10 classes: A B C D E G H K R S): the identity latent.
- ``enclosed`` (the letter has a closed region: A B D R): a coarse function of identity.
- ``family`` (sans, serif): the style latent.
- ``bold`` (regular, bold): a second style attribute, independent of the family.
- ``stripes`` (horizontal, vertical): the background's faint texture, independent of both latents.

Rendering: the 10 letters x 14 font faces are drawn once with PIL at 48x48; every image then samples
its glyph through one random affine map (``affine_grid`` + ``grid_sample``, batched), so 60,000 images
at 16x16 take about a second. Deterministic per ``seed``: split ``i`` draws from the NumPy stream
``[seed, i]``, so asking for a bigger split never changes the others.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from merging.data.base import MultitaskData, Preprocessing, Splits, register_dataset
from merging.errors import MergingError
from merging.tasks import TaskSpec

LETTERS = ("A", "B", "C", "D", "E", "G", "H", "K", "R", "S")
ENCLOSED = frozenset("ABDR")
FAMILIES = ("sans", "serif")
# (family, bold) -> font files inside matplotlib/mpl-data/fonts/ttf: two designs per family (a
# proportional and a monospaced sans; DejaVu and STIX serifs), upright and slanted faces of each
FACES: dict[tuple[str, bool], tuple[str, ...]] = {
    ("sans", False): ("DejaVuSans.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSansMono.ttf",
                      "DejaVuSansMono-Oblique.ttf"),
    ("sans", True): ("DejaVuSans-Bold.ttf", "DejaVuSans-BoldOblique.ttf", "DejaVuSansMono-Bold.ttf",
                     "DejaVuSansMono-BoldOblique.ttf"),
    ("serif", False): ("DejaVuSerif.ttf", "DejaVuSerif-Italic.ttf", "STIXGeneral.ttf", "STIXGeneralItalic.ttf"),
    ("serif", True): ("DejaVuSerif-Bold.ttf", "DejaVuSerif-BoldItalic.ttf", "STIXGeneralBol.ttf",
                      "STIXGeneralBolIta.ttf"),
}
SPLITS = ("train", "val", "test", "truth")
DEFAULT_SIZES = (8000, 10000, 10000)  # train / val / test (truth: 0 unless asked)
CANVAS = 48  # glyph bitmaps are rendered once at this size
CHUNK = 4096

# Nuisances (ranges of the independent draws per image); the task accuracies depend on them.
SCALE = (0.6, 0.95)  # glyph height as a share of the frame
ROTATION_DEG = 18.0
OFFSET = 0.12  # of the frame, each axis
BG = (0.3, 0.7)
CONTRAST = (0.3, 0.7)  # |ink - background|; the sign (polarity) is a fair coin
STRIPE_AMPLITUDE = (0.035, 0.1)
STRIPE_PERIOD_PX = (2.5, 4.5)  # at 16x16; scaled with the size
NOISE_STD = 0.12
# Fixed normalisation constants (the manifest hands them to devices; they must not depend on a seed).
MEAN, STD = (0.5,), (0.25,)


def _tasks() -> tuple[TaskSpec, ...]:
    return (
        TaskSpec("letter", "classes", LETTERS),
        TaskSpec("enclosed", "classes", ("open", "enclosed")),
        TaskSpec("family", "classes", FAMILIES),
        TaskSpec("bold", "classes", ("regular", "bold")),
        TaskSpec("stripes", "classes", ("horizontal", "vertical")),
    )


def preprocessing(size: int) -> Preprocessing:
    return Preprocessing(size=(size, size), channels=1, mean=MEAN, std=STD)


def _font_dir() -> str:
    import matplotlib

    return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")


@functools.lru_cache(maxsize=1)
def glyph_bank() -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """(G, 48, 48) ink coverage in [0, 1], with each glyph's letter, family and bold index."""
    from PIL import Image, ImageDraw, ImageFont

    bitmaps, letter, family, bold = [], [], [], []
    for (fam, is_bold), files in FACES.items():
        for name in files:
            path = os.path.join(_font_dir(), name)
            if not os.path.exists(path):
                raise MergingError("missing_font", f"glyphs: font {name} not found in matplotlib ({path})")
            font = ImageFont.truetype(path, size=int(CANVAS * 0.8))
            for li, ch in enumerate(LETTERS):
                img = Image.new("L", (CANVAS * 2, CANVAS * 2), 0)
                ImageDraw.Draw(img).text((CANVAS // 2, CANVAS // 2), ch, fill=255, font=font)
                a = np.asarray(img, dtype=np.float32) / 255.0
                ys, xs = np.nonzero(a > 0.05)
                # centre the ink box; scale so the letter's height fills 80% of the canvas
                crop = a[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
                h, w = crop.shape
                k = 0.8 * CANVAS / h
                t = torch.from_numpy(np.ascontiguousarray(crop))[None, None]
                nh, nw = max(1, round(h * k)), max(1, min(CANVAS, round(w * k)))
                t = F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0, 0]
                out = torch.zeros(CANVAS, CANVAS)
                top, left = (CANVAS - nh) // 2, (CANVAS - nw) // 2
                out[top : top + nh, left : left + nw] = t.clamp(0, 1)
                bitmaps.append(out)
                letter.append(li)
                family.append(FAMILIES.index(fam))
                bold.append(int(is_bold))
    return torch.stack(bitmaps), np.array(letter), np.array(family), np.array(bold)


def _draw(n: int, size: int, rng: np.random.Generator) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """``n`` independent images (n, 1, size, size) in [0, 1] and their labels."""
    bank, g_letter, g_family, g_bold = glyph_bank()
    letter = rng.integers(0, len(LETTERS), n)
    family = rng.integers(0, len(FAMILIES), n)
    bold = rng.integers(0, 2, n)
    stripes = rng.integers(0, 2, n)
    # one face of the drawn (letter, family, bold): uniform over that cell's faces
    face_pos = rng.random(n)
    scale = rng.uniform(*SCALE, n)
    angle = np.deg2rad(rng.uniform(-ROTATION_DEG, ROTATION_DEG, n))
    shift = rng.uniform(-OFFSET, OFFSET, (n, 2)) * 2  # normalised coordinates span 2
    bg = rng.uniform(*BG, n)
    contrast = rng.uniform(*CONTRAST, n) * np.where(rng.random(n) < 0.5, -1.0, 1.0)
    amp = rng.uniform(*STRIPE_AMPLITUDE, n)
    period = rng.uniform(*STRIPE_PERIOD_PX, n) * size / 16
    phase = rng.uniform(0, 2 * np.pi, n)
    noise_seed = int(rng.integers(2**62))

    cells: dict[tuple[int, int, int], list[int]] = {}
    for gi in range(len(g_letter)):
        cells.setdefault((int(g_letter[gi]), int(g_family[gi]), int(g_bold[gi])), []).append(gi)
    glyph = np.empty(n, dtype=np.int64)
    for (li, fi, bi), member_list in cells.items():
        members = np.asarray(member_list)
        rows = np.nonzero((letter == li) & (family == fi) & (bold == bi))[0]
        glyph[rows] = members[np.minimum((face_pos[rows] * len(members)).astype(np.int64), len(members) - 1)]

    # output -> source map: source = A (out - shift), A = R(angle) / scale * (frame / glyph box)
    inv = (1.0 / scale)[:, None, None] * 0.8
    cos, sin = np.cos(angle), np.sin(angle)
    a = np.stack([np.stack([cos, -sin], 1), np.stack([sin, cos], 1)], 1) * inv  # (n, 2, 2)
    theta = np.concatenate([a, -(a @ shift[:, :, None])], 2).astype(np.float32)

    axis = np.arange(size, dtype=np.float32)
    out = torch.empty(n, 1, size, size)
    gen = torch.Generator().manual_seed(noise_seed)
    for lo in range(0, n, CHUNK):
        s = slice(lo, min(n, lo + CHUNK))
        m = s.stop - s.start
        grid = F.affine_grid(torch.from_numpy(theta[s]), [m, 1, size, size], align_corners=False)
        ink = F.grid_sample(bank[torch.from_numpy(glyph[s])][:, None], grid, mode="bilinear",
                            padding_mode="zeros", align_corners=False)[:, 0]
        wave = np.sin(2 * np.pi * axis[None, :] / period[s, None] + phase[s, None])  # (m, size)
        horiz = stripes[s] == 0  # horizontal stripes vary along y
        tex = np.where(horiz[:, None, None], wave[:, :, None], wave[:, None, :]) * amp[s, None, None]
        sign = torch.from_numpy(contrast[s]).float()[:, None, None]
        img = torch.from_numpy(bg[s, None, None] + tex).float() + sign * ink
        img += NOISE_STD * torch.randn(m, size, size, generator=gen)
        out[s, 0] = img.clamp_(0.0, 1.0)
    labels = {"letter": letter, "enclosed": np.isin(np.asarray(LETTERS)[letter], list(ENCLOSED)).astype(np.int64),
              "family": family, "bold": bold, "stripes": stripes}
    return out, labels


def make_split(n: int, size: int, seed: int, index: int) -> MultitaskData:
    """Split ``index`` (0 train, 1 val, 2 test, 3 truth, any larger for more) of ``n`` images."""
    x01, labels = _draw(n, size, np.random.default_rng([seed, index]))
    x = preprocessing(size).normalise(x01)
    y = {k: torch.from_numpy(v.astype(np.int64)) for k, v in labels.items()}
    return MultitaskData(_tasks(), x, y)


@register_dataset("glyphs")
def glyphs(
    size: int | tuple[int, int] = 16, sizes: tuple[int, int, int] | None = None, seed: int = 0, split_seed: int = 0,
    tasks: tuple[str, ...] | None = None,
) -> Splits:
    """Generated letters: ``letter``, ``enclosed``, ``family``, ``bold``, ``stripes`` (see the module).

    ``sizes``: train/val/test images (default 8,000 / 10,000 / 10,000); ``size``: square side in
    pixels (16..32); ``seed``/``split_seed``: the drawing stream (both change every image)."""
    if isinstance(size, (tuple, list)):
        if len(size) != 2 or size[0] != size[1]:
            raise MergingError("bad_argument", f"glyphs are square; got size {tuple(size)}")
        size = int(size[0])
    if not 12 <= size <= 64:
        raise MergingError("bad_argument", f"glyphs size must be in 12..64 pixels, got {size}")
    counts = tuple(sizes) if sizes is not None else DEFAULT_SIZES
    if len(counts) != 3 or min(counts) < 1:
        raise MergingError("bad_argument", f"sizes must be three positive image counts, got {counts}")
    stream = seed * 1000 + split_seed
    parts = [make_split(int(n), size, stream, i) for i, n in enumerate(counts)]
    names = tuple(t.name for t in _tasks())
    if tasks:
        unknown = [t for t in tasks if t not in names]
        if unknown:
            raise MergingError("unknown_task", f"glyphs has no task {unknown}; known: {', '.join(names)}")
        parts = [p.select_tasks(tuple(tasks)) for p in parts]
    info: dict[str, Any] = {"source": "generated (matplotlib TrueType fonts)", "size": size, "seed": seed,
                            "split_seed": split_seed, "sizes": list(counts), "stream": stream}
    return Splits("glyphs", parts[0], parts[1], parts[2], preprocessing(size), info)


def truth_split(n: int, size: int = 16, seed: int = 0, split_seed: int = 0) -> MultitaskData:
    """An extra independent split (index 3) for measuring what a decision rule gets wrong."""
    return make_split(n, size, seed * 1000 + split_seed, 3)
