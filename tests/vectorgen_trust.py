"""Deterministic test vectors of the trust synchronisation (docs/exchange.md, "Trust synchronisation"): key
announcements as trust items with their SHA-256 identities and the verdicts a receiver reaches, a TrustSync message
in canonical bytes, and the SealedMessage that carries it sealed, with the announcements beside it.

:func:`build_vectors` returns the document that ``scripts/make_vectors.py`` writes to
``tests/vectors/trust_sync_v1.json``; ``tests/test_trust_vectors.py`` builds it again, compares the two byte for
byte and checks every verdict and the envelope against the reference implementation. Keys come from fixed seeds,
times are constants, and the sealer's random bytes come from tests/vectorgen.py's ``Draws`` of the label
``trust-sync``: nothing varies between runs.
"""

from __future__ import annotations

import hashlib
import json

from hedui.v1 import exchange_pb2, keys_pb2, trust_pb2

from keys import _canonical
from keys.announcements import sign_announcement
from keys.envelope import seal_with
from keys.errors import TrustError
from keys.handles import AgreementKey, SigningKey
from keys.keyring import KeyRecord, Keyring, KeyState
from keys.truststore import TrustStore
from tests import vectorgen as base
from tests.vectorgen import Draws, Json
from tests.vectorgen_formats import key_seed

FORMAT = "hedui-trust-sync-v1-test-vectors"
GATEWAY = "agency.220100"
UNIT = "unit.220100.tax"
NB = base.KEYS_NOT_BEFORE_MS
#: When the unit made its announcements (a minute before it sealed its reply), and when the gateway applies them.
ISSUED_AT_MS = base.CREATED_AT_MS - 60_000
NOW_MS = base.NOW_MS
OVERLAP_MS = 14 * 24 * 3600 * 1000
KIND = trust_pb2.TRUST_ITEM_KIND_KEY_ANNOUNCEMENT


def _signing(label: str) -> SigningKey:
    return base.signing_key(key_seed(label))


def _agreement(label: str) -> AgreementKey:
    return base.agreement_key(key_seed(label))


UNIT_SIGNING_1, UNIT_SIGNING_2 = _signing("trust/unit-signing-1"), _signing("trust/unit-signing-2")
UNIT_AGREEMENT_1, UNIT_AGREEMENT_2 = _agreement("trust/unit-agreement-1"), _agreement("trust/unit-agreement-2")
GATEWAY_SIGNING, GATEWAY_AGREEMENT = _signing("trust/gateway-signing"), _agreement("trust/gateway-agreement")


def _announcement(
    signer: SigningKey,
    kind: int,
    old_key_id: bytes,
    issued_at_ms: int,
    *,
    new_key: KeyRecord | None = None,
    proof: SigningKey | None = None,
    reason: str = "",
) -> bytes:
    message = keys_pb2.KeyAnnouncement(
        party_id=UNIT,
        kind=kind,  # type: ignore[arg-type]
        old_key_id=old_key_id,
        issued_at_ms=issued_at_ms,
        overlap_until_ms=issued_at_ms + OVERLAP_MS if new_key is not None else 0,
        reason=reason,
    )
    if new_key is not None:
        message.new_key.CopyFrom(new_key.to_proto())
    return sign_announcement(message, signer, proof)


