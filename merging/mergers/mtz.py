"""``mtz``: Multi-Task Zipping (He, Zhou, Thiele, NeurIPS 2018), the merging baseline PAM is measured against.

Layer by layer from the bottom, MTZ zips neuron ``i`` of network A with neuron ``j`` of network B
into one neuron with shared weights on the inputs already zipped, chosen greedily by the
second-order cost of forcing their weight vectors together (see ``_hessian``); the zipped
neurons keep task-specific weights on the unzipped inputs below. How many pairs to zip in a
layer is the largest number whose network, after a light joint retraining, keeps every task
within the accuracy budget. More than two networks are zipped one after another into the
network zipped so far.

On residual and MobileNetV2-style networks the walk follows the group graph: a layer reads the
layer(s) the graph says, and neurons are zipped per pruning unit (channels coupled through
depthwise convs and additions), in every member at once, so each member keeps one layout
(``_zipplan``, ``_zipnet``). On a chain network every unit is one layer: MTZ as published.

The result is a :class:`MultitaskNet` whose groups carry MTZ's real computation (see
``_zipnet``): only neurons whose inputs are all truly shared are computed once for several tasks.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from merging import distributed
from merging.data.base import MultitaskData
from merging.device import current_device, current_precision, optimizer_step
from merging.errors import MergingError, invariant
from merging.mergers._zipnet import ZippedNet
from merging.mergers._zipplan import UnitPlan, plan_unit
from merging.mergers.base import Merger, check_mergeable, register_merger
from merging.network import MultitaskNet
from merging.train import correctness_batches, evaluate, random_shift, seed_everything, task_loss


@dataclass(frozen=True)
class MtzConfig:
    accuracy_budget: float = 1.0  # max accuracy drop (points) per task against its own network, on the check data
    damping: float = 1e-3  # H + damping x mean(diag H) x I before inverting (relative, so scale-free)
    retrain_steps: int = 60  # light joint retraining after zipping a layer: this many batches (0: none)
    retrain_lr: float = 1e-3  # Adam learning rate of that retraining, cosine-annealed to 0
    batch_size: int = 64  # images per retraining step
    shift: int = 1  # random translation augmentation of the retraining, in pixels (as the zoo)
    calibration_size: int = 512  # images for the input correlations H
    holdout: float = 0.25  # share of the training split kept out of retraining for the budget check (no validation)
    check_shift: int = 1  # the check also sees every translation by up to this many pixels (less noisy; 0: off)
    search_steps: int = 3  # bisection steps per unit after zipping every candidate pair failed the budget
    fractions: tuple[float, ...] | None = None  # share of pairs to zip per pruning unit (chain: per layer); no search
    progress: bool = True  # tqdm bar over (step, unit)


@dataclass
class LayerRecord:
    """What the budget search saw at one pruning unit of one zipping step (kept in the network's meta)."""

    step: int  # 1: first two networks; s: network s zipped into the first s
    layer: int  # the unit's producer (its first layer); a chain network's unit is this layer alone
    candidates: int  # disjoint pairs available
    zipped: int  # pairs kept
    costs: list[float]  # MTZ cost of the kept pairs, in greedy order
    # {"pairs", "accuracy", "ok", "checked"}: "checked" images of the check set were looked at; a trial whose
    # verdict was settled early (``trial_verdict``) has its accuracy on those only (the set is copy-major, so
    # mostly the untranslated copy), not an estimate of the whole set's.
    trials: list[dict[str, Any]] = field(default_factory=list)
    members: list[int] = field(default_factory=list)  # every layer of the unit (zipped together)


def shifted_copies(data: MultitaskData, shift: int) -> MultitaskData:
    """``data`` and its translations by up to ``shift`` pixels (background fill): a larger, steadier check set.

    One point of accuracy on a few hundred held-out images is a handful of images, less than the
    noise of a retraining run; the translated copies are the augmentation the networks trained on.
    """
    if shift <= 0:
        return data
    data = data.in_memory()  # a streaming folder/CelebA set: the check set is small enough to hold
    xs, n = [], len(data)
    fill = data.x.amin(dim=(1, 2, 3), keepdim=True)
    padded = torch.nn.functional.pad(data.x - fill, (shift, shift, shift, shift)) + fill
    h, w = data.x.shape[2:]
    for dy in range(2 * shift + 1):
        for dx in range(2 * shift + 1):
            xs.append(padded[:, :, dy : dy + h, dx : dx + w])
    copies = len(xs)
    y = {k: v.repeat(copies, *([1] * (v.dim() - 1))) for k, v in data.y.items()}
    invariant(len(y[data.task_names[0]]) == copies * n, "one label per copy")
    return MultitaskData(data.tasks, torch.cat(xs), y)


SETTLED = 1e-3  # points: a verdict is settled early only beyond float rounding of the running counts


def trial_verdict(
    net: MultitaskNet, check: MultitaskData, reference: dict[str, float], budget: float, tasks: Sequence[str]
) -> tuple[dict[str, float], bool, int]:
    """Whether every task is within ``budget`` points of its reference accuracy on ``check``: (accuracy,
    verdict, images looked at). The check stops as soon as the verdict is settled, when even every
    remaining image right would leave a task out of budget, or every remaining image wrong would leave
    all within it (a bad trial is usually settled after a fraction of the set); the verdict is the one
    the whole set gives. The accuracy is on the images looked at (the whole set's when not settled early)."""
    n = len(check)
    parts: dict[str, list[Tensor]] = {t: [] for t in tasks}
    right = dict.fromkeys(tasks, 0.0)
    seen = 0
    batches = correctness_batches(net, check, tasks)
    try:
        for part in batches:
            for t in tasks:
                parts[t].append(part[t])
                right[t] += float(part[t].sum())
            seen += len(part[tasks[0]])
            if seen >= n:
                break
            so_far = {t: 100.0 * right[t] / seen for t in tasks}
            if any(100.0 * (right[t] + n - seen) / n < reference[t] - budget - SETTLED for t in tasks):
                return so_far, False, seen
            if all(100.0 * right[t] / n > reference[t] - budget + SETTLED for t in tasks):
                return so_far, True, seen
    finally:
        batches.close()
    acc = {t: 100.0 * float(torch.cat(parts[t]).mean()) if parts[t] else 0.0 for t in tasks}  # as ``evaluate``
    return acc, all(reference[t] - acc[t] <= budget for t in tasks), seen


class _JointLoss(torch.nn.Module):
    """The retraining loss as a module's forward, so DistributedDataParallel can wrap it (the zipped
    network's own ``forward`` computes every task, while retraining sums only the first ``tasks``)."""

    def __init__(self, z: ZippedNet, tasks: int) -> None:
        super().__init__()
        self.z, self.tasks = z, tasks

    def forward(self, xb: torch.Tensor, yb: dict[str, torch.Tensor]) -> torch.Tensor:
        z = self.z
        return sum(
            (task_loss(z.tasks[t], z.forward_task(xb, t), yb[z.tasks[t].name]) for t in range(self.tasks)),
            start=torch.zeros((), device=xb.device),
        )


def retrain(z: ZippedNet, data: MultitaskData, tasks: int, cfg: MtzConfig, seed: int) -> None:
    """A fixed number of batches of joint training of every parameter on the summed loss of the first
    ``tasks`` tasks (a step count, as the authors' per-layer iterations, so cost does not grow with the data).

    On the run's device (``merging.device``); under torchrun, DDP over shards of each batch."""
    if cfg.retrain_steps <= 0:
        return
    device, precision = current_device(), current_precision()
    world, rank = distributed.world_size(), distributed.rank()
    home = next((p.device for p in z.parameters()), torch.device("cpu"))
    z.to(device)
    loss_fn = _JointLoss(z, tasks)
    model = distributed.wrap(loss_fn, device) if world > 1 else loss_fn
    gen = torch.Generator().manual_seed(seed)
    # One fused kernel for every parameter (the per-tensor loop was 1/6 of MTZ's time); same update rule.
    opt = torch.optim.Adam(z.parameters(), lr=cfg.retrain_lr, fused=device.type in ("cpu", "cuda") or None)
    # Channels-last batches: the CPU's convolutions and max-pools on these tiny maps run ~1.3x faster.
    layout = torch.channels_last if device.type == "cpu" and data.x.dim() == 4 else torch.contiguous_format
    scaler = precision.scaler(device)
    # Annealed to zero: a constant rate leaves the networks off the minimum their long training
    # reached, which alone can cost a point and fail the budget for reasons unrelated to zipping.
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.retrain_steps)
    z.train()
    done = 0
    while done < cfg.retrain_steps:
        for xb, yb in data.batches(cfg.batch_size, shuffle=True, generator=gen, rank=rank, world=world):
            xb = random_shift(xb, cfg.shift, gen).contiguous(memory_format=layout)
            if device.type != "cpu":
                xb, yb = xb.to(device), {k: v.to(device) for k, v in yb.items()}
            with precision.autocast(device):
                loss = model(xb, yb)
            optimizer_step(loss, opt, scaler)
            sched.step()
            done += 1
            if done == cfg.retrain_steps:
                break
    if world > 1:
        distributed.sync_module(z)
    z.to(home)
    z.eval()


