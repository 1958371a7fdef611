"""Issue 21: bundle formats are exporters of one contract, found by name; export runs in phases
over one state; the export layer has no import cycle and no oversized module or function."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from mobile_export.errors import ExportError
from mobile_export.export import ExportConfig, export_bundle
from mobile_export.exporters import (
    Artifact,
    Check,
    Exporter,
    ExportJob,
    exporter_names,
    get_exporter,
    register_exporter,
)
from mobile_export.exporters import registry as _registry
from mobile_export.manifest import Manifest
from mobile_export.runtime import BundleRuntime
from tests.test_export_fixtures import MAX_BATCH, bundle, lenet_net, scratch

ROOT = Path(__file__).resolve().parent.parent
CALLS: list[tuple[str, str, Any]] = []


class _Recording(Exporter):
    """Writes each method's eager outputs at a fixed input as JSON, and checks them on reload."""

    suffix: ClassVar[str] = ".json-outputs"

    def export(self, job: ExportJob) -> Artifact:
        CALLS.append((self.name, "export", [c for c in job.combos]))
        x = torch.ones(1, job.net.arch.in_channels, *job.net.arch.input_size)
        with torch.no_grad():
            outs = {"+".join(c): [o.tolist() for o in job.net.for_combination(c).eval()(x)] for c in job.combos}
        names = {n: f"m{i}" for i, n in enumerate(outs)}
        return Artifact(self.name, self.file_name, json.dumps(outs).encode(), "ok: recorded", names, {"n": len(outs)})

    def verify(self, artifact: Artifact, bundle: Path, job: ExportJob) -> Check:
        written = json.loads((bundle / artifact.file).read_text())
        CALLS.append((self.name, "verify", sorted(written)))
        return Check(None, {"methods": len(written)})


@pytest.fixture
def dummy_exporters() -> Iterator[None]:
    @register_exporter
    class GoodExporter(_Recording):
        name: ClassVar[str] = "test-good"

    @register_exporter
    class BadExporter(_Recording):
        name: ClassVar[str] = "test-bad"
        suffix: ClassVar[str] = ".bad"

        def verify(self, artifact: Artifact, bundle: Path, job: ExportJob) -> Check:
            super().verify(artifact, bundle, job)
            return Check("reloaded outputs differ", {"methods": 0})

    CALLS.clear()
    try:
        yield
    finally:
        for name in ("test-good", "test-bad"):
            _registry._REGISTRY.pop(name, None)


def test_builtin_exporters_are_found_by_name_with_their_files() -> None:
    assert {"executorch", "torchscript-lite"} <= set(exporter_names())
    et, lite = get_exporter("executorch"), get_exporter("torchscript-lite")
    assert (et.file_name, et.required) == ("model.pte", True)
    assert (lite.file_name, lite.required) == ("model.ptl", False)
    assert ExportConfig(lite=True, exporters=("torchscript-lite",)).exporter_names() == ["executorch",
                                                                                         "torchscript-lite"]
    with pytest.raises(ExportError) as e:
        get_exporter("onnx-someday")
    assert e.value.code == "unknown_exporter" and "executorch" in e.value.message
    with pytest.raises(TypeError):  # a second class cannot take a registered name

        @register_exporter
        class Impostor(_Recording):
            name: ClassVar[str] = "executorch"


def test_unknown_exporter_fails_before_any_work(capsys: pytest.CaptureFixture[str]) -> None:
    out = scratch("unknown-exporter") / "b"
    with pytest.raises(ExportError) as e:
        export_bundle(lenet_net(), out, ExportConfig(exporters=("nope",)), log=lambda *_: None)
    assert e.value.code == "unknown_exporter"
    assert not out.exists() and not list(out.parent.iterdir())
    from merging.checkpoint import save_model
    from pam_app.cli import main

    model = save_model(lenet_net(), scratch("unknown-exporter-cli") / "net")
    assert main(["export", str(model), "--out", str(out), "--exporter", "nope"]) == 2  # a user error, at once
    printed = capsys.readouterr()
    assert "unknown_exporter" in printed.err + printed.out and not out.exists()


def test_a_registered_exporter_is_run_by_name_and_a_failed_optional_file_is_left_out(dummy_exporters: None) -> None:
    net = lenet_net(seed=2)
    out = scratch("dummy") / "b"
    cfg = ExportConfig(combinations=["b", "a+c"], max_batch=2, workers=1, exporters=("test-good", "test-bad"))
    res = export_bundle(net, out, cfg, log=lambda *_: None)
    # each exporter exported the same combinations, and verified the file as written in the bundle
    assert CALLS == [("test-good", "export", [("b",), ("a", "c")]), ("test-bad", "export", [("b",), ("a", "c")]),
                     ("test-good", "verify", ["a+c", "b"]), ("test-bad", "verify", ["a+c", "b"])]
    written = json.loads((out / "model.json-outputs").read_text())
    x = torch.ones(1, 1, 16, 16)
    torch.testing.assert_close(torch.tensor(written["a+c"][0]), net(x, ("a", "c"))["a"])
    assert not (out / "model.bad").exists()  # optional and failed its check: not shipped
    exporters = res.report["exporters"]
    assert exporters["test-good"]["status"] == "ok: recorded" and exporters["test-good"]["n"] == 2
    assert exporters["test-good"]["verification"] == {"methods": 2}
    assert exporters["test-bad"]["file"] is None
    assert exporters["test-bad"]["status"] == "not produced: reloaded outputs differ"
    assert exporters["executorch"]["file"] == "model.pte" and res.report["verification"]["ok"]
    # the bundle format is unchanged: the manifest knows model.pte (and that lite was not asked for)
    manifest = Manifest.load(out)
    assert manifest == res.manifest and manifest.program == "model.pte" and "--lite" in manifest.lite_status
    assert [m.name for m in manifest.methods] == ["b", "a+c"]
    assert {"lower", "serialize", "verify"} <= set(res.report["phases"])


def test_lite_and_executorch_methods_agree_with_eager_and_each_other() -> None:
    net, path = bundle("lenet")  # exported with lite=True
    manifest = Manifest.load(path)
    report = json.loads((path / "report.json").read_text())
    assert manifest.lite_program == "model.ptl" and manifest.lite_status.startswith("ok")
    assert report["exporters"]["torchscript-lite"]["status"] == manifest.lite_status
    checked = report["exporters"]["torchscript-lite"]["verification"]
    assert set(checked) == {m.lite_method for m in manifest.methods}
    assert all(v["max_abs_err"] <= 1e-4 for v in checked.values())
    assert {"lite", "lite_verify"} <= set(report["phases"])
    from torch.jit.mobile import _load_for_lite_interpreter

    lite = _load_for_lite_interpreter(str(path / "model.ptl"))
    rt = BundleRuntime(path, lazy=True, max_loaded=1)
    g = torch.Generator().manual_seed(7)
    for batch in (1, MAX_BATCH):
        x = torch.randn(batch, 1, 16, 16, generator=g)
        for m in manifest.methods:
            assert m.lite_method is not None
            eager = net(x, m.tasks)
            for task, et, lt in zip(m.tasks, rt.run(m.name, x), lite.run_method(m.lite_method, x), strict=True):
                torch.testing.assert_close(et, eager[task], atol=1e-4, rtol=0)
                torch.testing.assert_close(lt, eager[task], atol=1e-4, rtol=0)
                torch.testing.assert_close(et, lt, atol=1e-4, rtol=0)
