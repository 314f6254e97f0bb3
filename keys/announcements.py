"""Signed statements a party makes about its own keys: its public bundle and its key announcements.

Both are protobuf messages carried as canonical bytes and signed with a domain-separated Ed25519 signature:

* bundle:        Ed25519(signing key, "hedui.v1.key-bundle" || 0x00 || KeyBundle bytes)
* announcement:  Ed25519(signing key, "hedui.v1.key-announcement" || 0x00 || KeyAnnouncement bytes)

A rotation of a signing key is signed twice, by the current key and by the new one (proof of possession).
"""

from __future__ import annotations

import base64
import re
import textwrap
from dataclasses import dataclass

from hedui.v1 import keys_pb2

from keys import _canonical
from keys.clock import check_time_ms
from keys.errors import TrustError
from keys.fingerprint import bundle_fingerprint, fingerprints_equal, normalize_fingerprint
from keys.handles import SigningKey
from keys.keyring import KeyRecord
from keys.party import is_party_id

BUNDLE_DOMAIN = b"hedui.v1.key-bundle\x00"
ANNOUNCEMENT_DOMAIN = b"hedui.v1.key-announcement\x00"
MAX_BUNDLE_BYTES = 64 * 1024
MAX_BUNDLE_KEYS = 64

BUNDLE_LABEL = "HEDUI PUBLIC KEY BUNDLE"
ANNOUNCEMENT_LABEL = "HEDUI KEY ANNOUNCEMENT"
#: Characters per line of armoured base64 (the last line may be shorter).
ARMOR_LINE_LENGTH = 64
#: What dearmor drops between the markers: ASCII space, tab, line feed, vertical tab, form feed, carriage return.
_ARMOR_WHITESPACE = dict.fromkeys(map(ord, " \t\n\v\f\r"))
_ARMOR_BODY = re.compile(r"[A-Za-z0-9+/]*={0,2}")


@dataclass(frozen=True)
class Bundle:
    """A verified public bundle: whose keys, which keys, and the fingerprint a person compares."""

    party_id: str
    keys: tuple[KeyRecord, ...]
    issued_at_ms: int
    #: The key (one of ``keys``) whose signature over the bundle verified.
    signer_key_id: bytes = b""

    @property
    def fingerprint(self) -> str:
        return bundle_fingerprint(self.party_id, [(k.algorithm, k.public.raw) for k in self.keys])

    def require_fingerprint(self, expected: str) -> None:
        """TrustError unless ``expected`` (as typed, from the key letter or the phone) is this bundle's fingerprint.

        The message repeats what was typed, so that a typing slip can be seen, but never the bundle's own
        fingerprint: an operator in a hurry would copy it back, and the check would prove nothing.
        """
        try:
            typed = normalize_fingerprint(expected)
        except ValueError as exc:
            raise TrustError(str(exc)) from exc
        if not fingerprints_equal(self.fingerprint, typed):
            raise TrustError(
                f"fingerprint mismatch for party {self.party_id}: the bundle's fingerprint is not {typed}. Nothing "
                "was done. Read the fingerprint again from the key letter, or by phone with its owner; do not "
                "take it from the bundle file, which may not be theirs."
            )


def sign_bundle(party_id: str, records: list[KeyRecord], signer: SigningKey, now_ms: int) -> bytes:
    """Canonical SignedKeyBundle bytes for ``records``, signed by ``signer``."""
    body = _canonical.encode(
        keys_pb2.KeyBundle(party_id=party_id, keys=[r.to_proto() for r in records], issued_at_ms=now_ms)
    )
    return _canonical.encode(
        keys_pb2.SignedKeyBundle(bundle=body, signer_key_id=signer.key_id, signature=signer.sign(BUNDLE_DOMAIN + body))
    )


def read_bundle(data: bytes) -> Bundle:
    """Parse and check a SignedKeyBundle: structure, every key, and the signature by a signing key inside it.

    Raises TrustError saying what is wrong. A bundle that passes is internally consistent; whether it belongs to
    who it claims is what the fingerprint comparison decides.
    """
    if len(data) > MAX_BUNDLE_BYTES:
        raise TrustError("key bundle is larger than any legitimate bundle")
    try:
        signed = _canonical.parse_canonical(keys_pb2.SignedKeyBundle, data)
        body = _canonical.parse_canonical(keys_pb2.KeyBundle, signed.bundle)
        records = tuple(KeyRecord.from_proto(k) for k in body.keys)
        check_time_ms(body.issued_at_ms, "issued_at_ms")
    except ValueError as exc:
        raise TrustError(f"not a valid key bundle: {exc}") from exc
    if not is_party_id(body.party_id):
        raise TrustError("key bundle names an invalid party id")
    if not records or len(records) > MAX_BUNDLE_KEYS or len({r.key_id for r in records}) != len(records):
        raise TrustError("key bundle must list between 1 and 64 distinct keys")
    signer = next((r for r in records if r.key_id == signed.signer_key_id), None)
    if signer is None or not signer.public.verify(signed.signature, BUNDLE_DOMAIN + signed.bundle):
        raise TrustError("key bundle signature does not verify with a signing key in the bundle")
    return Bundle(party_id=body.party_id, keys=records, issued_at_ms=body.issued_at_ms, signer_key_id=signer.key_id)


