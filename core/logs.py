"""Logging: one trace id per message, carried from the platform event to the posted reply,
and the JSON line format of `threadbridge serve --log-format json`.

The trace id is a short hash of the inbound `event_id`. The bridge binds it when it accepts a
message, when it runs the message's turn and when it posts the reply (the outbox keeps the
event id as `reply_to`); agent services get it as the `X-Trace-Id` header. Each of those runs
in its own task, so the context variable never leaks from one message to another.
"""

from __future__ import annotations

import hashlib
import json
import logging
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

TRACE_HEADER = "X-Trace-Id"
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

_trace: ContextVar[str | None] = ContextVar("threadbridge_trace_id", default=None)

# What every LogRecord has; anything else on a record came from `extra=` and is logged as a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "trace_id",
    "color_message",  # uvicorn's coloured copy of the message
    "taskName",
}


def trace_of(event_id: str) -> str:
    """The trace id of an inbound event: 16 hex digits, the same in every process."""
    return hashlib.sha256(event_id.encode("utf-8", "replace")).hexdigest()[:16]


def bind_trace(event_id: str | None) -> str | None:
    """Make the event's trace id the current one (None clears it); return it."""
    trace = trace_of(event_id) if event_id else None
    _trace.set(trace)
    return trace


def current_trace() -> str | None:
    return _trace.get()


def trace_headers() -> dict[str, str]:
    """The header that carries the current trace id to an agent service (none when unset)."""
    trace = _trace.get()
    return {TRACE_HEADER: trace} if trace else {}


class TraceFilter(logging.Filter):
    """Puts the current trace id on every record as `trace_id` (None outside a message)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "trace_id"):
            record.trace_id = _trace.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, trace_id, then any `extra=`
    fields, and `exc` with the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "trace_id": getattr(record, "trace_id", None),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)
