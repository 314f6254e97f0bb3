"""Sealed envelope v1: round trips, tampering, time window, replay, trust decisions, rejection reporting, rotation."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import struct
from collections.abc import Callable, Iterable
from typing import TypeVar

import nacl.bindings
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hedui.v1 import envelope_pb2, keys_pb2, media_pb2
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from keys import (
    ENVELOPE_ERRORS,
    Algorithm,
    BadSignature,
    Courier,
    EnvelopeError,
    ExpiredEnvelope,
    KeyNotValidThen,
    MalformedEnvelope,
    MemoryReplayCache,
    NotYetValidEnvelope,
    Opened,
    ReplayedEnvelope,
    RevokedKey,
    SigningKey,
    TypeMismatch,
    UndecryptableEnvelope,
    UnknownKey,
    WrongRecipient,
    open_at,
    seal_with,
)
from keys.announcements import sign_announcement
from keys.clock import DAY_MS, HOUR_MS, MINUTE_MS
from keys.envelope import MAX_ENVELOPE_BYTES, MAX_HEADER_BYTES, MAX_TTL_MS, Policy, signature_input
from keys.errors import KeyStateError, TrustError
from keys.handles import AgreementKey
from keys.identity import PartyKeys
from keys.keyring import KeyRecord, KeyState
from tests.conftest import UNIT_ID, Pair, Side, real_fingerprint

E = TypeVar("E", bound=EnvelopeError)

SKEW_MS = Policy().clock_skew_ms
EXPECT_FILE = {"hedui.v1.SealedFile": media_pb2.SealedFile}
HYPOTHESIS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def open_fresh(data: bytes, side: Side, now_ms: int) -> Opened:
    """Open as ``side`` with a replay cache of its own, so that one envelope can be tried many times."""
    return open_at(data, me=side.keys, trust=side.trust, replay=MemoryReplayCache(), now_ms=now_ms)


def refused_with(error: type[E], attempt: Callable[[], object]) -> E:
    """Run ``attempt``; it must raise ``error`` with that error's code (a subclass that only adds the "refresh keys"
    hint, such as UnknownRecipientKey of WrongRecipient, is the same refusal), whose public message is the uniform
    one."""
    with pytest.raises(error) as caught:
        attempt()
    assert caught.value.code == error.code, f"expected {error.__name__}, got {type(caught.value).__name__}"
    assert caught.value.public_message == "invalid envelope"
    return caught.value


def not_refused_properly(candidates: Iterable[tuple[str, bytes]], side: Side, now_ms: int) -> list[str]:
    """Names of the candidates that opened, or failed with something other than an EnvelopeError."""
    problems = []
    for name, data in candidates:
        try:
            open_fresh(data, side, now_ms)
        except EnvelopeError:
            continue
        except Exception as exc:
            problems.append(f"{name}: {type(exc).__name__}: {exc}")
        else:
            problems.append(f"{name}: accepted")
    return problems


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number: int, wire_type: int, payload: bytes) -> bytes:
    """One protobuf field, hand-encoded (wire type 0: payload is the varint; 2: length-delimited)."""
    tag = varint(number << 3 | wire_type)
    return tag + (payload if wire_type == 0 else varint(len(payload)) + payload)


@pytest.fixture
def clock_now(pair: Pair) -> int:
    return pair.clock.now_ms()


def fingerprint_of(side: Side) -> str:
    return real_fingerprint(side.keys)


@pytest.fixture
def envelope(agency: Side, sealed_file: media_pb2.SealedFile) -> bytes:
    """One envelope from the agency to the unit, sealed at the fixture clock's start."""
    return agency.courier.seal(sealed_file, UNIT_ID, ttl_ms=10 * MINUTE_MS)


# --- round trips -----------------------------------------------------------------------------------------------


@HYPOTHESIS
@given(
    file_name=st.text(max_size=80),
    content=st.binary(max_size=4096),
    media_type=st.text(max_size=40),
    ttl_ms=st.integers(1, MAX_TTL_MS),
    correlation_id=st.one_of(st.just(b""), st.binary(min_size=16, max_size=16)),
)
def test_seal_then_open_returns_the_inner_message_and_header_fields(
    pair: Pair, file_name: str, content: bytes, media_type: str, ttl_ms: int, correlation_id: bytes
) -> None:
    agency, unit, now = pair.agency, pair.unit, pair.clock.now_ms()
    message = media_pb2.SealedFile(file_name=file_name, content=content, media_type=media_type)
    data = agency.courier.seal(message, unit.party_id, ttl_ms=ttl_ms, correlation_id=correlation_id)

    opened = unit.courier.open(data, expect=EXPECT_FILE)

    assert opened.message == message
    assert opened.payload == message.SerializeToString(deterministic=True)
    assert opened.raw == data
    header = opened.header
    assert (header.sender, header.recipient) == (agency.party_id, unit.party_id)
    assert header.message_type == "hedui.v1.SealedFile"
    assert header.sender_key_id == agency.keys.signing_key(now).key_id
    assert header.recipient_key_id == unit.keys.agreement_public(now).key_id
    assert (header.created_at_ms, header.expires_at_ms) == (now, now + ttl_ms)
    assert header.correlation_id == correlation_id
    assert len(header.message_id) == 16


