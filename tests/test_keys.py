"""Key handles, key ids and fingerprints, keyring lifecycle, rotation and revocation announcements, bundles."""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import pickle
import re
from collections.abc import Callable

import pytest
from hedui.v1 import keys_pb2, media_pb2

from keys import (
    AgreementKey,
    Algorithm,
    FixedClock,
    KeyRecord,
    Keyring,
    KeyState,
    KeyStateError,
    PublicKey,
    RevokedKey,
    SigningKey,
    TrustError,
    TrustStore,
    armor,
    bundle_fingerprint,
    dearmor,
    key_fingerprint,
    key_id,
    read_bundle,
)
from keys.announcements import ANNOUNCEMENT_DOMAIN, read_announcement, sign_announcement, sign_bundle
from keys.clock import DAY_MS, HOUR_MS
from keys.envelope import seal_with
from keys.fingerprint import fingerprints_equal, normalize_fingerprint
from keys.handles import PrivateKey, _load_private
from keys.identity import MAX_OVERLAP_MS
from keys.truststore import ANNOUNCEMENT_SKEW_MS
from tests.conftest import AGENCY_ID, UNIT_ID, Pair, Side, real_fingerprint

FINGERPRINT_RE = re.compile(r"^[0-9]{5}( [0-9]{5}){7}$")
P, A, RI, RD, RV = KeyState.PENDING, KeyState.ACTIVE, KeyState.RETIRING, KeyState.RETIRED, KeyState.REVOKED

Snapshot = dict[str, list[KeyRecord]]


def snapshot(trust: TrustStore) -> Snapshot:
    return {party: list(ring) for party, ring in trust}


def bit_flips(data: bytes) -> list[bytes]:
    out = []
    for position in range(len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[position] ^= 1 << bit
            out.append(bytes(flipped))
    return out


def refusals_that_changed_or_escaped(trust: TrustStore, attempt: Callable[[], object]) -> str | None:
    """None if ``attempt`` raised TrustError and left ``trust`` as it was; else what went wrong."""
    before = snapshot(trust)
    try:
        attempt()
    except TrustError:
        return None if snapshot(trust) == before else "refused but the trust store changed"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "accepted"


def rotation(
    party_id: str,
    old: KeyRecord,
    new_public: PublicKey,
    *,
    issued_at_ms: int,
    overlap_ms: int = DAY_MS,
) -> keys_pb2.KeyAnnouncement:
    return keys_pb2.KeyAnnouncement(
        party_id=party_id,
        kind=keys_pb2.ANNOUNCEMENT_KIND_ROTATION,
        old_key_id=old.key_id,
        new_key=KeyRecord(new_public, KeyState.ACTIVE, issued_at_ms).to_proto(),
        overlap_until_ms=issued_at_ms + overlap_ms,
        issued_at_ms=issued_at_ms,
    )


def revocation(party_id: str, target: bytes, *, issued_at_ms: int) -> keys_pb2.KeyAnnouncement:
    return keys_pb2.KeyAnnouncement(
        party_id=party_id,
        kind=keys_pb2.ANNOUNCEMENT_KIND_REVOCATION,
        old_key_id=target,
        issued_at_ms=issued_at_ms,
        reason="compromised",
    )


# --- handles ---------------------------------------------------------------------------------------------------


@pytest.fixture(params=[SigningKey, AgreementKey], ids=["ed25519", "x25519"])
def private_key(request: pytest.FixtureRequest) -> PrivateKey:
    cls: type[SigningKey] | type[AgreementKey] = request.param
    return cls.generate()


def test_handle_repr_and_str_show_no_secret(private_key: PrivateKey) -> None:
    secret = private_key.expose_secret_for_export()
    for text in (repr(private_key), str(private_key), f"{private_key!r:>200}"):
        assert secret.hex() not in text
        assert secret.hex().upper() not in text
        assert repr(secret) not in text
        assert "hidden" in text
        assert private_key.key_id.hex() in text


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_handle_cannot_be_pickled(private_key: PrivateKey, protocol: int) -> None:
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(private_key, protocol=protocol)


def test_party_keys_cannot_be_pickled_because_of_their_handles(pair: Pair) -> None:
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(pair.agency.keys)


def test_handle_copies_are_the_same_object(private_key: PrivateKey) -> None:
    assert copy.copy(private_key) is private_key
    assert copy.deepcopy(private_key) is private_key
    assert copy.deepcopy({"k": private_key})["k"] is private_key


@pytest.mark.parametrize("cls", [SigningKey, AgreementKey, PrivateKey])
def test_no_public_constructor_from_raw_bytes(cls: type[PrivateKey]) -> None:
    with pytest.raises(TypeError, match="not from raw bytes"):
        cls(object(), bytes(32))
    with pytest.raises(TypeError):
        cls(bytes(32))  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="not from raw bytes"):
        cls(None, b"\x01" * 32)


def test_exported_secret_reloads_into_an_equal_handle(private_key: PrivateKey) -> None:
    seed = private_key.expose_secret_for_export()
    assert len(seed) == 32
    again = _load_private(private_key.algorithm, seed)
    assert type(again) is type(private_key)
    assert again is not private_key
    assert again.same_secret(private_key) and private_key.same_secret(again)
    assert again.public == private_key.public
    assert again.key_id == private_key.key_id


def test_same_secret_is_false_for_other_keys_and_other_algorithms() -> None:
    signing = SigningKey.generate()
    assert not signing.same_secret(SigningKey.generate())
    twin = _load_private(Algorithm.X25519, signing.expose_secret_for_export())
    assert isinstance(twin, AgreementKey)
    assert not signing.same_secret(twin)


def test_reloaded_signing_key_signs_verifiably() -> None:
    signing = SigningKey.generate()
    again = _load_private(Algorithm.ED25519, signing.expose_secret_for_export())
    assert isinstance(again, SigningKey)
    assert signing.public.verify(again.sign(b"data"), b"data")
    assert not signing.public.verify(again.sign(b"data"), b"date")


