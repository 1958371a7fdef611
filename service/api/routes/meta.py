"""``GET /tasks``, ``GET /metrics``, ``GET /dashboard`` (+ its live data)."""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from service import metrics
from service.api.deps import PoolDep
from service.schemas import MethodInfo, TaskInfo, TasksResponse

router = APIRouter(tags=["meta"])


@router.get("/tasks", response_model=TasksResponse)
async def tasks(pool: PoolDep) -> TasksResponse:
    """Tasks, exported combinations and the MACs of each combination's method."""
    model = pool.current()
    m = model.manifest
    loaded = set(model.runtime.loaded_methods())
    return TasksResponse(
        model=m.model_name, model_version=m.model_version,
        tasks=[TaskInfo(name=t.name, kind=t.kind, labels=t.labels) for t in m.tasks],
        combinations=[MethodInfo(combination=e.name, tasks=e.tasks, macs=e.macs, params=e.params,
                                 loaded=e.name in loaded) for e in m.methods],
        input_shape=m.input.shape, max_batch=m.input.max_batch,
    )


@router.get("/metrics", response_class=Response, include_in_schema=False)
async def prometheus() -> Response:
    body, ctype = metrics.render()
    return Response(body, media_type=ctype)


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
async def dashboard() -> HTMLResponse:
    html = resources.files("service.dashboard").joinpath("index.html").read_text(encoding="utf-8")
    return HTMLResponse(html, headers={"Cache-Control": "no-store"})


@router.get("/dashboard/data")
async def dashboard_data(request: Request, pool: PoolDep) -> dict[str, Any]:
    """Live p50/p95 per combination called so far (this process's window) and every method's MACs."""
    model = pool.model
    window = request.app.state.window.summary()
    macs = {e.name: e.macs for e in model.manifest.methods} if model else {}
    return {
        "model": model.manifest.model_name if model else None,
        "model_version": model.manifest.model_version if model else None,
        "ready": pool.ready,
        "in_queue": pool.waiting,
        "macs": macs,
        "combinations": {c: {**s, "macs": macs.get(c)} for c, s in sorted(window.items())},
    }
