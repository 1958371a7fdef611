"""The FastAPI application: ``create_app(settings)``, or ``app_from_env()`` for uvicorn workers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service import metrics
from service.api import errors
from service.api.routes import admin, infer, meta, v2
from service.core.config import Settings
from service.logging import configure
from service.middleware import RequestObserver
from service.runtime_pool import LoadedModel, RuntimePool
from service.schemas import TensorRequest, V2InferRequestDoc

log = logging.getLogger("pam.service")


def _on_model(model: LoadedModel) -> None:
    m = model.manifest
    metrics.MODEL_INFO.clear()
    metrics.MODEL_INFO.labels(m.model_name, m.model_version).set(1)
    for e in m.methods:
        metrics.METHOD_MACS.labels(e.name).set(e.macs)


def _install_sighup(app: FastAPI, pool: RuntimePool) -> bool:
    """SIGHUP reloads the served bundle (main thread only: under a test's in-thread server, skip)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGHUP"):
        return False
    loop = asyncio.get_running_loop()

    async def reload() -> None:
        ok, detail, model = await pool.reload(None)
        log.info("SIGHUP reload: %s", detail)
        if ok and model is not None:
            _on_model(model)

    loop.add_signal_handler(signal.SIGHUP, lambda: app.state.tasks.add(loop.create_task(reload())))
    return True


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    configure(settings.log_format, settings.log_level)
    pool = RuntimePool(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.bundle_dir is not None:
            loader = pool.start_loading(settings.bundle_dir)

            async def publish() -> None:
                await asyncio.to_thread(loader.join)
                if pool.model is not None:
                    _on_model(pool.model)

            app.state.tasks.add(asyncio.get_running_loop().create_task(publish()))
        _install_sighup(app, pool)
        yield
        pool.shutdown()

    app = FastAPI(
        title="pam-mobile device runtime",
        version="1",
        summary="One ExecuTorch program, one method per task combination: only the requested combination runs.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.pool = pool
    app.state.window = metrics.LatencyWindow(settings.dashboard_window)
    app.state.on_model = _on_model
    app.state.tasks = set()
    errors.install(app)
    for router in (infer.router, v2.router, meta.router, admin.router):
        app.include_router(router)
    app.add_middleware(RequestObserver, max_body_bytes=settings.max_body_bytes, body_timeout_s=settings.body_timeout_s)

    def openapi() -> dict[str, Any]:
        # Bodies parsed by hand (to map every malformed body to a 4xx) still get documented schemas.
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (TensorRequest, V2InferRequestDoc):
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(js.pop("$defs", {}))
                comps[model.__name__] = js
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` and worker processes: settings from ``PAM_*``."""
    return create_app(Settings())
