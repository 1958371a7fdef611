"""The pruner's strategies: criteria, price rules and the step schedule, named by the config's strings."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch_pruning as tp
from torch import Tensor

from merging.errors import MergingError
from merging.pruning import PruneConfig, prune, prune_step
from merging.pruning.criteria import CRITERIA, Criterion, Term, criterion_of
from merging.pruning.importance import ChannelScores, score_channels
from merging.pruning.prices import PRICES, PriceRule, price_rule_of
from merging.pruning.schedule import HalvingSchedule, ReboundSchedule, schedule_of
from tests.test_families import random_family_net, random_labelled


@pytest.fixture(scope="module")
def mobilenet():  # type: ignore[no-untyped-def]
    net = random_family_net("mobilenetv2", 3, seed=6)
    return net, random_labelled(net, 64)


def _by_layer(scores: list[ChannelScores]) -> dict[int, Tensor]:
    return {l: torch.cat([s.importance for s in scores if s.layer == l]) for l in {s.layer for s in scores}}


def test_each_term_is_normalised_to_mean_one_over_its_layer(mobilenet) -> None:  # type: ignore[no-untyped-def]
    net, data = mobilenet
    for name in ("taylor", "magnitude"):
        layers = _by_layer(score_channels(net, data, PruneConfig(taylor_batches=1, criterion=name)))
        live = {l: imp for l, imp in layers.items() if imp.any()}  # a layer of dead ReLUs has no gradient
        assert len(live) >= len(layers) - 1, name
        for l, imp in live.items():
            assert float(imp.mean()) == pytest.approx(1.0, rel=1e-5), (name, l)


def test_taylor_plus_magnitude_is_the_weighted_sum_of_the_two(mobilenet) -> None:  # type: ignore[no-untyped-def]
    net, data = mobilenet
    both, taylor, magnitude = (
        score_channels(net, data, PruneConfig(taylor_batches=1, magnitude_weight=0.4, criterion=c))
        for c in ("taylor+magnitude", "taylor", "magnitude")
    )
    assert (
        [(s.layer, s.mask) for s in both]
        == [(s.layer, s.mask) for s in taylor]
        == [(s.layer, s.mask) for s in magnitude]
    )
    for b, t, m in zip(both, taylor, magnitude, strict=True):
        torch.testing.assert_close(b.importance, t.importance + 0.4 * m.importance)
    assert any(not torch.equal(t.importance, m.importance) for t, m in zip(taylor, magnitude, strict=True))


class Ones(Term):
    """A criterion with no preference (a stand-in for a new one)."""

    def __call__(self, group: tp.Group) -> Tensor:
        return torch.ones(len(group[0].idxs))


def test_a_new_criterion_is_one_class_and_one_registry_line(mobilenet, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    net, data = mobilenet
    monkeypatch.setitem(CRITERIA, "ones", lambda cfg: Criterion(((Ones(), 1.0),)))
    scores = score_channels(net, data, PruneConfig(criterion="ones"))
    assert {(s.layer, s.mask): s.importance.numel() for s in scores} == {
        (u[0].layer, u[0].mask): net.group_width(u[0].layer, u[0].mask) for u in net.graph().units()
    }
    assert all(torch.equal(s.importance, torch.ones_like(s.importance)) for s in scores)
    assert not criterion_of(PruneConfig(criterion="ones")).needs_gradients
    assert criterion_of(PruneConfig()).needs_gradients


def _scores() -> list[ChannelScores]:
    def sc(layer: int, mask: int, cost: float, share: float) -> ChannelScores:
        return ChannelScores(layer, mask, torch.ones(2), torch.full((2,), cost), torch.full((2,), share))

    return [sc(0, 3, 30.0, 1.0), sc(0, 1, 10.0, 0.5), sc(1, 3, 20.0, 1.0)]


def test_price_rules() -> None:
    scores = _scores()
    share, macs, none = (PRICES[n]() for n in ("share", "macs", "none"))

    def prices(rule: PriceRule) -> Tensor:
        return torch.cat([rule(sc, scores) for sc in scores])

    # share: relative to the layer's mean share (layer 0: 0.75; layer 1: 1.0)
    torch.testing.assert_close(prices(share), torch.tensor([4 / 3, 4 / 3, 2 / 3, 2 / 3, 1.0, 1.0]))
    # macs: relative to the mean channel's expected MACs over every layer (20)
    torch.testing.assert_close(prices(macs), torch.tensor([1.5, 1.5, 0.5, 0.5, 1.0, 1.0]))
    torch.testing.assert_close(prices(none), torch.ones(6))


def test_unknown_names_are_refused_before_any_work() -> None:
    for bad, resolve in ((PruneConfig(criterion="entropy"), criterion_of), (PruneConfig(price="gold"), price_rule_of)):
        with pytest.raises(MergingError) as e:
            prune(None, None, bad)  # type: ignore[arg-type]  # refused before the network is looked at
        assert e.value.code == "bad_argument"
        with pytest.raises(MergingError):
            resolve(bad)


def test_prune_step_refuses_an_unknown_price_before_cutting(mobilenet) -> None:  # type: ignore[no-untyped-def]
    net, data = mobilenet
    layout = [dict(g) for g in net.layout]
    with pytest.raises(MergingError):
        prune_step(net, data, PruneConfig(price="gold"), 0.3)
    assert net.layout == layout


def test_the_schedule_halves_after_a_rejection_and_restarts_at_full_step() -> None:
    s = HalvingSchedule.from_config(PruneConfig(step=0.1, min_step=0.02, max_steps=7))
    assert s.size == 0.1 and len(s.steps()) == 7
    assert [(s.rejected(), s.size) for _ in range(3)] == [(True, 0.05), (True, 0.025), (False, 0.0125)]
    s.restart()
    assert s.size == 0.1


def test_the_rebound_schedule_grows_back_after_an_acceptance_so_only_rejections_in_a_row_stop() -> None:
    s = schedule_of(PruneConfig(step=0.16, min_step=0.04, max_steps=9, schedule="rebound"))
    assert isinstance(s, ReboundSchedule)
    s.rejected(), s.rejected()  # 0.08, 0.04
    s.accepted()
    assert s.size == 0.08
    s.accepted(), s.accepted()
    assert s.size == 0.16  # never above the start
    assert [s.rejected() for _ in range(3)] == [True, True, False]
    h = schedule_of(PruneConfig(step=0.16, min_step=0.04))
    h.rejected(), h.accepted()
    assert h.size == 0.08  # halving never grows back
    with pytest.raises(MergingError):
        schedule_of(PruneConfig(schedule="fibonacci"))


def test_what_a_step_removes_is_named_by_the_config_and_a_route_names_it() -> None:
    from merging.pipeline import split_route
    from merging.pruning.regroup import regroup_step
    from merging.pruning.steps import step_of

    assert step_of(PruneConfig()) is prune_step
    assert step_of(replace(PruneConfig(), removes=split_route("pam+regroup")[1])) is regroup_step
    assert split_route("mtz") == ("mtz", "channels")
    with pytest.raises(MergingError):
        step_of(PruneConfig(removes="filters"))
