"""The audit log: every API action and state change, append-only and hash-chained (clause 17: archives must be
accurate, complete, secure and valid).

Each entry records who (``actor``: a staff id, a party id or a system component), what (``action``, e.g.
``staff.register``), when (``at_ms``), on which commission, the state before and after, and a short ``detail`` of
codes and counts. Entries are numbered 1, 2, 3 … without gaps and chained::

    hash(n) = SHA-256("hedui.v1.audit" || 0x00 || hash(n-1) || encode(seq, at_ms, actor, action,
                                                                     commission_id, before, after, detail))

with 32 zero bytes before the first entry. ``encode`` gives each field a fixed position: an integer is a presence
byte and 8 bytes big-endian (signed), a text a presence byte, a 4-byte big-endian length and its UTF-8 bytes; an
absent value is the single byte 0x00. So no two different entries encode alike, and changing, removing or
reordering any entry breaks the chain at that entry.

A chain alone cannot show that entries were cut off its *end*, added to it, or that someone rewrote it whole: anyone
who can write the database can compute the hashes. Two things close that gap. The gateway signs the head at
intervals and at every report issue, as an entry of the chain itself (a checkpoint, gateway/archive/checkpoints.py),
so entries after the last checkpoint are visibly *unattested*; and an operator records a head or a checkpoint
somewhere the database's users cannot reach (``hedui-gateway audit export-head``) and passes it back to ``audit
verify``: the entry with that number must still be there with that hash.

No personal data enters the log: every text field is refused when it holds CJK characters (names) or something
shaped like an ID number (the log is read by operators and exported; the subjects' data stays in ``subjects``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

from sqlalchemy import Connection, Engine, LargeBinary, Row, Select, cast, func, select, text

from common.db import reading
from common.errors import HeduiError
from gateway.db import schema

AUDIT_DOMAIN = b"hedui.v1.audit\x00"
HASH_BYTES = 32
GENESIS_HASH = bytes(HASH_BYTES)
#: pg_advisory_xact_lock key that serialises appends across gateway replicas ("heduiaud" in ASCII).
PG_LOCK_KEY = 0x6865_6475_6961_7564

_LIMITS = {"actor": 64, "action": 48, "before": 32, "after": 32, "detail": 255}
_ACTION_RE = re.compile(r"[a-z][a-z0-9_]*(?:[.\-][a-z0-9_]+)*")
_FIELD_KEY_RE = re.compile(r"[a-z][a-z0-9_]{0,15}")
_FIELD_VALUE_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# Digit runs as long as an ID number: 18 characters (GB 11643, 17 digits and a digit or X) or the older 15 digits.
_ID_RUN_RE = re.compile(r"(?<![0-9])(?:[0-9]{17}[0-9Xx]|[0-9]{15})(?![0-9])")
# CJK ideographs and their extensions, kana, bopomofo, CJK punctuation, compatibility and full-width forms.
_CJK_RE = re.compile(
    "[\u2e80-\u2fff\u3000-\u303f\u3040-\u30ff\u3100-\u312f\u3190-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef\U00020000-\U0003134f]"
)


class AuditError(HeduiError):
    """An audit entry cannot be written as given (it would carry personal data, or a field is malformed)."""

    code = "audit"


@dataclass(frozen=True)
class AuditHead:
    """The newest entry's number and hash: what an operator records to detect a cut-off or rewritten log later.

    ``str(head)`` is ``SEQ:HEX``, the form ``hedui-gateway audit verify --expected-head`` takes back.
    """

    seq: int
    hash: bytes

    def __str__(self) -> str:
        return f"{self.seq}:{self.hash.hex()}"

    @classmethod
    def parse(cls, value: str) -> AuditHead:
        """Read ``SEQ:HEX`` as printed by ``audit head``; raises AuditError for anything else."""
        seq_text, sep, hex_text = value.strip().partition(":")
        try:
            seq, digest = int(seq_text), bytes.fromhex(hex_text)
        except ValueError:
            seq, digest = -1, b""
        if not sep or seq < 0 or len(digest) != HASH_BYTES or (seq == 0 and digest != GENESIS_HASH):
            raise AuditError("an audit head is SEQ:HEX as printed by 'hedui-gateway audit head' (64 hex digits)")
        return cls(seq, digest)


@dataclass(frozen=True)
class AuditEntry:
    """One entry as stored."""

    seq: int
    at_ms: int
    actor: str
    action: str
    commission_id: int | None
    before: str | None
    after: str | None
    detail: str | None
    prev_hash: bytes
    hash: bytes


def check_text(field: str, value: str) -> str:
    """Return ``value`` if it may go into the audit log's ``field``, else raise AuditError.

    Refused: empty or over-long values, control characters, CJK characters (names are written in them) and
    anything shaped like an ID number. The message never repeats the value, which might be the personal data.
    """
    limit = _LIMITS[field]
    if not 0 < len(value) <= limit:
        raise AuditError(f"audit {field} must be 1-{limit} characters")
    if _CJK_RE.search(value):
        raise AuditError(f"audit {field} contains CJK characters; it holds codes and counts, never names")
    if _looks_like_id_number(value):
        raise AuditError(f"audit {field} contains something shaped like an ID number; personal data stays out")
    if not value.isascii() or not value.isprintable():
        raise AuditError(f"audit {field} must be printable ASCII (codes and counts)")
    return value


def _looks_like_id_number(value: str) -> bool:
    """True if ``value`` holds a run of 18 (or 15) digits whose birth-date part is a calendar date.

    The date test keeps random hex ids (batch ids, digests) from being refused by chance; an ID number, even with a
    wrong check digit, always has one.
    """
    for match in _ID_RUN_RE.finditer(value):
        run = match.group()
        birth = run[6:14] if len(run) == 18 else "19" + run[6:12]
        try:
            born = date(int(birth[:4]), int(birth[4:6]), int(birth[6:8]))
        except ValueError:
            continue
        if 1890 <= born.year <= 2099:
            return True
    return False


def check_detail(detail: str) -> str:
    """Return ``detail`` if it is fit for the audit log (codes and counts, no personal data), else raise AuditError."""
    return check_text("detail", detail)


def _int(value: int | None) -> bytes:
    if value is None:
        return b"\x00"
    return b"\x01" + value.to_bytes(8, "big", signed=True)


def _text(value: str | None) -> bytes:
    if value is None:
        return b"\x00"
    data = value.encode("utf-8")
    return b"\x01" + len(data).to_bytes(4, "big") + data


def entry_hash(
    prev_hash: bytes,
    *,
    seq: int,
    at_ms: int,
    actor: str,
    action: str,
    commission_id: int | None,
    before: str | None,
    after: str | None,
    detail: str | None,
) -> bytes:
    """The chain hash of one entry (the formula in the module docstring)."""
    body = b"".join(
        (_int(seq), _int(at_ms), _text(actor), _text(action), _int(commission_id), _text(before), _text(after))
    ) + _text(detail)
    return hashlib.sha256(AUDIT_DOMAIN + prev_hash + body).digest()


def _recompute(entry: AuditEntry) -> bytes:
    return entry_hash(
        entry.prev_hash,
        seq=entry.seq,
        at_ms=entry.at_ms,
        actor=entry.actor,
        action=entry.action,
        commission_id=entry.commission_id,
        before=entry.before,
        after=entry.after,
        detail=entry.detail,
    )


def entry_from_row(row: Row[Any]) -> AuditEntry:
    """An :class:`AuditEntry` from a row of ``audit_log``."""
    return _entry(row)


def _entry(row: Row[Any]) -> AuditEntry:
    return AuditEntry(
        seq=row.seq,
        at_ms=row.at_ms,
        actor=row.actor,
        action=row.action,
        commission_id=row.commission_id,
        before=row.before,
        after=row.after,
        detail=row.detail,
        prev_hash=bytes(row.prev_hash),
        hash=bytes(row.hash),
    )


def lock(conn: Connection) -> None:
    """Serialise audited changes for the rest of ``conn``'s transaction.

    On PostgreSQL this takes a transaction-scoped advisory lock, so appends from several replicas queue up instead
    of racing for the next number; under READ COMMITTED every statement after it sees what the previous holder
    committed. On SQLite the engine begins every transaction with BEGIN IMMEDIATE (common/db.py), which already
    holds the one write lock. Callers whose checks must not race (e.g. "the staff register is empty") call this
    before checking; :meth:`AuditLog.append` calls it too (the lock is re-entrant within a transaction).
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})


