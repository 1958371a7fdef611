"""The service's one settings class: every knob has a ``PAM_`` environment variable."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "PAM_"


class Settings(BaseSettings):
    """Settings of ``pam serve``; ``PAM_<FIELD>`` overrides each default, CLI flags override both."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    bundle_dir: Path | None = None  # the bundle to serve (model.pte + manifest.json)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    threads: int = Field(default=1, ge=1, le=64)  # XNNPACK threads per inference: emulates a device's cores
    workers: int = Field(default=1, ge=1, le=32)  # uvicorn worker processes, each with its own runtime
    executor: Literal["auto", "thread", "inline"] = "auto"  # where execute runs: one runtime thread, the event
    #   loop, or (auto) the loop for methods measured at most inline_max_ms at load and the thread for the rest
    inline_max_ms: float = Field(default=1.0, ge=0)  # auto: methods this fast run on the event loop
    queue_bound: int = Field(default=64, ge=1)  # requests admitted to wait for the runtime; beyond it: 503
    retry_after_s: int = Field(default=1, ge=0)  # Retry-After of a 503
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)  # larger request bodies get 413
    request_timeout_s: float = Field(default=10.0, gt=0)  # queue wait + execute; beyond it: 504
    http: Literal["auto", "h11", "httptools"] = "auto"  # uvicorn's HTTP parser (auto: httptools if installed)
    loop: Literal["auto", "asyncio", "uvloop"] = "auto"  # event loop (auto: uvloop if installed)
    log_format: Literal["json", "text"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    admin_token: str | None = None  # guards POST /admin/reload; unset: the endpoint answers 403
    # what a reload may read (service/bundle_guard.py)
    bundle_root: Path | None = None  # reloads only of directories under it (None: the served bundle's parent)
    manifest_public_key: str | None = None  # Ed25519 (PEM, or base64/hex of 32 bytes): manifest.sig required
    max_manifest_bytes: int = Field(default=1024 * 1024, ge=1024)  # larger manifests are refused unread
    max_program_bytes: int = Field(default=2 * 1024**3, ge=1024)  # larger programs are refused unread
    reload_read_timeout_s: float = Field(default=2.0, gt=0)  # checks + manifest read of a reload; beyond: 4xx
    lazy: bool = False  # load a method on its first request instead of all at start-up
    max_loaded: int | None = Field(default=None, ge=1)  # with lazy: how many methods stay loaded (LRU)
    probe: bool = True  # load the bundle once in a child process before trusting it (crash-safe)
    probe_timeout_s: float = Field(default=120.0, gt=0)
    dashboard_window: int = Field(default=1000, ge=10)  # latencies kept per combination for /dashboard
    strict_combinations: bool = False  # a combination without its own method: 404 instead of a superset method
    # bounded work per request
    max_image_pixels: int | None = Field(default=None, ge=1)  # declared w*h decoded at most (None: from the input)
    decode_inline_pixels: int = Field(default=4096, ge=0)  # smaller images decode on the loop; larger off it
    max_header_bytes: int = Field(default=16 * 1024, ge=1024)  # request line + headers; beyond: 431, closed
    header_timeout_s: float = Field(default=10.0, gt=0)  # a request's head must arrive within this; else closed
    body_timeout_s: float = Field(default=30.0, gt=0)  # gap allowed between body chunks; beyond: 408
    max_connections: int = Field(default=1024, ge=1)  # open connections + tasks; beyond: 503 (uvicorn)
    keep_alive_s: float = Field(default=5.0, gt=0)  # idle keep-alive connections are closed after this
    # dynamic batching: requests for one method that wait together run as one execute
    batching: bool = True
    batch_window_us: int = Field(default=0, ge=0, le=1_000_000)  # wait this long for more requests (0: take
    #   only what queued while the runtime was busy)
    batch_max: int | None = Field(default=None, ge=1)  # rows per execute (None: the manifest's max_batch)
    batch_union: bool = False  # requests for different combinations may share one execute of a method covering
    #   them all, when the costs measured at load say it is cheaper than one execute per method
