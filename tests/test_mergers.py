"""The `separate` and `shared` mergers and the checks every merger relies on."""

from __future__ import annotations

import pytest
import torch

from merging.arch import create_arch
from merging.cost import combination_cost, cost_table
from merging.errors import MergingError
from merging.mergers import create_merger
from merging.network import MultitaskNet
from merging.train import TrainConfig
from tests.conftest import make_tasks, subsets


def singles(n: int, family: str = "lenet", **arch_kw) -> list[MultitaskNet]:
    torch.manual_seed(0)
    arch = create_arch(family, **arch_kw)
    return [MultitaskNet.single_task(t, arch).eval() for t in make_tasks(n)]


@pytest.mark.parametrize("family", ["lenet", "vgg"])
def test_separate_reproduces_each_network_in_every_combination(family: str) -> None:
    nets = singles(3, family)
    for net in nets:  # give BN layers non-trivial statistics
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    merged = create_merger("separate").merge(nets, data=None)  # type: ignore[arg-type]
    merged.check_wiring()
    x = torch.randn(5, 1, 8, 8)
    refs = {net.task_names[0]: net(x)[net.task_names[0]] for net in nets}
    for combo in subsets(list(merged.task_names)):
        out = merged(x, combo)
        for t in combo:
            torch.testing.assert_close(out[t], refs[t], rtol=0, atol=1e-6)
    single = {net.task_names[0]: combination_cost(net).macs for net in nets}
    for name, cost in cost_table(merged).items():
        assert cost.macs == sum(single[t] for t in name.split("+"))


def test_shared_costs_trunk_plus_heads(digits_splits) -> None:
    data = digits_splits.train.select_tasks(("digit", "parity", "loop")).subset(list(range(128)))
    arch = create_arch("lenet")
    nets = [MultitaskNet.single_task(t, arch) for t in data.tasks]
    merged = create_merger("shared", train=TrainConfig(epochs=1, progress=False)).merge(nets, data)
    assert [len(g) for g in merged.layout] == [1, 1, 1]
    heads = {t: combination_cost(merged, (t,)).macs for t in merged.task_names}
    trunk = combination_cost(merged, ("digit",)).macs - _head_macs(merged, "digit")
    for name, cost in cost_table(merged).items():
        assert cost.macs == trunk + sum(_head_macs(merged, t) for t in name.split("+"))
    assert heads["digit"] > heads["parity"]  # 10 classes vs 2


def _head_macs(net: MultitaskNet, task: str) -> int:
    conv = net.heads[task].conv
    return conv.out_channels * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]


def test_mergers_refuse_mismatched_inputs() -> None:
    a = singles(1)[0]
    b_arch = create_arch("lenet", input_size=(16, 16))
    b = MultitaskNet.single_task(make_tasks(2)[1], b_arch)
    with pytest.raises(MergingError) as e:
        create_merger("separate").merge([a, b], data=None)  # type: ignore[arg-type]
    assert e.value.code == "mismatched_input"
    c = MultitaskNet.single_task(make_tasks(2)[1], create_arch("vgg"))
    with pytest.raises(MergingError) as e:
        create_merger("separate").merge([a, c], data=None)  # type: ignore[arg-type]
    assert e.value.code == "mismatched_architecture"
    with pytest.raises(MergingError) as e:
        create_merger("separate").merge([a, a], data=None)  # type: ignore[arg-type]
    assert e.value.code == "duplicate_task"
    with pytest.raises(MergingError) as e:
        create_merger("nope")
    assert e.value.code == "unknown_merger"