def head(engine: Engine) -> AuditHead:
    """The newest entry's number and hash; ``0:000…0`` for an empty log."""
    with reading(engine) as conn:
        return _head(conn)


def head_in(conn: Connection) -> AuditHead:
    """The newest entry's number and hash as ``conn``'s transaction sees it (call :func:`lock` first to write)."""
    return _head(conn)


def _head(conn: Connection) -> AuditHead:
    t = schema.audit_log.c
    row = conn.execute(select(t.seq, t.hash).order_by(t.seq.desc()).limit(1)).first()
    return AuditHead(0, GENESIS_HASH) if row is None else AuditHead(int(row.seq), bytes(row.hash))


#: Columns of ``audit_log`` by the Python type each must hold.
_TEXT_COLUMNS = ("actor", "action", "before", "after", "detail")
_INT_COLUMNS = ("seq", "at_ms", "commission_id")
_BYTES_COLUMNS = ("prev_hash", "hash")


def _checked_entry(row: Row[Any]) -> AuditEntry:
    """An entry from a row read by :func:`_verify_query`, whose every field is checked for its type: SQLite keeps
    whatever a writer stores (text in an integer column, bytes in a text one), and a row changed that way is a
    finding of :func:`verify`, not a crash. Raises AuditError naming the field."""
    values: dict[str, Any] = {}
    for name in _TEXT_COLUMNS:
        value = getattr(row, name)
        if isinstance(value, bytes | bytearray | memoryview):  # read as BLOB on SQLite: must be UTF-8 text
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise AuditError(f"its {name} is not text") from None
        if value is not None and not isinstance(value, str):
            raise AuditError(f"its {name} is not text")
        values[name] = value
    for name in _INT_COLUMNS:
        value = getattr(row, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise AuditError(f"its {name} is not a number")
        values[name] = value
    for name in _BYTES_COLUMNS:
        value = getattr(row, name)
        if not isinstance(value, bytes | bytearray | memoryview) or len(bytes(value)) != HASH_BYTES:
            raise AuditError(f"its {name} is not a {HASH_BYTES}-byte hash")
        values[name] = bytes(value)
    if values["seq"] is None or values["at_ms"] is None or values["actor"] is None or values["action"] is None:
        raise AuditError("a required field is empty")
    return AuditEntry(**values)


def _verify_query(engine: Engine) -> Select[Any]:
    """Every entry in log order; on SQLite the text columns are read as bytes, so that a value that is not UTF-8
    reaches :func:`_checked_entry` instead of failing the whole read in the driver."""
    c = schema.audit_log.c
    if engine.dialect.name != "sqlite":
        return select(schema.audit_log).order_by(c.seq)
    columns = [cast(col, LargeBinary).label(col.name) if col.name in _TEXT_COLUMNS else col for col in c]
    return select(*columns).order_by(c.seq)


def verify(
    engine: Engine,
    *,
    expected_head: AuditHead | None = None,
    observe: Callable[[AuditEntry], None] | None = None,
) -> list[str]:
    """Check the whole chain; returns the problems found, in log order (an empty list: the log is intact).

    Finds entries whose content changed (hash mismatch), removed entries (a gap in the numbers, or an entry whose
    ``prev_hash`` is not its predecessor's hash), entries moved to another place, and, with ``expected_head`` (a head
    recorded earlier), a log cut off after that entry or rewritten up to it. ``observe`` sees every entry in log
    order (the checkpoint check reads the chain in the same pass).
    """
    problems: list[str] = []
    prev_seq, prev_hash = 0, GENESIS_HASH
    anchor_hash: bytes | None = None
    with reading(engine) as conn:
        result = conn.execution_options(yield_per=1000).execute(_verify_query(engine))
        for row in result:
            try:
                entry = _checked_entry(row)
            except AuditError as exc:
                # Reported, and the chain goes on from this row's stored hash if it has one.
                seq = row.seq if isinstance(row.seq, int) else prev_seq + 1
                problems.append(f"entry {seq} was changed outside the gateway: {exc}")
                stored = row.hash
                prev_seq = seq
                prev_hash = bytes(stored) if isinstance(stored, bytes | bytearray | memoryview) else b""
                continue
            if entry.seq <= prev_seq:
                problems.append(f"entry {entry.seq} has a number the log never gives out (entries start at 1)")
            elif entry.seq != prev_seq + 1:
                missing = (
                    f"entry {prev_seq + 1} is"
                    if entry.seq == prev_seq + 2
                    else f"entries {prev_seq + 1}-{entry.seq - 1} are"
                )
                problems.append(f"{missing} missing (the log jumps from {prev_seq} to {entry.seq})")
            elif entry.prev_hash != prev_hash:
                problems.append(
                    f"entry {entry.seq} does not follow entry {prev_seq} (prev_hash mismatch): "
                    "an entry was removed, inserted or moved"
                )
            if _recompute(entry) != entry.hash:
                problems.append(f"entry {entry.seq} was changed (hash mismatch)")
            if expected_head is not None and entry.seq == expected_head.seq:
                anchor_hash = entry.hash
            if observe is not None:
                observe(entry)
            prev_seq, prev_hash = entry.seq, entry.hash
    if expected_head is not None and expected_head.seq > 0:
        if prev_seq < expected_head.seq:
            problems.append(
                f"the log ends at entry {prev_seq}, before the recorded head {expected_head.seq}: "
                "entries were cut off its end"
            )
        elif anchor_hash is None:
            problems.append(f"entry {expected_head.seq} of the recorded head is gone")
        elif anchor_hash != expected_head.hash:
            problems.append(
                f"entry {expected_head.seq} differs from the recorded head: the log was rewritten up to there"
            )
    return problems


class AuditLog:
    """The gateway's audit log on ``engine``. Writes happen inside the caller's transaction (:meth:`append`)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def append(
        self,
        conn: Connection,
        *,
        at_ms: int,
        actor: str,
        action: str,
        commission_id: int | None = None,
        before: str | None = None,
        after: str | None = None,
        detail: str | None = None,
    ) -> int:
        """Add an entry in ``conn``'s transaction (from ``engine.begin()``) and return its number.

        The entry commits or rolls back together with the change it records. Raises AuditError, before writing
        anything, for a field that is malformed or looks like personal data.
        """
        if detail is not None:
            check_text("detail", detail)
        return self._append(
            conn, at_ms=at_ms, actor=actor, action=action, commission_id=commission_id, before=before, after=after,
            detail=detail,
        )  # fmt: skip

    def append_generated(
        self,
        conn: Connection,
        *,
        at_ms: int,
        actor: str,
        action: str,
        fields: Sequence[tuple[str, str | int]],
        commission_id: int | None = None,
        before: str | None = None,
        after: str | None = None,
    ) -> int:
        """Like :meth:`append`, for an entry the gateway writes itself from values it made or checked: hex ids and
        digests, party ids, dates, counts and reason codes, as ``key=value`` pairs joined by ``;``.

        Each key is a lower-case code and each value 1-128 of ``A-Z a-z 0-9 . _ : -``; the detail is at most 255
        characters. The ID-number test of :func:`check_text` is not applied to the detail, because random hex ids
        (message ids, signatures) hold digit runs shaped like one now and then; callers never pass a subject's data
        here. Raises AuditError for anything else, before writing.
        """
        parts = []
        for key, value in fields:
            text_value = str(value)
            if not _FIELD_KEY_RE.fullmatch(key) or not _FIELD_VALUE_RE.fullmatch(text_value):
                raise AuditError(f"audit detail field {key[:16]!r} is not a code=value pair of ids, counts or codes")
            parts.append(f"{key}={text_value}")
        detail = ";".join(parts)
        if not 0 < len(detail) <= _LIMITS["detail"]:
            raise AuditError(f"audit detail must be 1-{_LIMITS['detail']} characters")
        return self._append(
            conn, at_ms=at_ms, actor=actor, action=action, commission_id=commission_id, before=before, after=after,
            detail=detail,
        )  # fmt: skip

    def _append(
        self,
        conn: Connection,
        *,
        at_ms: int,
        actor: str,
        action: str,
        commission_id: int | None,
        before: str | None,
        after: str | None,
        detail: str | None,
    ) -> int:
        """Check the fields other than ``detail`` (checked by the caller) and write the entry."""
        check_text("actor", actor)
        check_text("action", action)
        if not _ACTION_RE.fullmatch(action):
            raise AuditError("audit action must be a lower-case dotted code such as staff.register")
        for field, value in (("before", before), ("after", after)):
            if value is not None:
                check_text(field, value)
        if at_ms < 0:
            raise AuditError("audit at_ms must not be negative")
        if commission_id is not None and commission_id < 0:
            raise AuditError("audit commission_id must not be negative")
        lock(conn)
        last = _head(conn)
        seq = last.seq + 1
        fields = {
            "seq": seq,
            "at_ms": at_ms,
            "actor": actor,
            "action": action,
            "commission_id": commission_id,
            "before": before,
            "after": after,
            "detail": detail,
        }
        digest = entry_hash(last.hash, **fields)  # type: ignore[arg-type]
        conn.execute(schema.audit_log.insert().values(**fields, prev_hash=last.hash, hash=digest))
        return seq

    def head(self) -> AuditHead:
        """See :func:`head`."""
        return head(self.engine)

    def verify(self, *, expected_head: AuditHead | None = None) -> list[str]:
        """See :func:`verify`."""
        return verify(self.engine, expected_head=expected_head)

    def count(self) -> int:
        """Number of entries."""
        with reading(self.engine) as conn:
            return int(conn.execute(select(func.count()).select_from(schema.audit_log)).scalar_one())

    def entries(self, *, commission_id: int | None = None, after_seq: int = 0, limit: int = 1000) -> list[AuditEntry]:
        """Entries in log order after ``after_seq`` (at most ``limit``), optionally of one commission only."""
        t = schema.audit_log.c
        query = select(schema.audit_log).where(t.seq > after_seq)
        if commission_id is not None:
            query = query.where(t.commission_id == commission_id)
        with reading(self.engine) as conn:
            return [_entry(row) for row in conn.execute(query.order_by(t.seq).limit(limit))]
