"""The lifecycle of a formed batch: claimed by one replica at a time, sent, receipted, polled, answered,
acknowledged — or failed, resent, overdue.

Each outcome the archive must show (sent, receipted, answered, delayed, refused, overdue) is an audit chain entry
written in the same transaction as the state change, with the envelope it rests on (gateway/archive/events.py).

On PostgreSQL these transactions take the audit chain's lock (``gateway.archive.audit.lock``) *before* they update
the batch row, as every audited change of a batch must: a transaction holding the row and waiting for the chain
while another holds the chain and waits for the row would deadlock.

Claims are leases with an expiry, so several replicas can share one database: a batch is worked by one replica at a
time, and a replica that dies releases its claims by letting them expire. On PostgreSQL the selection of work also
uses ``FOR UPDATE SKIP LOCKED`` so replicas do not queue on each other. Each outcome is recorded only if the batch is
still in the state the step started from, so a late writer whose lease ran out can never move a batch backwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

from hedui.v1 import exchange_pb2
from sqlalchemy import Engine, and_, func, literal, or_, select, update
from sqlalchemy.engine import Connection

from common.db import reading
from common.errors import HeduiError
from gateway.archive.audit import AuditLog, lock
from gateway.archive.events import ExchangeEvents
from gateway.archive.messages import Envelope
from gateway.db import schema as s
from gateway.db.statements import bulk_insert
from gateway.exchange.outbox import BATCH_ID_RE, CHUNK
from keys.party import is_party_id


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
    commission_id: int = 0
    subject_count: int = 0
    #: ``original_due`` is provisional (counted across a year without an official holiday schedule).
    due_provisional: bool = False


@dataclass(frozen=True)
class ResentBatch:
    """A failed batch put back into the outbox, with the refusal it had (``status: reason``)."""

    batch_id: str
    items: int
    last_error: str | None


@dataclass(frozen=True)
class ResponsibleStaff:
    """The unit's staff an answer set names (BatchAnswer.responsible_staff, Procedure V.(二)) as the gateway recorded
    them: checked against ``roster_version`` of the unit's roster, or unverified (None) when it held none in force."""

    staff_ids: tuple[str, ...]
    roster_version: int | None
    answered_at_ms: int


class ResendRefused(HeduiError):
    """A resend that names an unknown unit, or batches that are unknown, of another unit or not failed; nothing
    was changed."""

    code = "resend_refused"


