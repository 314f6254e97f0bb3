"""``hedui-gateway archive steps COMMISSION``: who took each step of a commission, proven from the archive alone.

Procedure V.(一) has intake review, second review and report issue done by three different staff members, V.(二)
the exchange approved by two. The gateway verifies each step's and approval's signature before it records it
(gateway/procedure/steps.py); this check does it again later, from what the archive holds and nothing else:

* the audit chain's entries of the commission: each step entry (``commission.intake``, ``commission.review``,
  ``commission.report``) names the SHA-256 of the signed step bytes (``step``), of the signature (``sig``) and the
  signer's key id (``key``); each approval entry (``commission.approve``) the exchange digest signed (``digest``),
  the signature's SHA-256 and the key id. Each entry's own hash is recomputed;
* the signed bytes these entries name (``procedure_steps``, ``approvals``), which must match them;
* the staff register (its keys, roles, validity windows and revocations: a member is judged as they stood when the
  entry was written).

Every step must verify with the signer's registered key, name this agency and commission and the kind and decision
its entry records, and all steps and approvals must bind to one exchange digest. The outcome says whether the steps
were taken by three different people and the exchange approved by two; a step recorded before signed steps existed
(migration 0013) cannot be proven and is reported so. Whether the chain itself is whole (links, signed checkpoints,
a head kept off the machine) is ``hedui-gateway audit verify``'s question: run both.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from hedui.v1 import agency_pb2
from sqlalchemy import Connection, Engine, select

from common.db import reading
from gateway.archive.audit import AuditEntry, AuditLog, entry_from_row, entry_hash
from gateway.db import schema
from gateway.procedure.staff import StaffMember, StaffRegister
from keys.errors import TrustError
from keys.handles import PublicKey
from keys.statements import approval_message
from keys.steps import SIGNATURE_BYTES, STEP_ROLES, StepKind, read_step, verify_step

#: Chain actions of the signed steps, and the state each moves a commission to when the step passes.
STEP_ACTIONS: dict[str, tuple[StepKind, str]] = {
    "commission.intake": (agency_pb2.STEP_KIND_INTAKE, "intake_passed"),
    "commission.review": (agency_pb2.STEP_KIND_REVIEW, "review_passed"),
    "commission.report": (agency_pb2.STEP_KIND_REPORT, "report_issued"),
}
APPROVAL_ACTION = "commission.approve"
#: States in which the exchange has been approved (Procedure V.(二)).
_APPROVED_STATES = frozenset({"exchange_approved", "exchanging", "report_issued"})


@dataclass(frozen=True)
class ProvenSignature:
    """A step or approval whose signature verified with the signer's registered key, as its chain entry names it."""

    label: str  # intake, review, report or approval
    staff_id: str
    at_ms: int
    seq: int
    key_id: bytes
    passed: bool = True


@dataclass
class CommissionProof:
    """What :func:`prove_commission` found for one commission."""

    commission: str
    #: The commission's state as its chain entries leave it.
    state: str = ""
    #: Entered at review from a lower-level agency (Procedure III.(二)2): no intake step.
    from_lower_agency: bool = False
    steps: list[ProvenSignature] = field(default_factory=list)
    approvals: list[ProvenSignature] = field(default_factory=list)
    #: Signers' registered keys (for ``--export-keys``).
    keys: dict[str, PublicKey] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def step(self, label: str) -> ProvenSignature | None:
        """The proven step named ``label``."""
        return next((s for s in self.steps if s.label == label), None)

    @property
    def required_steps(self) -> list[str]:
        """The steps the commission's course so far needs; empty while it has not ended (in progress)."""
        first = [] if self.from_lower_agency else ["intake"]
        return {
            "returned": ["intake"],
            "terminated": [*first, "review"],
            "report_issued": [*first, "review", "report"],
        }.get(self.state, [])

    @property
    def ended(self) -> bool:
        """The procedure is over: report issued, returned or terminated."""
        return bool(self.required_steps)

    @property
    def three_different_people(self) -> bool:
        """Procedure V.(一): every step the course needs is proven, by as many different people (and keys)."""
        needed = self.required_steps
        present = [s for s in self.steps if s.label in needed]
        return (
            bool(needed)
            and len(present) == len(needed)
            and len({s.staff_id for s in present}) == len(present)
            and len({s.key_id for s in present}) == len(present)
        )

    @property
    def two_distinct_approvers(self) -> bool:
        """Procedure V.(二): at least two approvals proven, by distinct people (and keys)."""
        return len({a.staff_id for a in self.approvals}) >= 2 and len({a.key_id for a in self.approvals}) >= 2

    @property
    def approvals_needed(self) -> bool:
        """The course went through the exchange, so two approvals must be proven."""
        return self.state in _APPROVED_STATES

    @property
    def proven(self) -> bool:
        """No problem, the procedure ended, and both rules are shown."""
        return (
            not self.problems
            and self.ended
            and self.three_different_people
            and (self.two_distinct_approvers or not self.approvals_needed)
        )


