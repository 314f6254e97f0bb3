"""Structured logs: text for people, JSON lines for log collectors, and a per-request context for tracing.

Every line carries the logger's message and the ``extra`` fields the code passes (unit, batch_id, reason, status,
...). While a request is handled, :func:`log_context` adds its fields (a short random ``request_id``, the public
``commission_id`` the request names) to every line logged in that thread, whichever module logs it.

Personal data (ID numbers, names, findings) is never passed to a logger on purpose. As a second line of defence the
formatters replace anything shaped like an ID number (GB 11643: 17 digits and a check digit) with a placeholder, in
the message, the fields and exception text alike.

Database errors are the one place where data slips in by itself: a driver's message quotes the statement, its
parameters (names are not redacted) and values from the row (PostgreSQL's ``DETAIL: Key (...)=(...)``). The
handler :func:`configure_logging` installs therefore withholds the message of every database error, whoever logs it
(our code, APScheduler, grpc): what is kept is the error's class, its code (SQLSTATE, SQLite's result code) and the
kind of statement. :func:`describe_database_error` gives code the same safe description, and :class:`LogThrottle`
keeps a fault that repeats every few seconds (a database that is down) to a line a minute.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import sys
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping
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


#: Modules whose exceptions are database errors: SQLAlchemy's own and those of the drivers it wraps.
_DATABASE_MODULES = ("sqlalchemy", "sqlite3", "psycopg", "psycopg2", "_sqlite3")
#: What SQLAlchemy's str() of a wrapped driver error starts with: "(sqlite3.OperationalError) database is full ...".
_WRAPPED_DRIVER_ERROR = re.compile(r"\((?:sqlite3|psycopg2?)(?:\.[\w]+)*\.(\w+)\).*", re.S)
_WITHHELD = "message withheld: database errors may quote personal data"


def _is_database_class(cls: type) -> bool:
    return any(c.__module__.split(".")[0] in _DATABASE_MODULES for c in cls.__mro__ if c is not object)


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling, as Python prints them: each once, newest
    first, without a context that ``raise ... from None`` suppressed."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ if exc.__cause__ is not None or exc.__suppress_context__ else exc.__context__


def database_error(exc: BaseException | None) -> BaseException | None:
    """The first database error (SQLAlchemy's or a driver's) in ``exc``'s chain, or None."""
    return next((e for e in _chain(exc) if _is_database_class(type(e))), None)


def database_error_code(exc: BaseException) -> str | None:
    """The database's own code for ``exc``: PostgreSQL's SQLSTATE, SQLite's result code name (SQLITE_FULL)."""
    for error in (exc, getattr(exc, "orig", None)):
        for attribute in ("sqlite_errorname", "sqlstate", "pgcode"):
            code = getattr(error, attribute, None)
            if isinstance(code, str) and code:
                return code
    return None


def database_operation(exc: BaseException) -> str | None:
    """The kind of statement that failed (SELECT, INSERT, UPDATE, BEGIN...), never the statement or its values."""
    statement = getattr(exc, "statement", None)
    if not isinstance(statement, str) or not statement.strip():
        return None
    word = statement.split(None, 1)[0].upper()
    return word if word.isalpha() and len(word) <= 12 else None


def describe_database_error(exc: BaseException) -> str:
    """``exc`` as it may be logged: module and class, database code and kind of statement, never the message."""
    cls = type(exc)
    text = f"{cls.__module__}.{cls.__qualname__}"
    code, operation = database_error_code(exc), database_operation(exc)
    if code:
        text += f" [{code}]"
    if operation:
        text += f" in {operation}"
    return text


def _exception_line(exc: BaseException) -> str:
    if _is_database_class(type(exc)):
        return f"{describe_database_error(exc)}: ({_WITHHELD})\n"
    return "".join(traceback.format_exception_only(type(exc), exc))


def safe_traceback(exc: BaseException) -> str:
    """The traceback Python would print for ``exc``, with the message of every database error in its chain
    withheld (frames show code, never values, so they are kept)."""
    parts: list[str] = []
    oldest_first = list(_chain(exc))[::-1]
    for position, error in enumerate(oldest_first):
        if position:
            parts.append(
                "\nThe above exception was the direct cause of the following exception:\n\n"
                if error.__cause__ is oldest_first[position - 1]
                else "\nDuring handling of the above exception, another exception occurred:\n\n"
            )
        if error.__traceback__ is not None:
            parts.append("Traceback (most recent call last):\n")
            parts.extend(traceback.format_tb(error.__traceback__))
        parts.append(_exception_line(error))
    return "".join(parts).rstrip("\n")


def _scrub(value: Any) -> Any:
    if isinstance(value, BaseException) and database_error(value) is not None:
        error = database_error(value)
        assert error is not None
        return describe_database_error(error)
    if isinstance(value, str) and "(" in value:
        return _WRAPPED_DRIVER_ERROR.sub(rf"(\1: {_WITHHELD})", value)
    return value


class DatabaseErrorFilter(logging.Filter):
    """Withholds the message of database errors in a record, whoever logs it: a traceback whose chain holds one is
    rendered by :func:`safe_traceback` (and the exception dropped from the record, so no later formatter prints it
    whole), an exception passed as an argument or field becomes :func:`describe_database_error`, and a message that
    already quotes a wrapped driver error keeps only its class."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and database_error(record.exc_info[1]) is not None:
            record.exc_text = safe_traceback(record.exc_info[1])
            record.exc_info = None
        record.msg = _scrub(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_scrub(arg) for arg in record.args)
        elif isinstance(record.args, Mapping):
            record.args = {key: _scrub(arg) for key, arg in record.args.items()}
        for key, value in list(vars(record).items()):
            if key not in _STANDARD and not key.startswith("_"):
                setattr(record, key, _scrub(value))
        return True


class LogThrottle:
    """One log line per key and ``interval_s``: :meth:`admit` says whether to write this one and how many were
    held back since the last, so a fault that repeats every few seconds (a database that is down, a peer that
    floods) gives a line a minute that says how many it stands for, instead of hundreds."""

    def __init__(
        self, interval_s: float = 60.0, *, clock: Callable[[], float] = time.monotonic, max_keys: int = 4096
    ) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self.max_keys = max_keys
        self._last: OrderedDict[Hashable, tuple[float, int]] = OrderedDict()
        self._lock = threading.Lock()

    def admit(self, key: Hashable) -> int | None:
        """None: hold this line back; else write it, saying it stands for this many held back before it."""
        now = self.clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last[0] < self.interval_s:
                self._last[key] = (last[0], last[1] + 1)
                return None
            self._last[key] = (now, 0)
            self._last.move_to_end(key)
            if len(self._last) > self.max_keys:
                self._last.popitem(last=False)
            return 0 if last is None else last[1]

    def forget(self, key: Hashable) -> int:
        """Start afresh for ``key`` (the fault is over: its next occurrence is news); returns the lines held back."""
        with self._lock:
            last = self._last.pop(key, None)
        return 0 if last is None else last[1]

    def clear(self) -> None:
        """Start afresh for every key."""
        with self._lock:
            self._last.clear()


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
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = redact(record.exc_text)
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
    handler.addFilter(DatabaseErrorFilter())
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
