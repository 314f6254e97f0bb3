"""Several gateway replicas on one database (PostgreSQL in production; SQLite, which serialises writers, too): job
leases, concurrent enqueueing, and two engines working one outbox against the same connectors without sending a
batch twice or storing an answer twice."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from hedui.v1 import exchange_pb2
from sqlalchemy import Engine, func, select

from common.categories import UNIT_DATA
from common.db import make_engine
from common.workdays import WorkdayCalendar
from connectors.synthetic import Population
from gateway.db import schema
from gateway.db.database import upgrade
from gateway.exchange.engine import CycleReport, ExchangeEngine, UnitWorkers
from gateway.exchange.outbox import CommissionInput, SubjectInput
from gateway.exchange.store import GatewayStore
from gateway.exchange.transport import UnitClient
from keys.envelope import Courier
from tests.exchange_world import GATEWAY, SEED, beijing_ms
from tests.gateway_drive import (
    BANK,
    LAND,
    TAX,
    assert_exactly_one_answer_per_item,
    audit_batches,
    batch_rows,
    drain,
    gateway_tls,
)
from tests.gateway_world import (
    UNITS,
    GatewayWorld,
    commission_input,
    gateway_settings,
    gateway_world,
    subjects_of,
)

MONDAY = beijing_ms(2026, 3, 2)
LEASE_MS = 60_000
T = TypeVar("T")
Submit = Callable[[bytes, str | None], bytes]


def _url(tmp_path: Path, database_url: str | None) -> str:
    return database_url or f"sqlite:///{tmp_path / 'gateway.db'}"


def _stores(url: str, count: int, stack: ExitStack) -> list[GatewayStore]:
    """``count`` replicas' stores on one migrated database, each with its own engine (connection pool)."""
    stores = []
    for index in range(count):
        engine = make_engine(url)
        stack.callback(engine.dispose)
        if index == 0:
            upgrade(engine)
        stores.append(GatewayStore(engine))
    return stores


def _together(count: int, work: Callable[[int], T]) -> list[T]:
    """``work(0) … work(count - 1)`` in threads released at the same moment."""
    barrier = threading.Barrier(count)

    def run(index: int) -> T:
        barrier.wait()
        return work(index)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


# -- job leases ------------------------------------------------------------------------------------------------------


def test_a_job_lease_excludes_other_replicas(tmp_path: Path, database_url: str | None) -> None:
    with ExitStack() as stack:
        a, b = _stores(_url(tmp_path, database_url), 2, stack)
        now = MONDAY
        assert a.jobs.acquire("dispatch", "A", now, LEASE_MS)
        assert not b.jobs.acquire("dispatch", "B", now + 1, LEASE_MS)
        assert b.jobs.acquire("sweep", "B", now + 1, LEASE_MS)  # one lease per job
        assert a.jobs.acquire("dispatch", "A", now + 2, LEASE_MS)  # the holder renews ...
        assert not b.jobs.acquire("dispatch", "B", now + 2 + LEASE_MS, LEASE_MS)  # ... until now + 2 + lease
        a.jobs.release("dispatch", "A", now + 3, ok=True)
        assert b.jobs.acquire("dispatch", "B", now + 4, LEASE_MS)  # released: another replica may take it at once
        assert not a.jobs.acquire("dispatch", "A", now + 5, LEASE_MS)
        # B dies holding the lease: A takes over only once it has expired, and B's late release changes nothing.
        assert not a.jobs.acquire("dispatch", "A", now + 4 + LEASE_MS, LEASE_MS)
        assert a.jobs.acquire("dispatch", "A", now + 5 + LEASE_MS, LEASE_MS)
        b.jobs.release("dispatch", "B", now + 6 + LEASE_MS, ok=True)
        assert not b.jobs.acquire("dispatch", "B", now + 7 + LEASE_MS, LEASE_MS)
        a.jobs.release("dispatch", "A", now + 8 + LEASE_MS, ok=False)
        with a.engine.connect() as conn:
            job = conn.execute(select(schema.jobs).where(schema.jobs.c.name == "dispatch")).one()
        assert (job.lease_owner, job.lease_until_ms, job.runs, job.failures) == (None, 0, 4, 1)
        assert (job.last_status, job.last_started_ms, job.last_finished_ms) == (
            "failed",
            now + 5 + LEASE_MS,
            now + 8 + LEASE_MS,
        )


