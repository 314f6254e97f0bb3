"""Sealed envelope v1 test vectors (tests/vectors/envelope_v1.json, docs/envelope.md "Test vectors").

The committed file must be exactly what tests/vectorgen.py builds; every positive vector must open with
keys.envelope.open_at to its message; every negative vector must be refused with exactly its error; and the positive
vectors must follow from the specification with nothing but the primitive libraries, so that the text, the vectors
and the code say the same thing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nacl.bindings
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from google.protobuf.message import Message
from hedui.v1 import agency_pb2, media_pb2

from common.workdays import WorkdayCalendar
from keys import _canonical, errors
from keys import steps as steps_module
from keys.announcements import armor, dearmor, read_bundle
from keys.clock import FixedClock
from keys.envelope import MAX_ENVELOPE_BYTES, Courier, Opened, open_at
from keys.fingerprint import Algorithm
from keys.handles import PrivateKey, PublicKey, _load_private
from keys.identity import PartyKeys
from keys.keyring import KeyRecord, Keyring, KeyState
from keys.replay import MemoryReplayCache
from keys.roster import REFUSALS as ROSTER_REFUSALS
from keys.roster import Notice, RosterError, RosterHistory
from keys.sealedfile import open_sealed_file
from keys.truststore import TrustStore
from tests import vectorgen, vectorgen_formats, vectorgen_rosters, vectorgen_steps

Json = dict[str, Any]

ROOT = Path(__file__).resolve().parent.parent
VECTOR_FILE = ROOT / "tests" / "vectors" / "envelope_v1.json"
SPEC_FILE = ROOT / "docs" / "envelope.md"
EXPECT: Mapping[str, type[Message]] = {"hedui.v1.SealedFile": media_pb2.SealedFile}


@functools.cache
def load_vectors() -> Json:
    """The committed vector document."""
    document: Json = json.loads(VECTOR_FILE.read_text(encoding="utf-8"))
    return document


def vectors(kind: str) -> list[Any]:
    return [pytest.param(vector, id=vector["name"]) for vector in load_vectors()[kind]]


# --- receiver set-up with the project's own classes -------------------------------------------------------------


def _record(doc: Json) -> KeyRecord:
    record = KeyRecord(
        public=PublicKey(Algorithm[doc["algorithm"]], bytes.fromhex(doc["public"])),
        state=KeyState[doc["state"]],
        not_before_ms=doc["not_before_ms"],
        not_after_ms=doc["not_after_ms"],
        revoked_at_ms=doc["revoked_at_ms"],
    )
    assert record.key_id.hex() == doc["key_id"]
    return record


def build_receiver(context: Json) -> tuple[PartyKeys, TrustStore]:
    """The receiver's PartyKeys and TrustStore, built the way the keystore loads them."""
    records: list[KeyRecord] = []
    secrets: dict[bytes, PrivateKey] = {}
    for doc in context["own_keys"]:
        record = _record(doc)
        secret = _load_private(record.algorithm, bytes.fromhex(doc["seed"]))
        assert secret.public == record.public
        records.append(record)
        secrets[record.key_id] = secret
    me = PartyKeys(context["party_id"], Keyring(records), secrets)
    trust = TrustStore()
    peers: dict[str, list[KeyRecord]] = {}
    for doc in context["trusted_keys"]:
        peers.setdefault(doc["party_id"], []).append(_record(doc))
    for party_id, peer_records in peers.items():
        trust.set_keyring(party_id, Keyring(peer_records))
    return me, trust


def open_vector(vector: Json) -> Opened:
    """Open the vector's envelope ``opens`` times with one replay cache; returns the last result."""
    context = vector["receiver"]
    me, trust = build_receiver(context)
    replay = MemoryReplayCache()
    data = bytes.fromhex(vector["envelope"])
    opened: Opened | None = None
    for _ in range(context["opens"]):
        opened = open_at(
            data,
            me=me,
            trust=trust,
            replay=replay,
            now_ms=context["now_ms"],
            expect=EXPECT,
            clock_skew_ms=context["clock_skew_ms"],
        )
    assert opened is not None
    return opened


