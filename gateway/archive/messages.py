"""The message archive of clause 17: envelopes kept exactly as they crossed the wire, so that the same bytes prove
later who sent what.

Kept are the envelopes the exchange acted on: each query batch envelope as sent (``direction`` "out", every attempt,
since each is sealed afresh), and each receipt, and each answer set that answered a batch or carried a delay notice,
as received ("in"). Each is kept in the transaction of the audit chain entry that names it (gateway/archive/events.py)
and points back at that entry (``audit_seq``), so the archive and the chain vouch for each other
(``hedui-gateway archive verify``, gateway/archive/verify.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property

from sqlalchemy import Connection, Engine

from gateway.db import schema as s
from gateway.db.statements import insert_ignore

DIRECTIONS = ("in", "out")


@dataclass(frozen=True)
class Envelope:
    """An envelope to keep: its bytes and what its (checked, or our own) header says."""

    message_id: bytes
    sender: str
    message_type: str
    raw: bytes = field(repr=False)

    @cached_property
    def sha256(self) -> bytes:
        """SHA-256 of the bytes, as the chain entry records it (computed once)."""
        return hashlib.sha256(self.raw).digest()


class MessageArchive:
    """The ``archive`` table of envelopes."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def keep_in(self, conn: Connection, envelope: Envelope, *, direction: str, now_ms: int, audit_seq: int) -> None:
        """Keep ``envelope`` in ``conn``'s transaction, named by chain entry ``audit_seq``. Idempotent by message
        id: an envelope kept before (an answer set that answered several batches) keeps its first row."""
        if direction not in DIRECTIONS:
            raise ValueError("an archived envelope's direction is 'in' or 'out'")
        conn.execute(
            insert_ignore(self.engine, s.archive),
            {
                "message_id": envelope.message_id,
                "sender": envelope.sender,
                "message_type": envelope.message_type,
                "received_at_ms": now_ms,
                "envelope": envelope.raw,
                "direction": direction,
                "sha256": envelope.sha256,
                "audit_seq": audit_seq,
            },
        )
