"""Typed operations on the gateway database: the outbox of query items, batches and their lifecycle, answers,
unit health and job leases.

Every step is a single transaction and idempotent, so a crash between any two steps is repaired by running the
step again. Claims (on batches and jobs) are leases with an expiry, so several replicas can share one database:
a batch is worked by one replica at a time, and a replica that dies releases its claims by letting them expire.
On PostgreSQL the selection of work also uses ``FOR UPDATE SKIP LOCKED`` so replicas do not queue on each other.
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
from sqlalchemy import Engine, Executable, Table, and_, func, insert, literal, literal_column, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from common.dates import to_pb
from common.db import reading
from common.errors import HeduiError
from common.replaystore import SqlReplayCache
from gateway.archive.audit import AuditLog
from gateway.db import schema as s
from keys.party import is_party_id

#: Rows per executemany chunk and ids per IN list (well below SQLite's variable limit).
CHUNK = 5000
#: PostgreSQL advisory lock key that serialises enqueueing across replicas.
ENQUEUE_LOCK = 0x4845_4455_4901


@dataclass(frozen=True)
class UnitRow:
    unit_id: str
    category: int
    endpoint: str
    exchange_mode: str
    enabled: bool
    consecutive_failures: int
    next_attempt_ms: int
    #: When a call to the unit last got a reply (an exchange call or a health probe); None if never.
    last_success_ms: int | None = None
    #: Why the last failed call failed: ``status`` or ``status: reason`` (codes only, no personal data).
    last_error: str | None = None


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


@dataclass(frozen=True)
class BatchWork:
    """A claimed batch with what sending or polling it needs (``content`` is empty unless claimed for sending)."""

    batch_id: str
    unit_id: str
    content: bytes
    digest: bytes
    state: str
    attempts: int
    original_due: date | None
    #: When the unit received the batch (its receipt); None until receipted.
    received_at_ms: int | None = None


@dataclass(frozen=True)
class ResentBatch:
    """A failed batch put back into the outbox, with the refusal it had (``status: reason``)."""

    batch_id: str
    items: int
    last_error: str | None


@dataclass(frozen=True)
class RetriedUnit:
    """A unit whose backoff ``hedui-gateway retry`` ended: its failures so far and when it would have been tried."""

    unit_id: str
    consecutive_failures: int
    was_due_ms: int
    last_error: str | None


class RetryRefused(HeduiError):
    """A retry that names a unit the gateway's database does not know; nothing was changed."""

    code = "retry_refused"


class ResendRefused(HeduiError):
    """A resend that names an unknown unit, or batches that are unknown, of another unit or not failed; nothing
    was changed."""

    code = "resend_refused"


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


