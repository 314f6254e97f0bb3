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
from hedui.v1 import media_pb2

from keys import errors
from keys.envelope import Opened, open_at
from keys.fingerprint import Algorithm
from keys.handles import PrivateKey, PublicKey, _load_private
from keys.identity import PartyKeys
from keys.keyring import KeyRecord, Keyring, KeyState
from keys.replay import MemoryReplayCache
from keys.truststore import TrustStore
from tests import vectorgen

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
    assert type(caught.value) is expected, f"refused as {caught.value.code}: {caught.value}"
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
