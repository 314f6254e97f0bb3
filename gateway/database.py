"""The gateway database: engine, Alembic migrations, and the check that the schema is current."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from common.config import ConfigError
from common.db import make_engine

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolation: a percent-encoded URL (password, options=-csearch_path%3D...) needs "%%".
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (``alembic upgrade head``)."""
    config = alembic_config(engine)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


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
