"""Signed procedure steps (Procedure V.(一): intake review, second review and report issue are done by three
different staff members).

A staff member signs each step they take with their registered staff key, as they sign an exchange approval::

    signature = Ed25519(staff key, "hedui.v1.procedure-step" || 0x00 || canonical ProcedureStep)

The ``ProcedureStep`` (protos/hedui/v1/agency.proto) names the agency (the gateway's party id), the commission, the
step (intake, review or report), whether it passed, the reason as sent, the staff member, the commission's
``exchange_digest`` (which binds the step to the package) and, for a report, the request's ``partial`` flag. The
gateway rebuilds the step from the request and from its own facts and verifies the signature before it records
anything; the report and the archive carry the step as ``SignedStep`` (canonical step bytes and signature), so that
anyone holding the staff members' public keys checks later who took which step. docs/agency-api.md, "Signed
procedure steps", is the specification; tests/vectors/steps_v1.json holds its test vectors.

This module is the one place that builds, signs, reads and checks steps, for the gateway, for the staff member's
side (``hedui-keys sign-step``) and for a report's reader (``hedui-keys verify-report``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeAlias

from hedui.v1 import agency_pb2, exchange_pb2

from keys import _canonical
from keys.errors import TrustError
from keys.handles import PublicKey, SigningKey
from keys.party import is_party_id
from keys.statements import EXCHANGE_DIGEST_BYTES, approval_message, staff_public_key

#: A StepKind value (STEP_KIND_INTAKE, STEP_KIND_REVIEW or STEP_KIND_REPORT).
StepKind: TypeAlias = agency_pb2.StepKind.ValueType

STEP_DOMAIN = b"hedui.v1.procedure-step\x00"
SIGNATURE_BYTES = 64
#: The staff role each step needs (the gateway's staff register names roles so).
STEP_ROLES: Mapping[StepKind, str] = {
    agency_pb2.STEP_KIND_INTAKE: "intake",
    agency_pb2.STEP_KIND_REVIEW: "review",
    agency_pb2.STEP_KIND_REPORT: "report",
}
#: Step kinds by the names commands take (``hedui-keys sign-step --step intake``).
STEP_KINDS: Mapping[str, StepKind] = {name: kind for kind, name in STEP_ROLES.items()}
#: Longer than any reason the gateway accepts (255 characters of up to 4 UTF-8 bytes each).
MAX_REASON_BYTES = 1024
MAX_COMMISSION_ID_LENGTH = 64
_STAFF_ID_RE = re.compile(r"[A-Za-z0-9-]{1,32}")
_COMMISSION_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_STAFF_KEY_LINE_RE = re.compile(r"([A-Za-z0-9-]{1,32})\s+([0-9a-fA-F]{64})")
MAX_STAFF_KEYS_BYTES = 1024 * 1024


def check_step(step: agency_pb2.ProcedureStep) -> agency_pb2.ProcedureStep:
    """Return ``step`` if it is a step anyone could sign, else raise ValueError saying which field is wrong.

    The agency is a party id, the commission id 1-64 of ``A-Z a-z 0-9 . _ -``, the step one of the three kinds, the
    staff id 1-32 of ``A-Z a-z 0-9 -``, the exchange digest 32 bytes. A step that does not pass carries a reason; a
    report step passes and carries no reason; only a report step may be partial.
    """
    if not is_party_id(step.agency):
        raise ValueError("agency must be the gateway's party id (e.g. agency.220100)")
    if not _COMMISSION_ID_RE.fullmatch(step.commission_id):
        raise ValueError("commission_id must be 1-64 characters of A-Z, a-z, 0-9, '.', '_' and '-'")
    if step.step not in STEP_ROLES:
        raise ValueError("step must be intake, review or report")
    if not _STAFF_ID_RE.fullmatch(step.staff_id):
        raise ValueError("staff_id must be 1-32 characters of A-Z, a-z, 0-9 and '-'")
    if len(step.exchange_digest) != EXCHANGE_DIGEST_BYTES:
        raise ValueError(f"exchange_digest must be {EXCHANGE_DIGEST_BYTES} bytes")
    if len(step.reason.encode("utf-8")) > MAX_REASON_BYTES:
        raise ValueError(f"reason must be at most {MAX_REASON_BYTES} bytes")
    if step.step == agency_pb2.STEP_KIND_REPORT:
        if not step.passed or step.reason:
            raise ValueError("a report step passes and carries no reason")
    else:
        if step.partial:
            raise ValueError("only a report step may be partial")
        if not step.passed and not step.reason:
            raise ValueError("a step that does not pass (a return or a termination) carries its reason")
    return step


def build_step(
    *,
    agency: str,
    commission_id: str,
    kind: StepKind,
    staff_id: str,
    exchange_digest: bytes,
    passed: bool = True,
    reason: str = "",
    partial: bool = False,
) -> agency_pb2.ProcedureStep:
    """The ProcedureStep with these fields, checked by :func:`check_step` (ValueError if it is not one)."""
    return check_step(
        agency_pb2.ProcedureStep(
            agency=agency,
            commission_id=commission_id,
            step=kind,
            passed=passed,
            reason=reason,
            staff_id=staff_id,
            exchange_digest=bytes(exchange_digest),
            partial=partial,
        )
    )


def step_bytes(step: agency_pb2.ProcedureStep) -> bytes:
    """The canonical encoding of ``step``: what is signed after the domain, and what SignedStep.step holds."""
    return _canonical.encode(step)


def procedure_step_message(step: agency_pb2.ProcedureStep) -> bytes:
    """The bytes a staff member signs for ``step``: "hedui.v1.procedure-step" || 0x00 || canonical step bytes.

    Raises ValueError for a step :func:`check_step` refuses."""
    return STEP_DOMAIN + step_bytes(check_step(step))


def step_digest(data: bytes) -> bytes:
    """SHA-256 of canonical step bytes: how the audit chain names a step."""
    return hashlib.sha256(data).digest()


def sign_step(step: agency_pb2.ProcedureStep, key: SigningKey) -> bytes:
    """The staff member's signature over ``step`` with their signing ``key``."""
    return key.sign(procedure_step_message(step))