@HYPOTHESIS
@given(content=st.binary(max_size=2048), file_name=st.text(max_size=40))
def test_seal_then_open_without_expect_returns_canonical_payload_and_no_message(
    pair: Pair, content: bytes, file_name: str
) -> None:
    message = media_pb2.SealedFile(file_name=file_name, content=content)
    opened = pair.agency.courier.open(pair.unit.courier.seal(message, pair.agency.party_id))

    assert opened.message is None
    assert media_pb2.SealedFile.FromString(opened.payload) == message
    assert opened.header.sender == pair.unit.party_id


def test_every_seal_draws_a_fresh_message_id_and_ciphertext(agency: Side, sealed_file: media_pb2.SealedFile) -> None:
    sealed = [agency.courier.seal(sealed_file, UNIT_ID) for _ in range(8)]
    parsed = [envelope_pb2.Envelope.FromString(data) for data in sealed]
    headers = [envelope_pb2.EnvelopeHeader.FromString(p.header) for p in parsed]
    assert len({h.message_id for h in headers}) == 8
    assert len({h.ephemeral_public_key for h in headers}) == 8
    assert len({p.ciphertext for p in parsed}) == 8


# --- tampering -------------------------------------------------------------------------------------------------


def test_every_single_bit_flip_is_refused(envelope: bytes, unit: Side, clock_now: int) -> None:
    assert open_fresh(envelope, unit, clock_now).header.sender == "agency.220000"  # the original is fine
    flips = []
    for position in range(len(envelope)):
        for bit in range(8):
            mutated = bytearray(envelope)
            mutated[position] ^= 1 << bit
            flips.append((f"byte {position} bit {bit}", bytes(mutated)))
    assert len(flips) == 8 * len(envelope)
    assert not_refused_properly(flips, unit, clock_now) == []


def test_every_truncation_is_refused(envelope: bytes, unit: Side, clock_now: int) -> None:
    cuts = [(f"first {n} bytes", envelope[:n]) for n in range(len(envelope))]
    cuts += [(f"without first {n} bytes", envelope[n:]) for n in range(1, len(envelope))]
    assert not_refused_properly(cuts, unit, clock_now) == []


def test_extensions_and_unknown_fields_are_refused(envelope: bytes, unit: Side, clock_now: int) -> None:
    outer = envelope_pb2.Envelope.FromString(envelope)
    extensions = [
        ("append zero byte", envelope + b"\x00"),
        ("append 0xff", envelope + b"\xff"),
        ("append 16 bytes", envelope + bytes(range(16))),
        ("append unknown varint field 4", envelope + field(4, 0, varint(1))),
        ("append unknown bytes field 15", envelope + field(15, 2, b"abc")),
        ("append unknown field 1000", envelope + field(1000, 2, b"")),
        ("append second signature", envelope + field(3, 2, outer.signature)),
        ("append second header", envelope + field(1, 2, outer.header)),
        ("append empty ciphertext field", envelope + field(2, 2, b"")),
        ("envelope twice", envelope + envelope),
        ("prepend zero byte", b"\x00" + envelope),
        ("prepend unknown varint field", field(4, 0, varint(1)) + envelope),
        ("prepend other header", field(1, 2, b"\x08\x01") + envelope),
        ("prepend same signature", field(3, 2, outer.signature) + envelope),
    ]
    assert not_refused_properly(extensions, unit, clock_now) == []


def test_unknown_field_inside_the_signed_header_is_refused(agency: Side, unit: Side, clock_now: int) -> None:
    # Even with a valid signature over the extended header, a non-canonical header never opens.
    outer = envelope_pb2.Envelope.FromString(agency.courier.seal(media_pb2.SealedFile(file_name="a"), UNIT_ID))
    header = outer.header + field(99, 0, varint(7))
    signer = agency.keys.signing_key(clock_now)
    forged = envelope_pb2.Envelope(
        header=header, ciphertext=outer.ciphertext, signature=signer.sign(signature_input(header, outer.ciphertext))
    ).SerializeToString(deterministic=True)
    refused_with(MalformedEnvelope, lambda: open_fresh(forged, unit, clock_now))


@HYPOTHESIS
@given(data=st.binary(max_size=2048))
def test_random_bytes_are_refused_with_an_envelope_error(unit: Side, clock_now: int, data: bytes) -> None:
    with pytest.raises(EnvelopeError):
        open_fresh(data, unit, clock_now)


