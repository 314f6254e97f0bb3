"""Driving a ``gateway_world`` in tests: run cycles until the exchange settles, look at rows, enqueue commissions
with chosen staff, and bring a unit that was down back up on a real connector."""

from __future__ import annotations

import json
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from hedui.v1 import exchange_pb2
from sqlalchemy import Executable, select
from sqlalchemy.engine import Row

from common.db import make_engine
from common.workdays import WorkdayCalendar
from connectors.connector import Connector
from connectors.server import RunningConnector, server_credentials, start
from connectors.store import ConnectorStore
from connectors.synthetic import SyntheticAdapter
from gateway.db import schema
from gateway.exchange.engine import CycleReport
from gateway.exchange.transport import ClientTls, UnitClient
from keys.envelope import Courier
from keys.identity import PartyKeys
from keys.truststore import TrustStore
from tests.exchange_world import GATEWAY, STAFF, enrol
from tests.gateway_world import UNITS, GatewayWorld

TAX = "unit.220100.tax"
LAND = "unit.220100.land"
BANK = "unit.220100.bank"
DAY_MS = 86_400_000


def drain(world: GatewayWorld) -> int:
    """Let every running connector answer everything it holds; returns how many batches were answered."""
    answered = 0
    for running in world.connectors.values():
        while count := running.connector.answer_pending():
            answered += count
    return answered


def busy(report: CycleReport) -> bool:
    return bool(report.formed or report.sent or report.answered or report.acknowledged)


def settle(world: GatewayWorld, rounds: int = 30) -> list[CycleReport]:
    """Run unit cycles, letting the connectors answer in between, until a round changes nothing."""
    reports: list[CycleReport] = []
    for _ in range(rounds):
        done = world.workers.run_once(dispatch=True)
        reports.extend(done)
        if not any(busy(r) for r in done) and not drain(world):
            return reports
    raise AssertionError(f"the exchange did not settle in {rounds} rounds")


def execute(world: GatewayWorld, statement: Executable) -> None:
    with world.store.engine.begin() as conn:
        conn.execute(statement)


def rows(world: GatewayWorld, statement: Executable) -> list[Row[Any]]:
    with world.store.engine.connect() as conn:
        return list(conn.execute(statement).all())


def batch_rows(world: GatewayWorld, commission_id: int | None = None) -> list[Row[Any]]:
    query = select(schema.batches).order_by(schema.batches.c.unit_id, schema.batches.c.created_at_ms)
    if commission_id is not None:
        query = query.where(schema.batches.c.commission_id == commission_id)
    return rows(world, query)


def unit_row(world: GatewayWorld, unit_id: str) -> Row[Any]:
    return rows(world, select(schema.units).where(schema.units.c.unit_id == unit_id))[0]


def answers_by_item(world: GatewayWorld) -> dict[int, tuple[str, int, bytes, int]]:
    """item id -> (batch id, status, body, stored at)."""
    found = rows(world, select(schema.answers))
    result = {r.item_id: (r.batch_id, r.status, r.body, r.stored_at_ms) for r in found}
    assert len(result) == len(found)
    return result


def assert_exactly_one_answer_per_item(world: GatewayWorld) -> None:
    """Every item is in a batch and has exactly one answer, from that batch, naming that item."""
    items = rows(world, select(schema.items.c.id, schema.items.c.batch_id))
    answers = rows(world, select(schema.answers.c.item_id, schema.answers.c.batch_id, schema.answers.c.body))
    per_item = Counter(a.item_id for a in answers)
    assert set(per_item) == {i.id for i in items}
    assert set(per_item.values()) == {1}
    batch_of = {i.id: i.batch_id for i in items}
    for answer in answers:
        assert answer.batch_id == batch_of[answer.item_id]
        assert exchange_pb2.SubjectAnswer.FromString(answer.body).subject_ref == str(answer.item_id)


