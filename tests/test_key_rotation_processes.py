"""Keys over the wire between real processes (issue 11): a gateway and three connectors exchange continuously while
both sides rotate both their keys on a schedule of seconds, and an operator rotates a running connector's key with
``hedui-keys`` without a restart, and the CA renews a connector's server certificate and the gateway's client
certificate, which the running services reload. Nothing is lost or failed, every batch is answered exactly once, and
the old keys are refused once retired."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
from hedui.v1 import exchange_pb2, exchange_pb2_grpc
from sqlalchemy import select

from common.db import make_engine
from connectors import store as cstore
from connectors.store import ConnectorStore
from demo.localnet import build_network
from gateway.db import schema
from gateway.exchange.store import GatewayStore
from keys import keystore
from keys.envelope import seal_with
from keys.fingerprint import Algorithm
from keys.identity import PartyKeys
from keys.keystore import FAST_FOR_TESTS
from keys.trustsync import REFRESH_KEYS
from tests.test_gateway_process import UNITS, enqueue, wait_until

GATEWAY = "agency.220100"
#: Both keys of every party are rotated every 10 s, announced 3 s ahead, and stay valid 8 s after their successor
#: took over; the gateway synchronises trust every second (the lead must exceed two synchronisations).
PERIOD_S, LEAD_S, OVERLAP_S = 10.0, 3.0, 8.0
KEYS = {
    "rotate_agreement_days": PERIOD_S / 86_400,
    "rotate_signing_days": PERIOD_S / 86_400,
    "rotation_lead_hours": LEAD_S / 3_600,
    "rotation_overlap_days": OVERLAP_S / 86_400,
    "watch_interval_seconds": 0.3,
}
TRAFFIC_S = 34.0


def _keystore(root: Path, party: str) -> tuple[Path, Path]:
    return root / "keys" / f"{party}.keystore.json", root / "keys" / f"{party}.passphrase"


def _load(root: Path, party: str) -> PartyKeys:
    path, secret = _keystore(root, party)
    return keystore.load(path, keystore.read_passphrase_file(secret))[0]


def _hedui_keys(root: Path, party: str, *args: str) -> subprocess.CompletedProcess[str]:
    path, secret = _keystore(root, party)
    command = [sys.executable, "-m", "keys.cli", "--keystore", str(path), "--passphrase-file", str(secret), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_both_sides_rotate_both_keys_under_traffic_and_nothing_is_lost(tmp_path: Path) -> None:
    root = tmp_path / "net"
    net = build_network(
        root,
        UNITS,
        batch_size=100,
        kdf=FAST_FOR_TESTS,
        keys=KEYS,
        trust_sync_interval=1.0,
        key_check_interval=0.5,
        legacy_staff=True,  # commissions go straight into the outbox, without approvals (keys are this test's subject)
    )
    tax, land = "unit.220100.tax", "unit.220100.land"
    first_gateway, first_tax = _load(root, GATEWAY), _load(root, tax)
    at_start = int(time.time() * 1000)
    first_signer, first_agreement = first_gateway.signing_key(at_start), first_tax.agreement_public(at_start)
    store = GatewayStore(make_engine(f"sqlite:///{root / 'data' / 'gateway.db'}"))
    enqueued = 0
    try:
        net.start_connectors()
        net.start_gateway()
        assert wait_until(lambda: len(store.units.all()) == len(UNITS), 30), "gateway did not start"
        started = time.monotonic()
        cli_rotated = threading.Event()

        def operator() -> None:
            """An operator rotates the land registry's signing key on its running connector, taking over at once.
            Refused (and tried again a moment later) while a scheduled rotation is waiting to take over."""
            time.sleep(12)
            for _ in range(40):
                if _hedui_keys(root, land, "rotate", "signing", "--overlap-days", "0.0001").returncode == 0:
                    cli_rotated.set()
                    return
                time.sleep(0.5)

        def renewals() -> None:
            """The CA renews the tax bureau's server certificate and the gateway's client certificate while
            batches flow; both services take the new pair without a restart."""
            time.sleep(8)
            net.renew_certificate(tax, server=True)
            time.sleep(6)
            net.renew_certificate(GATEWAY, server=False)

        thread = threading.Thread(target=operator)
        thread.start()
        renewing = threading.Thread(target=renewals)
        renewing.start()
        n = 0
        while time.monotonic() - started < TRAFFIC_S:
            enqueued += enqueue(store, f"WT-K-{n}", 20, seed=20261127 + n)
            n += 1
            time.sleep(1.0)
        thread.join()
        renewing.join()
        assert cli_rotated.is_set(), "hedui-keys could not rotate the running connector's keystore"
        assert wait_until(lambda: store.batches.answer_count() == enqueued, 90), (
            store.batches.answer_count(),
            enqueued,
        )
        assert wait_until(lambda: _all_acknowledged(store), 30)
        assert wait_until(lambda: _unit_caught_up(store, root, land), 20)

        # Both sides rotated both keys at least three times (by schedule), the land registry once more by hand.
        for party in (GATEWAY, *UNITS):
            keys = _load(root, party)
            for algorithm in (Algorithm.ED25519, Algorithm.X25519):
                count = sum(1 for r in keys.records() if r.algorithm is algorithm)
                assert count >= 4, (party, algorithm, count)
        # The running connector reloaded the keystore hedui-keys changed, and the gateway holds the new key.
        assert "keystore reloaded" in (root / "logs" / f"{land}.log").read_text()
        # Both renewed certificates were taken while serving (the batches above all went through).
        assert "TLS certificate reloaded" in (root / "logs" / f"{tax}.log").read_text()
        assert "TLS certificate reloaded" in (root / "logs" / "gateway.log").read_text()

        # Nothing failed, nothing was lost, every batch was answered exactly once.
        with store.engine.connect() as conn:
            states = Counter(r.state for r in conn.execute(select(schema.batches.c.state)))
            answered = Counter(
                re.search(r"batch=([^;]+)", r.detail).group(1)  # type: ignore[union-attr]
                for r in conn.execute(
                    select(schema.audit_log.c.detail).where(schema.audit_log.c.action == "batch.answered")
                )
            )
        assert set(states) == {"acknowledged"}, states
        assert sum(states.values()) == len(answered) and set(answered.values()) == {1}
        assert store.outbox.item_count() == enqueued
        for unit in UNITS:
            unit_store = ConnectorStore(make_engine(f"sqlite:///{root / 'data' / f'{unit}.db'}"))
            assert _unit_states(unit_store) <= {"acknowledged", "answered"}
            unit_store.engine.dispose()

        # After retirement the old keys are refused: a request signed with the gateway's first signing key, and one
        # sealed for the tax bureau's first agreement key.
        now = int(time.time() * 1000)
        current = _load(root, GATEWAY)
        path, secret = _keystore(root, GATEWAY)
        _, gateway_trust = keystore.load(path, keystore.read_passphrase_file(secret))
        tax_now = gateway_trust.agreement_key_for(tax, now)
        assert first_agreement.key_id != tax_now.key_id
        assert first_signer.key_id != current.signing_key(now).key_id
        old_signer = seal_with(
            exchange_pb2.FetchAnswers(batch_ids=["B-1"]), sender=GATEWAY, signing_key=first_signer,
            recipient=tax, recipient_key=tax_now, created_at_ms=now, ttl_ms=60_000,
        )  # fmt: skip
        old_recipient = seal_with(
            exchange_pb2.FetchAnswers(batch_ids=["B-1"]), sender=GATEWAY, signing_key=current.signing_key(now),
            recipient=tax, recipient_key=first_agreement, created_at_ms=now, ttl_ms=60_000,
        )  # fmt: skip
        channel = _channel(root, net.connector_ports[tax])
        try:
            stub = exchange_pb2_grpc.ExchangeServiceStub(channel)
            for envelope in (old_signer, old_recipient):
                try:
                    stub.FetchAnswers(exchange_pb2.SealedMessage(envelope=envelope), timeout=10)
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                    reasons = [m.value for m in exc.trailing_metadata() or () if m.key == "hedui-refusal-reason"]
                    assert [str(r) for r in reasons] == [REFRESH_KEYS]
                else:
                    raise AssertionError("an envelope under a retired key was accepted")
        finally:
            channel.close()
    finally:
        net.stop_all()
        store.engine.dispose()


def _all_acknowledged(store: GatewayStore) -> bool:
    with store.engine.connect() as conn:
        return {r.state for r in conn.execute(select(schema.batches.c.state))} == {"acknowledged"}


def _unit_caught_up(store: GatewayStore, root: Path, unit: str) -> bool:
    """The gateway holds the unit's current signing key (the one hedui-keys made, or a scheduled successor)."""
    path, secret = _keystore(root, GATEWAY)
    _, trust = keystore.load(path, keystore.read_passphrase_file(secret))
    current = _load(root, unit).current(Algorithm.ED25519, int(time.time() * 1000))
    held = trust.keyring(unit)
    return current is not None and held is not None and held.get(current.key_id) is not None


def _unit_states(unit_store: ConnectorStore) -> set[str]:
    with unit_store.engine.connect() as conn:
        return {r.state for r in conn.execute(select(cstore.batches.c.state))}


def _channel(root: Path, port: int) -> grpc.Channel:
    tls = root / "tls"
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(tls / "ca.crt").read_bytes(),
        private_key=(tls / f"{GATEWAY}.client.key").read_bytes(),
        certificate_chain=(tls / f"{GATEWAY}.client.crt").read_bytes(),
    )
    return grpc.secure_channel(f"localhost:{port}", credentials)
