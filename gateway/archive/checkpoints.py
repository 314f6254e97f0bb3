"""Signed checkpoints of the audit chain: what makes its head attestable.

Anyone who can write the database can compute chain hashes, so the chain alone cannot tell an entry the gateway
wrote from one a database writer appended. A checkpoint can: it is an entry of the chain itself, ``audit.checkpoint``,
written by the gateway every ``[archive] checkpoint_interval_seconds`` and at every report issue, that carries the
gateway's Ed25519 signature over the entry before it::

    signed = "hedui.v1.audit-checkpoint" || 0x00 || u32be(len(party)) || party || u64be(seq) || hash || u64be(at_ms)

``party`` is the gateway's party id (UTF-8), ``seq`` and ``hash`` are the number and chain hash of the entry the
checkpoint follows (the checkpoint is entry ``seq + 1``, and ``hash`` its ``prev_hash``), ``at_ms`` the checkpoint
entry's own time. The entry's ``actor`` is the party id, ``detail`` is ``reason=R;key=K;sig=S`` with R ``periodic``,
``report`` or ``operator``, K the signing key's id and S the signature, both lower-case hex. Because the chain links
every entry to the one before, a valid checkpoint vouches for every entry up to it; entries after the newest valid
checkpoint are *unattested*: written by the gateway since, or by someone else.

:func:`examine` checks the chain and every checkpoint in one pass; :class:`ExportedCheckpoint` is the newest
checkpoint written to a file for an operator to keep off the machine, and read back to detect a log cut back or
rewritten past it. docs/operations.md ("Audit log and archive") says what is caught with and without such a copy.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from dataclasses import dataclass, field

from sqlalchemy import Connection, Engine, select

from common.db import reading
from gateway.archive.audit import (
    HASH_BYTES,
    AuditEntry,
    AuditError,
    AuditHead,
    AuditLog,
    entry_from_row,
    entry_hash,
    head_in,
    lock,
    verify,
)
from gateway.db import schema
from keys.clock import Clock
from keys.errors import TrustError
from keys.fingerprint import Algorithm
from keys.identity import PartyKeys
from keys.keyring import Keyring, KeyState
from keys.statements import sign_statement, verify_statement

log = logging.getLogger("hedui.gateway.archive.checkpoints")

CHECKPOINT_DOMAIN = b"hedui.v1.audit-checkpoint\x00"
CHECKPOINT_ACTION = "audit.checkpoint"
REASONS = ("periodic", "report", "operator")
#: The ``format`` of an exported checkpoint file.
EXPORT_FORMAT = "hedui.v1.audit-checkpoint"
MAX_EXPORT_BYTES = 64 * 1024
_DETAIL_RE = re.compile(r"reason=([a-z]+);key=([0-9a-f]{32});sig=([0-9a-f]{128})")


def checkpoint_message(party_id: str, seq: int, head_hash: bytes, at_ms: int) -> bytes:
    """The bytes after the domain that a checkpoint signs (the module docstring gives the layout)."""
    if len(head_hash) != HASH_BYTES:
        raise AuditError("a checkpoint attests a 32-byte chain hash")
    party = party_id.encode("utf-8")
    return struct.pack(">I", len(party)) + party + struct.pack(">Q", seq) + head_hash + struct.pack(">Q", at_ms)


def write_checkpoint(conn: Connection, audit: AuditLog, party: PartyKeys, now_ms: int, *, reason: str) -> int | None:
    """Sign the chain's head in ``conn``'s transaction and append the checkpoint entry; returns its number, or None
    when there is nothing to attest (an empty log, or a head that is a checkpoint already)."""
    if reason not in REASONS:
        raise AuditError(f"a checkpoint reason is one of {', '.join(REASONS)}")
    lock(conn)
    last = head_in(conn)
    if last.seq == 0:
        return None
    action = conn.execute(select(schema.audit_log.c.action).where(schema.audit_log.c.seq == last.seq)).scalar_one()
    if action == CHECKPOINT_ACTION:
        return None
    key = party.signing_key(now_ms)
    signature = sign_statement(CHECKPOINT_DOMAIN, checkpoint_message(party.party_id, last.seq, last.hash, now_ms), key)
    return audit.append_generated(
        conn,
        at_ms=now_ms,
        actor=party.party_id,
        action=CHECKPOINT_ACTION,
        fields=(("reason", reason), ("key", key.key_id.hex()), ("sig", signature.hex())),
    )


class Checkpointer:
    """The periodic checkpoint job of the scheduler (and ``hedui-gateway audit checkpoint``)."""

    def __init__(self, audit: AuditLog, party: PartyKeys, clock: Clock, *, reason: str = "periodic") -> None:
        self.audit, self.party, self.clock, self.reason = audit, party, clock, reason

    def __call__(self) -> None:
        """The scheduler job: :meth:`sign`."""
        self.sign()

    def sign(self) -> int | None:
        """Write a checkpoint if entries were added since the last one; returns its number or None."""
        with self.audit.engine.begin() as conn:
            seq = write_checkpoint(conn, self.audit, self.party, self.clock.now_ms(), reason=self.reason)
        if seq is not None:
            log.info("audit checkpoint signed", extra={"seq": seq, "reason": self.reason})
        return seq


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint entry as read from the chain (not yet known to be valid)."""

    seq: int
    at_ms: int
    party_id: str
    reason: str
    key_id: bytes
    signature: bytes
    #: Number and hash of the entry it attests (``seq - 1`` and the entry's ``prev_hash``).
    attested: AuditHead
    #: The checkpoint entry's own chain hash.
    hash: bytes

    @classmethod
    def from_entry(cls, entry: AuditEntry) -> Checkpoint:
        """Read a checkpoint entry; AuditError if its detail is not one the gateway writes."""
        match = _DETAIL_RE.fullmatch(entry.detail or "")
        if match is None or match.group(1) not in REASONS or entry.seq < 2:
            raise AuditError(f"entry {entry.seq} is a checkpoint the gateway did not write (malformed)")
        return cls(
            seq=entry.seq,
            at_ms=entry.at_ms,
            party_id=entry.actor,
            reason=match.group(1),
            key_id=bytes.fromhex(match.group(2)),
            signature=bytes.fromhex(match.group(3)),
            attested=AuditHead(entry.seq - 1, entry.prev_hash),
            hash=entry.hash,
        )

    def message(self) -> bytes:
        """What the signature covers, after the domain."""
        return checkpoint_message(self.party_id, self.attested.seq, self.attested.hash, self.at_ms)

    def check(self, keys: Keyring, party_id: str) -> str | None:
        """None if the checkpoint is valid: made by ``party_id`` with one of ``keys`` that was valid at its time.
        Raises AuditError for one the gateway did not make (forged); returns a note for one signed by a key that
        has since been revoked (it no longer counts, later checkpoints still vouch for the entries before it)."""
        if self.party_id != party_id:
            raise AuditError(f"checkpoint {self.seq} names {self.party_id}, not this gateway ({party_id})")
        record = keys.get(self.key_id)
        if record is None or record.algorithm is not Algorithm.ED25519:
            raise AuditError(f"checkpoint {self.seq} is signed by a key this gateway never held (forged)")
        if record.state is KeyState.REVOKED:
            return f"checkpoint {self.seq} is signed by key {self.key_id.hex()}, revoked since: it no longer counts"
        if not record.valid_at(self.at_ms):
            raise AuditError(f"checkpoint {self.seq} is signed by a key that was not valid at its time (forged)")
        try:
            verify_statement(CHECKPOINT_DOMAIN, self.message(), self.signature, record.public)
        except TrustError as exc:
            raise AuditError(f"checkpoint {self.seq} has a signature that does not verify (forged)") from exc
        return None

    def export(self) -> str:
        """The checkpoint as an :class:`ExportedCheckpoint` file's text (JSON, one object)."""
        return ExportedCheckpoint(self).dumps()


