"""Calls to a sharing unit's connector: one channel per unit, deadlines, and what a failure means.

A failure is either *transient* (the unit is unreachable, slow, or cannot take the batch just now: retry later with
backoff) or a *refusal* (the unit looked at the batch and will never accept it as it is: an operator must act).
The connector's reason code decides where it has one (a status such as FAILED_PRECONDITION carries both kinds);
the gRPC status decides for a connector that sends none.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hedui.v1 import exchange_pb2, exchange_pb2_grpc

from common.errors import HeduiError
from common.logs import redact
from common.rpc import MAX_SIGNED_REFUSAL_BYTES, REFUSAL_REASON_KEY, REFUSAL_SIGNED_KEY
from common.tlsreload import CERTIFICATE_REVOKED, CertificateSource, RevocationSource
from keys.crl import RevocationList
from keys.live import MAX_ATTACHMENTS
from keys.tls import read_private_key
from keys.trustsync import ANNOUNCEMENTS_METADATA_KEY, MAX_METADATA_ANNOUNCEMENTS

log = logging.getLogger("hedui.gateway.transport")
if TYPE_CHECKING:
    _Method = grpc.UnaryUnaryMultiCallable[exchange_pb2.SealedMessage, exchange_pb2.SealedMessage]

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


@dataclass(frozen=True)
class ClientTls:
    """The gateway's client certificate and the CA of the connectors' server certificates."""

    cert: bytes
    key: bytes
    ca: bytes

    @classmethod
    def from_files(cls, cert: Path, key: Path, ca: Path) -> ClientTls:
        return cls(cert.read_bytes(), read_private_key(key), ca.read_bytes())


#: How long a unit's server certificate, once checked against the revocation list, is believed without a new look.
SERVER_CHECK_SECONDS = 300.0


class _Channel:
    """One channel to a unit and the calls under way on it: a channel replaced (renewed client certificate) is
    closed when its last call ends, so that no call fails because of the renewal."""

    def __init__(self, endpoint: str, tls: ClientTls | None) -> None:
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
        self.calls = 0
        self.retired = False


class UnitClient:
    """The ExchangeService of one unit.

    ``tls`` is fixed client credentials (:class:`ClientTls`), a :class:`~common.tlsreload.CertificateSource` that
    follows renewed files (a new channel is made for the calls after a renewal; the old one closes once its calls
    ended), or None for plaintext (loopback tests). With ``revocations`` holding a list, the unit's server
    certificate is checked against it before calls (:class:`ServerCertificateCheck`): a revoked one makes every call
    fail with reason ``certificate_revoked`` without reaching the unit.
    """

    def __init__(
        self,
        endpoint: str,
        tls: ClientTls | CertificateSource | None,
        timeout_seconds: float,
        *,
        revocations: RevocationSource | None = None,
        on_revoked: Callable[[], None] | None = None,
        recheck_seconds: float = SERVER_CHECK_SECONDS,
    ) -> None:
        self.endpoint = endpoint
        self.timeout = timeout_seconds
        self._source = tls if isinstance(tls, CertificateSource) else None
        self._fixed = tls if isinstance(tls, ClientTls) else None
        self._lock = threading.Lock()
        self._generation = self._source.generation if self._source is not None else 0
        self._current = _Channel(endpoint, self._tls())
        self.server_check = (
            ServerCertificateCheck(
                endpoint, revocations, timeout_seconds, on_revoked=on_revoked, recheck_seconds=recheck_seconds
            )
            if revocations is not None and tls is not None
            else None
        )

    def _tls(self) -> ClientTls | None:
        if self._source is not None:
            identity = self._source.identity
            return ClientTls(identity.cert_pem, identity.key_pem, identity.ca_pem)
        return self._fixed

    @property
    def channel(self) -> grpc.Channel:
        """The channel new calls use."""
        return self._current.channel

    @property
    def stub(self) -> exchange_pb2_grpc.ExchangeServiceStub:
        return self._current.stub

    @contextmanager
    def _channel(self) -> Iterator[_Channel]:
        """The channel for one call: rebuilt first when the client certificate was renewed, and the unit's server
        certificate checked against the revocation list when that is due."""
        if self._source is not None:
            self._source.refresh()
        with self._lock:
            if self._source is not None and self._source.generation != self._generation:
                old, self._current = self._current, _Channel(self.endpoint, self._tls())
                self._generation = self._source.generation
                old.retired = True
                if old.calls == 0:
                    old.channel.close()
            current = self._current
            current.calls += 1
        try:
            if self.server_check is not None:
                tls = self._tls()
                assert tls is not None
                self.server_check.require(tls, self._generation)
            yield current
        finally:
            with self._lock:
                current.calls -= 1
                if current.retired and current.calls == 0:
                    current.channel.close()

    def _call(self, method: Callable[[exchange_pb2_grpc.ExchangeServiceStub], _Method], envelope: bytes) -> bytes:
        return bytes(self._rpc(method, exchange_pb2.SealedMessage(envelope=envelope)).envelope)

    def _rpc(
        self, method: Callable[[exchange_pb2_grpc.ExchangeServiceStub], _Method], request: exchange_pb2.SealedMessage
    ) -> exchange_pb2.SealedMessage:
        try:
            with self._channel() as current:
                return method(current.stub)(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            details = public_detail((exc.details() if hasattr(exc, "details") else "") or "")
            name = code.name.lower() if code is not None else "unknown"
            reason, signed = _refusal(exc)
            if reason in DEFERRED_REASONS:
                raise UnitDeferral(name, details, reason, signed) from None
            if is_transient(code, reason):
                raise TransportFailure(name, details, reason, signed, _announcements(exc)) from None
            raise UnitRefusal(name, details, reason, signed) from None

    def check_health(self) -> None:
        """Ask the connector's standard health service (grpc.health.v1) whether its exchange service is SERVING,
        over the same channel, so mutual TLS is checked both ways as for an exchange call (and the unit's server
        certificate against the revocation list). Raises TransportFailure when the call fails or the service is not
        SERVING (``not_serving``: the connector is shutting down)."""
        try:
            with self._channel() as current:
                stub = health_pb2_grpc.HealthStub(current.channel)
                reply = stub.Check(health_pb2.HealthCheckRequest(service=EXCHANGE_SERVICE), timeout=self.timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            details = public_detail((exc.details() if hasattr(exc, "details") else "") or "")
            raise TransportFailure(code.name.lower() if code is not None else "unknown", details) from None
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise TransportFailure("not_serving", "the connector's exchange service is not serving")

    def submit(self, envelope: bytes) -> bytes:
        return self._call(lambda stub: stub.SubmitBatch, envelope)

    def fetch(self, envelope: bytes) -> bytes:
        return self._call(lambda stub: stub.FetchAnswers, envelope)

    def acknowledge(self, envelope: bytes) -> bytes:
        return self._call(lambda stub: stub.AcknowledgeAnswers, envelope)

    def sync_trust(self, envelope: bytes, announcements: Sequence[bytes]) -> tuple[bytes, list[bytes]]:
        """SyncTrust: our TrustSync envelope with our own key announcements beside it; the unit's TrustSync envelope
        and its announcements (docs/exchange.md, "Trust synchronisation")."""
        request = exchange_pb2.SealedMessage(envelope=envelope, key_announcements=list(announcements))
        reply = self._rpc(lambda stub: stub.SyncTrust, request)
        return bytes(reply.envelope), [bytes(a) for a in reply.key_announcements[:MAX_ATTACHMENTS]]

    def close(self) -> None:
        with self._lock:
            self._current.retired = True
            if self._current.calls == 0:
                self._current.channel.close()


@dataclass(frozen=True)
class _Verdict:
    key: tuple[bytes, int]
    revoked: bool
    at: float
    serial: int


def _load_client_certificate(context: ssl.SSLContext, tls: ClientTls) -> None:
    """Give ``context`` the client certificate and key held in memory: Python's ssl reads them only from a path,
    so they go into an anonymous memory file (memfd, never on disk) named by /proc/self/fd."""
    fd = os.memfd_create("hedui-client-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, tls.key + b"\n" + tls.cert)
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def fetch_server_certificate(endpoint: str, tls: ClientTls, timeout_seconds: float) -> bytes:
    """The DER certificate the server at ``endpoint`` presents, over a TLS handshake made as grpc makes it: TLS 1.2+,
    ALPN h2, the CA as only root, the host name checked, our client certificate presented. Raises OSError
    (ssl.SSLError for a handshake that fails)."""
    host, _, port = endpoint.rpartition(":")
    host = host.strip("[]")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cadata=tls.ca.decode("ascii", "replace"))
    _load_client_certificate(context, tls)
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port)), timeout=timeout_seconds) as raw,
        context.wrap_socket(raw, server_hostname=host) as wrapped,
    ):
        der = wrapped.getpeercert(binary_form=True)
    if not der:
        raise ssl.SSLError("the server presented no certificate")
    return der


class ServerCertificateCheck:
    """The unit's server certificate, checked against the CA's revocation list.

    grpcio does not show a client the certificate its channel's server presented, so the gateway looks itself: a
    TLS handshake of its own to the unit's endpoint (:func:`fetch_server_certificate`) fetches the certificate and
    the revocation list judges it. It is done before the first call, again whenever the list or the gateway's client
    certificate changed, and at least every ``recheck_seconds``. Fail-closed: until a check has succeeded, calls
    fail (a unit whose gRPC port answers answers this handshake too); a revoked certificate makes every call fail
    with reason ``certificate_revoked`` without reaching the unit, until the unit presents another certificate.
    With no list held nothing is checked.
    """

    def __init__(
        self,
        endpoint: str,
        revocations: RevocationSource,
        timeout_seconds: float,
        *,
        on_revoked: Callable[[], None] | None = None,
        recheck_seconds: float = SERVER_CHECK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.endpoint = endpoint
        self.revocations = revocations
        self.timeout = timeout_seconds
        self.on_revoked = on_revoked
        self.recheck_seconds = recheck_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._verdict: _Verdict | None = None

    @property
    def serial(self) -> int | None:
        """The serial of the server certificate last checked (None before the first check)."""
        verdict = self._verdict
        return None if verdict is None else verdict.serial

    def require(self, tls: ClientTls, generation: int) -> None:
        """Return when the unit's server certificate is not revoked; raise TransportFailure otherwise."""
        held = self.revocations.held
        if held is None:
            return
        key = (self.revocations.digest, generation)
        with self._lock:
            verdict = self._verdict
            if verdict is None or verdict.key != key or self.clock() - verdict.at >= self.recheck_seconds:
                verdict = self._check(tls, key, held)
        if verdict.revoked:
            raise TransportFailure(
                "unavailable", "the unit's server certificate is revoked by the CA", CERTIFICATE_REVOKED
            )

    def _check(self, tls: ClientTls, key: tuple[bytes, int], held: RevocationList) -> _Verdict:
        self._verdict = None
        try:
            der = fetch_server_certificate(self.endpoint, tls, self.timeout)
        except ssl.SSLError:
            raise TransportFailure(
                "unavailable", "TLS handshake with the unit failed", "server_certificate_unchecked"
            ) from None
        except (OSError, ValueError, UnicodeError):
            raise TransportFailure("unavailable", "the unit cannot be reached") from None
        cert = x509.load_der_x509_certificate(der)
        verdict = _Verdict(key, self.revocations.revokes(cert), self.clock(), cert.serial_number)
        if verdict.revoked:
            log.warning(
                "unit presents a revoked TLS certificate; not calling it",
                extra={"endpoint": self.endpoint, "serial": format(cert.serial_number, "x"), "crl": held.number},
            )
            if self.on_revoked is not None:
                self.on_revoked()
        self._verdict = verdict
        return verdict


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
