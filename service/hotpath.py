"""The two inference endpoints as plain ASGI callables: ``POST /infer`` and the V2 infer route.

Profiled under 8 clients (``results/serve-profile.md``), the FastAPI route spent about as much per
request as the whole bare ASGI app (``pam bench-serve``'s ``bare`` variant): routing through every
route's regex, dependency solving, query validation, a ``Request`` object, two middleware wrappers
around ``receive``/``send``, a pydantic response model, ``labels()`` on three metrics, a
``LogRecord`` formatted and written on the loop, ``uuid4`` and the hop to the runtime thread. Here
one function per request does only what the service promises: limits (413/408), the resolved
combination (cached per query string), the decode, the runtime call, the JSON answer (orjson), then
the observations (metric children bound once, the log line queued for the listener thread). Every
refusal is the same JSON as elsewhere.

``PamApp.__call__`` (service/main.py) sends ``POST /infer`` and ``POST /v2/models/.../infer``
here before FastAPI's stack; the same callables are also mounted as Starlette routes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from typing import Any
from urllib.parse import parse_qsl

import numpy as np

from mobile_export.errors import ExportError
from service import fastjson, metrics, preprocess, v2_binary, v2_protocol
from service.combinations import Resolved, resolve, split_tasks
from service.errors import ServiceError
from service.logging import log_request
from service.middleware import TRIM_AFTER_BYTES, trim_heap

log = logging.getLogger("pam.service")
_JSON = (b"content-type", b"application/json")
_RESOLVED_CACHE_MAX = 512
_RID_PREFIX = os.urandom(10).hex()  # 20 random hex digits per process, then a counter: 32 like a uuid4
_rid_counter = itertools.count(1)


class Ctx:
    """What the observation (metrics, statistics, log line) needs from one request."""

    __slots__ = ("batch", "combination", "error", "executed_batch", "method", "received", "rid", "timings")

    def __init__(self, rid: str) -> None:
        self.rid = rid
        self.combination: str | None = None
        self.method: str | None = None
        self.batch: int | None = None
        self.executed_batch: int | None = None
        self.error: str | None = None
        self.timings: dict[str, float] | None = None
        self.received = 0


def _request_id(headers: dict[bytes, bytes]) -> str:
    rid = headers.get(b"x-request-id")
    if rid:
        return rid.decode("latin-1")[:64]
    return f"{_RID_PREFIX}{next(_rid_counter):012x}"  # unique per process; uuid4/urandom cost 3 % (profiled)


def strict_value(raw: str | None, default: bool) -> bool:
    if raw is None:
        return default
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ServiceError(400, "bad_parameter", f"strict={raw[:40]!r}: use true or false")


class HotPath:
    """The inference endpoints of one app (its settings, runtime pool and dashboard window)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.settings = app.state.settings
        self.pool = app.state.pool
        self.window = app.state.window
        self.max_body = self.settings.max_body_bytes
        self.body_timeout = self.settings.body_timeout_s

    # ------------------------------------------------------------------------------ ASGI entry
    async def infer(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self._serve(scope, receive, send, self._infer)

    async def v2_infer(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self._serve(scope, receive, send, self._v2)

    async def _serve(self, scope: dict[str, Any], receive: Any, send: Any, handler: Any) -> None:
        started = time.perf_counter()
        headers = dict(scope["headers"])
        ctx = Ctx(_request_id(headers))
        metrics.IN_FLIGHT.inc()
        status = 500
        extra: dict[str, str] | None = None
        try:
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                raise (ServiceError(413, "body_too_large", f"request body exceeds {self.max_body} bytes")
                       if length.isdigit() else
                       ServiceError(400, "bad_content_length", "Content-Length is not a number"))
            status, body, extra = await handler(scope, receive, headers, ctx)
        except ServiceError as e:
            status, body, extra = e.status, fastjson.dumps(e.body()), e.headers
            ctx.error = e.code
        except Exception:  # a bug: never let it kill the connection without an answer
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            ctx.error = "internal"
            status, body = 500, b'{"error":"internal","detail":"internal error; see the log"}'
        try:
            hdrs = [_JSON if not extra or "content-type" not in extra else
                    (b"content-type", extra["content-type"].encode()),
                    (b"content-length", str(len(body)).encode()), (b"x-request-id", ctx.rid.encode())]
            if extra:
                hdrs += [(k.lower().encode(), v.encode()) for k, v in extra.items() if k != "content-type"]
            await send({"type": "http.response.start", "status": status, "headers": hdrs})
            await send({"type": "http.response.body", "body": body})
        finally:
            metrics.IN_FLIGHT.dec()
            self._observe(scope, ctx, status, time.perf_counter() - started)

    def _observe(self, scope: dict[str, Any], ctx: Ctx, status: int, total: float) -> None:
        t = ctx.timings or {}
        execute_ms = t.get("execute")
        metrics.observe(ctx.combination or metrics.NO_COMBINATION, status, total,
                        None if execute_ms is None else execute_ms / 1000.0)
        if ctx.method:
            pre, queue = t.get("preprocess") or 0.0, t.get("queue") or 0.0
            post = max(0.0, (t.get("total") or 0.0) - pre - queue - (execute_ms or 0.0))
            self.pool.stats.request(ctx.method, ok=status == 200, images=ctx.batch or 0, total_s=total,
                                    queue_s=queue / 1e3, preprocess_s=pre / 1e3, postprocess_s=post / 1e3)
        if ctx.received > TRIM_AFTER_BYTES:
            trim_heap()
        log_request({
            "request_id": ctx.rid, "http_method": scope.get("method"), "path": scope.get("path"), "status": status,
            "combination": ctx.combination, "method": ctx.method, "batch": ctx.batch,
            "executed_batch": ctx.executed_batch, "error": ctx.error,
            "timings_ms": {**t, "server_total": round(total * 1000.0, 3)},
        })

    # ------------------------------------------------------------------------------ body
    async def _body(self, receive: Any, headers: dict[bytes, bytes], limit: int, ctx: Ctx) -> bytes:
        """The body, refused with 413 as soon as it passes ``limit`` (declared or counted) and with 408
        when chunks come more than ``body_timeout_s`` apart."""
        declared = headers.get(b"content-length")
        if declared is not None and int(declared) > limit:
            raise ServiceError(413, "body_too_large",
                               f"a body of {int(declared)} bytes exceeds {limit} bytes for this input")
        # uvicorn's receive() returns at once when the body is already in (the common case): no timer then
        ready = getattr(getattr(receive, "__self__", None), "message_event", None)
        chunks: list[bytes] = []
        size = 0
        while True:
            if ready is not None and ready.is_set():
                msg = await receive()
            else:
                try:
                    async with asyncio.timeout(self.body_timeout):
                        msg = await receive()
                except TimeoutError:
                    raise ServiceError(408, "body_timeout", f"no body bytes for {self.body_timeout:g} s",
                                       headers={"connection": "close"}) from None
            if msg["type"] != "http.request":
                break  # the client went away
            chunk = msg.get("body", b"")
            size += len(chunk)
            ctx.received = size
            if size > limit:
                raise ServiceError(413, "body_too_large", f"request body exceeds {limit} bytes for this input",
                                   headers={"connection": "close"})  # the rest is never read
            if chunk:
                chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    # ------------------------------------------------------------------------------ /infer
    def _resolve(self, model: Any, query: bytes) -> tuple[Resolved, bool]:
        cache = self.pool._resolved
        hit = cache.get(query)
        if hit is not None and hit[2] is model:
            return hit[0], hit[1]
        tasks: list[str] | None = None
        strict_raw: str | None = None
        for k, v in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
            if k == "tasks":
                (tasks := tasks if tasks is not None else []).append(v)
            elif k == "strict":
                strict_raw = v
        strict = strict_value(strict_raw, self.settings.strict_combinations)
        resolved = resolve(model.manifest, split_tasks(tasks), strict=strict)
        if len(cache) >= _RESOLVED_CACHE_MAX:
            cache.clear()
        cache[query] = (resolved, strict, model)
        return resolved, strict

    async def _input(self, scope: dict[str, Any], receive: Any, headers: dict[bytes, bytes], ctx: Ctx,
                     manifest: Any) -> np.ndarray:
        s = self.settings
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower().decode("latin-1")
        if ctype in preprocess.IMAGE_TYPES or ctype == "application/octet-stream":
            body = await self._body(receive, headers, self.max_body, ctx)
            return await preprocess.decode_image_async(body, manifest, s.max_image_pixels, s.decode_inline_pixels)
        if ctype in ("application/json", ""):
            body = await self._body(receive, headers, preprocess.json_body_limit(manifest, self.max_body), ctx)
            return await preprocess.off_loop(preprocess.tensor_from_json, body, manifest, size=len(body))
        if ctype == "multipart/form-data":
            body = await self._body(receive, headers, self.max_body, ctx)
            return await _multipart(scope, body, manifest, s)
        raise ServiceError(415, "unsupported_media_type",
                           f"content type {ctype!r}; send application/json, multipart/form-data, image/png or "
                           f"image/jpeg")

    async def _run(self, model: Any, method: str, x: np.ndarray, tasks: list[str], strict: bool, ctx: Ctx) -> Any:
        ctx.method, ctx.batch = method, int(x.shape[0])
        try:
            ex = await self.pool.execute(model, method, x, tasks=tasks, strict=strict)
        except ExportError as e:
            raise ServiceError(422, e.code, e.message) from e
        ctx.method, ctx.executed_batch = ex.method, ex.batch_rows
        return ex

    async def _infer(self, scope: dict[str, Any], receive: Any, headers: dict[bytes, bytes],
                     ctx: Ctx) -> tuple[int, bytes, dict[str, str] | None]:
        t0 = time.perf_counter()
        model = self.pool.current()
        manifest = model.manifest
        resolved, strict = self._resolve(model, scope.get("query_string", b""))
        ctx.combination, ctx.method = resolved.combination, resolved.method.name
        x = await self._input(scope, receive, headers, ctx, manifest)
        t1 = time.perf_counter()
        ex = await self._run(model, resolved.method.name, x, resolved.tasks, strict, ctx)
        preds = predictions(model, resolved.tasks, ex.tasks, ex.outputs)
        t2 = time.perf_counter()
        timings = {"preprocess": round((t1 - t0) * 1e3, 4), "queue": round(ex.queue_s * 1e3, 4),
                   "execute": round(ex.execute_s * 1e3, 4), "total": round((t2 - t0) * 1e3, 4)}
        ctx.timings = timings
        self.window.add(resolved.combination, timings["total"], timings["execute"])
        body = fastjson.dumps({
            "request_id": ctx.rid, "model": manifest.model_name, "model_version": manifest.model_version,
            "combination": resolved.combination, "method": ex.method, "superset": ex.method != resolved.combination,
            "macs": model.entries[ex.method].macs, "batch": int(x.shape[0]), "executed_batch": ex.batch_rows,
            "predictions": preds, "timings_ms": timings})
        return 200, body, None

    # ------------------------------------------------------------------------------ V2
    async def _v2(self, scope: dict[str, Any], receive: Any, headers: dict[bytes, bytes],
                  ctx: Ctx) -> tuple[int, bytes, dict[str, str] | None]:
        t0 = time.perf_counter()
        target = v2_protocol.infer_target(scope["path"])
        if target is None:
            raise ServiceError(404, "not_found", "Not Found")
        model = v2_protocol.model_named(self.pool, *target)
        manifest = model.manifest
        ctype = headers.get(b"content-type", b"application/json").split(b";")[0].strip().lower().decode("latin-1")
        if ctype not in ("application/json", "application/octet-stream", ""):
            raise ServiceError(415, "unsupported_media_type",
                               f"content type {ctype!r}; send application/json (binary tensors: octet-stream or none)")
        if headers.get(b"content-encoding", b"identity").lower() != b"identity":
            raise ServiceError(415, "unsupported_encoding", "compressed requests are not accepted; send identity")
        body = await self._body(receive, headers, preprocess.json_body_limit(manifest, self.max_body), ctx)
        hl = headers.get(v2_binary.HEADER.encode())
        req = await preprocess.off_loop(v2_protocol.parse_v2, body, None if hl is None else hl.decode("latin-1"),
                                        manifest, size=len(body))
        strict = req.strict if req.strict is not None else self.settings.strict_combinations
        resolved = resolve(manifest, req.tasks, strict=strict)
        ctx.combination, ctx.method = resolved.combination, resolved.method.name
        x = await preprocess.off_loop(preprocess.check_tensor, req.values, manifest, req.shape, req.may_have_bools,
                                      size=len(body))
        t1 = time.perf_counter()
        ex = await self._run(model, resolved.method.name, x, resolved.tasks, strict, ctx)
        outputs, binaries = v2_protocol.infer_outputs(model, req, resolved.tasks, ex)
        t2 = time.perf_counter()
        timings = {"preprocess": round((t1 - t0) * 1e3, 4), "queue": round(ex.queue_s * 1e3, 4),
                   "execute": round(ex.execute_s * 1e3, 4), "total": round((t2 - t0) * 1e3, 4)}
        ctx.timings = timings
        self.window.add(resolved.combination, timings["total"], timings["execute"])
        header = {"model_name": manifest.model_name, "model_version": manifest.model_version,
                  "id": req.id or os.urandom(16).hex(),
                  "parameters": {"combination": resolved.combination, "method": ex.method,
                                 "superset": ex.method != resolved.combination,
                                 "macs": model.entries[ex.method].macs, "executed_batch": ex.batch_rows,
                                 "timings_ms": timings, "content": "probabilities"},
                  "outputs": outputs}
        raw, hdrs = v2_binary.encode_response(header, binaries)
        return 200, raw, hdrs


def predictions(model: Any, tasks: list[str], ran: list[str], outputs: list[np.ndarray]) -> list[dict[str, Any]]:
    """Per image, the requested ``tasks`` only (the extra outputs of a superset method are dropped)."""
    by_task = dict(zip(ran, outputs, strict=True))
    n = outputs[0].shape[0]
    per_item: list[dict[str, Any]] = [{} for _ in range(n)]
    for task_name in tasks:
        kind, labels = model.task_info[task_name]
        probs = preprocess.finite_scores(kind, by_task[task_name], task_name)
        rows = probs.tolist()
        if kind == "classes":
            best = probs.argmax(axis=1).tolist()
            for i in range(n):
                per_item[i][task_name] = {"label": labels[best[i]], "scores": dict(zip(labels, rows[i], strict=True))}
        else:
            for i in range(n):
                per_item[i][task_name] = {"label": [lab for lab, p in zip(labels, rows[i], strict=True) if p >= 0.5],
                                          "scores": dict(zip(labels, rows[i], strict=True))}
    return per_item


async def _multipart(scope: dict[str, Any], body: bytes, manifest: Any, settings: Any) -> np.ndarray:
    """A multipart body (already read within the limits) -> the image's network input."""
    from starlette.requests import Request

    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    request = Request(scope, replay)
    try:
        form = await request.form(max_files=1, max_fields=4)
    except Exception as e:  # python-multipart's parse errors are not one type
        raise ServiceError(400, "bad_multipart", f"cannot parse the multipart body: {str(e)[:200]}") from e
    try:
        upload = form.get("image") or next((v for v in form.values() if hasattr(v, "read")), None)
        if upload is None or isinstance(upload, str):
            raise ServiceError(400, "missing_image", "multipart body has no file part (name it 'image')")
        file_type = (upload.content_type or "").lower()
        if file_type and file_type not in preprocess.IMAGE_TYPES and file_type != "application/octet-stream":
            raise ServiceError(415, "unsupported_media_type", f"file of type {file_type}; send image/png or image/jpeg")
        data = await upload.read()
    finally:
        await form.close()
    return await preprocess.decode_image_async(data, manifest, settings.max_image_pixels,
                                               settings.decode_inline_pixels)
