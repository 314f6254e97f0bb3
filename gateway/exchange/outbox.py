"""The outbox: a commission's subjects become one query item per subject and unit, and each unit's queued items
are formed into batches whose content is fixed once, so that every later attempt sends exactly the same batch.

Every step is a single transaction and idempotent, so a crash between any two steps is repaired by running the step
again.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

from hedui.v1 import exchange_pb2, records_pb2
from sqlalchemy import Engine, func, insert, literal_column, select
from sqlalchemy.engine import Connection

from common.dates import to_pb
from common.db import reading
from gateway.db import schema as s
from gateway.db.statements import bulk_insert
from gateway.exchange.approvals import (
    CommissionFacts,
    batch_share,
    engine_package_digest,
    leaf_of,
    new_salts,
    tree_units,
    write_tree,
)

#: Rows per executemany chunk and ids per IN list (well below SQLite's variable limit).
CHUNK = 5000
#: PostgreSQL advisory lock key that serialises enqueueing across replicas.
ENQUEUE_LOCK = 0x4845_4455_4901


@dataclass(frozen=True)
class SubjectInput:
    """One person to verify, as the agency API hands it over (already validated)."""

    subject_ref: str
    id_number: str
    name: str
    auth_number: str
    auth_digest: bytes


@dataclass(frozen=True)
class CommissionInput:
    """What the exchange needs of a commission."""

    ref: str
    purpose: int
    income_from: tuple[int, int]
    income_to: tuple[int, int]
    assets_as_of: date
    staff_ids: tuple[str, ...]
    categories: tuple[int, ...]
    thresholds: tuple[tuple[int, int], ...] = ()


def _ym(value: tuple[int, int]) -> str:
    return f"{value[0]:04d}-{value[1]:02d}"


def _parse_ym(text: str) -> records_pb2.YearMonth:
    year, month = text.split("-")
    return records_pb2.YearMonth(year=int(year), month=int(month))


#: What new_batch_id makes.
BATCH_ID_RE = re.compile(r"B[0-9a-f]{32}")


def new_batch_id() -> str:
    """Random, so that ids never collide across replicas or restarts; stable once stored."""
    return "B" + os.urandom(16).hex()


class Outbox:
    """Query items waiting for a batch, and the forming of batches."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.is_postgres = engine.dialect.name == "postgresql"

    def enqueue(
        self,
        commission: CommissionInput,
        subjects: Iterable[SubjectInput],
        unit_ids: Sequence[str],
        now_ms: int,
        *,
        gateway: str,
    ) -> int:
        """Store a commission's subjects, its approval trees (its exchange digest is their root; ``gateway``: our
        party id, which the root names) and one query item per subject and unit; returns the commission id. Its
        batches carry the approvals recorded for it (none until someone records them: tests and benchmarks sign the
        exchange digest as staff would, see tests/approval_kit.py).

        Idempotent per commission ref: enqueueing the same ref again changes nothing and returns the same id.
        """
        with self.engine.begin() as conn:
            if self.is_postgres:
                # Replicas share the database: subject ids are allocated as max + 1 below, and the ref check must
                # see a concurrent enqueue of the same ref, so enqueues take turns (on SQLite, BEGIN IMMEDIATE).
                conn.execute(select(func.pg_advisory_xact_lock(ENQUEUE_LOCK)))
            existing = conn.execute(select(s.commissions.c.id).where(s.commissions.c.ref == commission.ref)).first()
            if existing is not None:
                return int(existing.id)
            key = conn.execute(
                insert(s.commissions).values(
                    ref=commission.ref,
                    purpose=commission.purpose,
                    income_from=_ym(commission.income_from),
                    income_to=_ym(commission.income_to),
                    assets_as_of=commission.assets_as_of,
                    staff_ids=",".join(commission.staff_ids),
                    categories=",".join(str(c) for c in commission.categories),
                    thresholds=",".join(f"{c}:{limit}" for c, limit in commission.thresholds),
                    created_at_ms=now_ms,
                )
            ).inserted_primary_key
            assert key is not None
            commission_id = int(key[0])
            leaves: list[bytes] = []
            chunk: list[SubjectInput] = []
            for subject in subjects:
                chunk.append(subject)
                if len(chunk) >= CHUNK:
                    self._enqueue_chunk(conn, commission_id, chunk, unit_ids, now_ms, leaves=leaves)
                    chunk = []
            if chunk:
                self._enqueue_chunk(conn, commission_id, chunk, unit_ids, now_ms, leaves=leaves)
            categories = {
                r.unit_id: r.category
                for r in conn.execute(
                    select(s.units.c.unit_id, s.units.c.category).where(s.units.c.unit_id.in_(unit_ids))
                )
            }
            facts = CommissionFacts(
                gateway=gateway,
                ref=commission.ref,
                programme=commission.purpose,
                income_from=commission.income_from,
                income_to=commission.income_to,
                assets_as_of=commission.assets_as_of,
                package_digest=engine_package_digest(commission.ref),
            )
            units = tree_units(
                {u: categories.get(u, 0) for u in unit_ids}, commission.categories, commission.thresholds
            )
            write_tree(conn, commission_id, facts, leaves, units)
        return int(commission_id)

    def _enqueue_chunk(
        self,
        conn: Connection,
        commission_id: int,
        chunk: list[SubjectInput],
        unit_ids: Sequence[str],
        now_ms: int,
        *,
        leaves: list[bytes],
    ) -> None:
        """Store a chunk of subjects (share indices from ``len(leaves)`` on) and their items; their leaves are
        appended to ``leaves``."""
        first = conn.execute(select(func.coalesce(func.max(s.subjects.c.id), 0))).scalar_one() + 1
        start = len(leaves)
        salts = new_salts(len(chunk))
        leaves.extend(
            leaf_of(salt, x.id_number, x.name, x.auth_number, x.auth_digest)
            for salt, x in zip(salts, chunk, strict=True)
        )
        bulk_insert(
            conn,
            s.subjects,
            (
                "id",
                "commission_id",
                "subject_ref",
                "id_number",
                "name",
                "auth_number",
                "auth_digest",
                "share_index",
                "leaf_salt",
            ),
            [
                (
                    first + i,
                    commission_id,
                    x.subject_ref,
                    x.id_number,
                    x.name,
                    x.auth_number,
                    x.auth_digest,
                    start + i,
                    salts[i],
                )
                for i, x in enumerate(chunk)
            ],
        )
        bulk_insert(
            conn,
            s.items,
            ("commission_id", "subject_id", "unit_id", "created_at_ms"),
            [(commission_id, first + i, unit, now_ms) for unit in unit_ids for i in range(len(chunk))],
        )

    # -- forming batches -----------------------------------------------------------------------------------------

    def form_batches(
        self,
        unit_id: str,
        unit_category_data: frozenset[int],
        batch_size: int,
        now_ms: int,
        *,
        limit: int | None = None,
    ) -> int:
        """Group this unit's queued items into batches of at most ``batch_size`` (at most ``limit`` batches, all
        when None); returns how many were formed.

        The content of each batch (the QueryBatch bytes) is fixed here, so every later attempt sends exactly the
        same batch and the connector's deduplication by batch id holds.
        """
        formed = 0
        while limit is None or formed < limit:
            with self.engine.begin() as conn:
                queued = select(s.items.c.commission_id).where(
                    s.items.c.unit_id == unit_id, s.items.c.batch_id.is_(None), s.items.c.cancelled_at_ms.is_(None)
                )
                commission_id = conn.execute(queued.limit(1)).scalar()
                if commission_id is None:
                    return formed
                # The items and their subjects in one query, in item order.
                pick = (
                    select(
                        s.items.c.id,
                        s.subjects.c.id_number,
                        s.subjects.c.name,
                        s.subjects.c.auth_number,
                        s.subjects.c.auth_digest,
                        s.subjects.c.share_index,
                        s.subjects.c.leaf_salt,
                    )
                    .join(s.subjects, s.subjects.c.id == s.items.c.subject_id)
                    .where(
                        s.items.c.unit_id == unit_id,
                        s.items.c.commission_id == commission_id,
                        s.items.c.batch_id.is_(None),
                        s.items.c.cancelled_at_ms.is_(None),
                    )
                    .order_by(s.items.c.id)
                    .limit(batch_size)
                )
                if self.is_postgres:
                    pick = pick.with_for_update(of=s.items, skip_locked=True)
                rows = conn.execute(pick).all()
                if not rows:
                    return formed
                batch_id = new_batch_id()
                content = self._batch_content(conn, batch_id, commission_id, unit_id, rows, served=unit_category_data)
                conn.execute(
                    insert(s.batches).values(
                        batch_id=batch_id,
                        unit_id=unit_id,
                        commission_id=commission_id,
                        digest=hashlib.sha256(content).digest(),
                        subject_count=len(rows),
                        created_at_ms=now_ms,
                        state="ready",
                        attempts=0,
                        next_attempt_ms=0,
                        overdue=False,
                        next_poll_ms=0,
                    )
                )
                conn.execute(insert(s.batch_contents).values(batch_id=batch_id, content=content))
                self._assign(conn, batch_id, [r[0] for r in rows])
                formed += 1
        return formed

    def _assign(self, conn: Connection, batch_id: str, item_ids: list[int]) -> None:
        """Put the items in the batch, in statements written for the driver: SQLAlchemy's expanding IN list costs
        more to compile than the update costs to run, and executemany of one update per row is three times slower
        than a single IN list on SQLite."""
        if self.is_postgres:
            conn.exec_driver_sql("UPDATE items SET batch_id = %s WHERE id = ANY(%s)", (batch_id, item_ids))
            return
        for start in range(0, len(item_ids), CHUNK):
            chunk = item_ids[start : start + CHUNK]
            marks = ", ".join("?" * len(chunk))
            conn.exec_driver_sql(f"UPDATE items SET batch_id = ? WHERE id IN ({marks})", (batch_id, *chunk))  # noqa: S608

    @staticmethod
    def _batch_content(
        conn: Connection,
        batch_id: str,
        commission_id: int,
        unit_id: str,
        rows: Sequence[Sequence[Any]],
        *,
        served: frozenset[int],
    ) -> bytes:
        c = conn.execute(select(s.commissions).where(s.commissions.c.id == commission_id)).one()
        share = None
        if c.subject_root is not None and all(r[5] is not None for r in rows):
            share = batch_share(conn, c, unit_id, [r[5] for r in rows])
        if share is not None:
            # As the unit's leaf in the approval tree has them.
            wanted = set(share.categories)
            categories = [int(x) for x in c.categories.split(",") if int(x) in wanted]
        else:
            categories = [int(x) for x in c.categories.split(",") if int(x) in served]
        thresholds = [tuple(int(v) for v in t.split(":")) for t in c.thresholds.split(",") if t]
        batch = exchange_pb2.QueryBatch(
            batch_id=batch_id,
            commission_ref=c.ref,
            purpose=c.purpose,
            categories=categories,  # type: ignore[arg-type]
            income_from=_parse_ym(c.income_from),
            income_to=_parse_ym(c.income_to),
            assets_as_of=to_pb(c.assets_as_of),
            # The approvers' ids, as connectors that do not verify approvals read them.
            staff_ids=c.staff_ids.split(","),
            thresholds=[
                exchange_pb2.ThresholdRequest(category=cat, limit_fen=limit)  # type: ignore[arg-type]
                for cat, limit in thresholds
                if cat in categories
            ],
        )
        if share is not None:
            batch.approval.CopyFrom(share.proof)
        add = batch.subjects.add
        for item_id, id_number, name, auth_number, auth_digest, share_index, leaf_salt in rows:
            # Setting the nested fields in place is about twice as fast as building an Authorisation to copy in.
            subject = add(subject_ref=str(item_id), id_number=id_number, name=name)
            subject.authorisation.number = auth_number
            subject.authorisation.scan_sha256 = auth_digest
            if share is not None:
                subject.share_index = share_index
                subject.leaf_salt = leaf_salt
        return batch.SerializeToString(deterministic=True)

    # -- progress --------------------------------------------------------------------------------------------------

    def progress(self, commission_id: int) -> dict[str, dict[str, int]]:
        """Items per unit and stage: queued, sent, receipted, answered, overdue, delayed, failed."""
        result: dict[str, dict[str, int]] = {}
        # Rendered without a bound parameter, so that PostgreSQL sees the same expression in SELECT and GROUP BY.
        tried = s.batches.c.attempts > literal_column("0")
        with reading(self.engine) as conn:
            queued = conn.execute(
                select(s.items.c.unit_id, func.count())
                .where(s.items.c.commission_id == commission_id, s.items.c.batch_id.is_(None))
                .group_by(s.items.c.unit_id)
            ).all()
            for unit_id, count in queued:
                result.setdefault(unit_id, {})["queued"] = int(count)
            batches = conn.execute(
                select(
                    s.batches.c.unit_id,
                    s.batches.c.state,
                    tried,
                    s.batches.c.overdue,
                    s.batches.c.delay_reason.is_not(None),
                    func.sum(s.batches.c.subject_count),
                )
                .where(s.batches.c.commission_id == commission_id)
                .group_by(
                    s.batches.c.unit_id,
                    s.batches.c.state,
                    tried,
                    s.batches.c.overdue,
                    s.batches.c.delay_reason.is_not(None),
                )
            ).all()
        for unit_id, state, attempted, overdue, delayed, count in batches:
            # A formed batch not tried yet is still queued; once tried, it is sent until the unit's receipt (in
            # flight, or tried again later while the unit cannot be reached).
            stage = {"ready": "sent" if attempted else "queued", "acknowledged": "answered"}.get(state, state)
            if state == "receipted" and overdue:
                stage = "overdue"
            elif state == "receipted" and delayed:
                stage = "delayed"
            counts = result.setdefault(unit_id, {})
            counts[stage] = counts.get(stage, 0) + int(count)
        return result

    def item_count(self) -> int:
        """All query items ever enqueued."""
        with reading(self.engine) as conn:
            return int(conn.execute(select(func.count()).select_from(s.items)).scalar_one())
