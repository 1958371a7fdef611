"""Issue 13: lowering over several processes gives the program ExecuTorch itself would build,
library noise stays off the terminal, ``--combinations-from`` picks what an app asks for, and the
demo-like network exports every combination. Issue 20: methods cut out of one converted base
program still lower to those bytes."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from merging.checkpoint import save_model
from merging.tasks import all_combinations
from mobile_export.capture import export_method
from mobile_export.demand import most_requested, read_counts, select_combinations
from mobile_export.errors import ExportError
from mobile_export.export import ExportConfig, export_bundle
from mobile_export.lowering import lower_methods, lower_serial, merge_methods
from mobile_export.manifest import Manifest
from mobile_export.runtime import BundleRuntime
from tests.test_export_fixtures import lenet_net, pruned, scratch, vgg_net


def _run_all(pte: bytes, names: list[str], x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    from executorch.runtime import Runtime

    prog = Runtime.get().load_program(pte)
    return {n: [o.clone() for o in prog.load_method(n).execute([x])] for n in names}


@pytest.mark.slow  # lowers the bundle twice (~1 min); opt-in feature
def test_parallel_lowering_gives_the_serial_program_byte_for_byte() -> None:
    net = pruned(lenet_net(seed=5))  # a removed group, so methods differ in structure
    combos = [("b", "c"), ("a",)]  # not in sorted order: the merge must sort plans as ExecuTorch does
    names = ["+".join(c) for c in combos]
    programs = {"+".join(c): export_method(net, c, 4) for c in combos}
    serial = lower_serial(programs)  # ExecuTorch's own one-call lowering
    methods = lower_methods(net, combos, 4, workers=2)  # this process + one worker
    assert [m.name for m in methods] == names  # request order, whoever lowered them
    parallel = merge_methods(methods)
    assert parallel == serial
    with pytest.raises(ValueError, match="duplicate"):
        merge_methods([methods[0], methods[0]])
    # and method for method through the runtime (what a device sees), at batch 1 and the maximum
    for batch in (1, 4):
        x = torch.randn(batch, 1, 16, 16, generator=torch.Generator().manual_seed(batch))
        got, want = _run_all(parallel, names, x), _run_all(serial, names, x)
        for n, c in zip(names, combos, strict=True):
            eager = net(x, c)
            for task, g, w in zip(c, got[n], want[n], strict=True):
                torch.testing.assert_close(g, w, atol=0, rtol=0)
                torch.testing.assert_close(g, eager[task], atol=1e-4, rtol=0)


@pytest.mark.slow  # lowers every method twice (~50 s); the default suite checks every sliced method against eager
def test_methods_cut_from_the_base_keep_their_own_state_byte_for_byte() -> None:
    """BatchNorm buffers (the unused batch counter too) of the groups a method runs stay, the other
    groups' go, and the debug handles are renumbered: each method cut out of the (a, b, c) base
    lowers to the bytes ExecuTorch gives the method exported alone."""
    net = pruned(vgg_net())  # BatchNorm after every conv; the first layer's {b} group removed
    combos = [("b",), ("a", "c")]
    serial = lower_serial({"+".join(c): export_method(net, c, 4) for c in combos})
    assert merge_methods(lower_methods(net, combos, 4, workers=1)) == serial


def test_library_noise_goes_to_the_log_not_the_terminal(capfd: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import mobile_export.lowering as low

    real = low.lower_method

    def noisy(*args: object, **kwargs: object) -> object:  # what torchao / cpuinfo / torch do
        os.write(2, b"Failed to load /x/_C_cutlass_90a.abi3.so: noise from C\n")
        warnings.warn("some API is deprecated", DeprecationWarning, stacklevel=1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(low, "lower_method", noisy)
    out = scratch("quiet") / "b"
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        export_bundle(lenet_net(), out, ExportConfig(combinations=["a"], max_batch=2, workers=1), log=print)
    err = capfd.readouterr().err
    assert "noise from C" not in err and "deprecated" not in err
    log = (out / "export.log").read_text()
    assert "noise from C" in log and "some API is deprecated" in log
    assert not (out.parent / ".b.export.log").exists()  # moved into the bundle
    assert "--lite" in Manifest.load(out).lite_status and not (out / "model.ptl").exists()
    phases = json.loads((out / "report.json").read_text())["phases"]
    assert {"lower", "serialize", "verify"} <= set(phases) and phases["lower"]["items"] == 1


# ------------------------------------------------------------------ --combinations-from
PROMETHEUS = """# HELP pam_requests_total Inference requests, by combination and HTTP status
# TYPE pam_requests_total counter
pam_requests_total{combination="a+b",status="200"} 40.0
pam_requests_total{combination="a+b",status="503"} 5.0
pam_requests_total{combination="b+c",status="404"} 30.0
pam_requests_total{combination="a",status="200"} 12.0
pam_requests_total{combination="a+b+c",status="200"} 2.0
pam_requests_total{combination="none",status="400"} 99.0
# HELP pam_requests_created Inference requests, by combination and HTTP status
pam_requests_created{combination="a+b",status="200"} 1.7e+09
pam_request_duration_seconds_count{combination="c",status="200"} 1000.0
"""


def _log_line(combination: str | None, status: int = 200) -> str:
    return json.dumps({"ts": "2026-11-30T16:00:00.000Z", "level": "info", "logger": "pam.request", "msg": "request",
                       "request_id": "x", "http_method": "POST", "path": "/infer", "status": status,
                       "combination": combination, "method": combination, "batch": 1, "error": None,
                       "timings_ms": {"server_total": 1.0}})


def test_request_counts_from_metrics_logs_and_lists() -> None:
    d = scratch("demand")
    (d / "metrics.txt").write_text(PROMETHEUS)
    counts, fmt = read_counts(d / "metrics.txt")
    assert fmt == "prometheus"
    assert counts == {"a+b": 45.0, "b+c": 30.0, "a": 12.0, "a+b+c": 2.0}  # statuses summed, "none" skipped
    lines = [_log_line("b+c")] * 3 + [_log_line("a+c")] * 5 + [_log_line(None, 413), "INFO: uvicorn started"]
    (d / "log.jsonl").write_text("\n".join(lines) + "\n")
    counts, fmt = read_counts(d / "log.jsonl")
    assert fmt == "json log" and counts == {"a+c": 5.0, "b+c": 3.0}
    (d / "list.txt").write_text("# screens\nc,b\nb+c\na\na+b 7\n")
    counts, fmt = read_counts(d / "list.txt")
    assert fmt == "list" and counts == {"b+c": 2.0, "a": 1.0, "a+b": 7.0}
    (d / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ExportError) as e:
        read_counts(d / "empty.txt")
    assert e.value.code == "empty_combination_list"


def test_max_methods_keeps_the_k_most_requested_plus_every_single_task() -> None:
    counts = {"a+b": 45.0, "b+c": 30.0, "a": 12.0, "a+b+c": 2.0, "a+c": 30.0}
    assert most_requested(counts, ["a", "b", "c"], 2) == ["a+b", "b+c", "a", "b", "c"]  # tie: first seen
    assert most_requested(counts, ["a", "b", "c"], 3)[:3] == ["a+b", "b+c", "a+c"]
    assert most_requested(counts, ["a", "b", "c"], 0) == ["a", "b", "c"]
    assert most_requested(counts, ["a", "b", "c"], None) == ["a+b", "b+c", "a+c", "a", "a+b+c"]
    d = scratch("demand-select")
    (d / "metrics.txt").write_text(PROMETHEUS)
    chosen, _, _ = select_combinations(d / "metrics.txt", ["a", "b", "c"], 1)
    assert chosen == ["a", "b", "c", "a+b"]  # canonical order: fewest tasks first
    (d / "other.txt").write_text("a+zz 3\n")
    with pytest.raises(ExportError) as e:
        select_combinations(d / "other.txt", ["a", "b", "c"], 1)
    assert e.value.code == "unknown_task" and "zz" in str(e.value)


def test_cli_combinations_from_picks_the_most_requested() -> None:
    from pam_app.commands_export import combinations_from

    d = scratch("demand-cli")
    model = save_model(lenet_net(), d / "net")
    (d / "log.jsonl").write_text("\n".join([_log_line("a+c")] * 4 + [_log_line("b+c")] * 2 + [_log_line("a+b")]))
    assert combinations_from(model, str(d / "log.jsonl"), 2) == ["a", "b", "c", "a+c", "b+c"]
    assert combinations_from(model, str(d / "log.jsonl"), None) == ["a+b", "a+c", "b+c"]
    from pam_app.cli import main

    assert main(["export", str(model), "--out", str(d / "b"), "--max-methods", "2"]) == 2  # needs counts


# ------------------------------------------------------------------ the demo-like network, every combination
@pytest.mark.slow
def test_demo_like_bundle_has_a_method_for_every_combination() -> None:
    from mobile_export.export_phases import family_net

    net = family_net(5)  # the demo's pruned widths, one group per task
    out = scratch("demo-all") / "bundle"
    res = export_bundle(net, out, ExportConfig(), log=lambda *_: None)  # the default: every combination
    expected = ["+".join(c) for c in all_combinations(net.task_names)]
    assert len(expected) == 31
    assert [m.name for m in res.manifest.methods] == expected
    assert res.report["verification"]["ok"]
    rt = BundleRuntime(out, lazy=True, max_loaded=1)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for combo in all_combinations(net.task_names):
        got = rt.run_tasks(list(combo), x)
        eager = net(x, combo)
        for t in combo:
            torch.testing.assert_close(got[t], eager[t], atol=1e-4, rtol=0)


def test_default_config_exports_everything_without_extras() -> None:
    cfg = ExportConfig()
    assert cfg.combinations is None and not cfg.lite and not cfg.measure and not cfg.memory and cfg.verify


def test_workers_must_be_positive() -> None:
    with pytest.raises(ExportError) as e:
        export_bundle(lenet_net(), scratch("w") / "b", ExportConfig(workers=0), log=lambda *_: None)
    assert e.value.code == "bad_workers"


def test_phases_record_time_and_show_a_bar_per_phase() -> None:
    import io

    from mobile_export.phases import Phases

    buf = io.StringIO()
    ph = Phases(buf, progress=True)
    with ph.phase("lower", 3) as bar:
        for _ in range(3):
            bar.update(1)
    with ph.phase("verify", 3):
        pass
    assert "lower" in buf.getvalue() and "3/3" in buf.getvalue()
    d = ph.as_dict()
    assert list(d) == ["total_wall_s", "lower", "verify"] and d["lower"]["items"] == 3
    assert d["lower"]["wall_s"] >= 0 and d["lower"]["peak_rss_mb"] > 0
    quiet = io.StringIO()
    with Phases(quiet, progress=False).phase("lower", 3) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""
