"""Every parser of the trust core refuses bad input with the project's typed errors only (issue 10, item 4).

Fuzzing found 709 texts on which ``dearmor`` raised a plain ValueError. Here each parser of outside input --
armoured text, bundles, announcements, sealed envelopes and sealed files (.hsf), signed reports, keystore files --
gets random input and mutations of a valid input (bit flips, truncations, insertions, deletions, overwrites), and
may raise only its documented ``keys.errors`` class: never ValueError, KeyError, IndexError, UnicodeDecodeError,
protobuf's DecodeError or RecursionError. Each property is bounded so that the file runs in seconds.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hedui.v1 import agency_pb2, envelope_pb2, keys_pb2, media_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keys import _canonical, _framing, envelope, keystore
from keys import _primitives as prim
from keys.announcements import (
    ANNOUNCEMENT_LABEL,
    armor,
    dearmor,
    read_announcement,
    read_bundle,
    sign_announcement,
)
from keys.clock import DAY_MS, FixedClock
from keys.envelope import Courier, open_at
from keys.errors import EnvelopeError, KeysError, KeystoreError, SealedFileError, TrustError
from keys.fingerprint import Algorithm
from keys.identity import PartyKeys
from keys.replay import MemoryReplayCache
from keys.sealedfile import open_sealed_file, seal_file
from keys.statements import REPORT_DOMAIN, read_signed_report, verify_report_by
from keys.truststore import TrustStore
from tests.conftest import AGENCY_ID, START_MS, UNIT_ID, real_fingerprint

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
#: Keystore loads run Argon2id (at the test parameters) and write a file per example: fewer of them.
FUZZ_FILES = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class World:
    """Valid inputs of every parser, made once: an agency and a unit that enrolled each other."""

    agency: PartyKeys
    agency_trust: TrustStore
    unit: PartyKeys
    unit_trust: TrustStore
    bundle: bytes
    announcement: bytes
    sealed: bytes
    report: bytes

    def courier(self) -> Courier:
        """The unit's courier with a fresh replay cache, on the clock the inputs were made at."""
        return Courier(self.unit, self.unit_trust, replay=MemoryReplayCache(), clock=FixedClock(START_MS + 1000))


@functools.cache
def world() -> World:
    agency, unit = PartyKeys.create(AGENCY_ID, now_ms=START_MS), PartyKeys.create(UNIT_ID, now_ms=START_MS)
    agency_trust, unit_trust = TrustStore(), TrustStore()
    agency_trust.import_bundle(unit.bundle(START_MS), expected_fingerprint=real_fingerprint(unit))
    unit_trust.import_bundle(agency.bundle(START_MS), expected_fingerprint=real_fingerprint(agency))
    signer = agency.signing_key(START_MS)
    old = next(r for r in agency.records() if r.algorithm is Algorithm.X25519)
    # An announcement as `rotate` makes it, without changing the agency's keys.
    replacement = PartyKeys.create(AGENCY_ID, now_ms=START_MS)
    new = next(r for r in replacement.records() if r.algorithm is Algorithm.X25519)
    announcement = sign_announcement(
        keys_pb2.KeyAnnouncement(
            party_id=AGENCY_ID,
            kind=keys_pb2.ANNOUNCEMENT_KIND_ROTATION,
            old_key_id=old.key_id,
            new_key=new.to_proto(),
            overlap_until_ms=START_MS + DAY_MS,
            issued_at_ms=START_MS,
        ),
        signer,
    )
    courier = Courier(agency, agency_trust, replay=MemoryReplayCache(), clock=FixedClock(START_MS))
    sealed = seal_file(courier, "名单.csv", b"id,category\n1,tax\n", UNIT_ID, ttl_ms=DAY_MS, media_type="text/csv")
    body = _canonical.encode(agency_pb2.Report(agency=AGENCY_ID, commission_id="c-1", issued_at_ms=START_MS))
    report = _canonical.encode(
        agency_pb2.SignedReport(report=body, signer_key_id=signer.key_id, signature=signer.sign(REPORT_DOMAIN + body))
    )
    return World(agency, agency_trust, unit, unit_trust, agency.bundle(START_MS), announcement, sealed, report)


# --- mutations of a valid input --------------------------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` after one to four edits: a bit flip, a truncation, an insertion, a deletion or an overwrite."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        edit = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite"]))
        if edit == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif edit == "truncate":
            del data[at:]
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif edit == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif data:
            data[at] = draw(st.integers(0, 255))
    return bytes(data)


