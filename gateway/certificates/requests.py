"""The units' certificate requests at the gateway, and the certificates the agency's CA issues for them.

A unit renews its TLS server certificate with a key it makes itself (connectors/trust/renewal.py) and sends the
gateway a PKCS#10 request as a CERTIFICATE_REQUEST trust item. :class:`CertificateRequests` is that item's handler:
it checks the request (keys/csr.py ``parse_request``: readable, self-signature valid, ECDSA P-256, names its party
once) and the gateway's policy for the sender (:class:`NamePolicy`: the party is the sender; the usages, and the
names unless they are all configured ones, are those of the unit's current certificate; a new key), and keeps it as
``pending``; a refusal stores nothing and returns the reason code the unit sees in its receipt.

The agency's operator then signs the pending requests where the CA key is (``hedui-gateway tls sign-requests
--ca-dir DIR``; for a CA on an offline machine, ``tls export-requests`` and ``tls import-certificates`` carry the
public requests and certificates between the agency's own machines). Each certificate is checked again like the unit
will check it, stored with its request, audited, and queued for the unit as a CERTIFICATE trust item, which the unit
installs without a restart.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hedui.v1 import trust_pb2
from sqlalchemy import Engine, Row, select, update

from common.db import reading
from common.errors import HeduiError
from gateway.archive.audit import AuditLog
from gateway.archive.audit import lock as audit_lock
from gateway.db import schema as s
from gateway.trust.items import TrustItems
from keys._files import read_bounded
from keys.crl import write_atomically
from keys.csr import (
    MAX_CERTIFICATE_BYTES,
    CertificateProfile,
    CertificateRequest,
    CertificateRequestError,
    check_issued,
    issue_for_request,
    key_sha256,
    parse_request,
)
from keys.tls import LEAF_VALID_DAYS, TlsError, load_ca_key, load_certificate

__all__ = [
    "CERTIFICATE_ITEM",
    "CERTIFICATE_REQUEST_ITEM",
    "CertificateRequests",
    "IssueRefused",
    "Issued",
    "NamePolicy",
    "PendingRequest",
]

log = logging.getLogger("hedui.gateway.certificates")

CERTIFICATE_REQUEST_ITEM = trust_pb2.TRUST_ITEM_KIND_CERTIFICATE_REQUEST
CERTIFICATE_ITEM = trust_pb2.TRUST_ITEM_KIND_CERTIFICATE
PENDING, ISSUED, SUPERSEDED, DROPPED = "pending", "issued", "superseded", "dropped"
#: Files ``export-requests`` writes and ``import-certificates`` reads.
REQUEST_SUFFIX, CERTIFICATE_SUFFIX = ".csr", ".crt"


class IssueRefused(HeduiError):
    """Certificates cannot be issued or imported as asked (the CA is not the units' CA, a file is not a certificate
    for a pending request ...); nothing was changed for the request concerned."""

    code = "certificate_issue"


@dataclass(frozen=True)
class NamePolicy:
    """What the gateway accepts in a unit's request.

    ``current``: the profile of the unit's current server certificate (the last one issued through the gateway, or
    the one its connector presents), with ``current_key_sha256`` its key; None when not known. ``allowed``: names
    configured for the unit (``[[units]] server_names``) and the host of its endpoint, which the gateway dials and so
    checks in the certificate. ``endpoint_host``: that host.
    """

    current: CertificateProfile | None = None
    current_key_sha256: bytes | None = None
    allowed: frozenset[str] = field(default_factory=frozenset)
    endpoint_host: str | None = None

    def check(self, sender: str, request: CertificateRequest) -> None:
        """Raise CertificateRequestError unless ``request`` is one the gateway may have signed for ``sender``."""
        asked = request.profile
        if asked.party != sender:
            raise CertificateRequestError("the request names another party than its sender", "csr_wrong_party")
        names = set(asked.names)
        if self.current is not None:
            if (asked.client, asked.server) != (self.current.client, self.current.server):
                raise CertificateRequestError(
                    f"the request asks for {asked.usages}; the current certificate is for {self.current.usages}",
                    "csr_usage_changed",
                )
            if request.key_sha256 == self.current_key_sha256:
                raise CertificateRequestError("the request is for the key of the current certificate", "csr_key_reused")
            if names != set(self.current.names) and not names <= self.allowed:
                raise CertificateRequestError(
                    "the request names other hosts than the current certificate and [[units]] server_names",
                    "csr_names_changed",
                )
            return
        if asked.client or not asked.server:
            raise CertificateRequestError("a unit's certificate is a server certificate only", "csr_usage_not_allowed")
        if not names <= self.allowed:
            raise CertificateRequestError(
                "the request names hosts that are neither the unit's endpoint nor in [[units]] server_names",
                "csr_names_not_allowed",
            )
        if self.endpoint_host is not None and self.endpoint_host not in names:
            raise CertificateRequestError(
                "the request does not name the host the gateway dials", "csr_names_not_allowed"
            )


def canonical_host(name: str) -> str:
    """A DNS name lower-cased, an IP address in its compressed form: as names in certificates are compared."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name.lower()


