"""Page tokens of ListCommissions: where the next page starts, bound to who asked and with which filters, signed by
the gateway so that a client cannot make one up.

Paging is by key, not by offset: a page starts after the last commission of the page before in the listing order
(created time, then id, both descending), so commissions created meanwhile neither shift nor repeat what follows.
A token tells only that position; the filters and the caller's visibility are applied again to every page, so even
a forged token could show a caller nothing beyond its own commissions. The signature (Ed25519 by the gateway's
signing key, domain ``hedui.v1.page-token``) makes a forged or altered one INVALID_ARGUMENT instead, and works on
every replica of the gateway and across restarts, which share the keystore. A token made under a key that was
since retired or revoked is refused: the client lists again from the first page.

Token, before base64url without padding (docs/agency-api.md, "Listing commissions"): version (1 byte, 1), scope
(16 bytes: the start of SHA-256 over the caller and the filters), created_at_ms and commission row id of the last
commission listed (8 bytes each, big-endian, signed), signing key id (16 bytes), signature (64 bytes) over
``hedui.v1.page-token`` 0x00 and every byte before the key id.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from dataclasses import dataclass

import grpc

from gateway.procedure.commission import WorkflowError
from keys.errors import TrustError
from keys.fingerprint import Algorithm
from keys.identity import PartyKeys
from keys.statements import sign_statement, verify_statement

PAGE_TOKEN_DOMAIN = b"hedui.v1.page-token\x00"
_VERSION = 1
_BODY = struct.Struct(">B16sqq")
_KEY_ID_BYTES = 16
_SIGNATURE_BYTES = 64
#: The longest page token accepted, in characters (a real one has 151).
MAX_PAGE_TOKEN_CHARS = 256
#: The text of a token: the base64url alphabet, without padding.
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]*")


@dataclass(frozen=True)
class Position:
    """The last commission of a page, in the listing order."""

    created_at_ms: int
    row_id: int


def scope(*parts: str) -> bytes:
    """What a token is bound to: the caller and the filters, each as text."""
    return hashlib.sha256("\x00".join(parts).encode()).digest()[:16]


def _refused(why: str) -> WorkflowError:
    return WorkflowError(
        grpc.StatusCode.INVALID_ARGUMENT, f"page_token {why}: send the filters of the first page, or list again"
    )


def _encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _decode(token: str) -> bytes | None:
    """The bytes of ``token``, or None unless it is exactly what :func:`_encode` makes of them. Python's decoder is
    lax (it skips characters outside the alphabet, takes ``+/`` for ``-_``, ignores padding and the unused low bits
    of the last character), so an altered token could decode to a genuine one; re-encoding and comparing refuses
    every text but the one the gateway made."""
    if not _TOKEN_RE.fullmatch(token):
        return None
    try:
        data = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        return None
    return data if _encode(data) == token else None


class PageTokens:
    """Makes and reads the signed page tokens of one gateway."""

    def __init__(self, agency: PartyKeys) -> None:
        self.agency = agency

    def make(self, bound_to: bytes, position: Position, now_ms: int) -> str:
        """The token of the page after ``position``, for the caller and filters ``bound_to`` stands for."""
        key = self.agency.signing_key(now_ms)
        body = _BODY.pack(_VERSION, bound_to, position.created_at_ms, position.row_id)
        signature = sign_statement(PAGE_TOKEN_DOMAIN, body, key)
        return _encode(body + key.key_id + signature)

    def read(self, token: str, bound_to: bytes, now_ms: int) -> Position:
        """The position ``token`` continues after; INVALID_ARGUMENT if it is not one this gateway made for this
        caller and these filters, under a key still valid now."""
        if len(token) > MAX_PAGE_TOKEN_CHARS:
            raise _refused("is too long")
        data = _decode(token)
        if data is None:
            raise _refused("is not one this gateway made")
        if len(data) != _BODY.size + _KEY_ID_BYTES + _SIGNATURE_BYTES:
            raise _refused("is not one this gateway made")
        body, key_id, signature = data[: _BODY.size], data[_BODY.size : -_SIGNATURE_BYTES], data[-_SIGNATURE_BYTES:]
        record = self.agency.record(key_id)
        if record is None or record.algorithm is not Algorithm.ED25519 or not record.valid_at(now_ms):
            raise _refused("was made under a signing key this gateway no longer uses")
        try:
            verify_statement(PAGE_TOKEN_DOMAIN, body, signature, record.public)
        except TrustError:
            raise _refused("is not one this gateway made") from None
        version, token_scope, created_at_ms, row_id = _BODY.unpack(body)
        if version != _VERSION:
            raise _refused("is of another version")
        if token_scope != bound_to:
            raise _refused("belongs to another caller or other filters")
        return Position(created_at_ms, row_id)
