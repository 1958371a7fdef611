"""Iterative structured pruning of a multitask network within an accuracy budget.

Each step scores every channel (``importance.score_channels``), removes the channels of lowest
importance per unit of combination-weighted cost until ``step`` of the network's expected MACs
is gone, fine-tunes on the joint loss, and checks the budget. A step that breaks the budget is
undone and retried at half the size. When the step falls below ``min_step``, the tasks that
broke the last attempt are *frozen* (``per_task_stop``): every group serving one of them and
their heads keep their accepted weights from then on, and pruning goes on, at full step, with
the groups that serve only other tasks, until every task is frozen. One task's budget thus stops
only what it depends on: separate networks are pruned as if each were alone, and a merged
network's task-specific groups shrink as far as their own task allows.

The extension points are small strategy classes named by the config's strings: the importance
criterion (``merging.pruning.criteria``), the price rule (``merging.pruning.prices``) and the step
schedule (``merging.pruning.schedule``). Torch-Pruning's dependency graph is built once per step,
to score (its group importance sums over a unit's coupled layers); the chosen channels are cut by
the network itself (``merging.pruning.surgery``: ``MultitaskNet.select_channels``), a partial cut and a
whole-group removal alike.

The budget check set is the validation split plus ``check_shifts`` copies shifted by one pixel:
five times as many images as the validation split alone, so one point of accuracy is no longer
a handful of images (the reference accuracies must be measured on the same set, see
:func:`reference_accuracy`). Test data is never looked at here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from merging.cost import combination_cost
from merging.data.base import MultitaskData, Splits
from merging.distributed import agree_net, broadcast_object
from merging.errors import MergingError
from merging.network import MultitaskNet
from merging.pruning.budget import Verdict, assess, reference_accuracy, resolution_line
from merging.pruning.config import PruneConfig
from merging.pruning.criteria import criterion_of
from merging.pruning.importance import weighted_macs
from merging.pruning.prices import price_rule_of
from merging.pruning.rule import check_set, decision_sets, images_of
from merging.pruning.schedule import schedule_of
from merging.pruning.steps import step_of
from merging.train import Teachers, TrainConfig, fit

START_MISSED = "start network misses the budget; not pruned"


def missed_at_start(history: Sequence[Mapping[str, Any]]) -> bool:
    """Whether ``prune`` gave up before the first step (the start network missed the budget)."""
    return any(h.get("kind") == "stop" and h.get("reason") == START_MISSED for h in history)


def failing_tasks(acc: Mapping[str, float], ref: Mapping[str, float], budget: float) -> list[str]:
    return [t for t in ref if acc[t] < ref[t] - budget]


def within_budget(acc: Mapping[str, float], ref: Mapping[str, float], budget: float) -> bool:
    return not failing_tasks(acc, ref, budget)


def _finetune(
    net: MultitaskNet,
    data: MultitaskData,
    cfg: PruneConfig,
    epochs: int,
    seed: int,
    lr: float | None = None,
    tasks: Sequence[str] | None = None,
    teachers: Teachers | None = None,
    batch_size: int | None = None,
) -> None:
    if epochs > 0:
        tc = TrainConfig(
            epochs=epochs,
            batch_size=batch_size or cfg.batch_size,
            lr=lr or cfg.lr,
            seed=seed,
            progress=False,
            distill=cfg.distill if teachers is not None else 0.0,
            epoch_samples=cfg.epoch_samples,
        )
        fit(net, data, tc, tasks=tasks, teachers=teachers)


def teachers_of(net: MultitaskNet, ref: Mapping[str, float], cfg: PruneConfig) -> Teachers | None:
    """The reference networks to learn from while fine-tuning (each task's unpruned network, the
    same for every route), when ``cfg.distill`` asks for it."""
    nets = list(getattr(ref, "nets", []))
    return Teachers(nets) if cfg.distill > 0 and nets else None


def task_mask(net: MultitaskNet, tasks: Sequence[str]) -> int:
    return sum(1 << net.task_names.index(t) for t in set(tasks))


def _freeze(net: MultitaskNet, frozen: int) -> list[torch.nn.Parameter]:
    """Stop gradients into every group serving a frozen task and into those tasks' heads."""
    params: list[torch.nn.Parameter] = []
    for node in net.graph():
        if node.serves & frozen:
            params += list(net.module_of(node.key).parameters())
    for p in params:
        p.requires_grad_(False)
    return params


