"""The config loader: relative SQLite URLs follow the config file, like every other relative path."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.config import ConfigError, DatabaseUrl, build, doc


@dataclass(frozen=True)
class _Section:
    url: DatabaseUrl = doc("a database")


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("sqlite:///connector.db", "sqlite:///{base}/connector.db"),
        ("sqlite:///data/../gateway.db?timeout=5", "sqlite:///{base}/gateway.db?timeout=5"),
        ("sqlite:////var/lib/hedui/gateway.db", "sqlite:////var/lib/hedui/gateway.db"),
        ("sqlite:///:memory:", "sqlite:///:memory:"),
        ("sqlite://", "sqlite://"),
        ("postgresql+psycopg://hedui@db/hedui", "postgresql+psycopg://hedui@db/hedui"),
    ],
)
def test_a_relative_sqlite_file_is_resolved_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, written: str, expected: str
) -> None:
    base = tmp_path / "etc"
    base.mkdir()
    monkeypatch.chdir(tmp_path)  # started from elsewhere: the working directory must not matter
    section = build(_Section, {"url": written}, base=base, where="database")
    assert section.url == expected.format(base=base.resolve())
    assert os.getcwd() == str(tmp_path)


def test_a_database_url_must_be_text(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"database\.url must be a database URL"):
        build(_Section, {"url": 5}, base=tmp_path, where="database")
