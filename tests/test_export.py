"""Export: every method of the .pte matches eager through the real ExecuTorch runtime, the
manifest describes it, the file stays close to the all-task method's size, bad requests fail
cleanly. Bundles come from ``test_export_fixtures`` (built once per session)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from merging.arch import create_arch
from merging.checkpoint import save_model
from merging.cost import combination_cost
from merging.network import MultitaskNet
from merging.tasks import TaskSpec, all_combinations
from mobile_export.errors import ExportError
from mobile_export.export import ExportConfig, export_bundle
from mobile_export.manifest import EXPECTED_OUTPUTS_FILE, LEGACY_EXPECTED_OUTPUTS_FILE, Manifest
from mobile_export.runtime import BundleRuntime
from mobile_export.selection import parse_combinations, resolve_combinations
from tests.test_export_fixtures import (
    COMBINATIONS,
    MAX_BATCH,
    TASKS,
    bundle,
    lenet_net,
    prefetch,
    scratch,
    written_before_the_rename,
)

DEFAULT_KINDS = ["lenet", "vgg-pruned-3"]
SLOW_KINDS = ["lenet-pruned", "vgg", "vgg-pruned"]
KINDS = [*DEFAULT_KINDS, *(pytest.param(k, marks=pytest.mark.slow) for k in SLOW_KINDS)]


@pytest.fixture(scope="module", autouse=True)
def _lower_vgg_alongside() -> None:
    prefetch("vgg-pruned-3")  # lowered by a child while this process lowers the LeNet bundle


def _bundle(kind: str) -> tuple[MultitaskNet, Path]:
    return bundle(kind)


@pytest.mark.parametrize("kind", KINDS)
def test_every_method_matches_eager_in_manifest_order(kind: str) -> None:
    net, path = _bundle(kind)
    rt = BundleRuntime(path, lazy=True)
    names = [m.name for m in rt.manifest.methods]
    expected = COMBINATIONS.get(kind) or ["+".join(c) for c in all_combinations(net.task_names)]
    assert names == expected
    g = torch.Generator().manual_seed(123)
    for batch in (1, MAX_BATCH):
        x = torch.randn(batch, 1, 16, 16, generator=g) * 2
        for entry in rt.manifest.methods:
            outs = rt.run(entry.name, x)
            eager = net(x, entry.tasks)
            assert len(outs) == len(entry.tasks) == len(eager)
            for task, out in zip(entry.tasks, outs, strict=True):  # manifest order = output order
                assert out.shape == (batch, len(rt.manifest.task(task).labels))
                torch.testing.assert_close(out, eager[task], atol=1e-4, rtol=0)
                assert torch.equal(out.argmax(1), eager[task].argmax(1))


@pytest.mark.parametrize("kind", KINDS)
def test_manifest_costs_match_flop_counter(kind: str) -> None:
    net, path = _bundle(kind)
    manifest = Manifest.load(path)
    x = torch.zeros(1, 1, 16, 16)
    for entry in manifest.methods:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            net.for_combination(entry.tasks)(x)
        assert entry.macs * 2 == counter.get_total_flops(), entry.name
        assert entry.params == combination_cost(net, entry.tasks).params


def test_pruned_bundle_has_fewer_macs_and_no_removed_group() -> None:
    net, path = _bundle("vgg-pruned-3")
    manifest = Manifest.load(path)
    assert 2 not in net.layout[0]  # group {b} of layer 0 removed entirely
    # {b} alone now reads only what the shared groups carry at layer 0
    assert manifest.method_for("b").macs == combination_cost(net, ("b",)).macs


def test_program_size_close_to_all_task_method_alone() -> None:
    _, path = _bundle("lenet")
    report = json.loads((path / "report.json").read_text())
    sizes = report["sizes"]
    assert sizes["program_bytes"] == (path / "model.pte").stat().st_size
    assert len(Manifest.load(path).methods) == 7
    # weights are stored once: 7 methods cost at most 15% over the all-task method alone
    assert sizes["program_bytes"] <= 1.15 * sizes["all_task_only_bytes"]
    # and the file really holds the weights (not a stub): at least the parameter bytes
    assert sizes["all_task_only_bytes"] >= sizes["parameters_bytes"]
    # 7 separate copies of the weights each method reads would weigh far more than the program
    assert sizes["program_bytes"] < 0.4 * sizes["unshared_weights_bytes"]


@pytest.mark.slow
def test_report_measures_memory_and_verification() -> None:
    _, path = _bundle("lenet-pruned")
    report = json.loads((path / "report.json").read_text())
    mem = report["memory"]
    assert mem["unbounded"]["loaded_at_end"] == 7
    assert mem["max_loaded_1"]["loaded_at_end"] == 1
    assert mem["unbounded"]["rss_all_methods_mb"] >= mem["unbounded"]["rss_program_mb"]
    ver = report["verification"]
    assert ver["ok"] and set(ver["methods"]) == {m.name for m in Manifest.load(path).methods}
    assert all(v["max_abs_err"] <= 1e-4 for v in ver["methods"].values())


def test_manifest_round_trips_and_describes_the_model() -> None:
    _, path = _bundle("lenet")
    manifest = Manifest.load(path)
    again = Manifest.model_validate_json(manifest.model_dump_json())
    assert again == manifest
    d = scratch("roundtrip")
    manifest.save(d)
    assert Manifest.load(d) == manifest
    assert [t.name for t in manifest.tasks] == ["a", "b", "c"]
    assert manifest.task("c").kind == "attributes"
    assert manifest.input.shape == [1, 16, 16] and manifest.input.max_batch == MAX_BATCH
    assert manifest.accuracy == {"a": 90.0, "b": 80.0}
    assert manifest.provenance.merger == "test"
    assert "executorch" in manifest.provenance.packages
    assert manifest.method_for(["c", "a"]).name == "a+c"
    # a tampered manifest (method name not canonical) is refused by the schema
    raw = json.loads((path / "manifest.json").read_text())
    raw["methods"][0]["name"] = "zz"
    (d / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ExportError) as e:
        Manifest.load(d)
    assert e.value.code == "bad_manifest"
    # a method's tasks must be the canonical combination: sorted, distinct, known, not empty
    for tasks, why in ((["c", "a"], "sorted, distinct"), (["a", "a"], "sorted, distinct"),
                       (["a", "zz"], "unknown task(s) zz"), ([], "at least one task")):
        raw = json.loads((path / "manifest.json").read_text())
        raw["methods"][0]["tasks"] = tasks
        (d / "manifest.json").write_text(json.dumps(raw))
        with pytest.raises(ExportError) as e:
            Manifest.load(d)
        assert e.value.code == "bad_manifest" and why in e.value.message, (tasks, e.value.message)


def test_lite_program_loads_and_matches_eager() -> None:
    net, path = _bundle("lenet")
    manifest = Manifest.load(path)
    assert manifest.lite_program == "model.ptl", manifest.lite_status
    from torch.jit.mobile import _load_for_lite_interpreter

    lite = _load_for_lite_interpreter(str(path / "model.ptl"))
    x = torch.randn(3, 1, 16, 16)
    for entry in manifest.methods:
        assert entry.lite_method is not None
        got = lite.run_method(entry.lite_method, x)
        eager = net(x, entry.tasks)
        for task, out in zip(entry.tasks, got, strict=True):
            torch.testing.assert_close(out, eager[task], atol=1e-4, rtol=0)


def test_verify_command_against_model_and_expected_outputs() -> None:
    from pam_app.cli import main

    net, path = _bundle("vgg-pruned-3")
    assert main(["verify", str(path)]) == 0  # against the stored expected outputs
    model = save_model(net, scratch("model") / "vgg_pruned")
    assert main(["verify", str(path), "--model", str(model)]) == 0
    # a model with other weights is a verification failure (exit 2), not a crash
    other = net.__class__.from_config(net.config())
    other.load_state_dict({k: v + 0.5 if v.is_floating_point() else v for k, v in net.state_dict().items()})
    wrong = save_model(other, scratch("model") / "other")
    assert main(["verify", str(path), "--model", str(wrong)]) == 2


def test_the_expected_outputs_are_written_under_their_name() -> None:
    """``expected_outputs.pt`` (manifest keys ``expected_outputs*``) holds eager's outputs on its inputs."""
    net, path = _bundle("vgg-pruned-3")
    assert not (path / LEGACY_EXPECTED_OUTPUTS_FILE).exists()
    raw = json.loads((path / "manifest.json").read_text())
    assert "reference" not in raw and "reference_sha256" not in raw
    assert raw["expected_outputs"] == EXPECTED_OUTPUTS_FILE == "expected_outputs.pt"
    data = (path / EXPECTED_OUTPUTS_FILE).read_bytes()
    assert raw["expected_outputs_sha256"] == hashlib.sha256(data).hexdigest()
    stored = torch.load(path / EXPECTED_OUTPUTS_FILE, weights_only=True)
    assert stored["x"].shape[0] == MAX_BATCH
    assert sorted(stored["outputs"]) == sorted(COMBINATIONS["vgg-pruned-3"] or [])
    with torch.no_grad():
        for name, outs in stored["outputs"].items():
            eager = net(stored["x"], name.split("+"))
            for task, out in zip(name.split("+"), outs, strict=True):
                torch.testing.assert_close(out, eager[task], atol=1e-6, rtol=0)


