"""hedui-gateway and hedui-connector as processes, from the files an operator would have: config, keystore,
certificates. A commission goes in; every item comes back answered."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path

from hedui.v1 import exchange_pb2, records_pb2

from common.db import make_engine
from connectors.synthetic import Population
from demo.localnet import STAFF, build_network
from gateway.exchange.outbox import CommissionInput, SubjectInput
from gateway.exchange.store import GatewayStore
from gateway.procedure.routing import route

#: build_network's gateway party id.
NETWORK_GATEWAY = "agency.220100"
UNITS = {"unit.220100.tax": "tax", "unit.220100.land": "land", "unit.220100.bank": "financial_institution"}
CATEGORIES = (records_pb2.DATA_CATEGORY_TAX, records_pb2.DATA_CATEGORY_REAL_ESTATE, records_pb2.DATA_CATEGORY_LOANS)


def enqueue(store: GatewayStore, ref: str, households: int, seed: int) -> int:
    """Enqueue the members of ``households`` synthetic households; returns the number of items."""
    people = [m for h in Population(seed).households(households) for m in h.members]
    subjects = [
        SubjectInput(f"{ref}-{i}", m.id_number, m.name, f"A-{i}", hashlib.sha256(m.id_number.encode()).digest())
        for i, m in enumerate(people)
    ]
    return enqueue_subjects(store, ref, subjects) * len(UNITS)


def enqueue_subjects(store: GatewayStore, ref: str, subjects: Sequence[SubjectInput]) -> int:
    """Enqueue ``subjects`` as commission ``ref`` over CATEGORIES, dated by the wall clock the processes run on;
    returns the number of subjects."""
    commission = CommissionInput(
        ref=ref,
        purpose=exchange_pb2.PROGRAMME_MINIMUM_LIVING_ALLOWANCE,
        income_from=(2026, 1),
        income_to=(2026, 10),
        assets_as_of=date(2026, 10, 31),
        staff_ids=STAFF,
        categories=CATEGORIES,
    )
    now = int(time.time() * 1000)
    # No approvals: the loopback network's units judge them by the migration rule (demo/localnet.py).
    store.outbox.enqueue(commission, subjects, route(CATEGORIES, store.units.all()), now, gateway=NETWORK_GATEWAY)
    return len(subjects)


def wait_until(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.2)
    return False


def test_gateway_and_connectors_as_processes_answer_every_item(tmp_path: Path) -> None:
    net = build_network(tmp_path / "net", UNITS, batch_size=100)
    try:
        net.start_connectors()
        net.start_gateway()
        store = GatewayStore(make_engine(f"sqlite:///{tmp_path / 'net' / 'data' / 'gateway.db'}"))
        assert wait_until(lambda: len(store.units.all()) == len(UNITS), 30), "gateway did not start"
        items = enqueue(store, "WT-P-1", 60, seed=20261127)
        assert wait_until(lambda: store.batches.answer_count() == items, 60), (store.batches.answer_count(), items)
        assert store.outbox.item_count() == items
    finally:
        net.stop_all()
    assert all(p.returncode == 0 for p in net.processes) or not net.processes
