"""The gateway database: engine, Alembic migrations, and the check that the schema is current."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from common.config import ConfigError
from common.db import is_sqlite, make_engine

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolation: a percent-encoded URL (password, options=-csearch_path%3D...) needs "%%".
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (``alembic upgrade head``), all in one transaction.

    On SQLite a migration that changes a table rebuilds it (copy, drop, rename), and dropping a table that other
    tables' rows refer to fails while foreign keys are enforced. They are therefore switched off for the
    migration, as SQLite's documented procedure for altering tables prescribes, and checked as a whole before
    the transaction commits: a migration that would leave a dangling reference is rolled back.
    """
    config = alembic_config(engine)
    with engine.connect() as connection:
        raw = connection.connection.dbapi_connection if is_sqlite(engine) else None
        if raw is not None:
            raw.execute("PRAGMA foreign_keys=OFF")  # outside any transaction, where SQLite honours it
        try:
            with connection.begin():
                config.attributes["connection"] = connection
                command.upgrade(config, revision)
                if raw is not None and connection.exec_driver_sql("PRAGMA foreign_key_check").first() is not None:
                    raise ConfigError("the migration would leave rows referring to missing rows; nothing was changed")
        finally:
            if raw is not None:
                raw.execute("PRAGMA foreign_keys=ON")


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config(make_engine("sqlite://"))).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def open_database(url: str, *, migrate: bool = False) -> Engine:
    """An engine for ``url`` whose schema is at the newest migration (applied first when ``migrate``)."""
    engine = make_engine(url)
    if migrate:
        upgrade(engine)
    current, head = current_revision(engine), head_revision()
    if current != head:
        engine.dispose()
        raise ConfigError(
            f"database schema is at revision {current or 'none'}, this build needs {head}: "
            "run 'hedui-gateway migrate --config FILE' first (back up the database before upgrading)"
        )
    return engine
