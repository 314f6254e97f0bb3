"""A unit's own check of the agency's exchange approvals (docs/exchange.md, "Approvals a unit verifies").

Procedure V.(二) asks two staff members for every exchange, V.(三) that they be registered with the unit in
advance. A query batch carries the approvals of the agency's staff (signatures over the commission's approval root),
the unit's share of the approval trees and its subjects' leaves. The unit recomputes the root from what it received
(keys/approvals.py ``batch_root``), and checks every approval against the gateway's roster as the unit holds it, as
it was when the approval was given. It refuses the batch with the first failing check's reason code, in this order:

1. ``approval_missing``: no approval proof, or no approvals in it;
2. ``approval_proof_invalid``: the proof does not have the shape the batch needs (counts, indices, salts, hash
   lengths, hashes missing or left over), or ``staff_ids`` does not name exactly the approvers;
3. for each approval in turn: ``approver_duplicate`` (a staff id given twice), ``approval_time_invalid`` (approved
   after the envelope was made, or more than ``max_age_ms`` before it), ``approver_unknown`` /
   ``approver_not_yet_effective`` / ``approver_expired`` / ``approver_revoked`` (the roster in force at the
   approval's time), ``approver_not_exchange_staff`` (no exchange role), ``approver_duplicate`` (a key already
   used by another approver), ``approval_signature_invalid`` (the
   signature does not verify over the recomputed root: forged, made for another commission, or made over other
   content than the batch carries — a unit cannot tell these apart);
4. ``approvals_too_few``: fewer than two approvals (all of which passed).

Every failure is PERMISSION_DENIED except ``approval_missing`` and ``approval_proof_invalid`` (INVALID_ARGUMENT).

A unit that holds no roster of the gateway refuses with ``approver_unknown`` (the gateway retries: the roster may be
on its way). Only where the unit's operator allows unverified approvals during migration
(``[exchange] allow_unverified_approvals``) AND the unit holds no roster of that gateway at all is a batch (with or
without a proof) judged by the old rule instead: two or more staff ids listed in ``[[staff]]``. Once a roster of the
gateway is held, the old rule never applies: a batch without a proof is refused ``approval_missing``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from hedui.v1 import exchange_pb2

from connectors.errors import Refusal
from keys.approvals import ApprovalProofError, batch_root
from keys.clock import DAY_MS, MINUTE_MS
from keys.roster import RosterMember
from keys.statements import approval_message

APPROVAL_MISSING = "approval_missing"
APPROVAL_PROOF_INVALID = "approval_proof_invalid"
APPROVAL_SIGNATURE_INVALID = "approval_signature_invalid"
APPROVAL_TIME_INVALID = "approval_time_invalid"
APPROVER_UNKNOWN = "approver_unknown"
APPROVER_NOT_YET_EFFECTIVE = "approver_not_yet_effective"
APPROVER_EXPIRED = "approver_expired"
APPROVER_REVOKED = "approver_revoked"
APPROVER_NOT_EXCHANGE_STAFF = "approver_not_exchange_staff"
APPROVER_DUPLICATE = "approver_duplicate"
APPROVALS_TOO_FEW = "approvals_too_few"
#: Subjects (share indices of a commission) received before in another batch: approved subjects are queried once
#: (clause 16). Checked when the batch is stored (connectors/store.py ``batch_shares``), after every check here.
SUBJECT_ALREADY_QUERIED = "subject_already_queried"
#: The old rule's refusal (a batch judged by ``[[staff]]`` ids during migration).
STAFF_NOT_REGISTERED = "staff_not_registered"

#: Every reason code of this check, with its status.
REASONS: Mapping[str, grpc.StatusCode] = {
    APPROVAL_MISSING: grpc.StatusCode.INVALID_ARGUMENT,
    APPROVAL_PROOF_INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    APPROVAL_SIGNATURE_INVALID: grpc.StatusCode.PERMISSION_DENIED,
    APPROVAL_TIME_INVALID: grpc.StatusCode.PERMISSION_DENIED,
    APPROVER_UNKNOWN: grpc.StatusCode.PERMISSION_DENIED,
    APPROVER_NOT_YET_EFFECTIVE: grpc.StatusCode.PERMISSION_DENIED,
    APPROVER_EXPIRED: grpc.StatusCode.PERMISSION_DENIED,
    APPROVER_REVOKED: grpc.StatusCode.PERMISSION_DENIED,
    APPROVER_NOT_EXCHANGE_STAFF: grpc.StatusCode.PERMISSION_DENIED,
    APPROVER_DUPLICATE: grpc.StatusCode.PERMISSION_DENIED,
    APPROVALS_TOO_FEW: grpc.StatusCode.PERMISSION_DENIED,
    STAFF_NOT_REGISTERED: grpc.StatusCode.PERMISSION_DENIED,
    SUBJECT_ALREADY_QUERIED: grpc.StatusCode.PERMISSION_DENIED,
}
#: What a roster says of a staff member who may not act at a moment (keys/roster.py RosterHistory.member_at).
ROSTER_REASONS = frozenset({APPROVER_UNKNOWN, APPROVER_NOT_YET_EFFECTIVE, APPROVER_EXPIRED, APPROVER_REVOKED})

MIN_APPROVALS = 2  # Procedure V.(二): an exchange needs at least two staff members
EXCHANGE_ROLE = "exchange"
_STAFF_ID_RE = re.compile(r"[A-Za-z0-9-]{1,32}")


class ApproverHistory(Protocol):
    """A gateway's roster history as the unit holds it (keys.roster.RosterHistory)."""

    def member_at(self, staff_id: str, at_ms: int) -> tuple[RosterMember | None, str | None]:
        """The member ``staff_id`` as the roster in force at ``at_ms`` lists them, if they could act then; else
        None and the reason: approver_unknown, approver_not_yet_effective, approver_expired or approver_revoked."""
        ...

    def in_force(self, at_ms: int) -> object | None:
        """The roster version in force at ``at_ms`` (None before the first one takes effect)."""
        ...