@st.composite
def mutated_text(draw: st.DrawFn, base: str) -> str:
    """``base`` with one to four characters replaced, inserted or deleted, or cut short."""
    text = base
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, max(len(text) - 1, 0)))
        edit = draw(st.sampled_from(["replace", "insert", "delete", "truncate"]))
        char = draw(st.characters(codec=None) | st.sampled_from("=+/ \r\n\t-é\u3000\x00"))
        if edit == "replace":
            text = text[:at] + char + text[at + 1 :]
        elif edit == "insert":
            text = text[:at] + char + text[at:]
        elif edit == "delete":
            text = text[:at] + text[at + 1 :]
        else:
            text = text[:at]
    return text


def inputs(base: Callable[[World], bytes]) -> st.SearchStrategy[bytes]:
    """Random bytes, and mutations of the valid input ``base`` gives."""
    return st.binary(max_size=512) | st.deferred(lambda: mutated(base(world())))


def only(allowed: type[KeysError] | tuple[type[KeysError], ...], call: Callable[[], object]) -> None:
    """Run ``call``: it may succeed or raise ``allowed``; anything else fails the test with its type."""
    try:
        call()
    except allowed:
        pass
    except Exception as exc:  # the point: no untyped error may escape
        pytest.fail(f"{type(exc).__module__}.{type(exc).__name__} escaped: {exc}")


# --- armour ----------------------------------------------------------------------------------------------------


def armored_bundle() -> str:
    return armor(world().bundle)


def test_dearmor_of_non_ascii_text_is_a_trust_error_not_a_value_error() -> None:
    """The reported defect: a non-ASCII character inside the body raised ValueError from base64."""
    text = armored_bundle()
    at = text.index("\n") + 5
    with pytest.raises(TrustError, match="damaged"):
        dearmor(text[:at] + "é" + text[at + 1 :])


@FUZZ
@given(st.text(max_size=300) | st.deferred(lambda: mutated_text(armored_bundle())))
def test_dearmor_raises_only_trust_error(text: str) -> None:
    only(TrustError, lambda: dearmor(text))


@FUZZ
@given(st.deferred(lambda: mutated_text(armored_bundle())))
def test_dearmor_of_a_changed_armour_gives_the_bundle_or_a_trust_error(text: str) -> None:
    """Canonical base64 only: a changed text never decodes to other bytes that still carry the bundle's signature."""
    try:
        data = dearmor(text)
    except TrustError:
        return
    if data != world().bundle:
        only(TrustError, lambda: read_bundle(data))


# --- bundles and announcements ---------------------------------------------------------------------------------


@FUZZ
@given(inputs(lambda w: w.bundle))
def test_read_bundle_raises_only_trust_error(data: bytes) -> None:
    only(TrustError, lambda: read_bundle(data))


@FUZZ
@given(inputs(lambda w: w.bundle), st.sampled_from(["real", "typed"]), st.text(max_size=60))
def test_import_bundle_raises_only_keys_errors_and_changes_nothing(data: bytes, which: str, typed: str) -> None:
    w = world()
    fingerprint = real_fingerprint(w.agency) if which == "real" else typed
    trust = TrustStore()
    for party_id, keyring in w.unit_trust:
        trust.set_keyring(party_id, keyring)
    before = [(party_id, list(keyring)) for party_id, keyring in trust]
    try:
        trust.import_bundle(data, expected_fingerprint=fingerprint, own_party_id=UNIT_ID, now_ms=START_MS)
    except KeysError:
        assert [(party_id, list(keyring)) for party_id, keyring in trust] == before
    except Exception as exc:
        pytest.fail(f"{type(exc).__name__} escaped: {exc}")


@FUZZ
@given(inputs(lambda w: w.announcement))
def test_read_announcement_raises_only_trust_error(data: bytes) -> None:
    only(TrustError, lambda: read_announcement(data))


@FUZZ
@given(inputs(lambda w: w.announcement))
def test_apply_announcement_raises_only_keys_errors(data: bytes) -> None:
    w = world()
    trust = TrustStore()
    trust.import_bundle(w.bundle, expected_fingerprint=real_fingerprint(w.agency))
    only(KeysError, lambda: trust.apply_announcement(data, now_ms=START_MS + 1000))


@FUZZ
@given(st.text(max_size=200) | st.deferred(lambda: mutated_text(armor(world().announcement, ANNOUNCEMENT_LABEL))))
def test_dearmored_announcement_raises_only_trust_error(text: str) -> None:
    only(TrustError, lambda: read_announcement(dearmor(text, ANNOUNCEMENT_LABEL)))


# --- envelopes and sealed files ----------------------------------------------------------------------------------


@FUZZ
@given(inputs(lambda w: w.sealed))
def test_open_sealed_file_raises_only_envelope_or_sealed_file_errors(data: bytes) -> None:
    only((EnvelopeError, SealedFileError), lambda: open_sealed_file(world().courier(), data))


