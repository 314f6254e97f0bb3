"""Database engines for SQLite (the embedded default) and PostgreSQL, set up the same way everywhere."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``. SQLite files get WAL, foreign keys, a busy timeout and synchronous=NORMAL
    (durable across process crashes, which is what the crash-safety guarantees are about)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        # isolation_level=None hands transaction control to SQLAlchemy's "begin" event below.
        connect_args = {"timeout": 60, "check_same_thread": False, "isolation_level": None}
        engine = create_engine(url, connect_args=connect_args, **kwargs)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin_immediate(connection: Any) -> None:
            # Take the write lock at BEGIN: two deferred transactions that both read and then write would
            # otherwise deadlock, and SQLite would fail one of them at once instead of letting it wait.
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"