def test_agreement_public_key_never_verifies() -> None:
    signing, agreement = SigningKey.generate(), AgreementKey.generate()
    signature = signing.sign(b"data")
    assert not PublicKey(Algorithm.X25519, signing.public.raw).verify(signature, b"data")
    assert not agreement.public.verify(signature, b"data")


def test_public_key_of_wrong_length_is_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        PublicKey(Algorithm.ED25519, bytes(31))


def test_private_key_seed_of_wrong_length_is_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        _load_private(Algorithm.ED25519, bytes(33))


# --- key ids and fingerprints ----------------------------------------------------------------------------------


def independent_fingerprint(domain: bytes, data: bytes) -> str:
    digest = hashlib.sha512(domain + b"\x00" + data).digest()
    return " ".join(f"{int.from_bytes(digest[5 * i : 5 * i + 5], 'big') % 100000:05d}" for i in range(8))


def test_key_id_is_the_documented_hash_and_stable(private_key: PrivateKey) -> None:
    public = private_key.public
    expected = hashlib.sha256(b"hedui.v1.key-id\x00" + bytes([public.algorithm]) + public.raw).digest()[:16]
    assert public.key_id == expected == key_id(public.algorithm, public.raw)
    assert private_key.key_id == expected
    assert _load_private(public.algorithm, private_key.expose_secret_for_export()).key_id == expected


def test_key_fingerprint_is_eight_groups_of_five_digits_and_stable(private_key: PrivateKey) -> None:
    public = private_key.public
    fingerprint = public.fingerprint
    assert FINGERPRINT_RE.match(fingerprint)
    assert fingerprint == key_fingerprint(public.algorithm, public.raw) == public.fingerprint
    assert fingerprint == independent_fingerprint(b"hedui.v1.key-fingerprint", bytes([public.algorithm]) + public.raw)


def test_key_id_and_fingerprint_depend_on_the_algorithm() -> None:
    raw = SigningKey.generate().public.raw
    assert key_id(Algorithm.ED25519, raw) != key_id(Algorithm.X25519, raw)
    assert key_fingerprint(Algorithm.ED25519, raw) != key_fingerprint(Algorithm.X25519, raw)


def test_bundle_fingerprint_ignores_key_order_and_binds_party_id() -> None:
    keys = [
        (Algorithm.ED25519, SigningKey.generate().public.raw),
        (Algorithm.X25519, AgreementKey.generate().public.raw),
    ]
    fingerprint = bundle_fingerprint(AGENCY_ID, keys)
    assert FINGERPRINT_RE.match(fingerprint)
    assert bundle_fingerprint(AGENCY_ID, keys[::-1]) == fingerprint
    assert bundle_fingerprint(UNIT_ID, keys) != fingerprint
    assert bundle_fingerprint(AGENCY_ID, keys[:1]) != fingerprint
    body = len(AGENCY_ID).to_bytes(2, "big") + AGENCY_ID.encode()
    for algorithm, raw in sorted(keys, key=lambda k: key_id(k[0], k[1])):
        body += bytes([algorithm]) + raw
    assert fingerprint == independent_fingerprint(b"hedui.v1.bundle-fingerprint", body)


@pytest.mark.parametrize(
    "typed",
    [
        "12345 67890 12345 67890 12345 67890 12345 67890",
        "12345-67890-12345-67890-12345-67890-12345-67890",
        "1234567890123456789012345678901234567890",
        "  12345\t67890\n12345 - 67890 1234567890 12345 67890 ",
    ],
)
def test_normalize_fingerprint_accepts_spaces_dashes_or_none(typed: str) -> None:
    canonical = "12345 67890 12345 67890 12345 67890 12345 67890"
    assert normalize_fingerprint(typed) == canonical
    assert fingerprints_equal(typed, canonical)


@pytest.mark.parametrize(
    "typed",
    [
        "1" * 39,
        "1" * 41,
        "12345 67890 12345 67890 12345 67890 12345 6789",
        "12345 67890 12345 67890 12345 67890 12345 6789O",
        "",
        "12345.67890.12345.67890.12345.67890.12345.67890",
    ],
)
def test_normalize_fingerprint_refuses_anything_but_forty_digits(typed: str) -> None:
    with pytest.raises(ValueError, match="40 digits"):
        normalize_fingerprint(typed)


def test_fingerprints_equal_tells_different_fingerprints_apart() -> None:
    assert not fingerprints_equal("1" * 40, "1" * 39 + "2")


@pytest.mark.parametrize(
    "typed",
    ["１２３４５" * 8, "١٢٣٤٥" * 8, "१२३४५" * 8],
    ids=["fullwidth", "arabic-indic", "devanagari"],
)
def test_normalize_fingerprint_never_returns_non_ascii_digits(typed: str) -> None:
    # Regression: `\d` matches any Unicode digit, so full-width digits (what a Chinese IME types) were accepted and
    # returned unchanged; the comparison with the real (ASCII) fingerprint then failed with a misleading mismatch.
    try:
        normalized = normalize_fingerprint(typed)
    except ValueError:
        return
    assert FINGERPRINT_RE.match(normalized), f"normalize_fingerprint returned {normalized!r}"


# --- keyring lifecycle -----------------------------------------------------------------------------------------

#: The documented lifecycle: pending -> active -> retiring -> retired, or revoked from any state but revoked.
#: Staying in the same state is a no-op that the keyring permits.
ALLOWED = {(P, A), (A, RI), (RI, RD), (P, RV), (A, RV), (RI, RV), (RD, RV)} | {(s, s) for s in KeyState}


def record_in(state: KeyState, *, not_before_ms: int = 1000, not_after_ms: int | None = None) -> KeyRecord:
    revoked_at = 1500 if state is KeyState.REVOKED else None
    return KeyRecord(SigningKey.generate().public, state, not_before_ms, not_after_ms, revoked_at)


