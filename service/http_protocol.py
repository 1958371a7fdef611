"""uvicorn's HTTP protocols with bounded request heads: ``pam serve`` passes these classes as ``http``.

uvicorn bounds neither the size of a request head with httptools (a 64 MB header was accepted:
200 after 5.9 s, the loop blocked 2.9 s, +120 MB RSS) nor the time a client may take to send it
(1,000 trickling connections were held 25 s). Here:

- the request line plus headers may be at most ``max_header_bytes`` (``PAM_MAX_HEADER_BYTES``);
  beyond it the connection gets 431 and is closed (h11: its own limit, 400);
- a request head must arrive within ``header_timeout_s`` (``PAM_HEADER_TIMEOUT_S``) of its first
  byte, or of the connection opening; otherwise the connection is closed.

The number of connections is bounded by uvicorn's ``limit_concurrency`` (``PAM_MAX_CONNECTIONS``, 503
beyond it) and idle keep-alive connections by ``timeout_keep_alive`` (``PAM_KEEP_ALIVE_S``).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.core.config import ENV_PREFIX, Settings


def _limit(name: str) -> float:
    raw = os.environ.get(ENV_PREFIX + name.upper())
    default = Settings.model_fields[name].default
    try:
        return float(raw) if raw is not None else float(default)
    except ValueError:
        return float(default)


def limits() -> tuple[int, float]:
    """(max header bytes, header timeout in seconds) from the environment (``pam serve`` sets it)."""
    return int(_limit("max_header_bytes")), _limit("header_timeout_s")


_431 = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
        b"connection: close\r\ncontent-length: %d\r\n\r\n%s")


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """httptools with a size bound and a time bound on every request head."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_head, self._head_timeout = limits()
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self._head_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport is not None and not self.transport.is_closing():
            self.logger.info("closing a connection whose request head took over %.3g s", self._head_timeout)
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._arm()

    def _count(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > self._max_head and not self.transport.is_closing():
            body = (b'{"error":"header_too_large","detail":"request line and headers exceed %d bytes"}'
                    % self._max_head)
            self.transport.write(_431 % (len(body), body))
            self.transport.close()
            self._disarm()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return  # refused above: parse no more of it
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._disarm()
        if self.transport.is_closing():
            return
        super().on_headers_complete()


class BoundedH11Protocol(H11Protocol):
    """h11 (``--http h11``): its own head-size limit (set from the same setting) and the head timeout."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        max_head, self._head_timeout = limits()
        config.h11_max_incomplete_event_size = max_head
        super().__init__(config, *args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self._head_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        import h11

        super().data_received(data)
        head_pending = self.conn.their_state is h11.IDLE and bool(self.conn.trailing_data[0])
        if head_pending and self._head_timer is None:
            self._head_timer = self.loop.call_later(self._head_timeout, self._head_timed_out)
        elif not head_pending and self.conn.their_state is not h11.IDLE and self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None


def protocol_for(http: str) -> str:
    """The ``http`` argument for uvicorn: an import string, so worker processes load it too."""
    if http == "h11":
        return "service.http_protocol:BoundedH11Protocol"
    if http == "httptools":
        return "service.http_protocol:BoundedHttpToolsProtocol"
    try:
        import httptools  # noqa: F401
    except ImportError:
        return "service.http_protocol:BoundedH11Protocol"
    return "service.http_protocol:BoundedHttpToolsProtocol"
