"""The load side of ``pam bench-serve``: a minimal asyncio HTTP/1.1 client (so the client's own cost
stays small next to the server's) driving keep-alive connections, and the raw requests it sends."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import numpy as np


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def build_request(path: str, payload: str, png: bytes, x: np.ndarray) -> bytes:
    if payload == "json":
        body = json.dumps({"inputs": x[0].tolist()}).encode()
        ctype = "application/json"
    elif payload == "multipart":
        boundary = "pambenchboundary"
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
                f"Content-Type: image/png\r\n\r\n"
            ).encode()
            + png
            + f"\r\n--{boundary}--\r\n".encode()
        )
        ctype = f"multipart/form-data; boundary={boundary}"
    else:
        body, ctype = png, "image/png"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


async def _client(
    port: int,
    request: bytes,
    n: int,
    lat: list[float],
    server_exec: list[float],
    errors: list[str],
    macs: list[int] | None = None,
) -> None:
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


async def drive(
    port: int, requests: list[bytes], clients: int, total: int, *, count_macs: bool = False
) -> dict[str, Any]:
    """``clients`` keep-alive connections sending ``total`` requests in all; client i sends
    ``requests[i mod k]`` (several requests: concurrent requests for different combinations). With
    ``count_macs`` the cell also says the MACs spent per request (of the method that ran, x rows)."""
    lat: list[float] = []
    server_exec: list[float] = []
    errors: list[str] = []
    macs: list[int] | None = [] if count_macs else None
    per = max(1, total // clients)
    t0 = time.perf_counter()
    await asyncio.gather(
        *(_client(port, requests[i % len(requests)], per, lat, server_exec, errors, macs) for i in range(clients))
    )
    wall = time.perf_counter() - t0
    ms = [v * 1e3 for v in lat]
    cell = {
        "clients": clients,
        "requests": len(lat),
        "errors": len(errors),
        "error_samples": errors[:3],
        "rps": len(lat) / wall,
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "server_execute_p50_ms": percentile(server_exec, 50),
    }
    if macs is not None:
        cell["macs_per_request"] = float(np.mean(macs)) if macs else None
    return cell
