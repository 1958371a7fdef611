"""Training and evaluation on the joint loss of a network's tasks."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from merging import distributed
from merging.arch import ArchConfig
from merging.data.base import MultitaskData, batch_count
from merging.device import Amp, Precision, current_device, current_precision, optimizer_step, resolve_device
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
    device: str | None = None  # auto | cpu | cuda[:N] | mps; None: the run's device (merging.device, default CPU)
    amp: Amp = "off"  # autocast dtype on the device: off | bf16 | fp16 (CUDA only); off: the run's setting


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
    device = next(iter(outs.values())).device if outs else torch.device("cpu")
    return sum((task_loss(net.task(t), o.float(), y[t]) for t, o in outs.items()), start=torch.zeros((), device=device))


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
    """Train ``net`` on the summed loss of ``tasks`` (all by default), in place.

    Runs on ``cfg.device`` (default: the run's device, see ``merging.device``) and returns the
    network on the device it came from. Under torchrun, DDP with this rank's shard of every
    global batch of ``cfg.batch_size`` (the same steps and learning-rate schedule as one process),
    and every rank ends with rank 0's weights and batch-norm statistics.
    """
    gen = seed_everything(cfg.seed)
    device = resolve_device(cfg.device) if cfg.device else current_device()
    precision = Precision(cfg.amp) if cfg.amp != "off" else current_precision()
    precision.check(device)
    world, rank = distributed.world_size(), distributed.rank()
    home = next((p.device for p in net.parameters()), torch.device("cpu"))
    net.to(device)
    combo = tuple(tasks) if tasks else net.task_names
    params = [p for p in net.parameters() if p.requires_grad]
    model: torch.nn.Module = net
    if world > 1:
        used = {id(p) for p in net.for_combination(combo).parameters()}
        model = distributed.wrap(net, device, find_unused=any(id(p) not in used for p in params))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = precision.scaler(device)
    steps_per_epoch = max(1, batch_count(len(data), cfg.batch_size, world))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=max(1, cfg.epochs * steps_per_epoch), pct_start=0.15
    )
    net.train()
    show = cfg.progress and distributed.is_main()
    bar = tqdm(range(cfg.epochs), desc=desc, disable=None if show else True, leave=False)
    for _ in bar:
        total, seen = 0.0, 0
        for xb, yb in data.batches(cfg.batch_size, shuffle=True, generator=gen, rank=rank, world=world):
            xb = random_shift(xb, cfg.shift, gen)
            if device.type != "cpu":
                xb = xb.to(device, non_blocking=True)
                yb = {k: v.to(device, non_blocking=True) for k, v in yb.items()}
            with precision.autocast(device):
                loss = joint_loss(net, model(xb, combo), yb)
            optimizer_step(loss, opt, scaler)
            sched.step()
            total += float(loss.detach()) * len(xb)
            seen += len(xb)
        bar.set_postfix(loss=f"{total / max(seen, 1):.4f}")
    if world > 1:
        distributed.sync_module(net)  # the last step's local batch-norm update differs per rank
    net.to(home)
    net.eval()
    return net


@torch.no_grad()
def correctness(net: MultitaskNet, data: MultitaskData, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Per-sample correctness in [0, 1] per task: argmax hit for classes, share of attributes right."""
    was_training = net.training
    net.eval()
    device, home = current_device(), next((p.device for p in net.parameters()), torch.device("cpu"))
    net.to(device)
    combo = tuple(tasks) if tasks else net.task_names
    parts: dict[str, list[Tensor]] = {t: [] for t in combo}
    for xb, yb in data.batches(512):
        outs = net(xb.to(device), combo)
        for t in combo:
            o, y = outs[t].cpu(), yb[t]
            if net.task(t).kind == "classes":
                parts[t].append((o.argmax(1) == y).float())
            else:
                parts[t].append(((o > 0).float() == y).float().mean(1))
    net.to(home)
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
