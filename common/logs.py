"""Structured logs: text for people, JSON lines for log collectors, and a per-request context for tracing.

Every line carries the logger's message and the ``extra`` fields the code passes (unit, batch_id, reason, status,
...). While a request is handled, :func:`log_context` adds its fields (a short random ``request_id``, the public
``commission_id`` the request names) to every line logged in that thread, whichever module logs it.

Personal data (ID numbers, names, findings) is never passed to a logger on purpose. As a second line of defence the
formatters replace anything shaped like an ID number (GB 11643: 17 digits and a check digit) with a placeholder, in
the message, the fields and exception text alike.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, TextIO

#: Commission ids as the workflow makes them (public references, not personal data): "C" and 16 hex digits.
COMMISSION_REF = re.compile(r"C[0-9a-f]{16}")
#: Anything that looks like a resident ID number, as a whole word.
_ID_NUMBER = re.compile(r"(?<![0-9A-Za-z])[0-9]{17}[0-9Xx](?![0-9A-Za-z])")
REDACTED = "[id-number]"

_context: ContextVar[Mapping[str, str]] = ContextVar("hedui_log_context", default=MappingProxyType({}))
#: Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def new_request_id() -> str:
    """A short random id for one request (8 hex digits): enough to find its lines, meaningless otherwise."""
    return secrets.token_hex(4)


def public_commission_ref(value: object) -> str | None:
    """``value`` if it is a commission id of the workflow's form, else None: only such ids go into logs, so a
    caller cannot put arbitrary text (or someone's ID number) into a log line by sending it as a commission id."""
    return value if isinstance(value, str) and COMMISSION_REF.fullmatch(value) else None


@contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    """Add ``fields`` (None values are left out) to every line logged in this context."""
    token = _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def current_context() -> Mapping[str, str]:
    """The fields :func:`log_context` has set here (for tests and for handing work to another thread)."""
    return dict(_context.get())


def redact(text: str) -> str:
    """``text`` with anything shaped like an ID number replaced."""
    return _ID_NUMBER.sub(REDACTED, text)


def _safe(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bool | int | float) or value is None:
        return value
    return redact(str(value))


class ContextFilter(logging.Filter):
    """Copies the :func:`log_context` fields onto each record (in the thread that logs it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if getattr(record, key, None) is None:  # a field the call passed itself wins
                setattr(record, key, value)
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {
        k: _safe(v) for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_") and v is not None
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created, UTC)
        line: dict[str, Any] = {
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for key, value in _fields(record).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exception"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            line["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(line, ensure_ascii=False, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """``time level logger message key=value ...`` for a terminal or journald."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = " ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in _fields(record).items())
        head, newline, rest = redact(text).partition("\n")  # fields go on the message line, before a traceback
        return f"{head} {fields}{newline}{rest}" if fields else head + newline + rest


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is at the moment of writing (as logging's own last-resort handler)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


class _AlembicContextFilter(logging.Filter):
    """Drops Alembic's two context lines; keeps everything else it logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(("Context impl ", "Will assume "))


def configure_logging(level: str | int = "INFO", json_lines: bool = False, stream: TextIO | None = None) -> None:
    """Send every log record to ``stream`` (default: standard error) as text or as JSON lines, with the request
    context. Calling it again replaces the handler it installed before; other handlers are left alone."""
    handler: logging.Handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    handler.addFilter(ContextFilter())
    handler.set_name("hedui")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "hedui"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # APScheduler logs every job run at INFO (several a minute); runs and failures are in the metrics instead.
    logging.getLogger("apscheduler").setLevel(max(root.level, logging.WARNING))
    # Alembic announces its SQLite/PostgreSQL context on every revision check ("Context impl SQLiteImpl."): noise in
    # every `status` and `audit head`, mailed daily by cron. Its "Running upgrade" lines stay: they are the record
    # of a migration.
    migration = logging.getLogger("alembic.runtime.migration")
    if not any(isinstance(f, _AlembicContextFilter) for f in migration.filters):
        migration.addFilter(_AlembicContextFilter())