@HYPOTHESIS
@given(
    edits=st.lists(
        st.tuples(st.sampled_from(["set", "insert", "delete"]), st.integers(0, 1 << 16), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    )
)
def test_random_mutations_are_refused_with_an_envelope_error(
    envelope: bytes, unit: Side, clock_now: int, edits: list[tuple[str, int, int]]
) -> None:
    mutated = bytearray(envelope)
    for operation, where, value in edits:
        position = where % (len(mutated) + 1)
        if operation == "insert":
            mutated.insert(position, value)
        elif mutated and operation == "delete":
            del mutated[position % len(mutated)]
        elif mutated:
            mutated[position % len(mutated)] = value
    assume(bytes(mutated) != envelope)
    with pytest.raises(EnvelopeError):
        open_fresh(bytes(mutated), unit, clock_now)


# --- replay and time window ------------------------------------------------------------------------------------


def test_second_open_of_the_same_envelope_is_a_replay(envelope: bytes, unit: Side) -> None:
    unit.courier.open(envelope)
    refused_with(ReplayedEnvelope, lambda: unit.courier.open(envelope))


def test_replay_is_still_detected_at_the_last_valid_millisecond(pair: Pair, envelope: bytes) -> None:
    pair.unit.courier.open(envelope)
    expires = envelope_pb2.EnvelopeHeader.FromString(envelope_pb2.Envelope.FromString(envelope).header).expires_at_ms
    pair.clock.set(expires + SKEW_MS - 1)
    refused_with(ReplayedEnvelope, lambda: pair.unit.courier.open(envelope))


def test_forged_copy_does_not_burn_the_message_id(envelope: bytes, unit: Side) -> None:
    forged = bytearray(envelope)
    forged[-1] ^= 0x01  # last byte of the signature
    refused_with(BadSignature, lambda: unit.courier.open(bytes(forged)))
    assert unit.courier.open(envelope).header.sender == "agency.220000"


def test_envelope_opens_until_just_before_expiry_plus_skew(pair: Pair, envelope: bytes) -> None:
    pair.clock.advance(10 * MINUTE_MS + SKEW_MS - 1)
    assert pair.unit.courier.open(envelope).header.recipient == UNIT_ID


def test_envelope_is_expired_exactly_at_expiry_plus_skew(pair: Pair, envelope: bytes) -> None:
    pair.clock.advance(10 * MINUTE_MS + SKEW_MS)
    refused_with(ExpiredEnvelope, lambda: pair.unit.courier.open(envelope))


def seal_at(sender: Side, recipient: Side, created_at_ms: int, *, ttl_ms: int = 10 * MINUTE_MS) -> bytes:
    return seal_with(
        media_pb2.SealedFile(file_name="report.csv"),
        sender=sender.party_id,
        signing_key=sender.keys.signing_key(created_at_ms),
        recipient=recipient.party_id,
        recipient_key=recipient.keys.agreement_public(created_at_ms),
        created_at_ms=created_at_ms,
        ttl_ms=ttl_ms,
    )


def test_created_in_the_future_beyond_skew_is_not_yet_valid(pair: Pair) -> None:
    now = pair.clock.now_ms()
    data = seal_at(pair.agency, pair.unit, now + SKEW_MS + 1)
    refused_with(NotYetValidEnvelope, lambda: pair.unit.courier.open(data))


def test_created_in_the_future_within_skew_opens(pair: Pair) -> None:
    now = pair.clock.now_ms()
    assert pair.unit.courier.open(seal_at(pair.agency, pair.unit, now + SKEW_MS)).header.created_at_ms == now + SKEW_MS


def test_receiver_policy_skew_is_applied(pair: Pair) -> None:
    strict = Courier(pair.unit.keys, pair.unit.trust, replay=MemoryReplayCache(), clock=pair.clock, policy=Policy(0))
    now = pair.clock.now_ms()
    refused_with(NotYetValidEnvelope, lambda: strict.open(seal_at(pair.agency, pair.unit, now + 1)))
    data = seal_at(pair.agency, pair.unit, now, ttl_ms=10 * MINUTE_MS)
    pair.clock.advance(10 * MINUTE_MS)
    refused_with(ExpiredEnvelope, lambda: strict.open(data))


# --- who may send what to whom ---------------------------------------------------------------------------------


def test_envelope_for_another_party_is_wrong_recipient(
    pair: Pair, make_side: Callable[[str], Side], sealed_file: media_pb2.SealedFile
) -> None:
    civil = make_side("unit.220100.civil")
    pair.agency.trust.import_bundle(civil.keys.bundle(pair.clock.now_ms()), expected_fingerprint=fingerprint_of(civil))
    data = pair.agency.courier.seal(sealed_file, civil.party_id)
    refused_with(WrongRecipient, lambda: pair.unit.courier.open(data))


def test_envelope_for_a_key_we_never_held_is_wrong_recipient(pair: Pair) -> None:
    now = pair.clock.now_ms()
    stranger = KeyRecord(AgreementKey.generate().public, KeyState.ACTIVE, now)
    data = seal_with(
        media_pb2.SealedFile(),
        sender=pair.agency.party_id,
        signing_key=pair.agency.keys.signing_key(now),
        recipient=UNIT_ID,
        recipient_key=stranger,
        created_at_ms=now,
        ttl_ms=MINUTE_MS,
    )
    refused_with(WrongRecipient, lambda: pair.unit.courier.open(data))


def test_unknown_sender_key_is_refused(pair: Pair) -> None:
    now = pair.clock.now_ms()
    data = seal_with(
        media_pb2.SealedFile(),
        sender=pair.agency.party_id,
        signing_key=SigningKey.generate(),
        recipient=UNIT_ID,
        recipient_key=pair.unit.keys.agreement_public(now),
        created_at_ms=now,
        ttl_ms=MINUTE_MS,
    )
    refused_with(UnknownKey, lambda: pair.unit.courier.open(data))


def test_key_of_a_known_party_claimed_by_another_sender_is_unknown(
    pair: Pair, make_side: Callable[[str], Side]
) -> None:
    # The agency's genuine signing key, but the header says the envelope comes from a party the unit never enrolled.
    now = pair.clock.now_ms()
    impostor = make_side("unit.220100.civil")
    data = seal_with(
        media_pb2.SealedFile(),
        sender=impostor.party_id,
        signing_key=pair.agency.keys.signing_key(now),
        recipient=UNIT_ID,
        recipient_key=pair.unit.keys.agreement_public(now),
        created_at_ms=now,
        ttl_ms=MINUTE_MS,
    )
    refused_with(UnknownKey, lambda: pair.unit.courier.open(data))


def test_unknown_sender_party_is_refused(pair: Pair, make_side: Callable[[str], Side]) -> None:
    stranger = make_side("agency.990000")
    stranger.trust.import_bundle(
        pair.unit.keys.bundle(pair.clock.now_ms()), expected_fingerprint=fingerprint_of(pair.unit)
    )
    data = stranger.courier.seal(media_pb2.SealedFile(file_name="x"), UNIT_ID)
    refused_with(UnknownKey, lambda: pair.unit.courier.open(data))


def test_sender_key_revoked_by_announcement_is_refused(pair: Pair, envelope: bytes) -> None:
    now = pair.clock.now_ms()
    signing_id = pair.agency.keys.signing_key(now).key_id
    announcement = pair.agency.keys.revoke(signing_id, now_ms=now, reason="compromised")
    pair.unit.trust.apply_announcement(announcement, now_ms=now)
    refused_with(RevokedKey, lambda: pair.unit.courier.open(envelope))


def test_envelope_sealed_for_our_revoked_key_is_refused(pair: Pair, envelope: bytes) -> None:
    now = pair.clock.now_ms()
    agreement_id = pair.unit.keys.agreement_public(now).key_id
    pair.unit.keys.revoke(agreement_id, now_ms=now, reason="compromised")
    refused_with(RevokedKey, lambda: pair.unit.courier.open(envelope))


def test_signature_by_another_key_is_bad_signature(pair: Pair, envelope: bytes) -> None:
    outer = envelope_pb2.Envelope.FromString(envelope)
    other = SigningKey.generate()
    outer.signature = other.sign(signature_input(outer.header, outer.ciphertext))
    forged = outer.SerializeToString(deterministic=True)
    refused_with(BadSignature, lambda: pair.unit.courier.open(forged))


def test_signature_over_another_envelope_is_bad_signature(pair: Pair, envelope: bytes) -> None:
    other = envelope_pb2.Envelope.FromString(pair.agency.courier.seal(media_pb2.SealedFile(), UNIT_ID))
    outer = envelope_pb2.Envelope.FromString(envelope)
    outer.signature = other.signature
    refused_with(BadSignature, lambda: pair.unit.courier.open(outer.SerializeToString(deterministic=True)))


def test_type_not_in_expect_is_type_mismatch(pair: Pair, envelope: bytes) -> None:
    expect = {"hedui.v1.Envelope": envelope_pb2.Envelope}
    refused_with(TypeMismatch, lambda: pair.unit.courier.open(envelope, expect=expect))


def test_over_size_input_is_malformed(unit: Side, clock_now: int) -> None:
    refused_with(MalformedEnvelope, lambda: open_fresh(bytes(MAX_ENVELOPE_BYTES + 1), unit, clock_now))


def test_over_size_header_is_malformed(envelope: bytes, unit: Side, clock_now: int) -> None:
    outer = envelope_pb2.Envelope.FromString(envelope)
    outer.header = outer.header + field(99, 2, bytes(MAX_HEADER_BYTES))
    data = outer.SerializeToString(deterministic=True)
    refused_with(MalformedEnvelope, lambda: open_fresh(data, unit, clock_now))


@pytest.mark.parametrize("error", ENVELOPE_ERRORS)
def test_every_envelope_error_has_the_uniform_public_message_and_a_distinct_code(error: type[EnvelopeError]) -> None:
    assert error("detail").public_message == "invalid envelope"
    assert "detail" not in error.public_message
    assert [e.code for e in ENVELOPE_ERRORS].count(error.code) == 1


# --- reporting refusals ----------------------------------------------------------------------------------------


def test_on_reject_hook_receives_the_error(pair: Pair, envelope: bytes) -> None:
    seen: list[EnvelopeError] = []
    courier = Courier(pair.unit.keys, pair.unit.trust, replay=pair.unit.replay, clock=pair.clock, on_reject=seen.append)
    courier.open(envelope)
    error = refused_with(ReplayedEnvelope, lambda: courier.open(envelope))
    assert seen == [error]


def test_on_reject_is_not_called_for_an_envelope_that_opens(pair: Pair, envelope: bytes) -> None:
    seen: list[EnvelopeError] = []
    courier = Courier(
        pair.unit.keys, pair.unit.trust, replay=MemoryReplayCache(), clock=pair.clock, on_reject=seen.append
    )
    courier.open(envelope)
    assert seen == []


def test_default_rejection_log_has_only_the_reason_code(
    pair: Pair, sealed_file: media_pb2.SealedFile, caplog: pytest.LogCaptureFixture
) -> None:
    data = pair.agency.courier.seal(sealed_file, UNIT_ID)
    expect = {"hedui.v1.Envelope": envelope_pb2.Envelope}  # opens as far as decryption, then TypeMismatch
    with caplog.at_level(logging.DEBUG, logger="hedui.keys.envelope"):
        error = refused_with(TypeMismatch, lambda: pair.unit.courier.open(data, expect=expect))

    records = [r for r in caplog.records if r.name.startswith("hedui")]
    assert len(records) == 1
    record = records[0]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == "envelope refused"
    assert record.exc_info is None and not record.args
    standard = set(logging.LogRecord("x", logging.INFO, "", 0, "", None, None).__dict__) | {"message", "asctime"}
    assert {name: record.__dict__[name] for name in set(record.__dict__) - standard} == {"reason": "type_mismatch"}
    assert error.code == "type_mismatch"
    text = caplog.text + str(error) + repr(error)
    for secret in (sealed_file.file_name, "220104199001011234", "ZHANG-SAN", sealed_file.content.hex()):
        assert secret not in text


# --- rotation --------------------------------------------------------------------------------------------------


def signed_by(pair: Pair, signer: SigningKey, created_at_ms: int, name: str) -> bytes:
    """A file the agency seals for the unit at ``created_at_ms`` with ``signer``, whichever key it would pick then."""
    return seal_with(
        media_pb2.SealedFile(file_name=name),
        sender=pair.agency.party_id,
        signing_key=signer,
        recipient=UNIT_ID,
        recipient_key=pair.agency.trust.agreement_key_for(UNIT_ID, created_at_ms),
        created_at_ms=created_at_ms,
        ttl_ms=HOUR_MS,
    )


def test_envelope_for_recipients_old_agreement_key_opens_in_overlap_and_not_after_retirement(pair: Pair) -> None:
    agency, unit, clock = pair.agency, pair.unit, pair.clock
    old_key = unit.keys.agreement_public(clock.now_ms()).key_id
    opened_in_overlap = agency.courier.seal(media_pb2.SealedFile(file_name="a"), UNIT_ID, ttl_ms=3 * DAY_MS)
    opened_after = agency.courier.seal(media_pb2.SealedFile(file_name="b"), UNIT_ID, ttl_ms=3 * DAY_MS)

    clock.advance(HOUR_MS)
    rotated_at = clock.now_ms()
    announcement = unit.keys.rotate(Algorithm.X25519, now_ms=rotated_at, overlap_ms=DAY_MS)
    new_key = agency.trust.apply_announcement(announcement, now_ms=rotated_at)
    assert new_key.key_id != old_key

    clock.set(rotated_at + DAY_MS - 1)
    assert unit.keys.advance(clock.now_ms()) == []
    assert unit.courier.open(opened_in_overlap).header.recipient_key_id == old_key

    clock.set(rotated_at + DAY_MS)
    assert [r.key_id for r in unit.keys.advance(clock.now_ms())] == [old_key]
    assert unit.keys.secret(old_key) is None
    refused_with(WrongRecipient, lambda: unit.courier.open(opened_after))

    # Sealing now uses the new key, which the unit opens.
    fresh = agency.courier.seal(media_pb2.SealedFile(file_name="c"), UNIT_ID)
    assert unit.courier.open(fresh).header.recipient_key_id == new_key.key_id


def test_envelope_signed_by_senders_old_key_opens_in_overlap_and_old_key_is_refused_after(pair: Pair) -> None:
    agency, unit, clock = pair.agency, pair.unit, pair.clock
    old_signer = agency.keys.signing_key(clock.now_ms())
    before_rotation = agency.courier.seal(media_pb2.SealedFile(file_name="a"), UNIT_ID, ttl_ms=3 * DAY_MS)

    clock.advance(HOUR_MS)
    rotated_at = clock.now_ms()
    announcement = agency.keys.rotate(Algorithm.ED25519, now_ms=rotated_at, overlap_ms=DAY_MS)
    new_signer = unit.trust.apply_announcement(announcement, now_ms=rotated_at)
    assert new_signer.key_id != old_signer.key_id

    # Made with the old key during the overlap (a sender that had not switched yet): still accepted.
    late_old = signed_by(pair, old_signer, rotated_at + DAY_MS - 1, "b")
    clock.set(rotated_at + DAY_MS - 1)
    assert unit.courier.open(before_rotation).header.sender_key_id == old_signer.key_id
    assert unit.courier.open(late_old).header.sender_key_id == old_signer.key_id

    # Made with the old key from the end of the overlap on: refused, whether or not the unit advanced its store.
    after_overlap = signed_by(pair, old_signer, rotated_at + DAY_MS, "c")
    clock.set(rotated_at + DAY_MS)
    refused_with(KeyNotValidThen, lambda: open_fresh(after_overlap, unit, clock.now_ms()))
    unit.trust.advance(clock.now_ms())
    refused_with(KeyNotValidThen, lambda: open_fresh(after_overlap, unit, clock.now_ms()))

    # The sender seals with the new key, and forgets the old one when it advances.
    fresh = agency.courier.seal(media_pb2.SealedFile(file_name="d"), UNIT_ID)
    assert unit.courier.open(fresh).header.sender_key_id == new_signer.key_id
    agency.keys.advance(clock.now_ms())
    assert agency.keys.secret(old_signer.key_id) is None


def test_a_retired_key_cannot_backdate_an_online_envelope_weeks_after_retirement(pair: Pair) -> None:
    """Security review 5: a signing key retired (its secret erased, possibly leaked) signs an envelope dated just
    before its retirement with a 31-day lifetime. A sealed file (no age limit) still opens 18 days later; an online
    service (Policy.online: its envelope lifetime is the oldest created-at it takes, step 7c) refuses it as
    expired, and takes an envelope within that age."""
    agency, unit, clock = pair.agency, pair.unit, pair.clock
    old_signer = agency.keys.signing_key(clock.now_ms())
    rotated_at = clock.now_ms()
    unit.trust.apply_announcement(
        agency.keys.rotate(Algorithm.ED25519, now_ms=rotated_at, overlap_ms=DAY_MS), now_ms=rotated_at
    )
    retired_at = rotated_at + DAY_MS
    now = retired_at + 18 * DAY_MS
    clock.set(now)
    unit.trust.advance(now)

    def backdated(name: str) -> bytes:
        return seal_with(
            media_pb2.SealedFile(file_name=name),
            sender=agency.party_id,
            signing_key=old_signer,
            recipient=UNIT_ID,
            recipient_key=agency.trust.agreement_key_for(UNIT_ID, now),
            created_at_ms=retired_at - 1,
            ttl_ms=MAX_TTL_MS,
        )

    assert open_fresh(backdated("file"), unit, now).header.sender_key_id == old_signer.key_id
    online = Policy.online(60 * MINUTE_MS)
    assert online.max_age_ms == 60 * MINUTE_MS and Policy().max_age_ms is None
    service = Courier(unit.keys, unit.trust, replay=MemoryReplayCache(), clock=clock, policy=online)
    refused_with(ExpiredEnvelope, lambda: service.open(backdated("online")))
    # The bound is the service's lifetime plus the skew, counted from created-at.
    created = now - 60 * MINUTE_MS - SKEW_MS
    long_lived = seal_at(pair.agency, pair.unit, created, ttl_ms=DAY_MS)
    refused_with(ExpiredEnvelope, lambda: service.open(long_lived))
    within = seal_at(pair.agency, pair.unit, created + 1, ttl_ms=DAY_MS)
    assert service.open(within).header.created_at_ms == created + 1


def test_sender_rotation_not_yet_applied_by_recipient_is_unknown_key(pair: Pair) -> None:
    now = pair.clock.now_ms()
    pair.agency.keys.rotate(Algorithm.ED25519, now_ms=now, overlap_ms=DAY_MS)
    data = pair.agency.courier.seal(media_pb2.SealedFile(), UNIT_ID)
    refused_with(UnknownKey, lambda: pair.unit.courier.open(data))


def test_staged_signing_rotation_keeps_the_old_key_in_use_until_the_announced_moment(pair: Pair) -> None:
    """Rotated with a lead time: peers that apply the announcement any time before the takeover never see a
    message signed by a key they do not know yet, and the new key takes over at that moment by the clock alone."""
    agency, unit, clock = pair.agency, pair.unit, pair.clock
    old_signer = agency.keys.signing_key(clock.now_ms())
    rotated_at = clock.now_ms()
    takeover = rotated_at + 3 * DAY_MS
    announcement = agency.keys.rotate(Algorithm.ED25519, now_ms=rotated_at, overlap_ms=DAY_MS, activate_at_ms=takeover)

    # Before the unit applies the announcement, the agency still signs with the old key: nothing is refused.
    clock.set(rotated_at + DAY_MS)
    early = agency.courier.seal(media_pb2.SealedFile(file_name="a"), UNIT_ID)
    assert unit.courier.open(early).header.sender_key_id == old_signer.key_id
    new_signer = unit.trust.apply_announcement(announcement, now_ms=clock.now_ms())
    assert (new_signer.state, new_signer.not_before_ms) == (KeyState.PENDING, takeover)

    # The new key may not sign anything dated before the takeover.
    too_soon = signed_by(pair, agency.keys.signing_key(takeover), clock.now_ms(), "b")
    refused_with(KeyNotValidThen, lambda: open_fresh(too_soon, unit, clock.now_ms()))

    # At the takeover both sides switch without advancing their keyrings; the old key stays valid for the overlap.
    clock.set(takeover - 1)
    assert agency.keys.signing_key(clock.now_ms()).key_id == old_signer.key_id
    clock.set(takeover)
    assert agency.keys.signing_key(clock.now_ms()).key_id == new_signer.key_id
    fresh = agency.courier.seal(media_pb2.SealedFile(file_name="c"), UNIT_ID)
    assert unit.courier.open(fresh).header.sender_key_id == new_signer.key_id
    late_old = signed_by(pair, old_signer, takeover + DAY_MS - 1, "d")
    clock.set(takeover + DAY_MS - 1)
    assert unit.courier.open(late_old).header.sender_key_id == old_signer.key_id
    clock.set(takeover + DAY_MS)
    moved = {r.key_id: r.state for r in agency.keys.advance(clock.now_ms())}
    assert moved == {new_signer.key_id: KeyState.ACTIVE, old_signer.key_id: KeyState.RETIRED}
    assert agency.keys.secret(old_signer.key_id) is None


def test_staged_agreement_rotation_is_sealed_for_from_the_announced_moment(pair: Pair) -> None:
    agency, unit, clock = pair.agency, pair.unit, pair.clock
    old_key = unit.keys.agreement_public(clock.now_ms()).key_id
    rotated_at = clock.now_ms()
    takeover = rotated_at + 2 * DAY_MS
    announcement = unit.keys.rotate(Algorithm.X25519, now_ms=rotated_at, overlap_ms=DAY_MS, activate_at_ms=takeover)
    new_key = agency.trust.apply_announcement(announcement, now_ms=rotated_at + HOUR_MS)
    clock.set(takeover - 1)
    before = agency.courier.seal(media_pb2.SealedFile(file_name="a"), UNIT_ID, ttl_ms=3 * DAY_MS)
    assert unit.courier.open(before).header.recipient_key_id == old_key
    clock.set(takeover)
    after = agency.courier.seal(media_pb2.SealedFile(file_name="b"), UNIT_ID)
    assert unit.courier.open(after).header.recipient_key_id == new_key.key_id


@pytest.mark.parametrize("lead_days", [-1, 31])
def test_rotation_scheduled_in_the_past_or_beyond_30_days_is_refused(pair: Pair, lead_days: int) -> None:
    now = pair.clock.now_ms()
    before = list(pair.agency.keys.records())
    with pytest.raises(KeyStateError, match="between now and 30 days"):
        pair.agency.keys.rotate(
            Algorithm.ED25519, now_ms=now, overlap_ms=DAY_MS, activate_at_ms=now + lead_days * DAY_MS
        )
    assert list(pair.agency.keys.records()) == before


def test_announcement_scheduling_a_key_beyond_30_days_is_refused_by_the_peer(pair: Pair) -> None:
    """A sender with the lead-time check removed: the receiving trust store checks again and changes nothing."""
    agency, unit, clock = pair.agency, pair.unit, pair.clock
    now = clock.now_ms()
    old = agency.keys.agreement_public(now)
    far = PartyKeys.create("agency.220100", now_ms=now).agreement_public(now)
    message = keys_pb2.KeyAnnouncement(
        party_id=agency.party_id,
        kind=keys_pb2.ANNOUNCEMENT_KIND_ROTATION,
        old_key_id=old.key_id,
        new_key=dataclasses.replace(far, state=KeyState.PENDING, not_before_ms=now + 31 * DAY_MS).to_proto(),
        overlap_until_ms=now + 32 * DAY_MS,
        issued_at_ms=now,
    )
    announcement = sign_announcement(message, agency.keys.signing_key(now))
    with pytest.raises(TrustError, match="more than 30 days ahead"):
        unit.trust.apply_announcement(announcement, now_ms=now)
    assert unit.trust.agreement_key_for(agency.party_id, now + 40 * DAY_MS).key_id == old.key_id


# --- envelopes built from the documented recipe, without keys.envelope.seal_with --------------------------------


def seal_by_recipe(
    sender: Side,
    recipient: Side,
    now_ms: int,
    *,
    inner: bytes,
    message_type: str = "hedui.v1.SealedFile",
    ephemeral_public: bytes | None = None,
    encrypt_for: bytes | None = None,
) -> bytes:
    """Seal as the module docstring of keys.envelope describes it, with cryptography and libsodium directly.

    ``ephemeral_public`` overrides the header's ephemeral key; ``encrypt_for`` encrypts for another X25519 key than
    the one the header names. The signature is always the sender's genuine one.
    """
    recipient_key = recipient.keys.agreement_public(now_ms)
    ephemeral = X25519PrivateKey.generate()
    eph_public = ephemeral_public or ephemeral.public_key().public_bytes_raw()
    nonce = os.urandom(24)
    header = envelope_pb2.EnvelopeHeader(
        version=1,
        suite=envelope_pb2.SUITE_ED25519_X25519_HKDF_SHA256_XCHACHA20POLY1305,
        message_id=os.urandom(16),
        message_type=message_type,
        sender=sender.party_id,
        recipient=recipient.party_id,
        sender_key_id=sender.keys.signing_key(now_ms).key_id,
        recipient_key_id=recipient_key.key_id,
        ephemeral_public_key=eph_public,
        nonce=nonce,
        created_at_ms=now_ms,
        expires_at_ms=now_ms + MINUTE_MS,
    ).SerializeToString(deterministic=True)
    target = encrypt_for or recipient_key.public.raw
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(target))
    info = b"hedui.v1.envelope-payload-key\x00" + struct.pack(">I", 1) + eph_public + target
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"hedui.v1.envelope-hkdf-salt", info=info).derive(shared)
    ciphertext = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(inner, header, nonce, key)
    to_sign = b"hedui.v1.envelope-signature\x00" + struct.pack(">I", len(header)) + header
    signature = sender.keys.signing_key(now_ms).sign(to_sign + hashlib.sha256(ciphertext).digest())
    return envelope_pb2.Envelope(header=header, ciphertext=ciphertext, signature=signature).SerializeToString(
        deterministic=True
    )


