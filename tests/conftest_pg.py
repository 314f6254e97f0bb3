"""The real PostgreSQL for tests, when the machine has one: probe once, skip loudly otherwise.

Tests take the server from ``HEDUI_TEST_POSTGRES_URL`` (a SQLAlchemy URL), by default the local server at
127.0.0.1:5432 (database ``test``, user ``postgres``, trust authentication). Without a driver or a server the tests
are skipped with the reason in pytest's summary; with ``HEDUI_REQUIRE_POSTGRES=1`` (CI machines that have the server)
they fail instead, so that a broken setup cannot pass as "skipped".

``postgres_schema()`` gives each test a schema of its own, with a URL whose connections use it as their search path,
and drops it afterwards: tests never touch each other's tables or anything else in the database.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

URL_VARIABLE = "HEDUI_TEST_POSTGRES_URL"
REQUIRE_VARIABLE = "HEDUI_REQUIRE_POSTGRES"
DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@cache
def _probe(url: str) -> str | None:
    """None when the server answers, else why not."""
    try:
        import psycopg  # noqa: F401, PLC0415
    except ImportError:
        return "the psycopg driver is not installed (pip install 'psycopg[binary]')"
    engine = create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        return f"cannot connect to {make_url(url).render_as_string(hide_password=True)} ({type(exc).__name__})"
    finally:
        engine.dispose()
    return None


def postgres_url() -> str:
    """The test server's URL; skips (or fails, under HEDUI_REQUIRE_POSTGRES=1) the calling test without one."""
    url = os.environ.get(URL_VARIABLE, DEFAULT_URL)
    reason = _probe(url)
    if reason is not None:
        message = f"PostgreSQL tests not run: {reason}; set {URL_VARIABLE} to point at a server"
        if os.environ.get(REQUIRE_VARIABLE) == "1":
            pytest.fail(message)
        pytest.skip(message)
    return url


@contextmanager
def postgres_schema(prefix: str = "hedui_test") -> Iterator[str]:
    """A fresh schema on the test server; yields a URL whose connections use it first. Dropped on exit."""
    base = make_url(postgres_url())
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base)
    try:
        with admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        options = f"-csearch_path={schema}"
        yield base.update_query_dict({"options": options}).render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()
