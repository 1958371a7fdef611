"""The never-dearer rule: a pruned merge that costs more than the separately pruned networks on a
combination of two or more tasks is not shipped; one that is no dearer is."""

from __future__ import annotations

from merging.arch import create_arch
from merging.cost import cost_table
from merging.mergers import create_merger
from merging.network import MultitaskNet
from merging.pipeline import MergePruneResult, dearer_than, never_dearer
from merging.tasks import TaskSpec

TASKS = tuple(TaskSpec(n, "classes", ("a", "b")) for n in ("x", "y", "z"))


def _separate(width_mult: float) -> MultitaskNet:
    arch = create_arch("lenet", width_mult=width_mult)
    return create_merger("separate").merge([MultitaskNet.single_task(t, arch) for t in TASKS], None)


def _result(net: MultitaskNet) -> MergePruneResult:
    return MergePruneResult(net, net, [], cost_table(net), [{"merger": "pam", "options": {}, "missed_budget": False}],
                            chose="pam")


def test_a_dearer_merge_is_replaced_by_the_separate_networks_and_says_why() -> None:
    wide, narrow = _separate(1.0), _separate(0.5)
    dearer = dearer_than(wide, narrow)
    table_w, table_n = cost_table(wide), cost_table(narrow)
    assert {c for c, _, _ in dearer} == {c for c in table_w if "+" in c}  # singles are not judged
    assert all(m == table_w[c].macs and b == table_n[c].macs for c, m, b in dearer)
    shipped = never_dearer(_result(wide), narrow)
    assert cost_table(shipped.pruned) == table_n
    assert shipped.chose.startswith("separate (pam pruned costs more") and "4 combination(s)" in shipped.chose
    assert shipped.attempts[-1]["dearer_than_separate"]


def test_a_merge_no_dearer_is_shipped() -> None:
    narrow, wide = _separate(0.5), _separate(1.0)
    shipped = never_dearer(_result(narrow), wide)
    assert shipped.pruned is narrow and shipped.chose == "pam"
    assert shipped.attempts[-1]["dearer_than_separate"] == []


def test_a_route_that_missed_the_budget_ships_the_separate_networks() -> None:
    narrow, wide = _separate(0.5), _separate(1.0)
    missed = _result(wide)
    missed.history.append({"kind": "stop", "reason": "start network misses the budget; not pruned"})
    shipped = never_dearer(missed, narrow)
    assert cost_table(shipped.pruned) == cost_table(narrow) and "missed the budget" in shipped.chose


def test_the_ladders_own_separate_rung_is_compared_too() -> None:
    narrow, wide = _separate(0.5), _separate(1.0)
    result = _result(wide)
    result.attempts[-1]["merger"] = "separate"  # the ladder fell back to keeping the unpruned networks apart
    shipped = never_dearer(result, narrow)
    assert cost_table(shipped.pruned) == cost_table(narrow)


def test_compress_prunes_route_specialist_and_each_task_with_one_schedule_and_the_routes_budget() -> None:
    from dataclasses import replace

    from merging.pruning import PruneConfig
    from pam_app.bench.schedule import FAST_PRUNE, SCHEDULE_FIELDS
    from pam_app.compress import route_jobs
    from tests.conftest import random_net

    cfg = replace(FAST_PRUNE, budget=2.5, seed=7, epoch_samples=500)
    nets = [random_net("lenet", 1, seed=s) for s in (1, 2)]
    jobs = route_jobs("pam+regroup", nets, None, cfg, {}, 3, 7, with_specialist=True)  # type: ignore[arg-type]
    route, spec, *alone = jobs
    assert route[4].removes == "pairs" and spec[3].removes == "channels"
    configs: list[PruneConfig] = [route[4], spec[3], *(job[3] for job in alone)]
    assert len(configs) == 4
    for c in configs:  # a route pruned more weakly than what it is compared with would lose for that reason
        assert {f: getattr(c, f) for f in SCHEDULE_FIELDS} == {f: getattr(cfg, f) for f in SCHEDULE_FIELDS}
        assert (c.budget, c.seed, c.epoch_samples) == (2.5, 7, 500)
    assert all(job[3].removes == "channels" for job in alone)


def test_bench_prunes_routes_specialists_and_the_baseline_with_one_schedule_by_default() -> None:
    from pam_app.bench.schedule import FAST_PRUNE, SCHEDULE_FIELDS, BenchConfig

    cfg = BenchConfig()
    routes, alone = ({f: getattr(c, f) for f in SCHEDULE_FIELDS} for c in (cfg.prune, cfg.alone_prune))
    assert routes == alone
    assert cfg.prune != FAST_PRUNE  # the fast schedule is weaker than the baseline's; only on request
