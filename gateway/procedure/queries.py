"""The read side of the procedure: one commission, the caller's commissions, a commission's exchange progress and
its report, and the audit entry every read leaves (clause 16: data only for those in the verification; clause 17:
archives). Nothing here changes a commission."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any

import grpc
from hedui.v1 import agency_pb2
from sqlalchemy import Engine, Row, and_, func, or_, select

from common.dates import to_pb
from common.db import reading
from common.workdays import CHINA_TZ
from gateway.archive.audit import AuditLog
from gateway.db import schema as s
from gateway.exchange.store import GatewayStore
from gateway.procedure.commission import STATE_TO_PB, Caller, WorkflowError, find_commission
from gateway.procedure.paging import PageTokens, Position, scope
from keys.clock import Clock, from_ms, to_ms
from keys.identity import PartyKeys

#: The most commissions one ListCommissions returns.
MAX_LIST = 1000
#: The longest commissioner filter, in characters (party ids are at most 64).
MAX_PARTY_CHARS = 64


@dataclass(frozen=True)
class ListFilter:
    """What ListCommissions narrows the caller's commissions to; every field None (or empty) lets all through."""

    state: str | None = None
    commissioner: str = ""
    created_from: date | None = None
    created_until: date | None = None

    def check(self) -> None:
        """INVALID_ARGUMENT for a filter that could match nothing by construction or is out of range."""
        if len(self.commissioner) > MAX_PARTY_CHARS:
            raise WorkflowError(
                grpc.StatusCode.INVALID_ARGUMENT, f"commissioner: a party id of at most {MAX_PARTY_CHARS} characters"
            )
        if self.created_from and self.created_until and self.created_from > self.created_until:
            raise WorkflowError(grpc.StatusCode.INVALID_ARGUMENT, "created_from lies after created_until")

    def scope_parts(self) -> tuple[str, ...]:
        """The filter as text, for binding page tokens to it."""
        return (
            self.state or "",
            self.commissioner,
            self.created_from.isoformat() if self.created_from else "",
            self.created_until.isoformat() if self.created_until else "",
        )


@dataclass(frozen=True)
class Page:
    """One page of a listing, and the token of the next one (empty after the last)."""

    commissions: list[agency_pb2.Commission]
    next_page_token: str


def _day_start_ms(day: date) -> int:
    """Midnight at the start of ``day``, Beijing time: the agency's days."""
    return to_ms(datetime.combine(day, time.min, tzinfo=CHINA_TZ))


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

    def __init__(self, *, store: GatewayStore, audit: AuditLog, clock: Clock, agency: PartyKeys) -> None:
        self.store = store
        self.engine: Engine = store.engine
        self.audit = audit
        self.clock = clock
        self.pages = PageTokens(agency)

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

    def list(self, caller: Caller, wanted: ListFilter, limit: int, page_token: str = "") -> Page:
        """The caller's commissions (all, for the staff system) that ``wanted`` lets through, newest first (by
        created time, then id): ``limit`` of them, 0 meaning 100, from the start or after ``page_token``."""
        if not 0 <= limit <= MAX_LIST:
            raise WorkflowError(
                grpc.StatusCode.INVALID_ARGUMENT, f"limit must be 1 to {MAX_LIST} (or 0 for the default of 100)"
            )
        wanted.check()
        c = s.commissions.c
        now = self.clock.now_ms()
        bound_to = scope(caller.party_id, caller.role, *wanted.scope_parts())
        query = select(s.commissions).order_by(c.created_at_ms.desc(), c.id.desc()).limit((limit or 100) + 1)
        if caller.role != "staff_system":
            query = query.where(c.commissioner == caller.party_id)
        if wanted.commissioner:
            query = query.where(c.commissioner == wanted.commissioner)
        if wanted.state:
            query = query.where(c.state == wanted.state)
        if wanted.created_from is not None:
            query = query.where(c.created_at_ms >= _day_start_ms(wanted.created_from))
        if wanted.created_until is not None:
            query = query.where(c.created_at_ms < _day_start_ms(wanted.created_until + timedelta(days=1)))
        if page_token:
            after = self.pages.read(page_token, bound_to, now)
            query = query.where(
                or_(
                    c.created_at_ms < after.created_at_ms,
                    and_(c.created_at_ms == after.created_at_ms, c.id < after.row_id),
                )
            )
        with reading(self.engine) as conn:
            rows = conn.execute(query).all()
        shown = rows[: limit or 100]
        token = ""
        if len(rows) > len(shown):
            token = self.pages.make(bound_to, Position(shown[-1].created_at_ms, shown[-1].id), now)
        return Page([commission_pb(r, []) for r in shown], token)

    def progress(self, ref: str, caller: Caller) -> agency_pb2.Progress:
        """Per unit: items queued, sent, receipted (with the latest due date and whether it is provisional),
        answered, overdue, provisionally overdue, delayed, failed."""
        with reading(self.engine) as conn:
            row = find_commission(conn, ref, caller)
            open_batches = conn.execute(
                select(
                    s.batches.c.unit_id,
                    s.batches.c.due,
                    s.batches.c.due_provisional,
                    func.sum(s.batches.c.subject_count),
                )
                .where(s.batches.c.commission_id == row.id, s.batches.c.state == "receipted")
                .group_by(s.batches.c.unit_id, s.batches.c.due, s.batches.c.due_provisional)
            ).all()
        today = from_ms(self.clock.now_ms()).astimezone(CHINA_TZ).date()
        # Per unit: the latest due date of its open batches, whether that date is provisional, and the items past a
        # provisional date (not overdue until the date is final: docs/agency-api.md).
        dues: dict[str, tuple[date, bool]] = {}
        past_provisional: dict[str, int] = {}
        for unit_id, due, provisional, items in open_batches:
            latest = dues.get(unit_id)
            if latest is None or due > latest[0] or (due == latest[0] and provisional):
                dues[unit_id] = (due, bool(provisional))
            if provisional and due < today:
                past_provisional[unit_id] = past_provisional.get(unit_id, 0) + int(items)
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
                unit.due_date.CopyFrom(to_pb(due[0]))
                unit.due_date_provisional = due[1]
            unit.provisionally_overdue = past_provisional.get(unit_id, 0)
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
