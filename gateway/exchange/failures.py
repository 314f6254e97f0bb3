"""What a failed call to a unit's connector means, from its gRPC status and the reason code it sent.

A failure is either *transient* (the unit is unreachable, slow, or cannot take the batch just now: retry later with
backoff) or a *refusal* (the unit looked at the batch and will never accept it as it is: an operator must act).
The connector's reason code decides where it has one (a status such as FAILED_PRECONDITION carries both kinds);
the gRPC status decides for a connector that sends none. A refusal the unit expects to pass by itself is a
*deferral* (DEFERRED_REASONS). The reason code, the unit's signed refusal and its key announcements travel in the
call's trailing metadata (docs/exchange.md, "Refusals").
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import grpc

from common.errors import HeduiError
from common.logs import redact
from common.rpc import MAX_SIGNED_REFUSAL_BYTES, REFUSAL_REASON_KEY, REFUSAL_SIGNED_KEY
from keys.trustsync import ANNOUNCEMENTS_METADATA_KEY, MAX_METADATA_ANNOUNCEMENTS

#: Status codes after which the same batch may succeed later (unless the reason code says otherwise).
_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
    # Expired or not-yet-valid envelope (clock skew), unknown calendar year at a connector older than issue 10
    # (newer ones receipt with a provisional due date): fixable at their end
    # or by a fresh envelope, so retried with backoff.
    grpc.StatusCode.FAILED_PRECONDITION,
    # Our key not (yet) known at the unit, e.g. a rotation announcement not applied there yet.
    grpc.StatusCode.UNAUTHENTICATED,
}
#: Reason codes that refuse a batch for good although their status is in _TRANSIENT: ``no_authorisation``
#: (FAILED_PRECONDITION: no subject carries an authorisation, the same batch is refused every time) and
#: ``batch_too_large`` (RESOURCE_EXHAUSTED: more subjects than the unit's max_subjects_per_batch). The other
#: FAILED_PRECONDITION causes (``calendar_year_unknown``, an envelope expired in flight: ``invalid_envelope``) and
#: RESOURCE_EXHAUSTED without a code (gRPC's own limits) stay transient.
#: The unit's check of the exchange approvals (docs/exchange.md, "Approvals a unit verifies"): a proof, a signature
#: or an approver that does not pass stays so whatever is retried (the approvals are judged at the time they were
#: given), so the batch fails and waits for an operator. Listed here whatever status a connector sends them with.
APPROVAL_REASONS = frozenset(
    {
        "approval_missing",
        "approval_proof_invalid",
        "approval_signature_invalid",
        "approval_time_invalid",
        "approver_not_yet_effective",
        "approver_expired",
        "approver_revoked",
        "approver_not_exchange_staff",
        "approver_duplicate",
        "approvals_too_few",
    }
)
#: ``subject_already_queried``: the unit received some of the batch's subjects before in another batch (clause 16:
#: approved subjects are queried once); sending the same batch again changes nothing.
PERMANENT_REASONS = frozenset({"no_authorisation", "batch_too_large", "subject_already_queried"}) | APPROVAL_REASONS
#: Refusals of one batch that a change at the unit may cure without anyone touching the batch: ``approver_unknown``
#: (the unit does not hold our roster, or not the version that names the approver, yet: rosters travel by
#: SyncTrust). The batch is tried again with its own backoff; the unit is not backed off, as it answers.
DEFERRED_REASONS = frozenset({"approver_unknown"})
#: Every reason code a connector sends (docs/exchange.md, "Refusals"): the values of the reason label of
#: hedui_unit_refusals_total; any other code is counted as "other", none as "unspecified".
KNOWN_REASONS = (
    APPROVAL_REASONS
    | DEFERRED_REASONS
    | PERMANENT_REASONS
    | {
        "invalid_envelope",
        "tls_mismatch",
        "no_tls_identity",
        "unknown_party",
        "undecodable",
        "bad_batch_id",
        "bad_commission_ref",
        "no_purpose",
        "empty_batch",
        "bad_categories",
        "category_not_served",
        "threshold_missing",
        "bad_period",
        "bad_subject_ref",
        "field_too_long",
        "batch_id_reused",
        "staff_not_registered",
        "calendar_year_unknown",
        "database_unavailable",
        "bad_fetch",
        "bad_ack",
        "refresh_keys",
    }
)


def is_transient(code: grpc.StatusCode | None, reason: str | None) -> bool:
    """Whether a call that failed with ``code`` and the unit's ``reason`` code may succeed later unchanged."""
    if reason in PERMANENT_REASONS or reason in DEFERRED_REASONS:
        return False
    return code in _TRANSIENT


def reason_label(reason: str | None) -> str:
    """A unit's reason code as a metric label: from KNOWN_REASONS, else ``other`` (``unspecified`` for none)."""
    if reason is None:
        return "unspecified"
    return reason if reason in KNOWN_REASONS else "other"


