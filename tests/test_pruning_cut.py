"""One surgery path: a prune step's cut through ``select_channels`` gives exactly the network
Torch-Pruning's ``group.prune()`` + ``sync_layout()`` gave, and removability is answered from the
group graph exactly as a trial removal on a deep copy answered it."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch_pruning as tp

from merging.arch import create_arch
from merging.errors import MergingError
from merging.graph import GroupKey
from merging.mergers.base import create_merger
from merging.network import MultitaskNet
from merging.pruning.surgery import cut_channels, removable, removal_closure, remove_dead_groups
from tests.conftest import make_tasks, random_layout, subsets
from tests.test_families import labelled_by_the_nets, random_family_net, single_nets


def _lenet(seed: int) -> MultitaskNet:
    torch.manual_seed(seed)
    arch = create_arch("lenet", width_mult=0.5)
    net = MultitaskNet(make_tasks(3), arch, random_layout(3, len(arch.layers), seed)).eval()
    remove_dead_groups(net)  # a random layout may hold groups nothing reads
    return net


def _net(family: str, seed: int) -> MultitaskNet:
    return _lenet(seed) if family == "lenet" else random_family_net(family, 3, seed=seed)


def _example(net: MultitaskNet, n: int = 4) -> torch.Tensor:
    return torch.randn(n, net.arch.in_channels, *net.arch.input_size, generator=torch.Generator().manual_seed(1))


def _partial_choice(net: MultitaskNet, seed: int) -> dict[tuple[int, int], list[int]]:
    """Some channels of some units (named by their producer), never a whole unit."""
    rng = random.Random(seed)
    chosen: dict[tuple[int, int], list[int]] = {}
    for unit in net.graph().units():
        width = net.group_width(unit[0].layer, unit[0].mask)
        if width > 1 and rng.random() < 0.7:
            chosen[(unit[0].layer, unit[0].mask)] = sorted(rng.sample(range(width), rng.randint(1, width - 1)))
    return chosen


def _torch_pruning_cut(net: MultitaskNet, chosen: dict[tuple[int, int], list[int]]) -> None:
    """The old path: Torch-Pruning's dependency graph slices every coupled layer and reader."""
    graph = tp.DependencyGraph().build_dependency(net.for_combination(None), example_inputs=_example(net, 2))
    for (l, mask), idxs in chosen.items():
        graph.get_pruning_group(net.block(l, mask).conv, tp.prune_conv_out_channels, idxs=idxs).prune()
    net.sync_layout()


@pytest.mark.parametrize("family", ["lenet", "resnet", "mobilenetv2"])
@pytest.mark.parametrize("seed", [4, 6])
def test_the_cut_gives_the_network_torch_pruning_gave(family: str, seed: int) -> None:
    old = _net(family, seed)
    chosen = _partial_choice(old, seed)
    assert chosen
    new = copy.deepcopy(old)
    _torch_pruning_cut(old, chosen)
    importance = {(k.layer, k.mask): torch.zeros(new.group_width(k.layer, k.mask)) for k in new.graph().groups()}
    assert cut_channels(new, chosen, importance) == []  # a partial cut removes no group
    assert new.layout == old.layout
    assert new.reads == old.reads
    old_sd, new_sd = old.state_dict(), new.state_dict()
    assert old_sd.keys() == new_sd.keys()
    for k in old_sd:
        assert torch.equal(old_sd[k], new_sd[k]), k  # the same channels, bit for bit
    x = _example(new)
    with torch.no_grad():
        for combo in subsets(list(new.task_names)):
            want, got = old(x, combo), new(x, combo)
            for t in combo:
                torch.testing.assert_close(got[t], want[t], rtol=0, atol=0)


def _trial_removal(net: MultitaskNet, key: GroupKey) -> set[GroupKey] | None:
    """The old answer: remove on a deep copy; the groups gone, or None when a task lost its last input."""
    trial = copy.deepcopy(net)
    try:
        trial.select_channels(key.layer, key.mask, [])
    except MergingError as e:
        assert e.code == "empty_task"
        return None
    return set(net.graph().groups()) - set(trial.graph().groups())


def _pam(family: str) -> MultitaskNet:
    nets = single_nets(family, 3)
    return create_merger("pam").merge(nets, labelled_by_the_nets(nets))


BUILDERS = {
    "lenet-2": lambda: _lenet(2),
    "lenet-5": lambda: _lenet(5),
    "resnet-pam": lambda: _pam("resnet"),
    "mobilenetv2-pam": lambda: _pam("mobilenetv2"),
    "resnet-random": lambda: random_family_net("resnet", 3, seed=6),
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_removability_is_answered_from_the_graph_as_a_trial_removal_answered_it(name: str) -> None:
    net = BUILDERS[name]()
    graph = net.graph()
    before = copy.deepcopy(net.state_dict())
    answers = []
    for unit in graph.units():
        for key in unit:  # any member names the unit
            gone, starved = removal_closure(graph, key)
            trial = _trial_removal(net, key)
            assert removable(graph, key) == (trial is not None) == (not starved), key
            if trial is not None:
                assert gone == trial, key  # and exactly the groups the cascade removes
            answers.append(trial is not None)
    assert net.state_dict().keys() == before.keys()  # asking changed nothing
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    if name.startswith("lenet"):  # not every network has both answers; these random LeNets do
        assert any(answers) and not all(answers)


def test_a_unit_that_would_starve_a_head_keeps_its_most_important_channel() -> None:
    torch.manual_seed(0)
    arch = create_arch("lenet", width_mult=0.5)
    net = MultitaskNet(make_tasks(2), arch, [{3: 4}, {3: 4}, {1: 3, 2: 4}]).eval()
    key = GroupKey(2, 1)  # task 0's head reads only this group
    assert not removable(net.graph(), key)
    removed = cut_channels(net, {(2, 1): [0, 1, 2]}, {(2, 1): torch.tensor([0.1, 0.7, 0.3])})
    assert removed == []
    assert net.layout[2] == {1: 1, 2: 4}
    torch.manual_seed(0)
    ref = MultitaskNet(make_tasks(2), arch, [{3: 4}, {3: 4}, {1: 3, 2: 4}]).eval()
    assert torch.equal(net.block(2, 1).conv.weight, ref.block(2, 1).conv.weight[[1]])  # channel 1 kept