def endpoint_host(endpoint: str) -> str:
    """The host of ``host:port`` (``[::1]:50061`` too), as a certificate names it."""
    return canonical_host(endpoint.rsplit(":", 1)[0].strip("[]"))


@dataclass(frozen=True)
class PendingRequest:
    """A request waiting to be signed (``tls requests``)."""

    request_id: int
    party_id: str
    profile: CertificateProfile
    key_sha256: bytes
    received_at_ms: int
    csr: bytes = field(repr=False)

    @property
    def key_fingerprint(self) -> str:
        digest = self.key_sha256[:16].hex().upper()
        return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))

    @property
    def file_stem(self) -> str:
        """``unit.220100.tax-1a2b3c4d``: the name of its exported request and of the certificate that answers it."""
        return f"{self.party_id}-{self.key_sha256[:4].hex()}"


@dataclass(frozen=True)
class Issued:
    """A certificate issued (or imported) for a request and queued for the unit."""

    party_id: str
    serial: str
    not_after: dt.datetime
    new: bool


def _names(row_names: str) -> tuple[str, ...]:
    return tuple(n for n in row_names.split(",") if n)


def _pending(row: Row[Any]) -> PendingRequest:
    usages = str(row.usages).split(",")
    profile = CertificateProfile(row.party_id, _names(row.names), "clientAuth" in usages, "serverAuth" in usages)
    return PendingRequest(row.id, row.party_id, profile, row.key_sha256, row.received_at_ms, row.csr)