@dataclass(frozen=True)
class ExportedCheckpoint:
    """A checkpoint kept off the machine: JSON with ``format``, ``party``, ``seq`` (the checkpoint entry's number),
    ``at_ms``, ``reason``, ``attested_seq``, ``attested_hash``, ``key_id``, ``signature`` and ``entry_hash`` (the
    checkpoint entry's chain hash, recomputable from the other fields); hex in lower case."""

    checkpoint: Checkpoint

    def dumps(self) -> str:
        """The file's text."""
        c = self.checkpoint
        return json.dumps(
            {
                "format": EXPORT_FORMAT,
                "party": c.party_id,
                "seq": c.seq,
                "at_ms": c.at_ms,
                "reason": c.reason,
                "attested_seq": c.attested.seq,
                "attested_hash": c.attested.hash.hex(),
                "key_id": c.key_id.hex(),
                "signature": c.signature.hex(),
                "entry_hash": c.hash.hex(),
            },
            indent=2,
        )

    @classmethod
    def loads(cls, text: str) -> ExportedCheckpoint:
        """Read a file written by :meth:`dumps`; AuditError for anything else. The signature is not checked here
        (:func:`examine` does, with the gateway's keys)."""
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
                raise ValueError("format")
            seq, at_ms = doc["seq"], doc["at_ms"]
            if not (isinstance(seq, int) and isinstance(at_ms, int) and seq >= 2 and at_ms >= 0):
                raise ValueError("numbers")
            if doc["attested_seq"] != seq - 1:
                raise ValueError("attested_seq")
            key_id, signature = bytes.fromhex(doc["key_id"]), bytes.fromhex(doc["signature"])
            attested = AuditHead(seq - 1, bytes.fromhex(doc["attested_hash"]))
            claimed = bytes.fromhex(doc["entry_hash"])
            party, reason = str(doc["party"]), str(doc["reason"])
        except (ValueError, KeyError, TypeError) as exc:
            raise AuditError("not an exported audit checkpoint ('hedui-gateway audit export-head')") from exc
        detail = f"reason={reason};key={key_id.hex()};sig={signature.hex()}"
        if len(attested.hash) != HASH_BYTES or not _DETAIL_RE.fullmatch(detail):
            raise AuditError("not an exported audit checkpoint ('hedui-gateway audit export-head')")
        own = entry_hash(
            attested.hash, seq=seq, at_ms=at_ms, actor=party, action=CHECKPOINT_ACTION, commission_id=None,
            before=None, after=None, detail=detail,
        )  # fmt: skip
        if own != claimed:
            raise AuditError("the exported checkpoint's entry_hash does not match its fields: the file was changed")
        return cls(Checkpoint(seq, at_ms, party, reason, key_id, signature, attested, own))

    @property
    def head(self) -> AuditHead:
        """The checkpoint entry as a head the chain must still hold."""
        return AuditHead(self.checkpoint.seq, self.checkpoint.hash)


