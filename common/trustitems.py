"""Trust items waiting for delivery to peers, in the database (the gateway's and the connector's alike).

A party publishes a trust item (a roster, a key announcement, a revocation list: trust.proto ``TrustItemKind``) once,
for a set of peers; it is offered to each peer in every trust synchronisation until that peer acknowledged it,
applied or refused (docs/exchange.md, "Trust synchronisation"). Keeping them in the database lets a command-line
process publish an item that the running service then delivers, and lets a restart lose nothing.

Tables (the gateway's migration 0011 creates them; the connector's store creates them at start)::

    trust_items(id PK, kind INT, payload BLOB, sha256 BLOB(32) UNIQUE, created_at_ms BIGINT)
    trust_deliveries(item_id FK, peer VARCHAR(64), acked_at_ms BIGINT NULL, applied BOOL NULL,
                     reason VARCHAR(40) NULL, PK(item_id, peer))

Payloads are signed statements (a roster names staff members: personal data of staff, shown to operators, never
logged); nothing else here holds personal data.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import overload

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    Executable,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    and_,
    func,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from common.db import reading

#: Most items (and bytes of payload) offered in one trust synchronisation (keys/trustsync.py has the same limits).
MAX_ITEMS_PER_SYNC = 64
MAX_BYTES_PER_SYNC = 8 * 1024 * 1024


def trust_tables(metadata: MetaData) -> tuple[Table, Table]:
    """The ``trust_items`` and ``trust_deliveries`` tables, defined on ``metadata``."""
    items = Table(
        "trust_items",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("kind", Integer, nullable=False),
        Column("payload", LargeBinary, nullable=False),
        Column("sha256", LargeBinary(32), nullable=False, unique=True),
        Column("created_at_ms", BigInteger, nullable=False),
    )
    deliveries = Table(
        "trust_deliveries",
        metadata,
        Column("item_id", Integer, ForeignKey("trust_items.id"), primary_key=True),
        Column("peer", String(64), primary_key=True),
        Column("acked_at_ms", BigInteger, nullable=True),
        Column("applied", Boolean, nullable=True),
        Column("reason", String(40), nullable=True),
        Index("ix_trust_deliveries_pending", "peer", "acked_at_ms"),
    )
    return items, deliveries


@dataclass(frozen=True)
class PendingItem:
    """An item not yet acknowledged by the peer it is offered to."""

    id: int
    kind: int
    payload: bytes
    sha256: bytes
    created_at_ms: int

    @property
    def item_id(self) -> int:
        return self.id


@dataclass(frozen=True)
class Delivery:
    """One item's delivery to one peer: acknowledged when, and how (applied, or refused for ``reason``)."""

    peer: str
    kind: int
    sha256: bytes
    acked_at_ms: int | None
    applied: bool | None
    reason: str | None


@dataclass(frozen=True)
class Ack:
    """A peer's verdict on one item, as its TrustItemAck says (the kind is checked against the item's own)."""

    kind: int
    sha256: bytes
    applied: bool
    reason: str


def _insert_ignore(conn: Connection, table: Table) -> Executable:
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()