def content(length: int) -> bytes:
    """The content rule of the vectors, written out again: byte i is i mod 251."""
    return bytes(i % 251 for i in range(length))


# --- the file is current ----------------------------------------------------------------------------------------


def test_committed_vectors_are_what_the_generator_builds() -> None:
    expected = vectorgen.render(vectorgen.build_vectors()).encode()
    actual = VECTOR_FILE.read_bytes()
    if actual != expected:
        at = next((i for i, (a, b) in enumerate(zip(actual, expected, strict=False)) if a != b), None)
        where = f"first difference at byte {at}" if at is not None else "one file is a prefix of the other"
        pytest.fail(
            f"{VECTOR_FILE.relative_to(ROOT)} is not what tests/vectorgen.py builds ({where}). If the format or "
            "the reference implementation changed on purpose, regenerate with `python scripts/make_vectors.py` "
            "and say so in the commit; otherwise the change broke compatibility with every other implementation.",
            pytrace=False,
        )
    assert len(actual) < 1_000_000


def test_every_failure_kind_has_a_negative_vector() -> None:
    negatives = load_vectors()["negative"]
    assert {v["error"] for v in negatives} == {cls.__name__ for cls in errors.ENVELOPE_ERRORS}
    names = [v["name"] for v in negatives + load_vectors()["positive"]]
    assert len(names) == len(set(names))


# --- the reference implementation agrees with the vectors -------------------------------------------------------


@pytest.mark.parametrize("vector", vectors("positive"))
def test_positive_vector_opens_to_its_message(vector: Json) -> None:
    inputs = vector["inputs"]
    fields = inputs["message"]
    opened = open_vector(vector)
    assert opened.message == media_pb2.SealedFile(
        file_name=fields["file_name"], content=content(fields["content_length"]), media_type=fields["media_type"]
    )
    assert hashlib.sha256(opened.payload).hexdigest() == inputs["message_bytes_sha256"]
    if "message_bytes" in inputs:
        assert opened.payload.hex() == inputs["message_bytes"]
    header = opened.header
    assert header.message_id.hex() == inputs["random"]["message_id"]
    assert header.message_type == inputs["message_type"]
    assert (header.sender, header.recipient) == (inputs["sender"], inputs["recipient"])
    assert header.sender_key_id.hex() == inputs["sender_key_id"]
    assert header.recipient_key_id.hex() == inputs["recipient_key_id"]
    assert header.created_at_ms == inputs["created_at_ms"]
    assert header.expires_at_ms == inputs["created_at_ms"] + inputs["ttl_ms"]
    assert header.correlation_id.hex() == inputs["correlation_id"]
    assert opened.raw.hex() == vector["envelope"]


@pytest.mark.parametrize("vector", vectors("negative"))
def test_negative_vector_is_refused_for_its_reason(vector: Json) -> None:
    expected = getattr(errors, vector["error"])
    assert expected in errors.ENVELOPE_ERRORS
    assert expected.code == vector["code"]
    with pytest.raises(errors.EnvelopeError) as caught:
        open_vector(vector)
    # A subclass may refine a reason without changing its code (UnknownRecipientKey: a wrong recipient that a trust
    # synchronisation may cure, docs/exchange.md "Refresh keys").
    assert isinstance(caught.value, expected), f"refused as {caught.value.code}: {caught.value}"
    assert caught.value.code == vector["code"]
    assert caught.value.public_message == "invalid envelope"


# --- the specification alone gives the same bytes ----------------------------------------------------------------
# Everything below uses cryptography, PyNaCl and hashlib directly and encodes protobuf by hand, following
# docs/envelope.md; nothing from keys/ is used.


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _len_field(number: int, value: bytes) -> bytes:
    """Wire type 2; omitted when empty (proto3 default)."""
    return _varint(number << 3 | 2) + _varint(len(value)) + value if value else b""


