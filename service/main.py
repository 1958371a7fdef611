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
from starlette.routing import Route

from service import metrics
from service.api import errors
from service.api.errors import ERROR_RESPONSES
from service.api.routes import admin, meta, v2
from service.core.config import Settings
from service.hotpath import HotPath
from service.logging import configure
from service.middleware import RequestObserver
from service.model_loading import LoadedModel
from service.openapi_doc import add_hot_routes
from service.runtime_pool import RuntimePool
from service.v2_protocol import infer_target

log = logging.getLogger("pam.service")


class PamApp(FastAPI):
    """A FastAPI app whose two inference routes skip FastAPI's stack: ``POST /infer`` and
    ``POST /v2/models/{name}[/versions/{v}]/infer`` go straight to ``service.hotpath`` (they are also
    mounted as plain Starlette routes); everything else (health, metadata, metrics, dashboard, admin,
    docs) is ordinary FastAPI behind the ``RequestObserver`` middleware."""

    hot: HotPath

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            if path == "/infer":
                await self.hot.infer(scope, receive, send)
                return
            if path.startswith("/v2/models/") and path.endswith("/infer") and infer_target(path) is not None:
                await self.hot.v2_infer(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


class _Endpoint:
    """An ASGI callable Starlette mounts as it is (a bound method would be wrapped as a request handler)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.fn(scope, receive, send)


def _on_model(model: LoadedModel, app: FastAPI | None = None) -> None:
    m = model.manifest
    metrics.MODEL_INFO.clear()
    metrics.MODEL_INFO.labels(m.model_name, m.model_version).set(1)
    for e in m.methods:
        metrics.METHOD_MACS.labels(e.name).set(e.macs)
    if app is not None:
        app.openapi_schema = None  # the tensor schemas follow the served manifest


def _install_sighup(app: FastAPI, pool: RuntimePool) -> bool:
    """SIGHUP reloads the served bundle (main thread only: under a test's in-thread server, skip)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGHUP"):
        return False
    loop = asyncio.get_running_loop()

    async def reload() -> None:
        result = await pool.reload(None)
        log.info("SIGHUP reload: %s", result.detail)
        model = result.model
        if result.ok and model is not None:
            _on_model(model, app)

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
                    _on_model(pool.model, app)

            app.state.tasks.add(asyncio.get_running_loop().create_task(publish()))
        _install_sighup(app, pool)
        yield
        pool.shutdown()

    app = PamApp(
        title="pam-mobile device runtime",
        version="1",
        summary="One ExecuTorch program, one method per task combination: only the requested combination runs.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.pool = pool
    app.state.window = metrics.LatencyWindow(settings.dashboard_window)
    app.state.on_model = lambda model: _on_model(model, app)
    app.hot = HotPath(app)
    app.state.tasks = set()
    errors.install(app)
    for router in (v2.router, meta.router, admin.router):
        app.include_router(router)
    app.router.routes.append(Route("/infer", _Endpoint(app.hot.infer), methods=["POST"], include_in_schema=False))
    for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        app.router.routes.append(Route(path, _Endpoint(app.hot.v2_infer), methods=["POST"], include_in_schema=False))
    app.add_middleware(RequestObserver, max_body_bytes=settings.max_body_bytes, body_timeout_s=settings.body_timeout_s)

    def openapi() -> dict[str, Any]:
        # Bodies parsed by hand (to map every malformed body to a 4xx) still get documented schemas.
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            add_hot_routes(schema, pool.model.manifest if pool.model else None, ERROR_RESPONSES)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` and worker processes: settings from ``PAM_*``."""
    return create_app(Settings())
