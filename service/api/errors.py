"""Exception handlers: every refusal is JSON ``{"error": code, "detail": reason}`` with its status."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import ServiceError
from service.schemas import ErrorResponse

ADMIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": why}
    for code, why in [(401, "missing or wrong X-Admin-Token"),
                      (403, "reload disabled (no admin token configured), or bundle_dir outside the bundle root"),
                      (413, "body too large"), (422, "malformed body, or the bundle was refused (the old one keeps "
                                                     "serving)")]
}

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": why}
    for code, why in [(400, "bad request: unknown or empty tasks, unreadable or oversized image"),
                      (404, "unknown model, or a combination not exported (strict)"),
                      (408, "the body arrived too slowly"), (413, "body too large"), (415, "unsupported media type"),
                      (422, "wrong tensor shape, dtype or batch; malformed JSON"),
                      (503, "queue full or model not ready (Retry-After)"), (504, "per-request timeout")]
}


def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    request.state.error = exc.code
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()[:3]]
    request.state.error = "invalid_request"
    return JSONResponse({"error": "invalid_request", "detail": "; ".join(parts)}, status_code=422)


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    request.state.error = code
    return JSONResponse({"error": code, "detail": str(exc.detail)}, status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


def install(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