def _int_field(number: int, value: int) -> bytes:
    """Wire type 0 (non-negative values only); omitted when zero (proto3 default)."""
    return _varint(number << 3) + _varint(value) if value else b""


def _key_id(algorithm: int, public: bytes) -> bytes:
    return hashlib.sha256(b"hedui.v1.key-id\x00" + bytes([algorithm]) + public).digest()[:16]


@pytest.mark.parametrize("vector", vectors("positive"))
def test_positive_vector_follows_from_the_specification(vector: Json) -> None:
    inputs, mid = vector["inputs"], vector["intermediate"]
    random = {name: bytes.fromhex(value) for name, value in inputs["random"].items()}
    signer = ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(inputs["sender_signing_seed"]))
    sender_public = signer.public_key().public_bytes_raw()
    static = x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(inputs["recipient_agreement_seed"]))
    recipient_public = static.public_key().public_bytes_raw()
    assert sender_public.hex() == inputs["sender_signing_public"]
    assert recipient_public.hex() == inputs["recipient_agreement_public"]
    assert _key_id(1, sender_public).hex() == inputs["sender_key_id"]
    assert _key_id(2, recipient_public).hex() == inputs["recipient_key_id"]

    # Key schedule: ephemeral-static X25519, then HKDF-SHA256.
    ephemeral = x25519.X25519PrivateKey.from_private_bytes(random["ephemeral_seed"])
    ephemeral_public = ephemeral.public_key().public_bytes_raw()
    shared = ephemeral.exchange(x25519.X25519PublicKey.from_public_bytes(recipient_public))
    assert shared != bytes(32)
    info = b"hedui.v1.envelope-payload-key\x00" + (1).to_bytes(4, "big") + ephemeral_public + recipient_public
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"hedui.v1.envelope-hkdf-salt", info=info).derive(shared)
    assert ephemeral_public.hex() == mid["ephemeral_public"]
    assert shared.hex() == mid["shared_secret"]
    assert info.hex() == mid["hkdf_info"]
    assert key.hex() == mid["payload_key"]

    # Header, byte by byte.
    created, expires = inputs["created_at_ms"], inputs["created_at_ms"] + inputs["ttl_ms"]
    header = b"".join(
        [
            _int_field(1, 1),  # version
            _int_field(2, 1),  # suite
            _len_field(3, random["message_id"]),
            _len_field(4, inputs["message_type"].encode()),
            _len_field(5, inputs["sender"].encode()),
            _len_field(6, inputs["recipient"].encode()),
            _len_field(7, _key_id(1, sender_public)),
            _len_field(8, _key_id(2, recipient_public)),
            _len_field(9, ephemeral_public),
            _len_field(10, random["nonce"]),
            _int_field(11, created),
            _int_field(12, expires),
            _len_field(13, bytes.fromhex(inputs["correlation_id"])),
        ]
    )
    assert expires == mid["expires_at_ms"]
    assert header.hex() == mid["header"]

    # Inner payload: SealedFile {1 file_name, 2 content, 3 media_type} inside InnerPayload {1 type_url, 2 value}.
    fields = inputs["message"]
    message = (
        _len_field(1, fields["file_name"].encode())
        + _len_field(2, content(fields["content_length"]))
        + _len_field(3, fields["media_type"].encode())
    )
    inner = _len_field(1, ("type.googleapis.com/" + inputs["message_type"]).encode()) + _len_field(2, message)
    assert hashlib.sha256(message).hexdigest() == inputs["message_bytes_sha256"]
    assert hashlib.sha256(inner).hexdigest() == mid["inner_payload_sha256"]
    if "inner_payload" in mid:
        assert inner.hex() == mid["inner_payload"]

    # Encryption, signature, envelope.
    ciphertext = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(inner, header, random["nonce"], key)
    signed = (
        b"hedui.v1.envelope-signature\x00"
        + len(header).to_bytes(4, "big")
        + header
        + hashlib.sha256(ciphertext).digest()
    )
    signature = signer.sign(signed)
    envelope = _len_field(1, header) + _len_field(2, ciphertext) + _len_field(3, signature)
    assert len(ciphertext) == len(inner) + 16 == mid["ciphertext_length"]
    assert hashlib.sha256(ciphertext).hexdigest() == mid["ciphertext_sha256"]
    assert signed.hex() == mid["signature_input"]
    assert signature.hex() == mid["signature"]
    assert envelope.hex() == vector["envelope"]

    # And the receiver's side: verify first, then the static key reaches the same shared secret and plaintext.
    ed25519.Ed25519PublicKey.from_public_bytes(sender_public).verify(signature, signed)
    assert static.exchange(x25519.X25519PublicKey.from_public_bytes(ephemeral_public)) == shared
    plain = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, header, random["nonce"], key)
    assert plain == inner


