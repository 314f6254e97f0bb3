"""Sealed envelope v1: seal a protobuf message for one recipient, open one sent to us.

The normative specification is docs/envelope.md; this module implements it. In short:

* seal:  fresh X25519 ephemeral key -> X25519 with the recipient's key-agreement key -> HKDF-SHA256 (fixed salt,
  info binding the suite and both public keys) -> XChaCha20-Poly1305 over the inner payload with the header bytes
  as associated data -> Ed25519 over "hedui.v1.envelope-signature" || 0x00 || u32be(len(header)) || header ||
  SHA-256(ciphertext).
* open:  parse -> version/suite -> canonical header -> recipient is us -> sender key known, not revoked, valid at
  created-at -> signature -> time window -> replay -> decrypt -> inner type. Nothing is decrypted before the
  signature of a trusted sender has verified.

The signature covers a digest of the ciphertext rather than the ciphertext itself: Ed25519 hashes its input twice
when signing, and the envelope must cost one hash pass per side (docs/performance.md).
"""

from __future__ import annotations

import logging
import os
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from google.protobuf.message import Message
from hedui.v1 import envelope_pb2

from keys import _canonical, _framing
from keys import _primitives as prim
from keys.clock import MINUTE_MS, Clock, SystemClock
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
    UnknownRecipientKey,
    UnsupportedEnvelope,
    WrongRecipient,
)
from keys.fingerprint import KEY_ID_BYTES
from keys.handles import RandomSource, SigningKey
from keys.identity import PartyKeys
from keys.keyring import KeyRecord, KeyState
from keys.party import is_party_id
from keys.replay import ReplayCache
from keys.truststore import TrustStore

log = logging.getLogger("hedui.keys.envelope")

VERSION = 1
SUITE = envelope_pb2.SUITE_ED25519_X25519_HKDF_SHA256_XCHACHA20POLY1305

# Fixed limits of format v1 (docs/envelope.md, "Limits").
MAX_HEADER_BYTES = 1024
MAX_PAYLOAD_BYTES = 32 * 1024 * 1024
MAX_ENVELOPE_BYTES = MAX_PAYLOAD_BYTES + 4096
MAX_TTL_MS = 31 * 24 * 60 * MINUTE_MS
MAX_MESSAGE_TYPE_LENGTH = 128
MESSAGE_ID_BYTES = 16
CORRELATION_ID_BYTES = 16

SIGNATURE_DOMAIN = b"hedui.v1.envelope-signature\x00"
HKDF_SALT = b"hedui.v1.envelope-hkdf-salt"
HKDF_INFO_PREFIX = b"hedui.v1.envelope-payload-key\x00"
TYPE_URL_PREFIX = "type.googleapis.com/"

_MESSAGE_TYPE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


@dataclass(frozen=True)
class Policy:
    """Receiver-side choices within the fixed limits of the format."""

    #: How far a sender's clock may differ from ours, in both directions.
    clock_skew_ms: int = 5 * MINUTE_MS
    #: Lifetime given to envelopes we seal when the caller names none.
    default_ttl_ms: int = 60 * MINUTE_MS
    #: Oldest ``created_at_ms`` accepted (step 7c: expired when ``now >= created_at_ms + max_age_ms + skew``),
    #: whatever lifetime the sender chose; None: only the format's 31 days. The online services set their envelope
    #: lifetime here, so a retired (erased, possibly leaked) signing key cannot sign a backdated envelope that opens
    #: weeks after its retirement; sealed files (section 16) keep None.
    max_age_ms: int | None = None

    @staticmethod
    def online(envelope_ttl_ms: int) -> Policy:
        """The policy of an online exchange service whose envelopes live ``envelope_ttl_ms``: envelopes older than
        that (plus the clock skew) are expired."""
        return Policy(default_ttl_ms=envelope_ttl_ms, max_age_ms=envelope_ttl_ms)


@dataclass(frozen=True)
class Header:
    """The checked header of an opened envelope (a view of EnvelopeHeader; all sizes already validated)."""

    message_id: bytes
    message_type: str
    sender: str
    recipient: str
    sender_key_id: bytes
    recipient_key_id: bytes
    created_at_ms: int
    expires_at_ms: int
    correlation_id: bytes


@dataclass(frozen=True)
class Opened:
    """An envelope that passed every check: who sent what, and the exact bytes that prove it."""

    header: Header
    #: The inner message, parsed into the class the caller expected for its type (None if it named none).
    message: Message | None
    #: The envelope as received, for the archive.
    raw: bytes = field(repr=False)
    #: The inner message's bytes as the sender encoded them, viewed in the decryption buffer.
    payload_view: memoryview = field(repr=False, compare=False)

    @property
    def payload(self) -> bytes:
        """The inner message's encoding as sent (a copy; large payloads are parsed from ``payload_view``)."""
        return bytes(self.payload_view)


