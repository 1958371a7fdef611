"""Bounded work per request and no 500 for a client's mistake: image bombs, huge or slow request
heads and bodies, odd paths for reload; the one rule for `tasks`; MPO photos; log lines of refusals."""

from __future__ import annotations

import io
import json
import socket
import struct
import time
import zlib
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from tests.service_support import Server, digit_images, digits_bundle, normalise, serve


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("serve-limits") / "server.log"
    with serve(digits_bundle(), log, "--no-probe", "--header-timeout", "1", "--body-timeout", "1",
               "--max-header-bytes", "8192", "--max-connections", "24") as s:
        yield s


def png_declaring(w: int, h: int, rows: int = 1) -> bytes:
    """A valid 8-bit grey PNG header declaring w x h, with ``rows`` rows of zeros compressed (a bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    idat = zlib.compress(b"\0" * ((1 + w) * rows), 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def jpeg_declaring(w: int, h: int) -> bytes:
    """A small real JPEG whose SOF0 header is patched to declare w x h."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (16, 16), 128).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    i = data.index(b"\xff\xc0")
    data[i + 5:i + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def post_image(server: Server, data: bytes, ctype: str = "image/png", tasks: str = "digit") -> httpx.Response:
    return httpx.post(server.url + "/infer", params={"tasks": tasks}, content=data,
                      headers={"content-type": ctype}, timeout=30)


@pytest.mark.parametrize("name,data,ctype", [
    ("png 20000x20000 bomb", png_declaring(20000, 20000, rows=64), "image/png"),
    ("jpeg declaring 60000x60000", jpeg_declaring(60000, 60000), "image/jpeg"),
    ("png 16777216x1", png_declaring(16777216, 1), "image/png"),
    ("png 10000x10000", png_declaring(10000, 10000, rows=8), "image/png"),
])
def test_image_bombs_are_refused_with_400_before_decoding(server: Server, name: str, data: bytes, ctype: str) -> None:
    assert len(data) < 64 * 1024
    t0 = time.perf_counter()
    r = post_image(server, data, ctype)
    took = time.perf_counter() - t0
    assert r.status_code == 400, (name, r.status_code, r.text)
    assert r.json()["error"] == "image_too_large" and "pixels" in r.json()["detail"]
    assert took < 2.0, (name, took)  # refused from the header, not after decoding millions of pixels
    assert httpx.get(server.url + "/v2/health/live").status_code == 200


def test_the_declared_size_is_checked_before_any_pixel_is_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import ImageFile

    from mobile_export.manifest import Manifest
    from service import preprocess
    from service.errors import ServiceError

    manifest = Manifest.load(digits_bundle())
    decoded: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def spy(self):  # type: ignore[no-untyped-def]
        decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    limit = preprocess.image_pixel_limit(manifest)
    assert limit < 16777216
    with pytest.raises(ServiceError) as e:
        preprocess.decode_image(png_declaring(16777216, 1), manifest)
    assert e.value.status == 400 and e.value.code == "image_too_large" and decoded == []
    side = int(limit ** 0.5)
    x = preprocess.decode_image(png_declaring(side, side, rows=side), manifest)  # at the limit: decoded
    assert decoded and set(decoded) == {(side, side)} and x.shape == (1, 1, 8, 8)


def test_a_huge_request_head_gets_431_and_the_server_keeps_answering(server: Server) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 431"), reply[:200]
    assert b"header_too_large" in reply
    r = httpx.get(server.url + "/v2/health/live", headers={"x-ok": "a" * 4000})
    assert r.status_code == 200


def test_slow_request_heads_and_bodies_are_cut(server: Server) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        t0 = time.perf_counter()
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # the head never ends
        assert s.recv(4096) == b""  # closed by the server
        assert time.perf_counter() - t0 < 6
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        t0 = time.perf_counter()
        s.sendall(b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                  b'{"inputs":')  # 90 bytes never come
        reply = b""
        while chunk := s.recv(4096):  # until the server closes the connection
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b"body_timeout" in reply and b"connection: close" in reply and time.perf_counter() - t0 < 6


def test_connections_beyond_the_limit_get_503(server: Server) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(24)]
    try:
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 503")
    finally:
        for s in idle:
            s.close()
    deadline = time.time() + 10
    while httpx.get(server.url + "/v2/health/live").status_code != 200:
        assert time.time() < deadline
        time.sleep(0.1)


