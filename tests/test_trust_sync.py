"""Trust items and SyncTrust between a real gateway side and a real connector on loopback (issue 11, "keys over the
wire"): items published, delivered, applied and acknowledged both ways with signed receipts archived; announcements
beside the envelopes; "refresh keys" when the two sides' keys disagree; announcements signed by a revoked key
refused and changing nothing."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hedui.v1 import exchange_pb2, keys_pb2, trust_pb2
from sqlalchemy import select

from common.trustitems import Ack
from gateway.archive.verify import verify_archive
from gateway.db import schema
from keys import keystore
from keys.announcements import sign_announcement
from keys.cli import main
from keys.clock import DAY_MS, MINUTE_MS
from keys.envelope import seal_with
from keys.errors import RevokedKey, TrustError
from keys.fingerprint import Algorithm
from keys.handles import AgreementKey, SigningKey
from keys.keyring import KeyRecord, KeyState
from keys.live import LiveKeystore
from keys.trustsync import MAX_ITEMS, TrustSyncError, apply_attachments, apply_items, check_sync
from tests.exchange_world import GATEWAY, beijing_ms
from tests.trust_world import PASSPHRASE, UNIT, TrustWorld, trust_world

NOW = beijing_ms(2026, 3, 2)
KEY_ANNOUNCEMENT = trust_pb2.TRUST_ITEM_KIND_KEY_ANNOUNCEMENT


@pytest.fixture
def world(tmp_path: Path) -> Iterator[TrustWorld]:
    with trust_world(tmp_path, now_ms=NOW) as built:
        yield built


def _rotate(keys: LiveKeystore, algorithm: Algorithm, *, now_ms: int, activate_in_ms: int = 0) -> bytes:
    """Rotate through the live keystore (saved, then adopted), as the key job does; returns the announcement."""
    made: list[bytes] = []
    keys.change(
        lambda party, _: made.append(
            party.rotate(algorithm, now_ms=now_ms, overlap_ms=7 * DAY_MS, activate_at_ms=now_ms + activate_in_ms)
        )
    )
    return made[0]


def _saved(path: Path) -> tuple[object, object]:
    return keystore.load(path, PASSPHRASE)


def test_trust_items_are_published_once_offered_until_acknowledged_and_counted(world: TrustWorld) -> None:
    items = world.gateway_items
    with world.store.engine.begin() as conn:
        assert items.publish(conn, KEY_ANNOUNCEMENT, b"one", NOW, [UNIT, "unit.220100.land"])
        assert not items.publish(conn, KEY_ANNOUNCEMENT, b"one", NOW + 5, [UNIT])  # same payload: not new
        assert items.publish(conn, trust_pb2.TRUST_ITEM_KIND_ROSTER, b"two", NOW + 10, [UNIT])
    assert [p.payload for p in items.pending(UNIT)] == [b"one", b"two"]  # oldest first
    assert sorted(items.unacknowledged(NOW + 1000)) == [
        ("unit.220100.land", KEY_ANNOUNCEMENT, 1000),
        (UNIT, trust_pb2.TRUST_ITEM_KIND_ROSTER, 990),
        (UNIT, KEY_ANNOUNCEMENT, 1000),
    ]
    one = hashlib.sha256(b"one").digest()
    # An ack from a peer the item was not for, or naming another kind, changes nothing.
    assert items.acked("unit.220100.bank", [Ack(KEY_ANNOUNCEMENT, one, True, "")], NOW) == 0
    assert items.acked(UNIT, [Ack(trust_pb2.TRUST_ITEM_KIND_ROSTER, one, True, "")], NOW) == 0
    assert items.acked(UNIT, [Ack(KEY_ANNOUNCEMENT, one, False, "unknown_key")], NOW) == 1
    assert items.acked(UNIT, [Ack(KEY_ANNOUNCEMENT, one, True, "")], NOW) == 0  # acknowledged before
    assert [p.payload for p in items.pending(UNIT)] == [b"two"]
    # One ack by the item's digest (as a command line acknowledges by hand).
    two = hashlib.sha256(b"two").digest()
    assert items.acked(UNIT, two, applied=True, reason=None, at_ms=NOW)
    assert not items.acked(UNIT, two, applied=True, reason=None, at_ms=NOW)
    assert items.pending(UNIT) == []
    (refused,) = [d for d in items.deliveries() if d.peer == UNIT and d.sha256 == one]
    assert (refused.applied, refused.reason) == (False, "unknown_key")


def test_a_gateway_rotation_reaches_the_unit_is_acknowledged_and_archived(world: TrustWorld) -> None:
    announcement = _rotate(world.gateway_keys, Algorithm.ED25519, now_ms=NOW, activate_in_ms=DAY_MS)
    assert [p.payload for p in world.gateway_items.pending(UNIT)] == [announcement]  # published when saved
    (report,) = world.schedule.run_once()
    assert report is not None and report.acknowledged == 1 and report.rounds == 1
    new_key = keys_pb2.KeyAnnouncement.FromString(
        keys_pb2.SignedKeyAnnouncement.FromString(announcement).announcement
    ).new_key.key_id
    held = world.unit_keys.trust.keyring(GATEWAY)
    assert held is not None and held.get(new_key) is not None
    # The unit saved it: a restart keeps it.
    _, unit_trust = _saved(world.unit_keys.path)
    assert unit_trust.keyring(GATEWAY).get(new_key) is not None  # type: ignore[attr-defined]
    (delivery,) = world.gateway_items.deliveries()
    assert (delivery.peer, delivery.applied) == (UNIT, True)
    # Both envelopes in the gateway's archive, each named by its chain entry; the unit keeps them too.
    actions = [r.action for r in _chain(world)]
    assert actions == ["trust.sent", "trust.received", "trust.acknowledged"]
    report_archive = verify_archive(world.store.engine, party=world.gateway_keys.party, trust=world.gateway_keys.trust)
    assert report_archive.problems == [] and report_archive.references == 2
    assert sorted(str(r["direction"]) for r in world.connector.store.archived(peer=GATEWAY)) == ["in", "out"]
    events = [e["event"] for e in world.connector.store.audit_entries()]
    assert events.count("trust_applied") >= 1
    # Nothing more to say: the next tick does not synchronise (interval not reached, nothing new).
    assert world.schedule.run_once() == []


def test_a_unit_rotation_reaches_the_gateway_in_two_rounds(world: TrustWorld) -> None:
    announcement = _rotate(world.unit_keys, Algorithm.X25519, now_ms=NOW, activate_in_ms=DAY_MS)
    assert [p.payload for p in world.unit_items.pending(GATEWAY)] == [announcement]
    report = world.syncer.sync(UNIT)
    # Round 1 brings the unit's item (applied here, and beside the envelope already); round 2 gives our verdict.
    assert report.rounds == 2 and report.applied == 1
    assert world.unit_items.pending(GATEWAY) == []
    (delivery,) = world.unit_items.deliveries()
    assert (delivery.peer, delivery.applied) == (GATEWAY, True)
    new_key = world.unit_keys.party.current(Algorithm.X25519, NOW + DAY_MS)
    assert new_key is not None and world.gateway_keys.trust.keyring(UNIT).get(new_key.key_id) is not None  # type: ignore[union-attr]
    # After the takeover the gateway seals for the new key.
    world.clock.advance(DAY_MS)
    world.commission("WT-T-1", 3)
    world.settle()
    assert world.store.batches.answer_count() > 0


def test_refresh_keys_recovers_a_rotation_the_unit_missed(world: TrustWorld) -> None:
    # The gateway's signing key changes at once (hedui-keys rotate without a lead) and no sync ran since.
    _rotate(world.gateway_keys, Algorithm.ED25519, now_ms=NOW)
    world.commission("WT-T-2", 3)
    report = world.cycle()
    # The unit refused the batch with refresh_keys; the engine synchronised and sent it again, sealed afresh.
    assert report.refreshed and report.error is None
    world.connector.answer_pending()
    world.settle()
    rows = world.store.engine.connect().execute(select(schema.batches.c.state, schema.batches.c.last_error)).all()
    assert rows and all(r.state == "acknowledged" for r in rows), rows
    assert (
        world.metrics.registry.get_sample_value(
            "hedui_trust_syncs_total", {"peer": UNIT, "trigger": "refresh", "outcome": "ok"}
        )
        == 1
    )
    refusals = [e for e in world.connector.store.audit_entries() if e["event"] == "refused"]
    assert [e["reason"] for e in refusals] == ["envelope_unknown_key"]


def test_refresh_keys_when_a_reply_from_the_unit_does_not_open(world: TrustWorld) -> None:
    world.commission("WT-T-3", 3)
    world.cycle()  # sent and receipted
    _rotate(world.unit_keys, Algorithm.ED25519, now_ms=NOW)  # the unit signs with a key the gateway lacks
    world.connector.answer_pending()
    report = world.cycle()
    assert report.refreshed and report.answered == 1


def test_sealed_for_a_retired_unit_key_recovers_through_the_refusal(world: TrustWorld) -> None:
    """The unit rotated its agreement key, and the old one retired, before the gateway heard of it: even SyncTrust is
    sealed for a key the unit no longer holds. The refusal carries the unit's announcements; the gateway applies
    them, synchronises and sends again."""
    _rotate(world.unit_keys, Algorithm.X25519, now_ms=NOW)
    world.clock.advance(8 * DAY_MS)
    world.unit_keys.maintain(None)  # the old agreement key retires; its secret is gone
    world.gateway_keys.advance_in_memory()
    world.commission("WT-T-4", 3)
    report = world.cycle()
    assert report.refreshed and report.sent >= 1 and report.error is None
    # The announcement came beside the unit's refusal (its trailing metadata), before any envelope could open.
    assert any(r.action == "trust.applied" and "via=attachment" in (r.detail or "") for r in _chain(world))
    assert world.store.batches.answer_count() == 0
    world.settle()
    assert world.store.batches.answer_count() > 0


def test_announcements_signed_by_a_revoked_key_are_refused_over_the_wire(world: TrustWorld) -> None:
    # The unit rotates its signing key and revokes the old one (compromised): the stolen key is K1.
    stolen = world.unit_keys.party.signing_key(NOW)
    _rotate(world.unit_keys, Algorithm.ED25519, now_ms=NOW)
    revoked: list[bytes] = []
    world.unit_keys.change(
        lambda party, _: revoked.append(party.revoke(stolen.key_id, now_ms=NOW + 1, reason="compromised"))
    )
    world.clock.advance(MINUTE_MS)
    world.syncer.sync(UNIT)
    held = world.gateway_keys.trust.keyring(UNIT)
    assert held is not None and held.require(stolen.key_id).state is KeyState.REVOKED
    before = list(held)
    # The thief makes announcements with K1 and gets them delivered as the unit's trust items.
    successor = world.unit_keys.party.signing_key(NOW + MINUTE_MS)
    agreement = world.unit_keys.party.current(Algorithm.X25519, NOW + MINUTE_MS)
    assert agreement is not None
    thief = AgreementKey.generate()
    forged = [
        _announcement(stolen, keys_pb2.ANNOUNCEMENT_KIND_REVOCATION, successor.key_id, NOW + MINUTE_MS),
        _announcement(
            stolen, keys_pb2.ANNOUNCEMENT_KIND_ROTATION, agreement.key_id, NOW + MINUTE_MS,
            new_key=KeyRecord(thief.public, KeyState.ACTIVE, NOW + MINUTE_MS),
        ),
    ]  # fmt: skip
    with world.connector.store.engine.begin() as conn:
        for payload in forged:
            world.unit_items.publish(conn, KEY_ANNOUNCEMENT, payload, NOW + MINUTE_MS, [GATEWAY])
    report = world.syncer.sync(UNIT)
    assert report.refused == 2 and report.applied == 0
    assert list(world.gateway_keys.trust.keyring(UNIT)) == before  # type: ignore[arg-type]
    verdicts = {d.sha256: (d.applied, d.reason) for d in world.unit_items.deliveries()}
    assert [verdicts[hashlib.sha256(p).digest()] for p in forged] == [(False, "signer_not_current")] * 2
    refused = [r for r in _chain(world) if r.action == "trust.refused"]
    assert len(refused) == 2 and all("reason=signer_not_current" in (r.detail or "") for r in refused)
    # A revoked unit key is refused by the gateway at once: a reply signed with it does not open.
    forged_reply = _sealed_with(world, stolen)
    with pytest.raises(RevokedKey):
        world.courier.open(forged_reply)


def test_a_keystore_changed_by_hedui_keys_is_reloaded_and_delivered(world: TrustWorld) -> None:
    path, secret = world.unit_keys.path, world.unit_keys.passphrase_file
    assert main(["--keystore", str(path), "--passphrase-file", str(secret), "rotate", "agreement"]) == 0
    world.unit.turn()  # the connector's key job: reload, publish
    assert world.unit_keys.reloads == 1
    (pending,) = world.unit_items.pending(GATEWAY)
    world.syncer.sync(UNIT)
    new_key = world.unit_keys.party.current(Algorithm.X25519, NOW)
    assert new_key is not None and world.gateway_keys.trust.keyring(UNIT).get(new_key.key_id) is not None  # type: ignore[union-attr]
    assert world.unit_items.pending(GATEWAY) == [] and pending.kind == KEY_ANNOUNCEMENT
    # The gateway saved it in its own keystore.
    _, trust = _saved(world.gateway_keys.path)
    assert trust.keyring(UNIT).get(new_key.key_id) is not None  # type: ignore[attr-defined]


def test_a_trust_sync_that_breaks_the_limits_is_refused_whole(world: TrustWorld) -> None:
    too_many = trust_pb2.TrustSync(items=[trust_pb2.TrustItem(kind=KEY_ANNOUNCEMENT, payload=b"x")] * (MAX_ITEMS + 1))
    with pytest.raises(TrustSyncError):
        check_sync(too_many)
    bad_ack = trust_pb2.TrustSync(acks=[trust_pb2.TrustItemAck(kind=KEY_ANNOUNCEMENT, item_sha256=b"short")])
    with pytest.raises(TrustSyncError):
        check_sync(bad_ack)
    unexplained = trust_pb2.TrustSync(
        acks=[trust_pb2.TrustItemAck(kind=KEY_ANNOUNCEMENT, item_sha256=bytes(32), applied=False, reason="Bad Reason")]
    )
    with pytest.raises(TrustSyncError):
        check_sync(unexplained)
    envelope = world.courier.seal(too_many, UNIT)
    with pytest.raises(grpc.RpcError) as excinfo:
        world.client.stub.SyncTrust(exchange_pb2.SealedMessage(envelope=envelope))
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert world.unit_items.deliveries() == []


def test_items_of_unknown_kinds_are_refused_and_unhandled_kinds_left_pending() -> None:
    items = [
        trust_pb2.TrustItem(kind=99, payload=b"?"),  # type: ignore[arg-type]
        trust_pb2.TrustItem(kind=trust_pb2.TRUST_ITEM_KIND_ROSTER, payload=b"roster"),
        trust_pb2.TrustItem(kind=KEY_ANNOUNCEMENT, payload=b"garbage"),
    ]

    def refuse(sender: str, payload: bytes, now_ms: int) -> str | None:
        return "Not A Code"

    verdicts = apply_items(items, {KEY_ANNOUNCEMENT: refuse}, UNIT, NOW)
    assert [v.reason for v in verdicts] == ["unknown_kind", None, "refused"]
    assert verdicts[1].ack is None  # no roster handler in this release: no verdict, offered again later


def test_attachments_of_another_party_or_garbage_change_nothing(world: TrustWorld) -> None:
    announcement = _rotate(world.unit_keys, Algorithm.X25519, now_ms=NOW)
    before = world.gateway_keys.trust.keyring(UNIT)
    results = apply_attachments(world.gateway_keys, "unit.220100.land", [announcement, b"garbage"], NOW)
    assert [r.reason for r in results] == ["not_own_announcement", "announcement_malformed"]
    assert world.gateway_keys.trust.keyring(UNIT) is before
    (applied,) = apply_attachments(world.gateway_keys, UNIT, [announcement], NOW)
    assert applied.changed and applied.reason is None
    (again,) = apply_attachments(world.gateway_keys, UNIT, [announcement], NOW)
    assert not again.changed and again.reason is None  # idempotent


def _chain(world: TrustWorld) -> list[Any]:
    with world.store.engine.connect() as conn:
        return list(conn.execute(select(schema.audit_log).order_by(schema.audit_log.c.seq)))


def _announcement(
    signer: SigningKey, kind: int, old_key_id: bytes, issued_at_ms: int, *, new_key: KeyRecord | None = None
) -> bytes:
    message = keys_pb2.KeyAnnouncement(
        party_id=UNIT, kind=kind, old_key_id=old_key_id, issued_at_ms=issued_at_ms,  # type: ignore[arg-type]
        overlap_until_ms=issued_at_ms + DAY_MS if new_key else 0, reason="" if new_key else "superseded",
    )  # fmt: skip
    if new_key is not None:
        message.new_key.CopyFrom(new_key.to_proto())
    return sign_announcement(message, signer)


def _sealed_with(world: TrustWorld, signer: SigningKey) -> bytes:
    return seal_with(
        trust_pb2.TrustSync(),
        sender=UNIT,
        signing_key=signer,
        recipient=GATEWAY,
        recipient_key=world.gateway_keys.party.agreement_public(world.clock.now_ms()),
        created_at_ms=world.clock.now_ms(),
        ttl_ms=MINUTE_MS,
    )


def test_trust_error_reasons_are_codes() -> None:
    assert TrustError("x").reason == "not_trusted"


def test_each_side_learns_which_version_of_its_roster_the_other_holds(world: TrustWorld) -> None:
    heard: list[tuple[str, str, int]] = []
    desk = world.connector.trust_desk
    assert desk is not None
    world.syncer.held_roster_version = lambda unit: 7
    world.syncer.peer_roster_version = lambda unit, version: heard.append(("gateway", unit, version))
    desk.held_roster_version = lambda gateway: 3
    desk.peer_roster_version = lambda gateway, version: heard.append(("unit", gateway, version))
    world.syncer.sync(UNIT)
    assert heard == [("unit", GATEWAY, 7), ("gateway", UNIT, 3)]