def test_a_bundle_written_before_the_rename_loads_and_verifies() -> None:
    from mobile_export.verify import verify_bundle
    from pam_app.cli import main

    _, path = _bundle("vgg-pruned-3")
    old = written_before_the_rename(path, scratch("legacy") / "b")
    assert Manifest.load(old).expected_outputs == LEGACY_EXPECTED_OUTPUTS_FILE
    assert Manifest.load(old).methods == Manifest.load(path).methods
    assert main(["verify", str(old)]) == 0
    # the old file is what it verifies against: other outputs (sha256 rewritten to match) fail
    stored = torch.load(old / "reference.pt", weights_only=True)
    stored["outputs"]["b"][0] += 1.0
    torch.save(stored, old / "reference.pt")
    with pytest.raises(ExportError) as e:
        verify_bundle(old)
    assert e.value.code == "sha256_mismatch"
    raw = json.loads((old / "manifest.json").read_text())
    raw["reference_sha256"] = hashlib.sha256((old / "reference.pt").read_bytes()).hexdigest()
    (old / "manifest.json").write_text(json.dumps(raw))
    rep = verify_bundle(old, strict=False)
    assert not rep["ok"] and rep["against"] == "expected outputs"
    assert [n for n, m in rep["methods"].items() if not m["ok"]] == ["b"]
    # both spellings of one key at once is not a bundle any version wrote
    raw["expected_outputs"] = raw["reference"]
    (old / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ExportError) as e:
        Manifest.load(old)
    assert e.value.code == "bad_manifest"


