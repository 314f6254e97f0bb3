"""A commission's states, the error every refused step raises, who is calling, and how a commission is found for
a caller: what the procedure's steps (workflow.py), its reads (queries.py) and the approval feedback (feedback.py)
share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from hedui.v1 import agency_pb2
from sqlalchemy import Connection, Row, select

from common.errors import HeduiError
from gateway.db import schema as s

RECEIVED, INTAKE_PASSED, RETURNED = "received", "intake_passed", "returned"
REVIEW_PASSED, TERMINATED = "review_passed", "terminated"
EXCHANGE_APPROVED, EXCHANGING, REPORT_ISSUED = "exchange_approved", "exchanging", "report_issued"

STATE_TO_PB = {
    RECEIVED: agency_pb2.COMMISSION_STATE_RECEIVED,
    INTAKE_PASSED: agency_pb2.COMMISSION_STATE_INTAKE_PASSED,
    RETURNED: agency_pb2.COMMISSION_STATE_RETURNED,
    REVIEW_PASSED: agency_pb2.COMMISSION_STATE_REVIEW_PASSED,
    TERMINATED: agency_pb2.COMMISSION_STATE_TERMINATED,
    EXCHANGE_APPROVED: agency_pb2.COMMISSION_STATE_EXCHANGE_APPROVED,
    EXCHANGING: agency_pb2.COMMISSION_STATE_EXCHANGING,
    REPORT_ISSUED: agency_pb2.COMMISSION_STATE_REPORT_ISSUED,
}
PB_TO_STATE = {v: k for k, v in STATE_TO_PB.items()}


class WorkflowError(HeduiError):
    """A request the procedure does not allow; carries the gRPC status it maps to. Nothing was changed."""

    code = "workflow"

    def __init__(self, status: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.status = status


def illegal(message: str) -> WorkflowError:
    """FAILED_PRECONDITION: the step is not allowed in the commission's current state."""
    return WorkflowError(grpc.StatusCode.FAILED_PRECONDITION, message)


def denied(message: str) -> WorkflowError:
    """PERMISSION_DENIED: this caller or staff member may not take the step."""
    return WorkflowError(grpc.StatusCode.PERMISSION_DENIED, message)


@dataclass(frozen=True)
class Caller:
    """Who is calling, from the client certificate and the configured client list."""

    party_id: str
    role: str  # commissioner | lower_agency | staff_system


def find_commission(conn: Connection, ref: str, caller: Caller) -> Row[Any]:
    """The commission row with id ``ref`` as ``caller`` may see it; NOT_FOUND otherwise."""
    row = conn.execute(select(s.commissions).where(s.commissions.c.ref == ref)).first()
    # A commissioner sees only its own commissions; "not found" also for other people's, so ids do not leak.
    if row is None or (caller.role != "staff_system" and row.commissioner != caller.party_id):
        raise WorkflowError(grpc.StatusCode.NOT_FOUND, "no such commission")
    return row
