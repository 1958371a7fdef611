"""``pam bench-serve``: the HTTP service on loopback against the runtime called directly and a bare
ASGI app, with and without dynamic batching, in one run.

Measures, per combination: the runtime's own execute (direct, in this process, before any server
starts, so nothing competes for the cores); then, one after the other, each *variant* in a child
process driven by 1/8/32 concurrent keep-alive clients (a minimal asyncio HTTP/1.1 client, so the
client's own cost stays small next to the server's):

- ``bare``: ``pam_app.bench.serve_bare``, uvicorn + the same decode + the same runtime call,
  no framework: the Python HTTP limit on this machine;
- ``service``: ``pam serve --no-batching``;
- ``service+batching``: ``pam serve`` with dynamic batching (``--batch-window-us`` as configured).

All servers run at once and every cell is measured on each variant back to back, so a drift of the
machine's load (it is shared) falls on all variants alike.

Reports RPS, p50/p95/p99, errors, the HTTP overhead (p50 of ``/infer`` at one client minus p50 of
the direct execute), throughput relative to the direct runtime and to the bare app, the batching
gain, and the server's RSS when ready, after the run and after a burst of large requests.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mobile_export.manifest import Manifest
from pam_app.bench.serve_client import build_request, drive, percentile
from pam_app.bench.serve_report import markdown
from pam_common.atomic import atomic_write_bytes
from pam_common.combinations import combination_name
from service.errors import ServiceError


@dataclass
class BenchConfig:
    bundle_dir: Path
    clients: tuple[int, ...] = (1, 8, 32)
    requests: int = 400  # per (combination, clients) cell
    combinations: tuple[str, ...] | None = None  # default: cheapest method and all tasks
    payload: str = "png"  # png (raw image/png body) | multipart | json (tensor)
    threads: int = 1
    workers: int = 1
    executor: str = "auto"
    direct_runs: int = 2000
    server_args: tuple[str, ...] = ()  # extra `pam serve` flags, e.g. ("--http", "h11")
    lazy: bool = False  # serve with lazy method loading (and max_loaded) to compare resident memory
    max_loaded: int | None = None
    out: Path = Path("results/serve-bench")
    extra_env: dict[str, str] = field(default_factory=dict)
    variants: tuple[str, ...] = ("bare", "service", "service+batching")
    batch_window_us: int = 0  # the window of the service+batching variant
    attacks: bool = True  # after the cells: large requests, then RSS against its ready value
    attack_rounds: int = 20  # large photos and near-limit bodies sent (each), then 5 oversized heads
    mix: tuple[str, ...] | None = None  # combinations asked concurrently (client i: mix[i % k]) in "mix" cells


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sample_png(manifest: Manifest) -> bytes:
    """A deterministic image at the model's input size (a ring: a plausible '0' for digits)."""
    from PIL import Image, ImageDraw

    h, w = manifest.preprocessing.size
    scale = max(1, 64 // max(h, w))
    img = Image.new("L", (w * scale, h * scale), 255)
    ImageDraw.Draw(img).ellipse((w * scale * 0.2, h * scale * 0.1, w * scale * 0.8, h * scale * 0.9),
                                outline=0, width=max(1, scale))
    if manifest.preprocessing.channel_order == "RGB":
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def direct_baseline(cfg: BenchConfig, manifest: Manifest, methods: list[str], x: np.ndarray) -> dict[str, Any]:
    """The runtime called in a loop in this process: execute p50 and calls per second."""
    import torch

    from mobile_export.runtime import BundleRuntime, set_threads

    set_threads(cfg.threads)
    rt = BundleRuntime(cfg.bundle_dir)
    xt = torch.from_numpy(x)
    out: dict[str, Any] = {}
    for m in methods:
        for _ in range(50):
            rt.run(m, xt)
        times = []
        t_all = time.perf_counter()
        for _ in range(cfg.direct_runs):
            t0 = time.perf_counter()
            rt.run(m, xt)
            times.append((time.perf_counter() - t0) * 1e3)
        wall = time.perf_counter() - t_all
        out[m] = {"p50_ms": statistics.median(times), "p99_ms": percentile(times, 99), "rps": cfg.direct_runs / wall}
    return out


def server_command(cfg: BenchConfig, port: int, variant: str) -> list[str]:
    if variant == "bare":
        return [sys.executable, "-m", "pam_app.bench.serve_bare", str(cfg.bundle_dir), "--port", str(port),
                "--threads", str(cfg.threads)]
    cmd = [sys.executable, "-m", "pam_app", "serve", str(cfg.bundle_dir), "--port", str(port),
           "--threads", str(cfg.threads), "--workers", str(cfg.workers), "--executor", cfg.executor,
           "--queue-bound", "4096", "--no-probe", "--max-connections", "4096"]
    if variant == "service":
        cmd.append("--no-batching")
    elif variant == "service+batching":
        cmd += ["--batch-window-us", str(cfg.batch_window_us)]
    elif variant == "service+union":
        cmd += ["--batch-window-us", str(cfg.batch_window_us), "--batch-union"]
    else:
        raise ServiceError(2, "bad_variant",
                           f"unknown variant {variant!r}; use bare, service, service+batching, service+union")
    cmd += list(cfg.server_args)
    if cfg.lazy:
        cmd.append("--lazy")
    if cfg.max_loaded:
        cmd += ["--max-loaded", str(cfg.max_loaded)]
    return cmd


def start_server(cfg: BenchConfig, port: int, log_path: Path, variant: str = "service") -> subprocess.Popen[bytes]:
    cmd = server_command(cfg, port, variant)
    env = {**os.environ, **cfg.extra_env}
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise ServiceError(2, "server_failed", f"pam serve exited with {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.3)
    proc.terminate()
    raise ServiceError(2, "server_failed", f"pam serve was not ready within 180 s; see {log_path}")


def server_rss_mb(proc: subprocess.Popen[bytes]) -> float:
    """Resident memory of the server and its worker processes."""
    import psutil

    p = psutil.Process(proc.pid)
    return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)]) / 2**20


