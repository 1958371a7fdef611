"""Start-up checks, hot reload (HTTP and SIGHUP) and the admission queue of the service."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from mobile_export.manifest import Manifest
from tests.service_support import ROOT, copy_bundle, digit_images, digits_bundle, normalise, serve


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # never overwrite a loaded program in place


def unloadable_bundle(bundle: Path) -> None:
    """Random bytes with the ET12 magic and a matching sha256: passes the file checks, so only loading
    it (in the child-process probe, where a loader abort cannot hurt the server) can tell
    """
    data = bytearray(np.random.default_rng(1).bytes(4096))
    data[4:8] = b"ET12"
    _replace(bundle / "model.pte", bytes(data))
    m = Manifest.load(bundle)
    m.model_copy(update={"program_sha256": hashlib.sha256(bytes(data)).hexdigest()}).save(bundle)


def _infer(url: str) -> httpx.Response:
    x = normalise(digit_images()[:1], digits_bundle())
    return httpx.post(url + "/infer?tasks=digit", json={"inputs": x.tolist()}, timeout=30)


def test_reload_keeps_the_old_model_when_the_new_bundle_is_bad(tmp_path: Path) -> None:
    bundle = copy_bundle(tmp_path / "bundle")
    good_program = (bundle / "model.pte").read_bytes()
    good_manifest = Manifest.load(bundle)
    with serve(bundle, tmp_path / "server.log", "--no-probe", wait_ready=False) as s:
        # live at once; ready (and /infer) only once the runtime has loaded the methods
        while True:
            try:
                live = httpx.get(s.url + "/v2/health/live", timeout=2)
                break
            except httpx.TransportError:
                assert s.proc.poll() is None
                time.sleep(0.05)
        assert live.json() == {"live": True}
        first = [httpx.get(s.url + "/v2/health/ready"), _infer(s.url)]
        assert [r.status_code for r in first] == [503, 503], [r.text for r in first]
        assert first[0].json()["ready"] is False and first[1].headers["retry-after"] == "1"
        deadline = time.time() + 120
        while httpx.get(s.url + "/v2/health/ready").status_code != 200:
            assert time.time() < deadline and s.proc.poll() is None
            time.sleep(0.2)
        before = _infer(s.url).json()
        assert httpx.post(s.url + "/admin/reload").status_code == 401
        assert httpx.post(s.url + "/admin/reload", headers={"x-admin-token": "wrong"}).status_code == 401

        unloadable_bundle(bundle)
        r = httpx.post(s.url + "/admin/reload", headers={"x-admin-token": s.token}, timeout=180)
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["error"] == "reload_refused" and body["reloaded"] is False and "probe" in body["detail"]
        assert body["model_version"] == "test-1"
        after = _infer(s.url)
        assert after.status_code == 200 and after.json()["predictions"] == before["predictions"]
        assert httpx.get(s.url + "/v2/health/ready").json() == {"ready": True}

        # SIGHUP with a program whose bytes no longer match the manifest's sha256
        _replace(bundle / "model.pte", good_program[:-1] + bytes([good_program[-1] ^ 1]))
        good_manifest.save(bundle)
        s.proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 60
        while not any("SIGHUP reload" in line for line in s.log_lines()) and time.time() < deadline:
            time.sleep(0.2)
        line = next(line for line in s.log_lines() if "SIGHUP reload" in line)
        assert "refused" in line and "sha256" in line
        assert _infer(s.url).json()["model_version"] == "test-1"

        # a good bundle with a new version is taken
        _replace(bundle / "model.pte", good_program)
        good_manifest.model_copy(update={"model_version": "test-2"}).save(bundle)
        r = httpx.post(s.url + "/admin/reload", headers={"x-admin-token": s.token}, timeout=180)
        assert r.status_code == 200 and r.json()["reloaded"] is True, r.text
        now = _infer(s.url).json()
        assert now["model_version"] == "test-2" and now["predictions"] == before["predictions"]
        assert s.proc.poll() is None


def _pam_serve(bundle: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAM_")}
    return subprocess.run([sys.executable, "-m", "pam_app", "serve", str(bundle), "--port", "0", *extra],
                          capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)


def test_a_bad_bundle_stops_start_up_with_a_clear_message(tmp_path: Path) -> None:
    bundle = copy_bundle(tmp_path / "flipped")
    data = bytearray((bundle / "model.pte").read_bytes())
    data[len(data) // 2] ^= 0xFF
    _replace(bundle / "model.pte", bytes(data))
    r = _pam_serve(bundle, "--no-probe")
    assert r.returncode == 2 and "sha256" in r.stderr and "pam serve: error:" in r.stderr

    (tmp_path / "empty").mkdir()
    r = _pam_serve(tmp_path / "empty", "--no-probe")
    assert r.returncode == 2 and "no manifest" in r.stderr


@pytest.mark.slow
def test_an_unloadable_bundle_is_refused_by_the_start_up_probe(tmp_path: Path) -> None:
    crashing = copy_bundle(tmp_path / "unloadable")
    unloadable_bundle(crashing)
    r = _pam_serve(crashing)
    assert r.returncode == 2, r.stderr[-500:]
    assert "probe" in r.stderr and "ExecuTorch refused" in r.stderr


def test_a_bundle_written_before_the_rename_is_checked_and_served(tmp_path: Path) -> None:
    """Manifests from before issue 21 name the expected outputs ``reference`` / ``reference_sha256``:
    the service still takes them, signature included (it covers the bytes as written)."""
    from service.bundle_guard import generate_keypair, sign_bundle
    from tests.service_support import app_serving
    from tests.test_export_fixtures import written_before_the_rename

    private, public = generate_keypair()
    root = tmp_path / "root"
    root.mkdir()
    current = copy_bundle(root / "current")
    old = written_before_the_rename(digits_bundle(), root / "old")
    assert b'"reference_sha256"' in (old / "manifest.json").read_bytes()
    for b in (current, old):
        sign_bundle(b, private)
    x = normalise(digit_images()[:2], digits_bundle())
    app = app_serving(current, admin_token="t0ken", manifest_public_key=public)

    async def go(method: str, url: str, **kw: object) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
            return await c.request(method, url, **kw)  # type: ignore[arg-type]

    try:
        before = asyncio.run(go("POST", "/infer?tasks=digit,parity", json={"inputs": x.tolist()})).json()
        r = asyncio.run(go("POST", "/admin/reload", json={"bundle_dir": str(old)}, headers={"x-admin-token": "t0ken"}))
        assert r.status_code == 200 and r.json()["reloaded"] is True, r.text
        assert Path(r.json()["bundle_dir"]).resolve() == old.resolve()
        after = asyncio.run(go("POST", "/infer?tasks=digit,parity", json={"inputs": x.tolist()})).json()
    finally:
        app.state.pool.shutdown()
    assert after["predictions"] == before["predictions"]


@pytest.fixture(scope="module")
def loaded_model():
    from mobile_export.runtime import BundleRuntime
    from service.model_loading import LoadedModel

    rt = BundleRuntime(digits_bundle())
    return LoadedModel(bundle_dir=digits_bundle(), manifest=rt.manifest, runtime=rt)


def test_queue_bound_gives_503_with_retry_after_and_timeouts_504(loaded_model) -> None:
    from service.core.config import Settings
    from service.errors import ServiceError
    from service.runtime_pool import RuntimePool

    x = normalise(digit_images()[:4], digits_bundle())

    async def burst(pool: RuntimePool, n: int) -> list[object]:
        return await asyncio.gather(*(pool.execute(loaded_model, "digit", x) for _ in range(n)),
                                    return_exceptions=True)

    pool = RuntimePool(Settings(queue_bound=2, retry_after_s=3))
    results = asyncio.run(burst(pool, 6))
    ok = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, ServiceError)]
    assert len(ok) == 2 and len(refused) == 4
    assert all(r.status == 503 and r.headers["Retry-After"] == "3" for r in refused)
    direct = loaded_model.runtime.run("digit", __import__("torch").from_numpy(x))[0].numpy()
    assert all(np.array_equal(r.outputs[0], direct) for r in ok)  # type: ignore[union-attr]
    assert pool.waiting == 0
    pool.shutdown()

    # The single runtime thread is kept busy, so every request waits past its timeout: 504, not a race.
    slow = RuntimePool(Settings(request_timeout_s=0.05))
    assert slow._executor is not None
    blocker = slow._executor.submit(__import__("time").sleep, 0.5)
    results = asyncio.run(burst(slow, 3))
    assert all(isinstance(r, ServiceError) and r.status == 504 for r in results), results
    blocker.result()
    assert slow.waiting == 0
    slow.shutdown()
