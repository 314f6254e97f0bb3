"""Calls to a sharing unit's connector: one channel per unit, deadlines, and what a failure means.

A failure is either *transient* (the unit is unreachable, slow, or cannot take the batch just now: retry later with
backoff) or a *refusal* (the unit looked at the batch and will never accept it as it is: an operator must act).
The connector's reason code decides where it has one (a status such as FAILED_PRECONDITION carries both kinds);
the gRPC status decides for a connector that sends none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hedui.v1 import exchange_pb2, exchange_pb2_grpc

from common.errors import HeduiError
from common.logs import redact
from common.rpc import MAX_SIGNED_REFUSAL_BYTES, REFUSAL_REASON_KEY, REFUSAL_SIGNED_KEY
from keys.tls import read_private_key

MAX_MESSAGE_BYTES = 33 * 1024 * 1024
#: The service a health check asks about: the connector reports it SERVING while it takes exchange calls.
EXCHANGE_SERVICE = exchange_pb2.DESCRIPTOR.services_by_name["ExchangeService"].full_name

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
PERMANENT_REASONS = frozenset({"no_authorisation", "batch_too_large"}) | APPROVAL_REASONS
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

    def __init__(self, status: str, message: str, reason: str | None = None, signed: bytes | None = None) -> None:
        super().__init__(message)
        self.status = status
        #: The unit's reason code (e.g. ``calendar_year_unknown``) when it sent one.
        self.reason = reason
        #: The unit's signed refusal (a sealed trust.proto Refusal, not yet opened) when it sent one.
        self.signed = signed


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


@dataclass(frozen=True)
class ClientTls:
    """The gateway's client certificate and the CA of the connectors' server certificates."""

    cert: bytes
    key: bytes
    ca: bytes

    @classmethod
    def from_files(cls, cert: Path, key: Path, ca: Path) -> ClientTls:
        return cls(cert.read_bytes(), read_private_key(key), ca.read_bytes())


class UnitClient:
    """The ExchangeService of one unit."""

    def __init__(self, endpoint: str, tls: ClientTls | None, timeout_seconds: float) -> None:
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        if tls is None:
            self.channel = grpc.insecure_channel(endpoint, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert
            )
            self.channel = grpc.secure_channel(endpoint, credentials, options=options)
        self.stub = exchange_pb2_grpc.ExchangeServiceStub(self.channel)
        self.timeout = timeout_seconds

    def _call(
        self,
        method: grpc.UnaryUnaryMultiCallable[exchange_pb2.SealedMessage, exchange_pb2.SealedMessage],
        envelope: bytes,
    ) -> bytes:
        try:
            reply = method(exchange_pb2.SealedMessage(envelope=envelope), timeout=self.timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            details = public_detail((exc.details() if hasattr(exc, "details") else "") or "")
            name = code.name.lower() if code is not None else "unknown"
            reason, signed = _refusal(exc)
            if reason in DEFERRED_REASONS:
                raise UnitDeferral(name, details, reason, signed) from None
            if is_transient(code, reason):
                raise TransportFailure(name, details, reason, signed) from None
            raise UnitRefusal(name, details, reason, signed) from None
        return bytes(reply.envelope)

    def check_health(self) -> None:
        """Ask the connector's standard health service (grpc.health.v1) whether its exchange service is SERVING,
        over the same channel, so mutual TLS is checked both ways as for an exchange call. Raises TransportFailure
        when the call fails or the service is not SERVING (``not_serving``: the connector is shutting down)."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=EXCHANGE_SERVICE), timeout=self.timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            details = public_detail((exc.details() if hasattr(exc, "details") else "") or "")
            raise TransportFailure(code.name.lower() if code is not None else "unknown", details) from None
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise TransportFailure("not_serving", "the connector's exchange service is not serving")

    def submit(self, envelope: bytes) -> bytes:
        return self._call(self.stub.SubmitBatch, envelope)

    def fetch(self, envelope: bytes) -> bytes:
        return self._call(self.stub.FetchAnswers, envelope)

    def acknowledge(self, envelope: bytes) -> bytes:
        return self._call(self.stub.AcknowledgeAnswers, envelope)

    def close(self) -> None:
        self.channel.close()


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
