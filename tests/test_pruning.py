"""The pruner: wiring kept, every combination runs, MACs equal FlopCounterMode, emptied groups removed."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from merging.arch import create_arch
from merging.cost import combination_cost
from merging.errors import MergingError
from merging.graph import GroupKey
from merging.mergers import create_merger
from merging.network import MultitaskNet
from merging.pruning import (
    PruneConfig,
    check_set,
    prune,
    prune_step,
    reference_accuracy,
    remove_dead_groups,
    within_budget,
)
from merging.pruning.importance import combination_share
from merging.pruning.pruner import finetune_unfrozen
from merging.tasks import TaskSpec, all_combinations
from merging.train import evaluate
from tests.pam_support import tiny_zoo

QUICK = PruneConfig(step=0.3, max_steps=2, finetune_epochs=1, retry_epochs=0, recover_epochs=2, recover_rounds=1,
                    taylor_batches=2, check_shifts=1, progress=False, budget=100.0)


@pytest.fixture(scope="module")
def zoo():  # type: ignore[no-untyped-def]
    nets, splits = tiny_zoo()
    return list(nets), splits


def _flops_macs(net: MultitaskNet, combo: tuple[str, ...]) -> int:
    module = net.for_combination(combo)
    x = torch.zeros(1, net.arch.in_channels, *net.arch.input_size)
    with FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops() // 2


def _check_every_combination(net: MultitaskNet, x: torch.Tensor) -> None:
    net.check_wiring()
    for combo in all_combinations(net.task_names):
        assert _flops_macs(net, combo) == combination_cost(net, combo).macs, combo
        outs = net(x, combo)
        alone = net.for_combination(combo)(x)
        for t, o in zip(combo, alone, strict=True):
            torch.testing.assert_close(outs[t], o)
            assert o.shape == (len(x), net.task(t).out_dim)


@pytest.mark.parametrize("merger", ["separate", "pam"])
def test_pruned_network_keeps_wiring_and_exact_macs(zoo, merger: str) -> None:  # type: ignore[no-untyped-def]
    nets, splits = zoo
    merged = create_merger(merger).merge(nets, splits.train)
    before = combination_cost(merged).macs
    pruned, history = prune(merged, splits, QUICK)
    assert combination_cost(pruned).macs < before  # the budget of 100 points lets every step through
    assert sum(1 for h in history if h.get("accepted")) == 2
    _check_every_combination(pruned, splits.val.x[:4])


def test_a_group_whose_every_channel_is_cut_is_removed() -> None:
    digits_splits = tiny_zoo()[1]
    tasks = digits_splits.tasks[:2]
    arch = create_arch("lenet", width_mult=0.25)
    # Layer 0: a shared group (3) and one of task 0 only (1), read by task 0's group above.
    layout = [{1: 4, 3: 4}, {1: 4, 2: 4, 3: 4}, {1: 4, 2: 4, 3: 4}]
    torch.manual_seed(0)
    net = MultitaskNet(tasks, arch, layout).eval()
    with torch.no_grad():  # a useless group (weights in and out zero): every criterion ranks it last
        net.blocks[GroupKey(0, 1).name].conv.weight.zero_()
        net.blocks[GroupKey(0, 1).name].conv.bias.zero_()
        net.blocks[GroupKey(1, 1).name].conv.weight[:, :4] = 0.0  # its only reader: group 1 reads groups 1, 3
    cfg = PruneConfig(criterion="magnitude", price="none", taylor_batches=1, progress=False)
    info = prune_step(net, digits_splits.train.select_tasks(net.task_names), cfg, fraction=0.35)
    assert (0, 1) in info["removed_groups"]
    assert 1 not in net.layout[0]
    _check_every_combination(net, digits_splits.val.x[:4])


def test_last_input_of_a_head_is_never_removed() -> None:
    digits_splits = tiny_zoo()[1]
    tasks = digits_splits.tasks[:2]
    arch = create_arch("lenet", width_mult=0.25)
    net = MultitaskNet(tasks, arch, [{3: 4}, {3: 4}, {1: 2, 2: 4}]).eval()
    with torch.no_grad():  # task 0's only exclusive group is useless, and its head's only input
        net.blocks[GroupKey(2, 1).name].conv.weight.zero_()
        net.blocks[GroupKey(2, 1).name].conv.bias.zero_()
        net.heads[tasks[0].name].conv.weight.zero_()
    cfg = PruneConfig(criterion="magnitude", price="none", taylor_batches=1, progress=False)
    prune_step(net, digits_splits.train.select_tasks(net.task_names), cfg, fraction=0.02)
    assert net.group_width(2, 1) >= 1  # head 0 still has an input
    _check_every_combination(net, digits_splits.val.x[:4])


def test_dead_groups_are_removed_without_changing_outputs() -> None:
    digits_splits = tiny_zoo()[1]
    tasks = digits_splits.tasks[:2]
    arch = create_arch("lenet", width_mult=0.25)
    torch.manual_seed(1)
    # Group 1 at layer 1 has no subset group at layer 2 to read it: computed for nothing.
    net = MultitaskNet(tasks, arch, [{3: 4}, {1: 3, 3: 4}, {2: 4, 3: 4}]).eval()
    x = digits_splits.val.x[:8]
    ref = {c: net(x, c) for c in all_combinations(net.task_names)}
    assert remove_dead_groups(net) == [(1, 1)]
    for c, outs in ref.items():
        for t, o in net(x, c).items():
            torch.testing.assert_close(o, outs[t])
    _check_every_combination(net, x)


def test_budget_is_checked_against_the_reference(zoo) -> None:  # type: ignore[no-untyped-def]
    nets, splits = zoo
    merged = create_merger("separate").merge(nets, splits.train)
    cfg = PruneConfig(step=0.5, min_step=0.4, max_steps=2, finetune_epochs=1, retry_epochs=0, taylor_batches=1,
                      recover_epochs=1, recover_rounds=1,
                      check_shifts=1, progress=False, budget=0.0)
    ref = reference_accuracy(nets, check_set(splits.val, cfg.check_shifts, cfg.seed))
    impossible = {t: 101.0 for t in ref}  # no network reaches 101%: recovery fails, nothing is pruned
    net, history = prune(copy.deepcopy(merged), splits, cfg, reference=impossible)
    assert history[-1]["kind"] == "stop" and "not pruned" in history[-1]["reason"]
    assert combination_cost(net).macs == combination_cost(merged).macs
    # Against the real reference, every accepted step met the budget on the check set.
    _, history = prune(copy.deepcopy(merged), splits, cfg, reference=ref)
    for h in history:
        if h.get("accepted"):
            assert all(h["check_accuracy"][t] >= ref[t] - cfg.budget for t in ref)


def test_combination_share_and_bad_config() -> None:
    assert combination_share(0b111, 3) == 1.0
    assert combination_share(0b001, 3) == pytest.approx(4 / 7)  # combinations containing one given task
    assert combination_share(0b011, 3) == pytest.approx(6 / 7)
    with pytest.raises(MergingError):
        net = MultitaskNet.single_task(TaskSpec("t", "classes", ("a", "b")), create_arch("lenet"))
        prune(net, None, PruneConfig(step=1.5))  # type: ignore[arg-type]


def _vgg_pair() -> tuple[MultitaskNet, object]:
    """Two tasks on a tiny VGG (batch norm) with a shared, an exclusive-0 and an exclusive-1 group per layer."""
    splits = tiny_zoo()[1]
    tasks = splits.tasks[:2]
    arch = create_arch("vgg", width_mult=0.125, input_size=(8, 8))
    torch.manual_seed(3)
    layout = [{1: 2, 2: 2, 3: 2} for _ in arch.layers]
    return MultitaskNet(tasks, arch, layout).eval(), splits


def test_frozen_parts_stay_bit_identical_while_the_rest_is_finetuned() -> None:
    net, splits = _vgg_pair()
    data = splits.train.select_tasks(net.task_names)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    frozen = 0b01  # task 0: its exclusive groups, the shared groups and its head are frozen
    finetune_unfrozen(net, data, PruneConfig(lr=1e-2, batch_size=128), epochs=1, seed=0, frozen=frozen)
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "the live parts were not trained"
    mask_of_block = {g.name: g.mask for g in net.graph().groups()}
    for k in before:
        if k.startswith("blocks."):
            mask = mask_of_block[k.split(".")[1]]
            if mask & frozen:
                assert k not in changed, k  # weights and batch-norm statistics alike
            elif k.endswith("conv.weight"):
                assert k in changed, k
        elif k.startswith(f"heads.{net.task_names[0]}."):
            assert k not in changed, k
        elif k.startswith(f"heads.{net.task_names[1]}."):
            assert k in changed, k
    assert all(p.requires_grad for p in net.parameters())  # the freeze is undone afterwards


def test_prune_step_never_cuts_a_group_serving_a_frozen_task() -> None:
    net, splits = _vgg_pair()
    widths = copy.deepcopy(net.layout)
    other = (net.task_names[1],)
    before = combination_cost(net, other).macs
    cfg = PruneConfig(criterion="magnitude", price="none", taylor_batches=1, progress=False)
    prune_step(net, splits.train.select_tasks(net.task_names), cfg, fraction=0.3, frozen=0b01)
    for l, groups in enumerate(widths):
        for mask in (1, 3):  # serve task 0
            assert net.layout[l].get(mask) == groups[mask], (l, mask)
    assert combination_cost(net, other).macs < before
    _check_every_combination(net, splits.val.x[:4])


def test_a_task_out_of_budget_stops_only_what_serves_it(zoo) -> None:  # type: ignore[no-untyped-def]
    nets, splits = zoo
    merged = create_merger("separate").merge(nets, splits.train)
    cfg = PruneConfig(step=0.6, min_step=0.3, max_steps=6, finetune_epochs=1, retry_epochs=0, taylor_batches=1,
                      check_shifts=1, progress=False, budget=0.0, criterion="magnitude", confidence=0.5)
    checks = check_set(splits.val, cfg.check_shifts, cfg.seed)
    first = merged.task_names[0]
    # The first task may lose nothing at all; the others anything.
    own = reference_accuracy(nets, checks)
    ref = {t: own[t] if t == first else 0.0 for t in merged.task_names}
    pruned, history = prune(copy.deepcopy(merged), splits, cfg, reference=ref)
    freezes = [h for h in history if h["kind"] == "freeze"]
    assert freezes and freezes[0]["tasks"] == [first]
    at_freeze = freezes[0]["layout"]
    own = 1 << 0
    for l, groups in enumerate(pruned.layout):
        assert groups.get(own) == at_freeze[l].get(own), l  # nothing serving the frozen task was cut after
    others = [t for t in merged.task_names if t != first]
    after_freeze = combination_cost(pruned, tuple(others)).macs
    # ... while the other tasks went on being pruned (below where the global stop would have left them).
    stopped, hist_global = prune(copy.deepcopy(merged), splits, replace(cfg, per_task_stop=False), reference=ref)
    assert not any(h["kind"] == "freeze" for h in hist_global)
    assert after_freeze < combination_cost(stopped, tuple(others)).macs
    accepted_after = [h for h in history[history.index(freezes[0]):] if h.get("accepted")]
    assert accepted_after, "no step was accepted after the freeze"
    assert within_budget(evaluate(pruned, checks), ref, cfg.budget)


def test_a_retry_in_parts_stops_at_the_first_part_that_passes(zoo, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """``retry_checks``: the retry's epochs come in judged parts; a step that passes after part 1 of 3
    gets no more fine-tuning, one that never passes gets all 15 epochs and is undone; 1 part is the old retry."""
    import merging.pruning.pruner as pruner
    from merging.pruning.budget import Verdict
    from merging.pruning.pruner import retry_parts

    assert retry_parts(PruneConfig(retry_epochs=15, retry_checks=3)) == [5, 5, 5]
    assert retry_parts(PruneConfig(retry_epochs=15, retry_checks=1)) == [15]
    assert retry_parts(PruneConfig(retry_epochs=5, retry_checks=3)) == [2, 2, 1]
    assert retry_parts(PruneConfig(retry_epochs=0, retry_checks=3)) == []
    with pytest.raises(MergingError):
        prune(copy.deepcopy(zoo[0][0]), zoo[1], PruneConfig(retry_checks=0))

    nets, splits = zoo
    net = create_merger("separate").merge(nets[:1], splits.train)
    task = net.task_names[0]
    # Judged in order: start ok; step 1 fails, its retry passes after part 2 of 3; step 2 fails all 3 parts.
    verdicts = iter([True, False, False, True, False, False, False, False])
    epochs: list[int] = []

    def judged(*args, **kwargs):  # type: ignore[no-untyped-def]
        ok = next(verdicts)
        return Verdict({task: 90.0}, {task: 0.0}, {task: 0.0 if ok else 5.0}, () if ok else (task,), {task: 0.0})

    monkeypatch.setattr(pruner, "assess", judged)
    monkeypatch.setattr(pruner, "_finetune", lambda n, d, c, e, *a, **k: epochs.append(e))
    cfg = PruneConfig(step=0.2, min_step=0.15, max_steps=2, finetune_epochs=5, retry_epochs=15, retry_checks=3,
                      final_epochs=0, taylor_batches=1, check_shifts=1, progress=False, per_task_stop=False)
    _, history = prune(copy.deepcopy(net), splits, cfg)
    looks = [(h["kind"], h.get("part"), h.get("accepted")) for h in history if h["kind"] in ("step", "retry")]
    assert looks == [("step", None, None), ("retry", 0, None), ("retry", 1, True),
                     ("step", None, None), ("retry", 0, None), ("retry", 1, None), ("retry", 2, False)]
    assert epochs == [5, 5, 5, 5, 5, 5, 5]  # step 1: 5 + 5 + 5 (its third part skipped); step 2: 5 + 5 + 5 + 5


def test_recovery_keeps_its_own_batch_size_while_steps_use_the_fine_tuning_one(zoo, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """``recover_batch_size``: the baseline schedule fine-tunes steps in batches of 128 but recovers a merged
    network that misses the budget in batches of 64 (the recovery it was measured with)."""
    import merging.pruning.pruner as pruner
    from merging.pruning.budget import Verdict

    nets, splits = zoo
    net = create_merger("separate").merge(nets[:1], splits.train)
    task = net.task_names[0]
    verdicts = iter([False, True, True])  # start misses, the recovery round passes, the one step passes
    seen: list[tuple[int, int, float]] = []

    def judged(*args, **kwargs):  # type: ignore[no-untyped-def]
        ok = next(verdicts)
        return Verdict({task: 90.0}, {task: 0.0}, {task: 0.0 if ok else 5.0}, () if ok else (task,), {task: 0.0})

    monkeypatch.setattr(pruner, "assess", judged)
    monkeypatch.setattr(pruner, "fit", lambda n, d, tc, **k: seen.append((tc.epochs, tc.batch_size, tc.lr)))
    cfg = PruneConfig(step=0.2, min_step=0.15, max_steps=1, finetune_epochs=5, retry_epochs=0, final_epochs=0,
                      recover_epochs=7, recover_rounds=1, recover_batch_size=64, batch_size=128, lr=2e-3,
                      taylor_batches=1, check_shifts=1, progress=False)
    prune(copy.deepcopy(net), splits, cfg)
    assert seen == [(7, 64, cfg.recover_lr), (5, 128, 2e-3)]
