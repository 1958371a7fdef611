"""Helpers for the service tests: one real digits bundle per test process, and `pam serve` as a
real uvicorn subprocess on a free loopback port (always stopped)."""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("digit", "parity", "loop")
COMBINATIONS = (("digit",), ("digit", "parity"), ("digit", "loop", "parity"))
MAX_BATCH = 4


@functools.lru_cache(maxsize=1)
def digits_bundle() -> Path:
    """A real bundle from the project's exporter: 3 digits tasks trained 3 epochs, merged with
    `separate`, 3 methods lowered to XNNPACK in one .pte (built once per test process, ~15 s)."""
    import torch

    from merging.arch import create_arch
    from merging.data import load_dataset
    from merging.mergers import create_merger
    from merging.train import TrainConfig
    from merging.zoo import load_zoo, train_zoo
    from mobile_export.export import ExportConfig, export_bundle

    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp(prefix="pam-service-bundle-"))
    atexit.register(shutil.rmtree, out, True)
    splits = load_dataset("digits", tasks=TASKS)
    arch = create_arch("lenet", input_size=splits.preprocessing.size)
    train_zoo(splits, arch, TrainConfig(epochs=3, progress=False), out / "zoo", verbose=False)
    net = create_merger("separate").merge(load_zoo(out / "zoo"), splits.train).eval()
    bundle = out / "bundle"
    export_bundle(net, bundle, ExportConfig(
        combinations=["+".join(c) for c in COMBINATIONS], max_batch=MAX_BATCH, lite=False, verify=False,
        measure=False, memory=False, preprocessing="digits", model_name="digits", model_version="test-1"),
        log=lambda *a, **k: None)
    pre = splits.preprocessing
    # real test digits back to pixels in [0, 1] (the splits hold normalised network inputs)
    x01 = splits.test.x[:8].numpy() * np.float32(pre.std[0]) + np.float32(pre.mean[0])
    np.save(out / "test_x.npy", 1.0 - x01 if pre.invert else x01)
    return bundle


def digit_images() -> np.ndarray:
    """(8, 1, 8, 8) real test digits, pixels in [0, 1]."""
    return np.load(digits_bundle().parent / "test_x.npy")


def normalise(x01: np.ndarray, bundle: Path) -> np.ndarray:
    from mobile_export.manifest import Manifest

    pre = Manifest.load(bundle).preprocessing
    x = 1.0 - x01 if pre.invert else x01
    return ((x - np.float32(pre.mean[0])) / np.float32(pre.std[0])).astype(np.float32)


def png_of(x01: np.ndarray) -> bytes:
    """One (1, H, W) image in [0, 1] as an 8-bit grayscale PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.round(x01[0] * 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def copy_bundle(dst: Path) -> Path:
    shutil.copytree(digits_bundle(), dst)
    return dst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    bundle: Path
    token: str

    def log_lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()


@contextlib.contextmanager
def serve(bundle: Path, log: Path, *extra: str, token: str = "s3cret", wait_ready: bool = True) -> Iterator[Server]:
    """`pam serve BUNDLE` on a free loopback port; stopped (SIGTERM, then SIGKILL) on exit."""
    port = free_port()
    cmd = [sys.executable, "-m", "pam_app", "serve", str(bundle), "--port", str(port), "--admin-token", token,
           "--log-format", "json", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env = {k: v for k, v in env.items() if not k.startswith("PAM_")}
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    server = Server(f"http://127.0.0.1:{port}", proc, log, bundle, token)
    try:
        if wait_ready:
            deadline = time.time() + 120
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"pam serve exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
                try:
                    if httpx.get(server.url + "/v2/health/ready", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.time() > deadline:
                    raise RuntimeError(f"pam serve not ready in 120 s:\n{log.read_text()[-2000:]}")
                time.sleep(0.2)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def app_serving(bundle: Path, **settings: object):  # type: ignore[no-untyped-def]
    """The FastAPI app in this process with ``bundle`` loaded (no probe, no lifespan): for
    ``httpx.ASGITransport`` tests that need the pool itself (execute counts, settings)."""
    from service.core.config import Settings
    from service.main import create_app
    from service.model_loading import load_bundle

    s = Settings(bundle_dir=None, probe=False, **settings)  # type: ignore[arg-type]
    app = create_app(s)
    model = load_bundle(bundle, s, probe=False)
    app.state.pool.model, app.state.pool.state = model, "ready"
    app.state.on_model(model)
    return app


def without_methods(dst: Path, drop: tuple[str, ...]) -> Path:
    """A copy of the digits bundle whose manifest no longer lists ``drop`` (the program keeps them)."""
    from mobile_export.manifest import Manifest

    copy_bundle(dst)
    m = Manifest.load(dst)
    m.model_copy(update={"methods": [e for e in m.methods if e.name not in drop]}).save(dst)
    return dst


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax: the service's class scores from a method's raw logits."""
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def digits_runtime():  # type: ignore[no-untyped-def]
    """The ExecuTorch runtime on the shared digits bundle, as the service loads it."""
    from mobile_export.runtime import BundleRuntime

    return BundleRuntime(digits_bundle())