@pytest.mark.parametrize(
    ("start", "target"),
    [(s, t) for s in KeyState for t in KeyState],
    ids=[f"{s.name.lower()}->{t.name.lower()}" for s in KeyState for t in KeyState],
)
def test_keyring_transition_table(start: KeyState, target: KeyState) -> None:
    record = record_in(start)
    ring = Keyring([record])
    if (start, target) in ALLOWED:
        moved = ring.transition(record.key_id, target)
        assert moved.state is target
        assert ring.require(record.key_id) == moved
        assert record.moved_to(target).state is target
    else:
        with pytest.raises(KeyStateError, match=f"from {start.name.lower()} to {target.name.lower()}"):
            ring.transition(record.key_id, target)
        assert ring.require(record.key_id) == record


def test_transition_of_unknown_key_is_refused() -> None:
    with pytest.raises(KeyStateError, match="no key"):
        Keyring().transition(bytes(16), KeyState.ACTIVE)


def test_valid_at_window_is_half_open() -> None:
    record = record_in(A, not_before_ms=1000, not_after_ms=2000)
    assert not record.valid_at(999)
    assert record.valid_at(1000)
    assert record.valid_at(1999)
    assert not record.valid_at(2000)


def test_valid_at_is_open_ended_without_not_after() -> None:
    record = record_in(A, not_before_ms=1000)
    assert record.valid_at(1000) and record.valid_at(2**62)
    assert not record.valid_at(999)


@pytest.mark.parametrize("state", [P, A, RI, RD])
def test_valid_at_depends_only_on_the_window_unless_revoked(state: KeyState) -> None:
    # A retired key still counts as valid for moments inside its window: old messages keep verifying.
    assert record_in(state, not_before_ms=1000, not_after_ms=2000).valid_at(1500)


def test_revoked_key_is_never_valid() -> None:
    assert not record_in(RV, not_before_ms=1000).valid_at(1500)


def test_current_prefers_newest_active_then_retiring() -> None:
    older, newer = record_in(A, not_before_ms=1000), record_in(A, not_before_ms=2000)
    retiring = record_in(RI, not_before_ms=500, not_after_ms=5000)
    ring = Keyring([older, newer, retiring])
    assert ring.current(Algorithm.ED25519, 2500) == newer
    assert ring.current(Algorithm.ED25519, 1500) == older
    assert ring.current(Algorithm.X25519, 2500) is None
    assert Keyring([retiring, record_in(RV)]).current(Algorithm.ED25519, 2500) == retiring
    assert Keyring([retiring]).current(Algorithm.ED25519, 5000) is None
    assert Keyring([record_in(RD)]).current(Algorithm.ED25519, 2500) is None
    # A pending key is used from the moment its window begins (a staged rotation), whether or not the keyring
    # has been advanced since; before that moment the retiring key it replaces goes on being used.
    staged = record_in(P, not_before_ms=3000)
    assert Keyring([retiring, staged]).current(Algorithm.ED25519, 2999) == retiring
    assert Keyring([retiring, staged]).current(Algorithm.ED25519, 3000) == staged


def test_advance_activates_pending_and_retires_retiring_keys_on_time() -> None:
    pending = record_in(P, not_before_ms=2000)
    retiring = record_in(RI, not_before_ms=0, not_after_ms=3000)
    ring = Keyring([pending, retiring])
    assert ring.advance(1999) == []
    assert [r.state for r in ring.advance(2000)] == [A]
    assert ring.advance(2999) == []
    assert [(r.key_id, r.state) for r in ring.advance(3000)] == [(retiring.key_id, RD)]
    assert ring.advance(10_000) == []


def test_key_record_proto_round_trip_and_checks() -> None:
    record = record_in(RI, not_before_ms=1000, not_after_ms=2000)
    assert KeyRecord.from_proto(record.to_proto()) == record
    wrong_id = record.to_proto()
    wrong_id.key_id = bytes(16)
    empty_window = record.to_proto()
    empty_window.not_after_ms = 1000
    revoked_without_time = record_in(A).to_proto()
    revoked_without_time.state = keys_pb2.KEY_STATE_REVOKED
    for message in (wrong_id, empty_window, revoked_without_time):
        with pytest.raises(ValueError):
            KeyRecord.from_proto(message)


# --- rotation and revocation announcements ---------------------------------------------------------------------


def test_signing_key_rotation_is_signed_by_old_key_with_proof_of_possession_and_accepted(pair: Pair) -> None:
    agency, unit, now = pair.agency, pair.unit, pair.clock.now_ms()
    old = agency.keys.signing_key(now)
    data = agency.keys.rotate(Algorithm.ED25519, now_ms=now, overlap_ms=DAY_MS)
    new = agency.keys.signing_key(now)
    assert new.key_id != old.key_id

    ann = read_announcement(data)
    assert ann.message.kind == keys_pb2.ANNOUNCEMENT_KIND_ROTATION
    assert ann.message.party_id == AGENCY_ID
    assert ann.signer_key_id == old.key_id == ann.message.old_key_id
    assert old.public.verify(ann.signature, ANNOUNCEMENT_DOMAIN + ann.body)
    assert new.public.verify(ann.new_key_signature, ANNOUNCEMENT_DOMAIN + ann.body)
    assert ann.new_key is not None and ann.new_key.public == new.public
    assert ann.message.overlap_until_ms == now + DAY_MS

    record = unit.trust.apply_announcement(data, now_ms=now)
    assert (record.key_id, record.state) == (new.key_id, KeyState.ACTIVE)
    old_there = unit.trust.signing_record(AGENCY_ID, old.key_id)
    assert old_there is not None
    assert (old_there.state, old_there.not_after_ms) == (KeyState.RETIRING, now + DAY_MS)