def announcements() -> list[tuple[str, str, bytes, str | None]]:
    """(name, description, SignedKeyAnnouncement bytes, expected reason or None for applied), in delivery order."""
    rotation = keys_pb2.ANNOUNCEMENT_KIND_ROTATION
    revocation = keys_pb2.ANNOUNCEMENT_KIND_REVOCATION
    return [
        (
            "agreement-rotation",
            "The unit rotates its key-agreement key, signed by its signing key 1; the new key takes over at once.",
            _announcement(
                UNIT_SIGNING_1,
                rotation,
                UNIT_AGREEMENT_1.key_id,
                ISSUED_AT_MS,
                new_key=KeyRecord(UNIT_AGREEMENT_2.public, KeyState.ACTIVE, ISSUED_AT_MS),
            ),
            None,
        ),
        (
            "signing-rotation",
            "The unit rotates its signing key 1 to 2, signed by key 1 and by key 2 (proof of possession).",
            _announcement(
                UNIT_SIGNING_1,
                rotation,
                UNIT_SIGNING_1.key_id,
                ISSUED_AT_MS + 1,
                new_key=KeyRecord(UNIT_SIGNING_2.public, KeyState.ACTIVE, ISSUED_AT_MS + 1),
                proof=UNIT_SIGNING_2,
            ),
            None,
        ),
        (
            "revocation-of-key-1",
            "The unit revokes its signing key 1 (compromised), signed by key 2.",
            _announcement(UNIT_SIGNING_2, revocation, UNIT_SIGNING_1.key_id, ISSUED_AT_MS + 2, reason="compromised"),
            None,
        ),
        (
            "forged-revocation-of-key-2",
            "Whoever stole key 1 revokes key 2 with it: refused, key 1 is revoked (reason signer_not_current).",
            _announcement(UNIT_SIGNING_1, revocation, UNIT_SIGNING_2.key_id, ISSUED_AT_MS + 3, reason="superseded"),
            "signer_not_current",
        ),
        (
            "announcement-again",
            "The agreement rotation offered a second time: held already, so applied again (idempotent).",
            _announcement(
                UNIT_SIGNING_1,
                rotation,
                UNIT_AGREEMENT_1.key_id,
                ISSUED_AT_MS,
                new_key=KeyRecord(UNIT_AGREEMENT_2.public, KeyState.ACTIVE, ISSUED_AT_MS),
            ),
            None,
        ),
    ]


def receiver_trust() -> TrustStore:
    """The gateway's trust store before the vectors: the unit's signing key 1 and agreement key 1, active."""
    trust = TrustStore()
    trust.set_keyring(
        UNIT,
        Keyring(KeyRecord(k.public, KeyState.ACTIVE, NB) for k in (UNIT_SIGNING_1, UNIT_AGREEMENT_1)),
    )
    return trust


def verdict(trust: TrustStore, payload: bytes, now_ms: int) -> str | None:
    """What a receiver's key-announcement handler decides: None (applied) or the refusal's reason code."""
    try:
        trust.apply_announcement(payload, now_ms=now_ms)
    except TrustError as refused:
        return refused.reason
    return None


def trust_sync() -> trust_pb2.TrustSync:
    """The unit's reply: its items (the announcements above) and its verdicts on two items of the gateway."""
    items = [trust_pb2.TrustItem(kind=KIND, payload=payload) for _, _, payload, _ in announcements()]
    return trust_pb2.TrustSync(
        items=items,
        acks=[
            trust_pb2.TrustItemAck(
                kind=KIND, item_sha256=hashlib.sha256(b"gateway item 1").digest(), applied=True, at_ms=NOW_MS
            ),
            trust_pb2.TrustItemAck(
                kind=trust_pb2.TRUST_ITEM_KIND_ROSTER,
                item_sha256=hashlib.sha256(b"gateway item 2").digest(),
                applied=False,
                reason="roster_rollback",
                at_ms=NOW_MS,
            ),
        ],
        peer_roster_version=3,
    )


def sealed_message() -> tuple[bytes, bytes]:
    """(envelope, SealedMessage bytes): the TrustSync sealed by the unit with signing key 2 for the gateway's
    agreement key, answering request message id base.CORRELATION_ID, with the first three announcements beside it."""
    envelope = seal_with(
        trust_sync(),
        sender=UNIT,
        signing_key=UNIT_SIGNING_2,
        recipient=GATEWAY,
        recipient_key=KeyRecord(GATEWAY_AGREEMENT.public, KeyState.ACTIVE, NB),
        created_at_ms=base.CREATED_AT_MS,
        ttl_ms=base.TTL_MS,
        correlation_id=base.CORRELATION_ID,
        rng=Draws.for_label("trust-sync").rng(),
    )
    beside = [payload for _, _, payload, _ in announcements()[:3]]
    return envelope, _canonical.encode(exchange_pb2.SealedMessage(envelope=envelope, key_announcements=beside))


