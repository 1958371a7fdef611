"""Regrouping: a task leaves a channel's set; wiring and MACs stay exact; frozen tasks untouched."""

from __future__ import annotations

import copy
import random
from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from merging.arch import create_arch
from merging.cost import combination_cost, cost_table
from merging.graph import GroupKey
from merging.mergers import create_merger
from merging.network import MultitaskNet
from merging.pruning import PruneConfig
from merging.pruning.importance import weighted_macs
from merging.pruning.regroup import drop_tasks, rebuild, regroup_step, table_of
from merging.tasks import all_combinations, mask_of
from tests.conftest import make_tasks, subsets
from tests.pam_support import tiny_zoo
from tests.test_cost import counted_macs
from tests.test_families import random_family_net, random_labelled, small_arch

CFG = PruneConfig(taylor_batches=2, progress=False, removes="pairs")


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


# ----------------------------------------------------------------- residual and MobileNetV2 families


def _units_hold_one_layout(net: MultitaskNet) -> None:
    graph = net.graph()
    for unit in graph.units():
        assert len({net.group_width(k.layer, k.mask) for k in unit}) == 1, unit
    for l, r in enumerate(net.resolved):  # a depthwise or add layer has its inputs' groups and widths
        for other in (r.source, r.skip) if r.kind in ("dw", "add") else ():
            if other is not None:
                assert net.layout[l] == net.layout[other], (l, other)


def _exact_family_macs(net: MultitaskNet) -> None:
    net.check_wiring()
    shape = (1, 3, *net.arch.input_size)
    for combo in subsets(list(net.task_names)):
        assert combination_cost(net, combo).macs == counted_macs(net.for_combination(combo), shape), combo


def _shared_units(net: MultitaskNet) -> list[tuple[GroupKey, ...]]:
    """Units of several members (through a depthwise conv or an addition) whose set has 2+ tasks."""
    return [u for u in net.graph().units() if len(u) > 1 and bin(u[0].mask).count("1") > 1]


def _nested_net(family: str, seed: int = 0) -> MultitaskNet:
    """Every layer with the groups {t0}, {t1}, {t2}, {t1, t2}, {t0, t1, t2}, each read by all its
    subsets above: a channel that leaves a set stays read by a smaller group (inside its own unit
    too, where a MobileNetV2 projection reads the depthwise conv of its unit)."""
    arch = small_arch(family)
    torch.manual_seed(seed)
    net = MultitaskNet(make_tasks(3), arch, [{1: 1, 2: 1, 4: 1, 6: 2, 7: 2}] * len(arch.layers)).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a wrong channel shows in the outputs
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return net


@pytest.mark.parametrize("family", ["resnet", "mobilenetv2"])
def test_regroup_steps_on_the_families_keep_units_coupled_and_macs_exact(family: str) -> None:
    net = random_family_net(family, 3, seed=6)
    data = random_labelled(net, 96)
    before = weighted_macs(net)
    pairs = 0
    for k in range(2):
        pairs += regroup_step(net, data, replace(CFG, taylor_batches=1, seed=k), fraction=0.2)["pairs"]
    assert pairs > 0
    assert weighted_macs(net) < before
    _units_hold_one_layout(net)
    _exact_family_macs(net)


@pytest.mark.parametrize("family", ["resnet", "mobilenetv2"])
def test_narrowing_with_no_pair_dropped_reproduces_the_family_exactly(family: str) -> None:
    """Channel 0 of a coupled unit no longer feeds task t anywhere (its column is zero in every
    reader serving t): with nothing dropped by hand it leaves t's set in every member of its unit,
    and every combination computes what it computed."""
    net = _nested_net(family)
    unit = _shared_units(net)[0]
    key = unit[0]
    t = (key.mask & -key.mask).bit_length() - 1  # its lowest task
    with torch.no_grad():
        for r in net.graph().input_readers(key):
            if r.node.serves >> t & 1:
                rows = [i for i in range(net.conv_of(r.node.key).out_channels) if r.node.key not in unit or i != 0]
                net.conv_of(r.node.key).weight[rows, r.offset] = 0
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        before = {c: net(x, c) for c in subsets(list(net.task_names))}
    width = net.group_width(key.layer, key.mask)
    assert drop_tasks(net, {}) == 0
    assert {net.group_width(k.layer, k.mask) for k in unit} == {width - 1}  # left S in every member
    with torch.no_grad():
        for combo, out in before.items():
            got = net(x, combo)
            for name in combo:
                torch.testing.assert_close(got[name], out[name], rtol=1e-5, atol=1e-5)
    _units_hold_one_layout(net)
    _exact_family_macs(net)


@pytest.mark.parametrize("family", ["resnet", "mobilenetv2"])
def test_narrowing_a_pair_equals_zeroing_its_weights_into_the_readers_of_that_task(family: str) -> None:
    """Removing task t from channel 0 of a coupled unit computes, for every combination, what the
    network computes with that channel's column zeroed in every dense reader serving t (its own row
    in a reader inside the unit excepted: that row is the channel); combinations that run none of
    those readers are unchanged."""
    base = _nested_net(family)
    x = torch.randn(4, 3, 16, 16)
    combos = subsets(list(base.task_names))
    with torch.no_grad():
        original = {c: base(x, c) for c in combos}
    units = [u for u in _shared_units(base) if u[0].mask == 7]  # t0 leaves: the channel moves to {t1, t2}
    assert units
    for unit in units:
        key = unit[0]
        t = (key.mask & -key.mask).bit_length() - 1
        ref = copy.deepcopy(base)
        zeroed = 0  # task sets of the readers that lose the column
        with torch.no_grad():
            for r in ref.graph().input_readers(key):
                if r.node.serves >> t & 1:
                    conv = ref.conv_of(r.node.key)
                    rows = [i for i in range(conv.out_channels) if r.node.key not in unit or i != 0]
                    conv.weight[rows, r.offset] = 0
                    zeroed |= r.node.serves
        net = copy.deepcopy(base)
        width = net.group_width(key.layer, key.mask)
        assert drop_tasks(net, {(unit[-1].layer, key.mask): [(0, t)]}) == 1  # any member names the unit
        assert {net.group_width(k.layer, k.mask) for k in unit} == {width - 1}
        _units_hold_one_layout(net)
        _exact_family_macs(net)
        with torch.no_grad():
            for combo in combos:
                got, want = net(x, combo), ref(x, combo)
                untouched = not mask_of(combo, net.task_names) & zeroed
                for name in combo:
                    torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)
                    if untouched:
                        torch.testing.assert_close(got[name], original[combo][name], rtol=1e-5, atol=1e-5)