def test_agreement_key_rotation_is_signed_by_current_signing_key_and_accepted(pair: Pair) -> None:
    agency, unit, now = pair.agency, pair.unit, pair.clock.now_ms()
    old = agency.keys.agreement_public(now)
    data = agency.keys.rotate(Algorithm.X25519, now_ms=now, overlap_ms=HOUR_MS)
    ann = read_announcement(data)
    assert ann.signer_key_id == agency.keys.signing_key(now).key_id
    assert ann.new_key_signature == b""
    record = unit.trust.apply_announcement(data, now_ms=now)
    assert record.algorithm is Algorithm.X25519
    assert unit.trust.agreement_key_for(AGENCY_ID, now) == record
    assert agency.keys.agreement_public(now).key_id == record.key_id != old.key_id


@pytest.mark.parametrize("overlap_ms", [0, -1, MAX_OVERLAP_MS + 1])
def test_rotation_with_bad_overlap_is_refused(pair: Pair, overlap_ms: int) -> None:
    before = list(pair.agency.keys.records())
    with pytest.raises(KeyStateError, match="overlap"):
        pair.agency.keys.rotate(Algorithm.ED25519, now_ms=pair.clock.now_ms(), overlap_ms=overlap_ms)
    assert list(pair.agency.keys.records()) == before


def test_every_bit_flip_of_a_rotation_announcement_is_refused_and_changes_nothing(pair: Pair) -> None:
    now = pair.clock.now_ms()
    data = pair.agency.keys.rotate(Algorithm.ED25519, now_ms=now, overlap_ms=DAY_MS)
    problems = {}
    for index, flipped in enumerate(bit_flips(data)):
        problem = refusals_that_changed_or_escaped(
            pair.unit.trust, functools.partial(pair.unit.trust.apply_announcement, flipped, now_ms=now)
        )
        if problem:
            problems[f"byte {index // 8} bit {index % 8}"] = problem
    assert problems == {}
    pair.unit.trust.apply_announcement(data, now_ms=now)  # the genuine one still applies


def test_announcement_from_unknown_party_is_refused(pair: Pair, make_side: Callable[[str], Side]) -> None:
    stranger = make_side("unit.220200.civil")
    now = pair.clock.now_ms()
    data = stranger.keys.rotate(Algorithm.ED25519, now_ms=now, overlap_ms=DAY_MS)
    before = snapshot(pair.unit.trust)
    with pytest.raises(TrustError, match="not in the trust store"):
        pair.unit.trust.apply_announcement(data, now_ms=now)
    assert snapshot(pair.unit.trust) == before


def test_announcement_claiming_a_known_party_but_signed_by_a_stranger_is_refused(
    pair: Pair, make_side: Callable[[str], Side]
) -> None:
    stranger = make_side("unit.220200.civil")
    now = pair.clock.now_ms()
    target = pair.agency.keys.signing_key(now).key_id
    data = sign_announcement(revocation(AGENCY_ID, target, issued_at_ms=now), stranger.keys.signing_key(now))
    assert (
        refusals_that_changed_or_escaped(pair.unit.trust, lambda: pair.unit.trust.apply_announcement(data, now_ms=now))
        is None
    )


@pytest.mark.parametrize("pop", ["missing", "by-another-key", "over-other-bytes"])
def test_signing_key_rotation_without_valid_proof_of_possession_is_refused(pair: Pair, pop: str) -> None:
    now = pair.clock.now_ms()
    old = pair.agency.keys.signing_key(now)
    old_record = pair.agency.keys.record(old.key_id)
    assert old_record is not None
    new = SigningKey.generate()
    message = rotation(AGENCY_ID, old_record, new.public, issued_at_ms=now)
    if pop == "missing":
        data = sign_announcement(message, old)
    elif pop == "by-another-key":
        data = sign_announcement(message, old, SigningKey.generate())
    else:
        signed = keys_pb2.SignedKeyAnnouncement.FromString(sign_announcement(message, old, new))
        signed.new_key_signature = new.sign(ANNOUNCEMENT_DOMAIN + signed.announcement + b"x")
        data = signed.SerializeToString(deterministic=True)
    before = snapshot(pair.unit.trust)
    with pytest.raises(TrustError, match="proof of possession"):
        pair.unit.trust.apply_announcement(data, now_ms=now)
    assert snapshot(pair.unit.trust) == before


def test_signing_key_rotation_signed_by_another_signing_key_is_refused(pair: Pair) -> None:
    # The agency has two signing keys (after a rotation); the new one may not rotate the old one away.
    now = pair.clock.now_ms()
    agency, unit = pair.agency, pair.unit
    old = agency.keys.signing_key(now)
    unit.trust.apply_announcement(agency.keys.rotate(Algorithm.ED25519, now_ms=now, overlap_ms=DAY_MS), now_ms=now)
    current = agency.keys.signing_key(now)
    old_record = unit.trust.signing_record(AGENCY_ID, old.key_id)
    assert old_record is not None
    newest = SigningKey.generate()
    data = sign_announcement(rotation(AGENCY_ID, old_record, newest.public, issued_at_ms=now), current, newest)
    with pytest.raises(TrustError, match="signed by the key it replaces"):
        unit.trust.apply_announcement(data, now_ms=now)


def test_announcement_dated_beyond_skew_in_the_future_is_refused(pair: Pair) -> None:
    now = pair.clock.now_ms()
    future = now + ANNOUNCEMENT_SKEW_MS + 1
    data = pair.agency.keys.rotate(Algorithm.X25519, now_ms=future, overlap_ms=DAY_MS)
    with pytest.raises(TrustError, match="future"):
        pair.unit.trust.apply_announcement(data, now_ms=now)
    pair.unit.trust.apply_announcement(data, now_ms=now + 1)  # within skew from a slightly later moment


def test_self_signed_revocation_of_the_only_signing_key_is_accepted(pair: Pair) -> None:
    now = pair.clock.now_ms()
    target = pair.agency.keys.signing_key(now).key_id
    data = pair.agency.keys.revoke(target, now_ms=now, reason="compromised")
    ann = read_announcement(data)
    assert ann.signer_key_id == target == ann.message.old_key_id
    assert ann.message.reason == "compromised"
    assert pair.agency.keys.secret(target) is None
    with pytest.raises(KeyStateError):
        pair.agency.keys.signing_key(now)

    record = pair.unit.trust.apply_announcement(data, now_ms=now)
    assert (record.key_id, record.state, record.revoked_at_ms) == (target, KeyState.REVOKED, now)


