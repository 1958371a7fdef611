"""Regrouping: a task leaves a channel's set; wiring and MACs stay exact; frozen tasks untouched."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from merging.arch import create_arch
from merging.cost import combination_cost, cost_table
from merging.mergers import create_merger
from merging.network import MultitaskNet
from merging.pruning import PruneConfig
from merging.pruning.regroup import drop_tasks, rebuild, regroup_step, table_of
from merging.tasks import all_combinations
from tests.pam_support import tiny_zoo

CFG = PruneConfig(taylor_batches=2, progress=False, regroup=True)


def _flops_macs(net: MultitaskNet, combo: tuple[str, ...]) -> int:
    x = torch.zeros(1, net.arch.in_channels, *net.arch.input_size)
    with FlopCounterMode(display=False) as counter:
        net.for_combination(combo)(x)
    return counter.get_total_flops() // 2


def _exact_everywhere(net: MultitaskNet) -> None:
    net.check_wiring()
    for combo in all_combinations(net.task_names):
        assert _flops_macs(net, combo) == combination_cost(net, combo).macs, combo


def _planted_pair() -> tuple[MultitaskNet, torch.Tensor]:
    """Two tasks on one shared trunk; last-layer channel 0 feeds task A's head only (B's weight 0)."""
    tasks = tiny_zoo()[1].tasks[:2]
    arch = create_arch("lenet", width_mult=0.25)
    torch.manual_seed(0)
    net = MultitaskNet(tasks, arch, [{3: s.width} for s in arch.layers]).eval()
    with torch.no_grad():
        net.head(tasks[1].name).conv.weight[:, 0] = 0
    return net, tiny_zoo()[1].val.x[:32]


def test_a_channel_serving_only_a_moves_to_a_and_b_loses_exactly_its_macs() -> None:
    net, x = _planted_pair()
    a, b = net.task_names
    before_out = net(x)
    before = cost_table(net)
    last = len(net.layout) - 1
    conv = net.block(last, 3).conv
    r = net.resolved[last]
    own = conv.in_channels * r.kernel[0] * r.kernel[1] * r.conv_hw[0] * r.conv_hw[1]  # one channel's filter
    head_b = net.head(b).conv
    slice_b = head_b.out_channels * head_b.kernel_size[0] * head_b.kernel_size[1]  # its slice of B's head
    drop_tasks(net, {})  # nothing removed by hand: the set narrows to what the channel serves
    assert net.layout[last] == {1: 1, 3: conv.out_channels - 1}
    after = cost_table(net)
    assert before[b].macs - after[b].macs == own + slice_b
    assert after[a].macs == before[a].macs
    assert after[f"{a}+{b}"].macs == before[f"{a}+{b}"].macs - slice_b  # B's head no longer reads a zero slice
    out = net(x)
    for t in (a, b):
        torch.testing.assert_close(out[t], before_out[t], rtol=0, atol=1e-5)
    _exact_everywhere(net)


def test_regrouping_a_shared_trunk_yields_a_task_specific_group() -> None:
    net, _ = _planted_pair()
    data = tiny_zoo()[1].train.select_tasks(net.task_names)
    # The planted channel's importance for B is exactly 0 (B reads it with weight 0): the cheapest pair.
    regroup_step(net, data, CFG, fraction=0.01)
    assert len(net.layout[-1]) >= 2 and any(m != 3 for m in net.layout[-1])
    _exact_everywhere(net)


def test_removals_never_break_the_wiring_rule_and_macs_stay_exact() -> None:
    nets, splits = tiny_zoo()
    net = create_merger("pam").merge(nets, splits.train)
    rng = random.Random(0)
    x = splits.val.x[:8]
    for _ in range(4):
        removals: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for l, groups in enumerate(net.layout):
            for mask, width in groups.items():
                for c in range(width):
                    t = rng.randrange(len(net.tasks))
                    if mask >> t & 1 and rng.random() < 0.15:
                        removals.setdefault((l, mask), []).append((c, t))
        try:
            drop_tasks(net, removals)
        except Exception as e:  # a head left with nothing is the one refusal allowed
            assert "no input" in str(e)
            continue
        _exact_everywhere(net)
        for combo in all_combinations(net.task_names):
            outs = net(x, combo)
            alone = net.for_combination(combo)(x)
            for t, o in zip(combo, alone, strict=True):
                torch.testing.assert_close(outs[t], o)


def test_table_round_trip_is_exact() -> None:
    nets, splits = tiny_zoo()
    net = create_merger("pam").merge(nets, splits.train)
    x = splits.val.x[:16]
    before = net(x)
    again = copy.deepcopy(net)
    rebuild(again, table_of(again))
    assert again.layout == net.layout
    for t, o in again(x).items():
        assert torch.equal(o, before[t])


@pytest.mark.parametrize("frozen_task", [0, 2])
def test_a_frozen_task_is_bit_identical_after_the_others_are_regrouped(frozen_task: int) -> None:
    nets, splits = tiny_zoo()
    net = create_merger("pam").merge(nets, splits.train)
    x = splits.val.x[:32]
    name = net.task_names[frozen_task]
    before = net(x, (name,))[name]
    cost_before = combination_cost(net, tuple(t for t in net.task_names if t != name)).macs
    data = splits.train.select_tasks(net.task_names)
    for _ in range(3):
        regroup_step(net, data, CFG, fraction=0.2, frozen=1 << frozen_task)
    assert torch.equal(net(x, (name,))[name], before)
    assert combination_cost(net, tuple(t for t in net.task_names if t != name)).macs < cost_before
    _exact_everywhere(net)


def test_a_removal_that_leaves_a_reader_no_superset_group_keeps_the_wiring() -> None:
    """Task B leaves every channel of a middle layer; the layer above still serves B and now reads
    only zero weights: the nearest channel below takes its set on again (exact), nothing raises."""
    net, x = _planted_pair()
    middle = 1
    width = net.layout[middle][3]
    drop_tasks(net, {(middle, 3): [(c, 1) for c in range(width)]})
    _exact_everywhere(net)
    a, b = net.task_names
    out = net(x)
    assert set(out) == {a, b}
    assert torch.isfinite(out[b]).all()