def test_one_replica_wins_a_contended_lease(tmp_path: Path, database_url: str | None) -> None:
    """Eight replicas ask for the same free (then expired) lease at the same moment: exactly one gets it."""
    with ExitStack() as stack:
        stores = _stores(_url(tmp_path, database_url), 8, stack)
        for round_ in range(4):
            now = MONDAY + round_ * (LEASE_MS + 1)

            def acquire(index: int, now: int = now) -> bool:
                return stores[index].jobs.acquire("sweep", f"replica-{index}", now, LEASE_MS)

            won = _together(8, acquire)
            assert won.count(True) == 1, won


# -- enqueueing from several replicas ----------------------------------------------------------------------------


def _subjects(ref: str, households: int, start: int) -> list[SubjectInput]:
    return subjects_of(Population(SEED), ref, households, start)


def _commission(ref: str) -> CommissionInput:
    return commission_input(ref)


def test_replicas_enqueue_at_the_same_time(tmp_path: Path, database_url: str | None) -> None:
    """Agency API calls reach two replicas at once: different commissions are all stored with their own subjects,
    and the same commission sent to both is stored once (enqueue is idempotent per ref, also concurrently)."""
    with ExitStack() as stack:
        stores = _stores(_url(tmp_path, database_url), 2, stack)
        stores[0].units.sync((unit_id, category, "localhost:1", "system", True) for unit_id, category in UNITS.items())
        refs = ["WT-A", "WT-B", "WT-C", "WT-A"]
        given = {ref: _subjects(ref, 30, start=10 * n) for n, ref in enumerate(dict.fromkeys(refs))}
        ids = _together(
            len(refs),
            lambda i: stores[i % 2].outbox.enqueue(
                _commission(refs[i]), given[refs[i]], list(UNITS), MONDAY, gateway=GATEWAY
            ),
        )
        assert ids[0] == ids[3] and len(set(ids)) == 3
        by_commission = _subject_refs_by_commission(stores[0].engine)
        for ref, commission_id in zip(refs, ids, strict=True):
            stored = by_commission[commission_id]
            assert stored == sorted(s.subject_ref for s in given[ref])
        assert stores[0].outbox.item_count() == len(UNITS) * sum(len(s) for s in given.values())


def _subject_refs_by_commission(engine: Engine) -> dict[int, list[str]]:
    """commission id -> its subjects' refs, from rows whose items all point at subjects of the same commission."""
    with engine.connect() as conn:
        subjects = conn.execute(
            select(schema.subjects.c.id, schema.subjects.c.commission_id, schema.subjects.c.subject_ref)
        ).all()
        items = conn.execute(select(schema.items.c.subject_id, schema.items.c.commission_id)).all()
    owner = {s.id: s.commission_id for s in subjects}
    assert all(owner[i.subject_id] == i.commission_id for i in items)
    result: dict[int, list[str]] = {}
    for s in subjects:
        result.setdefault(s.commission_id, []).append(s.subject_ref)
    return {k: sorted(v) for k, v in result.items()}


# -- two engines, one outbox ------------------------------------------------------------------------------------


@dataclass
class Replica:
    engine: ExchangeEngine
    workers: UnitWorkers


def _second_replica(world: GatewayWorld, url: str, name: str, stack: ExitStack) -> Replica:
    """Another gateway process on the same database: the same party keys (one keystore), its own connection pool,
    replay cache view, channels to the units and worker pool."""
    engine = make_engine(url)
    stack.callback(engine.dispose)
    store = GatewayStore(engine)
    courier = Courier(world.engine.courier.me, world.engine.courier.trust, replay=store.replay, clock=world.clock)
    tls = gateway_tls(world)
    clients = {u.unit_id: UnitClient(u.endpoint, tls, timeout_seconds=5) for u in store.units.all()}
    for client in clients.values():
        stack.callback(client.close)
    exchange = ExchangeEngine(store, courier, clients, WorkdayCalendar(), replace(world.engine.settings, replica=name))
    workers = UnitWorkers(exchange)
    stack.callback(workers.shutdown)
    return Replica(exchange, workers)


def _count_submissions(world: GatewayWorld) -> Counter[str]:
    """Count SubmitBatch calls reaching each real connector (a counting wrapper around its ``submit``)."""
    calls: Counter[str] = Counter()
    lock = threading.Lock()
    for unit_id, running in world.connectors.items():
        original = running.connector.submit

        def counted(data: bytes, tls_party: str | None, unit_id: str = unit_id, original: Submit = original) -> bytes:
            with lock:
                calls[unit_id] += 1
            return original(data, tls_party)

        setattr(running.connector, "submit", counted)  # noqa: B010
    return calls