def _key(name: str, key: SigningKey | AgreementKey, *, private: bool) -> Json:
    entry: Json = {"name": name, "algorithm": key.algorithm.name, "public": key.public.raw.hex()}
    entry["key_id"] = key.key_id.hex()
    if private:
        entry["seed"] = key.expose_secret_for_export().hex()
    return entry


def build_vectors() -> Json:
    """The whole vector document, as written to tests/vectors/trust_sync_v1.json."""
    trust = receiver_trust()
    items = []
    for name, description, payload, expected in announcements():
        got = verdict(trust, payload, NOW_MS)
        assert got == expected, (name, got)
        items.append(
            {
                "name": name,
                "description": description,
                "kind": KIND,
                "payload": payload.hex(),
                "item_sha256": hashlib.sha256(payload).hexdigest(),
                "applied": expected is None,
                "reason": expected or "",
            }
        )
    message = _canonical.encode(trust_sync())
    envelope, sealed = sealed_message()
    return {
        "format": FORMAT,
        "specification": "docs/exchange.md (Trust synchronisation), docs/keys.md (Lifecycle), docs/envelope.md",
        "regenerate": "python scripts/make_vectors.py",
        "conventions": [
            "Byte strings are lower-case hex; times are milliseconds since the epoch (UTC).",
            "Items: apply each payload, in order, to the receiver's trust store at now_ms, as a key announcement of "
            "the party unit.220100.tax; each must give the verdict shown (applied, or refused with the reason code). "
            "item_sha256 is SHA-256 of the payload, the item's identity in acknowledgements.",
            "trust_sync: the TrustSync message (canonical protobuf) carrying those items and two acknowledgements.",
            "sealed_message: that TrustSync sealed by the unit (signing key 2) for the gateway (its agreement key) "
            "with the random bytes of label 'trust-sync' (tests/vectors/envelope_v1.json conventions), wrapped in a "
            "SealedMessage with the first three announcements beside it. Apply those announcements first, then open "
            "the envelope: key 2 is known only through them.",
        ],
        "now_ms": NOW_MS,
        "receiver": {
            "party_id": GATEWAY,
            "trusted_keys": [
                dict(
                    _key("unit-signing-1", UNIT_SIGNING_1, private=False),
                    party_id=UNIT,
                    state="ACTIVE",
                    not_before_ms=NB,
                ),
                dict(
                    _key("unit-agreement-1", UNIT_AGREEMENT_1, private=False),
                    party_id=UNIT,
                    state="ACTIVE",
                    not_before_ms=NB,
                ),
            ],
            "own_keys": [_key("gateway-agreement", GATEWAY_AGREEMENT, private=True)],
        },
        "sender_keys": [
            _key("unit-signing-1", UNIT_SIGNING_1, private=True),
            _key("unit-signing-2", UNIT_SIGNING_2, private=True),
            _key("unit-agreement-2", UNIT_AGREEMENT_2, private=False),
        ],
        "items": items,
        "trust_sync": {"message": message.hex(), "sha256": hashlib.sha256(message).hexdigest()},
        "sealed_message": {
            "draws": Draws.for_label("trust-sync").to_json(),
            "created_at_ms": base.CREATED_AT_MS,
            "ttl_ms": base.TTL_MS,
            "correlation_id": base.CORRELATION_ID.hex(),
            "envelope": envelope.hex(),
            "bytes": sealed.hex(),
        },
    }


def render(vectors: Json) -> str:
    """The exact text of the vector file."""
    return json.dumps(vectors, indent=2, ensure_ascii=False) + "\n"
