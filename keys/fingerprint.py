"""Key ids and human-readable fingerprints.

A key id names a public key on the wire (16 bytes). A fingerprint is what two people compare over the phone or on a
printed key letter before the first import of a peer's keys: 40 decimal digits in eight groups of five, easy to
read aloud in Chinese or English and about 133 bits strong. Both are derived from the public key alone.
"""

from __future__ import annotations

import enum
import hmac
import re
import unicodedata

from keys import _primitives as prim

KEY_ID_BYTES = 16
_GROUPS = 8
_GROUP_DIGITS = 5
_FINGERPRINT_RE = re.compile(r"[0-9]{40}")


class Algorithm(enum.IntEnum):
    """Key algorithms; the values are the ``KeyAlgorithm`` numbers of protos/hedui/v1/keys.proto."""

    ED25519 = 1
    X25519 = 2


def key_id(algorithm: Algorithm, public_key: bytes) -> bytes:
    """First 16 bytes of SHA-256("hedui.v1.key-id" || 0x00 || algorithm || public key)."""
    return prim.sha256(b"hedui.v1.key-id\x00" + bytes([algorithm]) + public_key)[:KEY_ID_BYTES]


def _digits(domain: bytes, data: bytes) -> str:
    digest = prim.sha512(domain + b"\x00" + data)
    groups = [
        f"{int.from_bytes(digest[5 * i : 5 * i + 5], 'big') % 10**_GROUP_DIGITS:0{_GROUP_DIGITS}d}"
        for i in range(_GROUPS)
    ]
    return " ".join(groups)


def key_fingerprint(algorithm: Algorithm, public_key: bytes) -> str:
    """Fingerprint of one public key: ``"12345 67890 ..."`` (8 groups of 5 digits)."""
    return _digits(b"hedui.v1.key-fingerprint", bytes([algorithm]) + public_key)


def bundle_fingerprint(party_id: str, keys: list[tuple[Algorithm, bytes]]) -> str:
    """Fingerprint of a party's published key set: its party id and every public key in it, in key-id order."""
    party = party_id.encode()
    body = len(party).to_bytes(2, "big") + party
    for algorithm, public in sorted(keys, key=lambda k: key_id(k[0], k[1])):
        body += bytes([algorithm]) + public
    return _digits(b"hedui.v1.bundle-fingerprint", body)


def normalize_fingerprint(text: str) -> str:
    """Accept a fingerprint as typed (spaces, dashes or none) and return the canonical grouped form.

    Raises ValueError for anything that is not exactly 40 digits.
    """
    digits = re.sub(r"[\s\-]", "", unicodedata.normalize("NFKC", text))
    if not _FINGERPRINT_RE.fullmatch(digits):
        raise ValueError("a fingerprint is 40 digits, in groups of five")
    return " ".join(digits[i : i + _GROUP_DIGITS] for i in range(0, len(digits), _GROUP_DIGITS))


def fingerprints_equal(a: str, b: str) -> bool:
    """Compare two fingerprints (any accepted spelling) in constant time."""
    return hmac.compare_digest(normalize_fingerprint(a).encode(), normalize_fingerprint(b).encode())