def signature_input(header: bytes, ciphertext: bytes | memoryview) -> bytes:
    """What the sender signs: domain, header length, header, SHA-256 of the ciphertext."""
    return SIGNATURE_DOMAIN + struct.pack(">I", len(header)) + header + prim.sha256(ciphertext)


def payload_key(shared: bytes, ephemeral_public: bytes, recipient_public: bytes) -> bytes:
    """HKDF-SHA256 key schedule of suite 1."""
    info = HKDF_INFO_PREFIX + struct.pack(">I", SUITE) + ephemeral_public + recipient_public
    return prim.hkdf_sha256(shared, salt=HKDF_SALT, info=info)


def message_type_of(message: Message) -> str:
    return message.DESCRIPTOR.full_name


def seal_with(
    message: Message,
    *,
    sender: str,
    signing_key: SigningKey,
    recipient: str,
    recipient_key: KeyRecord,
    created_at_ms: int,
    ttl_ms: int,
    correlation_id: bytes = b"",
    rng: RandomSource = os.urandom,
) -> bytes:
    """Seal ``message`` with explicit keys and time. Most callers use :class:`Courier` instead.

    Randomness is drawn in a fixed order (message id 16, ephemeral seed 32, nonce 24 bytes), which the test
    vectors rely on.
    """
    if not (is_party_id(sender) and is_party_id(recipient)):
        raise ValueError("sender and recipient must be party ids")
    if created_at_ms <= 0:
        raise ValueError("created_at must be after the epoch")
    if not 0 < ttl_ms <= MAX_TTL_MS:
        raise ValueError("ttl must be positive and at most 31 days")
    if correlation_id and len(correlation_id) != CORRELATION_ID_BYTES:
        raise ValueError("correlation id must be 16 bytes or empty")
    if recipient_key.public.algorithm.name != "X25519":
        raise ValueError("envelopes are sealed for a key-agreement (X25519) key")
    message_type = message_type_of(message)
    value = _canonical.encode(message)
    inner = _framing.encode((TYPE_URL_PREFIX + message_type).encode(), value)
    if len(inner) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"message is larger than the envelope limit of {MAX_PAYLOAD_BYTES} bytes")
    message_id = rng(MESSAGE_ID_BYTES)
    ephemeral_seed = rng(prim.SEED_BYTES)
    nonce = rng(prim.XNONCE_BYTES)
    ephemeral_public = prim.x25519_public(ephemeral_seed)
    header = _canonical.encode(
        envelope_pb2.EnvelopeHeader(
            version=VERSION,
            suite=SUITE,
            message_id=message_id,
            message_type=message_type,
            sender=sender,
            recipient=recipient,
            sender_key_id=signing_key.key_id,
            recipient_key_id=recipient_key.key_id,
            ephemeral_public_key=ephemeral_public,
            nonce=nonce,
            created_at_ms=created_at_ms,
            expires_at_ms=created_at_ms + ttl_ms,
            correlation_id=correlation_id,
        )
    )
    shared = prim.x25519_shared(ephemeral_seed, recipient_key.public.raw)
    key = payload_key(shared, ephemeral_public, recipient_key.public.raw)
    ciphertext = prim.xchacha_encrypt(key, nonce, inner, header)
    signature = signing_key.sign(signature_input(header, ciphertext))
    return _framing.encode(header, ciphertext, signature)


@dataclass(frozen=True)
class _Outer:
    header: bytes
    #: A view into the received bytes: the ciphertext is hashed and decrypted in place, never copied.
    ciphertext: memoryview
    signature: bytes


