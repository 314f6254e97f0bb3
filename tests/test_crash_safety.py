"""Crash safety and exactly-once effect (issue 4).

The gateway runs as a real process against three real connector processes and is killed with SIGKILL again and
again (during start-up on a fresh database, during batch formation, sending, receipt storage, polling, answer
storage and acknowledgement) and restarted each time; two connectors are killed and restarted on the way. In the end
every subject x unit item has exactly one stored answer (none lost, none doubled), every batch reached its unit
exactly once, and the answers stored are byte for byte the ones the units produced.

At every kill the test also looks at both sides' databases, which shows where the kill landed: a batch the unit
stored whose receipt the gateway had not stored yet, answers the unit had that the gateway had not stored, an
acknowledgement the unit recorded that the gateway had not. The next run repairs each of them.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hedui.v1 import exchange_pb2
from sqlalchemy import Engine, func, select

from common.db import make_engine
from connectors import store as cstore
from connectors.synthetic import Population
from demo.localnet import Network, build_network
from gateway.archive.audit import verify
from gateway.db import schema
from gateway.exchange.outbox import SubjectInput
from gateway.exchange.store import GatewayStore
from keys.keystore import FAST_FOR_TESTS
from tests.test_gateway_process import UNITS, enqueue_subjects

TAX, LAND, BANK = "unit.220100.tax", "unit.220100.land", "unit.220100.bank"
assert set(UNITS) == {TAX, LAND, BANK}
SEED = 20261127

#: The first commission, enqueued before the first kill of a running gateway.
FIRST_SUBJECTS = 1000
#: Commissions that arrive while the gateway keeps crashing: one at a fixed run (batches formed while those of the
#: first are in flight), and another whenever a kill found nothing left to do, so that kills keep landing in work
#: on a fast machine as on a slow one.
LATE_SUBJECTS = 250
LATE_COMMISSION_RUN = 9
BATCH_SIZE = 5
LEASE_SECONDS = 2.0

#: Kills of the very first starts, on a database that does not exist yet or whose creation was interrupted: so many
#: seconds after the process was spawned (imports, keystore) or after it logged the start of the initial migration
#: (which takes a few tens of milliseconds and must leave all of the schema or none).
FRESH_START_KILLS = (("spawn", 0.05), ("spawn", 0.4), ("migration", 0.0), ("migration", 0.008), ("migration", 0.016))
#: Kills of a running gateway: run i is killed delay(i) seconds after it serves (or, every fourth run, after it was
#: spawned, so that the kill may land in start-up: migration check, unit sync). At least MIN_RUNS runs, and on until
#: WORKING_KILLS of them landed while work was outstanding (at most MAX_RUNS).
MIN_RUNS = 24
WORKING_KILLS = 22
MAX_RUNS = 48
#: Runs during which a connector is killed and restarted while the gateway works.
CONNECTOR_KILLS = {6: LAND, 15: BANK}
#: Bound of the last, uninterrupted run.
FINISH_TIMEOUT = 120.0

WORKING_STATES = ("ready", "receipted", "answered")


def delay(run: int) -> float:
    """A deterministic, evenly spread sequence in [0.05, 1.5): golden-ratio steps, so neighbouring runs differ."""
    return 0.05 + 1.45 * ((run * 0.6180339887) % 1.0)


def from_spawn(run: int) -> bool:
    return run % 4 == 3


# -- the work --------------------------------------------------------------------------------------------------


def people(count: int, start: int) -> list[SubjectInput]:
    """At least ``count`` people from synthetic households ``start``, ``start + 1`` ... (whole households)."""
    found: list[SubjectInput] = []
    for household in Population(SEED).households(10 * count, start=start):
        for member in household.members:
            i = len(found)
            digest = hashlib.sha256(member.id_number.encode()).digest()
            found.append(SubjectInput(f"S-{start}-{i}", member.id_number, member.name, f"A-{start}-{i}", digest))
        if len(found) >= count:
            return found
    raise AssertionError("population too small")


# -- processes -------------------------------------------------------------------------------------------------


def log_tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def wait_serving(process: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 60.0) -> None:
    """Until ``port`` accepts connections; fails at once if the process exits instead (a restart that crashes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"process exited with {process.returncode} while starting:\n{log_tail(log)}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0 and sock.getsockname() != sock.getpeername():
                return
        time.sleep(0.02)
    raise AssertionError(f"nothing listens on port {port} after {timeout} s:\n{log_tail(log)}")


def wait_for_log(process: subprocess.Popen[bytes], log: Path, text: str, timeout: float = 60.0) -> None:
    """Until the process logged ``text`` (polled every millisecond, to kill it right after)."""
    deadline = time.monotonic() + timeout
    while text not in log_tail(log):
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no {text!r} in the log:\n{log_tail(log)}")
        time.sleep(0.001)


def sigkill(process: subprocess.Popen[bytes], log: Path) -> None:
    """SIGKILL a process of ours that must still be running (one that died by itself is a failure)."""
    if process.poll() is not None:
        raise AssertionError(f"process exited by itself with {process.returncode}:\n{log_tail(log)}")
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL


# -- looking at the databases ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """Both sides' state right after a kill."""

    schema: bool
    queued: int = 0
    states: tuple[tuple[str, int], ...] = ()
    answers: int = 0
    claimed: int = 0
    #: Batches stored by the unit (receipt signed) while the gateway had not stored the receipt yet: sent again.
    receipt_unstored: frozenset[str] = frozenset()
    #: Answered by the unit while the gateway had not stored the answers yet.
    answers_unstored: int = 0
    #: Acknowledged at the unit while the gateway had not recorded the acknowledgement yet.
    ack_unrecorded: int = 0

    def count(self, state: str) -> int:
        return dict(self.states).get(state, 0)

    def progress(self) -> tuple[int, int, int, int]:
        """Batches formed, batches past ready, answers stored, batches acknowledged: never goes back."""
        formed = sum(n for _, n in self.states)
        return formed, formed - self.count("ready"), self.answers, self.count("acknowledged")

    def key(self) -> tuple[object, ...]:
        return self.queued, self.states, self.answers

    def working(self) -> bool:
        """Work was outstanding: items not yet in a batch, or batches not yet acknowledged."""
        return self.queued > 0 or any(self.count(s) for s in WORKING_STATES)

    def phases(self) -> list[str]:
        if not self.schema:
            return ["startup (no schema yet)"]
        found = []
        if self.queued:
            found.append("forming")
        for state, phase in (("ready", "sending"), ("receipted", "polling"), ("answered", "acknowledging")):
            if self.count(state):
                found.append(phase)
        for n, name in (
            (self.claimed, "claims held"),
            (len(self.receipt_unstored), "receipt not stored"),
            (self.answers_unstored, "answers not stored"),
            (self.ack_unrecorded, "ack not recorded"),
        ):
            if n:
                found.append(f"{name}={n}")
        return found or ["idle"]


@dataclass
class Databases:
    """Read-only views of the gateway's and the connectors' SQLite files (engines made lazily: the gateway's
    file must not be created by us before the gateway migrates it)."""

    net: Network
    engines: dict[str, Engine] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.net.root / "data" / f"{name}.db"

    def engine(self, name: str) -> Engine:
        if name not in self.engines:
            self.engines[name] = make_engine(f"sqlite:///{self.path(name)}")
        return self.engines[name]

    def gateway(self) -> Engine:
        return self.engine("gateway")

    def connector_states(self) -> dict[str, str]:
        states: dict[str, str] = {}
        for unit in UNITS:
            with self.engine(unit).connect() as conn:
                states.update(
                    {
                        r.batch_id: r.state
                        for r in conn.execute(select(cstore.batches.c.batch_id, cstore.batches.c.state))
                    }
                )
        return states

    def snapshot(self) -> Snapshot:
        if not self.path("gateway").exists():
            return Snapshot(schema=False)
        # The units first: whatever they hold was formed by the gateway before (when the gateway is running).
        at_unit = self.connector_states()
        b, i, a = schema.batches, schema.items, schema.answers
        with self.gateway().connect() as conn:
            tables = {r[0] for r in conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "alembic_version" not in tables or not conn.exec_driver_sql("SELECT * FROM alembic_version").all():
                # The migration is one transaction: a kill leaves all of the schema or none of it.
                assert tables == set(), f"a kill left part of the schema: {sorted(tables)}"
                return Snapshot(schema=False)
            batches = conn.execute(select(b.c.batch_id, b.c.state, b.c.subject_count, b.c.claimed_by)).all()
            queued = conn.execute(select(func.count()).select_from(i).where(i.c.batch_id.is_(None))).scalar_one()
            in_batch = {r[0]: r[1] for r in conn.execute(select(i.c.batch_id, func.count()).group_by(i.c.batch_id))}
            answered = {r[0]: r[1] for r in conn.execute(select(a.c.batch_id, func.count()).group_by(a.c.batch_id))}
        for batch in batches:
            # Each step is one transaction: a batch has all its items from the moment it exists, and all or none
            # of its answers, together with its state.
            assert in_batch.get(batch.batch_id) == batch.subject_count, ("items of a batch", batch)
            expected = batch.subject_count if batch.state in ("answered", "acknowledged") else 0
            assert answered.get(batch.batch_id, 0) == expected, ("answers of a batch", batch)
        gateway_states = {r.batch_id: r.state for r in batches}
        assert set(at_unit) <= set(gateway_states), "a unit holds a batch the gateway never formed"
        return Snapshot(
            schema=True,
            queued=int(queued),
            states=tuple(sorted(Counter(gateway_states.values()).items())),
            answers=sum(answered.values()),
            claimed=sum(1 for r in batches if r.claimed_by is not None),
            receipt_unstored=frozenset(k for k, s in gateway_states.items() if s == "ready" and k in at_unit),
            answers_unstored=sum(
                1 for k, s in gateway_states.items() if s == "receipted" and at_unit.get(k) != "pending"
            ),
            ack_unrecorded=sum(
                1 for k, s in gateway_states.items() if s == "answered" and at_unit.get(k) == "acknowledged"
            ),
        )

    def dispose(self) -> None:
        for engine in self.engines.values():
            engine.dispose()


@contextmanager
def network(root: Path) -> Iterator[tuple[Network, Databases]]:
    net = build_network(
        root,
        UNITS,
        batch_size=BATCH_SIZE,
        dispatch_interval=0.2,
        poll_interval=0.3,
        answer_interval=0.2,
        base_backoff=0.2,
        max_backoff=1.0,
        # Claims of a killed gateway expire after this; the restarted one then takes those batches up again.
        lease_seconds=LEASE_SECONDS,
        kdf=FAST_FOR_TESTS,
    )
    dbs = Databases(net)
    try:
        yield net, dbs
    finally:
        dbs.dispose()
        net.stop_all()


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.25)
    return predicate()


# -- the test --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kill:
    run: str
    how: str
    snapshot: Snapshot
    notes: str = ""


@pytest.mark.slow
def test_gateway_killed_at_many_points_stores_every_answer_exactly_once(tmp_path: Path) -> None:
    started = time.monotonic()
    kills: list[Kill] = []
    logs = tmp_path / "net" / "logs"
    with network(tmp_path / "net") as (net, dbs):
        connectors = net.start_connectors()

        def restart_gateway(name: str, *, wait: bool) -> subprocess.Popen[bytes]:
            process = net.start_gateway(f"{name}.log", wait=False)
            if wait:
                wait_serving(process, net.gateway_port, logs / f"{name}.log")
            return process

        # 1. The first start, killed before or while it creates the schema: a later start must still come up.
        for n, (trigger, seconds) in enumerate(FRESH_START_KILLS):
            name = f"gateway-fresh-{n}"
            after = "spawn" if dbs.snapshot().schema else trigger  # no migration to wait for once committed
            process = restart_gateway(name, wait=False)
            if after == "migration":
                wait_for_log(process, logs / f"{name}.log", "Running upgrade")
            time.sleep(seconds)
            sigkill(process, logs / f"{name}.log")
            snapshot = dbs.snapshot()
            # Alembic logs each migration as it starts: with no schema committed, the kill hit the migration.
            migrating = "Running upgrade" in log_tail(logs / f"{name}.log") and not snapshot.schema
            kills.append(
                Kill(name, f"{seconds:.3f} s after {after}", snapshot, "in the migration" if migrating else "")
            )

        # 2. Work arrives; the gateway is killed while it forms, sends, polls and acknowledges, and restarted.
        store: GatewayStore | None = None
        subjects = 0
        run = 0
        while run < MAX_RUNS and (run < MIN_RUNS or sum(k.snapshot.working() for k in kills) < WORKING_KILLS):
            name = f"gateway-{run:02d}"
            notes = []
            process = restart_gateway(name, wait=not from_spawn(run))
            if store is None:
                wait_serving(process, net.gateway_port, logs / f"{name}.log")
                store = GatewayStore(dbs.gateway())
                subjects += enqueue_subjects(store, "CS-0", people(FIRST_SUBJECTS, start=0))
                notes.append(f"enqueued {subjects} subjects")
            elif run == LATE_COMMISSION_RUN or not kills[-1].snapshot.working():
                added = enqueue_subjects(store, f"CS-{run}", people(LATE_SUBJECTS, start=1000 * run))
                subjects += added
                notes.append(f"enqueued {added} subjects")
            seconds = delay(run)
            if run in CONNECTOR_KILLS:
                unit = CONNECTOR_KILLS[run]
                time.sleep(seconds / 2)
                sigkill(connectors[unit], logs / f"{unit}.log")
                connectors.update(net.start_connectors(only=[unit]))
                notes.append(f"killed and restarted connector {unit}")
                time.sleep(seconds / 2)
            else:
                time.sleep(seconds)
            sigkill(process, logs / f"{name}.log")
            how = f"{seconds:.2f} s after {'spawn' if from_spawn(run) else 'serving'}"
            kills.append(Kill(name, how, dbs.snapshot(), "; ".join(notes)))
            run += 1
        assert store is not None

        # 3. One last start, left alone until everything is answered and acknowledged.
        final = restart_gateway("gateway-final", wait=True)
        items = store.outbox.item_count()

        def finished() -> bool:
            snap = dbs.snapshot()
            return snap.answers == items and snap.count("acknowledged") == sum(n for _, n in snap.states)

        done = wait_until(finished, FINISH_TIMEOUT)
        last = dbs.snapshot()
        report(kills, last, time.monotonic() - started)
        assert done, (f"not finished after {FINISH_TIMEOUT} s", last, log_tail(logs / "gateway-final.log"))
        dbs.dispose()
        net.stop_all()
        assert final.returncode == 0, log_tail(logs / "gateway-final.log")
        assert all(p.returncode == 0 for p in connectors.values())

        assert items == len(UNITS) * subjects and subjects >= FIRST_SUBJECTS >= 1000
        assert_exactly_once(dbs, items)
        assert_kills_spread(kills)
        resent = frozenset().union(*(k.snapshot.receipt_unstored for k in kills))
        print(f"{len(resent)} batches were sent again after a kill between the unit's receipt and the gateway's")


def assert_kills_spread(kills: Sequence[Kill]) -> None:
    """Enough kills, while work was outstanding, at different points; progress never went back."""
    assert len(kills) >= 20
    working = [k for k in kills if k.snapshot.schema and k.snapshot.working()]
    assert len(working) >= WORKING_KILLS, f"only {len(working)} kills while work was outstanding"
    assert len({k.snapshot.key() for k in working}) >= 10, "kills did not land at enough different points"
    progress = [k.snapshot.progress() for k in kills if k.snapshot.schema]
    for before, after in itertools.pairwise(progress):
        assert all(b <= a for b, a in zip(before, after, strict=True)), ("progress went back", before, after)
    assert progress[0] < progress[-1]
    for state in ("ready", "receipted"):
        assert any(k.snapshot.count(state) for k in kills), f"no kill while batches were {state}"
    # The narrow window that matters most: the unit stored the batch, the gateway died before storing the receipt.
    assert any(k.snapshot.receipt_unstored for k in kills), "no kill between a unit's receipt and the gateway's"


def assert_chain_matches_the_batches(dbs: Databases, batch_ids: set[str]) -> None:
    """The audit chain and the batch states never diverged (each event is written in the state change's
    transaction): every batch receipted and answered exactly once in the chain, every envelope it sent archived with
    its entry, and the chain intact."""
    engine = dbs.gateway()
    assert verify(engine) == []
    with engine.connect() as conn:
        entries = conn.execute(select(schema.audit_log.c.action, schema.audit_log.c.detail)).all()
        sent = conn.execute(
            select(func.count())
            .select_from(schema.archive)
            .where(schema.archive.c.direction == "out", schema.archive.c.message_type == "hedui.v1.QueryBatch")
        ).scalar_one()  # the trust synchronisation's envelopes are archived too (trust.sent)
    for action in ("batch.receipted", "batch.answered"):
        counted = Counter(e.detail.split(";")[0].removeprefix("batch=") for e in entries if e.action == action)
        assert counted == dict.fromkeys(batch_ids, 1), f"'{action}' is not in the chain once per batch"
    assert sent == sum(e.action == "batch.sent" for e in entries) >= len(batch_ids)


def assert_exactly_once(dbs: Databases, items: int) -> None:
    b, i, a = schema.batches, schema.items, schema.answers
    with dbs.gateway().connect() as conn:
        assert conn.execute(select(func.count()).select_from(a)).scalar_one() == items
        unanswered = conn.execute(
            select(i.c.id).select_from(i.outerjoin(a, a.c.item_id == i.c.id)).where(a.c.item_id.is_(None))
        )
        assert unanswered.all() == [], "items without an answer"
        doubled = conn.execute(select(a.c.item_id).group_by(a.c.item_id).having(func.count() > 1)).all()
        assert doubled == [], "items with more than one answer"
        misfiled = conn.execute(
            select(func.count()).select_from(a.join(i, i.c.id == a.c.item_id)).where(a.c.batch_id != i.c.batch_id)
        ).scalar_one()
        assert misfiled == 0, "answers stored under a batch their item is not in"
        assert conn.execute(select(func.count()).select_from(i).where(i.c.batch_id.is_(None))).scalar_one() == 0
        gateway_batches = conn.execute(
            select(b.c.batch_id, b.c.unit_id, b.c.state, b.c.subject_count, b.c.received_at_ms, b.c.original_due)
        ).all()
        per_batch = {r[0]: r[1] for r in conn.execute(select(i.c.batch_id, func.count()).group_by(i.c.batch_id))}
        bodies = {r.item_id: r.body for r in conn.execute(select(a.c.item_id, a.c.body))}
    assert {r.state for r in gateway_batches} == {"acknowledged"}
    assert sum(r.subject_count for r in gateway_batches) == items
    assert_chain_matches_the_batches(dbs, {r.batch_id for r in gateway_batches})
    assert all(per_batch[r.batch_id] == r.subject_count for r in gateway_batches), "an item in two batches"

    compared = 0
    for unit in UNITS:
        mine = {r.batch_id for r in gateway_batches if r.unit_id == unit}
        with dbs.engine(unit).connect() as conn:
            c, ans = cstore.batches.c, cstore.batch_answers
            rows = conn.execute(
                select(c.batch_id, c.state, ans.c.answer, c.received_at_ms, c.original_due).outerjoin_from(
                    cstore.batches, ans, ans.c.batch_id == c.batch_id
                )
            ).all()
            audit = conn.execute(select(cstore.audit.c.event, cstore.audit.c.batch_id, cstore.audit.c.reason)).all()
        assert len(rows) == len({r.batch_id for r in rows}) == len(mine)
        assert {r.batch_id for r in rows} == mine, f"{unit} holds other batches than the gateway sent it"
        assert {r.state for r in rows} == {"acknowledged"}
        # A batch sent again (same id, same content) got the unit's first receipt again: same time, same due date.
        receipts = {(r.batch_id, r.received_at_ms, r.original_due) for r in rows}
        assert receipts == {
            (r.batch_id, r.received_at_ms, r.original_due) for r in gateway_batches if r.unit_id == unit
        }
        for event in ("accepted", "answered", "acknowledged"):
            counted = Counter(e.batch_id for e in audit if e.event == event)
            assert counted == dict.fromkeys(mine, 1), f"{unit}: '{event}' is not in the audit once per batch"
        refusals = [(e.batch_id, e.reason) for e in audit if e.event == "refused"]
        assert refusals == [], f"{unit} refused requests: {refusals}"
        for row in rows:
            answer = exchange_pb2.BatchAnswer.FromString(row.answer)
            for subject in answer.subjects:
                # What the gateway stored is byte for byte what the unit answered.
                assert bodies[int(subject.subject_ref)] == subject.SerializeToString(deterministic=True)
                compared += 1
    assert compared == items


def report(kills: Sequence[Kill], last: Snapshot, elapsed: float) -> None:
    print(f"\n{len(kills)} gateway kills, finished in {elapsed:.1f} s; final: {last}")
    print(
        f"{'run':18} {'kill':24} {'queued':>6} {'ready':>5} {'rcpt':>5} {'answ':>5} {'ackd':>5} {'answers':>7}  where"
    )
    for k in kills:
        s = k.snapshot
        print(
            f"{k.run:18} {k.how:24} {s.queued:6} {s.count('ready'):5} {s.count('receipted'):5} "
            f"{s.count('answered'):5} {s.count('acknowledged'):5} {s.answers:7}  {', '.join(s.phases())}"
            + (f"  [{k.notes}]" if k.notes else "")
        )
