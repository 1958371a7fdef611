"""Training and evaluation on the joint loss of a network's tasks."""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Generator, Iterator, Mapping, Sequence
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
    epoch_samples: int | None = None  # at most this many (shuffled) samples per epoch; None: the whole split
    distill: float = 0.0  # weight of the teachers' soft targets in each task's loss (0: labels only)
    temperature: float = 2.0  # softening of teacher and student logits in the distillation term


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


def soft_loss(task: TaskSpec, logits: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Hinton's distillation term: the student's tempered outputs against the teacher's, times T^2
    (so its gradient scale does not depend on T)."""
    t2 = temperature * temperature
    if task.kind == "classes":
        target = torch.softmax(teacher / temperature, dim=1)
        return t2 * nn.functional.kl_div(torch.log_softmax(logits / temperature, dim=1), target, reduction="batchmean")
    soft = torch.sigmoid(teacher / temperature)
    return t2 * nn.functional.binary_cross_entropy_with_logits(logits / temperature, soft)


# Images per forward pass when only evaluating. On the CPU 256 keeps a LeNet's activations in cache:
# 1.7x faster than 1024 on 16x16 glyphs (0.35 s vs 0.58 s for 10,000 images, bit-identical outputs).
EVAL_BATCH = 256


class Teachers:
    """The task networks a merged network should agree with (each task's own network): their
    logits on a batch, for :func:`distilled_loss`.

    On in-memory data the logits of every training image are computed once and reused by every
    fine-tune (measured: computing them per batch was 60% of a fine-tune). They are the logits of
    the unshifted image while the student sees a shifted copy: the teachers were trained with the
    same shifts, so they barely move under them."""

    def __init__(self, nets: Sequence[MultitaskNet]) -> None:
        self.nets = list(nets)
        self._cache: dict[tuple[int, int, tuple[str, ...]], dict[str, Tensor]] = {}

    @torch.no_grad()
    def targets(self, data: MultitaskData, tasks: Sequence[str]) -> dict[str, Tensor] | None:
        """Logits for every sample of ``data`` (cached), or None for streaming data."""
        if type(data) is not MultitaskData:
            return None
        key = (data.x.data_ptr(), len(data), tuple(tasks))
        if key not in self._cache:
            parts: dict[str, list[Tensor]] = {}
            for lo in range(0, len(data), EVAL_BATCH):
                for t, o in self(data.x[lo : lo + EVAL_BATCH], tasks).items():
                    parts.setdefault(t, []).append(o)
            self._cache[key] = {t: torch.cat(v) for t, v in parts.items()}
        return self._cache[key]

    @torch.no_grad()
    def __call__(self, x: Tensor, tasks: Sequence[str]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for net in self.nets:
            mine = [t for t in net.task_names if t in tasks]
            if mine:
                net.eval()
                out.update(net(x, tuple(mine)))
        return out


def distilled_loss(
    net: MultitaskNet, outs: dict[str, Tensor], y: dict[str, Tensor], teacher: Mapping[str, Tensor], cfg: TrainConfig
) -> Tensor:
    """Per task: (1 - a) * label loss + a * distillation term (tasks without a teacher: labels only)."""
    total = torch.zeros((), device=next(iter(outs.values())).device)
    for t, o in outs.items():
        hard = task_loss(net.task(t), o.float(), y[t])
        if t in teacher:
            soft = soft_loss(net.task(t), o.float(), teacher[t].float(), cfg.temperature)
            total = total + (1.0 - cfg.distill) * hard + cfg.distill * soft
        else:
            total = total + hard
    return total


def random_shift(x: Tensor, shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by up to ``shift`` pixels, filling with the image's minimum (background).

    One gather for the whole batch (a loop over the offsets was a fifth of a training step)."""
    if shift <= 0:
        return x
    n, c, h, w = x.shape
    fill = x.amin(dim=(1, 2, 3), keepdim=True)
    padded = nn.functional.pad(x - fill, (shift, shift, shift, shift)) + fill
    offsets = torch.randint(0, (2 * shift + 1) ** 2, (n,), generator=generator)
    dy, dx = offsets // (2 * shift + 1), offsets % (2 * shift + 1)
    rows = (torch.arange(h)[None, :] + dy[:, None])[:, None, :, None]  # (n, 1, h, 1)
    cols = (torch.arange(w)[None, :] + dx[:, None])[:, None, None, :]  # (n, 1, 1, w)
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


def fit(
    net: MultitaskNet,
    data: MultitaskData,
    cfg: TrainConfig,
    tasks: Sequence[str] | None = None,
    desc: str = "train",
    teachers: Teachers | None = None,
) -> MultitaskNet:
    """Train ``net`` on the summed loss of ``tasks`` (all by default), in place.

    Runs on ``cfg.device`` (default: the run's device, see ``merging.device``) and returns the
    network on the device it came from. Under torchrun, DDP with this rank's shard of every
    global batch of ``cfg.batch_size`` (the same steps and learning-rate schedule as one process),
    and every rank ends with rank 0's weights and batch-norm statistics. With ``teachers`` and
    ``cfg.distill > 0``, each task also learns its teacher's outputs on the same (augmented) batch.
    """
    gen = seed_everything(cfg.seed)
    device = resolve_device(cfg.device) if cfg.device else current_device()
    precision = Precision(cfg.amp) if cfg.amp != "off" else current_precision()
    precision.check(device)
    world, rank = distributed.world_size(), distributed.rank()
    home = next((p.device for p in net.parameters()), torch.device("cpu"))
    net.to(device)
    # On the CPU, channels-last convolutions and max-pools are about 1.3x faster for these networks.
    layout = torch.channels_last if device.type == "cpu" and data.x.dim() == 4 else None
    if layout is not None:
        _set_layout(net, layout)
    combo = tuple(tasks) if tasks else net.task_names
    params = [p for p in net.parameters() if p.requires_grad]
    model: torch.nn.Module = net
    if world > 1:
        used = {id(p) for p in net.for_combination(combo).parameters()}
        model = distributed.wrap(net, device, find_unused=any(id(p) not in used for p in params))
    fused = device.type in ("cpu", "cuda")  # one fused kernel for all parameters (a per-tensor loop was 1/10 of a step)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None,
                            foreach=None if fused else True)
    scaler = precision.scaler(device)
    steps_per_epoch = max(1, batch_count(min(len(data), cfg.epoch_samples or len(data)), cfg.batch_size, world))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=max(1, cfg.epochs * steps_per_epoch), pct_start=0.15
    )
    distill = teachers if teachers is not None and cfg.distill > 0 else None
    cached = distill.targets(data, combo) if distill is not None else None
    net.train()
    progress = _Progress(desc, cfg.epochs, cfg.progress and distributed.is_main())
    for epoch in range(cfg.epochs):
        total, seen, hits = 0.0, 0, 0.0
        for _, (xb, yb, tb) in zip(range(steps_per_epoch), _batches(data, cfg, gen, rank, world, cached),
                                   strict=False):
            xb = random_shift(xb, cfg.shift, gen)
            if device.type != "cpu":
                xb = xb.to(device, non_blocking=True)
                yb = {k: v.to(device, non_blocking=True) for k, v in yb.items()}
            if layout is not None:
                xb = xb.contiguous(memory_format=layout)
            with precision.autocast(device):
                outs = model(xb, combo)
                if distill is not None:
                    soft = tb if tb is not None else distill(xb, combo)
                    loss = distilled_loss(net, outs, yb, {k: v.to(xb.device) for k, v in soft.items()}, cfg)
                else:
                    loss = joint_loss(net, outs, yb)
            optimizer_step(loss, opt, scaler)
            sched.step()
            total += float(loss.detach()) * len(xb)
            seen += len(xb)
            if progress.enabled:
                hits += _batch_hits(net, outs, yb)
        progress.epoch(epoch + 1, total / max(seen, 1), 100.0 * hits / max(seen * len(combo), 1))
    progress.close()
    if layout is not None:
        _set_layout(net, torch.contiguous_format)
    if world > 1:
        distributed.sync_module(net)  # the last step's local batch-norm update differs per rank
    net.to(home)
    net.eval()
    return net


