"""``POST /infer?tasks=a,b``: the native endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request

from service import inference
from service.api.deps import PoolDep
from service.api.errors import ERROR_RESPONSES
from service.schemas import InferResponse

router = APIRouter(tags=["inference"])

_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/TensorRequest"}},
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["image"],
                           "properties": {"image": {"type": "string", "format": "binary"}}}
            },
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.post("/infer", response_model=InferResponse, responses=ERROR_RESPONSES, openapi_extra=_BODY_DOC)
async def infer(
    request: Request,
    pool: PoolDep,
    tasks: str | None = Query(None, description="comma-separated tasks, any order; omitted: all tasks"),
) -> InferResponse:
    """Run only the method of the requested combination on an image (PNG/JPEG) or a JSON tensor."""
    return await inference.infer(pool, request, tasks)