def test_worked_example_in_the_specification_is_a_vector_header() -> None:
    """The annotated header dump in docs/envelope.md is the header of the vector it names, byte for byte."""
    text = SPEC_FILE.read_text(encoding="utf-8")
    match = re.search(r"<!-- header-example: ([a-z0-9-]+) -->\s*```text\n(.*?)```", text, re.DOTALL)
    assert match, "docs/envelope.md lost its annotated header example"
    name, block = match.group(1), match.group(2)
    dumped = "".join(line.split("  ")[0].replace(" ", "") for line in block.splitlines() if line.strip())
    vector = next(v for v in load_vectors()["positive"] if v["name"] == name)
    assert dumped == vector["intermediate"]["header"]


# --- formats_v1.json: fingerprints, armour, parser strictness, the payload limit, sealed files ---------------------

FORMATS_FILE = ROOT / "tests" / "vectors" / "formats_v1.json"


@functools.cache
def load_formats() -> Json:
    """The committed vector document of the formats around the envelope."""
    document: Json = json.loads(FORMATS_FILE.read_text(encoding="utf-8"))
    return document


def formats(kind: str) -> list[Any]:
    return [pytest.param(vector, id=vector["name"]) for vector in load_formats()[kind]]


def test_committed_format_vectors_are_what_the_generator_builds() -> None:
    expected = vectorgen_formats.render(vectorgen_formats.build_vectors()).encode()
    assert FORMATS_FILE.read_bytes() == expected, (
        "tests/vectors/formats_v1.json is not what tests/vectorgen_formats.py builds: regenerate with "
        "`python scripts/make_vectors.py` if the change is on purpose"
    )
    names = [v["name"] for kind in load_formats().values() if isinstance(kind, list) for v in kind if "name" in v]
    assert len(names) == len(set(names))


def _digits(domain: bytes, data: bytes) -> str:
    """docs/keys.md: SHA-512, bytes 5i..5i+4 big-endian mod 100000 for i = 0..7, eight groups of five digits."""
    digest = hashlib.sha512(domain + b"\x00" + data).digest()
    return " ".join(f"{int.from_bytes(digest[5 * i : 5 * i + 5], 'big') % 100000:05d}" for i in range(8))


@pytest.mark.parametrize("vector", formats("bundles"))
def test_bundle_fingerprint_vector(vector: Json) -> None:
    """The reference reader gives the fingerprint, and so does the formula of docs/keys.md with hashlib alone."""
    bundle = read_bundle(bytes.fromhex(vector["signed_bundle"]))
    assert bundle.fingerprint == vector["fingerprint"]
    assert bundle.party_id == vector["party_id"] and bundle.signer_key_id.hex() == vector["signer_key_id"]
    assert [k.key_id.hex() for k in bundle.keys] == [k["key_id"] for k in vector["keys"]]
    algorithm_byte = {"ED25519": 1, "X25519": 2}
    keys = {}
    for key in vector["keys"]:
        raw = bytes.fromhex(key["public"])
        assert _key_id(algorithm_byte[key["algorithm"]], raw).hex() == key["key_id"]
        assert (
            _digits(b"hedui.v1.key-fingerprint", bytes([algorithm_byte[key["algorithm"]]]) + raw)
            == (key["key_fingerprint"])
        )
        keys[key["key_id"]] = bytes([algorithm_byte[key["algorithm"]]]) + raw
    assert vector["key_id_order"] == sorted(keys)
    party = vector["party_id"].encode()
    body = len(party).to_bytes(2, "big") + party + b"".join(keys[kid] for kid in vector["key_id_order"])
    assert _digits(b"hedui.v1.bundle-fingerprint", body) == vector["fingerprint"]


