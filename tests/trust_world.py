"""A gateway and one unit's connector whose keys live in keystore files, as the services keep them: the connector
serving over mutual TLS on loopback with its SyncTrust handler, and the gateway's store, exchange engine, trust
syncer and schedule on a real database, all on one FixedClock."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from hedui.v1 import records_pb2
from prometheus_client import CollectorRegistry

from common.db import make_engine
from common.workdays import WorkdayCalendar
from connectors.connector import Connector
from connectors.server import RunningConnector, attach_trust, server_credentials, start
from connectors.store import ConnectorStore
from connectors.synthetic import Population, SyntheticAdapter
from connectors.trust import ConnectorKeys
from connectors.trust import TrustItems as UnitItems
from gateway.db.database import upgrade
from gateway.exchange.engine import CycleReport, ExchangeEngine, UnitWorkers
from gateway.exchange.store import GatewayStore
from gateway.exchange.transport import ClientTls, UnitClient
from gateway.metrics import GatewayMetrics
from gateway.procedure.routing import route
from gateway.trust import GatewayKeys, TrustItems, TrustSchedule, TrustSyncer
from keys import keystore
from keys.clock import FixedClock
from keys.envelope import Courier
from keys.identity import PartyKeys
from keys.keystore import FAST_FOR_TESTS
from keys.live import LiveKeystore, RotationPolicy
from keys.truststore import TrustStore
from tests.approval_kit import StaffKit, approve
from tests.exchange_world import GATEWAY, SEED, STAFF, Pki, enrol
from tests.gateway_world import commission_input, gateway_settings, subjects_of

UNIT = "unit.220100.tax"
PASSPHRASE = "trust world passphrase"


def live_keystore(root: Path, party: PartyKeys, trust: TrustStore, clock: FixedClock) -> LiveKeystore:
    """``party``'s keys in a keystore file under ``root`` (cheap KDF), loaded as a running service loads it."""
    path, secret = root / f"{party.party_id}.keystore.json", root / f"{party.party_id}.passphrase"
    secret.write_text(PASSPHRASE + "\n")
    secret.chmod(0o600)
    keystore.save(path, party, trust, PASSPHRASE, kdf=FAST_FOR_TESTS)
    return LiveKeystore.open(path, secret, clock=clock)


@dataclass
class TrustWorld:
    clock: FixedClock
    root: Path
    store: GatewayStore
    gateway_keys: LiveKeystore
    gateway: GatewayKeys
    courier: Courier
    client: UnitClient
    engine: ExchangeEngine
    workers: UnitWorkers
    syncer: TrustSyncer
    schedule: TrustSchedule
    unit_keys: LiveKeystore
    unit: ConnectorKeys
    connector: Connector
    running: RunningConnector
    metrics: GatewayMetrics
    #: The gateway's exchange staff with their keys, and the roster of them the connector holds.
    staff: StaffKit

    @property
    def gateway_items(self) -> TrustItems:
        return TrustItems(self.store.engine)

    @property
    def unit_items(self) -> UnitItems:
        return UnitItems(self.connector.store.engine)

    def commission(self, ref: str, households: int) -> int:
        subjects = subjects_of(Population(SEED), ref, households)
        units = route(commission_input(ref).categories, self.store.units.all())
        now = self.clock.now_ms()
        commission_id = self.store.outbox.enqueue(commission_input(ref), subjects, units, now, gateway=GATEWAY)
        approve(self.store.engine, commission_id, self.staff, STAFF, at_ms=now)
        return commission_id

    def cycle(self) -> CycleReport:
        (report,) = self.workers.run_once(dispatch=True)
        return report

    def settle(self, rounds: int = 12) -> list[CycleReport]:
        """Unit cycles, the connector answering in between, until a round changes nothing."""
        reports = []
        for _ in range(rounds):
            report = self.cycle()
            reports.append(report)
            answered = self.connector.answer_pending()
            if not (report.formed or report.sent or report.answered or report.acknowledged or answered):
                return reports
        raise AssertionError("the exchange did not settle")


@contextmanager
def trust_world(
    root: Path, *, now_ms: int, gateway_policy: RotationPolicy | None = None, unit_policy: RotationPolicy | None = None
) -> Iterator[TrustWorld]:
    """The world of the module docstring; everything stopped on exit."""
    root.mkdir(parents=True, exist_ok=True)
    clock = FixedClock(now_ms)
    pki = Pki(root)
    cert, key = pki.issue(GATEWAY)
    server_cert, server_key = pki.issue(UNIT, server=True)
    gateway_side = (PartyKeys.create(GATEWAY, now_ms=now_ms - 1), TrustStore())
    unit_side = (PartyKeys.create(UNIT, now_ms=now_ms - 1), TrustStore())
    enrol(gateway_side, unit_side, now_ms)
    gateway_keys = live_keystore(root, *gateway_side, clock)
    unit_keys = live_keystore(root, *unit_side, clock)
    staff = StaffKit(GATEWAY, now_ms)
    for staff_id in STAFF:
        staff.enrol(staff_id)
    with ExitStack() as stack:
        cstore = ConnectorStore(make_engine(f"sqlite:///{root / 'connector.db'}"))
        stack.callback(cstore.engine.dispose)
        connector = Connector(
            courier=Courier(unit_keys.party, unit_keys.trust, replay=cstore.replay, clock=clock),
            store=cstore,
            adapter=SyntheticAdapter(Population(SEED), records_pb2.UNIT_CATEGORY_TAX),
            unit_category=records_pb2.UNIT_CATEGORY_TAX,
            calendar=WorkdayCalendar(),
            staff={GATEWAY: frozenset(STAFF)},
            rosters=staff.rosters(),
        )
        unit = attach_trust(connector, unit_keys, unit_policy)
        running = start(
            connector,
            listen="127.0.0.1:0",
            credentials=server_credentials(server_cert, server_key, pki.ca_path),
            worker_interval=None,
            key_interval=3600,
        )
        stack.callback(running.stop, None)
        engine = make_engine(f"sqlite:///{root / 'gateway.db'}")
        upgrade(engine)
        stack.callback(engine.dispose)
        store = GatewayStore(engine)
        endpoint = f"localhost:{running.port}"
        store.units.sync([(UNIT, records_pb2.UNIT_CATEGORY_TAX, endpoint, "system", True)])
        client = UnitClient(endpoint, ClientTls(cert.read_bytes(), key.read_bytes(), pki.ca_cert), 5)
        stack.callback(client.close)
        metrics = GatewayMetrics(CollectorRegistry())
        courier = Courier(gateway_keys.party, gateway_keys.trust, replay=store.replay, clock=clock)
        exchange = ExchangeEngine(
            store, courier, {UNIT: client}, WorkdayCalendar(), gateway_settings(), metrics=metrics
        )
        workers = UnitWorkers(exchange)
        stack.callback(workers.shutdown)
        gateway = GatewayKeys(gateway_keys, TrustItems(engine), [UNIT], gateway_policy)
        syncer = TrustSyncer(
            store=store, courier=courier, clients={UNIT: client}, keys=gateway_keys, replica="test-1", metrics=metrics
        )
        exchange.refresh.refresher = syncer.refresh
        schedule = TrustSchedule(syncer, interval_ms=60_000)
        stack.callback(schedule.shutdown)
        yield TrustWorld(
            clock, root, store, gateway_keys, gateway, courier, client, exchange, workers, syncer, schedule,
            unit_keys, unit, connector, running, metrics, staff,
        )  # fmt: skip
