"""Due dates counted across a year the calendar did not know (docs/exchange.md, "Provisional due dates"): which
batches have them, which of those are past them, and fixing them once the calendar knows the year.

A provisional date never makes a batch overdue (:meth:`gateway.exchange.batches.BatchLedger.mark_overdue`); such
batches are "provisionally overdue" until :meth:`ProvisionalDueDates.settle_due` fixes the date, with an audit entry
in the same transaction, taken under the audit chain's lock before the batch row as every audited batch change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date

from sqlalchemy import Engine, func, select, update

from common.db import reading
from common.workdays import WorkdayCalendar
from gateway.archive.audit import AuditLog, lock
from gateway.db import schema as s
from keys.clock import Clock, from_ms

log = logging.getLogger("hedui.gateway.exchange.engine")


@dataclass(frozen=True)
class ProvisionalDue:
    """A batch whose due dates are provisional, with what fixing them needs."""

    batch_id: str
    unit_id: str
    commission_id: int
    received_at_ms: int
    original_due: date
    due: date
    delay_reason: str | None


class ProvisionalDueDates:
    """The batches whose clause-12 due dates are still provisional."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def provisionally_overdue(self, today: date) -> dict[str, int]:
        """Items per unit in receipted batches past a provisional due date (not marked overdue; see mark_overdue)."""
        with reading(self.engine) as conn:
            rows = conn.execute(
                select(s.batches.c.unit_id, func.sum(s.batches.c.subject_count))
                .where(
                    s.batches.c.state == "receipted",
                    s.batches.c.due < today,
                    s.batches.c.due_provisional.is_(True),
                )
                .group_by(s.batches.c.unit_id)
            ).all()
        return {r[0]: int(r[1]) for r in rows}

    def provisional(self) -> list[ProvisionalDue]:
        """Receipted (or later) batches whose due dates are still provisional, oldest receipt first."""
        b = s.batches.c
        with reading(self.engine) as conn:
            rows = conn.execute(
                select(b.batch_id, b.unit_id, b.commission_id, b.received_at_ms, b.original_due, b.due, b.delay_reason)
                .where(b.due_provisional.is_(True), b.received_at_ms.is_not(None), b.original_due.is_not(None))
                .order_by(b.received_at_ms, b.batch_id)
            ).all()
        return [
            ProvisionalDue(
                r.batch_id, r.unit_id, r.commission_id, r.received_at_ms, r.original_due, r.due, r.delay_reason
            )
            for r in rows
        ]

    def settle_due(
        self, batch: ProvisionalDue, original_due: date, due: date, *, audit: AuditLog, actor: str, now_ms: int
    ) -> bool:
        """The batch's provisional due date becomes final: ``original_due`` and ``due`` (a delay notice's date, kept
        within clause 12), with an audit entry naming both dates (codes only, no personal data) in the same
        transaction. False, and nothing written, if the batch's date is no longer provisional."""
        with self.engine.begin() as conn:
            lock(conn)
            done = conn.execute(
                update(s.batches)
                .where(s.batches.c.batch_id == batch.batch_id, s.batches.c.due_provisional.is_(True))
                .values(original_due=original_due, due=due, due_provisional=False)
            ).rowcount
            if done:
                audit.append_generated(
                    conn,
                    at_ms=now_ms,
                    actor=actor,
                    action="batch.due_final",
                    commission_id=batch.commission_id,
                    before=batch.original_due.isoformat(),
                    after=original_due.isoformat(),
                    fields=(("unit", batch.unit_id), ("batch", batch.batch_id), ("due", due.isoformat())),
                )
        return bool(done)

    def settle(self, calendar: WorkdayCalendar, *, actor: str, clock: Clock) -> int:
        """Recompute each provisional due date from its receipt time with ``calendar`` and make final those it can
        now count exactly, each with an audit entry by ``actor`` at ``clock``'s time. Returns how many became
        final."""
        pending = self.provisional()
        if not pending:
            return 0
        audit = AuditLog(self.engine)
        fixed = 0
        for batch in pending:
            settled = calendar.settle(from_ms(batch.received_at_ms), batch.due, delayed=batch.delay_reason is not None)
            if settled is None:
                continue
            original, due = settled
            if self.settle_due(batch, original, due, audit=audit, actor=actor, now_ms=clock.now_ms()):
                fixed += 1
                log.info(
                    "provisional due date is final",
                    extra={
                        "unit": batch.unit_id,
                        "batch_id": batch.batch_id,
                        "provisional": batch.original_due.isoformat(),
                        "final": original.isoformat(),
                    },
                )
        return fixed