def _parse(data: bytes) -> tuple[_Outer, envelope_pb2.EnvelopeHeader]:
    """Steps 1-3 of docs/envelope.md section 10, in its order: size, outer structure and part sizes, version and
    suite, canonical header with valid field sizes."""
    if len(data) > MAX_ENVELOPE_BYTES:
        raise MalformedEnvelope("envelope is over the size limit")
    try:
        header_view, ciphertext, signature = _framing.decode_views(data, 3)
        outer = _Outer(bytes(header_view), ciphertext, bytes(signature))
    except _framing.FramingError as exc:
        raise MalformedEnvelope("envelope is not canonically encoded") from exc
    if not 0 < len(outer.header) <= MAX_HEADER_BYTES:
        raise MalformedEnvelope("header is missing or over the size limit")
    if len(outer.signature) != prim.SIGNATURE_BYTES:
        raise MalformedEnvelope("signature has the wrong length")
    if not prim.AEAD_TAG_BYTES <= len(outer.ciphertext) <= MAX_PAYLOAD_BYTES + prim.AEAD_TAG_BYTES:
        raise MalformedEnvelope("ciphertext is shorter than a tag or over the size limit")
    try:
        header = _canonical.parse(envelope_pb2.EnvelopeHeader, outer.header)
    except _canonical.NotCanonical as exc:
        raise MalformedEnvelope("header does not parse") from exc
    if header.version != VERSION:
        raise UnsupportedEnvelope(f"format version {header.version} is not supported")
    if header.suite != SUITE:
        raise UnsupportedEnvelope(f"cipher suite {header.suite} is not supported")
    try:
        _canonical.require_canonical(header, outer.header)
    except _canonical.NotCanonical as exc:
        raise MalformedEnvelope("header is not canonically encoded") from exc
    sizes_ok = (
        len(header.message_id) == MESSAGE_ID_BYTES
        and len(header.sender_key_id) == KEY_ID_BYTES
        and len(header.recipient_key_id) == KEY_ID_BYTES
        and len(header.ephemeral_public_key) == prim.PUBLIC_KEY_BYTES
        and len(header.nonce) == prim.XNONCE_BYTES
        and len(header.correlation_id) in (0, CORRELATION_ID_BYTES)
    )
    if not sizes_ok:
        raise MalformedEnvelope("a header field has the wrong length")
    if not (is_party_id(header.sender) and is_party_id(header.recipient)):
        raise MalformedEnvelope("sender or recipient is not a valid party id")
    if len(header.message_type) > MAX_MESSAGE_TYPE_LENGTH or not _MESSAGE_TYPE_RE.fullmatch(header.message_type):
        raise MalformedEnvelope("message type is not a protobuf message name")
    if not 0 < header.created_at_ms < header.expires_at_ms <= header.created_at_ms + MAX_TTL_MS:
        raise MalformedEnvelope("created/expires times are out of order or the lifetime is over 31 days")
    return outer, header


def message_id_of(data: bytes) -> bytes:
    """The message id of a well-formed envelope, unauthenticated: for one we sealed ourselves, to match replies
    (their correlation id) against it. Raises MalformedEnvelope or UnsupportedEnvelope."""
    return _parse(data)[1].message_id


def _sender_key(trust: TrustStore, header: envelope_pb2.EnvelopeHeader) -> KeyRecord:
    record = trust.signing_record(header.sender, header.sender_key_id)
    if record is None:
        raise UnknownKey("sender signing key is not in the trust store")
    if record.state is KeyState.REVOKED:
        raise RevokedKey("sender signing key is revoked")
    if not record.valid_at(header.created_at_ms):
        raise KeyNotValidThen("sender signing key was not valid at the envelope's created-at time")
    return record


def open_at(
    data: bytes,
    *,
    me: PartyKeys,
    trust: TrustStore,
    replay: ReplayCache,
    now_ms: int,
    expect: Mapping[str, type[Message]] | None = None,
    clock_skew_ms: int = Policy.clock_skew_ms,
    max_age_ms: int | None = None,
) -> Opened:
    """Open an envelope addressed to ``me`` at time ``now_ms``; raises an EnvelopeError subclass on any failure.

    ``expect`` maps the message types the caller accepts to their classes; when given, any other type is a
    TypeMismatch and the inner message is parsed into the class. ``max_age_ms`` (Policy.max_age_ms): an envelope
    created longer ago than that (plus the skew) is expired, whatever its lifetime.
    """
    outer, header = _parse(data)
    # Step 4: addressed to us, for a key-agreement key we still hold.
    if header.recipient != me.party_id:
        raise WrongRecipient("envelope is addressed to another party")
    own = me.record(header.recipient_key_id)
    if own is not None and own.state is KeyState.REVOKED:
        raise RevokedKey("envelope is sealed for one of our keys that has been revoked")
    agreement = me.agreement_secret(header.recipient_key_id)
    if agreement is None:
        raise UnknownRecipientKey("envelope is sealed for a key we do not hold (unknown or retired)")
    # Steps 5-6: a trusted sender key, then its signature. Nothing below runs for a forged envelope.
    sender = _sender_key(trust, header)
    if not sender.public.verify(outer.signature, signature_input(outer.header, outer.ciphertext)):
        raise BadSignature("signature does not verify")
    # Step 7: time window.
    if now_ms < header.created_at_ms - clock_skew_ms:
        raise NotYetValidEnvelope("created-at lies in the future beyond the allowed clock skew")
    if now_ms >= header.expires_at_ms + clock_skew_ms:
        raise ExpiredEnvelope("envelope has expired")
    if max_age_ms is not None and now_ms >= header.created_at_ms + max_age_ms + clock_skew_ms:
        raise ExpiredEnvelope("envelope is older than this receiver accepts")
    # Step 8: replay.
    if not replay.remember(
        header.sender, header.message_id, keep_until_ms=header.expires_at_ms + clock_skew_ms, now_ms=now_ms
    ):
        raise ReplayedEnvelope("message id was seen before")
    # Step 9: decrypt.
    try:
        shared = agreement._shared_secret(header.ephemeral_public_key)
        key = payload_key(shared, header.ephemeral_public_key, agreement.public.raw)
        inner_bytes = prim.xchacha_decrypt_view(key, header.nonce, outer.ciphertext, outer.header)
    except prim.PrimitiveFailure as exc:
        raise UndecryptableEnvelope("payload does not decrypt") from exc
    # Step 10: the inner type is the one the signed header announced (and one the caller accepts).
    try:
        type_url, value = _framing.decode_views(inner_bytes, 2)
    except _framing.FramingError as exc:
        raise TypeMismatch("inner payload is not a typed message") from exc
    if type_url != (TYPE_URL_PREFIX + header.message_type).encode():  # memoryview == bytes compares contents
        raise TypeMismatch("inner message type differs from the header's")
    message: Message | None = None
    if expect is not None:
        cls = expect.get(header.message_type)
        if cls is None:
            raise TypeMismatch("message type is not one this endpoint accepts")
        try:
            message = cls.FromString(value)  # type: ignore[arg-type]  # upb parses any buffer
        except Exception as exc:  # protobuf raises DecodeError, or RuntimeError from upb
            raise TypeMismatch("inner message does not parse as its announced type") from exc
    return Opened(
        header=_header(header),
        message=message,
        raw=data,
        payload_view=value,
    )


