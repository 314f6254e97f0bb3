"""Calls to a sharing unit's connector: one channel per unit, deadlines, and what a failure means.

What a failed call means (transient, a refusal, a deferral) is decided in gateway/exchange/failures.py; the TLS of
the calls (client credentials, the check of the unit's server certificate against the revocation list) is in
gateway/exchange/tls.py. Both are named here too, as the unit's client is what the rest of the gateway imports.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hedui.v1 import exchange_pb2, exchange_pb2_grpc

from common.tlsreload import CertificateSource, RevocationSource
from gateway.exchange.failures import (
    APPROVAL_REASONS,
    DEFERRED_REASONS,
    DETAIL_CHARS,
    KNOWN_REASONS,
    PERMANENT_REASONS,
    TransportFailure,
    UnitDeferral,
    UnitRefusal,
    call_failure,
    is_transient,
    public_detail,
    reason_label,
    unreachable,
)
from gateway.exchange.tls import SERVER_CHECK_SECONDS, ClientTls, ServerCertificateCheck, fetch_server_certificate
from keys.live import MAX_ATTACHMENTS

if TYPE_CHECKING:
    _Method = grpc.UnaryUnaryMultiCallable[exchange_pb2.SealedMessage, exchange_pb2.SealedMessage]

__all__ = [
    "APPROVAL_REASONS",
    "DEFERRED_REASONS",
    "DETAIL_CHARS",
    "EXCHANGE_SERVICE",
    "KNOWN_REASONS",
    "MAX_MESSAGE_BYTES",
    "PERMANENT_REASONS",
    "SERVER_CHECK_SECONDS",
    "ClientTls",
    "ServerCertificateCheck",
    "TransportFailure",
    "UnitClient",
    "UnitDeferral",
    "UnitRefusal",
    "fetch_server_certificate",
    "is_transient",
    "public_detail",
    "reason_label",
]

MAX_MESSAGE_BYTES = 33 * 1024 * 1024
#: The service a health check asks about: the connector reports it SERVING while it takes exchange calls.
EXCHANGE_SERVICE = exchange_pb2.DESCRIPTOR.services_by_name["ExchangeService"].full_name


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
            raise call_failure(exc) from None

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
            raise unreachable(exc) from None
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
