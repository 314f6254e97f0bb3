"""Approval feedback (审批情况反馈, Procedure IV): what the commissioner decided for each subject of a reported
commission."""

from __future__ import annotations

import grpc
from hedui.v1 import agency_pb2
from sqlalchemy import Engine, insert, select

from gateway.archive.audit import AuditLog
from gateway.db import schema as s
from gateway.procedure.commission import REPORT_ISSUED, Caller, WorkflowError, denied, find_commission, illegal
from keys.clock import Clock


class FeedbackRecorder:
    """Records the commissioner's decision per subject, replacing an earlier one, with an audit entry per call."""

    def __init__(self, *, engine: Engine, audit: AuditLog, clock: Clock) -> None:
        self.engine = engine
        self.audit = audit
        self.clock = clock

    def record(self, request: agency_pb2.ApprovalFeedback, caller: Caller) -> int:
        """审批情况反馈 (Procedure IV): the commissioner's decision per subject of a reported commission."""
        if caller.role not in {"commissioner", "lower_agency"}:
            raise denied("approval feedback comes from the commissioner")
        now = self.clock.now_ms()
        with self.engine.begin() as conn:
            row = find_commission(conn, request.commission_id, caller)
            if row.state != REPORT_ISSUED:
                raise illegal("feedback is for commissions whose report was issued")
            subjects = {
                (r.household_ref, r.member_index): r.id
                for r in conn.execute(
                    select(s.subjects.c.id, s.subjects.c.household_ref, s.subjects.c.member_index).where(
                        s.subjects.c.commission_id == row.id
                    )
                )
            }
            rows: list[tuple[int, int]] = []
            first: dict[int, int] = {}
            for i, decision in enumerate(request.decisions):
                subject_id = subjects.get((decision.household_ref, decision.member_index))
                if subject_id is None:
                    raise WorkflowError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"decisions[{i}]: this commission has no member {decision.member_index} in a household "
                        "with that household_ref (members are numbered from 1)",
                    )
                if decision.decision not in {1, 2, 3}:
                    raise WorkflowError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"decisions[{i}]: decision must be approved, refused or withdrawn",
                    )
                if subject_id in first:
                    raise WorkflowError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"decisions[{i}] names the same member as decisions[{first[subject_id]}]",
                    )
                first[subject_id] = i
                rows.append((subject_id, decision.decision))
            for subject_id, choice in rows:
                conn.execute(s.feedback.delete().where(s.feedback.c.subject_id == subject_id))
                conn.execute(
                    insert(s.feedback).values(
                        subject_id=subject_id, commission_id=row.id, decision=choice, recorded_at_ms=now
                    )
                )
            self.audit.append(
                conn, at_ms=now, actor=caller.party_id, action="commission.feedback", commission_id=row.id,
                detail=f"decisions={len(rows)}",
            )  # fmt: skip
        return len(rows)