def inner_payload(message: media_pb2.SealedFile, type_url: str = "type.googleapis.com/hedui.v1.SealedFile") -> bytes:
    value = message.SerializeToString(deterministic=True)
    return envelope_pb2.InnerPayload(type_url=type_url, value=value).SerializeToString(deterministic=True)


def test_envelope_sealed_by_the_documented_recipe_opens(pair: Pair, sealed_file: media_pb2.SealedFile) -> None:
    now = pair.clock.now_ms()
    data = seal_by_recipe(pair.agency, pair.unit, now, inner=inner_payload(sealed_file))
    assert pair.unit.courier.open(data, expect=EXPECT_FILE).message == sealed_file


def test_signed_envelope_encrypted_for_another_key_is_undecryptable(pair: Pair) -> None:
    now = pair.clock.now_ms()
    other = AgreementKey.generate().public.raw
    data = seal_by_recipe(pair.agency, pair.unit, now, inner=inner_payload(media_pb2.SealedFile()), encrypt_for=other)
    refused_with(UndecryptableEnvelope, lambda: pair.unit.courier.open(data))


@pytest.mark.parametrize("point", [bytes(32), b"\x01" + bytes(31)], ids=["zero", "one"])
def test_signed_envelope_with_low_order_ephemeral_key_is_undecryptable(pair: Pair, point: bytes) -> None:
    now = pair.clock.now_ms()
    data = seal_by_recipe(
        pair.agency, pair.unit, now, inner=inner_payload(media_pb2.SealedFile()), ephemeral_public=point
    )
    refused_with(UndecryptableEnvelope, lambda: pair.unit.courier.open(data))


