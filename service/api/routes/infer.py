"""``POST /infer?tasks=a,b``: the native endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from service import inference
from service.api.deps import PoolDep
from service.api.errors import ERROR_RESPONSES
from service.schemas import InferResponse

router = APIRouter(tags=["inference"])
_TASKS_ITEM = {"type": "string", "minLength": 1, "pattern": r"^[^,+\s]+([,+ ][^,+\s]+)*$"}

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
    tasks: list[str] | None = Query(
        None, description="tasks separated by ',', ' ' or '+' (may be repeated: tasks=a&tasks=b), any order; "
                          "omitted: all tasks", json_schema_extra={"items": _TASKS_ITEM}),
    strict: bool | None = Query(None, description="true: 404 for a combination without its own method "
                                                  "(default: PAM_STRICT_COMBINATIONS) instead of a superset method"),
) -> InferResponse:
    """Run only the method of the requested combination on an image (PNG/JPEG) or a JSON tensor; a
    combination without its own method runs its cheapest exported superset, extra outputs dropped."""
    resp = await inference.infer(pool, request, tasks)
    # Already validated by construction: serialise once here instead of FastAPI re-validating the
    # model against response_model (which still documents the schema).
    return Response(resp.model_dump_json(), media_type="application/json")  # type: ignore[return-value]
