"""``hedui-gateway restore``: put a backup (gateway/ops/backup.py) in place of the config's database and keystore,
after checking that database, keystore and audit chain agree.

Every check runs before the target is touched, on a staged copy: the manifest's hashes, the keystore's party id (it
must open with the config's passphrase file and name the config's party), the schema revision (known to this
build; older is migrated after the restore, newer is refused), the audit chain (``audit verify`` finds nothing, and
its head is the manifest's, and the one the operator recorded with ``--expected-head``). Then the database goes in
(SQLite: one rename of the staged file; PostgreSQL: one transaction that creates the schema at the backup's revision,
loads the rows, sets the sequences and migrates), then the keystore files (renames). A refusal raises RestoreRefused
with the target unchanged; a target database that holds tables is refused unless ``force``, and never while a
gateway holds a replica lease on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sqlite3
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, Integer, MetaData, delete, func, insert, inspect, select, text
from sqlalchemy.engine import make_url

from common.db import make_engine
from gateway.archive.audit import AuditError, AuditHead, AuditLog
from gateway.archive.checkpoints import examine
from gateway.config import GatewayConfig
from gateway.db import schema
from gateway.db.database import alembic_config, current_revision, upgrade
from gateway.ops.backup import (
    FORMAT,
    KEYSTORE_FILE,
    MANIFEST,
    NOT_BACKED_UP,
    REPLAY_FILE,
    SQLITE_FILE,
    TABLES_DIR,
    VERSION,
    BackupError,
    decode_value,
    sha256_file,
)
from keys import keystore
from keys.errors import KeystoreError
from keys.keyring import Keyring
from keys.replay import default_replay_store_path

_PATH_RE = re.compile(r"[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)?")
_MAX_MANIFEST = 16 * 1024 * 1024
_INSERT_ROWS = 1000


class RestoreRefused(BackupError):
    """The backup does not agree with itself, with the config or with the target; nothing was changed."""

    code = "restore_refused"


@dataclass(frozen=True)
class RestoreResult:
    """What ``restore`` put in place."""

    party_id: str
    from_revision: str
    revision: str
    head: AuditHead
    rows: int


@contextlib.contextmanager
def _opened(source: Path) -> Iterator[Path]:
    """The backup's folder: ``source`` itself, or a private temporary copy of the listed files of a ``.tar``."""
    if source.is_dir():
        yield source
        return
    if not source.is_file():
        raise RestoreRefused(f"{source} is neither a backup folder nor a backup .tar file")
    with tempfile.TemporaryDirectory() as temp, tarfile.open(source, mode="r:") as archive:
        folder = Path(temp)
        # Only regular files at plain relative paths are taken out, never links or absolute or ../ paths.
        for member in archive.getmembers():
            if not (member.isfile() and _PATH_RE.fullmatch(member.name)):
                raise RestoreRefused(f"{source} holds an entry a backup never has ({member.name[:80]!r})")
            target = folder / member.name
            target.parent.mkdir(mode=0o700, exist_ok=True)
            extracted = archive.extractfile(member)
            assert extracted is not None
            with extracted, target.open("xb") as out:
                os.fchmod(out.fileno(), 0o600)
                shutil.copyfileobj(extracted, out)
        yield folder