@FUZZ
@given(inputs(lambda w: w.sealed), st.booleans())
def test_open_at_raises_only_envelope_errors(data: bytes, typed: bool) -> None:
    w = world()
    expect = {"hedui.v1.SealedFile": media_pb2.SealedFile} if typed else None
    only(
        EnvelopeError,
        lambda: open_at(
            data, me=w.unit, trust=w.unit_trust, replay=MemoryReplayCache(), now_ms=START_MS + 1000, expect=expect
        ),
    )


def _sealed_plaintext(header_change: Callable[[envelope_pb2.EnvelopeHeader], None], plaintext: bytes) -> bytes:
    """An envelope the agency signed correctly around ``plaintext`` (which an honest sealer never makes)."""
    w = world()
    recipient = w.agency_trust.agreement_key_for(UNIT_ID, START_MS)
    signer = w.agency.signing_key(START_MS)
    seed, nonce = bytes(range(32)), bytes(24)
    ephemeral = prim.x25519_public(seed)
    header = envelope_pb2.EnvelopeHeader(
        version=1, suite=envelope.SUITE, message_id=bytes(16), message_type="hedui.v1.SealedFile", sender=AGENCY_ID,
        recipient=UNIT_ID, sender_key_id=signer.key_id, recipient_key_id=recipient.key_id,
        ephemeral_public_key=ephemeral, nonce=nonce, created_at_ms=START_MS, expires_at_ms=START_MS + DAY_MS,
    )  # fmt: skip
    header_change(header)
    header_bytes = _canonical.encode(header)
    shared = prim.x25519_shared(seed, recipient.public.raw)
    key = envelope.payload_key(shared, ephemeral, recipient.public.raw)
    ciphertext = prim.xchacha_encrypt(key, nonce, plaintext, header_bytes)
    signature = signer.sign(envelope.signature_input(header_bytes, ciphertext))
    return _framing.encode(header_bytes, ciphertext, signature)


def _valid_inner() -> bytes:
    file = media_pb2.SealedFile(file_name="a.csv", content=b"x" * 40, media_type="text/csv")
    return _framing.encode(b"type.googleapis.com/hedui.v1.SealedFile", _canonical.encode(file))


@FUZZ
@given(st.binary(max_size=200) | st.deferred(lambda: mutated(_valid_inner())))
def test_signed_envelope_around_a_damaged_inner_payload_raises_only_envelope_errors(plaintext: bytes) -> None:
    """Past the signature (a trusted sender that misbehaves): decryption and the inner parse stay typed."""
    data = _sealed_plaintext(lambda h: None, plaintext)
    only((EnvelopeError, SealedFileError), lambda: open_sealed_file(world().courier(), data))


@FUZZ
@given(st.deferred(lambda: mutated(_canonical.encode(envelope_pb2.EnvelopeHeader(
    version=1, suite=envelope.SUITE, message_id=bytes(16), message_type="hedui.v1.SealedFile", sender=AGENCY_ID,
    recipient=UNIT_ID, sender_key_id=bytes(16), recipient_key_id=bytes(16), ephemeral_public_key=bytes(32),
    nonce=bytes(24), created_at_ms=START_MS, expires_at_ms=START_MS + DAY_MS)))))  # fmt: skip
def test_damaged_header_raises_only_envelope_errors(header: bytes) -> None:
    data = _framing.encode(header, bytes(32), bytes(64)) if header else _framing.encode(b"\x08", bytes(32), bytes(64))
    only(EnvelopeError, lambda: envelope.message_id_of(data))


# --- signed reports --------------------------------------------------------------------------------------------


@FUZZ
@given(inputs(lambda w: w.report))
def test_signed_report_raises_only_trust_error(data: bytes) -> None:
    def check() -> None:
        signed = read_signed_report(data)
        verify_report_by(signed, world().unit_trust.keyring(AGENCY_ID), AGENCY_ID)

    only(TrustError, check)


# --- keystore files --------------------------------------------------------------------------------------------


@functools.cache
def keystore_bytes(folder: str) -> bytes:
    w = world()
    path = Path(folder) / "base.json"
    keystore.save(path, w.unit, w.unit_trust, "a passphrase for fuzzing", kdf=keystore.FAST_FOR_TESTS)
    return path.read_bytes()


@pytest.fixture(scope="module")
def keystore_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-keystore")


def test_keystore_load_raises_only_keystore_errors(keystore_folder: Path) -> None:
    base = keystore_bytes(str(keystore_folder))
    target = keystore_folder / "fuzzed.json"

    @FUZZ_FILES
    @given(st.binary(max_size=400) | mutated(base) | st.sampled_from([b"[" * 100_000, b'{"a":' * 50_000]))
    def load(data: bytes) -> None:
        target.write_bytes(data)
        target.chmod(0o600)
        only(KeystoreError, lambda: keystore.load(target, "a passphrase for fuzzing"))

    load()