class GatewayStore:
    """The gateway's persistent state."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.replay = SqlReplayCache(engine, s.seen_messages)
        self.is_postgres = engine.dialect.name == "postgresql"

    def _insert_ignore(self, table: Table) -> Executable:
        if self.is_postgres:
            return postgresql.insert(table).on_conflict_do_nothing()
        return sqlite.insert(table).on_conflict_do_nothing()

    def _bulk_insert(
        self,
        conn: Connection,
        table: Table,
        columns: Sequence[str],
        rows: Sequence[tuple[Any, ...]],
        *,
        ignore_conflicts: bool = False,
    ) -> int:
        """Insert many rows through the driver itself: COPY on PostgreSQL (unless conflicts are to be ignored, which
        COPY cannot), executemany otherwise. SQLAlchemy's per-row parameter processing would cost more than the
        database's own work here. Returns the number of rows inserted."""
        if not rows:
            return 0
        names = ", ".join(columns)
        if self.is_postgres and not ignore_conflicts:
            driver = conn.connection.driver_connection  # psycopg, inside this transaction
            assert driver is not None
            with driver.cursor().copy(f"COPY {table.name} ({names}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            return len(rows)
        mark = "%s" if self.is_postgres else "?"
        values = ", ".join([mark] * len(columns))
        statement = f"INSERT INTO {table.name} ({names}) VALUES ({values})"  # noqa: S608 - names from the schema
        if ignore_conflicts:
            statement += " ON CONFLICT DO NOTHING"
        return int(conn.exec_driver_sql(statement, list(rows)).rowcount)

    # -- units ---------------------------------------------------------------------------------------------------

    def sync_units(self, entries: Iterable[tuple[str, int, str, str, bool]]) -> None:
        """Make the units table say what the config says (unit id, category, endpoint, mode, enabled); health
        columns of known units are kept."""
        with self.engine.begin() as conn:
            known = {r.unit_id for r in conn.execute(select(s.units.c.unit_id))}
            for unit_id, category, endpoint, mode, enabled in entries:
                values = {"category": category, "endpoint": endpoint, "exchange_mode": mode, "enabled": enabled}
                if unit_id in known:
                    conn.execute(update(s.units).where(s.units.c.unit_id == unit_id).values(**values))
                else:
                    conn.execute(
                        insert(s.units).values(unit_id=unit_id, consecutive_failures=0, next_attempt_ms=0, **values)
                    )

    def units(self) -> list[UnitRow]:
        with reading(self.engine) as conn:
            rows = conn.execute(
                select(
                    s.units.c.unit_id,
                    s.units.c.category,
                    s.units.c.endpoint,
                    s.units.c.exchange_mode,
                    s.units.c.enabled,
                    s.units.c.consecutive_failures,
                    s.units.c.next_attempt_ms,
                    s.units.c.last_success_ms,
                    s.units.c.last_error,
                ).order_by(s.units.c.unit_id)
            ).all()
        return [UnitRow(**r._mapping) for r in rows]

    def unit_failed(self, unit_id: str, error: str, retry_at_ms: int) -> None:
        """Record a transport failure (``error``: ``status`` or ``status: reason``) and when to try the unit again."""
        with self.engine.begin() as conn:
            conn.execute(
                update(s.units)
                .where(s.units.c.unit_id == unit_id)
                .values(
                    consecutive_failures=s.units.c.consecutive_failures + 1,
                    next_attempt_ms=retry_at_ms,
                    last_error=error[:64],
                )
            )

    def unit_succeeded(self, unit_id: str, now_ms: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(s.units)
                .where(s.units.c.unit_id == unit_id, s.units.c.consecutive_failures != 0)
                .values(consecutive_failures=0, next_attempt_ms=0, last_error=None)
            )
            conn.execute(update(s.units).where(s.units.c.unit_id == unit_id).values(last_success_ms=now_ms))

    def retry_units(
        self, unit_ids: Sequence[str], *, audit: AuditLog, actor: str, now_ms: int
    ) -> tuple[list[RetriedUnit], list[str]]:
        """End the backoff of the named units that are down (consecutive failures): their next attempt is now,
        so the next cycle (at most one dispatch interval away) calls them. ``consecutive_failures`` and
        ``last_error`` are kept: the unit counts as down (hedui_unit_up 0) until a call succeeds, and a failed
        retry backs off from where it was. One audit entry per unit changed, in the same transaction. A unit
        unknown to the database is refused with RetryRefused and nothing changes. Returns the units retried and
        those that were up (nothing to retry)."""
        wanted = list(dict.fromkeys(unit_ids))
        u = s.units.c
        with self.engine.begin() as conn:
            query = select(u.unit_id, u.consecutive_failures, u.next_attempt_ms, u.last_error).where(
                u.unit_id.in_(wanted)
            )
            if self.is_postgres:
                query = query.with_for_update()
            found = {r.unit_id: r for r in conn.execute(query)}
            unknown = [i for i in wanted if i not in found]
            if unknown:
                raise RetryRefused(
                    f"no unit {', '.join(unknown)} in the gateway's database (see 'hedui-gateway status'); "
                    "nothing was changed"
                )
            retried, idle = [], []
            for unit_id in wanted:
                row = found[unit_id]
                if row.consecutive_failures == 0:  # up: no backoff to end
                    idle.append(unit_id)
                    continue
                conn.execute(update(s.units).where(u.unit_id == unit_id).values(next_attempt_ms=0))
                audit.append(
                    conn,
                    at_ms=now_ms,
                    actor=actor,
                    action="unit.retry",
                    before="backing_off",
                    after="retry_now",
                    detail=(
                        f"unit={unit_id};failures={row.consecutive_failures};"
                        f"was_due_in_s={max(0, (row.next_attempt_ms - now_ms + 999) // 1000)}"
                    ),
                )
                retried.append(
                    RetriedUnit(unit_id, int(row.consecutive_failures), int(row.next_attempt_ms), row.last_error)
                )
        return retried, idle

    # -- enqueueing ----------------------------------------------------------------------------------------------

    def enqueue(
        self,
        commission: CommissionInput,
        subjects: Iterable[SubjectInput],
        unit_ids: Sequence[str],
        now_ms: int,
    ) -> int:
        """Store a commission's subjects and one query item per subject and unit; returns the commission id.

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
            chunk: list[SubjectInput] = []
            for subject in subjects:
                chunk.append(subject)
                if len(chunk) >= CHUNK:
                    self._enqueue_chunk(conn, commission_id, chunk, unit_ids, now_ms)
                    chunk = []
            if chunk:
                self._enqueue_chunk(conn, commission_id, chunk, unit_ids, now_ms)
        return int(commission_id)

    def _enqueue_chunk(
        self, conn: Connection, commission_id: int, chunk: list[SubjectInput], unit_ids: Sequence[str], now_ms: int
    ) -> None:
        first = conn.execute(select(func.coalesce(func.max(s.subjects.c.id), 0))).scalar_one() + 1
        self._bulk_insert(
            conn,
            s.subjects,
            ("id", "commission_id", "subject_ref", "id_number", "name", "auth_number", "auth_digest"),
            [
                (first + i, commission_id, x.subject_ref, x.id_number, x.name, x.auth_number, x.auth_digest)
                for i, x in enumerate(chunk)
            ],
        )
        self._bulk_insert(
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
                content = self._batch_content(conn, batch_id, commission_id, rows, unit_category_data)
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
        rows: Sequence[Sequence[Any]],
        served: frozenset[int],
    ) -> bytes:
        c = conn.execute(select(s.commissions).where(s.commissions.c.id == commission_id)).one()
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
            staff_ids=c.staff_ids.split(","),
            thresholds=[
                exchange_pb2.ThresholdRequest(category=cat, limit_fen=limit)  # type: ignore[arg-type]
                for cat, limit in thresholds
                if cat in categories
            ],
        )
        add = batch.subjects.add
        for item_id, id_number, name, auth_number, auth_digest in rows:
            # Setting the nested fields in place is about twice as fast as building an Authorisation to copy in.
            subject = add(subject_ref=str(item_id), id_number=id_number, name=name)
            subject.authorisation.number = auth_number
            subject.authorisation.scan_sha256 = auth_digest
        return batch.SerializeToString(deterministic=True)

    # -- claiming work ---------------------------------------------------------------------------------------------

    @staticmethod
    def _claim(conn: Connection, candidates: list[str], replica: str, now_ms: int, lease_ms: int) -> list[str]:
        claimed = []
        for batch_id in candidates:
            done = conn.execute(
                update(s.batches)
                .where(
                    s.batches.c.batch_id == batch_id,
                    or_(
                        s.batches.c.claim_until_ms.is_(None),
                        s.batches.c.claim_until_ms < now_ms,
                        s.batches.c.claimed_by == replica,
                    ),
                )
                .values(claimed_by=replica, claim_until_ms=now_ms + lease_ms)
            ).rowcount
            if done:
                claimed.append(batch_id)
        return claimed

    def claim(
        self, unit_id: str, state: str, *, replica: str, now_ms: int, lease_ms: int, limit: int
    ) -> list[BatchWork]:
        """Claim up to ``limit`` batches of this unit in ``state`` that are due for work now."""
        due = s.batches.c.next_attempt_ms if state == "ready" else s.batches.c.next_poll_ms
        with self.engine.begin() as conn:
            query = (
                select(s.batches.c.batch_id)
                .where(
                    s.batches.c.unit_id == unit_id,
                    s.batches.c.state == state,
                    due <= now_ms,
                    or_(s.batches.c.claim_until_ms.is_(None), s.batches.c.claim_until_ms < now_ms),
                )
                .order_by(s.batches.c.created_at_ms, s.batches.c.batch_id)
                .limit(limit)
            )
            if self.is_postgres:
                query = query.with_for_update(skip_locked=True)
            candidates = [r.batch_id for r in conn.execute(query)]
            claimed = self._claim(conn, candidates, replica, now_ms, lease_ms)
            if not claimed:
                return []
            # Only sending needs the content (the whole QueryBatch); polling would read it for nothing.
            sending = state == "ready"
            work = select(
                s.batches.c.batch_id,
                s.batches.c.unit_id,
                s.batch_contents.c.content if sending else literal(b"").label("content"),
                s.batches.c.digest,
                s.batches.c.state,
                s.batches.c.attempts,
                s.batches.c.original_due,
                s.batches.c.received_at_ms,
            ).where(s.batches.c.batch_id.in_(claimed))
            if sending:
                work = work.join_from(s.batches, s.batch_contents)
            rows = conn.execute(work).all()
        return [BatchWork(**r._mapping) for r in sorted(rows, key=lambda r: claimed.index(r.batch_id))]

    def release(self, batch_id: str, replica: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(s.batches)
                .where(s.batches.c.batch_id == batch_id, s.batches.c.claimed_by == replica)
                .values(claimed_by=None, claim_until_ms=None)
            )

    # -- batch lifecycle -------------------------------------------------------------------------------------------

    def _finish(self, conn: Connection, batch_id: str, from_states: tuple[str, ...], **values: object) -> bool:
        """Record the outcome of a step and release the claim, only if the batch is still in one of
        ``from_states``: a late writer whose lease ran out can never move a batch backwards."""
        return bool(
            conn.execute(
                update(s.batches)
                .where(s.batches.c.batch_id == batch_id, s.batches.c.state.in_(from_states))
                .values(claimed_by=None, claim_until_ms=None, **values)
            ).rowcount
        )

    def release_claims(self, replica: str) -> int:
        """At start: claims held under this replica id belong to a previous run that died mid-step."""
        with self.engine.begin() as conn:
            return int(
                conn.execute(
                    update(s.batches)
                    .where(s.batches.c.claimed_by == replica)
                    .values(claimed_by=None, claim_until_ms=None)
                ).rowcount
            )

    def receipted(self, batch_id: str, *, received_at_ms: int, due: date, envelope: bytes, next_poll_ms: int) -> None:
        """The unit's signed receipt is stored; the clause-12 clock runs from its received time."""
        with self.engine.begin() as conn:
            self._finish(
                conn,
                batch_id,
                ("ready",),
                state="receipted",
                attempts=s.batches.c.attempts + 1,
                received_at_ms=received_at_ms,
                original_due=due,
                due=due,
                receipt_envelope=envelope,
                last_error=None,
                next_poll_ms=next_poll_ms,
            )

    def send_failed(self, batch_id: str, error: str, retry_at_ms: int) -> None:
        with self.engine.begin() as conn:
            self._finish(
                conn,
                batch_id,
                ("ready",),
                attempts=s.batches.c.attempts + 1,
                last_error=error,
                next_attempt_ms=retry_at_ms,
            )

    def refused(self, batch_id: str, reason: str) -> None:
        """The unit refused the batch for a reason a retry cannot cure: an operator must look at it, and once the
        cause is fixed puts it back with :meth:`resend_failed`. ``reason`` is kept in ``last_error``."""
        with self.engine.begin() as conn:
            self._finish(
                conn, batch_id, ("ready",), state="failed", attempts=s.batches.c.attempts + 1, last_error=reason[:64]
            )

    def resend_failed(
        self, unit_id: str, batch_ids: Sequence[str], *, audit: AuditLog, actor: str, now_ms: int
    ) -> list[ResentBatch]:
        """Put the unit's failed batches (those in ``batch_ids``, or all when empty) back into the outbox, ready to
        be sent at the unit's next cycle with the same id and content; one audit entry per batch, in the same
        transaction. ``attempts`` and ``last_error`` are kept as the batch's history; the unit's health and backoff
        are not touched. An unknown unit, or a batch that is unknown, of another unit or not failed, is refused
        with ResendRefused and nothing changes. Returns the batches re-queued."""
        if not is_party_id(unit_id):
            raise ResendRefused("--unit is a unit's party id, e.g. unit.220100.tax")
        if not all(BATCH_ID_RE.fullmatch(i) for i in batch_ids):
            # Not repeated: a mistyped argument might be anything, an ID number too.
            raise ResendRefused("a batch id is B and 32 hex digits, as 'hedui-gateway status' and the log show them")
        batch_ids = list(dict.fromkeys(batch_ids))
        b = s.batches.c
        with self.engine.begin() as conn:
            if conn.execute(select(s.units.c.unit_id).where(s.units.c.unit_id == unit_id)).first() is None:
                raise ResendRefused(f"no unit {unit_id} in the gateway's database (see 'hedui-gateway status')")
            query = select(b.batch_id, b.unit_id, b.state, b.commission_id, b.subject_count, b.last_error)
            if batch_ids:
                query = query.where(b.batch_id.in_(list(batch_ids)))
            else:
                query = query.where(b.unit_id == unit_id, b.state == "failed")
            if self.is_postgres:
                query = query.with_for_update()
            found = {r.batch_id: r for r in conn.execute(query.order_by(b.created_at_ms, b.batch_id))}
            problems = [f"{i}: no such batch" for i in batch_ids if i not in found]
            problems += [f"{r.batch_id}: a batch of {r.unit_id}" for r in found.values() if r.unit_id != unit_id]
            problems += [
                f"{r.batch_id}: {r.state}, not failed"
                for r in found.values()
                if r.unit_id == unit_id and r.state != "failed"
            ]
            if problems:
                raise ResendRefused(f"nothing was re-queued; {'; '.join(sorted(problems))}")
            for row in found.values():
                conn.execute(
                    update(s.batches)
                    .where(b.batch_id == row.batch_id, b.state == "failed")
                    .values(state="ready", next_attempt_ms=0, claimed_by=None, claim_until_ms=None)
                )
                audit.append(
                    conn,
                    at_ms=now_ms,
                    actor=actor,
                    action="batch.resend",
                    commission_id=row.commission_id,
                    before="failed",
                    after="ready",
                    detail=f"unit={unit_id};batch={row.batch_id};items={row.subject_count}",
                )
        return [ResentBatch(r.batch_id, int(r.subject_count), r.last_error) for r in found.values()]

    def still_pending(
        self, batch_id: str, due: date, delay_reason: str | None, next_poll_ms: int, *, today: date
    ) -> None:
        """The unit has not answered yet. A due date that has not passed (moved by a delay notice that arrived
        after the sweep) takes the overdue mark off again; a passed one keeps it."""
        fresh = {} if due < today else {"overdue": False}
        with self.engine.begin() as conn:
            self._finish(
                conn, batch_id, ("receipted",), due=due, delay_reason=delay_reason, next_poll_ms=next_poll_ms, **fresh
            )

    def still_pending_later(self, batch_id: str, next_poll_ms: int) -> None:
        """Leave the batch as it is and poll it again later."""
        with self.engine.begin() as conn:
            self._finish(conn, batch_id, ("receipted",), next_poll_ms=next_poll_ms)

    def unacknowledged(self, unit_id: str, limit: int) -> list[str]:
        with reading(self.engine) as conn:
            rows = conn.execute(
                select(s.batches.c.batch_id)
                .where(s.batches.c.unit_id == unit_id, s.batches.c.state == "answered")
                .order_by(s.batches.c.answered_at_ms)
                .limit(limit)
            )
            return [r.batch_id for r in rows]

    def resend(self, batch_id: str) -> None:
        """The unit says it does not know a receipted batch: send it again (same id, same content)."""
        with self.engine.begin() as conn:
            self._finish(conn, batch_id, ("receipted",), state="ready", next_attempt_ms=0, last_error="unknown_at_unit")

    def item_ids(self, unit_id: str, batch_id: str) -> set[int]:
        with reading(self.engine) as conn:
            query = select(s.items.c.id).where(s.items.c.unit_id == unit_id, s.items.c.batch_id == batch_id)
            return {r.id for r in conn.execute(query)}

    def archive(self, message_id: bytes, sender: str, message_type: str, envelope: bytes, now_ms: int) -> None:
        """Keep an envelope received from a unit exactly as received (idempotent by message id)."""
        with self.engine.begin() as conn:
            conn.execute(
                self._insert_ignore(s.archive),
                {
                    "message_id": message_id,
                    "sender": sender,
                    "message_type": message_type,
                    "received_at_ms": now_ms,
                    "envelope": envelope,
                },
            )

    def store_answers(
        self, batch_id: str, subjects: Sequence[exchange_pb2.SubjectAnswer], message_id: bytes, now_ms: int
    ) -> int:
        """Store one answer per item (again: ignored, so exactly one answer per item) and mark the batch
        answered, in one transaction; returns the number of answers newly stored."""
        rows = [
            (int(a.subject_ref), batch_id, a.status, a.SerializeToString(deterministic=True), now_ms) for a in subjects
        ]
        columns = ("item_id", "batch_id", "status", "body", "stored_at_ms")
        with self.engine.begin() as conn:
            added = 0
            for start in range(0, len(rows), CHUNK):
                added += self._bulk_insert(conn, s.answers, columns, rows[start : start + CHUNK], ignore_conflicts=True)
            self._finish(
                conn,
                batch_id,
                ("ready", "receipted"),
                state="answered",
                answered_at_ms=now_ms,
                answer_message_id=message_id,
                overdue=False,
            )
        return added

    def acknowledged(self, batch_ids: Sequence[str], now_ms: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(s.batches)
                .where(s.batches.c.batch_id.in_(list(batch_ids)), s.batches.c.state == "answered")
                .values(state="acknowledged", acknowledged_at_ms=now_ms, claimed_by=None, claim_until_ms=None)
            )

    # -- deadlines -------------------------------------------------------------------------------------------------

    def mark_overdue(self, today: date) -> dict[str, int]:
        """Receipted batches past their due date become overdue (and stay visible); returns items per unit."""
        with self.engine.begin() as conn:
            late = and_(s.batches.c.state == "receipted", s.batches.c.due < today)
            conn.execute(update(s.batches).where(late, s.batches.c.overdue.is_(False)).values(overdue=True))
            rows = conn.execute(
                select(s.batches.c.unit_id, func.sum(s.batches.c.subject_count))
                .where(late)
                .group_by(s.batches.c.unit_id)
            ).all()
        return {r[0]: int(r[1]) for r in rows}

    # -- jobs --------------------------------------------------------------------------------------------------------

    def acquire_job(self, name: str, replica: str, now_ms: int, lease_ms: int) -> bool:
        """Take the lease of job ``name``; False while another replica holds it."""
        with self.engine.begin() as conn:
            conn.execute(
                self._insert_ignore(s.jobs),
                {"name": name, "lease_until_ms": 0, "runs": 0, "failures": 0},
            )
            return bool(
                conn.execute(
                    update(s.jobs)
                    .where(
                        s.jobs.c.name == name, or_(s.jobs.c.lease_until_ms < now_ms, s.jobs.c.lease_owner == replica)
                    )
                    .values(
                        lease_owner=replica,
                        lease_until_ms=now_ms + lease_ms,
                        last_started_ms=now_ms,
                        runs=s.jobs.c.runs + 1,
                    )
                ).rowcount
            )

    def release_job(self, name: str, replica: str, now_ms: int, ok: bool) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(s.jobs)
                .where(s.jobs.c.name == name, s.jobs.c.lease_owner == replica)
                .values(
                    lease_owner=None,
                    lease_until_ms=0,
                    last_finished_ms=now_ms,
                    last_status="ok" if ok else "failed",
                    failures=s.jobs.c.failures + (0 if ok else 1),
                )
            )

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

    def answer_count(self) -> int:
        with reading(self.engine) as conn:
            return int(conn.execute(select(func.count()).select_from(s.answers)).scalar_one())

    def item_count(self) -> int:
        with reading(self.engine) as conn:
            return int(conn.execute(select(func.count()).select_from(s.items)).scalar_one())
