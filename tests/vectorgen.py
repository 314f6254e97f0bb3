"""Deterministic test vectors of sealed envelope v1 (docs/envelope.md, section "Test vectors").

:func:`build_vectors` returns the document that ``scripts/make_vectors.py`` writes to
``tests/vectors/envelope_v1.json``; ``tests/test_vectors.py`` builds it again and compares the two byte for byte.
Nothing varies between runs: key seeds, party ids and times are constants below, and the random bytes a sealer
draws (message id 16, ephemeral seed 32, nonce 24, in that order) come from SHAKE-256 of the vector's name.

Positive vectors are sealed by the reference implementation (:func:`keys.envelope.seal_with`). Negative vectors
that no honest sealer produces -- a valid signature over a ciphertext made for the wrong key, a header outside the
format, an inner payload of another type -- are assembled by hand from the primitive layer, the way a faulty or
hostile sender would. Every envelope comes with the receiver context that reproduces the expected outcome.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hedui.v1 import envelope_pb2, media_pb2

from keys import _canonical, envelope
from keys import _primitives as prim
from keys.errors import (
    BadSignature,
    EnvelopeError,
    ExpiredEnvelope,
    KeyNotValidThen,
    MalformedEnvelope,
    NotYetValidEnvelope,
    ReplayedEnvelope,
    RevokedKey,
    TypeMismatch,
    UndecryptableEnvelope,
    UnknownKey,
    UnsupportedEnvelope,
    WrongRecipient,
)
from keys.fingerprint import Algorithm
from keys.handles import AgreementKey, PrivateKey, RandomSource, SigningKey, _load_private
from keys.keyring import KeyRecord, KeyState

Json = dict[str, Any]

FORMAT = "hedui-envelope-v1-test-vectors"
SENDER = "agency.220000"
RECIPIENT = "unit.220100.tax"
#: A party the receiver is not: envelopes addressed to it are refused as wrong_recipient.
OTHER_RECIPIENT = "unit.220100.land"

#: The sender's Ed25519 signing key, trusted by the receiver in every vector unless the vector says otherwise.
SENDER_SIGNING_SEED = bytes.fromhex("f7bbe6b09bb37ad740e6a91f3a19572a10944d4a5ab1210d06dfd671d652debc")
#: The receiver's X25519 key-agreement key, the one every envelope is sealed for unless the vector says otherwise.
RECIPIENT_AGREEMENT_SEED = bytes.fromhex("567c3599b7ebe52b039ac1dee34dd2514720a83a6e321d552cd88a4d6dfbad3f")
#: A second signing key of the sender that the receiver has never been given.
SENDER_OTHER_SIGNING_SEED = bytes.fromhex("b65f1d7d5640ec606f45daed4b1732050656770e22239e50d35f5342f9e6b532")
#: A second key-agreement key of the recipient's party whose private key the receiver does not hold.
RECIPIENT_OTHER_AGREEMENT_SEED = bytes.fromhex("fa20b9325484c1ae14028b7b1a2694a3ced32b04fc8fe9ac3291a6b23be06e10")

KEYS_NOT_BEFORE_MS = 1_780_000_000_000
CREATED_AT_MS = 1_790_000_000_000
TTL_MS = 60 * 60 * 1000
EXPIRES_AT_MS = CREATED_AT_MS + TTL_MS
#: When the receiver opens, unless a vector says otherwise: one minute after the envelope was made.
NOW_MS = CREATED_AT_MS + 60 * 1000
SKEW_MS = envelope.Policy.clock_skew_ms
CORRELATION_ID = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0")
MESSAGE_TYPE = "hedui.v1.SealedFile"
CONTENT_RULE = "SealedFile.content[i] = i mod 251, for i = 0 .. content_length - 1"
#: Message and inner-payload bytes are written out in full up to this size; larger ones by SHA-256 only.
FULL_HEX_LIMIT = 2048
RANDOM_DOMAIN = b"hedui.v1.test-vector-random\x00"


def content(length: int) -> bytes:
    """The deterministic file content of the vectors (CONTENT_RULE)."""
    return bytes(i % 251 for i in range(length))


def signing_key(seed: bytes) -> SigningKey:
    key = _load_private(Algorithm.ED25519, seed)
    assert isinstance(key, SigningKey)
    return key


def agreement_key(seed: bytes) -> AgreementKey:
    key = _load_private(Algorithm.X25519, seed)
    assert isinstance(key, AgreementKey)
    return key


@dataclass(frozen=True)
class Draws:
    """The random bytes one seal consumes, in the order seal_with draws them."""

    message_id: bytes
    ephemeral_seed: bytes
    nonce: bytes

    @classmethod
    def for_label(cls, label: str) -> Draws:
        """SHAKE-256("hedui.v1.test-vector-random" || 0x00 || label), cut into 16 + 32 + 24 bytes."""
        stream = hashlib.shake_256(RANDOM_DOMAIN + label.encode()).digest(
            envelope.MESSAGE_ID_BYTES + prim.SEED_BYTES + prim.XNONCE_BYTES
        )
        return cls(stream[:16], stream[16:48], stream[48:])

    @property
    def ephemeral_public(self) -> bytes:
        return prim.x25519_public(self.ephemeral_seed)

    def rng(self) -> RandomSource:
        """A random source handing out exactly these bytes; any other draw order is an error."""
        queue = [self.message_id, self.ephemeral_seed, self.nonce]

        def draw(n: int) -> bytes:
            if not queue or len(queue[0]) != n:
                raise AssertionError(f"unexpected draw of {n} bytes: the sealer's draw order is not 16, 32, 24")
            return queue.pop(0)

        return draw

    def to_json(self) -> Json:
        return {
            "message_id": self.message_id.hex(),
            "ephemeral_seed": self.ephemeral_seed.hex(),
            "nonce": self.nonce.hex(),
        }


# --- receiver context ------------------------------------------------------------------------------------------


def key_json(
    key: PrivateKey,
    *,
    party_id: str | None = None,
    with_seed: bool,
    state: KeyState = KeyState.ACTIVE,
    not_before_ms: int = KEYS_NOT_BEFORE_MS,
    not_after_ms: int | None = None,
    revoked_at_ms: int | None = None,
) -> Json:
    """One key record as the vectors write it (field names and state names as in the keystore file)."""
    doc: Json = {} if party_id is None else {"party_id": party_id}
    doc["algorithm"] = key.algorithm.name
    if with_seed:
        doc["seed"] = key.expose_secret_for_export().hex()
    doc |= {
        "public": key.public.raw.hex(),
        "key_id": key.key_id.hex(),
        "state": state.name,
        "not_before_ms": not_before_ms,
        "not_after_ms": not_after_ms,
        "revoked_at_ms": revoked_at_ms,
    }
    return doc


def own_key(seed: bytes = RECIPIENT_AGREEMENT_SEED, **window: Any) -> Json:
    return key_json(agreement_key(seed), with_seed=True, **window)


def trusted_key(seed: bytes = SENDER_SIGNING_SEED, **window: Any) -> Json:
    return key_json(signing_key(seed), party_id=SENDER, with_seed=False, **window)


def receiver(
    *, now_ms: int = NOW_MS, own: list[Json] | None = None, trusted: list[Json] | None = None, opens: int = 1
) -> Json:
    """What the receiver holds and when it opens. ``opens``: times the envelope is opened with one replay cache."""
    return {
        "party_id": RECIPIENT,
        "own_keys": [own_key()] if own is None else own,
        "trusted_keys": [trusted_key()] if trusted is None else trusted,
        "now_ms": now_ms,
        "clock_skew_ms": SKEW_MS,
        "opens": opens,
    }


# --- positive vectors ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Positive:
    name: str
    description: str
    file_name: str = ""
    media_type: str = ""
    content_length: int = 0
    correlation_id: bytes = b""
    ttl_ms: int = TTL_MS
    now_ms: int = NOW_MS

    def message(self) -> media_pb2.SealedFile:
        return media_pb2.SealedFile(
            file_name=self.file_name, content=content(self.content_length), media_type=self.media_type
        )


POSITIVE: tuple[Positive, ...] = (
    Positive(
        "empty-message",
        "An empty SealedFile: the inner message encodes to zero bytes, so InnerPayload.value is omitted.",
    ),
    Positive("content-1", "One byte of content, a file name and no media type.", "a.bin", "", 1),
    Positive(
        "content-1024",
        "1 KiB of content with a non-ASCII (UTF-8) file name and a media type.",
        "低保核对-220100-名单.csv",
        "text/csv",
        1024,
    ),
    Positive(
        "content-65536",
        "64 KiB of content; the message and inner payload bytes are given by SHA-256 only.",
        "scan-0001.pdf",
        "application/pdf",
        65536,
    ),
    Positive(
        "correlation-id",
        "An answer: the header carries a 16-byte correlation id (field 13).",
        "answer.csv",
        "text/csv",
        64,
        correlation_id=CORRELATION_ID,
    ),
    Positive(
        "max-ttl",
        "The longest lifetime the format allows: expires_at_ms = created_at_ms + MAX_TTL_MS (31 days).",
        "long.txt",
        "text/plain",
        8,
        ttl_ms=envelope.MAX_TTL_MS,
        now_ms=CREATED_AT_MS + envelope.MAX_TTL_MS,
    ),
    Positive(
        "earliest-open",
        "Opened at created_at_ms - clock skew, the earliest moment a receiver with the default skew accepts.",
        "early.txt",
        "text/plain",
        8,
        now_ms=CREATED_AT_MS - SKEW_MS,
    ),
    Positive(
        "latest-open",
        "Opened at expires_at_ms + clock skew - 1, the last moment a receiver with the default skew accepts.",
        "late.txt",
        "text/plain",
        8,
        now_ms=EXPIRES_AT_MS + SKEW_MS - 1,
    ),
)


def _bytes_or_digest(name: str, data: bytes) -> Json:
    if len(data) <= FULL_HEX_LIMIT:
        return {name: data.hex(), f"{name}_sha256": prim.sha256(data).hex()}
    return {f"{name}_sha256": prim.sha256(data).hex()}


def _positive(case: Positive) -> Json:
    signer = signing_key(SENDER_SIGNING_SEED)
    recipient = agreement_key(RECIPIENT_AGREEMENT_SEED)
    draws = Draws.for_label(case.name)
    message = case.message()
    data = envelope.seal_with(
        message,
        sender=SENDER,
        signing_key=signer,
        recipient=RECIPIENT,
        recipient_key=KeyRecord(recipient.public, KeyState.ACTIVE, KEYS_NOT_BEFORE_MS),
        created_at_ms=CREATED_AT_MS,
        ttl_ms=case.ttl_ms,
        correlation_id=case.correlation_id,
        rng=draws.rng(),
    )
    outer = _canonical.parse_canonical(envelope_pb2.Envelope, data)
    message_bytes = _canonical.encode(message)
    inner = _canonical.encode(
        envelope_pb2.InnerPayload(type_url=envelope.TYPE_URL_PREFIX + MESSAGE_TYPE, value=message_bytes)
    )
    shared = prim.x25519_shared(draws.ephemeral_seed, recipient.public.raw)
    info = envelope.HKDF_INFO_PREFIX + struct.pack(">I", envelope.SUITE) + draws.ephemeral_public + recipient.public.raw
    key = envelope.payload_key(shared, draws.ephemeral_public, recipient.public.raw)
    # The intermediate values below must be the ones the sealer used; check before writing them down.
    if prim.xchacha_encrypt(key, draws.nonce, inner, outer.header) != outer.ciphertext:
        raise AssertionError(f"{case.name}: the recomputed ciphertext differs from seal_with's")
    signed = envelope.signature_input(outer.header, outer.ciphertext)
    if not signer.public.verify(outer.signature, signed):
        raise AssertionError(f"{case.name}: the signature does not verify over the recomputed input")
    return {
        "name": case.name,
        "description": case.description,
        "inputs": {
            "sender": SENDER,
            "sender_signing_seed": signer.expose_secret_for_export().hex(),
            "sender_signing_public": signer.public.raw.hex(),
            "sender_key_id": signer.key_id.hex(),
            "recipient": RECIPIENT,
            "recipient_agreement_seed": recipient.expose_secret_for_export().hex(),
            "recipient_agreement_public": recipient.public.raw.hex(),
            "recipient_key_id": recipient.key_id.hex(),
            "random": draws.to_json(),
            "created_at_ms": CREATED_AT_MS,
            "ttl_ms": case.ttl_ms,
            "correlation_id": case.correlation_id.hex(),
            "message_type": MESSAGE_TYPE,
            "message": {
                "file_name": case.file_name,
                "content_length": case.content_length,
                "media_type": case.media_type,
            },
            **_bytes_or_digest("message_bytes", message_bytes),
        },
        "intermediate": {
            "ephemeral_public": draws.ephemeral_public.hex(),
            "shared_secret": shared.hex(),
            "hkdf_info": info.hex(),
            "payload_key": key.hex(),
            "expires_at_ms": CREATED_AT_MS + case.ttl_ms,
            "header": outer.header.hex(),
            **_bytes_or_digest("inner_payload", inner),
            "ciphertext_length": len(outer.ciphertext),
            "ciphertext_sha256": prim.sha256(outer.ciphertext).hex(),
            "signature_input": signed.hex(),
            "signature": outer.signature.hex(),
        },
        "envelope": data.hex(),
        "receiver": receiver(now_ms=case.now_ms),
    }


# --- negative vectors ------------------------------------------------------------------------------------------

NEGATIVE_MESSAGE = media_pb2.SealedFile(file_name="n.txt", content=content(16), media_type="text/plain")


def _inner(message: media_pb2.SealedFile = NEGATIVE_MESSAGE, type_name: str = MESSAGE_TYPE) -> bytes:
    return _canonical.encode(
        envelope_pb2.InnerPayload(type_url=envelope.TYPE_URL_PREFIX + type_name, value=_canonical.encode(message))
    )


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _length_delimited(field: int, value: bytes) -> bytes:
    return bytes([field << 3 | 2]) + _varint(len(value)) + value


def _seal(label: str, *, recipient: str = RECIPIENT, recipient_seed: bytes = RECIPIENT_AGREEMENT_SEED) -> bytes:
    """An honest envelope of the negative vectors' small message, by seal_with."""
    return envelope.seal_with(
        NEGATIVE_MESSAGE,
        sender=SENDER,
        signing_key=signing_key(SENDER_SIGNING_SEED),
        recipient=recipient,
        recipient_key=KeyRecord(agreement_key(recipient_seed).public, KeyState.ACTIVE, KEYS_NOT_BEFORE_MS),
        created_at_ms=CREATED_AT_MS,
        ttl_ms=TTL_MS,
        rng=Draws.for_label(label).rng(),
    )


