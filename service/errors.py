"""The service's one error type: an HTTP status, a stable code and a reason, always sent as JSON."""

from __future__ import annotations

from pam_common.errors import CodedError


class ServiceError(CodedError):
    """A request the service refuses (4xx) or cannot serve right now (503/504), with a JSON reason."""

    def __init__(self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None,
                 extra: dict[str, object] | None = None) -> None:
        super().__init__(code, message)
        self.status = status
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict[str, object]:
        return {"error": self.code, "detail": self.message, **self.extra}