class GatewayRosters(Protocol):
    """The gateways' rosters the unit holds (connectors.trust.rosters.PeerRosters)."""

    def history(self, gateway_party: str) -> ApproverHistory | None:
        """The roster history of ``gateway_party``; None while the unit holds no roster of it."""
        ...


class NoRosters:
    """A unit that holds no gateway's roster: every approval is of an unknown approver (or, where the operator
    allows it during migration, judged by ``[[staff]]`` ids)."""

    def history(self, gateway_party: str) -> ApproverHistory | None:
        return None


def refusal(reason: str, message: str, detail: str = "") -> Refusal:
    """The refusal with ``reason``'s status; ``detail`` (a staff id, never personal data) travels signed."""
    return Refusal(REASONS[reason], message, reason, detail=detail)


@dataclass(frozen=True)
class Verdict:
    """A batch's approvals that passed: the approvers' staff ids, and whether their signatures were verified (False
    only for a batch judged by the migration rule)."""

    staff_ids: tuple[str, ...]
    verified: bool


@dataclass(frozen=True)
class ApprovalCheck:
    """The unit's rule for a batch's approvals (see the module docstring for the order of checks)."""

    rosters: GatewayRosters = field(default_factory=NoRosters)
    #: ``[[staff]]``: gateway party id -> staff ids registered by hand (the migration rule only).
    legacy_staff: Mapping[str, frozenset[str]] = field(default_factory=dict)
    #: Migration only: judge a batch by ``legacy_staff`` while the unit holds no roster of its gateway (never once
    #: one is held: then a batch without an approval proof is refused ``approval_missing``).
    allow_unverified: bool = False
    #: Slack between the gateway's clock at approval and at sealing (both the gateway's).
    clock_skew_ms: int = 5 * MINUTE_MS
    #: ``[exchange] approval_max_age_days``: an approval given longer than this before the envelope was made is
    #: refused, so a key revoked since cannot date approvals before its revocation without limit.
    max_age_ms: int = 45 * DAY_MS

    def check(self, batch: exchange_pb2.QueryBatch, *, gateway: str, unit: str, created_at_ms: int) -> Verdict:
        """The approvers of ``batch`` (sent by ``gateway`` to ``unit`` in an envelope made at ``created_at_ms``), or
        the Refusal of the first check that fails."""
        history = self.rosters.history(gateway)
        has_proof = batch.HasField("approval")
        if self.allow_unverified and history is None:
            # Only while no roster of this gateway is held: once one is, every batch must carry approvals that
            # verify against it (a batch stripped of its proof must not fall back to the unsigned rule).
            return self._legacy(batch, gateway, unit, check_proof=has_proof)
        if not has_proof or not batch.approval.approvals:
            raise refusal(APPROVAL_MISSING, "the batch carries no exchange approvals (Procedure V.(二))")
        root = self._root(batch, gateway, unit)
        approvals = batch.approval.approvals
        if sorted(batch.staff_ids) != sorted(a.staff_id for a in approvals):
            raise refusal(APPROVAL_PROOF_INVALID, "staff_ids do not name exactly the staff who approved")
        seen_ids: set[str] = set()
        seen_keys: set[bytes] = set()
        unverified = False
        message = approval_message(root)
        for approval in approvals:
            staff_id = approval.staff_id
            shown = staff_id if _STAFF_ID_RE.fullmatch(staff_id) else "-"
            if staff_id in seen_ids:
                raise refusal(APPROVER_DUPLICATE, f"staff member {shown} approved twice", shown)
            seen_ids.add(staff_id)
            if not 0 < approval.approved_at_ms <= created_at_ms + self.clock_skew_ms:
                raise refusal(
                    APPROVAL_TIME_INVALID, f"the approval of {shown} is dated after the batch was sent", shown
                )
            if approval.approved_at_ms < created_at_ms - self.max_age_ms:
                raise refusal(
                    APPROVAL_TIME_INVALID,
                    f"the approval of {shown} was given more than {self.max_age_ms // DAY_MS} days before the batch "
                    "was sent",
                    shown,
                )
            if history is None:
                raise refusal(
                    APPROVER_UNKNOWN, f"this unit holds no roster of {gateway} to check {shown} against", shown
                )
            if self.allow_unverified and history.in_force(approval.approved_at_ms) is None:
                # Migration: the gateway's roster is held but was not in force yet when this approval was given
                # (its first version waits out its notice), so nothing can verify the signature; the approver
                # must be in [[staff]], as before rosters. The proof itself was checked above.
                if staff_id not in self.legacy_staff.get(gateway, frozenset()):
                    raise refusal(
                        STAFF_NOT_REGISTERED,
                        f"staff member {shown} approved before the gateway's roster was in force and is not in "
                        "[[staff]]",
                        shown,
                    )
                unverified = True
                continue
            member, reason = history.member_at(staff_id, approval.approved_at_ms)
            if member is None or reason is not None:
                code = reason if reason in ROSTER_REASONS else APPROVER_UNKNOWN
                raise refusal(code, f"staff member {shown} could not approve then: {code}", shown)
            if EXCHANGE_ROLE not in member.roles:
                raise refusal(
                    APPROVER_NOT_EXCHANGE_STAFF, f"staff member {shown} is not registered for exchange", shown
                )
            key = member.public_key.raw
            if key in seen_keys:
                raise refusal(APPROVER_DUPLICATE, f"staff member {shown} holds another approver's key", shown)
            seen_keys.add(key)
            if not member.public_key.verify(bytes(approval.signature), message):
                raise refusal(
                    APPROVAL_SIGNATURE_INVALID,
                    f"the approval of {shown} does not verify over this batch's approval root",
                    shown,
                )
        if len(seen_ids) < MIN_APPROVALS:
            raise refusal(
                APPROVALS_TOO_FEW,
                f"an exchange needs at least {MIN_APPROVALS} approvals, the batch has {len(seen_ids)}",
            )
        return Verdict(tuple(a.staff_id for a in approvals), verified=not unverified)

    @staticmethod
    def _root(batch: exchange_pb2.QueryBatch, gateway: str, unit: str) -> bytes:
        try:
            return batch_root(gateway, unit, batch)
        except ApprovalProofError as exc:
            raise refusal(APPROVAL_PROOF_INVALID, f"approval proof: {exc}") from exc

    def _legacy(self, batch: exchange_pb2.QueryBatch, gateway: str, unit: str, *, check_proof: bool) -> Verdict:
        """The migration rule: two or more staff ids, all in ``[[staff]]``. A proof the batch carries must still
        have its shape (it costs nothing, and a malformed one is a gateway fault worth seeing)."""
        if check_proof:
            self._root(batch, gateway, unit)
        staff = set(batch.staff_ids) | {a.staff_id for a in batch.approval.approvals}
        registered = self.legacy_staff.get(gateway, frozenset())
        if len(staff) < MIN_APPROVALS or not staff <= registered:
            # Procedure V.(二) and V.(三): two or more staff members, registered with us in advance.
            raise refusal(
                STAFF_NOT_REGISTERED,
                "an exchange needs at least two staff members registered with this unit in advance",
            )
        return Verdict(tuple(sorted(staff)), verified=False)