def _header(draws: Draws) -> envelope_pb2.EnvelopeHeader:
    """The header seal_with would write for ``draws``; callers change it to build what it would never write."""
    return envelope_pb2.EnvelopeHeader(
        version=envelope.VERSION,
        suite=envelope.SUITE,
        message_id=draws.message_id,
        message_type=MESSAGE_TYPE,
        sender=SENDER,
        recipient=RECIPIENT,
        sender_key_id=signing_key(SENDER_SIGNING_SEED).key_id,
        recipient_key_id=agreement_key(RECIPIENT_AGREEMENT_SEED).key_id,
        ephemeral_public_key=draws.ephemeral_public,
        nonce=draws.nonce,
        created_at_ms=CREATED_AT_MS,
        expires_at_ms=EXPIRES_AT_MS,
    )


def _encrypt(draws: Draws, header: bytes, plaintext: bytes, *, for_public: bytes | None = None) -> bytes:
    """XChaCha20-Poly1305 of ``plaintext`` under the suite-1 key for ``for_public`` (default: the recipient's)."""
    public = agreement_key(RECIPIENT_AGREEMENT_SEED).public.raw if for_public is None else for_public
    shared = prim.x25519_shared(draws.ephemeral_seed, public)
    key = envelope.payload_key(shared, draws.ephemeral_public, public)
    return prim.xchacha_encrypt(key, draws.nonce, plaintext, header)


