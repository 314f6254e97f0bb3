"""Trust items the gateway delivers to its peers over SyncTrust, until each peer acknowledged them.

A minimal stand-in written on the roster branch (helper ROSTER), with exactly the interface the shared design of
issue 11 names, so that ``hedui-gateway roster`` can publish roster versions; helper SYNC owns this module (and the
delivery over the wire), and its version replaces this one when the branches are merged. Items live in the database
(migration 0011), so a command in a process of its own publishes and the running service delivers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, select, update

from common.db import reading
from gateway.db import schema as s
from keys.clock import SystemClock


@dataclass(frozen=True)
class PendingItem:
    """An item a peer has not acknowledged yet."""

    item_id: int
    kind: int
    payload: bytes
    sha256: bytes
    created_at_ms: int


class TrustItems:
    """The outgoing trust items and their delivery to each peer."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def publish(self, conn: Connection, kind: int, payload: bytes, now_ms: int, peers: Sequence[str]) -> bool:
        """Queue ``payload`` for every peer in ``peers`` in ``conn``'s transaction; idempotent by SHA-256 (a peer not
        yet named gets its delivery row). True when the item is new."""
        digest = hashlib.sha256(payload).digest()
        row = conn.execute(select(s.trust_items.c.id).where(s.trust_items.c.sha256 == digest)).first()
        new = row is None
        if row is None:
            conn.execute(s.trust_items.insert().values(kind=kind, payload=payload, sha256=digest, created_at_ms=now_ms))
            row = conn.execute(select(s.trust_items.c.id).where(s.trust_items.c.sha256 == digest)).one()
        item_id = row.id
        known = {
            r.peer
            for r in conn.execute(select(s.trust_deliveries.c.peer).where(s.trust_deliveries.c.item_id == item_id))
        }
        for peer in dict.fromkeys(peers):
            if peer not in known:
                conn.execute(s.trust_deliveries.insert().values(item_id=item_id, peer=peer))
        return new

    def pending(self, peer: str) -> list[PendingItem]:
        """Items ``peer`` has not acknowledged, oldest first (the order they must be applied in)."""
        i, d = s.trust_items.c, s.trust_deliveries.c
        with reading(self.engine) as conn:
            rows = conn.execute(
                select(i.id, i.kind, i.payload, i.sha256, i.created_at_ms)
                .join_from(s.trust_items, s.trust_deliveries, d.item_id == i.id)
                .where(d.peer == peer, d.acked_at_ms.is_(None))
                .order_by(i.id)
            ).all()
        return [PendingItem(r.id, r.kind, r.payload, r.sha256, r.created_at_ms) for r in rows]

    def acked(self, peer: str, sha256: bytes, *, applied: bool, reason: str | None, at_ms: int) -> bool:
        """Record ``peer``'s receipt of the item with ``sha256``; False if no such delivery was waiting."""
        i, d = s.trust_items.c, s.trust_deliveries.c
        with self.engine.begin() as conn:
            row = conn.execute(select(i.id).where(i.sha256 == sha256)).first()
            if row is None:
                return False
            done = conn.execute(
                update(s.trust_deliveries)
                .where(d.item_id == row.id, d.peer == peer, d.acked_at_ms.is_(None))
                .values(acked_at_ms=at_ms, applied=applied, reason=None if applied else (reason or "refused")[:40])
            ).rowcount
        return bool(done)

    def unacknowledged(self, now_ms: int | None = None) -> list[tuple[str, int, int]]:
        """``(peer, kind, age_ms)`` of the oldest item each peer has not acknowledged, per kind (for metrics)."""
        i, d = s.trust_items.c, s.trust_deliveries.c
        with reading(self.engine) as conn:
            rows = conn.execute(
                select(d.peer, i.kind, i.created_at_ms)
                .join_from(s.trust_items, s.trust_deliveries, d.item_id == i.id)
                .where(d.acked_at_ms.is_(None))
            ).all()
        oldest: dict[tuple[str, int], int] = {}
        for peer, kind, created in rows:
            oldest[(peer, kind)] = min(created, oldest.get((peer, kind), created))
        now = SystemClock().now_ms() if now_ms is None else now_ms
        return [(peer, kind, max(0, now - created)) for (peer, kind), created in sorted(oldest.items())]
