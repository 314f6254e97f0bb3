"""Statements the stores write for the driver itself, where SQLAlchemy's per-row work would cost more than the
database's: bulk inserts (COPY on PostgreSQL) and inserts that ignore a conflicting row."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine, Executable, Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection


def insert_ignore(engine: Engine, table: Table) -> Executable:
    """An INSERT into ``table`` that leaves an existing row with the same key as it is (ON CONFLICT DO NOTHING)."""
    if engine.dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()


def bulk_insert(
    conn: Connection,
    table: Table,
    columns: Sequence[str],
    rows: Sequence[tuple[Any, ...]],
    *,
    ignore_conflicts: bool = False,
) -> int:
    """Insert many rows through the driver itself: COPY on PostgreSQL (unless conflicts are to be ignored, which
    COPY cannot), executemany otherwise. SQLAlchemy's per-row parameter processing would cost more than the
    database's own work here. Returns the number of rows inserted."""
    if not rows:
        return 0
    is_postgres = conn.dialect.name == "postgresql"
    names = ", ".join(columns)
    if is_postgres and not ignore_conflicts:
        driver = conn.connection.driver_connection  # psycopg, inside this transaction
        assert driver is not None
        with driver.cursor().copy(f"COPY {table.name} ({names}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        return len(rows)
    mark = "%s" if is_postgres else "?"
    values = ", ".join([mark] * len(columns))
    statement = f"INSERT INTO {table.name} ({names}) VALUES ({values})"  # noqa: S608 - names from the schema
    if ignore_conflicts:
        statement += " ON CONFLICT DO NOTHING"
    return int(conn.exec_driver_sql(statement, list(rows)).rowcount)
