"""tests/vectors/trust_sync_v1.json: up to date with its generator (tests/vectorgen_trust.py), and right — read from
the file alone, as another implementation would, every item gives its verdict and the sealed message opens to the
TrustSync shown once the announcements beside it are applied."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from hedui.v1 import exchange_pb2, trust_pb2

from keys import _canonical
from keys.envelope import open_at
from keys.fingerprint import Algorithm
from keys.handles import PublicKey, _load_private
from keys.identity import PartyKeys
from keys.keyring import KeyRecord, Keyring, KeyState
from keys.replay import MemoryReplayCache
from keys.truststore import TrustStore
from keys.trustsync import check_sync
from tests import vectorgen_trust

FILE = Path(__file__).parent / "vectors" / "trust_sync_v1.json"


@pytest.fixture(scope="module")
def vectors() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(FILE.read_text(encoding="utf-8"))
    return loaded


def _receiver_trust(vectors: dict[str, Any]) -> TrustStore:
    trust = TrustStore()
    for key in vectors["receiver"]["trusted_keys"]:
        record = KeyRecord(
            PublicKey(Algorithm[key["algorithm"]], bytes.fromhex(key["public"])),
            KeyState[key["state"]],
            key["not_before_ms"],
        )
        held = trust.keyring(key["party_id"])
        trust.set_keyring(key["party_id"], Keyring([*(held or ()), record]))
    return trust


def test_the_vector_file_is_what_the_generator_writes() -> None:
    assert FILE.read_text(encoding="utf-8") == vectorgen_trust.render(vectorgen_trust.build_vectors())


def test_every_item_gives_its_verdict_in_order(vectors: dict[str, Any]) -> None:
    trust = _receiver_trust(vectors)
    for item in vectors["items"]:
        payload = bytes.fromhex(item["payload"])
        assert hashlib.sha256(payload).hexdigest() == item["item_sha256"]
        got = vectorgen_trust.verdict(trust, payload, vectors["now_ms"])
        assert (got is None, got or "") == (item["applied"], item["reason"]), item["name"]


def test_the_sealed_message_opens_after_its_announcements(vectors: dict[str, Any]) -> None:
    sealed = exchange_pb2.SealedMessage.FromString(bytes.fromhex(vectors["sealed_message"]["bytes"]))
    assert _canonical.encode(sealed) == bytes.fromhex(vectors["sealed_message"]["bytes"])
    own = vectors["receiver"]["own_keys"][0]
    agreement = _load_private(Algorithm.X25519, bytes.fromhex(own["seed"]))
    me = PartyKeys(
        vectors["receiver"]["party_id"],
        Keyring([KeyRecord(agreement.public, KeyState.ACTIVE, 0)]),
        {agreement.key_id: agreement},
    )
    now = vectors["sealed_message"]["created_at_ms"] + 60_000
    trust = _receiver_trust(vectors)
    with pytest.raises(Exception, match="not in the trust store"):  # signed by key 2, unknown before its rotation
        open_at(sealed.envelope, me=me, trust=trust, replay=MemoryReplayCache(), now_ms=now)
    for announcement in sealed.key_announcements:
        trust.apply_announcement(bytes(announcement), now_ms=now)
    opened = open_at(
        sealed.envelope, me=me, trust=trust, replay=MemoryReplayCache(), now_ms=now,
        expect={"hedui.v1.TrustSync": trust_pb2.TrustSync},
    )  # fmt: skip
    assert opened.payload == bytes.fromhex(vectors["trust_sync"]["message"])
    assert opened.header.correlation_id.hex() == vectors["sealed_message"]["correlation_id"]
    message = opened.message
    assert isinstance(message, trust_pb2.TrustSync)
    check_sync(message)
    assert [hashlib.sha256(i.payload).hexdigest() for i in message.items] == [
        i["item_sha256"] for i in vectors["items"]
    ]
