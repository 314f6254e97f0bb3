"""``hedui-gateway backup``: the database, the keystore and the audit head, consistent while the gateway runs.

A backup is a folder (or the same files in one ``.tar``) holding::

    manifest.json            what is in it (format below), with each file's SHA-256
    database.sqlite3         SQLite: the database file, copied with SQLite's online backup API
    database/<table>.jsonl   PostgreSQL: every table's rows, read in one REPEATABLE READ READ ONLY transaction
    keystore.json            the keystore file as it is on disc: still encrypted, never opened by the backup
    keystore.json.replay     the keystore's replay store (sealed files it has opened), when there is one

Why not ``pg_dump``: its major version must be at least the server's, the appliance has no PostgreSQL client of its
own, it dumps whatever schema the URL's role can see rather than the one the gateway uses (``search_path``), and a
custom-format dump restores only with a matching ``pg_restore``. The rows dump needs only the gateway's own
driver, is taken in one snapshot (the audit head in the manifest is read in it), and is restored by the gateway
itself at the schema revision it came from, then migrated (gateway/ops/restore.py). The format is in
docs/operations.md ("Backup format"), precisely enough to read without this code.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import sqlite3
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, MetaData, select, text
from sqlalchemy.engine import make_url

from common.db import make_engine
from common.errors import HeduiError
from gateway.archive.audit import GENESIS_HASH, AuditHead
from gateway.archive.audit import head as audit_head
from gateway.config import GatewayConfig
from gateway.db import schema
from gateway.db.database import current_revision
from keys.replay import default_replay_store_path

FORMAT = "hedui-gateway-backup"
VERSION = 1
MANIFEST = "manifest.json"
SQLITE_FILE = "database.sqlite3"
TABLES_DIR = "database"
KEYSTORE_FILE = "keystore.json"
REPLAY_FILE = "keystore.json.replay"
#: Rows that describe running processes, not data: a restored gateway starts without them.
NOT_BACKED_UP = frozenset({"alembic_version", "replicas"})
_CHUNK = 1 << 20


class BackupError(HeduiError):
    """A backup cannot be taken (nothing usable was written), or a backup is not one this build can read."""

    code = "backup"


@dataclass(frozen=True)
class BackupResult:
    """What ``backup`` wrote."""

    path: Path
    party_id: str
    revision: str
    head: AuditHead
    files: int


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file, as lower-case hex."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def encode_value(value: Any) -> Any:
    """A column value as JSON: bytes, dates and datetimes become one-key objects ``{"b": base64}``, ``{"d": ISO}``,
    ``{"t": ISO}``; numbers, text, booleans and null are themselves."""
    if isinstance(value, bytes | memoryview):
        return {"b": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, datetime):
        return {"t": value.isoformat()}
    if isinstance(value, date):
        return {"d": value.isoformat()}
    return value


def decode_value(value: Any) -> Any:
    """The inverse of :func:`encode_value`."""
    if isinstance(value, dict) and len(value) == 1:
        ((tag, body),) = value.items()
        if tag == "b":
            return base64.b64decode(body, validate=True)
        if tag == "t":
            return datetime.fromisoformat(body)
        if tag == "d":
            return date.fromisoformat(body)
    if isinstance(value, dict | list):
        raise BackupError("a row value in the backup is neither a column value nor a tagged one")
    return value


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def _private_file(path: Path) -> Any:
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8")


def _copy_sqlite(source: Path, target: Path) -> None:
    """Copy a SQLite database with the online backup API: one consistent snapshot, while writers go on."""
    if not source.is_file():
        raise BackupError(f"the database file {source} does not exist")
    os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=60)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)  # all pages in one step, under one read transaction
    finally:
        dst.close()
        src.close()


def _dump_rows(conn: Connection, folder: Path) -> dict[str, int]:
    """Write every table of the connection's schema (but NOT_BACKED_UP) as ``<table>.jsonl``; returns rows by table.

    The first line is ``{"table": NAME, "columns": [...]}``, then one JSON array per row in primary-key order."""
    meta = MetaData()
    meta.reflect(bind=conn)
    counts = {}
    _private_dir(folder)
    for table in meta.sorted_tables:
        if table.name in NOT_BACKED_UP:
            continue
        columns = [c.name for c in table.columns]
        order = list(table.primary_key.columns) or list(table.columns)
        rows = 0
        with _private_file(folder / f"{table.name}.jsonl") as out:
            out.write(json.dumps({"table": table.name, "columns": columns}) + "\n")
            result = conn.execution_options(yield_per=2000).execute(select(table).order_by(*order))
            for row in result:
                out.write(json.dumps([encode_value(v) for v in row], ensure_ascii=False) + "\n")
                rows += 1
        counts[table.name] = rows
    return counts


def _row_counts(engine: Engine) -> dict[str, int]:
    meta = MetaData()
    with engine.connect() as conn:
        meta.reflect(bind=conn)
        return {
            t.name: int(conn.execute(select(text("count(*)")).select_from(t)).scalar_one())
            for t in meta.sorted_tables
            if t.name not in NOT_BACKED_UP
        }


def _database(config: GatewayConfig, folder: Path) -> tuple[dict[str, Any], AuditHead, str]:
    """Back up the database into ``folder``; returns the manifest's database part, the audit head and the revision,
    all of the one snapshot written."""
    url = make_url(config.database.url)
    if url.get_backend_name() == "sqlite":
        copy = folder / SQLITE_FILE
        _copy_sqlite(Path(url.database or ""), copy)
        engine = make_engine(f"sqlite:///{copy}")
        try:
            revision, head, tables = current_revision(engine), audit_head(engine), _row_counts(engine)
        finally:
            engine.dispose()
        # The copy is in WAL mode like its source; back to a single file so that what was hashed is all there is.
        with sqlite3.connect(copy) as db:
            db.execute("PRAGMA journal_mode=DELETE")
        form = "sqlite-file"
    else:
        engine = make_engine(config.database.url)
        try:
            with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn, conn.begin():
                conn.execute(text("SET TRANSACTION READ ONLY"))
                revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
                tables = _dump_rows(conn, folder / TABLES_DIR)
                head = _head_in(conn)
        finally:
            engine.dispose()
        form = "rows-jsonl"
    if not revision:
        raise BackupError("the database has no schema revision: it was never migrated, there is nothing to back up")
    return {"dialect": url.get_backend_name(), "form": form, "tables": tables}, head, str(revision)


def _head_in(conn: Connection) -> AuditHead:
    """The audit head (newest entry) as the snapshot of ``conn`` sees it."""
    t = schema.audit_log.c
    row = conn.execute(select(t.seq, t.hash).order_by(t.seq.desc()).limit(1)).first()
    return AuditHead(0, GENESIS_HASH) if row is None else AuditHead(int(row.seq), bytes(row.hash))


def backup(config: GatewayConfig, out: Path, *, now: datetime | None = None) -> BackupResult:
    """Write a backup of the gateway ``config`` describes to ``out``: a new or empty folder, or a ``.tar`` file that
    does not exist yet. Raises BackupError (having left nothing at ``out``) when it cannot."""
    tar = out.suffix == ".tar"
    if tar and out.exists():
        raise BackupError(f"{out} exists already; a backup never overwrites")
    if not tar and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BackupError(f"{out} exists and is not an empty folder; a backup never overwrites")
    keystore_path = config.keys.keystore
    party = _keystore_party(keystore_path)
    if party != config.agency.party_id:
        raise BackupError(f"the keystore {keystore_path} belongs to {party}, the config to {config.agency.party_id}")
    _private_dir(out.parent if tar else out)
    with tempfile.TemporaryDirectory(dir=out.parent) if tar else contextlib.nullcontext(str(out)) as place:
        folder = Path(place) / "backup" if tar else out
        _private_dir(folder)
        try:
            database, head, revision = _database(config, folder)
            with (folder / KEYSTORE_FILE).open("xb") as copy:
                os.fchmod(copy.fileno(), 0o600)
                copy.write(keystore_path.read_bytes())  # as it is: encrypted
            replay = default_replay_store_path(keystore_path)
            if replay.exists():
                _copy_sqlite(replay, folder / REPLAY_FILE)
            files = [
                {"path": str(p.relative_to(folder)), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
                for p in sorted(folder.rglob("*"))
                if p.is_file()
            ]
            manifest = {
                "format": FORMAT,
                "version": VERSION,
                "created_at": (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "party_id": config.agency.party_id,
                "schema_revision": revision,
                "audit_head": {"seq": head.seq, "hash": head.hash.hex()},
                "database": database,
                "files": files,
            }
            with _private_file(folder / MANIFEST) as file:
                json.dump(manifest, file, indent=2, ensure_ascii=False)
                file.write("\n")
            if tar:
                _write_tar(folder, out)
        except BaseException:
            if not tar:
                _remove_tree(out)
            raise
    return BackupResult(out, config.agency.party_id, revision, head, len(files))


def _keystore_party(path: Path) -> str:
    """The party id a keystore file names (in its clear, authenticated header; the keys stay encrypted)."""
    try:
        document = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise BackupError(f"cannot read the keystore {path}: {type(exc).__name__}") from None
    party = document.get("party_id") if isinstance(document, dict) else None
    if not isinstance(party, str):
        raise BackupError(f"{path} is not a keystore")
    return party


def _write_tar(folder: Path, out: Path) -> None:
    partial = out.with_name(out.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w") as archive:
            for path in _files(folder):
                archive.add(path, arcname=str(path.relative_to(folder)), recursive=False)
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _files(folder: Path) -> Iterator[Path]:
    yield folder / MANIFEST
    yield from (p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST)


def _remove_tree(folder: Path) -> None:
    if not folder.exists():
        return
    for path in sorted(folder.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    folder.rmdir()
