"""The message archive of clause 17: envelopes kept exactly as they crossed the wire, so that the same bytes prove
later who sent what."""

from __future__ import annotations

from sqlalchemy import Engine

from gateway.db import schema as s
from gateway.db.statements import insert_ignore


class MessageArchive:
    """The ``archive`` table of envelopes."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def keep(self, message_id: bytes, sender: str, message_type: str, envelope: bytes, now_ms: int) -> None:
        """Keep an envelope received from a unit exactly as received (idempotent by message id)."""
        with self.engine.begin() as conn:
            conn.execute(
                insert_ignore(self.engine, s.archive),
                {
                    "message_id": message_id,
                    "sender": sender,
                    "message_type": message_type,
                    "received_at_ms": now_ms,
                    "envelope": envelope,
                },
            )