def _log_rejection(error: EnvelopeError) -> None:
    # Reason code only: the envelope may carry personal data and the sender may be probing.
    log.warning("envelope refused", extra={"reason": error.code})


class Courier:
    """Seals and opens envelopes for one party, with its keys, trust store, replay cache, clock and randomness."""

    def __init__(
        self,
        me: PartyKeys,
        trust: TrustStore,
        *,
        replay: ReplayCache,
        clock: Clock | None = None,
        rng: RandomSource = os.urandom,
        policy: Policy | None = None,
        on_reject: Callable[[EnvelopeError], None] = _log_rejection,
    ) -> None:
        self.me = me
        self.trust = trust
        self.replay = replay
        self.clock: Clock = clock or SystemClock()
        self.rng = rng
        self.policy = policy or Policy()
        self.on_reject = on_reject

    def seal(
        self, message: Message, recipient: str, *, ttl_ms: int | None = None, correlation_id: bytes = b""
    ) -> bytes:
        """Seal ``message`` for the current key-agreement key of ``recipient`` in the trust store."""
        now = self.clock.now_ms()
        return seal_with(
            message,
            sender=self.me.party_id,
            signing_key=self.me.signing_key(now),
            recipient=recipient,
            recipient_key=self.trust.agreement_key_for(recipient, now),
            created_at_ms=now,
            ttl_ms=self.policy.default_ttl_ms if ttl_ms is None else ttl_ms,
            correlation_id=correlation_id,
            rng=self.rng,
        )

    def open(self, data: bytes, *, expect: Mapping[str, type[Message]] | None = None) -> Opened:
        """Open an envelope sent to us now; on refusal reports the reason to ``on_reject`` and re-raises."""
        try:
            return open_at(
                data,
                me=self.me,
                trust=self.trust,
                replay=self.replay,
                now_ms=self.clock.now_ms(),
                expect=expect,
                clock_skew_ms=self.policy.clock_skew_ms,
                max_age_ms=self.policy.max_age_ms,
            )
        except EnvelopeError as error:
            self.on_reject(error)
            raise


def check_signature(data: bytes, trust: TrustStore) -> Header:
    """Re-check an archived envelope without opening it: steps 1-3 and 5-6 of docs/envelope.md section 10 (parse,
    the sender's signing key in ``trust`` known, not revoked and valid at the envelope's created-at time, the
    signature over header and ciphertext). Raises the EnvelopeError of the first step that fails.

    Nothing is decrypted, so this works for envelopes we sent (put our own keyring in ``trust``) and long after the
    fact: recipient, time window and replay belong to the moment of receipt and are not checked.
    """
    outer, header = _parse(data)
    sender = _sender_key(trust, header)
    if not sender.public.verify(outer.signature, signature_input(outer.header, outer.ciphertext)):
        raise BadSignature("signature does not verify")
    return _header(header)


def _header(header: envelope_pb2.EnvelopeHeader) -> Header:
    """The project's view of a checked header."""
    return Header(
        message_id=header.message_id,
        message_type=header.message_type,
        sender=header.sender,
        recipient=header.recipient,
        sender_key_id=header.sender_key_id,
        recipient_key_id=header.recipient_key_id,
        created_at_ms=header.created_at_ms,
        expires_at_ms=header.expires_at_ms,
        correlation_id=header.correlation_id,
    )