def verify_step(step: agency_pb2.ProcedureStep, signature: bytes, public_key: PublicKey) -> bool:
    """True if ``signature`` is ``public_key``'s signature over ``step``; False for anything else (a malformed step
    or signature included)."""
    if len(signature) != SIGNATURE_BYTES:
        return False
    try:
        message = procedure_step_message(step)
    except ValueError:
        return False
    return public_key.verify(bytes(signature), message)


def read_step(data: bytes) -> agency_pb2.ProcedureStep:
    """The step in canonical ``data`` (SignedStep.step, a procedure_steps row); TrustError for anything else."""
    try:
        return check_step(_canonical.parse_canonical(agency_pb2.ProcedureStep, bytes(data)))
    except ValueError as exc:
        raise TrustError(f"not a canonical procedure step: {exc}") from exc


# -- what a report says about its signers ---------------------------------------------------------------------------


def read_staff_keys(text: str) -> dict[str, PublicKey]:
    """Staff members' public keys from text: one ``STAFF_ID HEX`` line per member (64 hex digits of the Ed25519 key),
    ``#`` comments and blank lines ignored, as ``hedui-gateway archive steps --export-keys`` writes it.

    Raises TrustError naming the line that is not one, a key that cannot be a signer's, or a staff id given twice.
    """
    keys: dict[str, PublicKey] = {}
    for number, line in enumerate(text.splitlines(), 1):
        content = line.split("#", 1)[0].strip()
        if not content:
            continue
        match = _STAFF_KEY_LINE_RE.fullmatch(content)
        if match is None:
            raise TrustError(f"staff keys line {number} is not 'STAFF_ID KEY' (64 hex digits)")
        staff_id, key_hex = match.groups()
        if staff_id in keys:
            raise TrustError(f"staff keys line {number}: {staff_id} is listed twice")
        try:
            keys[staff_id] = staff_public_key(bytes.fromhex(key_hex))
        except ValueError as exc:
            raise TrustError(f"staff keys line {number}: {exc}") from exc
    return keys


@dataclass(frozen=True)
class StepSigner:
    """One signer of a report's procedure: a step (``kind`` a StepKind) or an exchange approval (``kind`` None)."""

    kind: StepKind | None
    staff_id: str
    at_ms: int
    passed: bool = True
    #: True once the signature verified with the staff member's key; None when no key was given for them.
    verified: bool | None = None

    @property
    def label(self) -> str:
        """``intake``, ``review``, ``report`` or ``approval``."""
        return "approval" if self.kind is None else STEP_ROLES[self.kind]