def finetune_unfrozen(
    net: MultitaskNet,
    data: MultitaskData,
    cfg: PruneConfig,
    epochs: int,
    seed: int,
    frozen: int,
    teachers: Teachers | None = None,
) -> None:
    """Fine-tune on the loss of the tasks still being pruned; frozen parts stay bit-identical."""
    if not frozen:
        _finetune(net, data, cfg, epochs, seed, teachers=teachers)
        return
    live = [t for i, t in enumerate(net.task_names) if not frozen >> i & 1]
    if epochs <= 0 or not live:
        return
    params = _freeze(net, frozen)
    # Batch-norm statistics are buffers, not parameters: restore them on the frozen blocks.
    frozen_blocks = [net.module_of(k) for k in net.graph().groups() if k.mask & frozen]  # add layers hold none
    buffers = [(b, b.clone()) for block in frozen_blocks for b in block.buffers()]
    try:
        _finetune(net, data, cfg, epochs, seed, tasks=live, teachers=teachers)
    finally:
        for p in params:
            p.requires_grad_(True)
    with torch.no_grad():
        for b, saved in buffers:
            b.copy_(saved)


@dataclass
class _Recorder:
    """Judges a network on the decision check set and appends the row to the history."""

    checks: Any
    ref: Mapping[str, float]
    cfg: PruneConfig
    confidence: float
    history: list[dict[str, Any]]
    on_visit: Callable[[str, MultitaskNet], None] | None

    def __call__(self, kind: str, net: MultitaskNet, **extra: Any) -> tuple[dict[str, Any], Verdict]:
        # Accept, undo or freeze: rank 0's verdict decides for every rank (identical weights give
        # identical verdicts; this makes sure of it).
        if self.on_visit is not None:
            self.on_visit(kind, net)
        v = broadcast_object(assess(net, self.checks, self.ref, self.cfg.budget, self.confidence))
        row = {
            "kind": kind,
            "macs_all": combination_cost(net).macs,
            "weighted_macs": weighted_macs(net),
            "check_accuracy": v.accuracy,
            "drop_upper": v.upper,
            "within_budget": v.ok,
            "disagreement": v.disagreement,
            **extra,
        }
        self.history.append(row)
        return row, v


def _check_config(cfg: PruneConfig) -> None:
    if not 0.0 < cfg.step < 1.0 or cfg.min_step <= 0 or cfg.budget < 0 or not 0.5 <= cfg.confidence < 1.0:
        raise MergingError("bad_argument", "prune: need 0 < step < 1, min_step > 0, budget >= 0, 0.5 <= confidence < 1")
    if cfg.retry_checks < 1 or cfg.retry_epochs < 0:
        raise MergingError("bad_argument", "prune: need retry_checks >= 1 and retry_epochs >= 0")
    if not 0.0 <= cfg.certify_share < 1.0:
        raise MergingError("bad_argument", "prune: need 0 <= certify_share < 1")
    # An unknown strategy name fails now, not after the recovery training.
    criterion_of(cfg), price_rule_of(cfg), schedule_of(cfg), step_of(cfg)