@dataclass
class ChainReport:
    """What :func:`examine` found."""

    #: Entries the chain holds (the head's number when intact).
    entries: int = 0
    problems: list[str] = field(default_factory=list)
    #: Checkpoints found valid, oldest first.
    checkpoints: list[Checkpoint] = field(default_factory=list)
    #: Remarks that are not tampering (checkpoints signed by keys revoked since).
    notes: list[str] = field(default_factory=list)
    #: Number of the newest entry a valid checkpoint vouches for (the checkpoint entry itself); 0 if none.
    attested_through: int = 0

    @property
    def unattested(self) -> tuple[int, int, int] | None:
        """(count, first, last) of the entries after the newest valid checkpoint, or None if there are none."""
        if self.entries <= self.attested_through:
            return None
        return self.entries - self.attested_through, self.attested_through + 1, self.entries


def examine(
    engine: Engine,
    *,
    keys: Keyring,
    party_id: str,
    expected_head: AuditHead | None = None,
    exported: ExportedCheckpoint | None = None,
) -> ChainReport:
    """Check the chain (:func:`gateway.archive.audit.verify`) and every checkpoint in it with ``keys``, the
    gateway's own signing keys (retired ones included: each must have been valid at its checkpoint's time).

    With ``expected_head`` (``SEQ:HEX`` recorded earlier) or ``exported`` (a checkpoint file from ``audit
    export-head``, whose signature is checked first), a log cut back or rewritten before that point is a problem.
    Entries after the newest valid checkpoint are reported as unattested, not as problems.
    """
    if expected_head is not None and exported is not None:
        raise AuditError("give either a recorded head or an exported checkpoint, not both")
    report = ChainReport()
    anchor = exported.head if exported is not None else expected_head
    if exported is not None:
        try:
            note = exported.checkpoint.check(keys, party_id)
        except AuditError as exc:
            raise AuditError(f"the exported checkpoint does not verify: {exc}") from exc
        if note is not None:
            report.notes.append(f"the exported {note}")

    def observe(entry: AuditEntry) -> None:
        report.entries = entry.seq
        if entry.action != CHECKPOINT_ACTION:
            return
        try:
            checkpoint = Checkpoint.from_entry(entry)
            note = checkpoint.check(keys, party_id)
        except AuditError as exc:
            report.problems.append(str(exc))
            return
        if note is not None:
            report.notes.append(note)
            return
        report.checkpoints.append(checkpoint)
        report.attested_through = entry.seq

    report.problems[:0] = verify(engine, expected_head=anchor, observe=observe)
    return report


def latest_checkpoint(engine: Engine, keys: Keyring, party_id: str) -> Checkpoint | None:
    """The newest checkpoint entry whose signature verifies with ``keys`` (no chain walk: what to export)."""
    t = schema.audit_log.c
    with reading(engine) as conn:
        rows = conn.execute(
            select(schema.audit_log).where(t.action == CHECKPOINT_ACTION).order_by(t.seq.desc()).limit(50)
        ).all()
    for row in rows:
        entry = entry_from_row(row)
        try:
            checkpoint = Checkpoint.from_entry(entry)
            if checkpoint.check(keys, party_id) is None:
                return checkpoint
        except AuditError:
            continue
    return None
