"""The ``pam`` merger: planted groups recovered, exact reproduction, wiring respected."""

from __future__ import annotations

import pytest
import torch

from merging.arch import ArchConfig, LayerSpec
from merging.data.base import MultitaskData
from merging.errors import MergingError
from merging.graph import GroupKey
from merging.mergers import create_merger
from merging.mergers.pam import PamConfig, PamMerger
from merging.network import MultitaskNet
from merging.tasks import TaskSpec, all_combinations
from tests.pam_support import tiny_zoo

N = 384


@pytest.fixture(scope="module")
def digit_zoo():  # type: ignore[no-untyped-def]
    nets, splits = tiny_zoo()
    return list(nets), splits


def _planted() -> tuple[list[MultitaskNet], MultitaskData]:
    """Three single-task networks of one hidden layer over a 3-channel 1x1 input.

    Bits a, b are random; task ``ab`` is the 4-class label 2a + b, task ``b`` is b, task ``a`` is a.
    Input channels: a, b, noise (each with a little noise). Network ``ab`` has neurons
    [copy of a, copy of b, noise]; ``b`` has [copy of b (noisier), noise]; ``a`` has [copy of a (noisier)].
    PAM should keep one a-neuron for {ab, a}, one b-neuron for {ab, b}, and drop the rest.
    """
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 2, (N,), generator=g)
    b = torch.randint(0, 2, (N,), generator=g)
    x = torch.stack([a.float(), b.float(), torch.randn(N, generator=g)], 1)
    x[:, :2] += 0.05 * torch.randn(N, 2, generator=g)
    x = x[:, :, None, None]
    tasks = [
        TaskSpec("ab", "classes", ("0", "1", "2", "3")),
        TaskSpec("b", "classes", ("0", "1")),
        TaskSpec("a", "classes", ("0", "1")),
    ]
    data = MultitaskData(tuple(tasks), x, {"ab": 2 * a + b, "b": b, "a": a})
    # rows: which input channel each neuron copies (+3 keeps the noise neuron out of the ReLU's zero).
    plans = {"ab": [(0, 10.0), (1, 10.0), (2, 1.0)], "b": [(1, 4.0), (2, 1.0)], "a": [(0, 4.0)]}
    nets = []
    for t in tasks:
        plan = plans[t.name]
        arch = ArchConfig("planted", 3, (1, 1), (LayerSpec("fc", len(plan)),))
        net = MultitaskNet.single_task(t, arch)
        block = net.blocks[GroupKey(0, 1).name]
        with torch.no_grad():
            block.conv.weight.zero_()
            for row, (col, scale) in enumerate(plan):
                block.conv.weight[row, col] = scale
                block.conv.bias[row] = 3.0 if col == 2 else 0.0
            # A noisier copy: add noise-channel leakage to the second network's neurons.
            if t.name != "ab":
                block.conv.weight[:, 2] += 0.5
        nets.append(net)
    return nets, data


def _rows_of(net: MultitaskNet, layer: int, mask: int) -> torch.Tensor:
    return net.blocks[GroupKey(layer, mask).name].conv.weight.detach()[:, :, 0, 0]


def test_planted_groups_are_recovered() -> None:
    nets, data = _planted()
    merged = PamMerger(PamConfig(calib_size=N)).merge(nets, data)
    # masks: ab = 1, b = 2, a = 4
    assert merged.layout[0] == {0b101: 1, 0b011: 1}
    # ... and they hold the right neurons: the a-copy of net "ab" and the b-copy of net "ab".
    assert torch.equal(_rows_of(merged, 0, 0b101), nets[0].blocks["L0_g1"].conv.weight.detach()[0:1, :, 0, 0])
    assert torch.equal(_rows_of(merged, 0, 0b011), nets[0].blocks["L0_g1"].conv.weight.detach()[1:2, :, 0, 0])
    assert merged.meta["pam"]["dropped"] == [4]
    merged.check_wiring()


def test_two_level_split_puts_every_multi_task_neuron_in_the_shared_group() -> None:
    nets, data = _planted()
    merged = create_merger("pam", split="two-level", calib_size=N).merge(nets, data)
    assert merged.layout[0] == {0b111: 2}


def test_task_whose_channels_all_survive_is_reproduced_exactly() -> None:
    nets, data = _planted()
    merged = PamMerger(PamConfig(calib_size=N)).merge(nets, data)
    # Net "ab" kept both informative neurons but lost its noise neuron: not exact; b and a were dropped.
    assert merged.meta["pam"]["exact_tasks"] == []
    kept = PamMerger(PamConfig(calib_size=N, drop_irrelevant=False)).merge(nets, data)
    assert sorted(kept.meta["pam"]["exact_tasks"]) == ["a", "ab", "b"]
    for combo in all_combinations(kept.task_names):
        outs = kept(data.x, combo)
        for t in combo:
            ref = next(n for n in nets if n.task_names == (t,))(data.x)[t]
            torch.testing.assert_close(outs[t], ref, rtol=0, atol=1e-5)


def test_exact_on_trained_digit_networks(digit_zoo: tuple[list[MultitaskNet], object]) -> None:
    nets, splits = digit_zoo
    x = splits.val.x[:128]
    for consistency in ("cut", "expand"):
        merged = create_merger("pam", consistency=consistency, calib_size=256).merge(nets, splits.train)
        merged.check_wiring()
        for t in merged.meta["pam"]["exact_tasks"]:
            ref = next(n for n in nets if n.task_names == (t,))(x)[t]
            torch.testing.assert_close(merged(x, [t])[t], ref, rtol=0, atol=1e-4)
        for combo in all_combinations(merged.task_names):  # every combination runs
            assert set(merged(x[:2], combo)) == set(combo)
    full = create_merger("pam", drop_irrelevant=False, consistency="expand", calib_size=256).merge(nets, splits.train)
    assert sorted(full.meta["pam"]["exact_tasks"]) == sorted(full.task_names)
    for combo in all_combinations(full.task_names):
        outs = full(x, combo)
        for t in combo:
            ref = next(n for n in nets if n.task_names == (t,))(x)[t]
            torch.testing.assert_close(outs[t], ref, rtol=0, atol=1e-4)


def test_deterministic_for_a_seed(digit_zoo: tuple[list[MultitaskNet], object]) -> None:
    nets, splits = digit_zoo
    a = create_merger("pam", calib_size=128).merge(nets, splits.train, seed=3)
    b = create_merger("pam", calib_size=128).merge(nets, splits.train, seed=3)
    assert a.layout == b.layout
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])


def test_bad_options_are_typed_errors() -> None:
    with pytest.raises(MergingError):
        create_merger("pam", delta=1.5)
    with pytest.raises(MergingError):
        create_merger("pam", split="three-level")
    with pytest.raises(MergingError):
        create_merger("pam", no_such_option=1)
