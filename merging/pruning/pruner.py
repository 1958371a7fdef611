"""Iterative structured pruning of a multitask network within an accuracy budget.

Each step scores every channel (``importance.score_channels``), removes the channels of lowest
importance per unit of combination-weighted cost until ``step`` of the network's expected MACs
is gone, fine-tunes on the joint loss, and checks the budget. A step that breaks the budget is
undone and retried at half the size; pruning stops when the step falls below ``min_step``.

Partial cuts go through Torch-Pruning's dependency graph (which slices every consumer of the
channel, across the ``torch.cat`` joins between groups); a group whose every channel is selected
is removed by the network itself (``MultitaskNet.select_channels(l, mask, [])``), since
Torch-Pruning will not take a layer to zero channels.

The budget check set is the validation split plus ``check_shifts`` copies shifted by one pixel:
five times as many images as the validation split alone, so one point of accuracy is no longer
a handful of images (the reference accuracies must be measured on the same set, see
:func:`reference_accuracy`). Test data is never looked at here.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch_pruning as tp
from tqdm.auto import tqdm

from merging.cost import combination_cost
from merging.data.base import MultitaskData, Splits
from merging.errors import MergingError
from merging.network import MultitaskNet, block_key
from merging.pruning.config import PruneConfig
from merging.pruning.importance import score_channels, weighted_macs
from merging.pruning.surgery import remove_dead_groups
from merging.train import TrainConfig, evaluate, fit, random_shift


def check_set(val: MultitaskData, shifts: int, seed: int) -> MultitaskData:
    """Validation data plus ``shifts`` randomly 1-pixel-shifted copies (deterministic for a seed)."""
    if shifts <= 0:
        return val
    gen = torch.Generator().manual_seed(10_000 + seed)
    xs = [val.x] + [random_shift(val.x, 1, gen) for _ in range(shifts)]
    ys = {k: torch.cat([v] * (shifts + 1)) for k, v in val.y.items()}
    return MultitaskData(val.tasks, torch.cat(xs), ys)


def reference_accuracy(nets: Sequence[MultitaskNet], checks: MultitaskData) -> dict[str, float]:
    """Accuracy of each unpruned single-task network on the check set: the budget's reference."""
    out: dict[str, float] = {}
    for net in nets:
        out.update(evaluate(net, checks.select_tasks(net.task_names)))
    return out


def within_budget(acc: Mapping[str, float], ref: Mapping[str, float], budget: float) -> bool:
    return all(acc[t] >= ref[t] - budget for t in ref)


def _finetune(
    net: MultitaskNet, data: MultitaskData, cfg: PruneConfig, epochs: int, seed: int, lr: float | None = None
) -> None:
    if epochs > 0:
        tc = TrainConfig(epochs=epochs, batch_size=cfg.batch_size, lr=lr or cfg.lr, seed=seed, progress=False)
        fit(net, data, tc)


def _removable(net: MultitaskNet, layer: int, mask: int) -> bool:
    """Whether removing a group (and whatever is left reading nothing) leaves every task an input."""
    trial = copy.deepcopy(net)
    try:
        trial.select_channels(layer, mask, [])
    except MergingError as e:
        if e.code == "empty_task":
            return False
        raise
    return True


def prune_step(net: MultitaskNet, data: MultitaskData, cfg: PruneConfig, fraction: float) -> dict[str, Any]:
    """Remove about ``fraction`` of the expected MACs, lowest importance per unit cost first (in place)."""
    scores = score_channels(net, data, cfg)
    # Importance per unit of price, a channel's price being its weighted cost relative to the mean channel's.
    all_costs = torch.cat([sc.cost for sc in scores])
    avg = float(all_costs.mean()) if all_costs.numel() else 1.0
    power = cfg.cost_power if cfg.cost_aware else 0.0
    entries: list[tuple[float, float, int, int, int]] = []  # (score, cost, layer, mask, index)
    for sc in scores:
        price = (sc.cost / avg).clamp_min(1e-12) ** power
        ratio = sc.importance / price
        entries.extend((float(ratio[j]), float(sc.cost[j]), sc.layer, sc.mask, j) for j in range(len(ratio)))
    entries.sort(key=lambda e: (e[0], e[2], e[3], e[4]))
    target = fraction * weighted_macs(net)
    chosen: dict[tuple[int, int], list[int]] = {}
    removed = 0.0
    for _, cost, l, mask, j in entries:
        if removed >= target:
            break
        chosen.setdefault((l, mask), []).append(j)
        removed += cost
    module = net.for_combination(None)
    graph = tp.DependencyGraph().build_dependency(module, example_inputs=data.x[:2], verbose=False)
    empty: list[tuple[int, int]] = []
    for (l, mask), idxs in chosen.items():
        width = net.group_width(l, mask)
        if len(idxs) >= width:
            empty.append((l, mask))
            continue
        conv = net.blocks[block_key(l, mask)].conv
        group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=sorted(idxs))
        group.prune()
    net.sync_layout()
    removed_groups = []
    for l, mask in sorted(empty, reverse=True):
        if mask not in net.layout[l]:
            continue  # already removed with a group it read
        if _removable(net, l, mask):
            net.select_channels(l, mask, [])
            removed_groups.append((l, mask))
        else:  # the last input of some head, directly or through the blocks above: keep its best channel
            sc = next(s for s in scores if s.layer == l and s.mask == mask)
            keep = [j for j in range(len(sc.importance)) if j not in set(chosen[(l, mask)])]
            net.select_channels(l, mask, keep or [int(sc.importance.argmax())])
    removed_groups += remove_dead_groups(net)
    net.check_wiring()
    return {"fraction": fraction, "channels": sum(len(v) for v in chosen.values()), "removed_groups": removed_groups}