@pytest.mark.parametrize("vector", formats("fingerprint_typed"))
def test_typed_fingerprint_vector(vector: Json) -> None:
    bundle_doc = next(b for b in load_formats()["bundles"] if b["name"] == vector["bundle"])
    bundle = read_bundle(bytes.fromhex(bundle_doc["signed_bundle"]))
    if vector["accepted"]:
        bundle.require_fingerprint(vector["typed"])
    else:
        with pytest.raises(getattr(errors, vector["error"])):
            bundle.require_fingerprint(vector["typed"])


@pytest.mark.parametrize("vector", formats("armor"))
def test_armor_vector(vector: Json) -> None:
    data = bytes.fromhex(vector["data"])
    assert dearmor(vector["text"], vector["label"]) == data
    if vector["name"] != "armor-in-a-letter":
        assert armor(data, vector["label"]) == vector["text"]


@pytest.mark.parametrize("vector", formats("armor_negative"))
def test_armor_negative_vector(vector: Json) -> None:
    with pytest.raises(getattr(errors, vector["error"])):
        dearmor(vector["text"], vector["label"])


@pytest.mark.parametrize("vector", formats("envelope_negative"))
def test_envelope_negative_format_vector(vector: Json) -> None:
    test_negative_vector_is_refused_for_its_reason(vector)


@pytest.mark.parametrize("vector", formats("envelope_negative_large"))
def test_envelope_over_the_payload_limit_is_refused_at_step_2c(vector: Json) -> None:
    build = vector["construction"]
    data = (
        bytes.fromhex(build["prefix"])
        + bytes.fromhex(build["fill_byte"]) * build["fill_length"]
        + bytes.fromhex(build["suffix"])
    )
    assert len(data) == build["envelope_length"] <= MAX_ENVELOPE_BYTES
    test_negative_vector_is_refused_for_its_reason({**vector, "envelope": data.hex()})


@pytest.mark.parametrize("vector", formats("sealed_file_negative"))
def test_sealed_file_negative_vector(vector: Json) -> None:
    context = vector["receiver"]
    me, trust = build_receiver(context)
    courier = Courier(me, trust, replay=MemoryReplayCache(), clock=FixedClock(context["now_ms"]))
    with pytest.raises(errors.KeysError) as caught:
        open_sealed_file(courier, bytes.fromhex(vector["envelope"]))
    assert type(caught.value).__name__ == vector["error"] and caught.value.code == vector["code"]


# --- signed procedure steps (docs/agency-api.md, "Signed procedure steps") -----------------------------------------

STEPS_FILE = ROOT / "tests" / "vectors" / "steps_v1.json"
#: ProcedureStep's fields in field-number order: (number, name, kind) as docs/agency-api.md lists them.
_STEP_FIELDS = (
    (1, "agency", "text"),
    (2, "commission_id", "text"),
    (3, "step", "enum"),
    (4, "passed", "bool"),
    (5, "reason", "text"),
    (6, "staff_id", "text"),
    (7, "exchange_digest", "bytes"),
    (8, "partial", "bool"),
)
_STEP_KIND_NUMBERS = {"STEP_KIND_INTAKE": 1, "STEP_KIND_REVIEW": 2, "STEP_KIND_REPORT": 3}


@functools.cache
def load_steps() -> Json:
    """The committed vector document of signed procedure steps."""
    document: Json = json.loads(STEPS_FILE.read_text(encoding="utf-8"))
    return document