#: A reason code as connectors send it (``staff_not_registered``); anything else from the peer is dropped.
_REASON_RE = re.compile(r"[a-z][a-z0-9_]{0,39}")
#: Characters of a unit's status message kept for logs and the batch row.
DETAIL_CHARS = 120
_UNSAFE_RE = re.compile(r"[^ -~]+|[0-9]{6,}")


def public_detail(text: str) -> str:
    """A unit's status message made fit for logs and the database: printable ASCII only (names are written in CJK
    characters), long digit runs (ID numbers, account numbers) replaced, at most DETAIL_CHARS characters. A connector
    never puts personal data there (docs/exchange.md); this is the second line of defence for a peer that does."""
    return _UNSAFE_RE.sub("?", redact(text)).strip()[:DETAIL_CHARS]


class TransportFailure(HeduiError):
    """The call did not produce an answer; try again later."""

    code = "transport"

    def __init__(
        self,
        status: str,
        message: str,
        reason: str | None = None,
        signed: bytes | None = None,
        announcements: Sequence[bytes] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        #: The unit's reason code (e.g. ``calendar_year_unknown``) when it sent one.
        self.reason = reason
        #: The unit's signed refusal (a sealed trust.proto Refusal, not yet opened) when it sent one.
        self.signed = signed
        #: With ``refresh_keys``: the unit's own key announcements it sent beside the refusal (keys/trustsync.py).
        self.announcements = tuple(announcements)


class UnitRefusal(HeduiError):
    """The unit refused the request for good (bad batch, approvals that do not verify, batch id reused ...)."""

    code = "refused"

    def __init__(self, status: str, message: str, reason: str | None = None, signed: bytes | None = None) -> None:
        super().__init__(message)
        self.status = status
        #: The unit's reason code (e.g. ``approval_signature_invalid``); None from a connector that sends none.
        self.reason = reason
        #: The unit's signed refusal (a sealed trust.proto Refusal, not yet opened: the engine checks it) when it
        #: sent one (docs/exchange.md, "Signed refusals").
        self.signed = signed

    @property
    def summary(self) -> str:
        """What the batch row keeps (at most 64 characters): ``status: reason``, or ``status: message`` from a
        connector that sends no reason code."""
        return f"{self.status}: {self.reason or str(self)}"[:64]


class UnitDeferral(UnitRefusal):
    """The unit refused the batch for a reason that may pass later without anyone touching the batch
    (DEFERRED_REASONS): the batch is sent again after its own backoff."""

    code = "deferred"


def call_failure(exc: grpc.RpcError) -> TransportFailure | UnitRefusal:
    """What an exchange call that failed with ``exc`` means: a deferral, a transient failure (with the unit's key
    announcements when it sent them), or a refusal for good; each with the unit's reason code and signed refusal
    when it sent them."""
    code, name, details = _status(exc)
    reason, signed = _refusal(exc)
    if reason in DEFERRED_REASONS:
        return UnitDeferral(name, details, reason, signed)
    if is_transient(code, reason):
        return TransportFailure(name, details, reason, signed, _announcements(exc))
    return UnitRefusal(name, details, reason, signed)


def unreachable(exc: grpc.RpcError) -> TransportFailure:
    """A failed call that is never a refusal (the health check): its status and public detail only."""
    _, name, details = _status(exc)
    return TransportFailure(name, details)


def _status(exc: grpc.RpcError) -> tuple[grpc.StatusCode | None, str, str]:
    """The call's status code, its name as recorded (``unavailable``), and the unit's message made public."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = public_detail((exc.details() if hasattr(exc, "details") else "") or "")
    return code, code.name.lower() if code is not None else "unknown", details


def _announcements(exc: grpc.RpcError) -> list[bytes]:
    """The key announcements a unit put beside a ``refresh_keys`` refusal (at most a few, each a small blob)."""
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    found = [
        bytes(item.value)
        for item in trailing or ()
        if item.key == ANNOUNCEMENTS_METADATA_KEY and isinstance(item.value, bytes)
    ]
    return found[:MAX_METADATA_ANNOUNCEMENTS]


def _refusal(exc: grpc.RpcError) -> tuple[str | None, bytes | None]:
    """The reason code the connector sent in the trailing metadata, if it is one, and its signed refusal, if it sent
    one of a plausible size (opened and checked by the engine)."""
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    reason = signed = None
    for item in trailing or ():
        key, value = item.key, item.value
        if key == REFUSAL_REASON_KEY and isinstance(value, str) and _REASON_RE.fullmatch(value):
            reason = value
        elif key == REFUSAL_SIGNED_KEY and isinstance(value, bytes) and len(value) <= MAX_SIGNED_REFUSAL_BYTES:
            signed = value
    return reason, signed
