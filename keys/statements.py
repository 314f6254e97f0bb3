"""Statements a staff member or a party signs with its own key.

An exchange approval (Procedure V.(二): an exchange needs at least two staff members) is one Ed25519 signature by
the staff member's registered key over

    "hedui.v1.exchange-approval" || 0x00 || exchange_digest

where ``exchange_digest`` is the 32-byte SHA-256 the gateway computes for the commission (it binds the commission,
its letter, programme, period, categories and subjects; see protos/hedui/v1/agency.proto). The domain prefix keeps
an approval from ever being mistaken for any other signed statement of the same key. Both the staff member's side
(``hedui-keys sign-approval``) and the gateway's staff register build the message with :func:`approval_message`.

A party signs statements the same way with its own signing key: a verification report (核对报告) is signed by the
issuing gateway over ``"hedui.v1.report" || 0x00 || Report bytes`` (:data:`REPORT_DOMAIN`); anyone holding the
agency's keys checks it with :func:`verify_report_by` (``hedui-keys verify-report``), without the gateway.
"""

from __future__ import annotations

from collections.abc import Iterable

import nacl.bindings as sodium
from google.protobuf.message import DecodeError
from hedui.v1 import agency_pb2

from keys import _canonical
from keys.clock import check_time_ms
from keys.errors import TrustError
from keys.fingerprint import Algorithm
from keys.handles import PublicKey, SigningKey
from keys.keyring import KeyRecord, Keyring, KeyState

APPROVAL_DOMAIN = b"hedui.v1.exchange-approval\x00"
EXCHANGE_DIGEST_BYTES = 32


def approval_message(digest: bytes) -> bytes:
    """The bytes a staff member signs to approve the exchange of the commission with ``digest``.

    Raises ValueError unless ``digest`` is 32 bytes (a SHA-256).
    """
    if len(digest) != EXCHANGE_DIGEST_BYTES:
        raise ValueError(f"an exchange digest is {EXCHANGE_DIGEST_BYTES} bytes (SHA-256), not {len(digest)}")
    return APPROVAL_DOMAIN + bytes(digest)


def staff_public_key(raw: bytes) -> PublicKey:
    """An Ed25519 public key for a staff member, refusing bytes that cannot be a real signer's key.

    The key must be 32 bytes, a canonical encoding of a point on the curve, in the prime-order subgroup and not of
    small order (libsodium's ``crypto_core_ed25519_is_valid_point``): such keys would verify no honest signature,
    or, for small-order points, signatures nobody made. Raises ValueError saying which.
    """
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, not {len(raw)}")
    if not sodium.crypto_core_ed25519_is_valid_point(bytes(raw)):
        raise ValueError("the public key is not a valid Ed25519 point (not on the curve, or of small order)")
    return PublicKey(Algorithm.ED25519, bytes(raw))


# -- statements a party signs with its own signing key -------------------------------------------------------------

#: A verification report (核对报告, clause 6): Ed25519 by the issuing gateway's signing key over
#: "hedui.v1.report" || 0x00 || canonical Report bytes (protos/hedui/v1/agency.proto, SignedReport).
REPORT_DOMAIN = b"hedui.v1.report\x00"
#: Larger than any report the gateway issues (at most 50,000 subjects per commission); a bigger file is refused
#: before it is parsed.
MAX_SIGNED_REPORT_BYTES = 256 * 1024 * 1024


def sign_statement(domain: bytes, data: bytes, key: SigningKey) -> bytes:
    """Ed25519 signature by ``key`` over ``domain || data``. The domain (ending in 0x00) keeps a statement of one
    kind from ever passing as one of another kind signed by the same key."""
    if not domain.endswith(b"\x00"):
        raise ValueError("a statement domain ends with a 0x00 byte")
    return key.sign(domain + data)


def verify_statement(domain: bytes, data: bytes, signature: bytes, public_key: PublicKey) -> None:
    """Raise TrustError unless ``signature`` is ``public_key``'s Ed25519 signature over ``domain || data``."""
    if not public_key.verify(signature, domain + data):
        raise TrustError(f"signature does not verify with key {public_key.key_id.hex()}")


def read_signed_report(data: bytes) -> agency_pb2.SignedReport:
    """Parse SignedReport bytes (a file, a GetReport answer); raises TrustError for anything else."""
    if len(data) > MAX_SIGNED_REPORT_BYTES:
        raise TrustError("signed report is larger than any report the gateway issues")
    signed = agency_pb2.SignedReport()
    try:
        signed.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise TrustError("not a signed report (SignedReport protobuf)") from exc
    if not signed.report or not signed.signature:
        raise TrustError("not a signed report: the report or its signature is missing")
    return signed


def _report(signed: agency_pb2.SignedReport) -> agency_pb2.Report:
    try:
        report = _canonical.parse_canonical(agency_pb2.Report, signed.report)
        check_time_ms(report.issued_at_ms, "issued_at_ms")
        return report
    except ValueError as exc:
        raise TrustError(f"signed report carries no valid report: {exc}") from exc


def report_agency(signed: agency_pb2.SignedReport) -> str:
    """The agency a signed report says it is from, not yet verified: only to choose whose keys to check it with."""
    return _report(signed).agency


def verify_report(signed: agency_pb2.SignedReport, public_key: PublicKey) -> agency_pb2.Report:
    """The report inside ``signed`` once its signature verifies with ``public_key``; TrustError otherwise.

    Only the signed bytes are checked and returned: the ``html`` rendering beside them is not signed.
    """
    if signed.signer_key_id != public_key.key_id:
        raise TrustError(
            f"report is signed by key {signed.signer_key_id.hex() or '-'}, not by key {public_key.key_id.hex()}"
        )
    verify_statement(REPORT_DOMAIN, signed.report, signed.signature, public_key)
    return _report(signed)


def verify_report_by(
    signed: agency_pb2.SignedReport, keys: Keyring | Iterable[KeyRecord] | None, party_id: str
) -> agency_pb2.Report:
    """The report inside ``signed`` once it verifies as issued by ``party_id`` with one of ``keys`` (that party's
    keyring from a trust store, or the keys of a bundle whose fingerprint was checked out of band).

    The report must name ``party_id`` as its agency, and the signing key must be an Ed25519 key of that party that
    was valid (not revoked, inside its window) at the report's issue time. Raises TrustError saying which check
    failed.
    """
    if keys is None:
        raise TrustError(f"party {party_id} is not in the trust store: import its bundle first")
    claimed = _report(signed)  # read before the signature check only to learn the issue time; checked below
    if claimed.agency != party_id:
        raise TrustError(f"the report names agency {claimed.agency or '-'}, not {party_id}")
    keyring = keys if isinstance(keys, Keyring) else Keyring(keys)
    record = keyring.get(signed.signer_key_id)
    if record is None or record.algorithm is not Algorithm.ED25519:
        raise TrustError(f"the report is signed by a key {party_id} is not known to hold")
    if not record.valid_at(claimed.issued_at_ms):
        if record.state is KeyState.REVOKED:
            raise TrustError(f"the key that signed the report ({record.key_id.hex()}) has been revoked")
        raise TrustError("the key that signed the report was not valid at the report's issue time")
    return verify_report(signed, record.public)