def test_revocation_of_an_agreement_key_is_signed_by_the_signing_key(pair: Pair) -> None:
    now = pair.clock.now_ms()
    target = pair.agency.keys.agreement_public(now).key_id
    data = pair.agency.keys.revoke(target, now_ms=now, reason="superseded")
    assert read_announcement(data).signer_key_id == pair.agency.keys.signing_key(now).key_id
    assert pair.unit.trust.apply_announcement(data, now_ms=now).state is KeyState.REVOKED
    with pytest.raises(TrustError, match="no usable key-agreement key"):
        pair.unit.trust.agreement_key_for(AGENCY_ID, now)


@pytest.mark.parametrize("reason", ["", "x" * 65, "泄露"])
def test_revocation_reason_must_be_a_short_ascii_code(pair: Pair, reason: str) -> None:
    now = pair.clock.now_ms()
    with pytest.raises(KeyStateError, match="reason"):
        pair.agency.keys.revoke(pair.agency.keys.signing_key(now).key_id, now_ms=now, reason=reason)


@pytest.mark.parametrize("kind", ["rotate-ed25519", "rotate-x25519", "revoke"])
def test_apply_announcement_is_idempotent(pair: Pair, kind: str) -> None:
    now = pair.clock.now_ms()
    keys = pair.agency.keys
    if kind == "revoke":
        data = keys.revoke(keys.agreement_public(now).key_id, now_ms=now, reason="superseded")
    else:
        algorithm = Algorithm.ED25519 if kind == "rotate-ed25519" else Algorithm.X25519
        data = keys.rotate(algorithm, now_ms=now, overlap_ms=DAY_MS)
    first = pair.unit.trust.apply_announcement(data, now_ms=now)
    after_first = snapshot(pair.unit.trust)
    assert pair.unit.trust.apply_announcement(data, now_ms=now + HOUR_MS) == first
    assert snapshot(pair.unit.trust) == after_first
    # Still idempotent once the overlap is over and the store retired the old key.
    pair.unit.trust.advance(now + 2 * DAY_MS)
    after_advance = snapshot(pair.unit.trust)
    assert pair.unit.trust.apply_announcement(data, now_ms=now + 2 * DAY_MS).key_id == first.key_id
    assert snapshot(pair.unit.trust) == after_advance


def test_rotation_of_a_revoked_key_is_refused(pair: Pair) -> None:
    now = pair.clock.now_ms()
    keys = pair.agency.keys
    agreement = keys.agreement_public(now)
    rotated = keys.rotate(Algorithm.X25519, now_ms=now, overlap_ms=DAY_MS)
    revoked = keys.revoke(agreement.key_id, now_ms=now, reason="compromised")
    pair.unit.trust.apply_announcement(revoked, now_ms=now)
    with pytest.raises(TrustError, match="revoked"):
        pair.unit.trust.apply_announcement(rotated, now_ms=now)


def test_failed_revocation_never_leaves_a_revoked_key_with_its_secret(pair: Pair) -> None:
    # Regression: with every signing key revoked, revoking the agreement key raised KeyStateError only after the
    # record had been moved to revoked, so the secret stayed in the handle set (and a keystore save wrote it out)
    # while no announcement told the peers.
    now = pair.clock.now_ms()
    keys = pair.agency.keys
    keys.revoke(keys.signing_key(now).key_id, now_ms=now, reason="compromised")
    agreement = keys.agreement_public(now)
    with pytest.raises(KeyStateError, match="no usable signing key"):
        keys.revoke(agreement.key_id, now_ms=now + 1, reason="compromised")
    leaked = [r.key_id.hex() for r in keys.records() if r.state is KeyState.REVOKED and keys.secret(r.key_id)]
    assert leaked == []
    record = keys.record(agreement.key_id)
    assert record == agreement or (record is not None and record.state is KeyState.REVOKED)


# --- regressions: announcements signed by keys that are no longer trusted ----------------------------------------


@pytest.fixture
def leaked_retired_key(pair: Pair) -> tuple[SigningKey, int]:
    """The agency rotated its signing key; a month later the old key is retired everywhere but leaks.

    Returns the old key and the start of its validity window, a moment at which it was trusted.
    """
    start = pair.clock.now_ms()
    old = pair.agency.keys.signing_key(start)
    rotated_at = start + HOUR_MS
    announcement = pair.agency.keys.rotate(Algorithm.ED25519, now_ms=rotated_at, overlap_ms=DAY_MS)
    pair.unit.trust.apply_announcement(announcement, now_ms=rotated_at)
    pair.clock.set(start + 30 * DAY_MS)
    pair.agency.keys.advance(pair.clock.now_ms())
    pair.unit.trust.advance(pair.clock.now_ms())
    old_record = pair.unit.trust.signing_record(AGENCY_ID, old.key_id)
    assert old_record is not None and old_record.state is KeyState.RETIRED
    assert pair.agency.keys.secret(old.key_id) is None
    return old, start


def test_retired_signing_key_cannot_rotate_a_current_key_with_a_backdated_announcement(
    pair: Pair, leaked_retired_key: tuple[SigningKey, int]
) -> None:
    old, trusted_then = leaked_retired_key
    now = pair.clock.now_ms()
    victim = pair.unit.trust.agreement_key_for(AGENCY_ID, now)
    attacker = AgreementKey.generate()
    forged = sign_announcement(rotation(AGENCY_ID, victim, attacker.public, issued_at_ms=trusted_then), old)

    problem = refusals_that_changed_or_escaped(
        pair.unit.trust, lambda: pair.unit.trust.apply_announcement(forged, now_ms=now)
    )
    assert problem is None, f"backdated rotation by a retired key: {problem}"
    assert pair.unit.trust.agreement_key_for(AGENCY_ID, now).key_id == victim.key_id