def _batches(
    data: MultitaskData, cfg: TrainConfig, gen: torch.Generator, rank: int, world: int,
    cached: dict[str, Tensor] | None,
) -> Iterator[tuple[Tensor, dict[str, Tensor], dict[str, Tensor] | None]]:
    """(images, labels, cached teacher logits or None) per batch."""
    if cached is None:
        for xb, yb in data.batches(cfg.batch_size, shuffle=True, generator=gen, rank=rank, world=world):
            yield xb, yb, None
        return
    for idx in data.batch_indices(cfg.batch_size, shuffle=True, generator=gen, rank=rank, world=world):
        yield data.x[idx], {k: v[idx] for k, v in data.y.items()}, {k: v[idx] for k, v in cached.items()}


def _set_layout(net: nn.Module, layout: torch.memory_format) -> None:
    """Every 4-D parameter and buffer in ``layout`` (``Module.to(memory_format=...)``, typed)."""
    net.to(memory_format=layout)  # type: ignore[call-overload]


@torch.no_grad()
def _batch_hits(net: MultitaskNet, outs: Mapping[str, Tensor], y: Mapping[str, Tensor]) -> float:
    hits = 0.0
    for t, o in outs.items():
        if net.task(t).kind == "classes":
            hits += float((o.argmax(1) == y[t]).sum())
        else:
            hits += float(((o > 0).float() == y[t]).float().mean(1).sum())
    return hits


