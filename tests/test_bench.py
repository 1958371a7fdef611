"""``pam bench`` on a tiny configuration: rows, ratios, limit and efficiency are consistent; files written."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from merging.errors import MergingError
from merging.pruning import PruneConfig
from merging.references import TpSchedule
from merging.tasks import all_combinations
from pam_app.bench.files import write_results
from pam_app.bench.rows import wilson
from pam_app.bench.schedule import ALONE, SPEC, BenchConfig, quick_config
from pam_app.bench.seed import run_bench


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("bench")
    pc = PruneConfig(step=0.3, max_steps=1, finetune_epochs=1, retry_epochs=0, recover_epochs=1, recover_rounds=1,
                     final_epochs=0, taylor_batches=1, check_shifts=1, progress=False, confidence=0.5)
    cfg = BenchConfig(dataset="digits", tasks=("parity", "loop"), mergers=("pam", "separate"), seeds=(0,),
                      zoo_epochs=3, prune=pc, alone_prune=pc, out_dir=out, progress=False, width_grid=(0.5, 1.0),
                      tp_schedule=TpSchedule(iterative_steps=2, finetune_epochs=1, retry_epochs=0),
                      save_models=out / "models")
    rows = run_bench(cfg, log=lambda _: None)
    return rows, out


def test_saved_networks_are_the_ones_the_rows_measure(bench) -> None:  # type: ignore[no-untyped-def]
    from merging.checkpoint import load_model
    from merging.cost import cost_table

    rows, out = bench
    for merger in ("pam", "separate"):
        net = load_model(out / "models" / f"seed0-{merger}.json")
        want = {r["combination"]: r["macs"] for r in rows if r["merger"] == merger and r["seed"] == 0}
        assert {c: k.macs for c, k in cost_table(net).items()} == want
        assert net.meta["preprocessing"]["size"] == [8, 8]


def test_rows_cover_every_merger_and_combination(bench) -> None:  # type: ignore[no-untyped-def]
    rows, out = bench
    combos = {"+".join(c) for c in all_combinations(["parity", "loop"])}
    for merger in ("separate", "pam"):
        for seed in (0, "median"):
            got = {r["combination"] for r in rows if r["merger"] == merger and r["seed"] == seed}
            assert got == combos
    assert json.loads((out / "bench-digits.json").read_text()) == rows
    assert (out / "bench-digits.md").read_text().startswith("# Benchmark: digits")
    assert (out / "bench-digits.png").read_bytes()[:4] == b"\x89PNG"


def test_ratios_limit_and_efficiency(bench) -> None:  # type: ignore[no-untyped-def]
    rows, _ = bench
    by = {(r["merger"], r["combination"]): r for r in rows if r["seed"] == 0 and r["merger"] != ALONE}
    for (_, combo), r in by.items():
        assert r["ratio_to_pam"] == pytest.approx(r["macs"] / by[("pam", combo)]["macs"])
        assert r["limit"] == max(by[("separate", t)]["macs"] for t in combo.split("+"))
        assert set(r["accuracy"]) == set(combo.split("+"))
    both = "loop+parity"
    pam = by[("pam", both)]
    assert pam["sharing_efficiency"] == pytest.approx(pam["macs"] / pam["limit"])
    # separate: a combination costs the sum of its tasks' costs (no sharing at all).
    assert by[("separate", both)]["macs"] == by[("separate", "loop")]["macs"] + by[("separate", "parity")]["macs"]


def test_rows_carry_c_alone_c_spec_and_their_ratios(bench) -> None:  # type: ignore[no-untyped-def]
    rows, _ = bench
    seed0 = [r for r in rows if r["seed"] == 0]
    alone = {r["combination"]: r for r in seed0 if r["merger"] == ALONE}
    spec = {r["combination"]: r for r in seed0 if r["merger"] == SPEC}
    assert set(alone) == {"parity", "loop"}
    for t, a in alone.items():
        routes = {k: v for k, v in a["routes"].items() if v is not None}
        assert a["c_alone"] == min(routes.values()) and a["routes"][a["best_route"]] == a["c_alone"]
        assert spec[t]["macs"] == a["c_alone"]  # c_spec(t) = c_alone(t)
        # the width grid's job ran after the other routes, capped at their best (the cap it received)
        assert a["grid_cap"] == min(v for k, v in routes.items() if k != "width-grid")
        assert a["routes"]["width-grid"] is None or a["routes"]["width-grid"] <= a["grid_cap"]
        assert a["grid_stopped"] == (a["routes"]["width-grid"] is None and a["grid_cap"] < 198_336)  # 1.0 width
    for r in seed0:
        if r["merger"] in (ALONE, SPEC) or r["combination"] not in spec:
            continue
        assert r["c_spec"] == spec[r["combination"]]["macs"]
        assert r["ratio_to_spec"] == pytest.approx(r["macs"] / r["c_spec"])
    med = [r for r in rows if r["seed"] == "median" and r["merger"] == "pam" and r["combination"] == "parity"]
    assert med and med[0]["ratio_to_spec"] == pytest.approx(
        next(r["ratio_to_spec"] for r in seed0 if r["merger"] == "pam" and r["combination"] == "parity"))


def test_wilson_interval_matches_the_textbook_value() -> None:
    lo, hi = wilson(90, 100)  # 90/100: Wilson 95% interval 82.6%-94.5% (Newcombe 1998)
    assert lo == pytest.approx(82.56, abs=0.02) and hi == pytest.approx(94.48, abs=0.02)


def test_unknown_merger_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(MergingError):
        run_bench(replace(quick_config("digits"), mergers=("nope",), out_dir=tmp_path), log=lambda _: None)


def test_combine_merges_runs_of_distinct_seeds(bench, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from pam_app.bench.files import combine

    rows, out = bench
    other = tmp_path / "other"
    other.mkdir()
    shifted = [dict(r, seed=1, macs=r["macs"] * 3) for r in rows if r["seed"] == 0]
    (other / "bench-digits.json").write_text(json.dumps(shifted))
    meta = json.loads((out / "bench-digits.config.json").read_text())
    meta["config"]["seeds"] = [1]
    (other / "bench-digits.config.json").write_text(json.dumps(meta))
    merged = combine([out / "bench-digits.json", other / "bench-digits.json"], tmp_path / "both")
    med = next(r for r in merged if r["seed"] == "median" and r["merger"] == "pam" and r["combination"] == "parity")
    one = next(r for r in rows if r["seed"] == 0 and r["merger"] == "pam" and r["combination"] == "parity")
    assert med["seeds"] == 2 and med["macs"] == pytest.approx(2 * one["macs"])  # median of x and 3x
    with pytest.raises(MergingError):
        combine([out / "bench-digits.json", out / "bench-digits.json"], tmp_path / "dup")


def test_result_files_of_a_family_carry_its_name_and_width() -> None:
    cfg = replace(quick_config("scenes"), arch="mobilenetv2", width_mult=0.25)
    assert cfg.stem == "bench-scenes-mobilenetv2-w0.25" and quick_config("digits").stem == "bench-digits"


def test_result_files_carry_the_width_in_their_name(bench, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rows, _ = bench
    cfg = BenchConfig(dataset="digits", tasks=("parity", "loop"), seeds=(0,), width_mult=0.25, out_dir=tmp_path)
    write_results(cfg, rows, ["separate", "pam"], 1.0)  # the width is part of the name, not a suffix to replace
    assert {p.name for p in tmp_path.iterdir()} == {f"bench-digits-lenet-w0.25{s}" for s in
                                                    (".json", ".md", ".png", ".config.json")}


def test_a_recorded_config_from_before_removes_still_reads() -> None:
    from pam_app.bench.files import recorded_prune_config

    recorded = json.loads(Path("results/bench-digits.config.json").read_text())["config"]["prune"]
    assert recorded_prune_config(recorded).removes == "channels"
    assert recorded_prune_config({**recorded, "regroup": True}).removes == "pairs"


def test_a_run_cut_after_a_seed_keeps_that_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each finished seed is written as a run of the seeds so far, so a run killed later loses only the seed
    under way; the files read as that shorter run (its config names only the finished seeds)."""
    import pam_app.bench.seed as seed_mod

    real = seed_mod.run_seed

    def first_only(cfg, splits, seed, mergers, log):  # type: ignore[no-untyped-def]
        if seed == 1:
            raise KeyboardInterrupt  # the run is cut while seed 1 is under way
        return real(cfg, splits, seed, mergers, log)

    monkeypatch.setattr(seed_mod, "run_seed", first_only)
    pc = PruneConfig(step=0.3, max_steps=1, finetune_epochs=1, retry_epochs=0, recover_epochs=1, recover_rounds=1,
                     final_epochs=0, taylor_batches=1, check_shifts=1, progress=False, confidence=0.5)
    cfg = BenchConfig(dataset="digits", tasks=("parity", "loop"), mergers=("separate",), seeds=(0, 1),
                      zoo_epochs=2, prune=pc, alone_prune=pc, out_dir=tmp_path, progress=False, width_grid=(1.0,),
                      routes=("project",), spec_sizes=(1,))
    with pytest.raises(KeyboardInterrupt):
        run_bench(cfg, log=lambda _: None)
    rows = json.loads((tmp_path / "bench-digits.json").read_text())
    assert {r["seed"] for r in rows if r.get("seed") != "median"} == {0}
    assert json.loads((tmp_path / "bench-digits.config.json").read_text())["config"]["seeds"] == [0]
    assert "seeds [0]" in (tmp_path / "bench-digits.md").read_text()


def test_own_networks_count_and_rate_combinations_against_separate() -> None:
    from pam_app.bench.rows import own_networks

    sep = {"a": 10, "b": 20, "a+b": 30, "a+b+c": 40}
    own = {"a": 12, "b": 9, "a+b": 33, "a+b+c": 36}  # dearer on a+b (1.10x), cheaper on a+b+c; singles ignored
    rows = [{"seed": 0, "merger": "separate", "combination": c, "macs": m} for c, m in sep.items()]
    rows += [{"seed": 0, "merger": "pam", "combination": c, "macs": m, "own_macs": own, "shipped": "separate (dearer)"}
             for c, m in sep.items()]
    got = own_networks(rows)["pam"]
    assert (got["dearer"], got["cheaper"], got["multi"], got["shipped"]) == ([1], [1], 2, 0)
    assert got["worst"] == [pytest.approx(1.1)]
    assert got["all_macs"] == 36
