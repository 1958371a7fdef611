"""Shared state as ``Annotated`` dependencies (the runtime pool, the settings).

They are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in a worker thread, which
cost four thread hand-offs per request (measured with cProfile).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.core.config import Settings
from service.runtime_pool import RuntimePool


async def get_pool(request: Request) -> RuntimePool:
    pool: RuntimePool = request.app.state.pool
    return pool


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


PoolDep = Annotated[RuntimePool, Depends(get_pool)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