def test_verify_refuses_tampered_expected_outputs() -> None:
    from mobile_export.verify import verify_bundle

    _, path = _bundle("vgg-pruned-3")
    d = scratch("tampered-expected") / "b"
    shutil.copytree(path, d)
    stored = torch.load(d / EXPECTED_OUTPUTS_FILE, weights_only=True)
    stored["outputs"]["b"][0] += 1.0
    torch.save(stored, d / EXPECTED_OUTPUTS_FILE)
    with pytest.raises(ExportError) as e:
        verify_bundle(d)
    assert e.value.code == "sha256_mismatch"


# ------------------------------------------------------------------ requests that must fail cleanly
def test_unknown_and_empty_combinations_are_clear_errors() -> None:
    net = lenet_net()
    with pytest.raises(ExportError) as e:
        resolve_combinations(net, ["a", "a+zz"])
    assert e.value.code == "unknown_task" and "zz" in str(e.value)
    with pytest.raises(ExportError) as e:
        resolve_combinations(net, [])
    assert e.value.code == "empty_combination_list"
    with pytest.raises(ExportError) as e:
        resolve_combinations(net, ["a", ""])
    assert e.value.code == "empty_combination"
    # duplicates and order are normalised; requested order is kept
    assert resolve_combinations(net, ["b+a", "a,b", "c"]) == [("a", "b"), ("c",)]
    assert parse_combinations("b+a; c,a+b+c") == ["b+a", "c", "a+b+c"]
    with pytest.raises(ExportError) as e:
        export_bundle(net, scratch("unknown") / "b", ExportConfig(combinations=["nope"]), log=lambda *_: None)
    assert e.value.code == "unknown_task"
    assert not (scratch("unknown") / "b").exists()


def test_many_tasks_require_explicit_combinations() -> None:
    tasks = [TaskSpec(f"t{i}", "classes", ("n", "y")) for i in range(7)]
    arch = create_arch("lenet", width_mult=0.25)
    net = MultitaskNet(tasks, arch, [{127: s.width} for s in arch.layers])
    with pytest.raises(ExportError) as e:
        resolve_combinations(net, None)
    assert e.value.code == "too_many_combinations"
    assert resolve_combinations(net, ["t0+t6"]) == [("t0", "t6")]


