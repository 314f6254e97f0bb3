"""Signed procedure steps at the gateway: verify before recording, keep what was signed, and name it in the chain.

Intake review, second review and report issue (Procedure V.(一): three different staff members) each come with the
staff member's signature over the ProcedureStep (keys/steps.py; docs/agency-api.md "Signed procedure steps"). The
gateway never takes the step from the request as it is: it rebuilds it from the request's fields and its own facts
(its party id, the commission's stored exchange digest) and verifies the signature with the key the staff register
holds for the member, who must be active now in the step's role. So a back office that names a staff id whose key it
does not hold cannot record a step under that name, and a signature over another commission, step or decision does
not fit the rebuilt step.

What was verified is kept in ``procedure_steps`` (canonical step bytes, signature, the key id it verified with) and
named by the chain entry of the transition: ``step`` = SHA-256 of the step bytes, ``sig`` = SHA-256 of the
signature, ``key`` = the signer's key id (gateway/archive/steps.py re-checks all of it from the archive).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import grpc
from hedui.v1 import agency_pb2, exchange_pb2
from sqlalchemy import Connection, Row, insert, select

from gateway.db import schema as s
from gateway.procedure.commission import WorkflowError, denied
from gateway.procedure.report import Signer
from gateway.procedure.staff import StaffRegister
from keys.steps import STEP_ROLES, StepKind, build_step, read_step, step_bytes, verify_step

#: What a refused signature is told: one message whichever check failed (key, step or signature), as for approvals.
DOES_NOT_VERIFY = "step signature does not verify"


@dataclass(frozen=True)
class VerifiedStep:
    """A step whose signature verified with the staff member's registered key, ready to be recorded."""

    kind: StepKind
    staff_id: str
    step: bytes
    signature: bytes
    key_id: bytes

    def audit_fields(self) -> list[tuple[str, str | int]]:
        """The chain entry's detail fields that name this step (no personal data: digests and a key id)."""
        return [
            ("step", hashlib.sha256(self.step).hexdigest()),
            ("sig", hashlib.sha256(self.signature).hexdigest()),
            ("key", self.key_id.hex()),
        ]

    def signed(self, recorded_at_ms: int) -> agency_pb2.SignedStep:
        """The step as the report carries it."""
        return agency_pb2.SignedStep(step=self.step, signature=self.signature, recorded_at_ms=recorded_at_ms)


def require_signature(signature: bytes) -> None:
    """INVALID_ARGUMENT for a request without a signature: checked before anything is read."""
    if not signature:
        raise WorkflowError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "signature is required: the staff member signs the step with their registered key "
            "('hedui-keys sign-step'; docs/agency-api.md, \"Signed procedure steps\")",
        )


class ProcedureSteps:
    """Verifies, records and reads the signed steps of commissions for the agency ``agency_id``."""

    def __init__(self, staff: StaffRegister, agency_id: str) -> None:
        self.staff = staff
        self.agency_id = agency_id

    def verify(
        self,
        conn: Connection,
        row: Row[Any],
        *,
        kind: StepKind,
        staff_id: str,
        signature: bytes,
        now_ms: int,
        passed: bool = True,
        reason: str = "",
        partial: bool = False,
    ) -> VerifiedStep:
        """The step of commission ``row`` rebuilt from the request's fields, once ``signature`` verifies with the
        registered key of ``staff_id``, active at ``now_ms`` in the step's role.

        PERMISSION_DENIED when the member is not registered for the role now; UNAUTHENTICATED when the signature
        does not verify over the rebuilt step (another key, commission, step kind or decision). Nothing is written.
        """
        require_signature(signature)
        role = STEP_ROLES[kind]
        member = self.staff.active(staff_id, now_ms, conn=conn)
        if member is None or not member.has_role(role):
            raise denied(f"staff member {staff_id} is not registered for {role} now")
        if row.exchange_digest is None:  # commissions the engine made alone have no package to sign
            raise WorkflowError(grpc.StatusCode.FAILED_PRECONDITION, "this commission has no exchange digest to sign")
        try:
            step = build_step(
                agency=self.agency_id,
                commission_id=row.ref,
                kind=kind,
                staff_id=staff_id,
                exchange_digest=bytes(row.exchange_digest),
                passed=passed,
                reason=reason,
                partial=partial,
            )
        except ValueError as exc:  # a reason over the limit, a malformed staff id: the request's fault
            raise WorkflowError(grpc.StatusCode.INVALID_ARGUMENT, f"the step cannot be signed as sent: {exc}") from exc
        if not verify_step(step, signature, member.public_key):
            raise WorkflowError(grpc.StatusCode.UNAUTHENTICATED, DOES_NOT_VERIFY)
        return VerifiedStep(kind, staff_id, step_bytes(step), bytes(signature), member.public_key.key_id)

    @staticmethod
    def record(conn: Connection, commission_id: int, verified: VerifiedStep, now_ms: int, audit_seq: int) -> None:
        """Keep ``verified`` for commission ``commission_id`` (the database id), named by chain entry ``audit_seq``."""
        conn.execute(
            insert(s.procedure_steps).values(
                commission_id=commission_id,
                kind=int(verified.kind),
                staff_id=verified.staff_id,
                step=verified.step,
                signature=verified.signature,
                key_id=verified.key_id,
                recorded_at_ms=now_ms,
                audit_seq=audit_seq,
            )
        )

    @staticmethod
    def signed_steps(conn: Connection, commission_id: int) -> list[agency_pb2.SignedStep]:
        """The commission's recorded steps in procedure order (intake, review, report)."""
        p = s.procedure_steps.c
        return [
            agency_pb2.SignedStep(step=bytes(r.step), signature=bytes(r.signature), recorded_at_ms=r.recorded_at_ms)
            for r in conn.execute(
                select(p.step, p.signature, p.recorded_at_ms).where(p.commission_id == commission_id).order_by(p.kind)
            )
        ]

    def signers(self, conn: Connection, report: agency_pb2.Report) -> dict[str, Signer]:
        """Name and key of everyone who signed a step or an approval of ``report``, from the staff register (for
        the printable report)."""
        ids = {a.staff_id for a in report.approvals} | {read_step(s.step).staff_id for s in report.steps}
        signers = {}
        for staff_id in sorted(ids):
            member = self.staff.get(staff_id, conn=conn)
            if member is not None:
                signers[staff_id] = Signer(member.name, member.public_key.fingerprint)
        return signers

    @staticmethod
    def approvals(conn: Connection, commission_id: int) -> list[exchange_pb2.StaffApproval]:
        """The commission's exchange approvals (Procedure V.(二)) in the order they were given."""
        a = s.approvals.c
        return [
            exchange_pb2.StaffApproval(
                staff_id=r.staff_id, signature=bytes(r.signature), approved_at_ms=r.approved_at_ms
            )
            for r in conn.execute(
                select(a.staff_id, a.signature, a.approved_at_ms)
                .where(a.commission_id == commission_id)
                .order_by(a.approved_at_ms, a.staff_id)
            )
        ]