@dataclass
class ReportSigners:
    """What :func:`check_report_signers` found in a report: who signed what, and what is wrong."""

    steps: list[StepSigner] = field(default_factory=list)
    approvals: list[StepSigner] = field(default_factory=list)
    #: The exchange digest every step binds to (empty when the report has no step).
    exchange_digest: bytes = b""
    problems: list[str] = field(default_factory=list)

    def step(self, kind: StepKind) -> StepSigner | None:
        """The signer of step ``kind``, if the report carries it."""
        return next((s for s in self.steps if s.kind == kind), None)

    @property
    def three_different_people(self) -> bool:
        """Procedure V.(一): intake, review and report issue carried, by three different staff ids."""
        ids = [s.staff_id for s in self.steps]
        return len(ids) == 3 and len(set(ids)) == 3

    @property
    def two_distinct_approvers(self) -> bool:
        """Procedure V.(二): at least two approvals, by distinct staff ids."""
        ids = [a.staff_id for a in self.approvals]
        return len(ids) >= 2 and len(set(ids)) == len(ids)

    @property
    def all_verified(self) -> bool:
        """Every step and approval verified with a key given for its staff member."""
        return all(s.verified for s in (*self.steps, *self.approvals))


def check_report_signers(report: agency_pb2.Report, staff_keys: Mapping[str, PublicKey] | None = None) -> ReportSigners:
    """Read the signed steps and approvals a report carries and check them against the report itself.

    Every step must be canonical, name the report's agency and commission, be one of intake / review / report at
    most once, and bind to the same exchange digest; the report step must name the report's issuer. With
    ``staff_keys`` (staff id -> registered public key) every step and approval whose staff member has a key there
    is verified: a step over its canonical bytes, an approval over the exchange digest the steps carry. The
    outcome lists problems rather than raising: a reader wants every finding at once.
    """
    found = ReportSigners()
    keys = staff_keys or {}
    digests: set[bytes] = set()
    for index, signed in enumerate(report.steps, 1):
        try:
            step = read_step(signed.step)
        except TrustError as exc:
            found.problems.append(f"step {index}: {exc}")
            continue
        name = STEP_ROLES[step.step]
        if step.agency != report.agency or step.commission_id != report.commission_id:
            found.problems.append(f"the {name} step is for {step.agency}/{step.commission_id}, not this report's")
        if found.step(step.step) is not None:
            found.problems.append(f"the report carries two {name} steps")
        if step.step == agency_pb2.STEP_KIND_REPORT and step.staff_id != report.issued_by:
            found.problems.append(f"the report step is signed by {step.staff_id}, the report names {report.issued_by}")
        digests.add(step.exchange_digest)
        verified = None
        if step.staff_id in keys:
            verified = verify_step(step, signed.signature, keys[step.staff_id])
            if not verified:
                found.problems.append(f"the {name} step's signature does not verify with {step.staff_id}'s key")
        found.steps.append(StepSigner(step.step, step.staff_id, signed.recorded_at_ms, step.passed, verified))
    if len(digests) > 1:
        found.problems.append("the steps bind to different exchange digests: they are not of one package")
    found.exchange_digest = next(iter(digests)) if len(digests) == 1 else b""
    found.steps.sort(key=lambda s: s.kind or 0)
    for approval in report.approvals:
        found.approvals.append(_approval(approval, found, keys))
    ids = [s.staff_id for s in found.steps]
    if len(set(ids)) != len(ids):
        found.problems.append("Procedure V.(一): one staff member signed more than one of intake, review and report")
    approvers = [a.staff_id for a in found.approvals]
    if len(set(approvers)) != len(approvers):
        found.problems.append("Procedure V.(二): one staff member approved the exchange twice")
    return found


def _approval(approval: exchange_pb2.StaffApproval, found: ReportSigners, keys: Mapping[str, PublicKey]) -> StepSigner:
    verified = None
    if approval.staff_id in keys and found.exchange_digest:
        verified = len(approval.signature) == SIGNATURE_BYTES and keys[approval.staff_id].verify(
            approval.signature, approval_message(found.exchange_digest)
        )
        if not verified:
            found.problems.append(f"the approval of {approval.staff_id} does not verify with their key")
    return StepSigner(None, approval.staff_id, approval.approved_at_ms, True, verified)


def staff_keys_text(members: Iterable[tuple[str, PublicKey]]) -> str:
    """The ``STAFF_ID HEX`` lines :func:`read_staff_keys` reads, with each key's fingerprint as a comment."""
    lines = ["# staff id, Ed25519 public key (hex); fingerprint in the comment"]
    for staff_id, key in members:
        lines.append(f"{staff_id} {key.raw.hex()}  # {key.fingerprint}")
    return "\n".join(lines) + "\n"