def test_retired_signing_key_cannot_revoke_the_current_key_with_a_backdated_announcement(
    pair: Pair, leaked_retired_key: tuple[SigningKey, int]
) -> None:
    old, trusted_then = leaked_retired_key
    now = pair.clock.now_ms()
    current = pair.agency.keys.signing_key(now).key_id
    forged = sign_announcement(revocation(AGENCY_ID, current, issued_at_ms=trusted_then), old)

    problem = refusals_that_changed_or_escaped(
        pair.unit.trust, lambda: pair.unit.trust.apply_announcement(forged, now_ms=now)
    )
    assert problem is None, f"backdated revocation by a retired key: {problem}"


def test_retiring_signing_key_cannot_be_rotated_a_second_time(pair: Pair) -> None:
    # During the overlap the superseded key is still trusted for messages, but it must not be able to introduce a
    # second successor of its own choosing or push its own end of validity out to 90 days.
    now = pair.clock.now_ms()
    old = pair.agency.keys.signing_key(now)
    pair.unit.trust.apply_announcement(
        pair.agency.keys.rotate(Algorithm.ED25519, now_ms=now, overlap_ms=DAY_MS), now_ms=now
    )
    old_record = pair.unit.trust.signing_record(AGENCY_ID, old.key_id)
    assert old_record is not None and old_record.state is KeyState.RETIRING
    later = now + HOUR_MS
    attacker = SigningKey.generate()
    forged = sign_announcement(
        rotation(AGENCY_ID, old_record, attacker.public, issued_at_ms=later, overlap_ms=MAX_OVERLAP_MS), old, attacker
    )

    problem = refusals_that_changed_or_escaped(
        pair.unit.trust, lambda: pair.unit.trust.apply_announcement(forged, now_ms=later)
    )
    assert problem is None, f"second rotation of a retiring key: {problem}"
    assert pair.unit.trust.signing_record(AGENCY_ID, attacker.key_id) is None


def test_retiring_signing_key_cannot_revoke_its_successor_or_rotate_the_agreement_key(pair: Pair) -> None:
    # After a rotation the old signing key still verifies what it signed during the overlap, but authority over
    # the party's keys has passed to the new one: a leaked old key must not revoke it or swap the agreement key.
    now = pair.clock.now_ms()
    old = pair.agency.keys.signing_key(now)
    pair.unit.trust.apply_announcement(
        pair.agency.keys.rotate(Algorithm.ED25519, now_ms=now, overlap_ms=DAY_MS), now_ms=now
    )
    successor = pair.agency.keys.signing_key(now).key_id
    agreement = pair.unit.trust.agreement_key_for(AGENCY_ID, now)
    later = now + HOUR_MS
    attacker = AgreementKey.generate()
    forgeries = {
        "revoke the successor": sign_announcement(revocation(AGENCY_ID, successor, issued_at_ms=later), old),
        "rotate the agreement key": sign_announcement(
            rotation(AGENCY_ID, agreement, attacker.public, issued_at_ms=later), old
        ),
    }
    for what, forged in forgeries.items():
        attempt = functools.partial(pair.unit.trust.apply_announcement, forged, now_ms=later)
        problem = refusals_that_changed_or_escaped(pair.unit.trust, attempt)
        assert problem is None, f"retiring key could {what}: {problem}"
    assert pair.unit.trust.agreement_key_for(AGENCY_ID, later).key_id == agreement.key_id

    # It may still disown itself.
    record = pair.unit.trust.apply_announcement(
        sign_announcement(revocation(AGENCY_ID, old.key_id, issued_at_ms=later), old), now_ms=later
    )
    assert record.state is KeyState.REVOKED


def test_retiring_signing_key_keeps_authority_during_a_staged_rotations_lead_time(pair: Pair) -> None:
    # Until the successor takes over, the old key is the one the party signs with, so it may still revoke keys.
    now = pair.clock.now_ms()
    pair.unit.trust.apply_announcement(
        pair.agency.keys.rotate(Algorithm.ED25519, now_ms=now, overlap_ms=DAY_MS, activate_at_ms=now + DAY_MS),
        now_ms=now,
    )
    agreement = pair.unit.trust.agreement_key_for(AGENCY_ID, now)
    later = now + HOUR_MS
    revoked = pair.unit.trust.apply_announcement(
        pair.agency.keys.revoke(agreement.key_id, now_ms=later, reason="compromised"), now_ms=later
    )
    assert revoked.state is KeyState.REVOKED


# --- bundles and fingerprints on import --------------------------------------------------------------------------


def test_bundle_lists_every_key_but_retired_ones_and_verifies(pair: Pair) -> None:
    now = pair.clock.now_ms()
    keys = pair.agency.keys
    keys.rotate(Algorithm.X25519, now_ms=now, overlap_ms=HOUR_MS)
    keys.advance(now + HOUR_MS)
    bundle = read_bundle(keys.bundle(now + HOUR_MS))
    assert bundle.party_id == AGENCY_ID
    assert {r.key_id for r in bundle.keys} == {r.key_id for r in keys.records() if r.state is not KeyState.RETIRED}
    assert len(bundle.keys) == 2
    assert bundle.fingerprint == real_fingerprint(keys)


def test_import_bundle_with_wrong_fingerprint_repeats_what_was_typed_never_the_bundles_and_changes_nothing(
    clock: FixedClock, make_side: Callable[[str], Side], pair: Pair
) -> None:
    civil = make_side("unit.220100.civil")
    real = real_fingerprint(civil.keys)
    wrong = real_fingerprint(pair.agency.keys)
    trust = pair.unit.trust
    before = snapshot(trust)
    with pytest.raises(TrustError) as caught:
        trust.import_bundle(civil.keys.bundle(clock.now_ms()), expected_fingerprint=wrong.replace(" ", "-"))
    assert real not in str(caught.value)  # an operator in a hurry would copy it back
    assert wrong in str(caught.value)
    assert "Nothing was done" in str(caught.value)
    assert snapshot(trust) == before

    # Replacing an already enrolled party with the wrong fingerprint changes nothing either.
    with pytest.raises(TrustError, match="fingerprint mismatch"):
        trust.import_bundle(pair.agency.keys.bundle(clock.now_ms()), expected_fingerprint=real)
    assert snapshot(trust) == before


