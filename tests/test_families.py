"""The residual and MobileNetV2-style families on the group graph: exact MACs, the wiring rule after
merging and pruning, coupled channels through skip additions and depthwise convs."""

from __future__ import annotations

import random

import pytest
import torch

from merging.arch import ArchConfig, create_arch, resolve
from merging.cost import combination_cost
from merging.data.base import MultitaskData
from merging.errors import MergingError
from merging.graph import GroupKey
from merging.mergers.base import create_merger
from merging.network import MultitaskNet
from merging.pruning.config import PruneConfig
from merging.pruning.steps import prune_step
from merging.pruning.surgery import remove_dead_groups
from tests.conftest import assert_bundle_matches_eager, make_tasks, subsets
from tests.test_cost import counted_macs


def small_arch(family: str) -> ArchConfig:
    if family == "resnet":
        return create_arch("resnet", input_size=(16, 16), stages=(8, 16), blocks=(1, 1))
    return create_arch("mobilenetv2", input_size=(16, 16), width_mult=0.25, settings=((1, 8, 1, 1), (6, 8, 2, 2)),
                       stem=16, last=32, stem_stride=1)


def coupled_random_layout(arch: ArchConfig, n_tasks: int, seed: int) -> list[dict[int, int]]:
    """Random groups per dense layer (the all-task group always present, so every group has a
    superset to read); a depthwise or add layer, and the producer an addition sums with its skip,
    copy the layout they must equal."""
    rng = random.Random(seed)
    full = (1 << n_tasks) - 1
    res = resolve(arch)
    # the later of an addition's two producers copies the earlier one's layout
    tied = {max(r.source, r.skip): min(r.source, r.skip) for r in res if r.kind == "add" and r.skip is not None}
    layout: list[dict[int, int]] = []
    for l, r in enumerate(res):
        if r.kind in ("dw", "add"):
            layout.append(dict(layout[r.source]))
        elif l in tied:
            layout.append(dict(layout[tied[l]]))
        else:
            masks = {full} | {rng.randint(1, full) for _ in range(rng.randint(0, 3))}
            layout.append({m: rng.randint(1, 4) for m in sorted(masks)})
    return layout


def random_family_net(family: str, n_tasks: int, seed: int) -> MultitaskNet:
    torch.manual_seed(seed)
    arch = small_arch(family)
    net = MultitaskNet(make_tasks(n_tasks), arch, coupled_random_layout(arch, n_tasks, seed)).eval()
    remove_dead_groups(net)  # a random layout may hold groups nothing reads
    with torch.no_grad():  # non-trivial BN statistics, so a wrong channel shows in the outputs
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return net


def random_labelled(net: MultitaskNet, n: int) -> MultitaskData:
    """n random images with random labels for every task of ``net`` (seeded)."""
    gen = torch.Generator().manual_seed(0)
    return MultitaskData(net.tasks, torch.randn(n, 3, 16, 16, generator=gen),
                         {t.name: torch.randint(0, t.out_dim, (n,), generator=gen) if t.kind == "classes"
                          else torch.randint(0, 2, (n, t.out_dim), generator=gen).float() for t in net.tasks})


def single_nets(family: str, n: int) -> list[MultitaskNet]:
    arch = small_arch(family)
    nets = []
    for i, task in enumerate(make_tasks(n)):
        torch.manual_seed(100 + i)
        nets.append(MultitaskNet.single_task(task, arch).eval())
    return nets


@pytest.mark.parametrize("family", ["resnet", "mobilenetv2"])
def test_graph_macs_equal_the_flop_counter_for_every_combination(family: str) -> None:
    net = random_family_net(family, 3, seed=1)  # 7 combinations, each counted by FlopCounterMode
    shape = (1, 3, *net.arch.input_size)
    for combo in subsets(list(net.task_names)):
        assert combination_cost(net, combo).macs == counted_macs(net.for_combination(combo), shape), combo


def test_full_size_families_count_exactly_too() -> None:
    for family, kwargs in (("resnet", {"stages": (64, 128, 256, 512), "stem": "imagenet"}),
                           ("mobilenetv2", {"width_mult": 0.5})):
        arch = create_arch(family, input_size=(64, 64), **kwargs)
        net = MultitaskNet.single_task(make_tasks(1)[0], arch).eval()
        assert combination_cost(net).macs == counted_macs(net.for_combination(None), (1, 3, 64, 64)), family


