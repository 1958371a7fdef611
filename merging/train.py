"""Training and evaluation on the joint loss of a network's tasks."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from merging.arch import ArchConfig
from merging.data.base import MultitaskData
from merging.network import MultitaskNet
from merging.tasks import TaskSpec


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 60  # passes over the training split
    batch_size: int = 64  # images per step
    lr: float = 3e-3  # Adam learning rate at the start of the cosine schedule
    weight_decay: float = 1e-4  # decoupled (AdamW) weight decay
    shift: int = 1  # random translation augmentation, in pixels (0: off)
    seed: int = 0  # seeds parameter init, shuffling and augmentation
    progress: bool = True  # show a tqdm bar


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def task_loss(task: TaskSpec, logits: Tensor, y: Tensor) -> Tensor:
    if task.kind == "classes":
        return nn.functional.cross_entropy(logits, y)
    return nn.functional.binary_cross_entropy_with_logits(logits, y)


def joint_loss(net: MultitaskNet, outs: dict[str, Tensor], y: dict[str, Tensor]) -> Tensor:
    return sum((task_loss(net.task(t), o, y[t]) for t, o in outs.items()), start=torch.zeros(()))


def random_shift(x: Tensor, shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by up to ``shift`` pixels, filling with the image's minimum (background)."""
    if shift <= 0:
        return x
    n, _, h, w = x.shape
    fill = x.amin(dim=(1, 2, 3), keepdim=True)
    padded = nn.functional.pad(x - fill, (shift, shift, shift, shift)) + fill
    offsets = torch.randint(0, (2 * shift + 1) ** 2, (n,), generator=generator)
    out = torch.empty_like(x)
    for k in range((2 * shift + 1) ** 2):
        idx = (offsets == k).nonzero().flatten()
        if idx.numel():
            dy, dx = divmod(k, 2 * shift + 1)
            out[idx] = padded[idx, :, dy : dy + h, dx : dx + w]
    return out


def fit(
    net: MultitaskNet,
    data: MultitaskData,
    cfg: TrainConfig,
    tasks: Sequence[str] | None = None,
    desc: str = "train",
) -> MultitaskNet:
    """Train ``net`` on the summed loss of ``tasks`` (all by default), in place."""
    gen = seed_everything(cfg.seed)
    combo = tuple(tasks) if tasks else net.task_names
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, -(-len(data) // cfg.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=max(1, cfg.epochs * steps_per_epoch), pct_start=0.15
    )
    net.train()
    bar = tqdm(range(cfg.epochs), desc=desc, disable=None if cfg.progress else True, leave=False)
    for _ in bar:
        total = 0.0
        for xb, yb in data.batches(cfg.batch_size, shuffle=True, generator=gen):
            xb = random_shift(xb, cfg.shift, gen)
            loss = joint_loss(net, net(xb, combo), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(xb)
        bar.set_postfix(loss=f"{total / len(data):.4f}")
    net.eval()
    return net


@torch.no_grad()
def correctness(net: MultitaskNet, data: MultitaskData, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Per-sample correctness in [0, 1] per task: argmax hit for classes, share of attributes right."""
    was_training = net.training
    net.eval()
    combo = tuple(tasks) if tasks else net.task_names
    parts: dict[str, list[Tensor]] = {t: [] for t in combo}
    for xb, yb in data.batches(512):
        outs = net(xb, combo)
        for t in combo:
            o, y = outs[t], yb[t]
            if net.task(t).kind == "classes":
                parts[t].append((o.argmax(1) == y).float())
            else:
                parts[t].append(((o > 0).float() == y).float().mean(1))
    net.train(was_training)
    return {t: torch.cat(v) if v else torch.zeros(0) for t, v in parts.items()}


def evaluate(net: MultitaskNet, data: MultitaskData, tasks: Sequence[str] | None = None) -> dict[str, float]:
    """Accuracy in percent per task: argmax for classes, mean per-attribute accuracy for attributes."""
    return {t: 100.0 * float(c.mean()) if c.numel() else 0.0 for t, c in correctness(net, data, tasks).items()}


def train_single_task(task: TaskSpec, arch: ArchConfig, data: MultitaskData, cfg: TrainConfig) -> MultitaskNet:
    seed_everything(cfg.seed)
    net = MultitaskNet.single_task(task, arch)
    fit(net, data.select_tasks((task.name,)), cfg, desc=f"train {task.name}")
    net.meta.update({"kind": "single", "task": task.name, "train": {"epochs": cfg.epochs, "seed": cfg.seed}})
    return net
