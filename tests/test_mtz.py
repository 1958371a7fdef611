"""The MTZ merger: its second-order pair terms, zipping identical networks, honest cost of the zipped network."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from merging.arch import create_arch
from merging.cost import combination_cost, cost_table
from merging.data.base import MultitaskData
from merging.errors import MergingError
from merging.mergers import create_merger
from merging.mergers._hessian import (
    greedy_pairs,
    input_correlation,
    merged_vectors,
    pair_costs,
    vectors_to_weights,
    weight_vectors,
    zip_terms,
)
from merging.mergers._zipnet import ZippedNet
from merging.mergers.mtz import MtzMerger
from merging.network import MultitaskNet
from merging.tasks import TaskSpec


def subsets(names: list[str]) -> list[tuple[str, ...]]:
    return [c for k in range(1, len(names) + 1) for c in itertools.combinations(names, k)]


def counted_macs(module: torch.nn.Module, shape: tuple[int, ...]) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(torch.zeros(shape))
    return counter.get_total_flops() // 2


def random_spd(n: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return a @ a.T / n + 0.1 * torch.eye(n, dtype=torch.float64)


def nets_for(tasks: list[TaskSpec], family: str, seed: int, same: bool = False) -> list[MultitaskNet]:
    arch = (
        create_arch("lenet", width_mult=0.5)
        if family == "lenet"
        else create_arch("vgg", stages=((6,), (8, 8)), fc_widths=(12,))
    )
    nets = []
    for i, t in enumerate(tasks):
        torch.manual_seed(seed if same else seed + i)
        net = MultitaskNet.single_task(t, arch)
        for m in net.modules():  # non-trivial BN statistics, so folding is exercised
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
        nets.append(net.eval())
    return nets


def random_data(tasks: list[TaskSpec], n: int, seed: int) -> MultitaskData:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=gen)
    y = {t.name: torch.randint(0, t.out_dim, (n,), generator=gen) for t in tasks}
    return MultitaskData(tuple(tasks), x, y)


# ----------------------------------------------------------------- the pair terms


def test_identity_correlations_give_half_squared_distance_and_the_average() -> None:
    gen = torch.Generator().manual_seed(0)
    wa, wb = torch.randn(4, 3, 3, 3, generator=gen), torch.randn(5, 3, 3, 3, generator=gen)
    ba, bb = torch.randn(4, generator=gen), torch.randn(5, generator=gen)
    va, vb = weight_vectors(wa, ba, True), weight_vectors(wb, bb, True)
    eye = torch.eye(4, dtype=torch.float64)
    terms = zip_terms(eye, eye, damping=0.0)
    costs = pair_costs(va, vb, terms.h_hat)
    # (I + I)^-1 = I/2: cost = 1/2 * |d|^2 / 2 over every kernel position (bias split evenly over them).
    for i in range(4):
        for j in range(5):
            dw, db = wa[i].double() - wb[j].double(), ba[i].double() - bb[j].double()
            d = torch.cat([dw.flatten(), (db / 9).repeat(9)])
            assert costs[i, j].item() == pytest.approx(0.25 * float(d @ d), rel=1e-10)
    w, b = vectors_to_weights(merged_vectors(va[1:2], vb[3:4], terms.step), (3, 3), True)
    torch.testing.assert_close(w[0].float(), (wa[1] + wb[3]) / 2)
    torch.testing.assert_close(b[0].float(), (ba[1] + bb[3]) / 2)


@pytest.mark.parametrize("per_position", [True, False])
def test_merged_weight_minimises_the_summed_error_and_the_cost_is_that_minimum(per_position: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    wa, wb = torch.randn(3, 2, 2, 2, generator=gen), torch.randn(3, 2, 2, 2, generator=gen)
    ba, bb = torch.randn(3, generator=gen), torch.randn(3, generator=gen)
    va, vb = weight_vectors(wa, ba, per_position), weight_vectors(wb, bb, per_position)
    dim = va.shape[2]
    ha, hb = random_spd(dim, gen), random_spd(dim, gen)
    terms = zip_terms(ha, hb, damping=0.0)
    costs = pair_costs(va, vb, terms.h_hat)
    merged = merged_vectors(va, vb, terms.step)  # row i merged with row i
    for i in range(3):
        a, b = va[i].T, vb[i].T  # (D, P)
        best = torch.linalg.solve(ha + hb, ha @ a + hb @ b)  # argmin of the two networks' summed error
        torch.testing.assert_close(merged[i].T, best, rtol=1e-9, atol=1e-9)
        err = 0.5 * ((best - a) * (ha @ (best - a))).sum() + 0.5 * ((best - b) * (hb @ (best - b))).sum()
        assert costs[i, i].item() == pytest.approx(float(err), rel=1e-9)
    w, bias = vectors_to_weights(va, (2, 2), per_position)
    torch.testing.assert_close(w.float(), wa)
    torch.testing.assert_close(bias.float(), ba)


def test_correlation_and_greedy_pairs() -> None:
    x = torch.arange(8.0).view(1, 2, 2, 2)
    h = input_correlation(x, per_position=True)
    pixels = torch.cat([x[0].reshape(2, 4).T, torch.ones(4, 1)], 1).double()
    torch.testing.assert_close(h, pixels.T @ pixels / 4)
    costs = torch.tensor([[0.5, 0.1, 0.9], [0.2, 0.05, 0.3]], dtype=torch.float64)
    assert greedy_pairs(costs) == [(1, 1), (0, 0)]


# ----------------------------------------------------------------- the merger

TWIN = [TaskSpec("a", "classes", ("x", "y", "z")), TaskSpec("b", "classes", ("x", "y", "z"))]
TRIO = [TaskSpec(f"t{i}", "classes", tuple(f"c{j}" for j in range(2 + i))) for i in range(3)]


@pytest.mark.parametrize("family", ["lenet", "vgg"])
def test_zipping_two_copies_merges_every_neuron_at_zero_cost_and_reproduces_outputs(family: str) -> None:
    nets = nets_for(TWIN, family, seed=3, same=True)
    merged = MtzMerger(retrain_steps=0, progress=False).merge(nets, random_data(TWIN, 64, 0))
    merged.check_wiring()
    assert merged.layout == [{3: s.width} for s in nets[0].arch.layers]
    for rec in merged.meta["mtz"]["layers"]:
        assert rec["zipped"] == rec["candidates"] > 0
        assert max(rec["costs"]) < 1e-9
    x = torch.randn(6, 1, 8, 8)
    ref = nets[0](x)["a"]
    out = merged(x)
    torch.testing.assert_close(out["a"], ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(out["b"], ref, rtol=0, atol=1e-5)
    single = combination_cost(nets[0]).macs
    head = nets[0].heads["a"].conv.weight.numel()
    assert combination_cost(merged, ("a", "b")).macs == single + head  # one trunk, two heads


@pytest.mark.parametrize("family", ["lenet", "vgg"])
def test_partial_zip_is_honest_wired_and_exact(family: str) -> None:
    nets = nets_for(TRIO, family, seed=7)
    n_layers = len(nets[0].layout)
    fractions = (1.0,) + (0.5,) * (n_layers - 1)
    zipped, _ = MtzMerger(retrain_steps=0, fractions=fractions, progress=False).zip_networks(
        nets, random_data(TRIO, 48, 1)
    )
    merged = zipped.to_multitask()
    merged.check_wiring()
    shape = (1, 1, 8, 8)
    for combo in subsets(list(merged.task_names)):
        assert combination_cost(merged, combo).macs == counted_macs(merged.for_combination(combo), shape), combo
    # Layer 0 zips fully (its input is the shared image); layer 1's zipped neurons read only shared
    # channels, so they are shared channels; from layer 2 on, zipped neurons also read task-specific
    # channels, so every task computes its own copy: no group there serves two tasks.
    assert list(merged.layout[0]) == [7]
    assert any(bin(m).count("1") > 1 for m in merged.layout[1])
    for layer in merged.layout[2:]:
        assert all(bin(m).count("1") == 1 for m in layer)
    # Zipping shares, it never narrows: every task alone costs what its own network cost.
    for net in nets:
        t = net.task_names[0]
        assert combination_cost(merged, (t,)).macs == combination_cost(net).macs
    separate = cost_table(create_merger("separate").merge(nets, None))  # type: ignore[arg-type]
    assert cost_table(merged)["t0+t1+t2"].macs < separate["t0+t1+t2"].macs
    # Computing each distinct (neuron, input value) product once would save at most the shared
    # part of the per-task copies; a single task never has anything to share.
    for combo in subsets(list(merged.task_names)):
        mask = sum(1 << merged.task_names.index(t) for t in combo)
        trunk = combination_cost(merged, combo).macs - sum(merged.heads[t].conv.weight.numel() for t in combo)
        ideal = zipped.distinct_product_macs(mask)
        assert ideal == trunk if len(combo) == 1 else ideal <= trunk
    # The MultitaskNet computes exactly what the zipped network (tied weights) computes per task.
    x = torch.randn(5, 1, 8, 8)
    out = merged(x)
    for i, t in enumerate(TRIO):
        torch.testing.assert_close(out[t.name], zipped.forward_task(x, i), rtol=0, atol=1e-5)


def test_zipping_above_an_unzipped_layer_shares_weights_but_no_computation() -> None:
    nets = nets_for(TWIN, "lenet", seed=11)
    zipped, _ = MtzMerger(retrain_steps=0, fractions=(0.0, 1.0, 0.5), progress=False).zip_networks(
        nets, random_data(TWIN, 32, 3)
    )
    assert [sorted(set(s)) for s in zipped.sets] == [[1, 2], [3], [1, 2, 3]]
    merged = zipped.to_multitask()
    merged.check_wiring()
    assert all(list(layer) == [1, 2] for layer in merged.layout)  # every zipped neuron computed per task
    for combo in subsets(list(merged.task_names)):
        assert combination_cost(merged, combo).macs == counted_macs(merged.for_combination(combo), (1, 1, 8, 8))
    assert cost_table(merged)["a+b"].macs == sum(combination_cost(n).macs for n in nets)
    x = torch.randn(3, 1, 8, 8)
    for i, t in enumerate(TWIN):
        torch.testing.assert_close(merged(x)[t.name], zipped.forward_task(x, i), rtol=0, atol=1e-5)


def test_union_reproduces_each_network_before_zipping() -> None:
    nets = nets_for(TRIO, "vgg", seed=2)
    z = ZippedNet.union(nets).eval()
    x = torch.randn(4, 1, 8, 8)
    for i, net in enumerate(nets):
        torch.testing.assert_close(z.forward_task(x, i), net(x)[TRIO[i].name], rtol=0, atol=1e-5)
    torch.testing.assert_close(z.to_multitask()(x)["t1"], nets[1](x)["t1"], rtol=0, atol=1e-5)


def test_budget_search_and_retraining_are_deterministic(tmp_path) -> None:
    nets = nets_for(TWIN, "lenet", seed=5)
    data = random_data(TWIN, 96, 2)
    a = MtzMerger(retrain_steps=4, search_steps=2, progress=False).merge(nets, data, seed=4)
    b = MtzMerger(retrain_steps=4, search_steps=2, progress=False).merge(nets, data, seed=4)
    assert a.layout == b.layout
    assert a.meta["mtz"]["layers"] == b.meta["mtz"]["layers"]
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        assert torch.equal(va, vb), ka
    for rec in a.meta["mtz"]["layers"]:  # what was kept passed the budget (or zipped nothing)
        kept = [t for t in rec["trials"] if t["pairs"] == rec["zipped"]]
        assert rec["zipped"] == 0 or kept[-1]["ok"]
    from merging.checkpoint import load_model, save_model

    loaded = load_model(save_model(a, tmp_path / "mtz"))  # the search record is plain JSON
    assert loaded.meta["mtz"]["layers"] == a.meta["mtz"]["layers"]
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded(x)["b"], a(x)["b"], rtol=0, atol=0)


def test_a_trial_settled_early_gets_the_verdict_of_the_whole_check_set() -> None:
    """MTZ stops a trial's check once its verdict cannot change; over budgets on both sides of every
    task's accuracy, the verdict is the one the whole set gives, and clear cases look at less of it."""
    from merging.mergers.mtz import trial_verdict
    from merging.train import evaluate

    tasks = [TaskSpec("a", "classes", ("x", "y", "z")), TaskSpec("b", "attributes", ("p", "q"))]
    arch = create_arch("lenet", width_mult=0.5)
    torch.manual_seed(0)
    net = MultitaskNet(tasks, arch, [{3: s.width} for s in arch.layers])  # a hard-shared trunk
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2000, 1, 8, 8, generator=gen)  # 8 evaluation batches
    data = MultitaskData(tuple(tasks), x, {"a": torch.randint(0, 3, (2000,), generator=gen),
                                           "b": torch.randint(0, 2, (2000, 2), generator=gen).float()})
    full = evaluate(net, data)
    names = ["a", "b"]
    looked: list[int] = []
    # 1.0 above the accuracy: exactly on the budget line (within, by ``<=``)
    for ref_a, ref_b in itertools.product([full["a"] + d for d in (-90, -1.5, -0.2, 0.0, 0.3, 1.0, 2, 90)],
                                          [full["b"] + d for d in (-90, -0.7, 0.0, 0.4, 1.0, 90)]):
        ref = {"a": ref_a, "b": ref_b}
        acc, ok, seen = trial_verdict(net, data, ref, 1.0, names)
        assert ok == all(ref[t] - full[t] <= 1.0 for t in names), ref
        if seen == len(data):
            assert acc == full
        looked.append(seen)
    assert min(looked) < len(data) / 2  # far from the budget, a fraction of the set settles it
    assert max(looked) == len(data)  # near it, the whole set is needed
    assert net.training  # the network is put back as it was, after early stops too
    assert all(p.is_contiguous() for p in net.parameters())


