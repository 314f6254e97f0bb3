"""The certificate revocation list (CRL) of the private TLS CA (keys/tls.py): what the CA keeps, the list it signs,
and the rules by which a service accepts a new list.

The CA side keeps ``revoked.json`` in the CA folder beside ``ca.crt`` and ``ca.key``: the serial numbers it has
revoked, with reason and time, and the number of the last CRL it signed. ``hedui-keys ca revoke`` adds a serial,
``hedui-keys ca crl`` signs the whole list as an X.509 v2 CRL (RFC 5280 section 5) in DER:

- issuer = the CA certificate's subject, signature ECDSA-SHA256 with the CA key;
- ``thisUpdate`` = now, ``nextUpdate`` = now + ``--next-update-days`` (default 7): the moment by which the CA
  promises the next list; a service holding a list past it warns and raises an alert, and keeps enforcing it;
- extensions: CRLNumber (monotonic, one more than the last one the CA folder recorded) and
  AuthorityKeyIdentifier (the CA key's);
- one entry per revoked serial with its revocation date and a CRLReason entry extension (none for "unspecified",
  as RFC 5280 5.3.1 recommends).

A service accepts a list (:func:`accept`) only when: it parses as a DER or PEM CRL; its issuer is the subject of one
of the CA certificates the service trusts and that CA's key verifies its signature; it carries a CRLNumber; and,
against the list it holds already, its number is higher (a lower one is a rollback: refused; the same number is the
same list, held already, or a forgery by a holder of the CA key: refused). Each refusal is a :class:`CrlError` with a
stable ``code`` that the services use as the reason of a refused trust item and as a metric label.

Nothing here touches the network or a database; the services' watchers are in common/tlsreload.py.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keys._files import read_bounded
from keys.tls import TlsError, load_ca_key, load_certificate

#: The CA folder's record of revoked serials (next to ca.crt and ca.key).
REVOKED_FILE = "revoked.json"
_FORMAT = "hedui-ca-revocations"
#: A CRL of a private CA with a few thousand entries stays far below this.
MAX_CRL_BYTES = 4 * 1024 * 1024
DEFAULT_NEXT_UPDATE_DAYS = 7
MAX_NEXT_UPDATE_DAYS = 366
#: Reason codes a revocation may name, as RFC 5280 CRLReason values.
REASONS: Mapping[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "key_compromise": x509.ReasonFlags.key_compromise,
    "ca_compromise": x509.ReasonFlags.ca_compromise,
    "affiliation_changed": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessation_of_operation": x509.ReasonFlags.cessation_of_operation,
    "privilege_withdrawn": x509.ReasonFlags.privilege_withdrawn,
}
_SERIAL_RE = re.compile(r"^(?:0x)?([0-9a-fA-F:]{1,64})$")


class CrlError(TlsError):
    """A revocation list cannot be made, read or accepted; ``code`` says why (stable, for reasons and metrics)."""

    code = "crl_invalid"

    def __init__(self, message: str, code: str = "crl_invalid") -> None:
        super().__init__(message)
        self.code = code


def parse_serial(text: str) -> int:
    """A certificate serial as ``hedui-keys ca show`` prints it (hex, colons allowed); CrlError if it is not one."""
    match = _SERIAL_RE.match(text.strip())
    digits = match.group(1).replace(":", "") if match else ""
    if not digits:
        raise CrlError(f"{text!r} is not a certificate serial number (hexadecimal, as 'hedui-keys ca show' prints)")
    serial = int(digits, 16)
    if serial <= 0:
        raise CrlError("a certificate serial number is positive")
    return serial


def _utc(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Revocation:
    """One revoked certificate as the CA folder records it."""

    serial: int
    reason: str
    revoked_at: dt.datetime


@dataclass(frozen=True)
class CaRevocations:
    """What ``revoked.json`` holds: the revoked serials and the number of the last CRL signed (0: none yet)."""

    revoked: tuple[Revocation, ...] = ()
    crl_number: int = 0

    @classmethod
    def load(cls, ca_dir: Path) -> CaRevocations:
        """The CA folder's record, empty when the CA never revoked anything; CrlError if the file is damaged."""
        path = Path(ca_dir) / REVOKED_FILE
        try:
            data = json.loads(read_bounded(path, MAX_CRL_BYTES, CrlError, what="revocation record"))
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:
            raise CrlError(f"{path} cannot be read as the CA's revocation record: {exc}") from None
        try:
            if data.get("format") != _FORMAT:
                raise ValueError("not a hedui-ca-revocations file")
            revoked = tuple(
                Revocation(
                    int(item["serial"], 16),
                    str(item["reason"]),
                    dt.datetime.fromisoformat(str(item["revoked_at"]).replace("Z", "+00:00")),
                )
                for item in data["revoked"]
            )
            number = int(data["crl_number"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CrlError(f"{path} is damaged: {exc}") from None
        return cls(revoked, number)

    def save(self, ca_dir: Path) -> None:
        """Write the record atomically (temporary file, fsync, rename)."""
        document = {
            "format": _FORMAT,
            "crl_number": self.crl_number,
            "revoked": [
                {"serial": format(r.serial, "x"), "reason": r.reason, "revoked_at": _utc(r.revoked_at)}
                for r in self.revoked
            ],
        }
        write_atomically(Path(ca_dir) / REVOKED_FILE, (json.dumps(document, indent=1) + "\n").encode(), mode=0o644)

    def revoke(self, serial: int, reason: str, now: dt.datetime) -> CaRevocations:
        """This record with ``serial`` added; CrlError for an unknown reason or a serial revoked already."""
        if reason not in REASONS:
            raise CrlError(f"reason {reason!r} is not one of {', '.join(REASONS)}")
        if any(r.serial == serial for r in self.revoked):
            raise CrlError(f"serial {serial:x} is revoked already")
        return CaRevocations((*self.revoked, Revocation(serial, reason, now)), self.crl_number)


def write_atomically(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never a part: a temporary file
    in the same folder (``mode``), fsync, rename, fsync of the folder."""
    # Unique per call: two threads of one process (a service and a command run in it) may write the same file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def build_crl(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    revocations: CaRevocations,
    *,
    number: int,
    now: dt.datetime,
    next_update_days: int = DEFAULT_NEXT_UPDATE_DAYS,
    ca_key_passphrase: str | None = None,
) -> bytes:
    """Sign the CRL listing ``revocations`` with CRLNumber ``number``; return its DER."""
    if isinstance(next_update_days, bool) or not 1 <= next_update_days <= MAX_NEXT_UPDATE_DAYS:
        raise CrlError(f"the next update must be 1-{MAX_NEXT_UPDATE_DAYS} days ahead")
    if number < 1:
        raise CrlError("a CRL number is positive")
    ca_cert = load_certificate(ca_cert_pem)
    ca_key = load_ca_key(ca_key_pem, ca_key_passphrase)
    if _spki(ca_key.public_key()) != _spki(ca_cert.public_key()):
        raise CrlError("the CA key does not belong to the CA certificate")
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(days=next_update_days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    for item in revocations.revoked:
        entry = x509.RevokedCertificateBuilder().serial_number(item.serial).revocation_date(item.revoked_at)
        if item.reason != "unspecified":
            entry = entry.add_extension(x509.CRLReason(REASONS[item.reason]), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _spki(public_key: object) -> bytes:
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class RevocationList:
    """A CRL whose signature a trusted CA verified: what a service enforces."""

    der: bytes
    issuer: x509.Name
    number: int
    this_update: dt.datetime
    next_update: dt.datetime | None
    serials: frozenset[int]

    @property
    def sha256(self) -> bytes:
        return hashlib.sha256(self.der).digest()

    def revokes(self, cert: x509.Certificate) -> bool:
        """Whether ``cert`` (issued by this list's CA) is on the list."""
        return cert.issuer == self.issuer and cert.serial_number in self.serials

    def overdue(self, now: dt.datetime) -> bool:
        """Whether the CA's promised next list is late (the list is still enforced)."""
        return self.next_update is not None and now > self.next_update

    def summary(self) -> str:
        """One line for operators: number, issuer, dates, entries."""
        until = _utc(self.next_update) if self.next_update else "unspecified"
        return (
            f"CRL number {self.number} of {self.issuer.rfc4514_string()}: {len(self.serials)} revoked, "
            f"this update {_utc(self.this_update)}, next update {until}"
        )


def _load(data: bytes) -> x509.CertificateRevocationList:
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError:
        raise CrlError("not an X.509 CRL (expected DER or PEM '-----BEGIN X509 CRL-----')", "crl_unreadable") from None


def verify_crl(data: bytes, ca_certs: Iterable[x509.Certificate]) -> RevocationList:
    """Parse ``data`` and check it is signed by one of ``ca_certs`` and numbered; CrlError (with a code) if not."""
    crl = _load(data)
    issuers = [ca for ca in ca_certs if ca.subject == crl.issuer]
    if not issuers:
        raise CrlError(f"the CRL is issued by {crl.issuer.rfc4514_string()}, not by a trusted CA", "crl_wrong_issuer")
    if not any(_signed_by(crl, ca) for ca in issuers):
        raise CrlError("the CRL's signature does not verify with the CA's key", "crl_bad_signature")
    try:
        number = int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        raise CrlError("the CRL carries no CRL number, so a rollback could not be told", "crl_unnumbered") from None
    return RevocationList(
        der=crl.public_bytes(serialization.Encoding.DER),
        issuer=crl.issuer,
        number=number,
        this_update=crl.last_update_utc,
        next_update=crl.next_update_utc,
        serials=frozenset(entry.serial_number for entry in crl),
    )


def _signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    public = ca.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        return False
    try:
        return bool(crl.is_signature_valid(public))
    except (InvalidSignature, TypeError, ValueError):
        return False


def accept(
    data: bytes,
    ca_certs: Sequence[x509.Certificate],
    held: RevocationList | None,
    *,
    floor: Mapping[str, int] | None = None,
) -> RevocationList | None:
    """The list in ``data`` if it may replace ``held``; None when it is ``held`` itself (nothing to do).

    ``floor``: issuer key (:func:`issuer_key`) -> the highest CRL number ever held of that issuer (remembered across
    restarts): a lower one is a rollback even when no list of the issuer is held now.

    Raises CrlError: code ``crl_rollback`` for a lower number than held, ``crl_number_reused`` for the same number
    with other contents, or the codes of :func:`verify_crl`."""
    return judge(verify_crl(data, ca_certs), held, floor=floor)


def judge(
    new: RevocationList, held: RevocationList | None, *, floor: Mapping[str, int] | None = None
) -> RevocationList | None:
    """:func:`accept` for a list verified already (``held``: the list of the same issuer held, if any)."""
    if held is not None and new.issuer == held.issuer:
        if new.number < held.number:
            raise CrlError(
                f"CRL number {new.number} is older than the held number {held.number}: a rollback is refused",
                "crl_rollback",
            )
        if new.number == held.number:
            if new.der == held.der:
                return None
            raise CrlError(f"CRL number {new.number} is held already with other contents", "crl_number_reused")
    highest = (floor or {}).get(issuer_key(new.issuer), 0)
    if new.number < highest:
        raise CrlError(
            f"CRL number {new.number} is older than number {highest} held before: a rollback is refused", "crl_rollback"
        )
    return new


def issuer_key(issuer: x509.Name) -> str:
    """A CA's name as a key of the per-issuer records: SHA-256 (hex) of its DER encoding."""
    return hashlib.sha256(issuer.public_bytes()).hexdigest()


_PEM_CRL_RE = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.S)


def split_lists(data: bytes) -> list[bytes]:
    """The lists of a revocation list file: one DER list, or one or more PEM lists (one per CA)."""
    if data.lstrip().startswith(b"-----BEGIN"):
        blocks = _PEM_CRL_RE.findall(data)
        if not blocks:
            raise CrlError("no X.509 CRL in the PEM file", "crl_unreadable")
        return list(blocks)
    return [data]


def join_lists(lists: Iterable[RevocationList]) -> bytes:
    """The file of ``lists``: one list as DER (as before), several as PEM blocks in issuer order."""
    ordered = sorted(lists, key=lambda crl: issuer_key(crl.issuer))
    if len(ordered) == 1:
        return ordered[0].der
    return b"".join(x509.load_der_x509_crl(crl.der).public_bytes(serialization.Encoding.PEM) for crl in ordered)


#: Beside a service's list file: the highest CRL number held of each issuer, so that neither a restart with an older
#: file nor a missing file brings revoked certificates back.
NUMBERS_SUFFIX = ".numbers.json"
_NUMBERS_FORMAT = "hedui-crl-numbers"


def numbers_path(path: Path) -> Path:
    return path.with_name(path.name + NUMBERS_SUFFIX)


def load_numbers(path: Path) -> dict[str, int]:
    """The highest CRL numbers recorded beside ``path`` (empty when none was ever held); CrlError when damaged."""
    record = numbers_path(path)
    try:
        data = json.loads(read_bounded(record, 1024 * 1024, CrlError, what="revocation list numbers"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise CrlError(f"{record} cannot be read: {exc}", "crl_state_damaged") from None
    try:
        if data.get("format") != _NUMBERS_FORMAT:
            raise ValueError("not a hedui-crl-numbers file")
        numbers = {str(k): int(v) for k, v in data["numbers"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CrlError(f"{record} is damaged: {exc}", "crl_state_damaged") from None
    return numbers


def save_numbers(path: Path, numbers: Mapping[str, int]) -> None:
    document = {"format": _NUMBERS_FORMAT, "numbers": dict(sorted(numbers.items()))}
    write_atomically(numbers_path(path), (json.dumps(document, indent=1) + "\n").encode(), mode=0o644)


def ca_certificates(ca_pem: bytes) -> list[x509.Certificate]:
    """The certificates of a PEM CA bundle (the services' tls_ca / client_tls.ca)."""
    try:
        return x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        raise CrlError("the CA file holds no readable PEM certificate") from None