def test_reimported_bundle_never_brings_a_revoked_key_back(pair: Pair, sealed_file: media_pb2.SealedFile) -> None:
    # The fingerprint covers the public keys, not their states: the same key letter matches the bundle from the
    # day of enrolment, and one re-signed with the leaked key that claims it is active.
    enrolled_at = pair.clock.now_ms()
    old_bundle = pair.agency.keys.bundle(enrolled_at)
    letter = real_fingerprint(pair.agency.keys)
    leaked = pair.agency.keys.signing_key(enrolled_at)
    later = enrolled_at + HOUR_MS
    pair.unit.trust.apply_announcement(
        pair.agency.keys.revoke(leaked.key_id, now_ms=later, reason="compromised"), now_ms=later
    )
    active_again = [
        KeyRecord(r.public, KeyState.ACTIVE, r.not_before_ms) if r.key_id == leaked.key_id else r
        for r in pair.agency.keys.records()
    ]
    forged_bundle = sign_bundle(AGENCY_ID, active_again, leaked, later)
    assert read_bundle(forged_bundle).fingerprint == read_bundle(old_bundle).fingerprint == letter

    for bundle in (old_bundle, forged_bundle):
        attempt = functools.partial(pair.unit.trust.import_bundle, bundle, expected_fingerprint=letter, now_ms=later)
        assert refusals_that_changed_or_escaped(pair.unit.trust, attempt) is None
        record = pair.unit.trust.signing_record(AGENCY_ID, leaked.key_id)
        assert record is not None and record.state is KeyState.REVOKED
        sealed = seal_with(
            sealed_file,
            sender=AGENCY_ID,
            signing_key=leaked,
            recipient=UNIT_ID,
            recipient_key=pair.agency.trust.agreement_key_for(UNIT_ID, later),
            created_at_ms=enrolled_at,
            ttl_ms=DAY_MS,
        )
        with pytest.raises(RevokedKey):
            pair.unit.courier.open(sealed)


def test_a_superseded_key_cannot_take_its_party_back_through_a_bundle_with_the_current_key_letter(pair: Pair) -> None:
    # The old signing key leaks after a rotation. Re-signed by it, the party's current key set (so the genuine,
    # current key letter matches) claims the old key never ends and its successor is revoked: were that taken, the
    # old key would be current again and could install an agreement key of the attacker's.
    now = pair.clock.now_ms()
    old = pair.agency.keys.signing_key(now)
    pair.unit.trust.apply_announcement(
        pair.agency.keys.rotate(Algorithm.ED25519, now_ms=now, overlap_ms=DAY_MS), now_ms=now
    )
    successor = pair.agency.keys.signing_key(now)
    letter = real_fingerprint(pair.agency.keys)
    later = now + HOUR_MS

    def claimed(record: KeyRecord) -> KeyRecord:
        if record.key_id == old.key_id:
            return dataclasses.replace(record, not_after_ms=None)
        if record.key_id == successor.key_id:
            return dataclasses.replace(record, state=KeyState.REVOKED, revoked_at_ms=later)
        return record

    forged_records = [claimed(r) for r in pair.agency.keys.records()]
    forged = sign_bundle(AGENCY_ID, forged_records, old, later)
    assert read_bundle(forged).fingerprint == letter

    attempt = functools.partial(pair.unit.trust.import_bundle, forged, expected_fingerprint=letter, now_ms=later)
    assert refusals_that_changed_or_escaped(pair.unit.trust, attempt) is None
    ring = pair.unit.trust.keyring(AGENCY_ID)
    assert ring is not None
    current = ring.current(Algorithm.ED25519, later)
    assert current is not None and current.key_id == successor.key_id
    # Signed by the current key it is the party speaking, and taken; still, no known key's window is widened.
    widened = [
        dataclasses.replace(r, not_after_ms=None) if r.key_id == old.key_id else r for r in pair.agency.keys.records()
    ]
    honest = sign_bundle(AGENCY_ID, widened, successor, later)
    pair.unit.trust.import_bundle(honest, expected_fingerprint=letter, now_ms=later)
    old_record = pair.unit.trust.signing_record(AGENCY_ID, old.key_id)
    assert old_record is not None and old_record.not_after_ms == now + DAY_MS


def test_a_bundle_with_new_keys_is_a_re_enrolment_that_never_widens_what_the_store_knew(pair: Pair) -> None:
    # The agency rotated its signing key and the unit missed the announcement: the agency's new key letter vouches
    # for the new key set. A known key may move on (active -> retiring) but not get a longer window than it had.
    now = pair.clock.now_ms()
    old = pair.agency.keys.signing_key(now)
    pair.agency.keys.rotate(Algorithm.ED25519, now_ms=now, overlap_ms=DAY_MS)
    successor = pair.agency.keys.signing_key(now)
    records = [
        dataclasses.replace(r, not_before_ms=r.not_before_ms - DAY_MS) if r.key_id == old.key_id else r
        for r in pair.agency.keys.records()
    ]
    bundle = sign_bundle(AGENCY_ID, records, successor, now)
    before = pair.unit.trust.signing_record(AGENCY_ID, old.key_id)
    assert before is not None and before.state is KeyState.ACTIVE
    pair.unit.trust.import_bundle(bundle, expected_fingerprint=real_fingerprint(pair.agency.keys), now_ms=now)
    after = pair.unit.trust.signing_record(AGENCY_ID, old.key_id)
    assert after is not None
    assert (after.state, after.not_after_ms, after.not_before_ms) == (
        KeyState.RETIRING,
        now + DAY_MS,
        before.not_before_ms,
    )
    assert pair.unit.trust.signing_record(AGENCY_ID, successor.key_id) is not None