def test_bad_options_are_typed_errors() -> None:
    with pytest.raises(MergingError) as e:
        MtzMerger(dampin=0.1)
    assert e.value.code == "bad_option"
    nets = nets_for(TWIN, "lenet", seed=0)
    with pytest.raises(MergingError) as e:
        MtzMerger(fractions=(1.0,), progress=False).merge(nets, random_data(TWIN, 16, 0))
    assert e.value.code == "bad_option"
    assert isinstance(create_merger("mtz"), MtzMerger)


@pytest.mark.slow
def test_real_digits_zip_saves_computation_within_budget() -> None:
    from merging.data import load_dataset
    from merging.train import TrainConfig, evaluate, train_single_task

    torch.set_num_threads(1)
    splits = load_dataset("digits", tasks=("parity", "loop"))
    arch = create_arch("lenet")
    nets = [train_single_task(t, arch, splits.train, TrainConfig(epochs=30, progress=False)) for t in splits.tasks]
    merged = MtzMerger(progress=False).merge(nets, splits.train, seed=0)
    merged.check_wiring()
    info = merged.meta["mtz"]
    for rec in info["layers"]:  # the kept zip passed the budget on the check data
        kept = [t for t in rec["trials"] if t["pairs"] == rec["zipped"]]
        assert rec["zipped"] == 0 or kept[-1]["ok"]
    val = evaluate(merged, splits.val)
    for net in nets:
        t = net.task_names[0]
        assert val[t] >= evaluate(net, splits.val)[t] - 2.0  # 1-point budget on a hold-out, plus val noise
    separate = cost_table(create_merger("separate").merge(nets, None))  # type: ignore[arg-type]
    assert cost_table(merged)["loop+parity"].macs < separate["loop+parity"].macs