@pytest.mark.parametrize("family", ["resnet", "mobilenetv2"])
def test_separate_merge_reproduces_each_network_and_keeps_the_wiring(family: str) -> None:
    nets = single_nets(family, 3)
    merged = create_merger("separate").merge(nets, MultitaskData(nets[0].tasks, torch.zeros(1, 3, 16, 16),
                                                                 {nets[0].task_names[0]: torch.zeros(1).long()}))
    merged.check_wiring()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        out = merged(x)
        for net in nets:
            (t,) = net.task_names
            torch.testing.assert_close(out[t], net(x)[t], rtol=1e-5, atol=1e-5)


def labelled_by_the_nets(nets: list[MultitaskNet], n: int = 256, seed: int = 0) -> MultitaskData:
    """Random images labelled by each network's own predictions, so its channels carry information
    about its task (what PAM's calibration measures)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=gen)
    y = {}
    with torch.no_grad():
        for net in nets:
            (t,) = net.task_names
            out = net(x)[t]
            y[t] = out.argmax(1) if net.tasks[0].kind == "classes" else (out > out.median(0).values).float()
    return MultitaskData(tuple(net.tasks[0] for net in nets), x, y)


@pytest.mark.parametrize("family", ["resnet", "mobilenetv2"])
def test_pam_merge_reproduces_every_network_where_nothing_is_dropped(family: str) -> None:
    nets = single_nets(family, 3)
    merged = create_merger("pam", consistency="expand", drop_irrelevant=False).merge(nets, labelled_by_the_nets(nets))
    merged.check_wiring()
    assert merged.meta["pam"]["exact_tasks"] == ["t0", "t1", "t2"]
    assert len(merged.layout[0]) > 1  # regrouped: channels went to groups of several tasks, not one per network
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        out = merged(x)
        for net in nets:
            (t,) = net.task_names
            torch.testing.assert_close(out[t], net(x)[t], rtol=1e-5, atol=1e-5)
    for combo in subsets(list(merged.task_names)):
        assert combination_cost(merged, combo).macs == counted_macs(merged.for_combination(combo), (1, 3, 16, 16))


@pytest.mark.parametrize("family", ["resnet", "mobilenetv2"])
def test_pam_merge_cuts_to_the_wiring_rule_and_keeps_coupled_channels_together(family: str) -> None:
    nets = single_nets(family, 3)
    merged = create_merger("pam").merge(nets, labelled_by_the_nets(nets))
    merged.check_wiring()  # every dense group reads only supersets, every depthwise/add layer its source's groups
    graph = merged.graph()
    for unit in graph.units():
        assert len({tuple(merged.layout[k.layer].items()) for k in unit}) == 1, unit
    for node in graph:
        assert node.inputs or node.key.layer == 0  # type: ignore[union-attr]
    separate = sum(combination_cost(net).macs for net in nets)
    assert combination_cost(merged).macs < separate  # channels relevant to no task were dropped
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        out = merged(x)
        for net in nets:
            (t,) = net.task_names
            if t in merged.meta["pam"]["exact_tasks"]:
                torch.testing.assert_close(out[t], net(x)[t], rtol=1e-5, atol=1e-5)


def _producers(net: MultitaskNet, unit: tuple[GroupKey, ...]) -> list[GroupKey]:
    """Members computed by a dense conv from outside the unit (an addition's addends)."""
    graph = net.graph()
    return [k for k in unit if graph[k].kind in ("conv", "fc") and not set(graph[k].inputs) & set(unit)]


def _unit_with_add(net: MultitaskNet) -> tuple[GroupKey, ...]:
    graph = net.graph()
    return next(u for u in graph.units() if any(graph[k].kind == "add" for k in u) and len(_producers(net, u)) >= 2)


@pytest.mark.parametrize("family", ["resnet", "mobilenetv2"])
def test_selecting_channels_cuts_the_same_channels_on_both_sides_of_an_addition(family: str) -> None:
    net = random_family_net(family, 3, seed=4)
    unit = _unit_with_add(net)
    producers = _producers(net, unit)  # both addends, each computed by filters of its own
    width = net.group_width(unit[0].layer, unit[0].mask)
    keep = [c for c in range(width) if c % 2 == 0] or [0]
    before = {k: net.conv_of(k).weight.detach().clone() for k in producers}
    x = torch.randn(2, 3, 16, 16)
    # What the pruned network must compute: the dropped channels' outgoing weights zeroed.
    ref = random_family_net(family, 3, seed=4)
    with torch.no_grad():
        for r in ref.graph().input_readers(unit[0]):
            conv = ref.conv_of(r.node.key)
            for c in range(width):
                if c not in keep:
                    conv.weight[:, r.offset + c] = 0
        expected = ref(x)
    net.select_channels(unit[-1].layer, unit[-1].mask, keep)  # named by its last member: the whole unit goes
    net.check_wiring()
    for k in producers:
        assert torch.equal(net.conv_of(k).weight, before[k][keep]), k
    assert {net.group_width(k.layer, k.mask) for k in unit} == {len(keep)}
    with torch.no_grad():
        got = net(x)
    for t in got:
        torch.testing.assert_close(got[t], expected[t], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["resnet", "mobilenetv2"])
def test_a_pruning_step_keeps_units_coupled_and_macs_exact(family: str) -> None:
    net = random_family_net(family, 3, seed=6)
    data = random_labelled(net, 96)
    before = combination_cost(net).macs
    prune_step(net, data, PruneConfig(taylor_batches=1, seed=0), fraction=0.3)
    net.check_wiring()
    after = combination_cost(net).macs
    assert after < before
    graph = net.graph()
    for unit in graph.units():
        assert len({net.group_width(k.layer, k.mask) for k in unit}) == 1, unit
    shape = (1, 3, 16, 16)
    for combo in subsets(list(net.task_names)):
        assert combination_cost(net, combo).macs == counted_macs(net.for_combination(combo), shape), combo


@pytest.mark.slow
def test_every_method_of_a_mobilenetv2_bundle_matches_eager_through_the_executorch_runtime(tmp_path) -> None:
    from mobile_export.export import ExportConfig, export_bundle
    from mobile_export.runtime import BundleRuntime

    nets = single_nets("mobilenetv2", 2)
    # Correlated tasks (one trunk, two heads), so PAM finds channels that serve both: two independent random
    # networks share nothing, and the merge had no shared group (this test failed before this change).
    nets[1].load_state_dict({k: v for k, v in nets[0].state_dict().items() if not k.startswith("heads.")},
                            strict=False)
    merged = create_merger("pam").merge(nets, labelled_by_the_nets(nets))  # shared and per-task groups
    assert any(bin(m).count("1") == 2 for groups in merged.layout for m in groups)
    export_bundle(merged, tmp_path / "bundle", ExportConfig(force=True), log=lambda *_: None)
    rt = BundleRuntime(tmp_path / "bundle")
    assert_bundle_matches_eager(rt, merged, torch.randn(2, 3, 16, 16), {"t0", "t1", "t0+t1"})


@pytest.mark.parametrize("family", ["resnet", "mobilenetv2"])
def test_removing_any_unit_cascades_to_a_whole_network_with_exact_macs(family: str) -> None:
    import copy

    nets = single_nets(family, 3)
    base = create_merger("pam").merge(nets, labelled_by_the_nets(nets))  # groups that read a single group
    cascaded = 0
    for unit in base.graph().units():
        net = copy.deepcopy(base)
        try:
            net.select_channels(unit[0].layer, unit[0].mask, [])
        except MergingError as e:
            assert e.code == "empty_task"  # the one refusal: a task would be left with no input
            continue
        net.check_wiring()
        cascaded += len(base.graph().groups()) - len(net.graph().groups()) > len(unit)
        for combo in subsets(list(net.task_names)):
            assert combination_cost(net, combo).macs == counted_macs(net.for_combination(combo), (1, 3, 16, 16))
    if family == "resnet":  # here some removal leaves a reader with nothing to read, which goes in turn
        assert cascaded     # (in this MobileNetV2 every such cascade ends at a head: the empty_task refusal)


@pytest.mark.parametrize("family", ["resnet", "mobilenetv2"])
def test_finetuning_around_a_frozen_task_keeps_its_groups_bit_identical(family: str) -> None:
    from merging.pruning.pruner import finetune_unfrozen

    net = random_family_net(family, 3, seed=6)
    data = random_labelled(net, 64)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    frozen = 0b001  # the groups serving t0 (additions included: they hold no weights) stay as they are
    finetune_unfrozen(net, data, PruneConfig(lr=1e-2, batch_size=32), epochs=1, seed=0, frozen=frozen)
    after = net.state_dict()
    frozen_names = {g.name for g in net.graph().groups() if g.mask & frozen}
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for k in before:
        if k.startswith("blocks.") and k.split(".")[1] in frozen_names:
            assert torch.equal(before[k], after[k]), k
