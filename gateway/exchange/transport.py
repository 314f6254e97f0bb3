"""Calls to a sharing unit's connector: one channel per unit, deadlines, and what a failure means.

A failure is either *transient* (the unit is unreachable, slow, or cannot take the batch just now: retry later with
backoff) or a *refusal* (the unit looked at the batch and will never accept it as it is: an operator must act).
The connector's reason code decides where it has one (a status such as FAILED_PRECONDITION carries both kinds);
the gRPC status decides for a connector that sends none.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hedui.v1 import exchange_pb2, exchange_pb2_grpc

from common.errors import HeduiError
from common.logs import redact
from common.rpc import REFUSAL_REASON_KEY
from keys.live import MAX_ATTACHMENTS
from keys.tls import read_private_key
from keys.trustsync import ANNOUNCEMENTS_METADATA_KEY, MAX_METADATA_ANNOUNCEMENTS

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
PERMANENT_REASONS = frozenset({"no_authorisation", "batch_too_large"})


def is_transient(code: grpc.StatusCode | None, reason: str | None) -> bool:
    """Whether a call that failed with ``code`` and the unit's ``reason`` code may succeed later unchanged."""
    if reason in PERMANENT_REASONS:
        return False
    return code in _TRANSIENT


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
        self, status: str, message: str, reason: str | None = None, announcements: Sequence[bytes] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        #: The unit's reason code (e.g. ``calendar_year_unknown``) when it sent one.
        self.reason = reason
        #: With ``refresh_keys``: the unit's own key announcements it sent beside the refusal (keys/trustsync.py).
        self.announcements = tuple(announcements)


class UnitRefusal(HeduiError):
    """The unit refused the request for good (bad batch, staff not registered, batch id reused ...)."""

    code = "refused"

    def __init__(self, status: str, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        #: The unit's reason code (e.g. ``staff_not_registered``); None from a connector that sends none.
        self.reason = reason

    @property
    def summary(self) -> str:
        """What the batch row keeps (at most 64 characters): ``status: reason``, or ``status: message`` from a
        connector that sends no reason code."""
        return f"{self.status}: {self.reason or str(self)}"[:64]


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
        return bytes(self._rpc(method, exchange_pb2.SealedMessage(envelope=envelope)).envelope)

    def _rpc(
        self,
        method: grpc.UnaryUnaryMultiCallable[exchange_pb2.SealedMessage, exchange_pb2.SealedMessage],
        request: exchange_pb2.SealedMessage,
    ) -> exchange_pb2.SealedMessage:
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            details = public_detail((exc.details() if hasattr(exc, "details") else "") or "")
            name = code.name.lower() if code is not None else "unknown"
            reason = _reason(exc)
            if is_transient(code, reason):
                raise TransportFailure(name, details, reason, _announcements(exc)) from None
            raise UnitRefusal(name, details, reason) from None

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

    def sync_trust(self, envelope: bytes, announcements: Sequence[bytes]) -> tuple[bytes, list[bytes]]:
        """SyncTrust: our TrustSync envelope with our own key announcements beside it; the unit's TrustSync envelope
        and its announcements (docs/exchange.md, "Trust synchronisation")."""
        request = exchange_pb2.SealedMessage(envelope=envelope, key_announcements=list(announcements))
        reply = self._rpc(self.stub.SyncTrust, request)
        return bytes(reply.envelope), [bytes(a) for a in reply.key_announcements[:MAX_ATTACHMENTS]]

    def close(self) -> None:
        self.channel.close()


def _announcements(exc: grpc.RpcError) -> list[bytes]:
    """The key announcements a unit put beside a ``refresh_keys`` refusal (at most a few, each a small blob)."""
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    found = [
        bytes(item.value)
        for item in trailing or ()
        if item.key == ANNOUNCEMENTS_METADATA_KEY and isinstance(item.value, bytes)
    ]
    return found[:MAX_METADATA_ANNOUNCEMENTS]


def _reason(exc: grpc.RpcError) -> str | None:
    """The reason code the connector sent in the trailing metadata, if it is one."""
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for item in trailing or ():
        key, value = item.key, item.value
        if key == REFUSAL_REASON_KEY and isinstance(value, str) and _REASON_RE.fullmatch(value):
            return value
    return None
