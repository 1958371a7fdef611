"""The bundle runtime: files are checked before the loader sees them, a crashing load stays in a
child process, inputs are validated, methods load lazily within a bound."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mobile_export.errors import ExportError
from mobile_export.manifest import Manifest
from mobile_export.runtime import BundleRuntime, check_program, probe_bundle, set_threads
from tests.test_export_fixtures import MAX_BATCH, bundle, scratch

ROOT = Path(__file__).resolve().parent.parent


def _copy(kind: str, name: str) -> Path:
    _, src = bundle(kind)
    dst = scratch(name) / "bundle"
    shutil.copytree(src, dst)
    return dst


def _random_bytes(n: int = 4096, seed: int = 7) -> bytes:
    g = torch.Generator().manual_seed(seed)
    data = bytearray(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).numpy().tobytes())
    data[4:8] = b"\xc3\x28\xa0\xa1"  # a bad magic that is not valid UTF-8 (what breaks the loader's log)
    return bytes(data)


def test_flipped_weight_byte_is_refused_by_sha256() -> None:
    d = _copy("vgg-pruned-3", "flip")
    pte = d / "model.pte"
    data = bytearray(pte.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the magic stays valid: only the checksum can tell
    pte.write_bytes(bytes(data))
    sha = Manifest.load(d).program_sha256
    with pytest.raises(ExportError) as e:
        check_program(pte, sha)
    assert e.value.code == "sha256_mismatch"
    with pytest.raises(ExportError) as e:
        BundleRuntime(d)
    assert e.value.code == "sha256_mismatch"
    check_program(pte, None)  # still a well-formed program without the checksum


def test_random_bytes_abort_the_raw_loader_but_not_the_probe(tmp_path: Path) -> None:
    d = _copy("vgg-pruned-3", "random")
    (d / "model.pte").write_bytes(_random_bytes())
    # the hazard is real: handed straight to ExecuTorch, these bytes kill the process
    code = textwrap.dedent(
        f"""
        from executorch.runtime import Runtime
        Runtime.get().load_program(open({str(d / "model.pte")!r}, "rb").read())
        print("survived")
        """
    )
    raw = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, errors="replace", timeout=120)
    assert raw.returncode != 0 and "survived" not in raw.stdout
    # the probe reports it as invalid, and this process is still here to assert so
    result = probe_bundle(d)
    assert not result.ok and result.methods == []
    assert result.error is not None and "bad_program" in result.error
    with pytest.raises(ExportError) as e:
        check_program(d / "model.pte", None)
    assert e.value.code == "bad_program"


def test_probe_of_a_good_bundle_runs_every_method_and_reports_rss() -> None:
    _, path = bundle("vgg-pruned-3")
    result = probe_bundle(path)
    assert result.ok, result.error
    assert result.methods == [m.name for m in Manifest.load(path).methods]
    assert result.rss_mb is not None and result.rss_mb > 10


def test_probe_timeout_and_missing_files_are_reports() -> None:
    _, path = bundle("vgg-pruned-3")
    slow = probe_bundle(path, timeout_s=0.05)
    assert not slow.ok and "timed out" in (slow.error or "")
    d = _copy("vgg-pruned-3", "missing")
    (d / "model.pte").unlink()
    missing = probe_bundle(d)
    assert not missing.ok and "missing_program" in (missing.error or "")


def test_batch_bounds_and_bad_inputs() -> None:
    net, path = bundle("vgg-pruned-3")
    rt = BundleRuntime(path, lazy=True)
    for b in (1, MAX_BATCH):
        x = torch.randn(b, 1, 16, 16)
        out = rt.run("a+b+c", x)
        torch.testing.assert_close(out[2], net(x, "c")["c"], atol=1e-4, rtol=0)
    cases = {
        "batch_too_large": torch.zeros(MAX_BATCH + 1, 1, 16, 16),
        "bad_dtype": torch.zeros(1, 1, 16, 16, dtype=torch.float64),
        "bad_shape": torch.zeros(1, 3, 16, 16),
    }
    for code, x in cases.items():
        with pytest.raises(ExportError) as e:
            rt.run("b", x)
        assert e.value.code == code
    with pytest.raises(ExportError) as e:
        rt.run("b", torch.zeros(0, 1, 16, 16))
    assert e.value.code == "bad_shape"
    with pytest.raises(ExportError) as e:
        rt.run("a+d", torch.zeros(1, 1, 16, 16))
    assert e.value.code == "unknown_method"
    with pytest.raises(ExportError) as e:  # a real combination that this bundle did not export
        rt.run_tasks("a,b", torch.zeros(1, 1, 16, 16))
    assert e.value.code == "combination_not_exported"
    # the bound is in the program itself, not only in our check: ExecuTorch refuses max + 1 cleanly
    from executorch.runtime import Runtime

    method = Runtime.get().load_program((path / "model.pte").read_bytes()).load_method("b")
    with pytest.raises(RuntimeError):
        method.execute([torch.zeros(MAX_BATCH + 1, 1, 16, 16)])


def test_lazy_loading_keeps_at_most_max_loaded_and_stays_exact() -> None:
    net, path = bundle("lenet")
    rt = BundleRuntime(path, lazy=True, max_loaded=2)
    assert rt.loaded_methods() == []
    x = torch.randn(2, 1, 16, 16)
    for name in ["a", "b", "a+b", "a", "c"]:
        entry = rt.manifest.methods[[m.name for m in rt.manifest.methods].index(name)]
        outs = rt.run(name, x)
        eager = net(x, entry.tasks)
        for task, out in zip(entry.tasks, outs, strict=True):
            torch.testing.assert_close(out, eager[task], atol=1e-4, rtol=0)
        assert len(rt.loaded_methods()) <= 2
    assert rt.loaded_methods() == ["a", "c"]  # least recently used went first
    assert rt.run_tasks("b,a", x)["a"].shape == (2, 3)
    eager_rt = BundleRuntime(path)
    assert len(eager_rt.loaded_methods()) == len(eager_rt.manifest.methods)
    bounded = BundleRuntime(path, max_loaded=3)
    assert len(bounded.loaded_methods()) == 3


def test_set_threads_only_before_loading() -> None:
    _, path = bundle("vgg-pruned-3")
    code = textwrap.dedent(
        f"""
        from mobile_export.runtime import BundleRuntime, ExportError, set_threads, thread_count
        set_threads(2)
        assert thread_count() == 2, thread_count()
        rt = BundleRuntime({str(path)!r}, lazy=True)
        try:
            set_threads(1)
        except ExportError as e:
            print("refused", e.code)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-500:]
    assert "refused threads_after_load" in proc.stdout
    with pytest.raises(ExportError):
        set_threads(0)


def test_missing_or_corrupt_manifest_is_a_clear_error() -> None:
    d = _copy("vgg-pruned-3", "manifest")
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(ExportError) as e:
        BundleRuntime(d)
    assert e.value.code == "bad_manifest"
    (d / "manifest.json").unlink()
    with pytest.raises(ExportError) as e:
        BundleRuntime(d)
    assert e.value.code == "missing_manifest"