class CertificateRequests:
    """The CERTIFICATE_REQUEST handler and the requests kept at the gateway.

    ``policy(party)`` gives the :class:`NamePolicy` for a unit, None for a party that is not one of the gateway's
    units (its requests are refused).
    """

    def __init__(self, engine: Engine, *, policy: Callable[[str], NamePolicy | None] | None = None) -> None:
        self.engine = engine
        self.policy = policy or (lambda party: None)
        self.items = TrustItems(engine)
        self.audit = AuditLog(engine)
        #: Called with the reason code of each request refused (metrics).
        self.on_refused: Callable[[str], None] | None = None

    # -- receiving --------------------------------------------------------------------------------------------

    def handler(self) -> Callable[[str, bytes, int], str | None]:
        """The CERTIFICATE_REQUEST trust item handler: ``handler(sender, payload_der, now_ms)`` -> None when kept
        (or kept already), else the reason code; a refusal changes nothing."""
        return self.handle

    def handle(self, sender: str, payload: bytes, now_ms: int) -> str | None:
        try:
            self._receive(sender, payload, now_ms)
        except CertificateRequestError as exc:
            log.warning("certificate request refused", extra={"party": sender, "reason": exc.code})
            if self.on_refused is not None:
                self.on_refused(exc.code)
            return exc.code
        return None

    def _receive(self, sender: str, payload: bytes, now_ms: int) -> None:
        digest = hashlib.sha256(payload).digest()
        c = s.certificate_requests.c
        with reading(self.engine) as conn:
            if conn.execute(select(c.id).where(c.sha256 == digest)).first():
                return  # the same request again (its receipt was lost)
        request = parse_request(payload)
        policy = self.policy(sender)
        if policy is None:
            raise CertificateRequestError("the sender is not one of this gateway's units", "csr_wrong_party")
        policy.check(sender, request)
        with self.engine.begin() as conn:
            audit_lock(conn)
            if conn.execute(select(c.id).where(c.sha256 == digest)).first():
                return
            superseded = conn.execute(
                update(s.certificate_requests)
                .where(c.party_id == sender, c.state == PENDING)
                .values(state=SUPERSEDED, decided_at_ms=now_ms, decided_by=sender)
            ).rowcount
            conn.execute(
                s.certificate_requests.insert().values(
                    party_id=sender,
                    sha256=digest,
                    key_sha256=request.key_sha256,
                    csr=request.der,
                    names=",".join(request.profile.names),
                    usages=request.profile.usages,
                    received_at_ms=now_ms,
                    state=PENDING,
                )
            )
            self.audit.append_generated(
                conn,
                at_ms=now_ms,
                actor=sender,
                action="certificate.requested",
                fields=[
                    ("party", sender),
                    ("key", request.key_sha256.hex()[:32]),
                    ("names", len(request.profile.names)),
                    ("superseded", superseded),
                ],
            )
        log.info("certificate request kept for signing", extra={"party": sender, "key": request.key_fingerprint})

    # -- listing ----------------------------------------------------------------------------------------------

    def pending(self, party: str | None = None) -> list[PendingRequest]:
        """Requests waiting to be signed, oldest first (only ``party``'s when given)."""
        c = s.certificate_requests.c
        query = select(s.certificate_requests).where(c.state == PENDING).order_by(c.id)
        if party is not None:
            query = query.where(c.party_id == party)
        with reading(self.engine) as conn:
            return [_pending(row) for row in conn.execute(query).all()]

    def ages(self, now_ms: int) -> dict[str, float]:
        """Per unit, the seconds its pending request has waited (for metrics)."""
        return {p.party_id: max(0, now_ms - p.received_at_ms) / 1000 for p in self.pending()}

    def last_issued(self, party: str) -> bytes | None:
        """The DER certificate last issued through the gateway for ``party`` (None: none)."""
        c = s.certificate_requests.c
        with reading(self.engine) as conn:
            row = conn.execute(
                select(c.certificate).where(c.party_id == party, c.state == ISSUED).order_by(c.id.desc()).limit(1)
            ).first()
        return None if row is None else bytes(row.certificate)

    def drop(self, party: str, now_ms: int, operator: str) -> int:
        """Mark ``party``'s pending request dropped (never to be signed); the number of requests dropped."""
        c = s.certificate_requests.c
        with self.engine.begin() as conn:
            dropped = conn.execute(
                update(s.certificate_requests)
                .where(c.party_id == party, c.state == PENDING)
                .values(state=DROPPED, decided_at_ms=now_ms, decided_by=operator[:64])
            ).rowcount
            if dropped:
                self.audit.append_generated(
                    conn,
                    at_ms=now_ms,
                    actor=operator,
                    action="certificate.dropped",
                    fields=[("party", party), ("requests", dropped)],
                )
        return int(dropped)

    # -- issuing ----------------------------------------------------------------------------------------------

    def sign(
        self,
        ca_cert_pem: bytes,
        ca_key_file: bytes,
        *,
        passphrase: str | None,
        units_ca_pem: bytes,
        now_ms: int,
        operator: str,
        party: str | None = None,
        valid_days: int = LEAF_VALID_DAYS,
    ) -> list[Issued]:
        """Issue a certificate for each pending request (``party``'s only when given) with the CA of ``ca_cert_pem``
        and its key file, record it, audit it and queue it for the unit. ``units_ca_pem``: the CA bundle the units'
        certificates must chain to (``client_tls.ca``): a CA not in it is refused (the units would refuse its
        certificates). Raises TlsError for a CA key that cannot be opened, IssueRefused for the wrong CA."""
        ca_cert = load_certificate(ca_cert_pem)
        if not any(ca == ca_cert for ca in _bundle(units_ca_pem)):
            raise IssueRefused(
                "this CA is not the CA the units' certificates chain to (client_tls.ca): they would refuse its "
                "certificates"
            )
        ca_key = load_ca_key(ca_key_file, passphrase)  # opened once: its passphrase stretching is slow on purpose
        plain_key = ca_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        moment = dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC)
        issued: list[Issued] = []
        for pending in self.pending(party):
            request = parse_request(pending.csr)
            cert = issue_for_request(ca_cert_pem, plain_key, request, valid_days=valid_days, now=moment)
            issued.append(self._record(pending, cert, now_ms=now_ms, operator=operator, units_ca_pem=units_ca_pem))
        return issued

    def export(self, folder: Path, party: str | None = None) -> list[Path]:
        """Write each pending request as PEM to ``folder`` (``<party>-<key>.csr``); the files written."""
        written: list[Path] = []
        for pending in self.pending(party):
            path = folder / (pending.file_stem + REQUEST_SUFFIX)
            pem = x509.load_der_x509_csr(pending.csr).public_bytes(serialization.Encoding.PEM)
            write_atomically(path, pem, mode=0o644)
            written.append(path)
        return written

    def import_certificates(
        self, paths: Iterable[Path], *, units_ca_pem: bytes, now_ms: int, operator: str
    ) -> tuple[list[Issued], list[str]]:
        """Take certificates signed elsewhere (``hedui-keys ca sign-requests`` on the CA's machine): each must answer
        a pending request (its key) and pass the unit's own checks. Returns (the certificates recorded and queued,
        one line per file not taken and why)."""
        by_key = {p.key_sha256: p for p in self.pending()}
        issued: list[Issued] = []
        skipped: list[str] = []
        for path in paths:
            try:
                cert = load_certificate(read_bounded(path, MAX_CERTIFICATE_BYTES, TlsError, what="certificate"))
            except (OSError, TlsError):
                skipped.append(f"{path.name}: not a certificate")
                continue
            public_key = cert.public_key()
            ec_key = public_key if isinstance(public_key, ec.EllipticCurvePublicKey) else None
            pending = by_key.get(key_sha256(ec_key)) if ec_key is not None else None
            if pending is None:
                skipped.append(f"{path.name}: answers no pending request (issued already, or another key)")
                continue
            try:
                issued.append(self._record(pending, cert, now_ms=now_ms, operator=operator, units_ca_pem=units_ca_pem))
            except CertificateRequestError as exc:
                skipped.append(f"{path.name}: refused ({exc.code}): {exc}")
                continue
            del by_key[pending.key_sha256]
        return issued, skipped

    def _record(
        self, pending: PendingRequest, cert: x509.Certificate, *, now_ms: int, operator: str, units_ca_pem: bytes
    ) -> Issued:
        """Check ``cert`` as the unit will (our CA, the request's key, names and usages, valid now), then store it
        with its request, audit it and queue it for the unit, in one transaction."""
        der = cert.public_bytes(serialization.Encoding.DER)
        moment = dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC)
        check_issued(
            der, ca_pem=units_ca_pem, pending_key_sha256=pending.key_sha256, expected=pending.profile, now=moment
        )
        serial = format(cert.serial_number, "x")
        c = s.certificate_requests.c
        with self.engine.begin() as conn:
            audit_lock(conn)
            done = conn.execute(
                update(s.certificate_requests)
                .where(c.id == pending.request_id, c.state == PENDING)
                .values(state=ISSUED, decided_at_ms=now_ms, decided_by=operator[:64], serial=serial, certificate=der)
            ).rowcount
            if not done:  # another operator's command took it meanwhile
                return Issued(pending.party_id, serial, cert.not_valid_after_utc, False)
            self.items.publish(conn, CERTIFICATE_ITEM, der, now_ms, [pending.party_id])
            self.audit.append_generated(
                conn,
                at_ms=now_ms,
                actor=operator,
                action="certificate.issued",
                fields=[
                    ("party", pending.party_id),
                    ("serial", serial),
                    ("key", pending.key_sha256.hex()[:32]),
                    ("not_after", cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")),
                ],
            )
        log.info("certificate issued for a unit's request", extra={"party": pending.party_id, "serial": serial})
        return Issued(pending.party_id, serial, cert.not_valid_after_utc, True)


def _bundle(pem: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        return []


def unit_policies(
    units: Iterable[tuple[str, str, Iterable[str]]],
    requests: CertificateRequests,
    current_certificate: Callable[[str], bytes | None] | None = None,
) -> Callable[[str], NamePolicy | None]:
    """The :class:`NamePolicy` of each unit from ``(party id, endpoint, server_names)`` (the config's [[units]]):
    the current certificate is the last one issued through the gateway, else ``current_certificate(party)`` (the
    one the unit's connector presents), else unknown."""
    table = {party: (endpoint, tuple(names)) for party, endpoint, names in units}

    def policy(party: str) -> NamePolicy | None:
        if party not in table:
            return None
        endpoint, names = table[party]
        host = endpoint_host(endpoint)
        allowed = frozenset({host, *(canonical_host(n) for n in names)})
        der = requests.last_issued(party)
        if der is None and current_certificate is not None:
            der = current_certificate(party)
        if der is None:
            return NamePolicy(None, None, allowed, host)
        try:
            profile = CertificateProfile.of_certificate(der)
            public_key = load_certificate(der).public_key()
        except TlsError:
            return NamePolicy(None, None, allowed, host)
        key = key_sha256(public_key) if isinstance(public_key, ec.EllipticCurvePublicKey) else None
        return NamePolicy(profile, key, allowed, host)

    return policy
