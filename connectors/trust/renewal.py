"""The unit renews its own TLS server certificate: its key is made here and never leaves the host.

``renew_before_days`` before the certificate in use ends (and on demand, ``hedui-connector tls request-renewal``),
:class:`CertificateRenewal` makes a new P-256 key, keeps it in a pending file beside the live key (mode 0600), and
sends a certificate request for it (keys/csr.py: the party, names and usages of the current certificate) to the
gateways as a CERTIFICATE_REQUEST trust item. The gateway's operator signs it with the network CA; the certificate
comes back as a CERTIFICATE trust item, which :meth:`CertificateRenewal.handle` checks (signed by our CA, for the
pending key, naming what we asked for, a leaf valid now) and installs: key, then certificate, each written by rename,
so that the running server's dynamic credentials (common/tlsreload.py) take the new pair for the next handshakes.
Anything else is refused with a reason code, having changed nothing.

One request is outstanding at a time. A new one is made only when the outstanding one was answered, or has waited
``timeout_days``, or its pending key file is gone (a request that can never be installed). Requests and their
answers are kept in the connector's store (table ``certificate_requests``: the request's DER, never a private key)
with an audit entry each; the pending key is only ever in its file.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hedui.v1 import trust_pb2
from sqlalchemy import BigInteger, Column, Engine, Integer, LargeBinary, MetaData, String, Table, select, update

from common.db import reading
from common.errors import HeduiError
from connectors import store as cstore
from connectors.trust.items import TrustItems
from keys.clock import DAY_MS, Clock, SystemClock
from keys.crl import write_atomically
from keys.csr import CertificateProfile, CertificateRequestError, check_issued, key_sha256, make_request
from keys.errors import KeystoreError
from keys.tls import TlsError, TlsFiles, check_tls_material, load_certificate, read_ca_bundle, read_private_key

log = logging.getLogger("hedui.connector.renewal")

__all__ = [
    "CertificateRenewal",
    "Outstanding",
    "RenewalError",
    "RenewalJob",
    "RequestOutcome",
    "RequestRecord",
    "certificate_requests",
]

CERTIFICATE_REQUEST_ITEM = trust_pb2.TRUST_ITEM_KIND_CERTIFICATE_REQUEST
CERTIFICATE_ITEM = trust_pb2.TRUST_ITEM_KIND_CERTIFICATE

metadata = MetaData()

#: The unit's certificate requests and what became of each: ``requested`` (outstanding), ``installed`` (answered
#: by a certificate now in use) or ``abandoned`` (timed out, or its pending key was lost). No private key.
certificate_requests = Table(
    "certificate_requests",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    # SHA-256 of the DER request: the trust item's digest.
    Column("sha256", LargeBinary(32), nullable=False, unique=True),
    # SHA-256 of the requested public key's SubjectPublicKeyInfo: matches the pending key and the certificate.
    Column("key_sha256", LargeBinary(32), nullable=False),
    Column("csr", LargeBinary, nullable=False),
    Column("party", String(64), nullable=False),
    Column("names", String(1100), nullable=False),
    Column("usages", String(24), nullable=False),
    Column("gateways", String(1100), nullable=False),
    Column("requested_at_ms", BigInteger, nullable=False),
    Column("state", String(12), nullable=False),
    Column("answered_at_ms", BigInteger, nullable=True),
    Column("answered_by", String(64), nullable=True),
    Column("serial", String(40), nullable=True),
    Column("certificate_sha256", LargeBinary(32), nullable=True),
    # Why a request was abandoned: timeout, key_missing.
    Column("detail", String(40), nullable=True),
)

REQUESTED, INSTALLED, ABANDONED = "requested", "installed", "abandoned"


class RenewalError(HeduiError):
    """A renewal cannot be requested as asked (no certificate to renew, no gateway, a file that cannot be
    written); nothing was changed."""

    code = "tls_renewal"


@dataclass(frozen=True)
class Outstanding:
    """The request waiting for its certificate."""

    request_id: int
    sha256: bytes
    key_sha256: bytes
    profile: CertificateProfile
    gateways: tuple[str, ...]
    requested_at_ms: int

    @property
    def key_fingerprint(self) -> str:
        digest = self.key_sha256[:16].hex().upper()
        return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


@dataclass(frozen=True)
class RequestRecord:
    """One request as ``tls renewal-status`` shows it."""

    request_id: int
    requested_at_ms: int
    state: str
    answered_at_ms: int | None
    answered_by: str | None
    serial: str | None
    detail: str | None


@dataclass(frozen=True)
class RequestOutcome:
    """What :meth:`CertificateRenewal.request` did: ``new`` False when a request was outstanding already."""

    new: bool
    outstanding: Outstanding
    #: Why a previous request was abandoned for this one (timeout, key_missing), or None.
    replaced: str | None = None


def _profile(party: str, names: str, usages: str) -> CertificateProfile:
    """The profile a stored request asked for (names and usages kept comma-separated)."""
    wanted = usages.split(",")
    return CertificateProfile(
        party, tuple(n for n in names.split(",") if n), "clientAuth" in wanted, "serverAuth" in wanted
    )


def _public_key_sha256(key_pem: bytes) -> bytes | None:
    try:
        key = serialization.load_pem_private_key(key_pem, None)
    except (ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    return key_sha256(key.public_key())


class CertificateRenewal:
    """The unit's server certificate renewal: requests, the CERTIFICATE handler, and the periodic check.

    ``files`` are the server certificate, key and CA the connector serves with; ``pending_key`` the file the new key
    waits in; ``gateways()`` the gateways a request goes to; ``on_installed()`` is called after a new pair was
    written (the serving connector makes its certificate source look at once).
    """

    def __init__(
        self,
        engine: Engine,
        files: TlsFiles,
        *,
        pending_key: Path,
        gateways: Callable[[], Sequence[str]],
        renew_before_days: int = 30,
        timeout_days: int = 7,
        clock: Clock | None = None,
        on_installed: Callable[[], object] | None = None,
    ) -> None:
        self.engine = engine
        self.files = files
        self.pending_key = pending_key
        self.gateways = gateways
        self.renew_before_days = renew_before_days
        self.timeout_ms = timeout_days * DAY_MS
        self.clock = clock or SystemClock()
        self.on_installed = on_installed
        self.items = TrustItems(engine)
        #: Called with the reason code of each certificate refused (metrics).
        self.on_refused: Callable[[str], None] | None = None
        metadata.create_all(engine)
        self._thread_lock = threading.Lock()

    # -- state ------------------------------------------------------------------------------------------------

    def outstanding(self) -> Outstanding | None:
        """The request waiting for its certificate, or None."""
        c = certificate_requests.c
        with reading(self.engine) as conn:
            row = conn.execute(select(certificate_requests).where(c.state == REQUESTED).order_by(c.id.desc())).first()
        if row is None:
            return None
        return Outstanding(
            row.id,
            row.sha256,
            row.key_sha256,
            _profile(row.party, row.names, row.usages),
            tuple(g for g in row.gateways.split(",") if g),
            row.requested_at_ms,
        )

    def history(self, limit: int = 10) -> list[RequestRecord]:
        """The latest requests, newest first (``tls renewal-status``)."""
        c = certificate_requests.c
        with reading(self.engine) as conn:
            rows = conn.execute(
                select(c.id, c.requested_at_ms, c.state, c.answered_at_ms, c.answered_by, c.serial, c.detail)
                .order_by(c.id.desc())
                .limit(limit)
            ).all()
        return [RequestRecord(*row) for row in rows]

    def current_certificate(self) -> bytes:
        """The server certificate on disk (the one the connector serves with once reloaded)."""
        try:
            return read_ca_bundle(self.files.cert)
        except TlsError as exc:
            raise RenewalError(f"no certificate to renew: {exc}") from None

    def days_left(self, now_ms: int) -> float:
        """Days until the certificate on disk ends (negative once it has)."""
        cert = load_certificate(self.current_certificate())
        return (cert.not_valid_after_utc.timestamp() * 1000 - now_ms) / DAY_MS

    def due(self, now_ms: int) -> bool:
        """Whether the certificate ends within ``renew_before_days`` (0 days: never automatically)."""
        return self.renew_before_days > 0 and self.days_left(now_ms) <= self.renew_before_days

    def _stale(self, outstanding: Outstanding, now_ms: int) -> str | None:
        """Why an outstanding request can be given up (timeout, key_missing), or None while it is still good."""
        if now_ms - outstanding.requested_at_ms >= self.timeout_ms:
            return "timeout"
        key_pem = self._read_pending()
        if key_pem is None or _public_key_sha256(key_pem) != outstanding.key_sha256:
            return "key_missing"
        return None

    # -- requesting -------------------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One renewal step at a time, across the serving process's threads and ``tls request-renewal``."""
        lock_path = self.pending_key.with_name(self.pending_key.name + ".lock")
        with self._thread_lock:
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise RenewalError(f"cannot open {lock_path}: {exc.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def _read_pending(self) -> bytes | None:
        try:
            return read_private_key(self.pending_key)
        except (KeystoreError, OSError):
            return None

    def request(self, now_ms: int | None = None) -> RequestOutcome:
        """Make a request unless one is outstanding and still good; idempotent. Raises RenewalError (nothing
        changed) when there is no certificate to renew, no gateway to send to, or the pending key cannot be
        written."""
        now = self.clock.now_ms() if now_ms is None else now_ms
        with self._locked():
            outstanding = self.outstanding()
            replaced = None
            if outstanding is not None:
                replaced = self._stale(outstanding, now)
                if replaced is None:
                    return RequestOutcome(False, outstanding)
            gateways = tuple(dict.fromkeys(self.gateways()))
            if not gateways:
                raise RenewalError("no gateway to send the request to: the trust store holds none")
            try:
                profile = CertificateProfile.of_certificate(self.current_certificate())
            except TlsError as exc:
                raise RenewalError(f"{self.files.cert}: {exc}") from None
            if profile.party != self.files.party:
                raise RenewalError(f"{self.files.cert} names {profile.party}, not {self.files.party}")
            request, key_pem = make_request(profile)
            try:
                write_atomically(self.pending_key, key_pem, mode=0o600)
            except OSError as exc:
                raise RenewalError(
                    f"cannot write the new key to {self.pending_key}: {exc.strerror} (the connector's user must be "
                    "able to write in its TLS folder)"
                ) from None
            with self.engine.begin() as conn:
                if outstanding is not None:
                    c = certificate_requests.c
                    conn.execute(
                        update(certificate_requests)
                        .where(c.id == outstanding.request_id, c.state == REQUESTED)
                        .values(state=ABANDONED, answered_at_ms=now, detail=replaced)
                    )
                result = conn.execute(
                    certificate_requests.insert().values(
                        sha256=request.sha256,
                        key_sha256=request.key_sha256,
                        csr=request.der,
                        party=profile.party,
                        names=",".join(profile.names),
                        usages=profile.usages,
                        gateways=",".join(gateways),
                        requested_at_ms=now,
                        state=REQUESTED,
                    )
                )
                self.items.publish(conn, CERTIFICATE_REQUEST_ITEM, request.der, now, gateways)
                conn.execute(
                    cstore.audit.insert().values(
                        at_ms=now, event="certificate.requested", gateway=None, reason=replaced
                    )
                )
                inserted = result.inserted_primary_key
                assert inserted is not None
                request_id = int(inserted[0])
        log.info(
            "TLS certificate renewal requested",
            extra={"gateways": len(gateways), "key": request.key_fingerprint, "replaced": replaced},
        )
        return RequestOutcome(
            True, Outstanding(request_id, request.sha256, request.key_sha256, profile, gateways, now), replaced
        )

    def turn(self) -> RequestOutcome | None:
        """The periodic check: request a renewal when the certificate ends within ``renew_before_days`` and no good
        request is outstanding. None when nothing is due."""
        now = self.clock.now_ms()
        if not self.due(now):
            return None
        return self.request(now)

    # -- the answer -------------------------------------------------------------------------------------------

    def handler(self) -> Callable[[str, bytes, int], str | None]:
        """The CERTIFICATE trust item handler: ``handler(sender, payload_der, now_ms)`` -> None when installed (or
        installed already), else the reason code; a refusal changes nothing."""
        return self.handle

    def handle(self, sender: str, payload: bytes, now_ms: int) -> str | None:
        try:
            self._install(sender, payload, now_ms)
        except CertificateRequestError as exc:
            if self.on_refused is not None:
                self.on_refused(exc.code)
            log.warning("TLS certificate refused; nothing changed", extra={"gateway": sender, "reason": exc.code})
            return exc.code
        return None

    def _install(self, sender: str, payload: bytes, now_ms: int) -> None:
        digest = hashlib.sha256(payload).digest()
        with self._locked():
            c = certificate_requests.c
            with reading(self.engine) as conn:
                held = conn.execute(select(c.id).where(c.certificate_sha256 == digest)).first()
            if held is not None:
                return  # installed already: the same item again
            outstanding = self.outstanding()
            if outstanding is None:
                raise CertificateRequestError("no certificate request is outstanding", "certificate_not_requested")
            if sender not in outstanding.gateways:
                raise CertificateRequestError("the request was not sent to this gateway", "certificate_not_requested")
            key_pem = self._read_pending()
            if key_pem is None or _public_key_sha256(key_pem) != outstanding.key_sha256:
                raise CertificateRequestError("the pending key of the request is gone", "certificate_key_missing")
            try:
                ca_pem = read_ca_bundle(self.files.ca)
            except TlsError:
                raise CertificateRequestError("our CA certificate cannot be read", "certificate_wrong_ca") from None
            moment = dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC)
            cert = check_issued(
                payload,
                ca_pem=ca_pem,
                pending_key_sha256=outstanding.key_sha256,
                expected=outstanding.profile,
                now=moment,
            )
            cert_pem = cert.public_bytes(serialization.Encoding.PEM)
            try:  # exactly what the serving connector checks before it uses a pair
                check_tls_material(self.files, cert_pem, key_pem, ca_pem, now=moment)
            except TlsError:
                raise CertificateRequestError(
                    "the certificate would not pass the service's own checks", "certificate_not_valid"
                ) from None
            self._write_pair(cert_pem, key_pem)
            serial = format(cert.serial_number, "x")
            with self.engine.begin() as conn:
                conn.execute(
                    update(certificate_requests)
                    .where(c.id == outstanding.request_id)
                    .values(
                        state=INSTALLED,
                        answered_at_ms=now_ms,
                        answered_by=sender,
                        serial=serial,
                        certificate_sha256=digest,
                    )
                )
                conn.execute(
                    cstore.audit.insert().values(
                        at_ms=now_ms, event="certificate.installed", gateway=sender, reason=serial
                    )
                )
            self.pending_key.unlink(missing_ok=True)
        log.info(
            "renewed TLS certificate installed",
            extra={"gateway": sender, "serial": serial, "not_after": cert.not_valid_after_utc.isoformat()},
        )
        if self.on_installed is not None:
            try:
                self.on_installed()
            except Exception:  # the files are in place; the periodic look takes them anyway
                log.exception("looking at the renewed TLS files at once failed")

    def _write_pair(self, cert_pem: bytes, key_pem: bytes) -> None:
        """Key first, then certificate, each by rename (a look between the two finds a key of another certificate
        and keeps the pair in use, common/tlsreload.py); the old key is put back if the certificate cannot be
        written, so a refusal leaves the pair as it was."""
        key_path, cert_path = self.files.key, self.files.cert
        try:
            old_key = read_private_key(key_path)
        except (KeystoreError, OSError):
            old_key = None
        try:
            cert_mode = cert_path.stat().st_mode & 0o644 or 0o644
        except OSError:
            cert_mode = 0o644
        try:
            write_atomically(key_path, key_pem, mode=0o600)
        except OSError:
            raise CertificateRequestError("the new key cannot be written", "certificate_not_written") from None
        try:
            write_atomically(cert_path, cert_pem, mode=cert_mode)
        except OSError:
            if old_key is not None:
                write_atomically(key_path, old_key, mode=0o600)
            raise CertificateRequestError("the new certificate cannot be written", "certificate_not_written") from None

    # -- metrics ----------------------------------------------------------------------------------------------

    def metrics(self, now_ms: int | None = None) -> tuple[int, float | None]:
        """(1 while a request is outstanding else 0, seconds it has waited or None)."""
        now = self.clock.now_ms() if now_ms is None else now_ms
        outstanding = self.outstanding()
        if outstanding is None:
            return 0, None
        return 1, max(0, now - outstanding.requested_at_ms) / 1000