# ----------------------------------------------------------------- residual and MobileNetV2 families


def family_nets(family: str, tasks: list[TaskSpec], same: bool = False) -> list[MultitaskNet]:
    """Single-task networks of a tiny residual or MobileNetV2-style architecture (16x16 RGB), with
    non-trivial BN statistics so folding and wrong channels show in the outputs."""
    from tests.test_families import small_arch

    nets = []
    for i, t in enumerate(tasks):
        torch.manual_seed(200 if same else 200 + i)
        net = MultitaskNet.single_task(t, small_arch(family))
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 1.5)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
        nets.append(net.eval())
    return nets


def rgb_data(tasks: list[TaskSpec], n: int, seed: int) -> MultitaskData:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=gen)
    return MultitaskData(tuple(tasks), x, {t.name: torch.randint(0, t.out_dim, (n,), generator=gen) for t in tasks})


def unit_layers(net: MultitaskNet) -> list[tuple[int, ...]]:
    return [tuple(k.layer for k in u) for u in net.graph().units()]


FAMILIES = ["resnet", "mobilenetv2"]
LIGHT = {"check_shift": 0, "calibration_size": 16, "progress": False}  # seconds on a busy machine


@pytest.mark.parametrize("family", FAMILIES)
def test_zipping_nothing_on_a_graph_family_reproduces_every_network(family: str) -> None:
    nets = family_nets(family, TWIN)
    fractions = (0.0,) * len(unit_layers(nets[0]))
    merged = MtzMerger(retrain_steps=0, fractions=fractions, **LIGHT).merge(nets, rgb_data(TWIN, 16, 0))
    merged.check_wiring()
    assert merged.layout == [{1: s.width, 2: s.width} for s in nets[0].arch.layers]
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        out = merged(x)
        for net in nets:
            (t,) = net.task_names
            torch.testing.assert_close(out[t], net(x)[t], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_partial_zip_on_a_graph_family_is_exact_and_each_unit_one_layout(family: str) -> None:
    nets = family_nets(family, TRIO)
    units = unit_layers(nets[0])
    half = len(units) // 2  # the first units zip fully (shared computation), the rest half their pairs
    fractions = (1.0,) * half + (0.5,) * (len(units) - half)
    zipped, info = MtzMerger(retrain_steps=0, fractions=fractions, **LIGHT).zip_networks(nets, rgb_data(TRIO, 16, 1))
    assert [r["members"] for r in info["layers"]] == [list(u) for u in units] * 2  # two zipping steps
    merged = zipped.to_multitask()
    merged.check_wiring()
    for unit in units:  # a zip moves a channel in every member: one set per neuron, one layout
        assert all(zipped.sets[l] == zipped.sets[unit[0]] for l in unit), unit
        assert all(merged.layout[l] == merged.layout[unit[0]] for l in unit), unit
    masks = {m for layer in merged.layout for m in layer}
    assert 7 in masks and masks & {1, 2, 4}  # some channels shared by all three tasks, some per task
    shape = (1, 3, 16, 16)
    for combo in subsets(list(merged.task_names)):
        assert combination_cost(merged, combo).macs == counted_macs(merged.for_combination(combo), shape), combo
    for net in nets:  # zipping shares, it never narrows a task
        t = net.task_names[0]
        assert combination_cost(merged, (t,)).macs == combination_cost(net).macs
    separate = cost_table(create_merger("separate").merge(nets, None))  # type: ignore[arg-type]
    assert cost_table(merged)["t0+t1+t2"].macs < separate["t0+t1+t2"].macs
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        out = merged(x)
        for i, t in enumerate(TRIO):  # the MultitaskNet computes what the zipped network (tied weights) does
            torch.testing.assert_close(out[t.name], zipped.forward_task(x, i), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_zipping_two_copies_of_a_graph_family_gives_one_trunk(family: str) -> None:
    # Units form cycles here (a residual stage's unit holds each block's second conv, which reads
    # the block's first conv, zipped later): the rows zipped first take the mean of both sides'
    # weights on inputs zipped after them, which for two copies is each copy's weight.
    nets = family_nets(family, TWIN, same=True)
    merged = MtzMerger(retrain_steps=0, **LIGHT).merge(nets, rgb_data(TWIN, 16, 2))
    merged.check_wiring()
    assert merged.layout == [{3: s.width} for s in nets[0].arch.layers]
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref, out = nets[0](x)["a"], merged(x)
    torch.testing.assert_close(out["a"], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["b"], ref, rtol=1e-5, atol=1e-5)
    head = nets[0].heads["a"].conv.weight.numel()
    assert combination_cost(merged, ("a", "b")).macs == combination_cost(nets[0]).macs + head
    assert combination_cost(merged, ("a", "b")).macs == counted_macs(merged.for_combination(("a", "b")), (1, 3, 16, 16))


def test_budget_search_with_retraining_runs_on_mobilenetv2() -> None:
    nets = family_nets("mobilenetv2", TWIN)
    merged = MtzMerger(retrain_steps=2, search_steps=1, batch_size=8, **LIGHT).merge(
        nets, rgb_data(TWIN, 24, 3), seed=1
    )
    merged.check_wiring()
    for rec in merged.meta["mtz"]["layers"]:
        kept = [t for t in rec["trials"] if t["pairs"] == rec["zipped"]]
        assert rec["zipped"] == 0 or kept[-1]["ok"]
    for combo in subsets(list(merged.task_names)):
        assert combination_cost(merged, combo).macs == counted_macs(merged.for_combination(combo), (1, 3, 16, 16))