def audit_batches(world: GatewayWorld, unit_id: str, event: str) -> Counter[str]:
    """How often the unit's connector audited ``event`` per batch id."""
    store = world.connectors[unit_id].connector.store
    return Counter(str(e["batch_id"]) for e in store.audit_entries() if e["event"] == event)


def enqueue(world: GatewayWorld, ref: str, households: int, *, start: int = 0, staff: tuple[str, ...] = STAFF) -> int:
    """``GatewayWorld.commission`` with the exchange staff chosen by the caller."""
    return world.commission(ref, households, start, staff=staff)


def gateway_tls(world: GatewayWorld) -> ClientTls:
    cert, key = world.pki.files[GATEWAY]
    return ClientTls.from_files(cert, key, world.pki.ca_path)


def bring_up(world: GatewayWorld, unit_id: str, stack: ExitStack) -> RunningConnector:
    """The unit's connector is (re)installed: it enrols with the gateway again (new keys, fingerprints checked both
    ways), serves on a new port, and the gateway's configuration is updated to the new endpoint (as ``serve`` does
    at start: units table synchronised, a client for the unit). The gateway's outbox and the unit's health
    columns are untouched: the engine retries when the unit's backoff says so."""
    courier = world.engine.courier
    now = world.clock.now_ms()
    unit = (PartyKeys.create(unit_id, now_ms=now - 1), TrustStore())
    enrol((courier.me, courier.trust), unit, now)
    server_cert, server_key = world.pki.files[unit_id]
    store = ConnectorStore(make_engine(f"sqlite:///{world.pki.root / (unit_id + '.db')}"))
    connector = Connector(
        courier=Courier(unit[0], unit[1], replay=store.replay, clock=world.clock),
        store=store,
        adapter=SyntheticAdapter(world.population, UNITS[unit_id]),
        unit_category=UNITS[unit_id],
        calendar=WorkdayCalendar(),
        staff={GATEWAY: frozenset(STAFF)},
        rosters=world.staff.rosters(),
    )
    running = start(
        connector,
        listen="127.0.0.1:0",
        credentials=server_credentials(server_cert, server_key, world.pki.ca_path),
        worker_interval=None,
    )
    stack.callback(running.stop, None)
    endpoint = f"localhost:{running.port}"
    world.store.units.sync(
        (u.unit_id, u.category, endpoint if u.unit_id == unit_id else u.endpoint, u.exchange_mode, u.enabled)
        for u in world.store.units.all()
    )
    replace_client(world, unit_id, UnitClient(endpoint, gateway_tls(world), timeout_seconds=5), stack)
    world.connectors[unit_id] = running
    return running


def replace_client(world: GatewayWorld, unit_id: str, client: UnitClient, stack: ExitStack) -> None:
    clients = world.engine.clients
    assert isinstance(clients, dict)
    clients[unit_id] = client
    stack.callback(client.close)


def operator_config(root: Path, world: GatewayWorld, database_url: str | None) -> Path:
    """The gateway.toml of ``world`` as the operator's commands read it: its database and its units."""
    names = {TAX: "tax", LAND: "land", BANK: "financial_institution"}
    url = database_url or f"sqlite:///{root / 'gateway.db'}"
    units = "".join(
        f'[[units]]\nparty_id = "{u.unit_id}"\ncategory = "{names[u.unit_id]}"\nendpoint = "{u.endpoint}"\n\n'
        for u in world.store.units.all()
    )
    config = root / "gateway.toml"
    config.write_text(
        f'[agency]\nparty_id = "{GATEWAY}"\nregion_code = "220100"\nlevel = "city"\n\n'
        f"[keys]\nkeystore = {json.dumps(str(root / 'keystore.json'))}\n"
        f"passphrase_file = {json.dumps(str(root / 'passphrase'))}\n\n"
        f"[database]\nurl = {json.dumps(url)}\n\n{units}",
        encoding="utf-8",
    )
    return config
