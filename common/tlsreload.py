"""TLS certificates and the CA's revocation list as a running service uses them: renewed files are picked up for new
handshakes without a restart, and peers whose certificate the CA revoked are refused.

- :class:`CertificateSource` holds one checked TLS identity (certificate, key, CA bundle; keys/tls.py ``TlsFiles``)
  and looks at its three files at most every ``interval`` seconds (one ``stat`` each). When they changed it reads
  each once and runs the checks of ``check-config`` on exactly those bytes (keys/tls.py ``check_tls_material``:
  the key belongs to the certificate, the certificate chains to the CA, is valid now, has the role's usage and names
  the party). Only an identity that passes replaces the one in use, and a ``generation`` counter tells its users.
  Files that fail are never installed: the old identity stays, and (once the files have been still for
  ``SETTLE_SECONDS``, so that a pair caught between its two renames is simply looked at again) the failure is
  logged, counted and shown by ``failing`` until the files change.
- :func:`dynamic_server_credentials` hands a source to grpc's certificate-configuration fetcher
  (``grpc.dynamic_ssl_server_credentials``): grpc asks before every new connection's handshake, the source answers
  "no change" unless a new identity passed. Connections open already keep the certificate they were made with.
- :class:`RevocationSource` holds the CRL a service enforces (keys/crl.py): from a file the service watches the
  same way, verified against the service's CA certificates, never replaced by an older list, and kept in force
  when a newer file is refused or the list is overdue. :meth:`RevocationSource.install` checks and writes a new
  list atomically (the connector's REVOCATION_LIST trust item handler, ``tls install-crl``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import cast

import grpc
from cryptography import x509

from keys._files import read_bounded
from keys.crl import (
    MAX_CRL_BYTES,
    CrlError,
    RevocationList,
    ca_certificates,
    issuer_key,
    join_lists,
    judge,
    load_numbers,
    save_numbers,
    split_lists,
    verify_crl,
    write_atomically,
)
from keys.errors import KeysError
from keys.tls import TlsError, TlsFiles, TlsIdentity, check_tls_files, load_certificate

log = logging.getLogger("hedui.tls")

#: How often a service looks at its certificate and CRL files (one stat per file).
CHECK_INTERVAL_SECONDS = 5.0
#: Files changed less than this long ago and refused are looked at again before the refusal counts: a renewal
#: renames the key and then the certificate, and a look between the two sees a key of another certificate.
SETTLE_SECONDS = 10.0
#: How often an overdue revocation list is logged (the alert says it too).
OVERDUE_LOG_INTERVAL_SECONDS = 3600.0
#: Reason code of a peer refused because the CA revoked its certificate.
CERTIFICATE_REVOKED = "certificate_revoked"

_Stamp = tuple[tuple[int, int, int, int] | None, ...]


def _stamp(paths: Iterable[Path]) -> _Stamp:
    """What a stat says of each file (device, inode, size, mtime), None for one that is missing."""
    stamps: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            stamps.append(None)
            continue
        stamps.append((info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns))
    return tuple(stamps)


def _youngest_s(stamp: _Stamp) -> float:
    return max((s[3] / 1e9 for s in stamp if s is not None), default=0.0)


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class CertificateSource:
    """One TLS identity of a running service, reloaded from its files when they change and pass every check.

    ``on_reload(role, installed)`` is called for each new identity installed (True) and each refusal of changed
    files (False). ``clock`` (monotonic seconds) and ``wall`` (POSIX seconds) are injected for tests.
    """

    def __init__(
        self,
        files: TlsFiles,
        *,
        initial: TlsIdentity | None = None,
        interval: float = CHECK_INTERVAL_SECONDS,
        on_reload: Callable[[str, bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.files = files
        self.interval = interval
        self.on_reload = on_reload
        self.clock = clock
        self.wall = wall
        self._lock = threading.Lock()
        self._seen = _stamp(self._paths)
        self._identity = initial if initial is not None else check_tls_files(files)
        self._next = clock() + interval
        #: Counts the identities installed; users compare it with the one they built their channel from.
        self.generation = 1
        #: Whether the files on disk were refused at the last look (their identity is not the one in use).
        self.failing = False

    @property
    def _paths(self) -> tuple[Path, Path, Path]:
        return (self.files.cert, self.files.key, self.files.ca)

    @property
    def role(self) -> str:
        return self.files.role

    @property
    def identity(self) -> TlsIdentity:
        """The identity in use (the last one that passed)."""
        return self._identity

    def refresh(self, *, force: bool = False) -> bool:
        """Look at the files when ``interval`` has passed (``force``: now); True when a new identity was installed."""
        with self._lock:
            now = self.clock()
            if not force and now < self._next:
                return False
            self._next = now + self.interval
            stamp = _stamp(self._paths)
            if stamp == self._seen:
                return False
            try:
                identity = check_tls_files(self.files)
            except (KeysError, OSError) as exc:
                if self.wall() - _youngest_s(stamp) < SETTLE_SECONDS:
                    return False  # still being written: look again next time, count nothing yet
                self._seen = stamp
                self.failing = True
                first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                log.warning(
                    "renewed TLS files refused; the certificate in use stays",
                    extra={"role": self.role, "section": self.files.section, "problem": first_line},
                )
                self._notify(False)
                return False
            self._seen = stamp
            changed = identity.cert_pem != self._identity.cert_pem or identity.ca_pem != self._identity.ca_pem
            self.failing = False
            if not changed and identity.key_pem == self._identity.key_pem:
                return False  # touched, not changed
            self._identity = identity
            self.generation += 1
        log.info(
            "TLS certificate reloaded",
            extra={"role": self.role, "serial": format(identity.serial, "x"), "days_left": round(identity.days_left())},
        )
        self._notify(True)
        return True

    def _notify(self, installed: bool) -> None:
        if self.on_reload is not None:
            self.on_reload(self.role, installed)


def _configuration(identity: TlsIdentity) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(identity.key_pem, identity.cert_pem)], root_certificates=identity.ca_pem
    )


def dynamic_server_credentials(source: CertificateSource) -> grpc.ServerCredentials:
    """Mutual-TLS server credentials that follow ``source``: grpc calls the fetcher before each new connection's
    handshake; it answers with the new configuration once after a reload, else None (no change). The fetcher
    never raises (grpc would log a traceback and keep the old configuration anyway)."""
    seen = [source.generation]

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        try:
            source.refresh()
            if source.generation == seen[0]:
                return None
            seen[0] = source.generation
            return _configuration(source.identity)
        except Exception:  # a bug here must not end handshakes; the old configuration stays
            log.exception("TLS certificate fetcher failed; the certificate in use stays")
            return None

    # grpcio documents None as "no change"; its type stubs forget it.
    fetcher = cast("Callable[[], grpc.ServerCertificateConfiguration]", fetch)
    return grpc.dynamic_ssl_server_credentials(_configuration(source.identity), fetcher, True)


class RevocationSource:
    """The revocation lists a service enforces, one per CA of its bundle, from ``path`` (None: the service holds no
    list and revokes nothing).

    ``ca_pem()`` gives the CA bundle the lists must be signed by (the service's current one). The file holds one
    list (DER) or one per CA (PEM blocks); beside it ``<file>.numbers.json`` remembers the highest CRL number held
    of each CA, across restarts. At start every list in the file must verify and be no older than that record, and
    every CA the record names must have its list in the file (CrlError otherwise, like a bad certificate: once a
    list was held, a missing file is an error, not "no list"). Later a changed file that does not verify, or holds
    a list older than the one held of its CA, is refused and the held lists stay; a list of one CA never displaces
    another CA's. ``on_refused(code)`` counts refusals.
    """

    def __init__(
        self,
        path: Path | None,
        ca_pem: Callable[[], bytes],
        *,
        interval: float = CHECK_INTERVAL_SECONDS,
        on_refused: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.ca_pem = ca_pem
        self.interval = interval
        self.on_refused = on_refused
        #: Called with each newer list taken (the gateway sends it on to its units).
        self.on_installed: Callable[[RevocationList], None] | None = None
        self.clock = clock
        self.wall = wall
        self._lock = threading.Lock()
        #: The lists in force, by issuer (keys.crl.issuer_key), and the one taken last (``held``).
        self._lists: dict[str, RevocationList] = {}
        self._held: RevocationList | None = None
        #: The highest CRL number ever held of each issuer (the record beside the file).
        self._numbers: dict[str, int] = {}
        self._seen: _Stamp = ()
        self._next = clock() + interval
        self._parsed: dict[bytes, x509.Certificate] = {}
        self._overdue_logged = clock()
        if path is not None:
            self._numbers = load_numbers(path)
            self._seen = _stamp([path])
            if self._seen[0] is not None:
                for new in self._judge_file(self._read(path)):
                    self._lists[issuer_key(new.issuer)] = self._held = new
            missing = [key for key in self._numbers if key not in self._lists]
            if missing:
                raise CrlError(
                    f"{path} lacks the revocation list of {len(missing)} CA(s) held before (the file is missing or "
                    "replaced): restore it, or install the CA's newest list",
                    "crl_missing",
                )
            self._record_numbers()

    def _judge_file(self, data: bytes) -> list[RevocationList]:
        """The lists in ``data`` newer than those held of their CAs (CrlError, changing nothing, if any is not)."""
        cas = self._cas()
        taken: dict[str, RevocationList] = dict(self._lists)
        new: list[RevocationList] = []
        for block in split_lists(data):
            crl = verify_crl(block, cas)
            key = issuer_key(crl.issuer)
            if judge(crl, taken.get(key), floor=self._numbers) is not None:
                taken[key] = crl
                new.append(crl)
        return new

    def _record_numbers(self) -> None:
        assert self.path is not None
        numbers = dict(self._numbers)
        try:  # another process (an install command) may have recorded a higher number meanwhile: never lower it
            for key, number in load_numbers(self.path).items():
                numbers[key] = max(numbers.get(key, 0), number)
        except CrlError:
            pass  # damaged: rewritten from what this process knows
        for key, crl in self._lists.items():
            numbers[key] = max(numbers.get(key, 0), crl.number)
        if numbers != self._numbers:
            try:
                save_numbers(self.path, numbers)
            except OSError as exc:
                raise CrlError(
                    f"cannot record the CRL numbers beside {self.path}: {exc.strerror}", "crl_not_written"
                ) from None
            self._numbers = numbers

    @property
    def lists(self) -> tuple[RevocationList, ...]:
        """Every list in force (one per CA), after a look at the file if ``interval`` has passed."""
        self.refresh()
        return tuple(self._lists.values())

    @property
    def digest(self) -> bytes:
        """SHA-256 over the lists in force: changes whenever one does."""
        return hashlib.sha256(b"".join(crl.sha256 for _, crl in sorted(self._lists.items()))).digest()

    def revokes(self, cert: x509.Certificate) -> bool:
        """Whether a list in force revokes ``cert`` (the list of its issuer)."""
        return any(crl.revokes(cert) for crl in self._lists.values())

    def _cas(self) -> list[x509.Certificate]:
        return ca_certificates(self.ca_pem())

    @staticmethod
    def _read(path: Path) -> bytes:
        try:
            return read_bounded(path, MAX_CRL_BYTES, CrlError, what="certificate revocation list")
        except OSError as exc:
            raise CrlError(f"{path} cannot be read: {exc.strerror}", "crl_unreadable") from None

    @property
    def held(self) -> RevocationList | None:
        """The list taken last (None: none held; every list in force: ``lists``), after a look at the file if
        ``interval`` has passed."""
        self.refresh()
        return self._held

    def refresh(self, *, force: bool = False) -> None:
        """Look at the file when ``interval`` has passed (``force``: now), and take a newer list from it."""
        if self.path is None:
            return
        with self._lock:
            now = self.clock()
            if not force and now < self._next:
                return
            self._next = now + self.interval
            self._warn_overdue(now)
            stamp = _stamp([self.path])
            if stamp == self._seen:
                return
            if stamp[0] is None:
                # Removed: the held lists stay in force (fail closed), and it is said once.
                self._seen = stamp
                if self._lists:
                    self._refused(CrlError(f"{self.path} was removed; the lists held stay", "crl_missing"))
                return
            try:
                data = self._read(self.path)
                taken = self._judge_file(data)
            except CrlError as exc:
                if self.wall() - _youngest_s(stamp) < SETTLE_SECONDS and exc.code == "crl_unreadable":
                    return
                self._seen = stamp
                self._refused(exc)
                return
            self._seen = stamp
            for new in taken:
                self._take(new)
            if self._lists and data != join_lists(self._lists.values()):
                try:
                    self._write()  # the file holds every list in force again (another CA's was left out)
                except CrlError as exc:
                    log.error("the revocation lists could not be written back", extra={"reason": exc.code})

    def _warn_overdue(self, now: float) -> None:
        warning = self.overdue_warning()
        if warning is not None and now >= self._overdue_logged:
            self._overdue_logged = now + OVERDUE_LOG_INTERVAL_SECONDS
            log.warning("certificate revocation list overdue; it stays in force", extra={"detail": warning})

    def _write(self) -> None:
        assert self.path is not None
        try:
            write_atomically(self.path, join_lists(self._lists.values()), mode=0o644)
        except OSError as exc:
            raise CrlError(f"cannot write {self.path}: {exc.strerror}", "crl_not_written") from None
        self._seen = _stamp([self.path])

    def _take(self, new: RevocationList) -> None:
        self._lists[issuer_key(new.issuer)] = self._held = new
        try:
            self._record_numbers()
        except CrlError as exc:
            log.error("the CRL numbers could not be recorded", extra={"reason": exc.code})
        log.info(
            "certificate revocation list installed",
            extra={"crl_number": new.number, "revoked": len(new.serials)},
        )
        if self.on_installed is not None:
            try:
                self.on_installed(new)
            except Exception:  # passing the list on is not a reason to stop enforcing it
                log.exception("passing on the new revocation list failed")

    def _refused(self, exc: CrlError) -> None:
        log.warning("certificate revocation list refused; the list held stays", extra={"reason": exc.code})
        if self.on_refused is not None:
            self.on_refused(exc.code)

    def put(self, data: bytes) -> RevocationList | None:
        """Check ``data`` (DER or PEM) as a new list and, when it is newer than the one held, write it atomically to
        the file and enforce it; return it, or None when it is held already. Raises CrlError (with its code) for a
        list that is not the CA's or older than the one held, having changed nothing."""
        if self.path is None:
            raise CrlError("no file is configured for the revocation list", "crl_not_configured")
        with self._lock:
            try:
                crl = verify_crl(data, self._cas())
                new = judge(crl, self._lists.get(issuer_key(crl.issuer)), floor=self._numbers)
            except CrlError as exc:
                self._refused(exc)
                raise
            if new is None:
                return None
            before = dict(self._lists)
            self._lists[issuer_key(new.issuer)] = new
            try:
                self._write()
            except CrlError:
                self._lists = before
                raise
            self._take(new)
        return new

    def holding(self, data: bytes) -> RevocationList | None:
        """The list in force that ``data`` is (None if it is not one of them)."""
        try:
            crl = verify_crl(data, self._cas())
        except CrlError:
            return None
        held = self._lists.get(issuer_key(crl.issuer))
        return held if held is not None and held.der == crl.der else None

    def install(self, data: bytes) -> str | None:
        """:meth:`put` for a caller that wants a reason code: None when installed or held already, else the code
        (``crl_rollback``, ``crl_bad_signature`` ...); a refusal changes nothing."""
        try:
            self.put(data)
        except CrlError as exc:
            return exc.code
        return None

    def trust_item_handler(self) -> Callable[[str, bytes, int], str | None]:
        """The REVOCATION_LIST trust item handler: ``handler(sender, payload_der, now_ms)`` returns None when the
        list was installed (or is held already), else a reason code; a refusal changes nothing. The CA's signature,
        not the sender, decides whether a list is genuine."""

        def handle(sender: str, payload: bytes, now_ms: int) -> str | None:
            return self.install(payload)

        return handle

    def revokes_pem(self, cert_pem: bytes) -> bool:
        """Whether the held list revokes the certificate in ``cert_pem`` (False when no list is held)."""
        if not self.lists:
            return False
        cert = self._parsed.get(cert_pem)
        if cert is None:
            try:
                cert = load_certificate(cert_pem)
            except TlsError:
                return False  # not a certificate: the party check refuses such a peer
            if len(self._parsed) >= 256:
                self._parsed.clear()
            self._parsed[cert_pem] = cert
        return self.revokes(cert)

    def revokes_peer(self, auth_context: Mapping[str, Iterable[bytes] | bytes]) -> bool:
        """Whether the TLS peer of a gRPC call (``ServicerContext.auth_context()``) presented a revoked certificate."""
        value = auth_context.get("x509_pem_cert")
        if value is None:
            return False
        pems = [bytes(value)] if isinstance(value, bytes | bytearray) else [bytes(v) for v in value]
        return any(self.revokes_pem(pem) for pem in pems)

    def seconds_to_next_update(self) -> float | None:
        """Seconds until the next update of the list due first (negative once overdue), None without a list or
        date."""
        dates = [crl.next_update.timestamp() for crl in self._lists.values() if crl.next_update is not None]
        return min(dates) - self.wall() if dates else None

    def age_seconds(self) -> float | None:
        """Seconds since the oldest list in force was signed (its thisUpdate), None without a list."""
        dates = [crl.this_update.timestamp() for crl in self._lists.values()]
        return self.wall() - min(dates) if dates else None

    def overdue_warning(self) -> str | None:
        """A line for the operator when a list in force is past its next update, else None."""
        late = [crl for crl in self._lists.values() if crl.overdue(_utc_now())]
        if not late:
            return None
        held = late[0]
        return f"the revocation list (number {held.number}) is past its next update: install a newer one"
