"""The multitask network: groups, the wiring rule, per-combination modules, surgery, persistence."""

from __future__ import annotations

import pytest
import torch

from merging.arch import create_arch
from merging.errors import MergingError
from merging.graph import GroupKey
from merging.network import MultitaskNet
from merging.tasks import canonical_combination
from tests.conftest import make_tasks, random_net, subsets


def test_combination_outputs_agree_with_the_full_network_for_shared_tasks() -> None:
    net = random_net("vgg", 3, seed=3)
    x = torch.randn(4, 1, 8, 8)
    full = net(x)
    for combo in subsets(list(net.task_names)):
        part = net(x, combo)
        assert list(part) == sorted(combo)
        for t in combo:
            torch.testing.assert_close(part[t], full[t], rtol=0, atol=0)


def test_combination_module_shares_storage_and_exports() -> None:
    net = random_net("lenet", 3, seed=5)
    mod = net.for_combination("t2,t0,t0")
    assert mod.combination == ("t0", "t2")
    own = {p.data_ptr() for p in net.parameters()}
    ptrs = [p.data_ptr() for p in mod.parameters()]
    assert ptrs and all(p in own for p in ptrs)
    x = torch.randn(2, 1, 8, 8)
    outs = mod(x)
    ref = net(x, ("t0", "t2"))
    torch.testing.assert_close(outs[0], ref["t0"])
    torch.testing.assert_close(outs[1], ref["t2"])
    ep = torch.export.export(mod, (x,))
    got = ep.module()(x)
    torch.testing.assert_close(got[1], ref["t2"])


def test_combination_runs_only_groups_whose_set_meets_it() -> None:
    net = random_net("lenet", 3, seed=11)
    for combo in subsets(list(net.task_names)):
        cmask = sum(1 << net.task_names.index(t) for t in combo)
        keys = {s.key for s in net.plan(combo) if not s.head}
        expected = {GroupKey(l, m).name for l, g in enumerate(net.layout) for m in g if m & cmask}
        assert keys == expected


def test_wiring_rule_is_a_typed_error() -> None:
    arch = create_arch("lenet")
    tasks = make_tasks(2)
    layout = [{1: 4, 2: 4, 3: 4}, {1: 4, 3: 4}, {1: 2, 2: 2}]
    ok = MultitaskNet(tasks, arch, layout)
    assert ok.reads[(1, 1)] == (1, 3)  # {t0} reads {t0} and {t0,t1}, never {t1}
    with pytest.raises(MergingError) as e:
        MultitaskNet(tasks, arch, layout, reads={(1, 1): [2]})  # {t0} reading {t1}
    assert e.value.code == "wiring"
    with pytest.raises(MergingError) as e:
        MultitaskNet(tasks, arch, [{1: 4}, {2: 4}, {1: 2, 2: 2}])  # {t1} at layer 1 has nothing to read
    assert e.value.code == "wiring"


def test_zero_width_groups_vanish_and_surgery_keeps_function() -> None:
    torch.manual_seed(0)
    net = random_net("vgg", 3, seed=2)
    x = torch.randn(3, 1, 8, 8)
    # Zero every outgoing weight of some channels, then select them away: outputs must not change.
    l, mask = next((l, m) for l, g in enumerate(net.layout[:-1]) for m, w in g.items() if w >= 2)
    width = net.group_width(l, mask)
    drop = [0]
    with torch.no_grad():
        for r in net.graph().readers(GroupKey(l, mask)):
            net.conv_of(r.node.key).weight[:, r.offset + drop[0]] = 0
    before = net(x)
    net.select_channels(l, mask, [i for i in range(width) if i not in drop])
    net.check_wiring()
    after = net(x)
    for t in before:
        torch.testing.assert_close(after[t], before[t], rtol=1e-5, atol=1e-6)
    # A whole group removed: it disappears from the layout and every combination still runs.
    net.select_channels(l, mask, [])
    assert net.group_width(l, mask) == 0 and GroupKey(l, mask).name not in net.blocks
    net.check_wiring()
    for combo in subsets(list(net.task_names)):
        out = net(x, combo)
        assert all(torch.isfinite(v).all() for v in out.values())
    # A layout that asks for a zero-width group builds without it.
    arch = create_arch("lenet")
    z = MultitaskNet(make_tasks(2), arch, [{1: 0, 3: 4}, {3: 4}, {1: 2, 2: 0, 3: 1}])
    assert 1 not in z.layout[0] and 2 not in z.layout[2]


def test_removing_a_task_s_last_input_is_refused() -> None:
    net = MultitaskNet(make_tasks(2), create_arch("lenet"), [{3: 4}, {3: 4}, {1: 2, 3: 2}])
    net.select_channels(2, 1, [])  # t0 still reads {t0,t1}: fine
    with pytest.raises(MergingError) as e:
        net.select_channels(2, 3, [])  # now both heads would have nothing to read
    assert e.value.code == "empty_task"
    net.check_wiring()


def test_config_round_trip_preserves_structure_and_outputs() -> None:
    net = random_net("vgg", 3, seed=9)
    net.select_channels(1, max(net.layout[1]), [0])
    clone = MultitaskNet.from_config(net.config())
    clone.load_state_dict(net.state_dict())
    clone.eval()
    x = torch.randn(2, 1, 8, 8)
    for t, v in net(x).items():
        torch.testing.assert_close(clone(x)[t], v)


def test_combination_names_are_normalised_and_validated() -> None:
    known = ("digit", "parity", "loop")
    assert canonical_combination("parity,digit,parity", known) == ("digit", "parity")
    assert canonical_combination(["loop", "digit"], known) == ("digit", "loop")
    for bad, code in (("", "empty_combination"), (",", "empty_combination"), ("age", "unknown_task")):
        with pytest.raises(MergingError) as e:
            canonical_combination(bad, known)
        assert e.value.code == code
    net = random_net("lenet", 2)
    with pytest.raises(MergingError):
        net(torch.zeros(1, 1, 8, 8), "nope")
