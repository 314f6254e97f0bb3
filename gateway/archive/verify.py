"""``hedui-gateway archive verify``: every archived envelope still proves what it proved when it was kept.

For each envelope in the archive: its signature verifies with the sender's key as the trust store holds it (or, for
an envelope we sent, with our own keys), the key valid at the envelope's created-at time; nothing is decrypted (the
gateway cannot decrypt what it sealed for a unit). Its header names the message id it is kept under and the right
parties for its direction. And it has its place in the audit chain: the entry it points at names its message id and
SHA-256, and every chain entry that names an envelope finds it, byte for byte. Envelopes kept before migration 0007
have no chain entry; their signatures are checked and they are counted apart.

The chain itself (hashes, checkpoints) is ``audit verify``'s work; run both.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, LargeBinary, cast, select

from common.db import reading
from gateway.db import schema
from keys.envelope import check_signature
from keys.errors import EnvelopeError, RevokedKey
from keys.identity import PartyKeys
from keys.keyring import Keyring
from keys.truststore import TrustStore

#: Chain entries that name an archived envelope (gateway/archive/events.py, gateway/trust/events.py).
ENVELOPE_ACTIONS = ("batch.sent", "batch.receipted", "batch.answered", "batch.delay", "trust.sent", "trust.received")
#: Chain entries that name one when the unit signed its refusal (connectors older than issue 11 sign none).
SIGNED_REFUSAL_ACTIONS = ("batch.refused", "batch.deferred")
_REF_RE = re.compile(r"(?:^|;)env=([0-9a-f]{32});sha256=([0-9a-f]{64})(?:;|$)")
_ROWS_PER_READ = 16  # envelopes are up to a few MiB each
_LOOKUP_CHUNK = 500


@dataclass
class ArchiveReport:
    """What :func:`verify_archive` found."""

    checked: int = 0
    incoming: int = 0
    outgoing: int = 0
    #: Kept before migration 0007: signature checked, no chain entry to check against.
    unchained: int = 0
    #: Chain entries that name an envelope, all found.
    references: int = 0
    problems: list[str] = field(default_factory=list)
    #: Envelopes signed by a key revoked since (revocation is retroactive: they no longer prove who sent them; the
    #: chain's SHA-256 still shows they are the bytes kept at the time).
    revoked: list[str] = field(default_factory=list)


def _reference(detail: str | None) -> tuple[bytes, bytes] | None:
    match = _REF_RE.search(detail or "")
    return None if match is None else (bytes.fromhex(match.group(1)), bytes.fromhex(match.group(2)))


def verify_archive(engine: Engine, *, party: PartyKeys, trust: TrustStore) -> ArchiveReport:
    """Check every archived envelope and every chain entry that names one; see the module docstring."""
    keys = TrustStore()
    for party_id, keyring in trust:
        keys.set_keyring(party_id, keyring)
    keys.set_keyring(party.party_id, Keyring(party.records()))
    report = ArchiveReport()
    a, e = schema.archive.c, schema.audit_log.c
    # SQLite keeps whatever a writer stores: reading every byte or text column as bytes there makes a value of the
    # wrong type a finding of the checks below (an envelope that fails its signature), not a crash of the driver.
    on_sqlite = engine.dialect.name == "sqlite"

    def raw(column: Any) -> Any:
        return cast(column, LargeBinary).label(column.name) if on_sqlite else column

    query = (
        select(raw(a.message_id), raw(a.sender), raw(a.direction), raw(a.envelope), raw(a.sha256))
        .add_columns(a.audit_seq, e.seq, e.action, e.detail)
        .select_from(schema.archive.outerjoin(schema.audit_log, e.seq == a.audit_seq))
        .order_by(a.received_at_ms, a.message_id)
    )
    with reading(engine) as conn:
        for row in conn.execution_options(yield_per=_ROWS_PER_READ).execute(query):
            _check_envelope(row, keys, party.party_id, report)
        _check_references(conn, report)
    return report


def _text(value: object) -> str:
    """A text column's value; read as bytes on SQLite (see verify_archive), so decoded here, never failing."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def _bytes(value: object) -> bytes:
    """A byte column's value; text a writer stored in it is taken as its UTF-8 bytes (and then fails its check)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return str(value).encode("utf-8", errors="replace")


def _check_envelope(row: Any, keys: TrustStore, own: str, report: ArchiveReport) -> None:
    report.checked += 1
    message_id, raw = _bytes(row.message_id), _bytes(row.envelope)
    sender, direction = _text(row.sender), _text(row.direction)
    name = f"envelope {message_id.hex()} ({'sent to' if direction == 'out' else 'from'} "
    try:
        header = check_signature(raw, keys)
    except RevokedKey:
        report.revoked.append(f"{name}{sender}) is signed by a key revoked since")
        header = None
    except EnvelopeError as exc:
        report.problems.append(
            f"{name}{sender}) fails its check ({exc.code}): its bytes were changed, or it was never signed so"
        )
        header = None
    if direction == "out":
        report.outgoing += 1
        parties_ok = header is None or header.sender == own
    else:
        report.incoming += 1
        parties_ok = header is None or (header.recipient == own and header.sender == sender)
    if header is not None and (header.message_id != message_id or not parties_ok):
        report.problems.append(f"{name}{sender}) is kept under another message id or parties than it names")
    digest = hashlib.sha256(raw).digest()
    if row.audit_seq is None:
        if row.sha256 is None and direction == "in":
            report.unchained += 1
        else:
            report.problems.append(f"{name}{sender}) is named by no chain entry")
        return
    if row.sha256 is not None and _bytes(row.sha256) != digest:
        report.problems.append(f"{name}{sender}) differs from its recorded SHA-256: its bytes were changed")
    if row.seq is None:
        report.problems.append(f"{name}{sender}) points at chain entry {row.audit_seq}, which is missing")
    elif row.action not in ENVELOPE_ACTIONS + SIGNED_REFUSAL_ACTIONS or _reference(row.detail) != (message_id, digest):
        report.problems.append(
            f"{name}{sender}) is not the envelope chain entry {row.audit_seq} names: its bytes were changed"
        )


def _check_references(conn: Any, report: ArchiveReport) -> None:
    """Every chain entry that names an envelope finds it in the archive with the SHA-256 it recorded."""
    e, a = schema.audit_log.c, schema.archive.c
    pending: list[tuple[int, bytes, bytes]] = []

    def lookup() -> None:
        ids = list({message_id for _, message_id, _ in pending})
        found = {
            bytes(r.message_id): (bytes(r.sha256) if r.sha256 is not None else None)
            for r in conn.execute(select(a.message_id, a.sha256).where(a.message_id.in_(ids)))
        }
        for seq, message_id, digest in pending:
            if message_id not in found:
                report.problems.append(
                    f"chain entry {seq} names envelope {message_id.hex()}, which is not in the archive (deleted)"
                )
            elif found[message_id] != digest:
                report.problems.append(
                    f"chain entry {seq} names envelope {message_id.hex()} with another SHA-256 than the archive's"
                )
            else:
                report.references += 1
        pending.clear()

    actions = ENVELOPE_ACTIONS + SIGNED_REFUSAL_ACTIONS
    entries = select(e.seq, e.action, e.detail).where(e.action.in_(actions)).order_by(e.seq)
    for row in conn.execution_options(yield_per=1000).execute(entries):
        reference = _reference(row.detail)
        if reference is None:
            if row.action not in SIGNED_REFUSAL_ACTIONS:
                report.problems.append(f"chain entry {row.seq} ({row.action}) names no envelope")
            continue
        pending.append((row.seq, *reference))
        if len(pending) >= _LOOKUP_CHUNK:
            lookup()
    if pending:
        lookup()