@register_merger
class MtzMerger(Merger):
    name = "mtz"

    def __init__(
        self, config: MtzConfig | None = None, validation: MultitaskData | None = None, **options: Any
    ) -> None:
        known = {f.name for f in fields(MtzConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise MergingError("bad_option", f"unknown mtz option(s) {unknown}; known: {sorted(known)}")
        base = config or MtzConfig()
        self.config = MtzConfig(**{**asdict(base), **options})
        if self.config.fractions is not None and any(not 0.0 <= f <= 1.0 for f in self.config.fractions):
            raise MergingError("bad_option", "mtz fractions must lie in [0, 1]")
        self.validation = validation  # budget check data; otherwise a hold-out of the training split

    def merge(self, nets: Sequence[MultitaskNet], data: MultitaskData, seed: int = 0) -> MultitaskNet:
        z, info = self.zip_networks(nets, data, seed)
        net = z.to_multitask(meta={"merger": self.name})
        net.meta["mtz"] = info
        return net

    def zip_networks(
        self, nets: Sequence[MultitaskNet], data: MultitaskData, seed: int = 0
    ) -> tuple[ZippedNet, dict[str, Any]]:
        """The zipped network itself (tied weights) and what the budget search saw."""
        check_mergeable(nets)
        cfg = self.config
        n_units = len(nets[0].graph().units())  # a chain network's units are its layers
        if cfg.fractions is not None and len(cfg.fractions) != n_units:
            raise MergingError("bad_option", f"mtz fractions need one value per pruning unit ({n_units})")
        names = tuple(net.task_names[0] for net in nets)
        gen = seed_everything(seed)
        data = data.select_tasks(names)
        order = torch.randperm(len(data), generator=gen)
        if self.validation is not None:
            check, train = self.validation.select_tasks(names), data
        else:
            n_check = round(cfg.holdout * len(data))
            check, train = data.subset(order[:n_check]), data.subset(order[n_check:])
        check = shifted_copies(check, cfg.check_shift)
        reference = {t: evaluate(net, check)[t] for t, net in zip(names, nets, strict=True)}
        calib = train.x[torch.randperm(len(train), generator=gen)[: cfg.calibration_size]]

        z = ZippedNet.union(nets)
        z.eval()
        records: list[LayerRecord] = []
        bar = tqdm(total=(len(nets) - 1) * n_units, desc="mtz zip", disable=None if cfg.progress else True)
        for new_task in range(1, len(nets)):
            # Units in the order of their producers, bottom up (MTZ's layer order on a chain).
            for u, unit in enumerate(z.units):
                plan = plan_unit(z, unit, new_task, calib, cfg.damping)
                record = LayerRecord(new_task, unit[0], len(plan.pairs), 0, [], members=list(unit))
                z = self._choose(z, plan, u, unit, new_task, train, check, reference, record, seed)
                records.append(record)
                bar.set_postfix(step=new_task, layer=unit[0], zipped=f"{record.zipped}/{record.candidates}")
                bar.update()
        bar.close()
        info = {
            "config": asdict(cfg),
            "seed": seed,
            "reference_accuracy": reference,
            "layers": [asdict(r) for r in records],
        }
        return z, info

    def _choose(
        self,
        z: ZippedNet,
        plan: UnitPlan,
        index: int,
        unit: tuple[int, ...],
        new_task: int,
        train: MultitaskData,
        check: MultitaskData,
        reference: dict[str, float],
        record: LayerRecord,
        seed: int,
    ) -> ZippedNet:
        """Zip the largest number of the plan's pairs that keeps every task within the budget."""
        cfg = self.config
        n_tasks = new_task + 1
        task_names = [t.name for t in z.tasks[:n_tasks]]

        def trial(k: int) -> tuple[ZippedNet, bool]:
            zt = copy.deepcopy(z)
            zt.zip_unit(unit, plan.pairs[:k], plan.first(k), 1 << new_task)
            retrain(zt, train, n_tasks, cfg, seed=seed * 1000003 + new_task * 1009 + unit[0] * 101 + k)
            acc, ok, seen = trial_verdict(zt.to_multitask(), check, reference, cfg.accuracy_budget, task_names)
            record.trials.append({"pairs": k, "accuracy": acc, "ok": ok, "checked": seen})
            return zt, ok

        top = len(plan.pairs)
        if cfg.fractions is not None:
            k = round(cfg.fractions[index] * top)
            chosen, _ = trial(k) if k > 0 else (z, True)
        else:
            k, chosen = 0, z
            if top > 0:
                zt, ok = trial(top)
                if ok:
                    k, chosen = top, zt
                else:
                    lo, hi = 0, top  # lo passes (zipping nothing), hi fails
                    for _ in range(cfg.search_steps):
                        if hi - lo <= 1:
                            break
                        mid = (lo + hi) // 2
                        zt, ok = trial(mid)
                        if ok:
                            lo, k, chosen = mid, mid, zt
                        else:
                            hi = mid
        record.zipped = k
        record.costs = plan.costs[:k]
        return chosen