def _sign(header: bytes, ciphertext: bytes, *, seed: bytes = SENDER_SIGNING_SEED) -> bytes:
    """Canonical Envelope bytes with a signature by ``seed`` over the suite-1 signature input."""
    signature = signing_key(seed).sign(envelope.signature_input(header, ciphertext))
    return _canonical.encode(envelope_pb2.Envelope(header=header, ciphertext=ciphertext, signature=signature))


def _forge(label: str, change: Callable[[envelope_pb2.EnvelopeHeader], None], *, suffix: bytes = b"") -> bytes:
    """Encrypt and sign correctly under a header that ``change`` (and ``suffix``) made wrong."""
    draws = Draws.for_label(label)
    header = _header(draws)
    change(header)
    header_bytes = _canonical.encode(header) + suffix
    return _sign(header_bytes, _encrypt(draws, header_bytes, _inner()))


def _mutate(data: bytes, change: Callable[[envelope_pb2.Envelope], None]) -> bytes:
    outer = _canonical.parse_canonical(envelope_pb2.Envelope, data)
    change(outer)
    return _canonical.encode(outer)


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


@dataclass(frozen=True)
class Negative:
    name: str
    error: type[EnvelopeError]
    description: str
    envelope: bytes
    receiver: Json

    def to_json(self) -> Json:
        return {
            "name": self.name,
            "error": self.error.__name__,
            "code": self.error.code,
            "description": self.description,
            "envelope": self.envelope.hex(),
            "receiver": self.receiver,
        }