def noise_png(pixels: int) -> bytes:
    """A grey noise PNG of about ``pixels`` pixels (incompressible: a large body that is decoded)."""
    from PIL import Image

    side = int(pixels ** 0.5)
    arr = np.random.default_rng(0).integers(0, 255, (side, side), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def attack(port: int, manifest: Manifest, path: str, rounds: int = 20) -> dict[str, Any]:
    """Large requests a client may send: decodable photos at the pixel limit, bodies near the body limit,
    oversized heads. Returns the status codes seen."""
    import httpx

    from service.preprocess import image_pixel_limit

    url = f"http://127.0.0.1:{port}"
    big = noise_png(image_pixel_limit(manifest))
    junk = b"\x89PNG" + b"\0" * (4 * 1024 * 1024 - 64 * 1024)
    seen: dict[str, int] = {}
    with httpx.Client(timeout=60) as c:
        for _ in range(rounds):
            for body in (big, junk):
                r = c.post(url + path, content=body, headers={"content-type": "image/png"})
                seen[str(r.status_code)] = seen.get(str(r.status_code), 0) + 1
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")
            try:
                status = s.recv(64).split(b" ")[1].decode() or "closed"
            except (OSError, IndexError):
                status = "closed"
            seen[status] = seen.get(status, 0) + 1
    return seen


def run_variants(cfg: BenchConfig, manifest: Manifest, methods: list[str], png: bytes, x: np.ndarray,
                 tmp: Path) -> list[dict[str, Any]]:
    """All variants' servers up at once (an idle server costs nothing), each cell measured on every
    variant back to back: on a shared machine whose load drifts, variants are compared a few seconds
    apart instead of minutes apart."""
    servers: dict[str, tuple[int, subprocess.Popen[bytes]]] = {}
    out: dict[str, dict[str, Any]] = {}
    try:
        for v in cfg.variants:
            port = free_port()
            servers[v] = (port, start_server(cfg, port, tmp / f"{v}.log", v))
            out[v] = {"variant": v, "cells": []}
        for v, (_, proc) in servers.items():
            out[v]["rss_ready_mb"] = server_rss_mb(proc)
        for m in methods:
            tasks = ",".join(manifest.method_for(m).tasks)
            request = build_request(f"/infer?tasks={tasks}", cfg.payload, png, x)
            for port, _ in servers.values():
                asyncio.run(drive(port, [request], 1, 50))  # warm-up
            for c in cfg.clients:
                for v, (port, _) in servers.items():
                    cell = {"variant": v, "combination": m, "macs": manifest.method_for(m).macs,
                            **asyncio.run(drive(port, [request], c, max(cfg.requests, 4 * c)))}
                    out[v]["cells"].append(cell)
                    print(f"  {v:>16} {m:>22} x{c:<3}: {cell['rps']:7.0f} req/s  p50 {cell['p50_ms']:.3f}  "
                          f"p95 {cell['p95_ms']:.3f}  p99 {cell['p99_ms']:.3f} ms  errors {cell['errors']}",
                          flush=True)
        if cfg.mix:
            reqs = [build_request(f"/infer?tasks={c.replace('+', ',')}", cfg.payload, png, x) for c in cfg.mix]
            for c in cfg.clients:
                for v, (port, _) in servers.items():
                    if v == "bare":
                        continue
                    cell = {"variant": v, "combination": "mix:" + ";".join(cfg.mix), "macs": 0,
                            **asyncio.run(drive(port, reqs, c, max(cfg.requests, 4 * c), count_macs=True))}
                    out[v]["cells"].append(cell)
                    print(f"  {v:>16} {'mix':>22} x{c:<3}: {cell['rps']:7.0f} req/s  p50 {cell['p50_ms']:.3f} ms  "
                          f"MACs/request {cell['macs_per_request']}  errors {cell['errors']}", flush=True)
        for v, (_port, proc) in servers.items():
            out[v]["rss_end_mb"] = server_rss_mb(proc)
        for v, (port, proc) in servers.items():
            if not cfg.attacks or v == "bare":
                continue
            tasks = ",".join(manifest.method_for(methods[0]).tasks)
            out[v]["attack_statuses"] = attack(port, manifest, f"/infer?tasks={tasks}", cfg.attack_rounds)
            time.sleep(2.0)
            asyncio.run(drive(port, [build_request(f"/infer?tasks={tasks}", cfg.payload, png, x)], 1, 20))
            out[v]["rss_after_attacks_mb"] = server_rss_mb(proc)
            out[v]["alive_after_attacks"] = proc.poll() is None
            print(f"  {v:>16} attacks {out[v]['attack_statuses']}: RSS {out[v]['rss_ready_mb']:.0f} MB ready, "
                  f"{out[v]['rss_end_mb']:.0f} after the cells, {out[v]['rss_after_attacks_mb']:.0f} after the "
                  f"attacks", flush=True)
    finally:
        for _, proc in servers.values():
            proc.terminate()
        for _, proc in servers.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    return [out[v] for v in cfg.variants if v in out]


def run_benchmark(cfg: BenchConfig) -> dict[str, Any]:
    from service.preprocess import decode_image

    manifest = Manifest.load(cfg.bundle_dir)
    load_before = os.getloadavg()[0]  # the machine is shared: say how busy it was
    all_tasks = combination_name(manifest.task_names)
    if cfg.combinations:
        methods = [manifest.method_for(c).name for c in cfg.combinations]
    else:
        cheapest = min(manifest.methods, key=lambda m: m.macs).name
        methods = list(dict.fromkeys([cheapest, *([all_tasks] if any(m.name == all_tasks for m in manifest.methods)
                                                   else [max(manifest.methods, key=lambda m: m.macs).name])]))
    png = sample_png(manifest)
    x = decode_image(png, manifest)
    print(f"bench-serve: {manifest.model_name} {manifest.model_version}; methods {methods}; payload {cfg.payload}; "
          f"threads {cfg.threads}, workers {cfg.workers}, executor {cfg.executor}; variants {list(cfg.variants)}",
          flush=True)
    direct = direct_baseline(cfg, manifest, methods, x)
    for m, d in direct.items():
        print(f"  direct  {m:>24}: execute p50 {d['p50_ms']:.3f} ms, {d['rps']:.0f} calls/s", flush=True)
    with tempfile.TemporaryDirectory(prefix="pam-bench-") as tmp:
        runs = run_variants(cfg, manifest, methods, png, x, Path(tmp))
    cells = [c for r in runs for c in r["cells"]]
    mixed = [c for c in cells if c["combination"].startswith("mix:")]
    cells = [c for c in cells if not c["combination"].startswith("mix:")]

    def cell(variant: str, m: str, clients: int) -> dict[str, Any] | None:
        return next((c for c in cells if c["variant"] == variant and c["combination"] == m
                     and c["clients"] == clients), None)

    def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
        return a["rps"] / b["rps"] if a and b and b["rps"] else None

    summary: dict[str, Any] = {}
    one = min(cfg.clients)
    for m in methods:
        s: dict[str, Any] = {"direct_execute_p50_ms": direct[m]["p50_ms"], "direct_rps": direct[m]["rps"]}
        for v in cfg.variants:
            c1, c8 = cell(v, m, one), cell(v, m, 8)
            s[v] = {"http_overhead_p50_ms": c1["p50_ms"] - direct[m]["p50_ms"] if c1 else None,
                    "rps_8_over_direct": (c8["rps"] / direct[m]["rps"]) if c8 else None}
        for v in ("service", "service+batching"):
            if v in cfg.variants and "bare" in cfg.variants:
                s[v]["rps_8_over_bare"] = ratio(cell(v, m, 8), cell("bare", m, 8))
        if "service" in cfg.variants and "service+union" in cfg.variants:
            s["union_gain"] = {str(c): ratio(cell("service+union", m, c), cell("service", m, c))
                               for c in cfg.clients}
        if "service" in cfg.variants and "service+batching" in cfg.variants:
            s["batching_gain"] = {str(c): ratio(cell("service+batching", m, c), cell("service", m, c))
                                  for c in cfg.clients}
        summary[m] = s
    result = {
        "config": {**asdict(cfg), "bundle_dir": str(cfg.bundle_dir), "out": str(cfg.out)},
        "model": manifest.model_name, "model_version": manifest.model_version,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]}},
        "direct": direct, "http": cells, "summary": summary, "mix": mixed,
        "servers": [{k: v for k, v in r.items() if k != "cells"} for r in runs],
        "total_errors": sum(c["errors"] for c in cells),
    }
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cfg.out.with_suffix(".json"), json.dumps(result, indent=2).encode())
    atomic_write_bytes(cfg.out.with_suffix(".md"), markdown(result).encode())
    print(markdown(result))
    print(f"wrote {cfg.out.with_suffix('.json')} and {cfg.out.with_suffix('.md')}")
    return result
