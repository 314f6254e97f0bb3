"""A replay cache in the database (keys.replay.ReplayCache), shared by every process that uses the database."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Engine, LargeBinary, MetaData, String, Table, delete, insert, select
from sqlalchemy.exc import IntegrityError

from common.db import reading

#: Remove expired entries at most this often (milliseconds), piggy-backed on inserts.
_PRUNE_EVERY_MS = 60_000


def replay_table(metadata: MetaData) -> Table:
    """The table of seen (sender, message id) pairs, defined on ``metadata``."""
    return Table(
        "seen_messages",
        metadata,
        Column("sender", String(64), primary_key=True),
        Column("message_id", LargeBinary(16), primary_key=True),
        Column("keep_until_ms", BigInteger, nullable=False, index=True),
    )


class SqlReplayCache:
    """ReplayCache on a table made by :func:`replay_table`; atomic through the primary key."""

    def __init__(self, engine: Engine, table: Table) -> None:
        self._engine = engine
        self._table = table
        self._last_prune_ms = 0

    def remember(self, sender: str, message_id: bytes, *, keep_until_ms: int, now_ms: int) -> bool:
        with self._engine.begin() as conn:
            if now_ms - self._last_prune_ms > _PRUNE_EVERY_MS:
                conn.execute(delete(self._table).where(self._table.c.keep_until_ms < now_ms))
                self._last_prune_ms = now_ms
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    insert(self._table).values(sender=sender, message_id=message_id, keep_until_ms=keep_until_ms)
                )
        except IntegrityError:
            return False
        return True

    def seen(self, sender: str, message_id: bytes) -> bool:
        """True if the pair is remembered (for idempotent handling of an identical resend)."""
        with reading(self._engine) as conn:
            row = conn.execute(
                select(self._table.c.keep_until_ms).where(
                    self._table.c.sender == sender, self._table.c.message_id == message_id
                )
            ).first()
        return row is not None