class _Progress:
    """A tqdm bar on a terminal; otherwise one line per epoch (at most ~10 lines per run) on
    stderr (about five per run), so logs show epoch, loss, training accuracy and time left too."""

    def __init__(self, desc: str, epochs: int, enabled: bool) -> None:
        self.desc, self.epochs, self.enabled = desc, epochs, enabled and epochs > 0
        self.start = time.perf_counter()
        self.tty = self.enabled and sys.stderr.isatty()
        self.bar = tqdm(total=epochs, desc=desc, leave=False) if self.tty else None
        self.every = max(1, epochs // 5)

    def epoch(self, k: int, loss: float, acc: float) -> None:
        if not self.enabled:
            return
        left = (time.perf_counter() - self.start) / k * (self.epochs - k)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.1f}%")
        elif k % self.every == 0 or k == self.epochs:
            print(f"{self.desc}: epoch {k}/{self.epochs} loss {loss:.4f} train acc {acc:.1f}% "
                  f"time left {left:.0f}s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def correctness_batches(
    net: MultitaskNet, data: MultitaskData, tasks: Sequence[str] | None = None
) -> Generator[dict[str, Tensor], None, None]:
    """Per-sample correctness in [0, 1] per task, one evaluation batch at a time (in data order): argmax
    hit for classes, share of attributes right. Closing the generator early puts the network back."""
    was_training = net.training
    device, home = current_device(), next((p.device for p in net.parameters()), torch.device("cpu"))
    layout = torch.channels_last if device.type == "cpu" and data.x.dim() == 4 else None
    combo = tuple(tasks) if tasks else net.task_names
    try:
        net.eval()
        net.to(device)
        if layout is not None:
            _set_layout(net, layout)  # as in fit: about 1.3x faster on the CPU, the same numbers
        for xb, yb in data.batches(EVAL_BATCH):
            xb = xb.to(device)
            with torch.no_grad():
                outs = net(xb.contiguous(memory_format=layout) if layout is not None else xb, combo)
            part: dict[str, Tensor] = {}
            for t in combo:
                o, y = outs[t].cpu(), yb[t]
                if net.task(t).kind == "classes":
                    part[t] = (o.argmax(1) == y).float()
                else:
                    part[t] = ((o > 0).float() == y).float().mean(1)
            yield part
    finally:
        if layout is not None:
            _set_layout(net, torch.contiguous_format)
        net.to(home)
        net.train(was_training)


def correctness(net: MultitaskNet, data: MultitaskData, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Per-sample correctness in [0, 1] per task: argmax hit for classes, share of attributes right."""
    combo = tuple(tasks) if tasks else net.task_names
    parts: dict[str, list[Tensor]] = {t: [] for t in combo}
    for part in correctness_batches(net, data, combo):
        for t in combo:
            parts[t].append(part[t])
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
