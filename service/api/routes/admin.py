"""``POST /admin/reload``: hot reload guarded by the admin token (SIGHUP does the same)."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request, Security
from fastapi.security import APIKeyHeader

from service import preprocess
from service.api.deps import PoolDep, SettingsDep
from service.api.errors import ADMIN_RESPONSES
from service.errors import ServiceError
from service.schemas import ReloadRequest, ReloadResponse

router = APIRouter(prefix="/admin", tags=["admin"])
# documented as the operation's security scheme (OpenAPI components.securitySchemes), checked here by hand
# so a missing token is a 401 with the service's error body
ADMIN_TOKEN = APIKeyHeader(name="X-Admin-Token", scheme_name="AdminToken", auto_error=False,
                           description="the admin token of the settings (PAM_ADMIN_TOKEN)")


@router.post("/reload", response_model=ReloadResponse, responses=ADMIN_RESPONSES, openapi_extra={
    # the body is read by hand (an empty body reloads the served bundle): documented here
    "requestBody": {"required": False, "content": {"application/json": {"schema": ReloadRequest.model_json_schema()}}}})
async def reload(
    request: Request,
    pool: PoolDep,
    settings: SettingsDep,
    x_admin_token: str | None = Security(ADMIN_TOKEN),
) -> ReloadResponse:
    """Probe a bundle (default: the served one, re-read) and swap to it; a bad one changes nothing. Only
    directories under the bundle root (PAM_BUNDLE_ROOT; default: the served bundle's parent) are read,
    regular files only, the manifest size-capped and (with PAM_MANIFEST_PUBLIC_KEY) signature-checked;
    refusals never quote a file."""
    if not settings.admin_token:
        raise ServiceError(403, "reload_disabled", "no admin token is configured (PAM_ADMIN_TOKEN)")
    if x_admin_token is None or not hmac.compare_digest(x_admin_token.encode(), settings.admin_token.encode()):
        raise ServiceError(401, "bad_token", "missing or wrong X-Admin-Token")
    body = await request.body()
    try:
        req = ReloadRequest.model_validate(preprocess.parse_json(body)) if body.strip() else ReloadRequest()
    except ValueError as e:
        raise ServiceError(422, "invalid_request", f"expected {{'bundle_dir': str | null}}: {str(e)[:200]}") from e
    if req.bundle_dir is not None and ("\x00" in req.bundle_dir or len(req.bundle_dir) > 4096):
        raise ServiceError(422, "invalid_request", "bundle_dir must be a path without NUL bytes, at most 4096 chars")
    result = await pool.reload(req.bundle_dir)
    model = result.model
    if not result.ok:
        extra: dict[str, object] = {"reloaded": False, "reason": result.code}
        if model is not None:
            extra.update(model=model.manifest.model_name, model_version=model.manifest.model_version,
                         bundle_dir=str(model.bundle_dir))
        code = "reload_refused" if result.status == 422 else result.code
        raise ServiceError(result.status, code, result.detail, extra=extra)
    assert model is not None
    request.app.state.on_model(model)
    return ReloadResponse(reloaded=True, model=model.manifest.model_name, model_version=model.manifest.model_version,
                          bundle_dir=str(model.bundle_dir), detail=result.detail)