def armor(data: bytes, label: str = BUNDLE_LABEL) -> str:
    """Text form of a signed bundle or announcement for files, e-mail and printouts (docs/envelope.md section 15):
    the BEGIN line, the standard base64 of ``data`` with padding in lines of 64 characters, the END line."""
    body = "\n".join(textwrap.wrap(base64.b64encode(data).decode(), ARMOR_LINE_LENGTH))
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n"


def dearmor(text: str, label: str = BUNDLE_LABEL) -> bytes:
    """Inverse of :func:`armor`; raises TrustError for anything else (docs/envelope.md section 15).

    Text before the BEGIN marker and after the END marker is ignored (a bundle pasted into a letter). Between them
    only ASCII whitespace, which is dropped, and canonical base64 are allowed: the standard alphabet, ``=`` padding to
    a multiple of four, unused bits zero, at least one byte. A second BEGIN marker of the same label is refused.
    """
    begin, end = f"-----BEGIN {label}-----", f"-----END {label}-----"
    what = label.lower().replace("hedui", "Hedui")
    start = text.find(begin)
    stop = text.find(end, start + len(begin)) if start >= 0 else -1
    if start < 0 or stop < 0:
        raise TrustError(f"not a {what} (no BEGIN/END lines)")
    if text.find(begin, start + len(begin)) >= 0:
        raise TrustError(f"more than one {what} in the text; give one at a time")
    compact = text[start + len(begin) : stop].translate(_ARMOR_WHITESPACE)
    if not (compact.isascii() and _ARMOR_BODY.fullmatch(compact) and len(compact) % 4 == 0):
        raise TrustError(f"{what} text is damaged (not base64)")
    data = base64.b64decode(compact)
    if not data or base64.b64encode(data).decode("ascii") != compact:
        raise TrustError(f"{what} text is damaged (empty, or not canonical base64)")
    return data


@dataclass(frozen=True)
class Announcement:
    """A parsed (not yet trusted) key announcement and the signatures over it."""

    message: keys_pb2.KeyAnnouncement
    body: bytes
    signer_key_id: bytes
    signature: bytes
    new_key_signature: bytes

    @property
    def new_key(self) -> KeyRecord | None:
        return KeyRecord.from_proto(self.message.new_key) if self.message.HasField("new_key") else None


def sign_announcement(
    message: keys_pb2.KeyAnnouncement, signer: SigningKey, new_signing_key: SigningKey | None = None
) -> bytes:
    """Canonical SignedKeyAnnouncement bytes."""
    body = _canonical.encode(message)
    return _canonical.encode(
        keys_pb2.SignedKeyAnnouncement(
            announcement=body,
            signer_key_id=signer.key_id,
            signature=signer.sign(ANNOUNCEMENT_DOMAIN + body),
            new_key_signature=new_signing_key.sign(ANNOUNCEMENT_DOMAIN + body) if new_signing_key else b"",
        )
    )


def read_announcement(data: bytes) -> Announcement:
    """Parse a SignedKeyAnnouncement (structure only; the trust store checks signatures against what it knows)."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise TrustError("key announcement is too large", reason="announcement_malformed")
    try:
        signed = _canonical.parse_canonical(keys_pb2.SignedKeyAnnouncement, data)
        message = _canonical.parse_canonical(keys_pb2.KeyAnnouncement, signed.announcement)
        announcement = Announcement(
            message=message,
            body=signed.announcement,
            signer_key_id=signed.signer_key_id,
            signature=signed.signature,
            new_key_signature=signed.new_key_signature,
        )
        _ = announcement.new_key  # validates the embedded key
        check_time_ms(message.issued_at_ms, "issued_at_ms")
        check_time_ms(message.overlap_until_ms, "overlap_until_ms")
    except ValueError as exc:
        raise TrustError(f"not a valid key announcement: {exc}", reason="announcement_malformed") from exc
    return announcement
