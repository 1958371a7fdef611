"""``pam bench-serve``: the HTTP service on loopback against the runtime called directly.

Measures, per combination: the runtime's own execute (direct, in this process, before the server
starts, so nothing competes for the cores), then ``pam serve`` in a child process driven by
1/8/32 concurrent keep-alive clients (a minimal asyncio HTTP/1.1 client, so the client's own cost
stays small next to the server's). Reports RPS, p50/p95/p99, errors, the HTTP overhead (p50 of
``/infer`` minus p50 of the direct execute) and throughput relative to the direct runtime.
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

from mobile_export.manifest import Manifest, atomic_write_bytes
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
    executor: str = "thread"
    direct_runs: int = 2000
    server_args: tuple[str, ...] = ()  # extra `pam serve` flags, e.g. ("--http", "h11")
    lazy: bool = False  # serve with lazy method loading (and max_loaded) to compare resident memory
    max_loaded: int | None = None
    out: Path = Path("results/serve-bench")
    extra_env: dict[str, str] = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


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


def build_request(path: str, payload: str, png: bytes, x: np.ndarray) -> bytes:
    if payload == "json":
        body = json.dumps({"inputs": x[0].tolist()}).encode()
        ctype = "application/json"
    elif payload == "multipart":
        boundary = "pambenchboundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{boundary}--\r\n".encode()
        ctype = f"multipart/form-data; boundary={boundary}"
    else:
        body, ctype = png, "image/png"
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def _client(port: int, request: bytes, n: int, lat: list[float], server_exec: list[float],
                  errors: list[str]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            writer.write(request)
            status_line = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v)
            body = await reader.readexactly(length)
            lat.append(time.perf_counter() - t0)
            status = int(status_line.split()[1]) if status_line else 0
            if status != 200:
                errors.append(f"{status}: {body[:120]!r}")
            else:
                server_exec.append(float(json.loads(body)["timings_ms"]["execute"]))
    finally:
        writer.close()


async def _drive(port: int, request: bytes, clients: int, total: int) -> dict[str, Any]:
    lat: list[float] = []
    server_exec: list[float] = []
    errors: list[str] = []
    per = max(1, total // clients)
    t0 = time.perf_counter()
    await asyncio.gather(*(_client(port, request, per, lat, server_exec, errors) for _ in range(clients)))
    wall = time.perf_counter() - t0
    ms = [v * 1e3 for v in lat]
    return {"clients": clients, "requests": len(lat), "errors": len(errors), "error_samples": errors[:3],
            "rps": len(lat) / wall, "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95),
            "p99_ms": percentile(ms, 99), "server_execute_p50_ms": percentile(server_exec, 50)}


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


def start_server(cfg: BenchConfig, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "merging.cli", "serve", str(cfg.bundle_dir), "--port", str(port),
           "--threads", str(cfg.threads), "--workers", str(cfg.workers), "--executor", cfg.executor,
           "--queue-bound", "4096", "--no-probe"]
    cmd += list(cfg.server_args)
    if cfg.lazy:
        cmd.append("--lazy")
    if cfg.max_loaded:
        cmd += ["--max-loaded", str(cfg.max_loaded)]
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


def run_benchmark(cfg: BenchConfig) -> dict[str, Any]:
    from service.preprocess import decode_image

    manifest = Manifest.load(cfg.bundle_dir)
    load_before = os.getloadavg()[0]  # the machine is shared: say how busy it was
    all_tasks = "+".join(sorted(manifest.task_names))
    if cfg.combinations:
        methods = [manifest.method_for(c).name for c in cfg.combinations]
    else:
        cheapest = min(manifest.methods, key=lambda m: m.macs).name
        methods = list(dict.fromkeys([cheapest, *([all_tasks] if any(m.name == all_tasks for m in manifest.methods)
                                                   else [max(manifest.methods, key=lambda m: m.macs).name])]))
    png = sample_png(manifest)
    x = decode_image(png, manifest)
    print(f"bench-serve: {manifest.model_name} {manifest.model_version}; methods {methods}; payload {cfg.payload}; "
          f"threads {cfg.threads}, workers {cfg.workers}, executor {cfg.executor}", flush=True)
    direct = direct_baseline(cfg, manifest, methods, x)
    for m, d in direct.items():
        print(f"  direct  {m:>24}: execute p50 {d['p50_ms']:.3f} ms, {d['rps']:.0f} calls/s", flush=True)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="pam-bench-") as tmp:
        proc = start_server(cfg, port, Path(tmp) / "server.log")
        try:
            rss_ready = server_rss_mb(proc)
            cells = []
            for m in methods:
                tasks = ",".join(manifest.method_for(m).tasks)
                request = build_request(f"/infer?tasks={tasks}", cfg.payload, png, x)
                asyncio.run(_drive(port, request, 1, 100))  # warm-up
                for c in cfg.clients:
                    cell = {"combination": m, "macs": manifest.method_for(m).macs,
                            **asyncio.run(_drive(port, request, c, max(cfg.requests, 4 * c)))}
                    cells.append(cell)
                    print(f"  http    {m:>24} x{c:<3}: {cell['rps']:7.0f} req/s  p50 {cell['p50_ms']:.3f}  "
                          f"p95 {cell['p95_ms']:.3f}  p99 {cell['p99_ms']:.3f} ms  errors {cell['errors']}", flush=True)
            rss_end = server_rss_mb(proc)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    summary = {}
    for m in methods:
        one = next(c for c in cells if c["combination"] == m and c["clients"] == min(cfg.clients))
        eight = next((c for c in cells if c["combination"] == m and c["clients"] == 8), None)
        summary[m] = {
            "http_overhead_p50_ms": one["p50_ms"] - direct[m]["p50_ms"],
            "throughput_ratio_8_clients": (eight["rps"] / direct[m]["rps"]) if eight else None,
            "direct_execute_p50_ms": direct[m]["p50_ms"], "direct_rps": direct[m]["rps"],
        }
    result = {
        "config": {**asdict(cfg), "bundle_dir": str(cfg.bundle_dir), "out": str(cfg.out)},
        "model": manifest.model_name, "model_version": manifest.model_version,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]}},
        "direct": direct, "http": cells, "summary": summary,
        "server_rss_mb": {"ready": rss_ready, "end": rss_end},
        "total_errors": sum(c["errors"] for c in cells),
    }
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cfg.out.with_suffix(".json"), json.dumps(result, indent=2).encode())
    atomic_write_bytes(cfg.out.with_suffix(".md"), markdown(result).encode())
    print(markdown(result))
    print(f"wrote {cfg.out.with_suffix('.json')} and {cfg.out.with_suffix('.md')}")
    return result


def markdown(r: dict[str, Any]) -> str:
    c = r["config"]
    load = r["machine"].get("load_average_1min", {"start": float("nan"), "end": float("nan")})
    lines = [f"# pam bench-serve: {r['model']} {r['model_version']}", "",
             f"payload `{c['payload']}`, threads {c['threads']}, workers {c['workers']}, executor `{c['executor']}`, "
             f"lazy {c['lazy']} (max loaded {c['max_loaded']}), {r['machine']['cpus']} CPUs; loopback, keep-alive "
             f"clients in one asyncio process. Server RSS: {r['server_rss_mb']['ready']:.0f} MB when ready, "
             f"{r['server_rss_mb']['end']:.0f} MB at the end. Load average (1 min) {load['start']:.1f} at the start, "
             f"{load['end']:.1f} at the end.", "",
             "| combination | MACs | clients | req/s | p50 ms | p95 ms | p99 ms | server execute p50 ms | errors |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for cell in r["http"]:
        lines.append(f"| {cell['combination']} | {cell['macs']} | {cell['clients']} | {cell['rps']:.0f} | "
                     f"{cell['p50_ms']:.3f} | {cell['p95_ms']:.3f} | {cell['p99_ms']:.3f} | "
                     f"{cell['server_execute_p50_ms']:.3f} | {cell['errors']} |")
    lines += ["", "| combination | direct execute p50 ms | direct calls/s | HTTP overhead p50 ms | "
                  "8-client req/s ÷ direct calls/s |", "| --- | ---: | ---: | ---: | ---: |"]
    for m, s in r["summary"].items():
        ratio = "n/a" if s["throughput_ratio_8_clients"] is None else f"{s['throughput_ratio_8_clients']:.1%}"
        lines.append(f"| {m} | {s['direct_execute_p50_ms']:.3f} | {s['direct_rps']:.0f} | "
                     f"{s['http_overhead_p50_ms']:.3f} | {ratio} |")
    return "\n".join(lines) + "\n"


