"""The yardsticks: c_alone's routes, the width grid, the specialist network, the stronger pruner."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest

from merging.cost import combination_cost
from merging.pruning import PruneConfig, assess, check_set, prune, reference_accuracy
from merging.references import TpSchedule, narrowest_from_scratch, prune_with_torch_pruning, specialist
from merging.train import TrainConfig
from tests.pam_support import tiny_zoo

FAST = PruneConfig(step=0.2, min_step=0.05, max_steps=6, finetune_epochs=1, retry_epochs=1, final_epochs=0,
                   taylor_batches=2, check_shifts=1, progress=False)


@pytest.fixture(scope="module")
def zoo():  # type: ignore[no-untyped-def]
    nets, splits = tiny_zoo()
    ref = reference_accuracy(nets, check_set(splits.val, FAST.check_shifts, FAST.seed))
    return list(nets), splits, ref


def test_width_grid_picks_the_narrowest_passing_width(zoo) -> None:  # type: ignore[no-untyped-def]
    nets, splits, ref = zoo
    tried: list[int] = []

    def judge(net):  # type: ignore[no-untyped-def]  # passes from 12 first-layer channels up (mult 1.0 of 12)
        tried.append(net.layout[0][1])
        return net.layout[0][1] >= 6

    got, mult = narrowest_from_scratch(nets[1], splits, FAST, ref, TrainConfig(epochs=1, progress=False),
                                       grid=(1.0, 0.25, 0.5, 0.75), judge=judge)
    assert mult == 0.5 and got is not None and got.layout[0][1] == 6
    assert tried == [3, 6]  # ascending, stopped at the first pass
    none, m = narrowest_from_scratch(nets[1], splits, FAST, ref, TrainConfig(epochs=1, progress=False),
                                     grid=(0.25, 0.5), judge=lambda n: False)
    assert none is None and m is None



def test_width_grid_trains_no_width_dearer_than_its_cap(zoo, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import merging.references as refs

    nets, splits, ref = zoo
    trained: list[int] = []
    monkeypatch.setattr(refs, "fit", lambda net, *a, **k: trained.append(net.layout[0][1]))
    tc = TrainConfig(epochs=1, progress=False)
    never = lambda n: False  # noqa: E731  # every width misses: the grid goes as far as the cap lets it
    grid = (0.25, 0.5, 0.75, 1.0)
    cap = combination_cost(refs._at_width(nets[1], 0.5)).macs  # the 0.5 width costs exactly the cap: trained
    assert narrowest_from_scratch(nets[1], splits, FAST, ref, tc, grid=grid, judge=never, max_macs=cap) == (None, None)
    assert trained == [3, 6] and refs.grid_stopped(nets[1], grid, cap)
    trained.clear()
    full = combination_cost(nets[1]).macs
    narrowest_from_scratch(nets[1], splits, FAST, ref, tc, grid=grid, judge=never, max_macs=full)
    assert trained == [3, 6, 9, 12] and not refs.grid_stopped(nets[1], grid, full)
    assert not refs.grid_stopped(nets[1], grid, None)


def test_specialist_has_exactly_the_heads_of_its_combination(zoo) -> None:  # type: ignore[no-untyped-def]
    nets, splits, ref = zoo
    pair = [nets[0], nets[2]]
    pruned, _ = specialist(pair, splits.train, splits, replace(FAST, max_steps=1), ref,
                           TrainConfig(epochs=2, progress=False))
    assert set(pruned.heads) == {nets[0].task_names[0], nets[2].task_names[0]}
    assert pruned.task_names == (nets[0].task_names[0], nets[2].task_names[0])
    assert all(list(g) == [0b11] for g in pruned.layout)  # one trunk shared by both tasks


def test_torch_pruning_route_prunes_within_budget(zoo) -> None:  # type: ignore[no-untyped-def]
    nets, splits, ref = zoo
    cfg = replace(FAST, budget=2.0)
    got = prune_with_torch_pruning(nets[1], splits, cfg, ref, TpSchedule(iterative_steps=4, finetune_epochs=1,
                                                                         retry_epochs=1))
    assert got is not None
    assert combination_cost(got).macs < combination_cost(nets[1]).macs
    checks = check_set(splits.val.select_tasks(got.task_names), cfg.check_shifts, cfg.seed)
    assert assess(got, checks, ref, cfg.budget, cfg.confidence).ok
    got.check_wiring()


def _dense_width(net) -> int:  # type: ignore[no-untyped-def]
    return sum(net.layout[-1].values())


def test_share_pricing_does_not_starve_the_dense_layer(zoo) -> None:  # type: ignore[no-untyped-def]
    """The old price (raw expected MACs per channel) never cut the cheap dense layer and left the net
    larger; the share price lets every layer compete on normalised importance."""
    nets, splits, ref = zoo
    net = nets[1]
    cfg = replace(FAST, budget=3.0)
    by_share, _ = prune(copy.deepcopy(net), splits, replace(cfg, price="share"), reference=ref)
    by_macs, _ = prune(copy.deepcopy(net), splits, replace(cfg, price="macs"), reference=ref)
    assert _dense_width(by_share) < _dense_width(net)
    assert combination_cost(by_share).macs < combination_cost(by_macs).macs


@pytest.mark.slow
def test_default_pruner_beats_the_old_default_on_a_single_network(zoo) -> None:  # type: ignore[no-untyped-def]
    nets, splits, _ = zoo
    net = nets[0]
    old = PruneConfig(step=0.2, min_step=0.05, max_steps=20, finetune_epochs=2, retry_epochs=2, taylor_batches=4,
                      progress=False, price="macs", confidence=0.5, final_epochs=0)
    new = PruneConfig(progress=False)
    ref_new = reference_accuracy(nets, check_set(splits.val, new.check_shifts, new.seed))
    by_new, _ = prune(copy.deepcopy(net), splits, new, reference=ref_new)
    by_old, _ = prune(copy.deepcopy(net), splits, old, reference=ref_new)
    assert combination_cost(by_new).macs < combination_cost(by_old).macs
    checks = check_set(splits.val.select_tasks(net.task_names), new.check_shifts, new.seed)
    assert assess(by_new, checks, ref_new, new.budget, new.confidence).ok
