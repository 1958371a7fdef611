"""Log lines: one JSON object per line (or plain text), and the per-request access line.

Nothing is formatted or written on the request path: every service logger hands its records to a
``QueueHandler``, and one ``QueueListener`` thread formats them and writes stdout. The access line
is cheaper still: ``log_request`` enqueues ``(time, fields)`` and the listener builds the
``LogRecord`` (profiled: ``Logger.info`` with its ``findCaller`` and ``LogRecord`` cost more than the
rest of the line). Lines are flushed when the listener stops (``shutdown_logging``, at exit).
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys
import time
from typing import Any

from service import fastjson

REQUEST_LOGGER = "pam.request"
_request_logger = logging.getLogger(REQUEST_LOGGER)
_queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
_listener: _Listener | None = None


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...extra fields}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        try:
            return fastjson.dumps(line).decode()
        except TypeError:  # a field orjson cannot encode: the standard library's str() fallback
            import json

            return json.dumps(line, separators=(",", ":"), default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            base += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return base


class _BufferedStream(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes without a flush per line; the listener flushes once per batch."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)


class _RawQueueHandler(logging.handlers.QueueHandler):
    """Enqueue the record as it is: formatting (``QueueHandler.prepare``) happens in the listener."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


class _Listener(logging.handlers.QueueListener):
    """Wakes every ``interval_s`` and writes everything queued meanwhile: a listener blocked on the
    queue was woken (a futex and a GIL hand-off) by every single line (profiled: 8 % of the server)."""

    interval_s = 0.02

    def _monitor(self) -> None:
        q = self.queue
        stop = False
        while not stop:
            time.sleep(self.interval_s)
            while True:
                try:
                    record = q.get_nowait()  # type: ignore[attr-defined]
                except queue.Empty:
                    break
                if record is self._sentinel:  # type: ignore[attr-defined]
                    stop = True
                    continue
                self.handle(record)
            for h in self.handlers:
                try:
                    h.flush()
                except (OSError, ValueError):  # stdout closed (interpreter exit, a test's capture)
                    pass

    def prepare(self, record: Any) -> logging.LogRecord:
        if type(record) is tuple:  # an access line from log_request: (created, fields)
            created, fields = record
            rec = logging.LogRecord(REQUEST_LOGGER, logging.INFO, __file__, 0, "request", None, None)
            rec.created = created
            rec.msecs = (created - int(created)) * 1000
            rec.fields = fields
            return rec
        return record  # type: ignore[no-any-return]


def configure(log_format: str, level: str) -> None:
    """Route the service's loggers (and uvicorn's) through the queue to stdout in the chosen format."""
    global _listener
    handler = _BufferedStream(sys.stdout)
    handler.setFormatter(JsonFormatter() if log_format == "json" else
                         TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    shutdown_logging()
    _listener = _Listener(_queue, handler)
    _listener.start()
    qh = _RawQueueHandler(_queue)
    for name in ("pam", "uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [qh]
        lg.setLevel(level.upper())
        lg.propagate = False


def shutdown_logging() -> None:
    """Stop the listener after it wrote every queued line."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None


atexit.register(shutdown_logging)


def log_request(fields: dict[str, Any]) -> None:
    """The access line: two attribute reads and a queue put on the request path."""
    if _listener is not None and _request_logger.isEnabledFor(logging.INFO):
        _queue.put_nowait((time.time(), fields))
    elif _request_logger.isEnabledFor(logging.INFO):  # not configured (a library user): plain logging
        _request_logger.info("request", extra={"fields": fields})