def test_a_large_json_body_is_refused_by_its_declared_length(server: Server) -> None:
    body = json.dumps({"inputs": np.zeros((4, 1, 8, 8)).tolist()}).encode() + b" " * (1 << 20)
    r = httpx.post(server.url + "/infer?tasks=digit", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"


def test_reload_with_a_nul_byte_in_the_path_is_a_422(server: Server) -> None:
    r = httpx.post(server.url + "/admin/reload", json={"bundle_dir": "/tmp/a\u0000b"},
                   headers={"x-admin-token": server.token})
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    assert httpx.post(server.url + "/infer?tasks=digit",
                      json={"inputs": normalise(digit_images()[:1], server.bundle).tolist()}).status_code == 200


def test_tasks_may_be_repeated_and_separated_by_comma_space_or_plus(server: Server) -> None:
    x = {"inputs": normalise(digit_images()[:1], server.bundle).tolist()}
    urls = ["/infer?tasks=digit&tasks=parity", "/infer?tasks=digit+parity", "/infer?tasks=parity%2Bdigit",
            "/infer?tasks=digit,parity", "/infer?tasks=parity%20digit&tasks=digit"]
    answers = []
    for url in urls:
        r = httpx.post(server.url + url, json=x)
        assert r.status_code == 200, (url, r.text)
        assert r.json()["method"] == "digit+parity" and set(r.json()["predictions"][0]) == {"digit", "parity"}
        answers.append(r.json()["predictions"])
    assert all(a == answers[0] for a in answers)
    r = httpx.post(server.url + "/infer?tasks=digit;parity", json=x)
    assert r.status_code == 400 and r.json()["error"] == "unknown_task" and "tasks=a,b" in r.json()["detail"]


def test_a_jpeg_with_an_mpf_segment_decodes_its_first_frame(server: Server) -> None:
    from PIL import Image

    img = Image.fromarray(np.round(digit_images()[0, 0] * 255).astype(np.uint8), mode="L").resize((32, 32))
    other = Image.fromarray(255 - np.asarray(img))
    mpo, jpg = io.BytesIO(), io.BytesIO()
    img.save(mpo, format="MPO", save_all=True, append_images=[other], quality=95)
    img.save(jpg, format="JPEG", quality=95)
    assert Image.open(io.BytesIO(mpo.getvalue())).format == "MPO"
    a, b = post_image(server, mpo.getvalue(), "image/jpeg"), post_image(server, jpg.getvalue(), "image/jpeg")
    assert a.status_code == 200 and b.status_code == 200, (a.text, b.text)
    assert a.json()["predictions"] == b.json()["predictions"]


def _json_or_none(line: str) -> dict | None:
    try:
        out = json.loads(line)
    except ValueError:
        return None
    return out if isinstance(out, dict) else None


def test_refusals_log_their_error_code(server: Server) -> None:
    r = httpx.post(server.url + "/infer", content=b"0" * 5_000_000, headers={"content-type": "application/json",
                                                                            "x-request-id": "log-413"})
    assert r.status_code == 413
    r = post_image(server, png_declaring(16777216, 1), tasks="digit")
    rid = r.headers["x-request-id"]
    lines: dict[str, dict] = {}
    for _ in range(50):  # the server writes its log lines after answering: wait (on a loaded machine) for both
        # A line still being written is not JSON yet: skip it and read again.
        lines = {d["request_id"]: d for d in map(_json_or_none, server.log_lines()) if d and "request_id" in d}
        if {"log-413", rid} <= set(lines):
            break
        time.sleep(0.1)
    assert lines["log-413"]["error"] == "body_too_large" and lines["log-413"]["status"] == 413
    assert lines[rid]["error"] == "image_too_large" and lines[rid]["status"] == 400


@pytest.mark.slow
def test_resident_memory_comes_back_after_large_requests(server: Server) -> None:
    import psutil
    from PIL import Image

    proc = psutil.Process(server.proc.pid)
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (1000, 1000), dtype=np.uint8), mode="L").save(buf, format="PNG")
    noise = buf.getvalue()  # ~1 MB, 1 megapixel: decoded and resized
    x = {"inputs": normalise(digit_images()[:4], server.bundle).tolist()}
    for _ in range(20):
        httpx.post(server.url + "/infer?tasks=digit", json=x)
    ready = proc.memory_info().rss
    for _ in range(30):
        assert post_image(server, noise).status_code == 200
        assert httpx.post(server.url + "/infer", content=b"0" * 4_000_000,
                          headers={"content-type": "image/png"}).status_code in (400, 413, 415)
    time.sleep(1.5)
    httpx.post(server.url + "/infer?tasks=digit", content=noise, headers={"content-type": "image/png"})
    after = proc.memory_info().rss
    assert after <= ready * 1.10, (ready / 2**20, after / 2**20)