def prune(
    net: MultitaskNet,
    splits: Splits,
    cfg: PruneConfig | None = None,
    reference: Mapping[str, float] | None = None,
) -> tuple[MultitaskNet, list[dict[str, Any]]]:
    """Prune ``net`` (in place where possible) within the budget; returns the network and the history.

    ``reference``: per-task accuracy (percent, on ``check_set(splits.val, cfg.check_shifts, cfg.seed)``)
    to stay within ``cfg.budget`` of; by default the network's own accuracy before pruning.
    """
    cfg = cfg or PruneConfig()
    if not 0.0 < cfg.step < 1.0 or cfg.min_step <= 0 or cfg.budget < 0:
        raise MergingError("bad_argument", "prune: need 0 < step < 1, min_step > 0 and budget >= 0")
    tasks = net.task_names
    train = splits.train.select_tasks(tasks)
    checks = check_set(splits.val.select_tasks(tasks), cfg.check_shifts, cfg.seed)
    ref = dict(reference) if reference is not None else evaluate(net, checks)
    missing = [t for t in tasks if t not in ref]
    if missing:
        raise MergingError("bad_argument", f"prune: no reference accuracy for {missing}")
    ref = {t: ref[t] for t in tasks}

    def record(kind: str, **extra: Any) -> dict[str, Any]:
        acc = evaluate(net, checks)
        row = {"kind": kind, "macs_all": combination_cost(net).macs, "weighted_macs": weighted_macs(net),
               "check_accuracy": acc, "within_budget": within_budget(acc, ref, cfg.budget), **extra}
        history.append(row)
        return row

    history: list[dict[str, Any]] = []
    start = record("start", reference=ref)
    for r in range(cfg.recover_rounds if cfg.recover_epochs > 0 else 0):
        if start["within_budget"]:
            break
        # A regrouped network (PAM, MTZ) starts with heads reading zero-initialised weights: retrain
        # it on the joint loss, decaying the learning rate round by round.
        _finetune(net, train, cfg, cfg.recover_epochs, cfg.seed + 100 * r, cfg.recover_lr / (1 + r))
        start = record("recover")
    if not start["within_budget"]:
        history.append({"kind": "stop", "reason": "start network misses the budget; not pruned"})
        return net, history
    best = copy.deepcopy(net)
    step = cfg.step
    bar = tqdm(range(cfg.max_steps), desc="prune", disable=None if cfg.progress else True, leave=False)
    for k in bar:
        info = prune_step(net, train, replace(cfg, seed=cfg.seed + k), step)
        _finetune(net, train, cfg, cfg.finetune_epochs, cfg.seed + 1000 + k)
        row = record("step", **info)
        if not row["within_budget"] and cfg.retry_epochs > 0:
            # One more round of fine-tuning before giving up on the step: a short fine-tune after a cut
            # often leaves a task a fraction of a point short, and rejecting then is mostly noise.
            _finetune(net, train, cfg, cfg.retry_epochs, cfg.seed + 2000 + k)
            row = record("retry", **info)
        bar.set_postfix(macs=row["macs_all"], step=f"{step:.3f}")
        if row["within_budget"]:
            best = copy.deepcopy(net)
            row["accepted"] = True
        else:
            row["accepted"] = False
            net = copy.deepcopy(best)
            step /= 2
            if step < cfg.min_step:
                history.append({"kind": "stop", "reason": "step below min_step"})
                break
    else:
        history.append({"kind": "stop", "reason": "max_steps"})
    best.meta = {**best.meta, "pruned": {"config": {k: v for k, v in vars(cfg).items()}, "reference": ref,
                                         "steps": sum(1 for h in history if h.get("accepted"))}}
    best.eval()
    return best, history
