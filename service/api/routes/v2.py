"""KServe V2 (Open Inference Protocol) endpoints, so existing clients (``tritonclient[http]``) work unchanged.

Thin routes over ``service.v2_protocol`` (the protocol's logic); the infer route itself is served by
``service.hotpath`` and documented in ``service.openapi_doc``. Extensions: binary tensor data (both
directions), model configuration and statistics.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from service import v2_protocol as v2
from service.api.deps import PoolDep
from service.api.errors import ERROR_RESPONSES
from service.errors import ServiceError
from service.schemas import V2Live, V2ModelMetadata, V2Ready, V2ServerMetadata

router = APIRouter(prefix="/v2", tags=["kserve-v2"])


@router.get("", response_model=V2ServerMetadata)
async def server_metadata() -> V2ServerMetadata:
    return v2.server_metadata()


@router.get("/health/live", response_model=V2Live)
async def live() -> V2Live:
    return V2Live(live=True)


@router.get("/health/ready", response_model=V2Ready, responses={503: {"model": V2Ready}})
async def ready(pool: PoolDep, request: Request) -> V2Ready:
    """True once the model can answer; 503 (and false) while loading or after a failed load."""
    if not pool.ready:
        raise ServiceError(503, "not_ready", pool.error or "the model is still loading", extra={"ready": False})
    return V2Ready(ready=True)


@router.get("/models/stats")
async def all_stats(pool: PoolDep) -> dict[str, Any]:
    """Statistics of every loaded model (one here), per method under ``methods``."""
    return v2.model_stats(pool.current(), pool)


@router.get("/models/{name}", response_model=V2ModelMetadata, responses=ERROR_RESPONSES)
async def metadata(name: str, pool: PoolDep) -> V2ModelMetadata:
    return v2.model_metadata(v2.model_named(pool, name))


@router.get("/models/{name}/versions/{version}", response_model=V2ModelMetadata, responses=ERROR_RESPONSES)
async def metadata_version(name: str, version: str, pool: PoolDep) -> V2ModelMetadata:
    return v2.model_metadata(v2.model_named(pool, name, version))


@router.get("/models/{name}/ready", response_model=V2Ready, responses=ERROR_RESPONSES)
async def model_ready(name: str, pool: PoolDep) -> V2Ready:
    """200 once the model answers (clients such as tritonclient read the status, not the body)."""
    v2.model_named(pool, name)  # 503 not_ready while loading, 404 for another model
    return V2Ready(ready=True)


@router.get("/models/{name}/versions/{version}/ready", response_model=V2Ready, responses=ERROR_RESPONSES)
async def model_ready_version(name: str, version: str, pool: PoolDep) -> V2Ready:
    v2.model_named(pool, name, version)
    return V2Ready(ready=True)


@router.get("/models/{name}/config", responses=ERROR_RESPONSES)
async def config(name: str, pool: PoolDep) -> dict[str, Any]:
    """Triton's model configuration extension."""
    return v2.model_config(v2.model_named(pool, name), pool)


@router.get("/models/{name}/versions/{version}/config", responses=ERROR_RESPONSES)
async def config_version(name: str, version: str, pool: PoolDep) -> dict[str, Any]:
    return v2.model_config(v2.model_named(pool, name, version), pool)


@router.get("/models/{name}/stats", responses=ERROR_RESPONSES)
async def stats(name: str, pool: PoolDep) -> dict[str, Any]:
    """Triton's statistics extension: request counts and durations, executes, executes per batch size."""
    return v2.model_stats(v2.model_named(pool, name), pool)


@router.get("/models/{name}/versions/{version}/stats", responses=ERROR_RESPONSES)
async def stats_version(name: str, version: str, pool: PoolDep) -> dict[str, Any]:
    return v2.model_stats(v2.model_named(pool, name, version), pool)