def _negatives() -> list[Negative]:
    base = _seal("negative-base")
    base_nonce = Draws.for_label("negative-base").nonce
    base_outer = _canonical.parse_canonical(envelope_pb2.Envelope, base)
    plain = receiver()
    vectors: list[Negative] = []

    def add(name: str, error: type[EnvelopeError], description: str, data: bytes, context: Json = plain) -> None:
        vectors.append(Negative(name, error, description, data, context))

    # malformed: the bytes are not a canonical v1 envelope (step 1-3, before any key is looked at).
    add(
        "malformed-unknown-field",
        MalformedEnvelope,
        "The negative-base envelope followed by an empty field 4 (bytes 22 00): parses, but is not canonical.",
        base + b"\x22\x00",
    )
    add(
        "malformed-fields-out-of-order",
        MalformedEnvelope,
        "The negative-base envelope's three fields in the order signature, header, ciphertext.",
        _length_delimited(3, base_outer.signature)
        + _length_delimited(1, base_outer.header)
        + _length_delimited(2, base_outer.ciphertext),
    )
    add(
        "malformed-non-minimal-length",
        MalformedEnvelope,
        "The negative-base envelope with the signature length written as the two-byte varint c0 00.",
        _length_delimited(1, base_outer.header)
        + _length_delimited(2, base_outer.ciphertext)
        + b"\x1a\xc0\x00"
        + base_outer.signature,
    )
    add(
        "malformed-short-signature",
        MalformedEnvelope,
        "The negative-base envelope with the last byte of the signature removed (63 bytes).",
        _mutate(base, lambda e: setattr(e, "signature", e.signature[:-1])),
    )
    add(
        "malformed-short-signature-before-version",
        MalformedEnvelope,
        "Header version 2, and the signature's last byte removed (63 bytes): the part sizes (step 2c) are checked "
        "before the version (step 3b), so this is malformed, not unsupported.",
        _mutate(
            _forge("malformed-short-signature-before-version", lambda h: setattr(h, "version", 2)),
            lambda e: setattr(e, "signature", e.signature[:-1]),
        ),
    )
    add(
        "malformed-header-explicit-default",
        MalformedEnvelope,
        "Header ends with an explicitly encoded empty correlation_id (6a 00); encrypted and signed correctly.",
        _forge("malformed-header-explicit-default", lambda h: None, suffix=b"\x6a\x00"),
    )
    add(
        "malformed-message-id-length",
        MalformedEnvelope,
        "Header message_id of 15 bytes; encrypted and signed correctly.",
        _forge("malformed-message-id-length", lambda h: setattr(h, "message_id", h.message_id[:15])),
    )
    add(
        "malformed-party-id",
        MalformedEnvelope,
        "Header sender 'Agency.220000' (upper case is not allowed in a party id); encrypted and signed correctly.",
        _forge("malformed-party-id", lambda h: setattr(h, "sender", "Agency.220000")),
    )
    add(
        "malformed-lifetime-over-31-days",
        MalformedEnvelope,
        "expires_at_ms = created_at_ms + MAX_TTL_MS + 1; encrypted and signed correctly.",
        _forge(
            "malformed-lifetime-over-31-days",
            lambda h: setattr(h, "expires_at_ms", CREATED_AT_MS + envelope.MAX_TTL_MS + 1),
        ),
    )
    # unsupported: version or suite this build does not implement.
    add(
        "unsupported-version",
        UnsupportedEnvelope,
        "Header version 2; otherwise a correct suite-1 envelope.",
        _forge("unsupported-version", lambda h: setattr(h, "version", 2)),
    )
    add(
        "unsupported-suite",
        UnsupportedEnvelope,
        "Header suite 2 (not defined); otherwise a correct suite-1 envelope.",
        _forge("unsupported-suite", lambda h: setattr(h, "suite", envelope_pb2.Suite.ValueType(2))),
    )
    # wrong_recipient
    add(
        "wrong-recipient-other-party",
        WrongRecipient,
        f"Sealed for {OTHER_RECIPIENT} (with the receiver's own key); the receiver is {RECIPIENT}.",
        _seal("wrong-recipient-other-party", recipient=OTHER_RECIPIENT),
    )
    add(
        "wrong-recipient-key-not-held",
        WrongRecipient,
        "Sealed for a key-agreement key of the receiver's party whose private key the receiver does not hold.",
        _seal("wrong-recipient-key-not-held", recipient_seed=RECIPIENT_OTHER_AGREEMENT_SEED),
    )
    add(
        "wrong-recipient-own-key-retired",
        WrongRecipient,
        "The negative-base envelope; the receiver's key-agreement key has retired, so its private key is erased.",
        base,
        receiver(own=[own_key(state=KeyState.RETIRED, not_after_ms=CREATED_AT_MS + 30_000)]),
    )
    # unknown_key
    add(
        "unknown-key",
        UnknownKey,
        "The negative-base envelope; the trust store holds another signing key of the sender, not this one.",
        base,
        receiver(trusted=[trusted_key(SENDER_OTHER_SIGNING_SEED)]),
    )
    add(
        "unknown-sender",
        UnknownKey,
        "The negative-base envelope; the trust store holds no keys at all.",
        base,
        receiver(trusted=[]),
    )
    # revoked_key
    add(
        "revoked-sender-key",
        RevokedKey,
        "The negative-base envelope; the sender's key was revoked ten minutes after created_at (revocation is "
        "retroactive).",
        base,
        receiver(trusted=[trusted_key(state=KeyState.REVOKED, revoked_at_ms=CREATED_AT_MS + 600_000)]),
    )
    add(
        "revoked-own-key",
        RevokedKey,
        "The negative-base envelope; the receiver's key-agreement key it was sealed for has been revoked.",
        base,
        receiver(own=[own_key(state=KeyState.REVOKED, revoked_at_ms=CREATED_AT_MS + 30_000)]),
    )
    # key_not_valid
    add(
        "key-not-valid-after-window",
        KeyNotValidThen,
        "The negative-base envelope; the sender's key is retiring and its window ended exactly at created_at "
        "(not_after is exclusive).",
        base,
        receiver(trusted=[trusted_key(state=KeyState.RETIRING, not_after_ms=CREATED_AT_MS)]),
    )
    add(
        "key-not-valid-before-window",
        KeyNotValidThen,
        "The negative-base envelope; the sender's key is pending, valid from 1 ms after created_at.",
        base,
        receiver(trusted=[trusted_key(state=KeyState.PENDING, not_before_ms=CREATED_AT_MS + 1)]),
    )
    # bad_signature
    add(
        "bad-signature-flipped-bit",
        BadSignature,
        "The negative-base envelope with the lowest bit of the first signature byte flipped.",
        _mutate(base, lambda e: setattr(e, "signature", _flip(e.signature, 0))),
    )
    add(
        "bad-signature-ciphertext-changed",
        BadSignature,
        "The negative-base envelope with one ciphertext bit flipped: the signature covers the ciphertext, so "
        "this is caught before any decryption.",
        _mutate(base, lambda e: setattr(e, "ciphertext", _flip(e.ciphertext, 0))),
    )
    add(
        "bad-signature-header-changed",
        BadSignature,
        "The negative-base envelope with one bit of the header's nonce flipped (still canonical).",
        _mutate(base, lambda e: setattr(e, "header", _flip(e.header, e.header.index(base_nonce)))),
    )
    draws = Draws.for_label("bad-signature-other-key")
    header = _canonical.encode(_header(draws))
    add(
        "bad-signature-other-key",
        BadSignature,
        "Header names the trusted signing key; the signature is made with another key of the sender.",
        _sign(header, _encrypt(draws, header, _inner()), seed=SENDER_OTHER_SIGNING_SEED),
    )
    # expired / not_yet_valid
    add(
        "expired",
        ExpiredEnvelope,
        "The negative-base envelope opened at expires_at_ms + clock skew, the first moment it is expired.",
        base,
        receiver(now_ms=EXPIRES_AT_MS + SKEW_MS),
    )
    add(
        "not-yet-valid",
        NotYetValidEnvelope,
        "The negative-base envelope opened at created_at_ms - clock skew - 1.",
        base,
        receiver(now_ms=CREATED_AT_MS - SKEW_MS - 1),
    )
    # replay
    add(
        "replay",
        ReplayedEnvelope,
        "The negative-base envelope opened twice with the same replay cache: the first open succeeds, the second "
        "fails.",
        base,
        receiver(opens=2),
    )
    # undecryptable: valid signature, but the payload does not decrypt for the receiver.
    draws = Draws.for_label("undecryptable-wrong-key")
    header = _canonical.encode(_header(draws))
    other_public = agreement_key(RECIPIENT_OTHER_AGREEMENT_SEED).public.raw
    add(
        "undecryptable-wrong-key",
        UndecryptableEnvelope,
        "Header names the receiver's key, but the payload key was derived for another X25519 key; signed correctly.",
        _sign(header, _encrypt(draws, header, _inner(), for_public=other_public)),
    )
    draws = Draws.for_label("undecryptable-other-aad")
    header_message = _header(draws)
    aad = _canonical.encode(header_message)
    header_message.created_at_ms += 1
    header = _canonical.encode(header_message)
    add(
        "undecryptable-other-aad",
        UndecryptableEnvelope,
        "Encrypted with a header whose created_at_ms was 1 ms earlier as associated data, then the changed "
        "header was signed.",
        _sign(header, _encrypt(draws, aad, _inner())),
    )
    draws = Draws.for_label("undecryptable-low-order-point")
    header_message = _header(draws)
    header_message.ephemeral_public_key = bytes(prim.PUBLIC_KEY_BYTES)
    header = _canonical.encode(header_message)
    garbage_key = prim.sha256(b"no key agreement gives this key")
    add(
        "undecryptable-low-order-point",
        UndecryptableEnvelope,
        "Ephemeral public key is 32 zero bytes (a low-order point): X25519 gives the all-zero value, which is "
        "refused. Signed correctly.",
        _sign(header, prim.xchacha_encrypt(garbage_key, draws.nonce, _inner(), header)),
    )
    # type_mismatch: decrypts, but the plaintext is not the message the signed header announced.
    draws = Draws.for_label("type-mismatch-other-type")
    header = _canonical.encode(_header(draws))
    add(
        "type-mismatch-other-type",
        TypeMismatch,
        "Header announces hedui.v1.SealedFile; the inner type_url is type.googleapis.com/hedui.v1.QueryBatch.",
        _sign(header, _encrypt(draws, header, _inner(type_name="hedui.v1.QueryBatch"))),
    )
    draws = Draws.for_label("type-mismatch-not-canonical")
    header = _canonical.encode(_header(draws))
    inner = envelope_pb2.InnerPayload.FromString(_inner())
    swapped = _length_delimited(2, inner.value) + _length_delimited(1, inner.type_url.encode())
    add(
        "type-mismatch-not-canonical",
        TypeMismatch,
        "The inner payload's two fields are in the order value, type_url: decrypts, but is not canonical.",
        _sign(header, _encrypt(draws, header, swapped)),
    )
    return vectors