def _fields(detail: str | None) -> dict[str, str]:
    pairs = (part.partition("=") for part in (detail or "").split(";"))
    return {key: value for key, sep, value in pairs if sep}


def _entries(conn: Connection, commission_id: int) -> list[AuditEntry]:
    t = schema.audit_log.c
    query = select(schema.audit_log).where(t.commission_id == commission_id).order_by(t.seq)
    return [entry_from_row(row) for row in conn.execute(query)]


def _entry_intact(entry: AuditEntry) -> bool:
    return (
        entry_hash(
            entry.prev_hash,
            seq=entry.seq,
            at_ms=entry.at_ms,
            actor=entry.actor,
            action=entry.action,
            commission_id=entry.commission_id,
            before=entry.before,
            after=entry.after,
            detail=entry.detail,
        )
        == entry.hash
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Prover:
    """One commission's proof, built entry by entry."""

    def __init__(self, conn: Connection, staff: StaffRegister, ref: str, agency_id: str) -> None:
        self.conn, self.staff, self.agency_id = conn, staff, agency_id
        self.proof = CommissionProof(ref)
        self.digests: set[bytes] = set()

    def member(self, staff_id: str, at_ms: int, role: str, key_hex: str, what: str) -> StaffMember | None:
        """The signer as the register held them at ``at_ms``, if they could sign ``what`` then with key ``key_hex``."""
        member = self.staff.get(staff_id, conn=self.conn)
        if member is None:
            self.proof.problems.append(f"{what}: {staff_id} is not in the staff register")
            return None
        if member.public_key.key_id.hex() != key_hex:
            self.proof.problems.append(
                f"{what}: the register's key of {staff_id} is not the key the chain says the signature verified with"
            )
            return None
        if not member.active_at(at_ms) or not member.has_role(role):
            self.proof.problems.append(f"{what}: {staff_id} was not registered for {role} at that time")
            return None
        self.proof.keys[staff_id] = member.public_key
        return member

    def step(self, entry: AuditEntry, rows: dict[int, Any]) -> None:
        kind, passed_state = STEP_ACTIONS[entry.action]
        label = STEP_ROLES[kind]
        what = f"the {label} step (entry {entry.seq})"
        fields = _fields(entry.detail)
        if not {"step", "sig", "key"} <= fields.keys():
            self.proof.problems.append(
                f"{what} was recorded without a signature (before signed procedure steps): it cannot be proven"
            )
            return
        row = rows.pop(entry.seq, None)
        if row is None:
            self.proof.problems.append(f"{what}: the signed step it names is not in the archive (deleted)")
            return
        step_data, signature = bytes(row.step), bytes(row.signature)
        if (_sha256(step_data), _sha256(signature), bytes(row.key_id).hex()) != (
            fields["step"],
            fields["sig"],
            fields["key"],
        ):
            self.proof.problems.append(f"{what}: the kept step or signature is not the one the chain names (altered)")
            return
        try:
            step = read_step(step_data)
        except TrustError as exc:
            self.proof.problems.append(f"{what}: {exc}")
            return
        facts = (step.agency, step.commission_id, step.step, step.staff_id, row.staff_id, row.kind, row.recorded_at_ms)
        if facts != (self.agency_id, self.proof.commission, kind, entry.actor, entry.actor, kind, entry.at_ms):
            self.proof.problems.append(f"{what}: the signed step is not the one its entry records (another agency, "
                                       "commission, step, staff member or time)")  # fmt: skip
            return
        if step.passed != (entry.after == passed_state):
            self.proof.problems.append(f"{what}: the signed decision is not the one the entry records")
            return
        member = self.member(step.staff_id, entry.at_ms, label, fields["key"], what)
        if member is None:
            return
        if not verify_step(step, signature, member.public_key):
            self.proof.problems.append(f"{what}: the signature does not verify with {step.staff_id}'s key")
            return
        if self.proof.step(label) is not None:
            self.proof.problems.append(f"{what}: the commission has two {label} steps")
        self.digests.add(step.exchange_digest)
        self.proof.steps.append(
            ProvenSignature(label, step.staff_id, entry.at_ms, entry.seq, member.public_key.key_id, step.passed)
        )

    def approval(self, entry: AuditEntry, rows: dict[str, Any]) -> None:
        what = f"the approval of {entry.actor} (entry {entry.seq})"
        fields = _fields(entry.detail)
        row = rows.pop(entry.actor, None)
        if row is None:
            self.proof.problems.append(f"{what}: the signature it records is not in the archive (deleted)")
            return
        signature = bytes(row.signature)
        if not {"digest", "sig", "key"} <= fields.keys():
            self.proof.problems.append(f"{what} was recorded before the chain named approvals' signatures: not proven")
            return
        if _sha256(signature) != fields["sig"] or row.approved_at_ms != entry.at_ms:
            self.proof.problems.append(f"{what}: the kept signature is not the one the chain names (altered)")
            return
        member = self.member(entry.actor, entry.at_ms, "exchange", fields["key"], what)
        if member is None:
            return
        try:
            digest = bytes.fromhex(fields["digest"])
            valid = len(signature) == SIGNATURE_BYTES and member.public_key.verify(signature, approval_message(digest))
        except ValueError:
            valid = False
        if not valid:
            self.proof.problems.append(f"{what}: the signature does not verify with {entry.actor}'s key")
            return
        self.digests.add(digest)
        self.proof.approvals.append(
            ProvenSignature("approval", entry.actor, entry.at_ms, entry.seq, member.public_key.key_id)
        )


def prove_commission(engine: Engine, ref: str, agency_id: str) -> CommissionProof | None:
    """Re-verify every signed step and approval of commission ``ref`` from the archive; None if there is no such
    commission. ``agency_id`` is this gateway's party id (the agency every step must name)."""
    staff = StaffRegister(engine, AuditLog(engine))  # only read here
    with reading(engine) as conn:
        row = conn.execute(
            select(schema.commissions.c.id, schema.commissions.c.exchange_digest).where(schema.commissions.c.ref == ref)
        ).first()
        if row is None:
            return None
        prover = _Prover(conn, staff, ref, agency_id)
        proof = prover.proof
        p, a = schema.procedure_steps.c, schema.approvals.c
        steps = {r.audit_seq: r for r in conn.execute(select(schema.procedure_steps).where(p.commission_id == row.id))}
        approvals = {r.staff_id: r for r in conn.execute(select(schema.approvals).where(a.commission_id == row.id))}
        for entry in _entries(conn, row.id):
            if not _entry_intact(entry):
                proof.problems.append(f"entry {entry.seq} ({entry.action}) was changed (hash mismatch)")
            if entry.action == "commission.submit":
                proof.from_lower_agency = entry.after == "intake_passed"  # Procedure III.(二)2: entered at review
            if entry.action.startswith("commission.") and entry.after is not None:
                proof.state = entry.after
            if entry.action in STEP_ACTIONS:
                prover.step(entry, steps)
            elif entry.action == APPROVAL_ACTION:
                prover.approval(entry, approvals)
    for leftover in steps.values():
        proof.problems.append(f"a signed {STEP_ROLES.get(leftover.kind, 'unknown')} step is named by no chain entry")
    for staff_id in approvals:
        proof.problems.append(f"an approval of {staff_id} is named by no chain entry")
    if len(prover.digests) > 1:
        proof.problems.append("the steps and approvals bind to different exchange digests: not one package")
    stored = bytes(row.exchange_digest or b"")
    if prover.digests and stored not in prover.digests:
        proof.problems.append("the commission's stored exchange digest is not the one its steps were signed over")
    if not proof.state:
        proof.notes.append("the chain holds no state change of this commission")
    return proof
