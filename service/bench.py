"""``pam bench-serve``: the HTTP service on loopback against the runtime called directly and a bare
ASGI reference, with and without dynamic batching, in one run.

Measures, per combination: the runtime's own execute (direct, in this process, before any server
starts, so nothing competes for the cores); then, one after the other, each *variant* in a child
process driven by 1/8/32 concurrent keep-alive clients (a minimal asyncio HTTP/1.1 client, so the
client's own cost stays small next to the server's):

- ``reference``: ``service.bench_reference``, uvicorn + the same decode + the same runtime call,
  no framework: the Python HTTP limit on this machine;
- ``service``: ``pam serve --no-batching``;
- ``service+batching``: ``pam serve`` with dynamic batching (``--batch-window-us`` as configured).

All servers run at once and every cell is measured on each variant back to back, so a drift of the
machine's load (it is shared) falls on all variants alike.

Reports RPS, p50/p95/p99, errors, the HTTP overhead (p50 of ``/infer`` at one client minus p50 of
the direct execute), throughput relative to the direct runtime and to the reference, the batching
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
    variants: tuple[str, ...] = ("reference", "service", "service+batching")
    batch_window_us: int = 0  # the window of the service+batching variant
    attacks: bool = True  # after the cells: large requests, then RSS against its ready value
    attack_rounds: int = 20  # large photos and near-limit bodies sent (each), then 5 oversized heads
    mix: tuple[str, ...] | None = None  # combinations asked concurrently (client i: mix[i % k]) in "mix" cells


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
                  errors: list[str], macs: list[int] | None = None) -> None:
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
                answer = json.loads(body)
                server_exec.append(float(answer["timings_ms"]["execute"]))
                if macs is not None:
                    macs.append(int(answer["macs"]) * int(answer["batch"]))
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


async def _drive_mix(port: int, requests: list[bytes], clients: int, total: int) -> dict[str, Any]:
    """Client i asks for combination i mod k: concurrent requests for different combinations."""
    lat: list[float] = []
    server_exec: list[float] = []
    errors: list[str] = []
    macs: list[int] = []
    per = max(1, total // clients)
    t0 = time.perf_counter()
    await asyncio.gather(*(_client(port, requests[i % len(requests)], per, lat, server_exec, errors, macs)
                           for i in range(clients)))
    wall = time.perf_counter() - t0
    ms = [v * 1e3 for v in lat]
    return {"clients": clients, "requests": len(lat), "errors": len(errors), "error_samples": errors[:3],
            "rps": len(lat) / wall, "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95),
            "p99_ms": percentile(ms, 99), "server_execute_p50_ms": percentile(server_exec, 50),
            "macs_per_request": float(np.mean(macs)) if macs else None}


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
    if variant == "reference":
        return [sys.executable, "-m", "service.bench_reference", str(cfg.bundle_dir), "--port", str(port),
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
        raise ServiceError(2, "bad_variant", f"unknown variant {variant!r}; use reference, service, service+batching")
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
                asyncio.run(_drive(port, request, 1, 50))  # warm-up
            for c in cfg.clients:
                for v, (port, _) in servers.items():
                    cell = {"variant": v, "combination": m, "macs": manifest.method_for(m).macs,
                            **asyncio.run(_drive(port, request, c, max(cfg.requests, 4 * c)))}
                    out[v]["cells"].append(cell)
                    print(f"  {v:>16} {m:>22} x{c:<3}: {cell['rps']:7.0f} req/s  p50 {cell['p50_ms']:.3f}  "
                          f"p95 {cell['p95_ms']:.3f}  p99 {cell['p99_ms']:.3f} ms  errors {cell['errors']}",
                          flush=True)
        if cfg.mix:
            reqs = [build_request(f"/infer?tasks={c.replace('+', ',')}", cfg.payload, png, x) for c in cfg.mix]
            for c in cfg.clients:
                for v, (port, _) in servers.items():
                    if v == "reference":
                        continue
                    cell = {"variant": v, "combination": "mix:" + ";".join(cfg.mix), "macs": 0,
                            **asyncio.run(_drive_mix(port, reqs, c, max(cfg.requests, 4 * c)))}
                    out[v]["cells"].append(cell)
                    print(f"  {v:>16} {'mix':>22} x{c:<3}: {cell['rps']:7.0f} req/s  p50 {cell['p50_ms']:.3f} ms  "
                          f"MACs/request {cell['macs_per_request']}  errors {cell['errors']}", flush=True)
        for v, (_port, proc) in servers.items():
            out[v]["rss_end_mb"] = server_rss_mb(proc)
        for v, (port, proc) in servers.items():
            if not cfg.attacks or v == "reference":
                continue
            tasks = ",".join(manifest.method_for(methods[0]).tasks)
            out[v]["attack_statuses"] = attack(port, manifest, f"/infer?tasks={tasks}", cfg.attack_rounds)
            time.sleep(2.0)
            asyncio.run(_drive(port, build_request(f"/infer?tasks={tasks}", cfg.payload, png, x), 1, 20))
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
            if v in cfg.variants and "reference" in cfg.variants:
                s[v]["rps_8_over_reference"] = ratio(cell(v, m, 8), cell("reference", m, 8))
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


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0%}"


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def markdown(r: dict[str, Any]) -> str:
    c = r["config"]
    load = r["machine"].get("load_average_1min", {"start": float("nan"), "end": float("nan")})
    lines = [f"# pam bench-serve: {r['model']} {r['model_version']}", "",
             f"payload `{c['payload']}`, threads {c['threads']}, workers {c['workers']}, executor `{c['executor']}`, "
             f"lazy {c['lazy']} (max loaded {c['max_loaded']}), batching window {c.get('batch_window_us', 0)} us, "
             f"{r['machine']['cpus']} CPUs; loopback, keep-alive clients in one asyncio process. "
             f"Load average (1 min) {load['start']:.1f} at the start, {load['end']:.1f} at the end.", "",
             "| variant | combination | MACs | clients | req/s | p50 ms | p95 ms | p99 ms | server execute p50 ms "
             "| errors |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for cell in r["http"]:
        lines.append(f"| {cell['variant']} | {cell['combination']} | {cell['macs']} | {cell['clients']} | "
                     f"{cell['rps']:.0f} | {cell['p50_ms']:.3f} | {cell['p95_ms']:.3f} | {cell['p99_ms']:.3f} | "
                     f"{cell['server_execute_p50_ms']:.3f} | {cell['errors']} |")
    variants = [v for v in ("reference", "service", "service+batching", "service+union") if v in c["variants"]]
    lines += ["", "| combination | direct execute p50 ms | direct calls/s | "
              + " | ".join(f"{v}: HTTP overhead p50 ms | {v}: 8 clients ÷ direct" for v in variants)
              + " | service ÷ reference (8 clients) | service+batching ÷ reference (8) | batching gain 1/8/32 |",
              "| --- | ---: | ---: | " + " | ".join("---: | ---:" for _ in variants) + " | ---: | ---: | --- |"]
    for m, s in r["summary"].items():
        gain = s.get("batching_gain") or {}
        lines.append(
            f"| {m} | {s['direct_execute_p50_ms']:.3f} | {s['direct_rps']:.0f} | "
            + " | ".join(f"{_ms(s[v]['http_overhead_p50_ms'])} | {_pct(s[v]['rps_8_over_direct'])}" for v in variants)
            + f" | {_pct(s.get('service', {}).get('rps_8_over_reference'))} | "
              f"{_pct(s.get('service+batching', {}).get('rps_8_over_reference'))} | "
            + " / ".join("n/a" if g is None else f"{g:.2f}x" for g in gain.values()) + " |")
    if r.get("mix"):
        lines += ["", "Concurrent requests for different combinations (client i asks combination i mod k): "
                  "MACs spent per request (of the method that ran, x rows) against requests per second.", "",
                  "| variant | combinations | clients | req/s | p50 ms | MACs per request | errors |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for cell in r["mix"]:
            mpr = cell.get("macs_per_request")
            lines.append(f"| {cell['variant']} | {cell['combination'][4:]} | {cell['clients']} | {cell['rps']:.0f} | "
                         f"{cell['p50_ms']:.3f} | {'n/a' if mpr is None else f'{mpr:,.0f}'} | {cell['errors']} |")
    lines += ["", "| server | RSS ready MB | after the cells MB | after large requests MB | statuses of the large "
                  "requests | alive |", "| --- | ---: | ---: | ---: | --- | --- |"]
    for sv in r.get("servers", []):
        after = sv.get("rss_after_attacks_mb")
        lines.append(f"| {sv['variant']} | {sv['rss_ready_mb']:.0f} | {sv['rss_end_mb']:.0f} | "
                     f"{'n/a' if after is None else f'{after:.0f}'} | {sv.get('attack_statuses', 'n/a')} | "
                     f"{sv.get('alive_after_attacks', 'n/a')} |")
    return "\n".join(lines) + "\n"