def test_zero_width_groups_are_dropped_or_refused() -> None:
    arch = create_arch("lenet", width_mult=0.25)
    # width-0 layout entries are absent groups: the network (and so its program) has no trace of them
    net = MultitaskNet(TASKS, arch, [{1: 0, 7: 4}, {2: 0, 7: 4}, {7: 4}])
    assert [sorted(g) for g in net.layout] == [[7], [7], [7]] and len(net.blocks) == 3
    # groups removed by select_channels(..., []) export correctly: the pruned bundles (vgg-pruned-3
    # lacks group {b} at layer 0) pass the exactness test above.
    # An external pruner that drove a group to zero channels (then sync_layout) leaves a
    # Conv2d(in, 0): refused before lowering with a clear error, not a crash inside XNNPACK.
    from merging.network import _slice_conv_in, _slice_conv_out

    net = lenet_net()
    empty = torch.zeros(0, dtype=torch.long)
    block = net.blocks["L1_g1"]
    width = net.group_width(1, 1)
    from merging.graph import GroupKey

    for r in net.graph().readers(GroupKey(1, 1)):
        conv, off = net.conv_of(r.node.key), r.offset
        keep = torch.cat([torch.arange(off), torch.arange(off + width, conv.in_channels)])
        _slice_conv_in(conv, keep)
    _slice_conv_out(block.conv, block.bn, empty)
    net.sync_layout()
    assert net.group_width(1, 1) == 0
    with pytest.raises(ExportError) as e:
        export_bundle(net, scratch("zero") / "b", log=lambda *_: None)
    assert e.value.code == "zero_width" and "L1_g1" in str(e.value)


def test_existing_bundle_is_not_overwritten_without_force() -> None:
    _, path = _bundle("vgg-pruned-3")
    before = (path / "model.pte").read_bytes()
    with pytest.raises(ExportError) as e:
        export_bundle(lenet_net(), path, ExportConfig(), log=lambda *_: None)
    assert e.value.code == "bundle_exists"
    assert (path / "model.pte").read_bytes() == before


@pytest.mark.slow
def test_export_command_end_to_end_with_subset_and_force() -> None:
    from pam_app.cli import main

    model = save_model(lenet_net(seed=3), scratch("cli") / "net")
    out = scratch("cli") / "bundle"
    assert main(["export", str(model), "--out", str(out), "--combinations", "c;a+b", "--lite"]) == 0
    assert [m.name for m in Manifest.load(out).methods] == ["c", "a+b"]
    assert Manifest.load(out).lite_program == "model.ptl" and (out / "model.ptl").exists()
    assert main(["export", str(model), "--out", str(out), "--combinations", "a", "--force"]) == 0
    m = Manifest.load(out)  # the lite file is opt-in, and the manifest says how to get it
    assert [e.name for e in m.methods] == ["a"] and m.lite_program is None and "--lite" in m.lite_status
    assert not (out / "model.ptl").exists()


def test_preprocessing_sources_and_fallback() -> None:
    from mobile_export.model_meta import resolve_preprocessing

    arch8 = create_arch("lenet")  # 8x8 grayscale, like digits
    net = MultitaskNet(TASKS, arch8, [{7: 2}, {7: 2}, {7: 2}])
    pre, origin = resolve_preprocessing(net, None)
    assert origin.startswith("default") and pre.mean == [0.3] and pre.size == [8, 8]
    net.meta["preprocessing"] = {"size": [8, 8], "channels": 1, "mean": [0.5], "std": [0.25], "invert": True}
    pre, origin = resolve_preprocessing(net, None)
    assert origin == "model meta" and pre.mean == [0.5] and pre.invert and pre.channel_order == "L"
    pre, origin = resolve_preprocessing(net, "digits")  # an explicit source wins
    assert origin == "data set digits" and pre.mean == [0.3]
    f = scratch("pre") / "model.json"
    f.write_text(json.dumps({"meta": {"preprocessing": {"size": [8, 8], "channels": 1, "mean": [0.1], "std": [0.2]}}}))
    assert resolve_preprocessing(net, str(f))[0].mean == [0.1]
    with pytest.raises(ExportError) as e:  # 16x16 composite images do not fit an 8x8 network
        resolve_preprocessing(net, "composite")
    assert e.value.code == "bad_preprocessing"
    with pytest.raises(ExportError) as e:
        resolve_preprocessing(net, "no-such-dataset")
    assert e.value.code == "bad_preprocessing"


def test_accuracy_measured_on_a_data_set_or_refused() -> None:
    from merging.data import load_dataset
    from mobile_export.model_meta import measure_accuracy

    tasks = [TaskSpec("parity", "classes", ("even", "odd")), TaskSpec("large", "classes", ("small", "large"))]
    torch.manual_seed(0)
    net = MultitaskNet(tasks, create_arch("lenet"), [{3: 4}, {3: 4}, {1: 4, 2: 4, 3: 4}]).eval()
    acc = measure_accuracy(net, "digits")
    test = load_dataset("digits", tasks=("parity", "large")).test
    with torch.no_grad():
        out = net(test.x)
    for t in ("parity", "large"):
        assert acc[t] == pytest.approx(100.0 * float((out[t].argmax(1) == test.y[t]).float().mean()), abs=1e-3)
    with pytest.raises(ExportError) as e:
        measure_accuracy(lenet_net(), "digits")  # tasks a, b, c are not digits tasks
    assert e.value.code == "bad_accuracy_data"
