"""TLS of the gateway's calls to the units: its client credentials, and the check of each unit's server certificate
against the CA's revocation list (docs/keys.md, "Revocation list").

grpcio does not show a client the certificate its channel's server presented, so the check makes a TLS handshake of
its own (:func:`fetch_server_certificate`); the unit's client (gateway/exchange/transport.py) runs it before calls.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from common.tlsreload import CERTIFICATE_REVOKED, RevocationSource
from gateway.exchange.failures import TransportFailure
from keys.crl import RevocationList
from keys.tls import read_private_key

log = logging.getLogger("hedui.gateway.transport")


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
