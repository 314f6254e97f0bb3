"""A small real exchange network for gateway tests: connectors for several units serving over mutual TLS on
loopback with synthetic data, and the gateway's store, engine and workers on a real database."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from hedui.v1 import exchange_pb2, records_pb2

from common.db import make_engine
from common.workdays import WorkdayCalendar
from connectors.connector import Connector
from connectors.metrics import ConnectorMetrics
from connectors.server import RunningConnector, server_credentials, start
from connectors.store import ConnectorStore
from connectors.synthetic import Population, SyntheticAdapter
from gateway.db.database import upgrade
from gateway.exchange.engine import EngineSettings, ExchangeEngine, UnitWorkers
from gateway.exchange.outbox import CommissionInput, SubjectInput
from gateway.exchange.store import GatewayStore
from gateway.exchange.transport import ClientTls, UnitClient
from gateway.metrics import GatewayMetrics
from gateway.procedure.routing import route
from keys.clock import FixedClock
from keys.envelope import Courier
from keys.identity import PartyKeys
from keys.truststore import TrustStore
from tests.approval_kit import StaffKit, approve
from tests.exchange_world import GATEWAY, SEED, STAFF, Pki, enrol

#: Three units of different categories, as in a small county.
UNITS = {
    "unit.220100.tax": records_pb2.UNIT_CATEGORY_TAX,
    "unit.220100.land": records_pb2.UNIT_CATEGORY_LAND,
    "unit.220100.bank": records_pb2.UNIT_CATEGORY_FINANCIAL_INSTITUTION,
}
CATEGORIES = (
    records_pb2.DATA_CATEGORY_TAX,
    records_pb2.DATA_CATEGORY_REAL_ESTATE,
    records_pb2.DATA_CATEGORY_DEPOSITS,
)


@dataclass
class GatewayWorld:
    clock: FixedClock
    pki: Pki
    population: Population
    store: GatewayStore
    engine: ExchangeEngine
    workers: UnitWorkers
    connectors: dict[str, RunningConnector]
    #: The gateway's exchange staff with their keys, and the roster of them every connector holds.
    staff: StaffKit

    def commission(self, ref: str, households: int, start: int = 0, *, staff: tuple[str, ...] = STAFF) -> int:
        """Enqueue households ``start`` .. ``start + households - 1`` as commission ``ref`` for every unit, approved
        for exchange by ``staff`` (each signing its exchange digest with their own key, now)."""
        subjects = subjects_of(self.population, ref, households, start)
        units = route(CATEGORIES, self.store.units.all())
        return self.enqueue(commission_input(ref, staff=staff), subjects, units)

    def enqueue(
        self,
        commission: CommissionInput,
        subjects: Sequence[SubjectInput],
        units: Sequence[str],
        *,
        store: GatewayStore | None = None,
    ) -> int:
        """The outbox's ``enqueue`` (of ``store``, this world's by default), then the exchange approvals of the
        commission's ``staff_ids``, each signed with the member's own key now."""
        now = self.clock.now_ms()
        commission_id = (store or self.store).outbox.enqueue(commission, subjects, units, now, gateway=GATEWAY)
        approve((store or self.store).engine, commission_id, self.staff, commission.staff_ids, at_ms=now)
        return commission_id


def subjects_of(population: Population, ref: str, households: int, start: int = 0) -> list[SubjectInput]:
    """The members of some synthetic households, each with an authorisation reference."""
    people = [m for h in population.households(households, start) for m in h.members]
    return [
        SubjectInput(
            subject_ref=f"{ref}-{i}",
            id_number=m.id_number,
            name=m.name,
            auth_number=f"AUTH-{ref}-{i}",
            auth_digest=hashlib.sha256(m.id_number.encode()).digest(),
        )
        for i, m in enumerate(people)
    ]


def commission_input(
    ref: str, *, staff: tuple[str, ...] = STAFF, thresholds: tuple[tuple[int, int], ...] = ()
) -> CommissionInput:
    """The exchange side of a commission over CATEGORIES, for the income period Sept 2025 - Feb 2026."""
    return CommissionInput(
        ref=ref,
        purpose=exchange_pb2.PROGRAMME_MINIMUM_LIVING_ALLOWANCE,
        income_from=(2025, 9),
        income_to=(2026, 2),
        assets_as_of=date(2026, 2, 28),
        staff_ids=staff,
        categories=CATEGORIES,
        thresholds=thresholds,
    )


def gateway_settings(**changes: object) -> EngineSettings:
    base = {"replica": "test-1", "batch_size": 50, "poll_interval_ms": 0, "base_backoff_ms": 1000}
    base.update(changes)
    return EngineSettings(**base)  # type: ignore[arg-type]


@contextmanager
def gateway_world(
    root: Path,
    *,
    now_ms: int,
    database_url: str | None = None,
    settings: EngineSettings | None = None,
    down: frozenset[str] = frozenset(),
    metrics: GatewayMetrics | None = None,
    unit_metrics: Mapping[str, ConnectorMetrics] | None = None,
    staff: StaffKit | None = None,
) -> Iterator[GatewayWorld]:
    """Connectors for UNITS (those in ``down`` are configured but not started) and a migrated gateway store;
    with ``metrics`` / ``unit_metrics`` (per unit id) the gateway and connectors report to them. ``staff``: the
    gateway's staff of an earlier world on the same database (the same people, the same keys, after a restart)."""
    root.mkdir(parents=True, exist_ok=True)
    clock = FixedClock(now_ms)
    pki = Pki(root)
    cert, key = pki.issue(GATEWAY)
    gateway = (PartyKeys.create(GATEWAY, now_ms=now_ms - 1), TrustStore())
    population = Population(SEED)
    if staff is None:
        staff = StaffKit(GATEWAY, now_ms)
        for staff_id in STAFF:
            staff.enrol(staff_id)
    engine = make_engine(database_url or f"sqlite:///{root / 'gateway.db'}")
    upgrade(engine)
    store = GatewayStore(engine)
    tls = ClientTls(cert.read_bytes(), key.read_bytes(), pki.ca_cert)
    with ExitStack() as stack:
        running: dict[str, RunningConnector] = {}
        clients: dict[str, UnitClient] = {}
        entries = []
        for unit_id, category in UNITS.items():
            unit = (PartyKeys.create(unit_id, now_ms=now_ms - 1), TrustStore())
            enrol(gateway, unit, now_ms)
            server_cert, server_key = pki.issue(unit_id, server=True)
            if unit_id in down:
                endpoint = "localhost:1"  # nothing listens there
            else:
                cstore = ConnectorStore(make_engine(f"sqlite:///{root / (unit_id + '.db')}"))
                connector = Connector(
                    courier=Courier(unit[0], unit[1], replay=cstore.replay, clock=clock),
                    store=cstore,
                    adapter=SyntheticAdapter(population, category),
                    unit_category=category,
                    calendar=WorkdayCalendar(),
                    staff={GATEWAY: frozenset(STAFF)},
                    metrics=(unit_metrics or {}).get(unit_id),
                    rosters=staff.rosters(),
                )
                if connector.metrics is not None:
                    connector.metrics.watch_store(cstore.engine)
                server = start(
                    connector,
                    listen="127.0.0.1:0",
                    credentials=server_credentials(server_cert, server_key, pki.ca_path),
                    worker_interval=None,
                )
                stack.callback(server.stop, None)
                running[unit_id] = server
                endpoint = f"localhost:{server.port}"
            clients[unit_id] = UnitClient(endpoint, tls, timeout_seconds=5)
            stack.callback(clients[unit_id].close)
            entries.append((unit_id, category, endpoint, "system", True))
        store.units.sync(entries)
        courier = Courier(gateway[0], gateway[1], replay=store.replay, clock=clock)
        if metrics is not None:
            courier.on_reject = metrics.service.counting_rejections(courier.on_reject)
            metrics.watch_store(engine)
        exchange = ExchangeEngine(
            store, courier, clients, WorkdayCalendar(), settings or gateway_settings(), metrics=metrics
        )
        workers = UnitWorkers(exchange)
        stack.callback(workers.shutdown)
        stack.callback(engine.dispose)
        yield GatewayWorld(clock, pki, population, store, exchange, workers, running, staff)
