"""A running service's keys (keys/live.py): scheduled rotation, reloading a keystore another program changed, the
keystore lock, and keys swapped whole while other threads seal and open envelopes."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from hedui.v1 import exchange_pb2

from common.config import ConfigError, DatabaseUrl
from gateway.config import AgencySection, DatabaseSection, GatewayConfig, KeysSection, TrustSection
from keys import keystore
from keys.announcements import read_announcement
from keys.clock import DAY_MS, HOUR_MS, FixedClock
from keys.envelope import Courier
from keys.errors import EnvelopeError
from keys.fingerprint import Algorithm
from keys.identity import PartyKeys
from keys.keyring import KeyState
from keys.keystore import FAST_FOR_TESTS
from keys.live import LiveKeystore, RotationPolicy
from keys.replay import MemoryReplayCache
from keys.truststore import TrustStore
from tests.exchange_world import GATEWAY, UNIT, beijing_ms, enrol
from tests.trust_world import PASSPHRASE, live_keystore

NOW = beijing_ms(2026, 3, 2)
POLICY = RotationPolicy(agreement_ms=10 * DAY_MS, signing_ms=10 * DAY_MS, lead_ms=DAY_MS, overlap_ms=3 * DAY_MS)


def _algorithms(announcements: list[bytes]) -> list[Algorithm]:
    return [Algorithm(read_announcement(a).message.new_key.algorithm) for a in announcements]


def test_a_key_is_rotated_a_lead_before_its_period_ends_and_once() -> None:
    party = PartyKeys.create(GATEWAY, now_ms=NOW)
    assert POLICY.due_at(party, Algorithm.ED25519, NOW) == NOW + 9 * DAY_MS
    assert POLICY.rotate_due(party, NOW + 9 * DAY_MS - 1) == []
    made = POLICY.rotate_due(party, NOW + 9 * DAY_MS)
    # The agreement key first: its announcement is signed by a signing key every peer still holds as current.
    assert _algorithms(made) == [Algorithm.X25519, Algorithm.ED25519]
    takeover = NOW + 10 * DAY_MS
    for algorithm in Algorithm:
        pending = [r for r in party.records() if r.algorithm is algorithm and r.state is KeyState.PENDING]
        assert [r.not_before_ms for r in pending] == [takeover]
        assert POLICY.due_at(party, algorithm, NOW + 9 * DAY_MS + 1) is None  # a successor is waiting
    assert POLICY.rotate_due(party, takeover - 1) == []
    party.advance(takeover)
    assert POLICY.due_at(party, Algorithm.X25519, takeover) == takeover + 9 * DAY_MS
    old = [r for r in party.records() if r.state is KeyState.RETIRING]
    assert {r.not_after_ms for r in old} == {takeover + 3 * DAY_MS}


def test_the_agreement_key_waits_while_a_signing_successor_is_pending() -> None:
    policy = RotationPolicy(agreement_ms=10 * DAY_MS, signing_ms=5 * DAY_MS, lead_ms=2 * DAY_MS, overlap_ms=DAY_MS)
    party = PartyKeys.create(GATEWAY, now_ms=NOW)
    assert _algorithms(policy.rotate_due(party, NOW + 3 * DAY_MS)) == [Algorithm.ED25519]  # takes over at +5
    assert policy.rotate_due(party, NOW + 8 * DAY_MS - 1) == []  # not due yet
    # Agreement due at +8; the next signing rotation is due at +8 too (taken over at +5, period 5, lead 2).
    assert _algorithms(policy.rotate_due(party, NOW + 8 * DAY_MS)) == [Algorithm.X25519, Algorithm.ED25519]


def test_policy_and_config_refuse_what_does_not_fit_together(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="longer than"):
        RotationPolicy.from_config(agreement_days=1, signing_days=180, lead_hours=24, overlap_days=14)
    with pytest.raises(ValueError, match="overlap"):
        RotationPolicy.from_config(agreement_days=30, signing_days=180, lead_hours=24, overlap_days=91)
    assert RotationPolicy.from_config(agreement_days=0, signing_days=0, lead_hours=24, overlap_days=14) is None
    tiny = RotationPolicy.from_config(agreement_days=10 / 86400, signing_days=10 / 86400, lead_hours=3 / 3600,
                                      overlap_days=8 / 86400)  # fmt: skip
    assert tiny is not None and tiny.lead_ms == 3000 and tiny.agreement_ms == 10_000

    def config(lead_hours: float, sync_seconds: float) -> GatewayConfig:
        return GatewayConfig(
            agency=AgencySection(party_id=GATEWAY, region_code="220100", level="city"),
            keys=KeysSection(keystore=tmp_path / "k", passphrase_file=tmp_path / "p", rotation_lead_hours=lead_hours),
            database=DatabaseSection(url=DatabaseUrl("sqlite:///x.db")),
            trust=TrustSection(sync_interval_seconds=sync_seconds),
        )

    assert config(24, 300).trust.sync_interval_seconds == 300
    with pytest.raises((ValueError, ConfigError), match="twice"):
        config(0.1, 300)  # 6 minutes of lead, two syncs need 10


def test_a_keystore_changed_by_another_program_is_reloaded_and_its_announcements_handed_on(tmp_path: Path) -> None:
    clock = FixedClock(NOW)
    service = live_keystore(tmp_path, PartyKeys.create(GATEWAY, now_ms=NOW), TrustStore(), clock)
    handed: list[list[bytes]] = []
    service.on_announcements(lambda announcements: handed.append(list(announcements)))
    assert handed == [] and not service.refresh()
    other = LiveKeystore.open(service.path, service.passphrase_file, clock=clock)  # another replica, or hedui-keys
    made = other.maintain(RotationPolicy(agreement_ms=2 * DAY_MS, signing_ms=0, lead_ms=DAY_MS, overlap_ms=DAY_MS),
                          now_ms=NOW + DAY_MS)  # fmt: skip
    assert len(made) == 1
    service.path.touch()  # a new modification time with the same bytes is no change
    assert service.refresh() and service.reloads == 1
    assert handed == [made]
    assert service.party.current(Algorithm.X25519, NOW + 2 * DAY_MS) == other.party.current(
        Algorithm.X25519, NOW + 2 * DAY_MS
    )
    service.path.touch()
    assert not service.refresh() and service.reloads == 1
    service.hand_on()
    assert handed == [made]  # each announcement once


def test_a_reload_never_takes_a_revocation_back(tmp_path: Path) -> None:
    clock = FixedClock(NOW)
    gateway, unit = (
        (PartyKeys.create(GATEWAY, now_ms=NOW - 1), TrustStore()),
        (PartyKeys.create(UNIT, now_ms=NOW - 1), TrustStore()),
    )
    enrol(gateway, unit, NOW)
    service = live_keystore(tmp_path, *gateway, clock)
    old = unit[0].signing_key(NOW)
    rotation = unit[0].rotate(Algorithm.ED25519, now_ms=NOW, overlap_ms=DAY_MS)
    revocation = unit[0].revoke(old.key_id, now_ms=NOW, reason="compromised")
    # Applied here in memory only (as if the save had failed), then the file is rewritten without them.
    service.trust.apply_announcement(rotation, now_ms=NOW)
    service.trust.apply_announcement(revocation, now_ms=NOW)
    keystore.save(service.path, gateway[0], gateway[1], PASSPHRASE, kdf=FAST_FOR_TESTS)
    assert service.refresh()
    held = service.trust.keyring(UNIT)
    assert held is not None and held.require(old.key_id).state is KeyState.REVOKED


def test_the_keystore_lock_keeps_two_writers_apart(tmp_path: Path) -> None:
    clock = FixedClock(NOW)
    service = live_keystore(tmp_path, PartyKeys.create(GATEWAY, now_ms=NOW), TrustStore(), clock)
    other = LiveKeystore.open(service.path, service.passphrase_file, clock=clock)
    with keystore.locked(service.path), pytest.raises(keystore.KeystoreBusy):
        service.change(lambda party, _: party.advance(NOW), wait_s=0.1)
    assert not _refresh_while_locked(service)
    # Both change the file in turn: the second reloads the first's change before it makes its own.
    other.change(lambda party, _: party.rotate(Algorithm.X25519, now_ms=NOW, overlap_ms=DAY_MS))
    service.change(lambda party, _: party.rotate(Algorithm.ED25519, now_ms=NOW, overlap_ms=DAY_MS))
    saved, _ = keystore.load(service.path, PASSPHRASE)
    assert len(list(saved.records())) == 4 and len(saved.announcements()) == 2
    assert len(list(service.party.records())) == 4


def _refresh_while_locked(service: LiveKeystore) -> bool:
    """A refresh while another program holds the lock gives up at once (and tries at its next turn)."""
    service.path.touch()
    keystore.save(service.path, service.party, service.trust, PASSPHRASE, kdf=FAST_FOR_TESTS)
    with keystore.locked(service.path):
        return service.refresh(wait_s=0)


def test_keys_change_whole_while_other_threads_seal_and_open(tmp_path: Path) -> None:
    clock = FixedClock(NOW)
    gateway = (PartyKeys.create(GATEWAY, now_ms=NOW - 1), TrustStore())
    unit = (PartyKeys.create(UNIT, now_ms=NOW - 1), TrustStore())
    enrol(gateway, unit, NOW)
    gateway_keys, unit_keys = live_keystore(tmp_path, *gateway, clock), live_keystore(tmp_path, *unit, clock)
    sender = Courier(gateway_keys.party, gateway_keys.trust, replay=MemoryReplayCache(), clock=clock)
    receiver = Courier(
        unit_keys.party, unit_keys.trust, replay=MemoryReplayCache(), clock=clock, on_reject=lambda e: None
    )
    stop, opened = threading.Event(), [0]
    failures: list[Exception] = []

    def traffic() -> None:
        while not stop.is_set():
            try:
                envelope = sender.seal(exchange_pb2.FetchAnswers(batch_ids=["B-1"]), UNIT)
                receiver.open(envelope, expect={"hedui.v1.FetchAnswers": exchange_pb2.FetchAnswers})
                opened[0] += 1
            except EnvelopeError as exc:  # keys out of step for a moment: refresh_keys territory, never a crash
                if not exc.refresh_keys:
                    failures.append(exc)
            except Exception as exc:  # half a rotation seen
                failures.append(exc)

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        for round_ in range(6):
            now = NOW + round_ * HOUR_MS
            clock.set(now)
            announcements = gateway_keys.maintain(
                RotationPolicy(agreement_ms=2 * HOUR_MS, signing_ms=2 * HOUR_MS, lead_ms=HOUR_MS // 2,
                               overlap_ms=HOUR_MS),
                now_ms=now,
            )  # fmt: skip
            for announcement in announcements:
                unit_keys.apply_announcement(announcement, now_ms=now)
            unit_keys.maintain(None, now_ms=now)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert failures == [] and opened[0] > 0
    assert sum(1 for r in gateway_keys.party.records() if r.algorithm is Algorithm.ED25519) >= 3
