"""The verification procedure as a state machine (clause 11; Procedure III and V).

    received ──intake──▶ intake_passed ──review──▶ review_passed ──2 approvals──▶ exchange_approved ─▶ exchanging
       │                     │                                                                          │
       └──▶ returned         └──▶ terminated                                                 report ──▶ report_issued

* Intake review (受理初审), second review (审核复审) and report issue are done by three different staff members
  (Procedure V.(一)); a return or a termination always carries a reason.
* A commission from a lower-level agency skips intake and enters at review (Procedure III.(二)2).
* The exchange needs two distinct staff members (Procedure V.(二)), each signing the commission's exchange digest
  with their registered key; the second approval queues the query items for the engine. The exchange digest is the
  root of the commission's approval trees, built at submission (gateway/exchange/approvals.py): each unit asked can
  verify the two signatures over its own share of the commission (docs/exchange.md, "Approvals a unit verifies").
* Submission (validating and storing the package, building its approval trees) is gateway/procedure/submission.py.

Every transition and its audit entry are one transaction: a refused request changes nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

import grpc
from hedui.v1 import agency_pb2
from sqlalchemy import Connection, Engine, Row, insert, select, update

from common.workdays import CHINA_TZ
from gateway.archive.audit import AuditLog
from gateway.archive.checkpoints import write_checkpoint
from gateway.db import schema as s
from gateway.exchange.approvals import (
    tree_unit_ids,
)
from gateway.exchange.store import GatewayStore
from gateway.procedure.commission import (
    EXCHANGE_APPROVED,
    EXCHANGING,
    INTAKE_PASSED,
    RECEIVED,
    REPORT_ISSUED,
    RETURNED,
    REVIEW_PASSED,
    TERMINATED,
    Caller,
    WorkflowError,
    denied,
    find_commission,
    illegal,
)
from gateway.procedure.feedback import FeedbackRecorder
from gateway.procedure.intake import MAX_REASON_CHARS, is_plain_text, trim
from gateway.procedure.queries import CommissionQueries
from gateway.procedure.report import ReportRefused, build_report, sign_report
from gateway.procedure.routing import category_names, route, unserved
from gateway.procedure.staff import StaffRegister
from gateway.procedure.steps import ProcedureSteps, VerifiedStep, require_signature
from gateway.procedure.submission import Submissions
from keys.clock import Clock, from_ms
from keys.identity import PartyKeys
from keys.steps import StepKind

APPROVALS_NEEDED = 2  # Procedure V.(二)


@dataclass(frozen=True)
class _Review:
    """One of the two review steps: who may do it, from which state, and where pass and fail lead."""

    role: str
    kind: StepKind
    name: str
    before: str
    passed: str
    failed: str
    staff_column: str


_INTAKE = _Review(
    "intake", agency_pb2.STEP_KIND_INTAKE, "intake review", RECEIVED, INTAKE_PASSED, RETURNED, "intake_staff"
)
_SECOND = _Review(
    "review", agency_pb2.STEP_KIND_REVIEW, "second review", INTAKE_PASSED, REVIEW_PASSED, TERMINATED, "review_staff"
)


class Workflow:
    """Commissions from submission to report, with staff rules and audit. Reads go through ``queries``, the
    commissioner's approval feedback through ``feedback``."""

    def __init__(
        self,
        *,
        store: GatewayStore,
        audit: AuditLog,
        staff: StaffRegister,
        clock: Clock,
        agency: PartyKeys,
    ) -> None:
        self.store = store
        self.engine: Engine = store.engine
        self.audit = audit
        self.staff = staff
        self.clock = clock
        self.agency = agency
        self.queries = CommissionQueries(store=store, audit=audit, clock=clock, agency=agency)
        self.feedback = FeedbackRecorder(engine=store.engine, audit=audit, clock=clock)
        self.steps = ProcedureSteps(staff, agency.party_id)
        self.submissions = Submissions(store=store, audit=audit, clock=clock, agency=agency, queries=self.queries)

    def _now(self) -> int:
        return self.clock.now_ms()

    def _today(self) -> date:
        return from_ms(self._now()).astimezone(CHINA_TZ).date()

    # -- submission ----------------------------------------------------------------------------------------------

    def submit(self, request: agency_pb2.SubmitCommissionRequest, caller: Caller) -> agency_pb2.Commission:
        """Validate and store a data package; a lower-level agency's commission enters at review
        (gateway/procedure/submission.py)."""
        return self.submissions.submit(request, caller)

    # -- staff steps ---------------------------------------------------------------------------------------------

    def _staff(self, staff_id: str, role: str) -> None:
        if not staff_id:
            raise WorkflowError(grpc.StatusCode.INVALID_ARGUMENT, f"staff_id is required: who performs the {role} step")
        member = self.staff.active(staff_id, self._now())
        if member is None or role not in member.roles:
            raise denied(f"staff member {staff_id} is not registered for {role} now")

    def _transition(
        self,
        conn: Connection,
        row: Row[Any],
        *,
        actor: str,
        action: str,
        after: str,
        values: dict[str, object],
        detail: str | None = None,
        step: VerifiedStep | None = None,
        at_ms: int | None = None,
    ) -> int:
        """Move ``row`` to ``after`` and write the chain entry (at ``at_ms``, default now); with ``step``, the entry
        names the signed step (its fields follow ``detail``'s, which must then be a code) and the step is kept, at
        the same time. Returns the entry's number."""
        before = row.state
        done = conn.execute(
            update(s.commissions)
            .where(s.commissions.c.id == row.id, s.commissions.c.state == before)
            .values(state=after, **values)
        ).rowcount
        if not done:
            raise illegal("the commission changed meanwhile; read it again")
        now = self._now() if at_ms is None else at_ms
        if step is None:
            return self.audit.append(
                conn, at_ms=now, actor=actor, action=action, commission_id=row.id, before=before, after=after,
                detail=detail,
            )  # fmt: skip
        fields: list[tuple[str, str | int]] = [("outcome", detail)] if detail else []
        seq = self.audit.append_generated(
            conn, at_ms=now, actor=actor, action=action, commission_id=row.id, before=before, after=after,
            fields=[*fields, *step.audit_fields()],
        )  # fmt: skip
        self.steps.record(conn, row.id, step, now, seq)
        return seq

    @staticmethod
    def _reason(passed: bool, reason: str) -> str | None:
        reason = trim(reason)
        if passed:
            return None  # a passing step stores no reason
        if not 1 <= len(reason) <= MAX_REASON_CHARS:
            raise WorkflowError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"a return or termination needs a reason (1-{MAX_REASON_CHARS} characters)",
            )
        if not is_plain_text(reason):
            # The reason goes back to the commissioner as written: no escape sequences, hidden or reordering
            # characters, and one line.
            raise WorkflowError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "reason: one line of printable characters (no control or format characters, no line breaks)",
            )
        return reason

    def intake(
        self, ref: str, staff_id: str, passed: bool, reason: str, caller: Caller, *, signature: bytes
    ) -> agency_pb2.Commission:
        """受理初审: received -> intake_passed, or -> returned with a reason; ``signature`` is the staff member's
        over the step (gateway/procedure/steps.py)."""
        return self._review(_INTAKE, ref, staff_id, passed=passed, reason=reason, caller=caller, signature=signature)

    def review(
        self, ref: str, staff_id: str, passed: bool, reason: str, caller: Caller, *, signature: bytes
    ) -> agency_pb2.Commission:
        """审核复审: intake_passed -> review_passed, or -> terminated with a reason; signed as :meth:`intake`."""
        return self._review(_SECOND, ref, staff_id, passed=passed, reason=reason, caller=caller, signature=signature)

    def _review(
        self, step: _Review, ref: str, staff_id: str, *, passed: bool, reason: str, caller: Caller, signature: bytes
    ) -> agency_pb2.Commission:
        self._require_staff_system(caller)
        self._staff(staff_id, step.role)
        text = self._reason(passed, reason)
        require_signature(signature)
        now = self._now()
        with self.engine.begin() as conn:
            row = find_commission(conn, ref, caller)
            # The step as the gateway would record it, signed by the member's registered key, or nothing happens.
            verified = self.steps.verify(
                conn, row, kind=step.kind, staff_id=staff_id, signature=signature, now_ms=now, passed=passed,
                reason=reason,
            )  # fmt: skip
            if row.state != step.before:
                raise illegal(f"{step.name} needs state {step.before}, the commission is {row.state}")
            if step is _SECOND and staff_id == row.intake_staff:
                raise denied("Procedure V.(一): intake and second review need different staff members")
            after = step.passed if passed else step.failed
            self._transition(
                conn,
                row,
                actor=staff_id,
                action=f"commission.{step.role}",
                after=after,
                values={step.staff_column: staff_id, "reason": None if passed else text},
                step=verified,
                at_ms=now,
            )
        return self.queries.view(ref, caller)

    def approve(self, ref: str, staff_id: str, signature: bytes, caller: Caller) -> agency_pb2.Commission:
        """One exchange approval; the second distinct one queues the exchange (Procedure V.(二))."""
        self._require_staff_system(caller)
        self._staff(staff_id, "exchange")
        now = self._now()
        units = self.store.units.all()  # read before the transaction: SQLite allows one writer connection at a time
        with self.engine.begin() as conn:
            row = find_commission(conn, ref, caller)
            if row.state != REVIEW_PASSED:
                raise illegal(f"exchange approval needs review passed, the commission is {row.state}")
            missing = unserved((int(c) for c in row.categories.split(",")), units)
            if missing:
                # Units are registered by the operator: one may have been disabled or removed since submission.
                raise illegal(
                    f"no enabled sharing unit holds {category_names(missing)} now: enable the unit that holds "
                    "them, or return the commission; the approval was not recorded"
                )
            asked = tree_unit_ids(conn, row.id)
            enabled = {u.unit_id for u in units if u.enabled}
            gone = [u for u in asked or () if u not in enabled]
            if gone:
                # The approval tree names the units asked: the exchange goes to exactly those, or not at all.
                raise illegal(
                    f"sharing unit {', '.join(gone)} of this commission's approval is not enabled now: enable it "
                    "again, or return the commission; the approval was not recorded"
                )
            if not self.staff.verify_approval(staff_id, row.exchange_digest, signature, now, conn=conn):
                raise WorkflowError(grpc.StatusCode.UNAUTHENTICATED, "approval signature does not verify")
            existing = [
                r.staff_id
                for r in conn.execute(select(s.approvals.c.staff_id).where(s.approvals.c.commission_id == row.id))
            ]
            if staff_id in existing:
                raise denied("Procedure V.(二): the two approvals must come from two different staff members")
            conn.execute(
                insert(s.approvals).values(
                    commission_id=row.id,
                    staff_id=staff_id,
                    signature=signature,
                    approved_at_ms=now,
                )
            )
            # The chain names what was signed (the digest), the signature (its SHA-256) and the key it verified with.
            member = self.staff.get(staff_id, conn=conn)
            assert member is not None  # verify_approval found them
            self.audit.append_generated(
                conn, at_ms=now, actor=staff_id, action="commission.approve", commission_id=row.id,
                fields=[("digest", bytes(row.exchange_digest).hex()), ("sig", hashlib.sha256(signature).hexdigest()),
                        ("key", member.public_key.key_id.hex())],
            )  # fmt: skip
            approvers = [*existing, staff_id]
            if len(approvers) >= APPROVALS_NEEDED:
                self._transition(
                    conn, row, actor=staff_id, action="commission.exchange_approved", after=EXCHANGE_APPROVED,
                    values={"staff_ids": ",".join(approvers)},
                )  # fmt: skip
                row = find_commission(conn, ref, caller)
                # The units of the approval tree (a commission made before approval trees: routed now).
                targets = asked or route([int(c) for c in row.categories.split(",")], units)
                items = self._enqueue(conn, row.id, targets, now)
                self._transition(
                    conn, row, actor=staff_id, action="commission.exchange_started", after=EXCHANGING, values={},
                    detail=f"units={len(targets)} items={items}",
                )  # fmt: skip
        return self.queries.view(ref, caller)

    @staticmethod
    def _enqueue(conn: Connection, commission_id: int, unit_ids: Sequence[str], now_ms: int) -> int:
        subject_ids = [
            r.id
            for r in conn.execute(
                select(s.subjects.c.id).where(s.subjects.c.commission_id == commission_id).order_by(s.subjects.c.id)
            )
        ]
        rows = [
            {"commission_id": commission_id, "subject_id": sid, "unit_id": unit, "created_at_ms": now_ms}
            for unit in unit_ids
            for sid in subject_ids
        ]
        for start in range(0, len(rows), 5000):
            conn.execute(insert(s.items), rows[start : start + 5000])
        return len(rows)

    def issue_report(
        self, ref: str, staff_id: str, partial: bool, caller: Caller, *, signature: bytes
    ) -> agency_pb2.SignedReport:
        """核对报告: by a third staff member (Procedure V.(一)), who signs the step; refused while items are open
        unless partial. The report carries the signed steps and the exchange approvals."""
        self._require_staff_system(caller)
        self._staff(staff_id, "report")
        require_signature(signature)
        now = self._now()
        with self.engine.begin() as conn:
            row = find_commission(conn, ref, caller)
            verified = self.steps.verify(
                conn, row, kind=agency_pb2.STEP_KIND_REPORT, staff_id=staff_id, signature=signature, now_ms=now,
                partial=partial,
            )  # fmt: skip
            if row.state == REPORT_ISSUED:
                raise illegal("the report of this commission was issued already: fetch it with GetReport")
            if row.state != EXCHANGING:
                raise illegal(f"a report needs the exchange to have started, the commission is {row.state}")
            if staff_id in {row.intake_staff, row.review_staff}:
                raise denied("Procedure V.(一): intake, review and report need three different staff members")
            try:
                report = build_report(
                    conn, row.id, agency=self.agency.party_id, issued_by=staff_id, partial=partial, now_ms=now
                )
            except ReportRefused as exc:
                raise illegal(str(exc)) from exc
            report.steps.extend([*self.steps.signed_steps(conn, row.id), verified.signed(now)])
            report.approvals.extend(self.steps.approvals(conn, row.id))
            signed = sign_report(report, self.agency, now, signers=self.steps.signers(conn, report))
            conn.execute(
                insert(s.reports).values(
                    commission_id=row.id,
                    report=signed.report,
                    signer_key_id=signed.signer_key_id,
                    signature=signed.signature,
                    html=signed.html,
                    partial=report.partial,
                    issued_at_ms=now,
                )
            )
            self._transition(
                conn, row, actor=staff_id, action="commission.report", after=REPORT_ISSUED,
                values={"report_staff": staff_id}, detail="partial" if partial else "complete", step=verified,
                at_ms=now,
            )  # fmt: skip
            # Clause 17: the chain's head, this report's entry included, signed with the report.
            write_checkpoint(conn, self.audit, self.agency, now, reason="report")
        return signed

    @staticmethod
    def _require_staff_system(caller: Caller) -> None:
        if caller.role != "staff_system":
            raise denied("only the agency's own staff system performs this step")