def test_reimported_bundle_keeps_what_the_store_knows_of_later_states_and_revocations(pair: Pair) -> None:
    now = pair.clock.now_ms()
    old_agreement = pair.unit.trust.agreement_key_for(AGENCY_ID, now)
    old_bundle = pair.agency.keys.bundle(now)
    letter = real_fingerprint(pair.agency.keys)
    pair.unit.trust.apply_announcement(
        pair.agency.keys.rotate(Algorithm.X25519, now_ms=now, overlap_ms=HOUR_MS), now_ms=now
    )
    successor = pair.unit.trust.agreement_key_for(AGENCY_ID, now)
    later = now + 2 * HOUR_MS
    pair.unit.trust.advance(later)
    pair.unit.trust.apply_announcement(
        pair.agency.keys.revoke(successor.key_id, now_ms=later, reason="compromised"), now_ms=later
    )

    pair.unit.trust.import_bundle(old_bundle, expected_fingerprint=letter)
    ring = pair.unit.trust.keyring(AGENCY_ID)
    assert ring is not None
    states = {r.key_id: r.state for r in ring}
    # The old agreement key stays retired, and the revoked successor, absent from the old bundle, stays on record
    # as revoked, so that no later import of a bundle that lists it can make it usable.
    assert states[old_agreement.key_id] is KeyState.RETIRED
    assert states[successor.key_id] is KeyState.REVOKED
    with pytest.raises(TrustError, match="no usable key-agreement key"):
        pair.unit.trust.agreement_key_for(AGENCY_ID, later)


def test_import_bundle_accepts_the_fingerprint_as_typed(clock: FixedClock, make_side: Callable[[str], Side]) -> None:
    civil = make_side("unit.220100.civil")
    trust = TrustStore()
    typed = real_fingerprint(civil.keys).replace(" ", "")
    bundle = trust.import_bundle(civil.keys.bundle(clock.now_ms()), expected_fingerprint=typed)
    assert trust.parties() == [civil.party_id]
    assert bundle.fingerprint == real_fingerprint(civil.keys)


@pytest.mark.parametrize("expected", ["", "1234", "not a fingerprint"])
def test_import_bundle_with_malformed_expected_fingerprint_is_a_trust_error(pair: Pair, expected: str) -> None:
    with pytest.raises(TrustError, match="40 digits"):
        TrustStore().import_bundle(pair.agency.keys.bundle(pair.clock.now_ms()), expected_fingerprint=expected)


def test_party_does_not_import_its_own_bundle(pair: Pair) -> None:
    keys = pair.agency.keys
    with pytest.raises(TrustError, match="own party"):
        TrustStore().import_bundle(
            keys.bundle(pair.clock.now_ms()), expected_fingerprint=real_fingerprint(keys), own_party_id=AGENCY_ID
        )


def test_every_bit_flip_of_a_bundle_is_refused(pair: Pair) -> None:
    data = pair.agency.keys.bundle(pair.clock.now_ms())
    problems = []
    for index, flipped in enumerate(bit_flips(data)):
        try:
            read_bundle(flipped)
        except TrustError:
            continue
        except Exception as exc:
            problems.append(f"byte {index // 8} bit {index % 8}: {type(exc).__name__}: {exc}")
        else:
            problems.append(f"byte {index // 8} bit {index % 8}: accepted")
    assert problems == []


def test_bundle_signed_by_a_key_outside_it_is_refused(pair: Pair) -> None:
    now = pair.clock.now_ms()
    records = list(pair.agency.keys.records())
    data = sign_bundle(AGENCY_ID, records, SigningKey.generate(), now)
    with pytest.raises(TrustError, match="signature"):
        read_bundle(data)


def test_armor_round_trip(pair: Pair) -> None:
    data = pair.agency.keys.bundle(pair.clock.now_ms())
    text = armor(data)
    lines = text.splitlines()
    assert lines[0] == "-----BEGIN HEDUI PUBLIC KEY BUNDLE-----"
    assert lines[-1] == "-----END HEDUI PUBLIC KEY BUNDLE-----"
    assert all(len(line) <= 64 for line in lines[1:-1])
    assert dearmor(text) == data
    in_a_letter = "Dear colleague,\r\n\r\nour keys:\r\n" + text.replace("\n", "\r\n") + "\r\nRegards\r\n"
    assert dearmor(in_a_letter) == data


@pytest.mark.parametrize(
    "damage",
    ["drop-begin", "drop-end", "bad-character", "drop-character", "only-header"],
)
def test_damaged_armor_is_refused(pair: Pair, damage: str) -> None:
    text = armor(pair.agency.keys.bundle(pair.clock.now_ms()))
    lines = text.splitlines()
    if damage == "drop-begin":
        damaged = "\n".join(lines[1:])
    elif damage == "drop-end":
        damaged = "\n".join(lines[:-1])
    elif damage == "bad-character":
        damaged = "\n".join([lines[0], "*" + lines[1][1:], *lines[2:]])
    elif damage == "drop-character":
        damaged = "\n".join([lines[0], lines[1][1:], *lines[2:]])
    else:
        damaged = lines[0] + "\n" + lines[-1]
    with pytest.raises(TrustError):
        read_bundle(dearmor(damaged))


def test_armor_with_any_changed_character_never_yields_a_different_bundle(pair: Pair) -> None:
    data = pair.agency.keys.bundle(pair.clock.now_ms())
    text = armor(data)
    body_start = text.index("\n") + 1
    body_end = text.rindex("-----END")
    problems = []
    for position in range(body_start, body_end):
        if text[position] == "\n":
            continue
        replacement = "A" if text[position] != "A" else "B"
        damaged = text[:position] + replacement + text[position + 1 :]
        try:
            recovered = dearmor(damaged)
            bundle = read_bundle(recovered)
        except TrustError:
            continue
        if recovered != data:
            problems.append(f"position {position}: accepted a different bundle for {bundle.party_id}")
    assert problems == []