#: A check that fails the same way is logged at most this often.
FAILURE_LOG_INTERVAL_S = 3600.0


class RenewalJob(threading.Thread):
    """The serving connector's periodic renewal check (:meth:`CertificateRenewal.turn`) every ``interval`` seconds
    until stopped; a failing check is logged (at most hourly for the same failure) and tried again."""

    def __init__(self, renewal: CertificateRenewal, interval: float) -> None:
        super().__init__(name="hedui-certificate-renewal", daemon=True)
        self.renewal = renewal
        self.interval = interval
        self.stopping = threading.Event()
        self._logged: dict[str, float] = {}

    def run_once(self) -> None:
        try:
            self.renewal.turn()
        except Exception as exc:  # keep checking; a certificate that cannot be read is check-config's business
            problem = type(exc).__name__
            now = time.monotonic()
            if now >= self._logged.get(problem, 0.0):
                self._logged[problem] = now + FAILURE_LOG_INTERVAL_S
                detail = str(exc).splitlines()[0] if isinstance(exc, HeduiError) else problem
                log.warning("TLS certificate renewal check failed", extra={"problem": detail})

    def run(self) -> None:
        while not self.stopping.is_set():
            self.run_once()
            self.stopping.wait(self.interval)

    def stop(self) -> None:
        self.stopping.set()
        if self.is_alive():
            self.join(timeout=10)