def _manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        if path.stat().st_size > _MAX_MANIFEST:
            raise RestoreRefused(f"{path} is too large to be a backup manifest")
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise RestoreRefused(f"no readable backup manifest in {folder} ({type(exc).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RestoreRefused(f"{path} is not a Hedui gateway backup manifest")
    if manifest.get("version") != VERSION:
        raise RestoreRefused(f"backup format version {manifest.get('version')!r} is not one this build reads")
    for key in ("party_id", "schema_revision", "audit_head", "database", "files"):
        if key not in manifest:
            raise RestoreRefused(f"the backup manifest lacks {key!r}")
    return manifest


def _check_files(folder: Path, manifest: dict[str, Any]) -> set[str]:
    """Every listed file is there with its size and SHA-256, and nothing else is; returns the listed paths."""
    listed: set[str] = set()
    for entry in manifest["files"]:
        name = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not _PATH_RE.fullmatch(name) or name == MANIFEST:
            raise RestoreRefused("the backup manifest lists a file at a path a backup never has")
        path = folder / name
        if not path.is_file():
            raise RestoreRefused(f"{name} is listed in the manifest but missing from the backup")
        if path.stat().st_size != entry.get("bytes") or sha256_file(path) != entry.get("sha256"):
            raise RestoreRefused(
                f"{name} does not match its SHA-256 in the manifest: the backup was changed or damaged"
            )
        listed.add(name)
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - {MANIFEST}
    if present - listed:
        raise RestoreRefused(
            f"the backup holds files its manifest does not list: {', '.join(sorted(present - listed))}"
        )
    if KEYSTORE_FILE not in listed:
        raise RestoreRefused("the backup has no keystore")
    return listed


def _check_keystore(config: GatewayConfig, folder: Path, manifest: dict[str, Any]) -> Keyring:
    """The backup's keystore opens with the config's passphrase and is the config's party; its keyring (to check
    the audit chain's signed checkpoints)."""
    passphrase = keystore.read_passphrase_file(config.keys.passphrase_file)
    # Opened from a private copy: the loader insists on mode 0600, which a copy on (read-only) media may have lost.
    with tempfile.TemporaryDirectory() as temp:
        path = Path(temp) / KEYSTORE_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as copy:
            copy.write((folder / KEYSTORE_FILE).read_bytes())
        try:
            party, _ = keystore.load(path, passphrase)
        except KeystoreError as exc:
            where = config.keys.passphrase_file
            raise RestoreRefused(f"the backup's keystore does not open with {where}: {exc}") from None
    if party.party_id != config.agency.party_id or manifest["party_id"] != config.agency.party_id:
        raise RestoreRefused(
            f"the backup is of {party.party_id} (manifest: {manifest['party_id']}), the config is "
            f"{config.agency.party_id}: restore a gateway's backup only with its own config"
        )
    return Keyring(party.records())


def _check_revision(revision: object) -> str:
    scripts = ScriptDirectory.from_config(alembic_config(make_engine("sqlite://")))
    known = {script.revision for script in scripts.walk_revisions()}
    if not isinstance(revision, str) or revision not in known:
        raise RestoreRefused(
            f"the backup's schema revision {str(revision)[:40]!r} is unknown to this build (a newer release made "
            "it): restore it with that release or a later one"
        )
    return revision


def _head(manifest: dict[str, Any]) -> AuditHead:
    head = manifest["audit_head"]
    try:
        return AuditHead.parse(f"{head['seq']}:{head['hash']}")
    except (KeyError, TypeError, AuditError):
        raise RestoreRefused("the backup manifest's audit head is malformed") from None


def _stage(folder: Path, manifest: dict[str, Any], revision: str, staged: Path) -> int:
    """Build the backup's database as a SQLite file at ``staged`` (at ``revision``); returns the rows loaded."""
    form = manifest["database"].get("form") if isinstance(manifest["database"], dict) else None
    if form == "sqlite-file":
        os.close(os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        with (
            contextlib.closing(sqlite3.connect(folder / SQLITE_FILE)) as src,
            contextlib.closing(sqlite3.connect(staged)) as dst,
        ):
            src.backup(dst)
        return sum(int(n) for n in manifest["database"].get("tables", {}).values())
    if form != "rows-jsonl":
        raise RestoreRefused(f"the backup's database form {str(form)[:40]!r} is not one this build reads")
    engine = make_engine(f"sqlite:///{staged}")
    try:
        upgrade(engine, revision)
        with engine.begin() as conn:
            return _load_rows(conn, sorted((folder / TABLES_DIR).glob("*.jsonl")))
    finally:
        engine.dispose()


def _load_rows(conn: Connection, files: list[Path]) -> int:
    """Insert the rows of ``<table>.jsonl`` files into the connection's tables of the same names (FK order)."""
    meta = MetaData()
    meta.reflect(bind=conn)
    by_name = {path.stem: path for path in files}
    unknown = set(by_name) - set(meta.tables)
    if unknown:
        raise RestoreRefused(f"the backup has rows for tables its schema revision lacks: {', '.join(sorted(unknown))}")
    total = 0
    for table in meta.sorted_tables:
        if table.name not in by_name:
            continue
        with by_name[table.name].open(encoding="utf-8") as lines:
            header = json.loads(next(lines))
            columns = header.get("columns")
            if header.get("table") != table.name or not isinstance(columns, list):
                raise RestoreRefused(f"{by_name[table.name].name} does not start with its table's header")
            batch: list[dict[str, Any]] = []
            for line in lines:
                batch.append(dict(zip(columns, (decode_value(v) for v in json.loads(line)), strict=True)))
                if len(batch) == _INSERT_ROWS:
                    conn.execute(insert(table), batch)
                    total, batch = total + len(batch), []
            if batch:
                conn.execute(insert(table), batch)
                total += len(batch)
    return total


def _verify(
    staged: Path, revision: str, expected: AuditHead, recorded: AuditHead | None, *, keys: Keyring, party_id: str
) -> None:
    engine = make_engine(f"sqlite:///{staged}")
    try:
        with engine.connect() as conn:
            if conn.exec_driver_sql("PRAGMA integrity_check").scalar() != "ok":
                raise RestoreRefused("the backup's database file is damaged (SQLite integrity check)")
        if current_revision(engine) != revision:
            raise RestoreRefused("the backup's database is not at the schema revision its manifest names")
        audit = AuditLog(engine)
        # The chain, and every signed checkpoint in it with the backup's own keys (gateway/archive/checkpoints.py).
        problems = examine(engine, keys=keys, party_id=party_id, expected_head=recorded).problems
        if problems:
            raise RestoreRefused(f"the backup's audit chain does not verify: {problems[0]} ({len(problems)} problems)")
        head = audit.head()
        if head != expected:
            raise RestoreRefused(
                f"the backup's audit chain ends at {head.seq}:{head.hash.hex()[:16]}…, its manifest says "
                f"{expected.seq}:{expected.hash.hex()[:16]}…: database and manifest are not of one backup"
            )
        with engine.begin() as conn:
            if inspect(conn).has_table(schema.replicas.name):
                conn.execute(delete(schema.replicas))  # processes of the old installation, not data
    finally:
        engine.dispose()


def _target_state(engine: Engine, force: bool) -> None:
    """Refuse a target that holds tables (unless ``force``), and always one a live gateway holds a lease on."""
    names = set(inspect(engine).get_table_names())
    if names and not force:
        raise RestoreRefused(
            "the target database is not empty; restoring replaces it whole: stop every gateway, back it up, and "
            "give --force"
        )
    if schema.replicas.name in names:
        t = schema.replicas.c
        with engine.connect() as conn:
            live = conn.execute(select(t.replica_id, t.host).where(t.lease_until_ms > int(time.time() * 1000))).first()
        if live is not None:
            raise RestoreRefused(f"gateway {live.replica_id} on {live.host} is running on the target database: stop it")


def _install_sqlite(staged: Path, target: Path) -> None:
    """Migrate the staged file to this build's schema, then put it in place of ``target`` with one rename."""
    engine = make_engine(f"sqlite:///{staged}")
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    with sqlite3.connect(staged) as db:
        db.execute("PRAGMA journal_mode=DELETE")  # one file to rename; the gateway sets WAL again when it opens it
    for stale in (Path(f"{target}-wal"), Path(f"{target}-shm"), Path(f"{target}-journal")):
        stale.unlink(missing_ok=True)  # a forced restore: the old database's files, not ours
    os.replace(staged, target)


def _install_postgres(staged: Path, target: Engine, revision: str, force: bool) -> None:
    """In one transaction: drop what is there (``force``), create the schema at the backup's ``revision``, copy the
    staged rows, move each sequence past the restored ids, migrate to this build's schema."""
    source = make_engine(f"sqlite:///{staged}")
    try:
        with target.connect() as conn, conn.begin():
            if force:
                old = MetaData()
                old.reflect(bind=conn)
                old.drop_all(bind=conn)
            config = alembic_config(target)
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
            meta = MetaData()
            meta.reflect(bind=conn)
            with source.connect() as rows:
                for table in meta.sorted_tables:
                    if table.name in NOT_BACKED_UP:
                        continue
                    result = rows.execution_options(yield_per=_INSERT_ROWS).execute(select(table))
                    for part in result.partitions():
                        conn.execute(insert(table), [row._asdict() for row in part])
            for table in meta.sorted_tables:
                for column in table.primary_key.columns:
                    if isinstance(column.type, Integer) and column.autoincrement in (True, "auto"):
                        top = conn.execute(select(func.max(column))).scalar()
                        conn.execute(
                            text(
                                "SELECT setval(pg_get_serial_sequence(:t, :c), :v, :called) "
                                "WHERE pg_get_serial_sequence(:t, :c) IS NOT NULL"
                            ),
                            {"t": table.name, "c": column.name, "v": top or 1, "called": top is not None},
                        )
            command.upgrade(config, "head")
    finally:
        source.dispose()


def _write_private(data_from: Path, target: Path, force: bool) -> Path | None:
    """Stage ``data_from``'s bytes next to ``target`` (0600); returns the staged path to rename, or None when the
    target holds these bytes already. Refuses a different existing target unless ``force``."""
    data = data_from.read_bytes()
    if target.exists():
        if target.read_bytes() == data:
            return None
        if not force:
            raise RestoreRefused(f"{target} exists and differs from the backup's; give --force to replace it")
    staged = target.with_name(f".{target.name}.restoring")
    staged.unlink(missing_ok=True)
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    return staged


def restore(
    config: GatewayConfig, source: Path, *, force: bool = False, expected_head: AuditHead | None = None
) -> RestoreResult:
    """Restore the backup at ``source`` (folder or .tar) into the database and keystore ``config`` names."""
    with _opened(source) as folder:
        manifest = _manifest(folder)
        listed = _check_files(folder, manifest)
        keys = _check_keystore(config, folder, manifest)
        revision = _check_revision(manifest["schema_revision"])
        head = _head(manifest)
        url = make_url(config.database.url)
        is_sqlite = url.get_backend_name() == "sqlite"
        target = make_engine(config.database.url)
        staged_files: list[tuple[Path, Path]] = []
        try:
            if not is_sqlite or Path(url.database or "").exists():
                _target_state(target, force)
            keystore_path = config.keys.keystore
            for name, path in ((KEYSTORE_FILE, keystore_path), (REPLAY_FILE, default_replay_store_path(keystore_path))):
                if name in listed:
                    staged_key = _write_private(folder / name, path, force)
                    if staged_key is not None:
                        staged_files.append((staged_key, path))
            place = Path(url.database or "").parent if is_sqlite else None
            with tempfile.TemporaryDirectory(dir=place) as temp:
                staged = Path(temp) / "restoring.db"
                rows = _stage(folder, manifest, revision, staged)
                _verify(staged, revision, head, expected_head, keys=keys, party_id=config.agency.party_id)
                if is_sqlite:
                    target.dispose()
                    _install_sqlite(staged, Path(url.database or ""))
                else:
                    _install_postgres(staged, target, revision, force)
            for staged_key, path in staged_files:
                os.replace(staged_key, path)
            staged_files.clear()
            now_at = current_revision(target) or revision
        finally:
            for staged_key, _ in staged_files:
                staged_key.unlink(missing_ok=True)
            target.dispose()
    return RestoreResult(manifest["party_id"], revision, now_at, head, rows)
