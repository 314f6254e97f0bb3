"""The read side of the procedure: one commission, the caller's commissions, a commission's exchange progress and
its report, and the audit entry every read leaves (clause 16: data only for those in the verification; clause 17:
archives). Nothing here changes a commission."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from hedui.v1 import agency_pb2
from sqlalchemy import Engine, Row, func, select

from common.dates import to_pb
from common.db import reading
from gateway.archive.audit import AuditLog
from gateway.db import schema as s
from gateway.exchange.store import GatewayStore
from gateway.procedure.commission import STATE_TO_PB, Caller, WorkflowError, find_commission
from keys.clock import Clock

#: The most commissions one ListCommissions returns.
MAX_LIST = 1000


def commission_pb(row: Row[Any], approvals: Sequence[str]) -> agency_pb2.Commission:
    """The API's view of a commission row, with the staff ids of its exchange approvals."""
    r = row
    return agency_pb2.Commission(
        commission_id=r.ref,
        letter_number=r.letter_number or "",
        commissioner=r.commissioner or "",
        state=STATE_TO_PB.get(r.state, agency_pb2.COMMISSION_STATE_UNSPECIFIED),
        reason=r.reason or "",
        households=r.household_count,
        subjects=r.subject_count,
        from_lower_agency=r.from_lower_agency,
        intake_staff=r.intake_staff or "",
        review_staff=r.review_staff or "",
        approving_staff=list(approvals),
        report_staff=r.report_staff or "",
        exchange_digest=r.exchange_digest or b"",
        created_at_ms=r.created_at_ms,
        programme=r.purpose,
    )


class CommissionQueries:
    """Reads commissions as a caller may see them: a commissioner its own, the staff system all of the agency's."""

    def __init__(self, *, store: GatewayStore, audit: AuditLog, clock: Clock) -> None:
        self.store = store
        self.engine: Engine = store.engine
        self.audit = audit
        self.clock = clock

    def view(self, ref: str, caller: Caller) -> agency_pb2.Commission:
        """One commission with its approving staff."""
        with reading(self.engine) as conn:
            row = find_commission(conn, ref, caller)
            approvals = [
                r.staff_id
                for r in conn.execute(
                    select(s.approvals.c.staff_id)
                    .where(s.approvals.c.commission_id == row.id)
                    .order_by(s.approvals.c.approved_at_ms)
                )
            ]
        return commission_pb(row, approvals)

    def audit_read(self, caller: Caller, action: str, ref: str | None = None) -> None:
        """Record who read what (clause 16: data only for those in the verification; clause 17: archives)."""
        with self.engine.begin() as conn:
            commission_id = None
            if ref is not None:
                commission_id = conn.execute(select(s.commissions.c.id).where(s.commissions.c.ref == ref)).scalar()
            self.audit.append(
                conn, at_ms=self.clock.now_ms(), actor=caller.party_id, action=action, commission_id=commission_id
            )

    def list(self, caller: Caller, state: str | None, limit: int) -> list[agency_pb2.Commission]:
        """The caller's commissions (all, for the staff system), newest first: ``limit`` of them, 0 meaning 100."""
        if not 0 <= limit <= MAX_LIST:
            raise WorkflowError(
                grpc.StatusCode.INVALID_ARGUMENT, f"limit must be 1 to {MAX_LIST} (or 0 for the default of 100)"
            )
        query = select(s.commissions).order_by(s.commissions.c.created_at_ms.desc()).limit(limit or 100)
        if caller.role != "staff_system":
            query = query.where(s.commissions.c.commissioner == caller.party_id)
        if state:
            query = query.where(s.commissions.c.state == state)
        with reading(self.engine) as conn:
            rows = conn.execute(query).all()
        return [commission_pb(r, []) for r in rows]

    def progress(self, ref: str, caller: Caller) -> agency_pb2.Progress:
        """Per unit: items queued, sent, receipted (with the latest due date), answered, overdue, delayed, failed."""
        with reading(self.engine) as conn:
            row = find_commission(conn, ref, caller)
            dues = dict(
                conn.execute(
                    select(s.batches.c.unit_id, func.max(s.batches.c.due))
                    .where(s.batches.c.commission_id == row.id, s.batches.c.state == "receipted")
                    .group_by(s.batches.c.unit_id)
                ).all()
            )
        counts = self.store.outbox.progress(row.id)
        categories = {u.unit_id: u.category for u in self.store.units.all()}
        result = agency_pb2.Progress(
            commission_id=ref, state=STATE_TO_PB.get(row.state, agency_pb2.COMMISSION_STATE_UNSPECIFIED)
        )
        for unit_id, stages in sorted(counts.items()):
            unit = result.units.add(unit_id=unit_id, category=categories.get(unit_id, 0))
            for stage, count in stages.items():
                if hasattr(unit, stage):
                    setattr(unit, stage, count)
            due = dues.get(unit_id)
            if due is not None:
                unit.due_date.CopyFrom(to_pb(due))
        return result

    def report(self, ref: str, caller: Caller) -> agency_pb2.SignedReport:
        """The signed report as issued; NOT_FOUND before it is."""
        with reading(self.engine) as conn:
            row = find_commission(conn, ref, caller)
            stored = conn.execute(select(s.reports).where(s.reports.c.commission_id == row.id)).first()
        if stored is None:
            raise WorkflowError(grpc.StatusCode.NOT_FOUND, "no report has been issued for this commission")
        return agency_pb2.SignedReport(
            report=stored.report, signer_key_id=stored.signer_key_id, signature=stored.signature, html=stored.html
        )