def steps(kind: str) -> list[Any]:
    return [pytest.param(vector, id=vector["name"]) for vector in load_steps()[kind]]


def _steps_key(staff_id: str) -> Json:
    key: Json = next(k for k in load_steps()["keys"] if k["staff_id"] == staff_id)
    return key


def _spec_step_bytes(fields: Json) -> bytes:
    """The canonical encoding as the specification describes it, without protobuf: fields in number order, each
    left out at its default (empty, false, 0), a text or byte string as key, length, bytes, the rest as varints
    (``_varint`` is the hand-written encoder of the envelope checks above)."""
    out = b""
    for number, name, kind in _STEP_FIELDS:
        value = fields[name]
        if kind == "text" and value:
            data = value.encode("utf-8")
            out += _varint(number << 3 | 2) + _varint(len(data)) + data
        elif kind == "bytes" and value:
            data = bytes.fromhex(value)
            out += _varint(number << 3 | 2) + _varint(len(data)) + data
        elif kind == "enum" and _STEP_KIND_NUMBERS[value]:
            out += _varint(number << 3) + _varint(_STEP_KIND_NUMBERS[value])
        elif kind == "bool" and value:
            out += _varint(number << 3) + b"\x01"
    return out


def test_committed_step_vectors_are_what_the_generator_builds() -> None:
    expected = vectorgen_steps.render(vectorgen_steps.build_vectors()).encode()
    assert STEPS_FILE.read_bytes() == expected, (
        "tests/vectors/steps_v1.json is not what tests/vectorgen_steps.py builds: regenerate with "
        "`python scripts/make_vectors.py` if the change is on purpose"
    )
    names = [v["name"] for kind in ("steps", "steps_negative") for v in load_steps()[kind]]
    assert len(names) == len(set(names))
    assert bytes.fromhex(load_steps()["constants"]["step_domain"]) == steps_module.STEP_DOMAIN


@pytest.mark.parametrize("vector", steps("steps"))
def test_step_vector_follows_from_the_specification(vector: Json) -> None:
    """The bytes, the signed message and the signature follow from the text with hashlib, a hand-written encoder and
    an Ed25519 library alone; the reference implementation builds and accepts the same."""
    key = _steps_key(vector["signer"])
    seed = hashlib.shake_256(b"hedui.v1.test-vector-key\x00" + f"steps/{key['staff_id']}".encode()).digest(32)
    assert seed.hex() == key["seed"]
    private = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    public = private.public_key().public_bytes_raw()
    assert public.hex() == key["public"]
    data = _spec_step_bytes(vector["fields"])
    assert data.hex() == vector["step"]
    message = b"hedui.v1.procedure-step\x00" + data
    assert message.hex() == vector["message"]
    assert private.sign(message).hex() == vector["signature"]  # Ed25519 is deterministic (RFC 8032)
    ed25519.Ed25519PublicKey.from_public_bytes(public).verify(bytes.fromhex(vector["signature"]), message)
    assert hashlib.sha256(data).hexdigest() == vector["step_sha256"]
    # The reference implementation: the same bytes from the fields, and the signature verifies.
    fields = vector["fields"]
    step = steps_module.build_step(
        agency=fields["agency"], commission_id=fields["commission_id"],
        kind=agency_pb2.StepKind.Value(fields["step"]), staff_id=fields["staff_id"],
        exchange_digest=bytes.fromhex(fields["exchange_digest"]), passed=fields["passed"], reason=fields["reason"],
        partial=fields["partial"],
    )  # fmt: skip
    assert steps_module.step_bytes(step) == data
    assert steps_module.read_step(data) == step
    public_key = PublicKey(Algorithm.ED25519, public)
    assert public_key.key_id.hex() == key["key_id"] and public_key.fingerprint == key["fingerprint"]
    assert steps_module.verify_step(step, bytes.fromhex(vector["signature"]), public_key)


