"""The cost of a combination from the structure equals an independent FLOP counter's count."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from merging.cost import combination_cost, cost_table
from merging.tasks import combination_name
from tests.conftest import random_net, subsets


def counted_macs(module: torch.nn.Module, shape: tuple[int, ...]) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(torch.zeros(shape))
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("family", ["lenet", "vgg"])
@pytest.mark.parametrize("n_tasks", [3, 5])
def test_macs_match_flop_counter_for_every_combination(family: str, n_tasks: int) -> None:
    net = random_net(family, n_tasks, seed=n_tasks)
    shape = (1, net.arch.in_channels, *net.arch.input_size)
    combos = subsets(list(net.task_names))
    assert len(combos) == 2**n_tasks - 1
    for combo in combos:
        expected = counted_macs(net.for_combination(combo), shape)
        assert combination_cost(net, combo).macs == expected, combo


def test_cost_grows_with_the_combination_and_counts_only_groups_it_runs() -> None:
    net = random_net("lenet", 3, seed=7)
    table = cost_table(net)
    assert set(table) == {combination_name(c) for c in subsets(list(net.task_names))}
    for name, cost in table.items():
        for other, ocost in table.items():
            if set(name.split("+")) < set(other.split("+")):
                assert cost.macs <= ocost.macs
    # Removing a group that only t0 uses changes t0's cost and no combination without t0.
    before = cost_table(net)
    only_t0 = 1
    if net.group_width(0, only_t0) == 0:
        pytest.skip("layout drew no t0-only group at layer 0")
    net.select_channels(0, only_t0, [])
    after = cost_table(net)
    for name in before:
        if "t0" in name.split("+"):
            assert after[name].macs < before[name].macs
        else:
            assert after[name].macs == before[name].macs


def test_params_count_matches_modules() -> None:
    net = random_net("vgg", 3, seed=1)
    cost = combination_cost(net, None)
    assert cost.params == sum(p.numel() for p in net.parameters())