class BatchLedger:
    """Formed batches and what happened to each, with the answers they brought."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.is_postgres = engine.dialect.name == "postgresql"
        self.events = ExchangeEvents(engine)

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
                s.batches.c.commission_id,
                s.batches.c.subject_count,
                s.batches.c.due_provisional,
            ).where(s.batches.c.batch_id.in_(claimed))
            if sending:
                work = work.join_from(s.batches, s.batch_contents)
            rows = conn.execute(work).all()
        return [BatchWork(**r._mapping) for r in sorted(rows, key=lambda r: claimed.index(r.batch_id))]

    def release(self, batch_id: str, replica: str) -> None:
        """Give up this replica's claim on the batch without recording an outcome."""
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

    def release_claims(self, replica: str, *, unit_id: str | None = None) -> int:
        """Give up the claims held under this replica id (of ``unit_id``'s batches only, when given); returns how
        many. At start they belong to a previous run that died mid-step; for one unit, to a cycle of this process
        that died mid-step (UnitWorkers calls it while no cycle of the unit runs)."""
        query = update(s.batches).where(s.batches.c.claimed_by == replica)
        if unit_id is not None:
            query = query.where(s.batches.c.unit_id == unit_id)
        with self.engine.begin() as conn:
            return int(conn.execute(query.values(claimed_by=None, claim_until_ms=None)).rowcount)

    @staticmethod
    def _facts(conn: Connection, batch_id: str) -> tuple[str, int, int]:
        """(unit, commission, subjects) of a batch, for its chain entries."""
        b = s.batches.c
        row = conn.execute(select(b.unit_id, b.commission_id, b.subject_count).where(b.batch_id == batch_id)).one()
        return row.unit_id, row.commission_id, row.subject_count

    def sent(self, batch: BatchWork, envelope: Envelope, now_ms: int) -> None:
        """The batch's envelope is about to be sent: kept as sent, with its ``batch.sent`` entry (every attempt is a
        new envelope, and each is kept)."""
        with self.engine.begin() as conn:
            self.events.sent(
                conn, unit_id=batch.unit_id, batch_id=batch.batch_id, commission_id=batch.commission_id,
                items=batch.subject_count, envelope=envelope, now_ms=now_ms,
            )  # fmt: skip

    def receipted(
        self,
        batch_id: str,
        *,
        received_at_ms: int,
        due: date,
        envelope: Envelope,
        next_poll_ms: int,
        now_ms: int,
        due_provisional: bool = False,
    ) -> None:
        """The unit's signed receipt is stored (and archived, with its ``batch.receipted`` entry); the clause-12
        clock runs from its received time. ``due_provisional``: the receipt says its due date is provisional (fixed
        later by :meth:`settle_due`)."""
        with self.engine.begin() as conn:
            lock(conn)
            changed = self._finish(
                conn,
                batch_id,
                ("ready",),
                state="receipted",
                attempts=s.batches.c.attempts + 1,
                received_at_ms=received_at_ms,
                original_due=due,
                due=due,
                receipt_envelope=envelope.raw,
                due_provisional=due_provisional,
                last_error=None,
                next_poll_ms=next_poll_ms,
            )
            if changed:
                unit_id, commission_id, items = self._facts(conn, batch_id)
                self.events.receipted(
                    conn, unit_id=unit_id, batch_id=batch_id, commission_id=commission_id, items=items, due=due,
                    envelope=envelope, now_ms=now_ms,
                )  # fmt: skip

    def send_failed(self, batch_id: str, error: str, retry_at_ms: int) -> None:
        """The batch could not be delivered (``error``: a status code); try again at ``retry_at_ms``."""
        with self.engine.begin() as conn:
            self._finish(
                conn,
                batch_id,
                ("ready",),
                attempts=s.batches.c.attempts + 1,
                last_error=error,
                next_attempt_ms=retry_at_ms,
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
            lock(conn)  # before the rows (see the module docstring)
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
                # append_generated: a random batch id may hold a digit run shaped like an ID number.
                audit.append_generated(
                    conn,
                    at_ms=now_ms,
                    actor=actor,
                    action="batch.resend",
                    commission_id=row.commission_id,
                    before="failed",
                    after="ready",
                    fields=(("unit", unit_id), ("batch", row.batch_id), ("items", row.subject_count)),
                )
        return [ResentBatch(r.batch_id, int(r.subject_count), r.last_error) for r in found.values()]

    def still_pending(
        self,
        batch_id: str,
        due: date,
        delay_reason: str | None,
        next_poll_ms: int,
        *,
        today: date,
        envelope: Envelope | None = None,
        now_ms: int = 0,
    ) -> None:
        """The unit has not answered yet. A due date that has not passed (moved by a delay notice that arrived
        after the sweep) takes the overdue mark off again; a passed one keeps it. A delay that moves the due date
        (``delay_reason`` set) is a ``batch.delay`` chain entry with the answer set ``envelope`` that carried it,
        once: polls that find the same due date again write nothing."""
        fresh = {} if due < today else {"overdue": False}
        b = s.batches.c
        with self.engine.begin() as conn:
            if delay_reason is not None:
                lock(conn)  # a delay may be a chain entry; plain polls leave the chain alone
            before = conn.execute(select(b.due).where(b.batch_id == batch_id)).scalar_one_or_none()
            changed = self._finish(
                conn, batch_id, ("receipted",), due=due, delay_reason=delay_reason, next_poll_ms=next_poll_ms, **fresh
            )
            if changed and delay_reason is not None and envelope is not None and before is not None and before != due:
                unit_id, commission_id, _ = self._facts(conn, batch_id)
                self.events.delayed(
                    conn, unit_id=unit_id, batch_id=batch_id, commission_id=commission_id, old_due=before,
                    new_due=due, reason=delay_reason, envelope=envelope, now_ms=now_ms,
                )  # fmt: skip

    def still_pending_later(self, batch_id: str, next_poll_ms: int) -> None:
        """Leave the batch as it is and poll it again later."""
        with self.engine.begin() as conn:
            self._finish(conn, batch_id, ("receipted",), next_poll_ms=next_poll_ms)

    def unacknowledged(self, unit_id: str, limit: int) -> list[str]:
        """Answered batches of the unit whose answers the unit has not yet been told were stored, oldest first."""
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
        """The query items the batch carries to the unit."""
        with reading(self.engine) as conn:
            query = select(s.items.c.id).where(s.items.c.unit_id == unit_id, s.items.c.batch_id == batch_id)
            return {r.id for r in conn.execute(query)}

    def store_answers(
        self,
        batch_id: str,
        subjects: Sequence[exchange_pb2.SubjectAnswer],
        envelope: Envelope,
        now_ms: int,
        *,
        staff: ResponsibleStaff | None = None,
    ) -> int:
        """Store one answer per item (again: ignored, so exactly one answer per item) and mark the batch
        answered, with its ``batch.answered`` chain entry, the answer set ``envelope`` archived and the unit staff
        it names (``staff``), in one transaction; returns the number of answers newly stored."""
        rows = [
            (int(a.subject_ref), batch_id, a.status, a.SerializeToString(deterministic=True), now_ms) for a in subjects
        ]
        columns = ("item_id", "batch_id", "status", "body", "stored_at_ms")
        with self.engine.begin() as conn:
            added = 0
            for start in range(0, len(rows), CHUNK):
                added += bulk_insert(conn, s.answers, columns, rows[start : start + CHUNK], ignore_conflicts=True)
            # The chain's lock only now, before the row: held from here to the commit, not during the inserts.
            lock(conn)
            changed = self._finish(
                conn, batch_id, ("ready", "receipted"), state="answered", answered_at_ms=now_ms, overdue=False
            )
            if changed:
                unit_id, commission_id, _ = self._facts(conn, batch_id)
                self.events.answered(
                    conn, unit_id=unit_id, batch_id=batch_id, commission_id=commission_id, answers=added,
                    envelope=envelope, now_ms=now_ms,
                )  # fmt: skip
                # Set once the envelope is kept (the column refers to the archive).
                conn.execute(
                    update(s.batches)
                    .where(s.batches.c.batch_id == batch_id)
                    .values(answer_message_id=envelope.message_id)
                )
                held = select(s.answer_staff.c.batch_id).where(s.answer_staff.c.batch_id == batch_id)
                if staff is not None and conn.execute(held).first() is None:  # the first answer set's names stay
                    conn.execute(
                        s.answer_staff.insert().values(
                            batch_id=batch_id,
                            staff_ids=",".join(staff.staff_ids),
                            roster_version=staff.roster_version,
                            answered_at_ms=staff.answered_at_ms,
                        )
                    )
        return added

    def responsible_staff(self, batch_id: str) -> ResponsibleStaff | None:
        """The unit staff the batch's stored answer set named, and the roster version they were checked against."""
        with reading(self.engine) as conn:
            row = conn.execute(select(s.answer_staff).where(s.answer_staff.c.batch_id == batch_id)).first()
        if row is None:
            return None
        return ResponsibleStaff(tuple(x for x in row.staff_ids.split(",") if x), row.roster_version, row.answered_at_ms)

    def acknowledged(self, batch_ids: Sequence[str], now_ms: int) -> None:
        """The unit was told these batches' answers are stored; it may forget them."""
        with self.engine.begin() as conn:
            conn.execute(
                update(s.batches)
                .where(s.batches.c.batch_id.in_(list(batch_ids)), s.batches.c.state == "answered")
                .values(state="acknowledged", acknowledged_at_ms=now_ms, claimed_by=None, claim_until_ms=None)
            )

    # -- deadlines -------------------------------------------------------------------------------------------------

    def mark_overdue(self, today: date, now_ms: int = 0) -> dict[str, int]:
        """Receipted batches past their due date become overdue (and stay visible), each with a ``batch.overdue``
        chain entry when it becomes so; returns items per unit.

        A provisional due date never makes a batch overdue: the real date may be later (docs/exchange.md,
        "Provisional due dates"). Such batches are "provisionally overdue" (:meth:`provisionally_overdue`) until
        :meth:`settle_due` fixes the date, and the next sweep judges them by the final one."""
        b = s.batches.c
        with self.engine.begin() as conn:
            lock(conn)
            late = and_(b.state == "receipted", b.due < today, b.due_provisional.is_(False))
            newly = conn.execute(
                select(b.batch_id, b.unit_id, b.commission_id, b.subject_count, b.due)
                .where(late, b.overdue.is_(False))
                .order_by(b.due, b.batch_id)
            ).all()
            for row in newly:
                conn.execute(update(s.batches).where(b.batch_id == row.batch_id).values(overdue=True))
                self.events.overdue(
                    conn, unit_id=row.unit_id, batch_id=row.batch_id, commission_id=row.commission_id,
                    items=row.subject_count, due=row.due, now_ms=now_ms,
                )  # fmt: skip
            rows = conn.execute(
                select(s.batches.c.unit_id, func.sum(s.batches.c.subject_count))
                .where(late)
                .group_by(s.batches.c.unit_id)
            ).all()
        return {r[0]: int(r[1]) for r in rows}

    def answer_count(self) -> int:
        """All answers stored."""
        with reading(self.engine) as conn:
            return int(conn.execute(select(func.count()).select_from(s.answers)).scalar_one())
