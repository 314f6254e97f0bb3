"""Database engines for SQLite (the embedded default) and PostgreSQL, set up the same way everywhere, and what a
process has lately seen of its database (:class:`DatabaseHealth`, exported as ``hedui_database_up``).

Engines are made with ``hide_parameters=True``: a statement's parameters (names, ID numbers, batch contents) never
appear in the text of an exception, whoever logs or prints it (docs/operations.md, "Logs").
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url

#: How long a transaction waits for the database to be free before it fails with "database is locked".
LOCK_TIMEOUT_S = 60.0
#: How long a new PostgreSQL connection may take (libpq waits for ever by default): a server that is gone makes
#: jobs and scrapes fail in seconds, instead of hanging them.
CONNECT_TIMEOUT_S = 5
#: A database failure keeps hedui_database_up at 0 this long (see DatabaseHealth).
FAILURE_HOLD_S = 60.0
_READ_ONLY = "hedui_read_only"


class _SqliteConnection(sqlite3.Connection):
    """A connection that lets the next thread of its engine in as soon as its transaction ends.

    SQLite lets one write transaction run at a time and makes the others wait in its busy handler, which sleeps
    in steps of up to 100 ms whether or not the lock has been freed meanwhile: with several threads taking turns,
    most of the waiting is sleeping past the moment the database became free. Within one process the threads of
    an engine therefore queue on a lock instead (``turns``), handed on the moment a transaction commits or rolls
    back; the busy handler still arbitrates between processes.
    """

    turns: threading.Lock | None = None
    holding = False

    def enter(self) -> None:
        if self.turns is not None and not self.holding:
            if not self.turns.acquire(timeout=LOCK_TIMEOUT_S):
                raise sqlite3.OperationalError("database is locked (waited for this process's other transactions)")
            self.holding = True

    def leave(self) -> None:
        if self.holding and self.turns is not None:
            self.holding = False
            self.turns.release()

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self.leave()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self.leave()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.leave()


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``. SQLite files get WAL, foreign keys, a busy timeout and synchronous=NORMAL
    (durable across process crashes, which is what the crash-safety guarantees are about)."""
    parsed = make_url(url)
    # Parameters hold personal data; SQLAlchemy would put them into every exception's text (and so into logs).
    kwargs.setdefault("hide_parameters", True)
    if parsed.get_backend_name() == "sqlite":
        # isolation_level=None hands transaction control to SQLAlchemy's "begin" event below.
        connect_args = {
            "timeout": LOCK_TIMEOUT_S,
            "check_same_thread": False,
            "isolation_level": None,
            "factory": _SqliteConnection,
        }
        engine = create_engine(url, connect_args=connect_args, **kwargs)
        turns = threading.Lock()

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.turns = turns
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin_immediate(connection: Any) -> None:
            if connection.get_execution_options().get(_READ_ONLY):
                # A reader (see reading()): in WAL mode it reads a snapshot beside the writer, taking no lock.
                connection.exec_driver_sql("BEGIN")
                return
            # Take the write lock at BEGIN: two deferred transactions that both read and then write would
            # otherwise deadlock, and SQLite would fail one of them at once instead of letting it wait.
            dbapi_connection = connection.connection.dbapi_connection
            dbapi_connection.enter()
            try:
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            except BaseException:
                dbapi_connection.leave()
                raise

        return engine
    if parsed.get_driver_name() in ("psycopg", "psycopg2") and "connect_timeout" not in parsed.query:
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S, **kwargs.get("connect_args", {})}
    return create_engine(url, pool_pre_ping=True, **kwargs)


def reading(engine: Engine) -> Connection:
    """A connection for reading only. On SQLite its transactions begin deferred: they read a consistent snapshot
    while the writer goes on, instead of queueing for the write lock like every other transaction (which must
    take it at BEGIN). Writing through it is a programming error (SQLite refuses it when the snapshot is stale)."""
    return engine.connect().execution_options(**{_READ_ONLY: True})


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


class DatabaseHealth:
    """Whether this process's database works, as far as the process has seen: exported as ``hedui_database_up``.

    Down for ``hold_s`` after any failure: of the metrics collector's read at a scrape, or of the process's work
    (a scheduler job, a unit cycle, the connector's answer worker). The hold matters: on a full or
    read-only disk reads still succeed while every write fails, and a gauge that followed the last operation
    would flap between 1 and 0 and never hold an alert's ``for:``. Thread-safe.
    """

    def __init__(self, *, hold_s: float = FAILURE_HOLD_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.hold_s = hold_s
        self.clock = clock
        self._failed_at: float | None = None
        self._lock = threading.Lock()

    def failed(self) -> None:
        """An operation on the database failed just now."""
        with self._lock:
            self._failed_at = self.clock()

    @property
    def up(self) -> bool:
        """False within ``hold_s`` of a failure."""
        with self._lock:
            return self._failed_at is None or self.clock() - self._failed_at >= self.hold_s
