"""The gateway's schema: the Alembic migrations build exactly what gateway/db/schema.py declares, on SQLite and
PostgreSQL, and the gateway refuses to run on a database whose schema is not current."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from common.config import ConfigError
from common.db import make_engine
from gateway.db.database import current_revision, head_revision, open_database, upgrade
from gateway.db.schema import metadata


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


def test_upgrading_a_database_in_use_keeps_every_batch_and_its_items(tmp_path: Path, database_url: str | None) -> None:
    """0003 -> head moves batch contents into batch_contents (0004) while items and answers refer to the batches."""
    engine = make_engine(_url(tmp_path, database_url))
    try:
        upgrade(engine, "0003")
        content = bytes(range(256)) * 2000  # larger than a page: stored in overflow pages
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO units (unit_id, category, endpoint, exchange_mode, enabled, consecutive_failures, "
                    "next_attempt_ms) VALUES ('unit.tax', 1, 'localhost:1', 'system', true, 0, 0)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO commissions (ref, purpose, income_from, income_to, assets_as_of, staff_ids, "
                    "categories, thresholds, created_at_ms) VALUES "
                    "('C-1', 1, '2026-01', '2026-10', '2026-10-31', 'S-1,S-2', '1', '', 1)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO subjects (commission_id, subject_ref, id_number, name, auth_number, auth_digest) "
                    "VALUES (1, 'R1', '11010519491231002X', 'N', 'A1', :digest)"
                ),
                {"digest": bytes(32)},
            )
            conn.execute(
                text(
                    "INSERT INTO batches (batch_id, unit_id, commission_id, content, digest, subject_count, "
                    "created_at_ms, state, attempts, next_attempt_ms, overdue, next_poll_ms) VALUES "
                    "('B-1', 'unit.tax', 1, :content, :digest, 1, 1, 'receipted', 1, 0, false, 0)"
                ),
                {"content": content, "digest": bytes(32)},
            )
            conn.execute(
                text(
                    "INSERT INTO items (commission_id, subject_id, unit_id, batch_id, created_at_ms) "
                    "VALUES (1, 1, 'unit.tax', 'B-1', 1)"
                )
            )
        upgrade(engine)
        with engine.connect() as conn:
            moved = conn.execute(text("SELECT batch_id, content FROM batch_contents")).all()
            assert [(r.batch_id, bytes(r.content)) for r in moved] == [("B-1", content)]
            assert conn.execute(text("SELECT batch_id FROM items")).scalar_one() == "B-1"
            assert conn.execute(text("SELECT state FROM batches")).scalar_one() == "receipted"
            # 0008: a batch receipted before provisional due dates existed has a final one.
            assert conn.execute(text("SELECT due_provisional FROM batches")).scalar_one() in (False, 0)
        assert "content" not in {c["name"] for c in inspect(engine).get_columns("batches")}
    finally:
        engine.dispose()