@pytest.mark.parametrize("vector", steps("steps_negative"))
def test_step_negative_vector_is_refused_for_its_reason(vector: Json) -> None:
    data, signature = bytes.fromhex(vector["step"]), bytes.fromhex(vector["signature"])
    public_key = PublicKey(Algorithm.ED25519, bytes.fromhex(_steps_key(vector["signer"])["public"]))
    if vector["error"] == "not_canonical":
        with pytest.raises(_canonical.NotCanonical):
            _canonical.parse_canonical(agency_pb2.ProcedureStep, data)
    elif vector["error"] == "not_a_step":
        parsed = _canonical.parse_canonical(agency_pb2.ProcedureStep, data)
        with pytest.raises(ValueError, match=r"must|report step|only a report|carries"):
            steps_module.check_step(parsed)
    else:
        assert vector["error"] == "bad_signature"
        assert not steps_module.verify_step(steps_module.read_step(data), signature, public_key)
    if vector["error"] != "bad_signature":
        with pytest.raises(errors.TrustError):
            steps_module.read_step(data)
        # The signature itself is good over these bytes: what refuses them is the canonical form and the rules.
        assert public_key.verify(signature, steps_module.STEP_DOMAIN + data)


def test_worked_example_of_signed_steps_in_the_specification_is_a_vector() -> None:
    """docs/agency-api.md writes out intake-passed: its key, step bytes, signature and chain digest are the file's."""
    text = (ROOT / "docs" / "agency-api.md").read_text(encoding="utf-8")
    section = text.split("## Signed procedure steps", 1)[1].split("\n## ", 1)[0]
    hex_runs = "".join(re.findall(r"^    ([0-9a-f ]+)$", section, flags=re.MULTILINE)).replace(" ", "")
    vector = next(v for v in load_steps()["steps"] if v["name"] == "intake-passed")
    assert hex_runs == vector["step"] + vector["signature"]
    assert _steps_key("S-0001")["seed"] in section and _steps_key("S-0001")["public"] in section
    assert f"step={vector['step_sha256']}" in section
    assert f"is the {len(bytes.fromhex(vector['step']))} bytes" in section


# --- rosters_v1.json: signed staff rosters (docs/exchange.md, "Rosters (Procedure V.(三))") ----------------------

ROSTERS_FILE = ROOT / "tests" / "vectors" / "rosters_v1.json"


@functools.cache
def load_rosters() -> Json:
    """The committed roster vector document."""
    document: Json = json.loads(ROSTERS_FILE.read_text(encoding="utf-8"))
    return document


def rosters(kind: str) -> list[Any]:
    return [pytest.param(vector, id=vector.get("name", f"{kind}-{i}")) for i, vector in enumerate(load_rosters()[kind])]


def test_committed_roster_vectors_are_what_the_generator_builds() -> None:
    expected = vectorgen_rosters.render(vectorgen_rosters.build_vectors()).encode()
    assert ROSTERS_FILE.read_bytes() == expected, (
        "tests/vectors/rosters_v1.json is not what tests/vectorgen_rosters.py builds: regenerate with "
        "`python scripts/make_vectors.py` if the change is on purpose"
    )


def _roster_bytes(fields: Json) -> bytes:
    """docs/exchange.md, "Rosters": the canonical Roster from its fields with the protobuf wire rules alone."""
    members = b""
    for m in fields["members"]:
        member = _len_field(1, m["staff_id"].encode()) + _len_field(2, m["name"].encode())
        member += b"".join(_len_field(3, role.encode()) for role in m["roles"])
        member += _len_field(4, bytes.fromhex(m["public_key"])) + _int_field(5, m["valid_from_ms"])
        member += _int_field(6, m["valid_until_ms"]) + _int_field(7, m["revoked_at_ms"])
        members += _len_field(6, member)
    return (
        _len_field(1, fields["party_id"].encode())
        + _int_field(2, fields["version"])
        + _len_field(3, bytes.fromhex(fields["previous_digest"]))
        + _int_field(4, fields["issued_at_ms"])
        + _int_field(5, fields["effective_at_ms"])
        + members
        + _len_field(7, fields["admin_staff_id"].encode())
    )