def test_two_replicas_send_every_batch_once(tmp_path: Path, database_url: str | None) -> None:
    url = _url(tmp_path, database_url)
    # At most 4 sends per unit and cycle: each round leaves ready batches for the replica that comes second, so
    # both replicas always take part whatever the thread timing.
    settings = gateway_settings(replica="replica-1", batch_size=10, sends_per_cycle=4)
    with ExitStack() as stack:
        world = stack.enter_context(gateway_world(tmp_path, now_ms=MONDAY, database_url=url, settings=settings))
        second = _second_replica(world, url, "replica-2", stack)
        submissions = _count_submissions(world)
        commission_id = world.commission("WT-R", households=110)
        subjects = world.store.outbox.item_count() // len(UNITS)
        assert subjects >= 300
        replicas = [world.workers, second.workers]
        sent: Counter[int] = Counter()
        for _ in range(30):
            reports: list[list[CycleReport]] = _together(2, lambda i: replicas[i].run_once(dispatch=True))
            for index, done in enumerate(reports):
                sent[index] += sum(r.sent for r in done)
                assert not [r.error for r in done if r.error], reports
            if (
                not drain(world)
                and all(b.state == "acknowledged" for b in batch_rows(world))
                and not any(r.formed or r.sent or r.answered or r.acknowledged for done in reports for r in done)
            ):
                break
        batches = batch_rows(world)
        assert len(batches) == sum(-(-subjects // 10) for _ in UNITS)  # ceil(subjects / batch size) per unit
        assert {(b.state, b.attempts) for b in batches} == {("acknowledged", 1)}
        assert sum(sent.values()) == len(batches) and min(sent.values()) > 0, sent
        for unit_id in UNITS:
            mine = {b.batch_id for b in batches if b.unit_id == unit_id}
            assert audit_batches(world, unit_id, "accepted") == dict.fromkeys(mine, 1)
            assert submissions[unit_id] == len(mine)
        with world.store.engine.connect() as conn:
            per_batch: dict[str, int] = {
                r.batch_id: r.n
                for r in conn.execute(
                    select(schema.items.c.batch_id, func.count().label("n")).group_by(schema.items.c.batch_id)
                )
            }
        assert per_batch == {b.batch_id: b.subject_count for b in batches}
        assert_exactly_one_answer_per_item(world)
        assert {k for stages in world.store.outbox.progress(commission_id).values() for k in stages} == {"answered"}


def test_a_dead_replicas_claim_expires(tmp_path: Path, database_url: str | None) -> None:
    """Replica 1 claims a batch, sends it, and dies before recording the receipt. Replica 2 leaves the batch alone
    while the claim's lease runs, then sends it again: the unit answers with the receipt of the first delivery,
    so the clause-12 clock runs from then, and the unit holds the batch once."""
    url = _url(tmp_path, database_url)
    with ExitStack() as stack:
        world = stack.enter_context(gateway_world(tmp_path, now_ms=MONDAY, database_url=url))
        second = _second_replica(world, url, "replica-2", stack)
        commission_id = world.commission("WT-1", households=10)
        first = world.engine
        for unit in world.store.units.all():
            first.store.outbox.form_batches(unit.unit_id, frozenset(UNIT_DATA[unit.category]), 50, MONDAY)
        (work,) = first.store.batches.claim(
            TAX, "ready", replica=first.settings.replica, now_ms=MONDAY, lease_ms=first.settings.lease_ms, limit=1
        )
        query = exchange_pb2.QueryBatch.FromString(work.content)
        first.clients[TAX].submit(first.courier.seal(query, TAX))  # delivered; replica 1 is gone now

        world.clock.advance(first.settings.lease_ms - 1)
        second.workers.run_once(dispatch=True)
        states = {b.unit_id: (b.state, b.claimed_by) for b in batch_rows(world)}
        assert states == {TAX: ("ready", "test-1"), LAND: ("receipted", None), BANK: ("receipted", None)}
        world.clock.advance(2)  # the lease has run out
        second.workers.run_once(dispatch=True)
        drain(world)
        for _ in range(3):
            second.workers.run_once(dispatch=True)
        tax = next(b for b in batch_rows(world) if b.unit_id == TAX)
        assert (tax.state, tax.attempts, tax.received_at_ms) == ("acknowledged", 1, MONDAY)
        assert audit_batches(world, TAX, "accepted") == {tax.batch_id: 1}
        assert_exactly_one_answer_per_item(world)
        assert {k for stages in world.store.outbox.progress(commission_id).values() for k in stages} == {"answered"}