# --- the document ----------------------------------------------------------------------------------------------


def build_vectors() -> Json:
    """The whole vector document, as written to tests/vectors/envelope_v1.json."""
    return {
        "format": FORMAT,
        "specification": "docs/envelope.md",
        "regenerate": "python scripts/make_vectors.py",
        "conventions": [
            "Byte strings are lower-case hex; texts are JSON strings; times are milliseconds since the epoch (UTC).",
            "Positive vectors: seal with the inputs (random bytes drawn in the order message_id, ephemeral_seed, "
            "nonce) and compare every intermediate value and the envelope; open the envelope as the receiver.",
            "Negative vectors: set up the receiver as described, open the envelope 'opens' times with one replay "
            "cache; every open but the last succeeds and the last fails with 'error' (reason 'code').",
            "Receiver: 'own_keys' are its key-agreement keys with their private seeds, 'trusted_keys' the senders' "
            "public signing keys in its trust store; states and windows as in docs/keys.md.",
            f"Message content: {CONTENT_RULE}; message_bytes and inner_payload are omitted above "
            f"{FULL_HEX_LIMIT} bytes (their SHA-256 is always given).",
            "The 'negative-base' envelope used by many negative vectors is seal_with of the small SealedFile "
            "{file_name 'n.txt', content of 16 bytes, media_type 'text/plain'} with the random bytes of the label "
            "'negative-base'; forged envelopes use the random bytes of their own name.",
        ],
        "constants": {
            "version": envelope.VERSION,
            "suite": envelope.SUITE,
            "signature_domain": envelope.SIGNATURE_DOMAIN.hex(),
            "hkdf_salt": envelope.HKDF_SALT.hex(),
            "hkdf_info_prefix": envelope.HKDF_INFO_PREFIX.hex(),
            "type_url_prefix": envelope.TYPE_URL_PREFIX,
            "random_domain": RANDOM_DOMAIN.hex(),
            "max_header_bytes": envelope.MAX_HEADER_BYTES,
            "max_payload_bytes": envelope.MAX_PAYLOAD_BYTES,
            "max_envelope_bytes": envelope.MAX_ENVELOPE_BYTES,
            "max_ttl_ms": envelope.MAX_TTL_MS,
            "max_message_type_length": envelope.MAX_MESSAGE_TYPE_LENGTH,
            "default_clock_skew_ms": SKEW_MS,
        },
        "positive": [_positive(case) for case in POSITIVE],
        "negative": [vector.to_json() for vector in _negatives()],
    }


def render(vectors: Json) -> str:
    """The exact text of the vector file."""
    return json.dumps(vectors, indent=2, ensure_ascii=False) + "\n"
