"""Shared state as ``Annotated`` dependencies (the runtime pool, the settings)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.core.config import Settings
from service.runtime_pool import RuntimePool


def get_pool(request: Request) -> RuntimePool:
    pool: RuntimePool = request.app.state.pool
    return pool


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


PoolDep = Annotated[RuntimePool, Depends(get_pool)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
