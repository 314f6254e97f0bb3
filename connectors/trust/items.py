"""Trust items the connector delivers to the gateways it serves (its roster versions, its key announcements), until
each gateway acknowledged them in its next SyncTrust call.

A minimal stand-in written on the roster branch (helper ROSTER), with exactly the interface the shared design of
issue 11 names, so that ``hedui-connector roster`` can publish roster versions; helper SYNC owns this module (and the
delivery over the wire), and its version replaces this one when the branches are merged. The tables live in the
connector's own store, created beside the others on first use (an existing store keeps everything it holds).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    select,
    update,
)

from common.db import reading
from keys.clock import SystemClock

metadata = MetaData()

trust_items = Table(
    "trust_items",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", Integer, nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("sha256", LargeBinary(32), nullable=False, unique=True),
    Column("created_at_ms", BigInteger, nullable=False),
)

trust_deliveries = Table(
    "trust_deliveries",
    metadata,
    Column("item_id", Integer, ForeignKey("trust_items.id"), primary_key=True),
    Column("peer", String(64), primary_key=True),
    Column("acked_at_ms", BigInteger, nullable=True),
    Column("applied", Boolean, nullable=True),
    Column("reason", String(40), nullable=True),
)


@dataclass(frozen=True)
class PendingItem:
    """An item a gateway has not acknowledged yet."""

    item_id: int
    kind: int
    payload: bytes
    sha256: bytes
    created_at_ms: int


class TrustItems:
    """The outgoing trust items and their delivery to each gateway."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        metadata.create_all(engine)

    def publish(self, conn: Connection, kind: int, payload: bytes, now_ms: int, peers: Sequence[str]) -> bool:
        """Queue ``payload`` for every gateway in ``peers`` in ``conn``'s transaction; idempotent by SHA-256. True
        when the item is new."""
        digest = hashlib.sha256(payload).digest()
        row = conn.execute(select(trust_items.c.id).where(trust_items.c.sha256 == digest)).first()
        new = row is None
        if row is None:
            conn.execute(trust_items.insert().values(kind=kind, payload=payload, sha256=digest, created_at_ms=now_ms))
            row = conn.execute(select(trust_items.c.id).where(trust_items.c.sha256 == digest)).one()
        item_id = row.id
        known = {
            r.peer for r in conn.execute(select(trust_deliveries.c.peer).where(trust_deliveries.c.item_id == item_id))
        }
        for peer in dict.fromkeys(peers):
            if peer not in known:
                conn.execute(trust_deliveries.insert().values(item_id=item_id, peer=peer))
        return new

    def pending(self, peer: str) -> list[PendingItem]:
        """Items ``peer`` has not acknowledged, oldest first."""
        i, d = trust_items.c, trust_deliveries.c
        with reading(self.engine) as conn:
            rows = conn.execute(
                select(i.id, i.kind, i.payload, i.sha256, i.created_at_ms)
                .join_from(trust_items, trust_deliveries, d.item_id == i.id)
                .where(d.peer == peer, d.acked_at_ms.is_(None))
                .order_by(i.id)
            ).all()
        return [PendingItem(r.id, r.kind, r.payload, r.sha256, r.created_at_ms) for r in rows]

    def acked(self, peer: str, sha256: bytes, *, applied: bool, reason: str | None, at_ms: int) -> bool:
        """Record ``peer``'s receipt of the item with ``sha256``; False if no such delivery was waiting."""
        i, d = trust_items.c, trust_deliveries.c
        with self.engine.begin() as conn:
            row = conn.execute(select(i.id).where(i.sha256 == sha256)).first()
            if row is None:
                return False
            done = conn.execute(
                update(trust_deliveries)
                .where(d.item_id == row.id, d.peer == peer, d.acked_at_ms.is_(None))
                .values(acked_at_ms=at_ms, applied=applied, reason=None if applied else (reason or "refused")[:40])
            ).rowcount
        return bool(done)

    def unacknowledged(self, now_ms: int | None = None) -> list[tuple[str, int, int]]:
        """``(peer, kind, age_ms)`` of the oldest item each gateway has not acknowledged, per kind."""
        i, d = trust_items.c, trust_deliveries.c
        with reading(self.engine) as conn:
            rows = conn.execute(
                select(d.peer, i.kind, i.created_at_ms)
                .join_from(trust_items, trust_deliveries, d.item_id == i.id)
                .where(d.acked_at_ms.is_(None))
            ).all()
        oldest: dict[tuple[str, int], int] = {}
        for peer, kind, created in rows:
            oldest[(peer, kind)] = min(created, oldest.get((peer, kind), created))
        now = SystemClock().now_ms() if now_ms is None else now_ms
        return [(peer, kind, max(0, now - created)) for (peer, kind), created in sorted(oldest.items())]
