"""The gateway's schema: the Alembic migrations build exactly what gateway/schema.py declares, on SQLite and
PostgreSQL, and the gateway refuses to run on a database whose schema is not current."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from common.config import ConfigError
from common.db import make_engine
from gateway.database import current_revision, head_revision, open_database, upgrade
from gateway.schema import metadata


def _url(tmp_path: Path, database_url: str | None) -> str:
    return database_url or f"sqlite:///{tmp_path / 'gateway.db'}"


def test_migrations_match_the_schema_module(tmp_path: Path, database_url: str | None) -> None:
    engine = make_engine(_url(tmp_path, database_url))
    try:
        upgrade(engine)
        upgrade(engine)  # at head already: nothing to do, no error
        assert current_revision(engine) == head_revision() is not None
        with engine.connect() as conn:
            differences = compare_metadata(MigrationContext.configure(conn), metadata)
        assert differences == []
        tables = set(inspect(engine).get_table_names())
        assert tables == set(metadata.tables) | {"alembic_version"}
    finally:
        engine.dispose()


def test_an_unmigrated_database_is_refused(tmp_path: Path, database_url: str | None) -> None:
    url = _url(tmp_path, database_url)
    with pytest.raises(ConfigError, match="hedui-gateway migrate") as refused:
        open_database(url)
    assert "revision none" in str(refused.value)
    probe = make_engine(url)
    try:
        assert inspect(probe).get_table_names() == []  # refusing changed nothing
    finally:
        probe.dispose()
    engine = open_database(url, migrate=True)
    try:
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()
    open_database(url).dispose()  # current now: accepted without migrating