@pytest.mark.parametrize("vector", rosters("versions"))
def test_roster_version_follows_from_the_specification(vector: Json) -> None:
    """Bytes, digest, chain and both signatures, checked with hashlib, the wire rules and pyca's Ed25519."""
    document = load_rosters()
    domains = document["constants"]
    roster = bytes.fromhex(vector["roster_bytes"])
    assert _roster_bytes(vector["roster"]) == roster
    assert hashlib.sha256(roster).hexdigest() == vector["roster_sha256"]
    party = document["party"]
    assert _key_id(1, bytes.fromhex(party["public"])).hex() == party["key_id"] == vector["signer_key_id"]
    ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(party["public"])).verify(
        bytes.fromhex(vector["party_signature"]), bytes.fromhex(domains["roster_domain"]) + roster
    )
    admin = next(s for s in document["staff"] if s["staff_id"] == vector["roster"]["admin_staff_id"])
    ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(admin["public"])).verify(
        bytes.fromhex(vector["admin_signature"]), bytes.fromhex(domains["roster_admin_domain"]) + roster
    )
    signed = (
        _len_field(1, roster)
        + _len_field(2, bytes.fromhex(vector["signer_key_id"]))
        + _len_field(3, bytes.fromhex(vector["party_signature"]))
        + _len_field(4, bytes.fromhex(vector["admin_signature"]))
    )
    assert signed.hex() == vector["signed_roster"]
    assert hashlib.sha256(signed).hexdigest() == vector["item_sha256"]
    version = vector["roster"]["version"]
    if version > 1:
        previous = document["versions"][version - 2]
        assert vector["roster"]["previous_digest"] == previous["roster_sha256"]
    for member in vector["roster"]["members"]:
        seed = next(s["seed"] for s in document["staff"] if s["staff_id"] == member["staff_id"])
        public = ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed)).public_key()
        assert public.public_bytes_raw().hex() == member["public_key"]


def _roster_receiver(held: list[str]) -> RosterHistory:
    document = load_rosters()
    party = document["party"]
    history = RosterHistory(party["party_id"])
    for name in held:
        version = next(v for v in document["versions"] if v["name"] == name)
        assert history.accept(
            bytes.fromhex(version["signed_roster"]),
            keyring=_roster_keyring(),
            now_ms=version["roster"]["issued_at_ms"],
            notice=Notice(WorkdayCalendar(), document["constants"]["notice_working_days"]),
        )
    return history


def _roster_keyring() -> Keyring:
    party = load_rosters()["party"]
    public = PublicKey(Algorithm.ED25519, bytes.fromhex(party["public"]))
    return Keyring([KeyRecord(public, KeyState.ACTIVE, party["not_before_ms"])])


def test_roster_member_at_vectors() -> None:
    history = _roster_receiver(["v1", "v2", "v3"])
    for check in load_rosters()["member_at"]:
        member, reason = history.member_at(check["staff_id"], check["at_ms"])
        in_force = history.in_force(check["at_ms"])
        assert (member is not None, reason) == (check["active"], check["reason"]), check
        assert (in_force.version if in_force else 0) == check["version_in_force"]


@pytest.mark.parametrize("vector", rosters("refusals"))
def test_roster_refusal_vector(vector: Json) -> None:
    history = _roster_receiver(vector["held"])
    with pytest.raises(RosterError) as caught:
        history.accept(
            bytes.fromhex(vector["signed_roster"]),
            keyring=_roster_keyring(),
            now_ms=vector["now_ms"],
            notice=Notice(WorkdayCalendar(), vector["notice_working_days"]),
        )
    assert caught.value.code == vector["code"]
    assert [v.roster.version for v in history.versions] == [int(n[1:]) for n in vector["held"]]


def test_every_roster_refusal_reason_has_a_vector() -> None:
    covered = {v["code"] for v in load_rosters()["refusals"]}
    assert covered == set(ROSTER_REFUSALS) - {"roster_unknown_party"}  # no keys at all: nothing to put in a vector