def retry_parts(cfg: PruneConfig) -> list[int]:
    """The retry's fine-tunes: ``retry_epochs`` split into ``retry_checks`` near-equal parts (none empty)."""
    n = max(1, min(cfg.retry_checks, cfg.retry_epochs))
    return [cfg.retry_epochs // n + (i < cfg.retry_epochs % n) for i in range(n)] if cfg.retry_epochs > 0 else []


def _freeze_failing(
    net: MultitaskNet, failing: Sequence[str], frozen: int, history: list[dict[str, Any]]
) -> int | None:
    """Freeze the tasks that broke the budget (frozen parts never change, so they are live ones);
    the new frozen mask, or None when nothing is left to prune (the stop is recorded)."""
    tasks = net.task_names
    newly = task_mask(net, failing) & ~frozen
    frozen |= newly
    history.append(
        {
            "kind": "freeze",
            "tasks": [t for i, t in enumerate(tasks) if newly >> i & 1],
            "layout": copy.deepcopy(net.layout),
        }
    )
    everyone = (1 << len(tasks)) - 1
    live_groups = any(not mask & frozen for groups in net.layout for mask in groups)
    if frozen == everyone or not live_groups:
        reason = "every task frozen" if frozen == everyone else "no group left that serves only unfrozen tasks"
        history.append({"kind": "stop", "reason": reason})
        return None
    return frozen


def _steps(
    net: MultitaskNet,
    train: MultitaskData,
    cfg: PruneConfig,
    record: _Recorder,
    teachers: Teachers | None,
) -> tuple[MultitaskNet, MultitaskNet, list[MultitaskNet]]:
    """Prune step by step, each step fine-tuned and judged; returns (the current network, the last
    accepted one, every accepted network oldest first)."""
    history = record.history
    best = copy.deepcopy(net)
    trajectory = [best]  # every accepted network, oldest first: where certification backs off to
    schedule = schedule_of(cfg)
    step_fn = step_of(cfg)
    frozen = 0  # tasks whose budget stopped pruning (mask)
    bar = tqdm(schedule.steps(), desc="prune", disable=None if cfg.progress else True, leave=False)
    for k in bar:
        info = step_fn(net, train, replace(cfg, seed=cfg.seed + k), schedule.size, frozen)
        # Under torchrun every rank computed the step; rank 0's cut (structure and weights) is the one
        # all ranks go on with, and rank 0's step record with it (a no-op in one process).
        net = agree_net(net)
        info = broadcast_object(info)
        finetune_unfrozen(net, train, cfg, cfg.finetune_epochs, cfg.seed + 1000 + k, frozen, teachers)
        row, verdict = record("step", net, **info)
        # More fine-tuning before giving up on the step: a short fine-tune after a cut often leaves a task
        # a fraction of a point short, and rejecting then is mostly noise. In ``retry_checks`` parts, each
        # judged: a step that passes after the first part does not pay for the rest.
        for part, epochs in enumerate(retry_parts(cfg)):
            if verdict.ok:
                break
            finetune_unfrozen(net, train, cfg, epochs, cfg.seed + 2000 + k + 100_003 * part, frozen, teachers)
            row, verdict = record("retry", net, **info, part=part)
        bar.set_postfix(macs=row["macs_all"], step=f"{schedule.size:.3f}")
        if verdict.ok:
            best = copy.deepcopy(net)
            trajectory.append(best)
            row["accepted"] = True
            schedule.accepted()
            continue
        row["accepted"] = False
        net = copy.deepcopy(best)
        if schedule.rejected():
            continue
        if not cfg.per_task_stop:
            history.append({"kind": "stop", "reason": "step below min_step"})
            break
        still = _freeze_failing(net, verdict.failing, frozen, history)
        if still is None:
            break
        frozen = still
        schedule.restart()
    else:
        history.append({"kind": "stop", "reason": "max_steps"})
    return net, best, trajectory


def prune(
    net: MultitaskNet,
    splits: Splits,
    cfg: PruneConfig | None = None,
    reference: Mapping[str, float] | None = None,
    on_visit: Callable[[str, MultitaskNet], None] | None = None,
) -> tuple[MultitaskNet, list[dict[str, Any]]]:
    """Prune ``net`` (in place where possible) within the budget; returns the network and the history.

    ``on_visit(kind, net)`` sees every network the pruner judges (to study the decision rule).

    ``reference``: per-task accuracy (percent, on ``check_set(splits.val, cfg.check_shifts, cfg.seed)``)
    to stay within ``cfg.budget`` of, ideally a :class:`~merging.pruning.budget.Reference` (per-image
    correctness, for the paired test; its networks, for distillation); by default the network's own
    accuracy before pruning.

    The check set is split by image (``cfg.certify_share``): every step decision uses one part; the
    other part is looked at once per network at the end, to certify the result, backing off along
    the accepted trajectory until a network is certified (so the many step decisions cannot pick the
    luckiest network of one check set). The history says what the check set can resolve.
    """
    cfg = cfg or PruneConfig()
    _check_config(cfg)
    tasks = net.task_names
    train = splits.train.select_tasks(tasks)
    full_checks = check_set(splits.val.select_tasks(tasks), cfg.check_shifts, cfg.seed, cfg.shift_below)
    full_ref = reference if reference is not None else reference_accuracy([net], full_checks)
    missing = [t for t in tasks if t not in full_ref]
    if missing:
        raise MergingError("bad_argument", f"prune: no reference accuracy for {missing}")
    checks, ref, certifier = decision_sets(full_checks, full_ref, cfg)
    teachers = teachers_of(net, full_ref, cfg)
    steer = replace(cfg, confidence=cfg.steer_confidence or cfg.confidence)
    history: list[dict[str, Any]] = []
    record = _Recorder(checks, ref, cfg, steer.confidence, history, on_visit)
    start, _ = record(
        "start",
        net,
        reference={t: full_ref[t] for t in tasks},
        resolution=resolution_line(images_of(checks), steer.confidence, cfg.budget),
        certify_resolution=certifier.describe() if certifier else None,
    )
    for r in range(cfg.recover_rounds if cfg.recover_epochs > 0 else 0):
        if start["within_budget"]:
            break
        # A regrouped network (PAM, MTZ) starts with heads reading zero-initialised weights: retrain
        # it on the joint loss (and its references' outputs), decaying the learning rate round by round.
        _finetune(net, train, cfg, cfg.recover_epochs, cfg.seed + 100 * r, cfg.recover_lr / (1 + r), teachers=teachers,
                  batch_size=cfg.recover_batch_size)
        start, _ = record("recover", net)
    if not start["within_budget"]:
        history.append({"kind": "stop", "reason": START_MISSED})
        return net, history
    net, best, trajectory = _steps(net, train, cfg, record, teachers)
    best = final_finetune(best, train, checks, ref, steer, history, teachers)
    certificate: dict[str, Any] | None = None
    if certifier is not None:
        found = certifier.certify([best, *reversed(trajectory)], history)
        if found is None:
            history.append({"kind": "stop", "reason": START_MISSED})
            return net, history
        best, certificate = found
    best.meta = {
        **best.meta,
        "pruned": {
            "config": {k: v for k, v in vars(cfg).items()},
            "reference": {t: full_ref[t] for t in tasks},
            "steps": sum(1 for h in history if h.get("accepted")),
            "certificate": certificate,
        },
    }
    best.eval()
    return best, history


def final_finetune(
    net: MultitaskNet,
    train: MultitaskData,
    checks: MultitaskData,
    ref: Mapping[str, float],
    cfg: PruneConfig,
    history: list[dict[str, Any]],
    teachers: Teachers | None = None,
) -> MultitaskNet:
    """A longer, lower-rate fine-tune of the accepted network on every task's loss (the structure is
    final, so frozen parts may move now); kept only if it is still within budget and no task's
    upper bound got worse by more than noise would explain."""
    if cfg.final_epochs <= 0:
        return net
    before = assess(net, checks, ref, cfg.budget, cfg.confidence)
    trial = copy.deepcopy(net)
    _finetune(trial, train, cfg, cfg.final_epochs, cfg.seed + 3000, cfg.final_lr, teachers=teachers)
    after = assess(trial, checks, ref, cfg.budget, cfg.confidence)
    keep = broadcast_object(after.ok and sum(after.upper.values()) <= sum(before.upper.values()))
    history.append(
        {
            "kind": "final",
            "kept": keep,
            "drop_upper_before": before.upper,
            "drop_upper": after.upper,
            "check_accuracy": after.accuracy,
            "macs_all": combination_cost(net).macs,
        }
    )
    return trial if keep else net
