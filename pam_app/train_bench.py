"""``pam bench-train``: a training epoch of ``pam train`` on a folder of images against bare loops.

Writes a folder of RGB PNGs with a labels CSV (glyphs, tinted), loads it the way ``pam train``
does (``--dataset folder``), and times, side by side and alternating, on the same batches:

- ``pam train``'s epoch: ``fit`` (shift augmentation, joint loss, progress lines);
- a bare loop: forward, backward and AdamW step on in-memory tensors, PyTorch defaults;
- the same bare loop with the two settings ``fit`` uses (channels-last, fused AdamW).

Medians of ``repeats`` epochs each -> results/train-bench.{json,md}.
"""

from __future__ import annotations

import csv
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from merging.arch import create_arch
from merging.checkpoint import atomic_write_json
from merging.data import load_dataset
from merging.data.base import MultitaskData
from merging.data.glyphs import glyphs
from merging.network import MultitaskNet
from merging.train import TrainConfig, fit, joint_loss


def write_folder(root: Path, n: int, size: int) -> None:
    """``n`` RGB images (glyphs tinted by a random colour) and labels.csv with two tasks."""
    from PIL import Image

    s = glyphs(size=size, sizes=(n, 1, 1))
    x = (s.train.x * 0.25 + 0.5).clamp(0, 1)  # back to [0, 1]
    rng = np.random.default_rng(0)
    tint = rng.uniform(0.4, 1.0, size=(n, 3, 1, 1)).astype(np.float32)
    rgb = (x.numpy() * tint * 255).round().astype(np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "letter", "bold"])
        for i in range(n):
            name = f"{i:05d}.png"
            Image.fromarray(rgb[i].transpose(1, 2, 0)).save(root / name)
            w.writerow([name, int(s.train.y["letter"][i]), int(s.train.y["bold"][i])])


def _bare_epoch(net: MultitaskNet, data: MultitaskData, batch: int, fast: bool, seed: int) -> float:
    layout = torch.channels_last if fast else torch.contiguous_format
    net.to(memory_format=layout)  # type: ignore[call-overload]
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True if fast else None)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    t0 = time.perf_counter()
    for idx in data.batch_indices(batch, shuffle=True, generator=gen):
        xb = data.x[idx].contiguous(memory_format=layout)
        loss = joint_loss(net, net(xb), {k: v[idx] for k, v in data.y.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def run(n: int = 6000, size: int = 32, repeats: int = 3, out_dir: Path = Path("results")) -> dict[str, Any]:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "folder"
        t0 = time.perf_counter()
        write_folder(root, n, size)
        t_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        splits = load_dataset("folder", root=root, size=(size, size), channels=3)
        t_load = time.perf_counter() - t0
    data = splits.train
    arch = create_arch("lenet", in_channels=3, input_size=(size, size))
    times: dict[str, list[float]] = {"pam train (fit)": [], "bare loop": [], "bare loop, channels-last + fused": []}
    for r in range(repeats):
        torch.manual_seed(r)
        net = MultitaskNet(splits.tasks, arch, [{(1 << len(splits.tasks)) - 1: s.width} for s in arch.layers])
        t0 = time.perf_counter()
        fit(net, data, TrainConfig(epochs=1, seed=r, progress=False))
        times["pam train (fit)"].append(time.perf_counter() - t0)
        times["bare loop"].append(_bare_epoch(net, data, 64, False, r))
        times["bare loop, channels-last + fused"].append(_bare_epoch(net, data, 64, True, r))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"images": len(data), "size": size, "streaming": splits.info.get("streaming"), "repeats": repeats,
              "seconds": times, "median": med, "write_folder_s": t_write, "load_s": t_load,
              "ratio_to_bare": med["pam train (fit)"] / med["bare loop"],
              "ratio_to_fast_bare": med["pam train (fit)"] / med["bare loop, channels-last + fused"]}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "train-bench.json", result)
    lines = ["# A training epoch of `pam train` on a folder of images (`pam bench-train`)", "",
             f"{len(data):,} training images of {size}x{size} RGB (PNG files + labels.csv, two tasks), loaded as "
             f"`pam train --dataset folder` does ({'streamed' if result['streaming'] else 'decoded into memory'}, "
             f"{t_load:.1f} s); LeNet, batch 64, one intra-op thread; median of {repeats} epochs each, "
             "alternating.", "",
             "| loop | seconds per epoch | ratio |", "| --- | ---: | ---: |"]
    lines += [f"| {k} | {v:.2f} | {v / med['bare loop']:.2f} |" for k, v in med.items()]
    (out_dir / "train-bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result