@pytest.mark.parametrize(
    "inner",
    [
        inner_payload(media_pb2.SealedFile(), "type.googleapis.com/hedui.v1.Envelope"),
        inner_payload(media_pb2.SealedFile(), "hedui.v1.SealedFile"),
        inner_payload(media_pb2.SealedFile(file_name="a")) + b"\x18\x01",
        b"\xff\xff",
    ],
    ids=["other-type", "no-prefix", "unknown-field", "garbage"],
)
def test_signed_envelope_whose_inner_payload_is_not_the_announced_type_is_type_mismatch(
    pair: Pair, inner: bytes
) -> None:
    data = seal_by_recipe(pair.agency, pair.unit, pair.clock.now_ms(), inner=inner)
    refused_with(TypeMismatch, lambda: pair.unit.courier.open(data))


def test_inner_value_that_does_not_parse_as_the_expected_class_is_type_mismatch(pair: Pair) -> None:
    inner = envelope_pb2.InnerPayload(
        type_url="type.googleapis.com/hedui.v1.SealedFile", value=b"\x0a\x05ab"
    ).SerializeToString(deterministic=True)
    data = seal_by_recipe(pair.agency, pair.unit, pair.clock.now_ms(), inner=inner)
    refused_with(TypeMismatch, lambda: pair.unit.courier.open(data, expect=EXPECT_FILE))


# --- regressions -----------------------------------------------------------------------------------------------


def test_courier_seal_with_zero_ttl_is_refused_not_replaced_by_the_default(pair: Pair) -> None:
    # seal_with refuses ttl 0; Courier.seal used `ttl_ms or default` and silently sealed a 60-minute envelope.
    with pytest.raises(ValueError, match="ttl"):
        seal_at(pair.agency, pair.unit, pair.clock.now_ms(), ttl_ms=0)
    with pytest.raises(ValueError, match="ttl"):
        pair.agency.courier.seal(media_pb2.SealedFile(), UNIT_ID, ttl_ms=0)