class TrustItemStore:
    """Publish trust items for peers, list what a peer has still to acknowledge, record its acknowledgements."""

    def __init__(self, engine: Engine, items: Table, deliveries: Table) -> None:
        self.engine = engine
        self._items = items
        self._deliveries = deliveries

    def publish(self, conn: Connection, kind: int, payload: bytes, now_ms: int, peers: Sequence[str]) -> bool:
        """Publish ``payload`` as an item of ``kind`` for ``peers``, in ``conn``'s transaction. Idempotent by the
        payload's SHA-256: an item published before is not duplicated (peers it was not yet for are added to it).
        Returns True when the item is new."""
        sha = hashlib.sha256(payload).digest()
        new = bool(
            conn.execute(
                _insert_ignore(conn, self._items),
                {"kind": kind, "payload": payload, "sha256": sha, "created_at_ms": now_ms},
            ).rowcount
        )
        item_id = conn.execute(select(self._items.c.id).where(self._items.c.sha256 == sha)).scalar_one()
        if peers:
            conn.execute(
                _insert_ignore(conn, self._deliveries),
                [{"item_id": item_id, "peer": peer} for peer in dict.fromkeys(peers)],
            )
        return new

    def publish_new(self, kind: int, payload: bytes, now_ms: int, peers: Sequence[str]) -> bool:
        """Publish in a transaction of its own, and only if the item is new: an item published before keeps the
        peers it had (a peer enrolled later has no use for an announcement about keys it never knew)."""
        with self.engine.begin() as conn:
            if self._known(conn, hashlib.sha256(payload).digest()):
                return False
            return self.publish(conn, kind, payload, now_ms, peers)

    def _known(self, conn: Connection, sha: bytes) -> bool:
        return conn.execute(select(self._items.c.id).where(self._items.c.sha256 == sha)).first() is not None

    def pending(self, peer: str, *, limit: int = MAX_ITEMS_PER_SYNC) -> list[PendingItem]:
        """The items ``peer`` has not acknowledged, oldest first: at most ``limit`` and MAX_BYTES_PER_SYNC bytes of
        payload (at least one item, whatever its size)."""
        i, d = self._items.c, self._deliveries.c
        query = (
            select(i.id, i.kind, i.payload, i.sha256, i.created_at_ms)
            .join_from(self._deliveries, self._items, d.item_id == i.id)
            .where(d.peer == peer, d.acked_at_ms.is_(None))
            .order_by(i.id)
            .limit(limit)
        )
        with reading(self.engine) as conn:
            rows = conn.execute(query).all()
        chosen: list[PendingItem] = []
        total = 0
        for row in rows:
            total += len(row.payload)
            if chosen and total > MAX_BYTES_PER_SYNC:
                break
            chosen.append(PendingItem(row.id, row.kind, bytes(row.payload), bytes(row.sha256), row.created_at_ms))
        return chosen

    @overload
    def acked(self, peer: str, acks: Iterable[Ack], now_ms: int) -> int: ...

    @overload
    def acked(self, peer: str, acks: bytes, *, applied: bool, reason: str | None, at_ms: int) -> bool: ...

    def acked(
        self,
        peer: str,
        acks: Iterable[Ack] | bytes,
        now_ms: int | None = None,
        *,
        applied: bool | None = None,
        reason: str | None = None,
        at_ms: int | None = None,
    ) -> int | bool:
        """Record ``peer``'s acknowledgements of items offered to it, at ``now_ms``; acks of items it was not
        offered, of another kind, or acknowledged before change nothing. Returns how many deliveries were
        acknowledged now. One acknowledgement may also be given by the item's SHA-256 (``acked(peer, sha256,
        applied=…, reason=…, at_ms=…)``, whatever its kind), which returns whether it was waiting."""
        if isinstance(acks, bytes):
            if applied is None or at_ms is None:
                raise TypeError("acked(peer, sha256, ...) needs applied= and at_ms=")
            return self._acked(peer, [(None, acks, applied, reason or "refused")], at_ms) == 1
        if now_ms is None:
            raise TypeError("acked(peer, acks, now_ms) needs now_ms")
        return self._acked(peer, [(a.kind, a.sha256, a.applied, a.reason) for a in acks], now_ms)

    def _acked(self, peer: str, acks: Sequence[tuple[int | None, bytes, bool, str]], now_ms: int) -> int:
        i, d = self._items.c, self._deliveries.c
        done = 0
        with self.engine.begin() as conn:
            for kind, sha, applied, reason in acks:
                query = select(i.id).where(i.sha256 == sha)
                if kind is not None:
                    query = query.where(i.kind == kind)
                item_id = conn.execute(query).scalar_one_or_none()
                if item_id is None:
                    continue
                done += conn.execute(
                    update(self._deliveries)
                    .where(d.item_id == item_id, d.peer == peer, d.acked_at_ms.is_(None))
                    .values(acked_at_ms=now_ms, applied=applied, reason=None if applied else reason[:40])
                ).rowcount
        return done

    def unacknowledged(self, now_ms: int | None = None) -> list[tuple[str, int, int]]:
        """(peer, kind, age in ms) of the oldest item each peer has not acknowledged, per kind, for the metrics; the
        age is counted to ``now_ms`` (the system clock when None)."""
        return [(peer, kind, age) for peer, kind, _, age in self.backlog(now_ms)]

    def backlog(self, now_ms: int | None = None) -> list[tuple[str, int, int, int]]:
        """(peer, kind, how many, age in ms of the oldest) of the items each peer has not acknowledged, per kind."""
        i, d = self._items.c, self._deliveries.c
        query = (
            select(d.peer, i.kind, func.count(), func.min(i.created_at_ms))
            .join_from(self._deliveries, self._items, d.item_id == i.id)
            .where(d.acked_at_ms.is_(None))
            .group_by(d.peer, i.kind)
            .order_by(d.peer, i.kind)
        )
        now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        with reading(self.engine) as conn:
            rows = conn.execute(query).all()
        return [(peer, kind, int(count), max(0, now - int(oldest))) for peer, kind, count, oldest in rows]

    def newest_pending(self) -> dict[str, int]:
        """Peer -> publication time of the newest item it has not acknowledged (decides when to synchronise)."""
        i, d = self._items.c, self._deliveries.c
        query = (
            select(d.peer, func.max(i.created_at_ms))
            .join_from(self._deliveries, self._items, d.item_id == i.id)
            .where(d.acked_at_ms.is_(None))
            .group_by(d.peer)
        )
        with reading(self.engine) as conn:
            return {peer: int(newest) for peer, newest in conn.execute(query)}

    def has_pending(self, peer: str) -> bool:
        d = self._deliveries.c
        with reading(self.engine) as conn:
            row = conn.execute(select(d.item_id).where(and_(d.peer == peer, d.acked_at_ms.is_(None))).limit(1)).first()
        return row is not None

    def deliveries(self, *, kind: int | None = None) -> list[Delivery]:
        """Every delivery (oldest item first), of one kind when given: what each peer made of each item."""
        i, d = self._items.c, self._deliveries.c
        query = (
            select(d.peer, i.kind, i.sha256, d.acked_at_ms, d.applied, d.reason)
            .join_from(self._deliveries, self._items, d.item_id == i.id)
            .order_by(i.id, d.peer)
        )
        if kind is not None:
            query = query.where(i.kind == kind)
        with reading(self.engine) as conn:
            return [
                Delivery(r.peer, r.kind, bytes(r.sha256), r.acked_at_ms, r.applied, r.reason)
                for r in conn.execute(query)
            ]
