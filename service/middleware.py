"""Pure-ASGI middleware around every HTTP request: request id, body limit (413), the in-flight
gauge, the per-request JSON log line and the Prometheus observations.

Handlers leave what they learnt (combination, method, batch, timings) in ``scope["state"]``
(``request.state``); this layer reads it once the response is sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.errors import ServiceError
from service.logging import log_request

log = logging.getLogger("pam.service")


class BodyTooLarge(ServiceError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, "body_too_large", f"request body exceeds {limit} bytes",
                         headers={"connection": "close"})  # the rest of the body is never read


class BodyTimeout(ServiceError):
    def __init__(self, seconds: float) -> None:
        super().__init__(408, "body_timeout", f"no body bytes for {seconds:g} s", headers={"connection": "close"})


TRIM_AFTER_BYTES = 256 * 1024  # after a request body this large, hand freed heap back to the OS
_TRIM_MIN_INTERVAL_S = 1.0
_last_trim = 0.0


def trim_heap() -> None:
    """glibc keeps freed arenas of large requests (measured: RSS 393 -> 481 MB after large bodies and
    stayed there); ``malloc_trim(0)`` returns them. At most once a second; a no-op elsewhere."""
    global _last_trim
    now = time.monotonic()
    if now - _last_trim < _TRIM_MIN_INTERVAL_S:
        return
    _last_trim = now
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


async def send_json(send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    raw = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": raw})


class RequestObserver:
    """Request id, body limits, in-flight gauge, metrics and log line around the FastAPI stack
    (``service.hotpath`` does the same itself for the inference requests it takes before that stack)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, body_timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        path: str = scope.get("path", "")
        counted = path == "/infer" or (path.startswith("/v2/models/") and path.endswith("/infer"))
        status = 500
        response_started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        received = 0

        body_done = False

        async def receive_wrapper() -> Message:
            nonlocal received, body_done
            if body_done:  # after the body, receive() waits for a disconnect: no timeout there
                return await receive()
            try:
                async with asyncio.timeout(self.body_timeout_s):
                    message = await receive()
            except TimeoutError as e:
                raise BodyTimeout(self.body_timeout_s) from e
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        if counted:
            metrics.IN_FLIGHT.inc()
        try:
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                err = BodyTooLarge(self.max_body_bytes) if length.isdigit() else \
                    ServiceError(400, "bad_content_length", "Content-Length is not a number")
                state["error"] = err.code
                await send_json(send_wrapper, err.status, err.body())
            else:
                await self.app(scope, receive_wrapper, send_wrapper)
        except (BodyTooLarge, BodyTimeout) as e:  # raised while a handler streamed the body
            state["error"] = e.code
            if not response_started:
                await send_json(send_wrapper, e.status, e.body(), e.headers)
        except Exception:  # a bug: never let it kill the connection without an answer
            log.exception("unhandled error on %s %s", scope.get("method"), path)
            state["error"] = "internal"
            if not response_started:
                await send_json(send_wrapper, 500, {"error": "internal", "detail": "internal error; see the log"})
        finally:
            if counted:
                metrics.IN_FLIGHT.dec()
            _observe(scope, state, rid, status, time.perf_counter() - started, received, counted)


def _observe(scope: Scope, state: dict[str, Any], rid: str, status: int, total: float, received: int,
             counted: bool) -> None:
    """After the response: the latency metrics and per-method statistics (inference paths only), the
    heap trim after a large body, and the request's log line."""
    path: str = scope.get("path", "")
    combination = state.get("combination") or metrics.NO_COMBINATION
    timings = state.get("timings_ms") or {}
    if counted:
        execute_ms = timings.get("execute")
        metrics.observe(combination, status, total, None if execute_ms is None else execute_ms / 1000.0)
        method = state.get("method")
        pool = getattr(getattr(scope.get("app"), "state", None), "pool", None)
        if method and pool is not None:
            pool.stats.request(method, ok=status == 200, images=int(state.get("batch") or 0), total_s=total,
                               queue_s=(timings.get("queue") or 0.0) / 1e3,
                               preprocess_s=(timings.get("preprocess") or 0.0) / 1e3,
                               postprocess_s=max(0.0, ((timings.get("total") or 0.0)
                                                       - (timings.get("preprocess") or 0.0)
                                                       - (timings.get("queue") or 0.0)
                                                       - (timings.get("execute") or 0.0)) / 1e3))
    if received > TRIM_AFTER_BYTES:
        trim_heap()
    log_request({
        "request_id": rid, "http_method": scope.get("method"), "path": path, "status": status,
        "combination": state.get("combination"), "method": state.get("method"), "batch": state.get("batch"),
        "executed_batch": state.get("executed_batch"),
        "error": state.get("error"),
        "timings_ms": {**timings, "server_total": round(total * 1000.0, 3)},
    })
