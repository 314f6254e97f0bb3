"""The gateway's exchange engine against real connectors over mutual TLS, on SQLite and PostgreSQL: exactly one
answer per item, answers fetched twice, clause-12 due dates, delay notices and overdue items."""

from __future__ import annotations

from concurrent.futures import Future
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from hedui.v1 import exchange_pb2
from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError

from common.categories import UNIT_DATA
from connectors import store as cstore
from gateway.archive.messages import Envelope
from gateway.db import schema
from gateway.exchange.engine import CycleReport, UnitWorkers
from gateway.exchange.schedule import GatewayScheduler, JobIntervals, SchedulePolicy
from gateway.exchange.store import GatewayStore
from tests.exchange_world import beijing_ms
from tests.gateway_drive import (
    BANK,
    LAND,
    TAX,
    answers_by_item,
    assert_exactly_one_answer_per_item,
    audit_batches,
    batch_rows,
    drain,
    execute,
    rows,
    settle,
)
from tests.gateway_world import UNITS, GatewayWorld, gateway_settings, gateway_world

MONDAY = beijing_ms(2026, 3, 2)
#: 7 working days after Monday 2 March 2026, and the latest a delay notice may move it to (5 more working days).
DUE = date(2026, 3, 11)
LATEST = date(2026, 3, 18)


def test_every_item_gets_exactly_one_answer(tmp_path: Path, database_url: str | None) -> None:
    with gateway_world(tmp_path, now_ms=MONDAY, database_url=database_url) as world:
        commission_id = world.commission("WT-1", households=40)
        items = world.store.outbox.item_count()
        assert items > 0 and items % len(UNITS) == 0
        settle(world)
        assert world.store.batches.answer_count() == items
        assert_exactly_one_answer_per_item(world)
        progress = world.store.outbox.progress(commission_id)
        assert set(progress) == set(UNITS)
        assert all(set(stages) == {"answered"} for stages in progress.values())
        batches = batch_rows(world)
        assert {b.state for b in batches} == {"acknowledged"}
        assert {b.attempts for b in batches} == {1}
        for unit_id in UNITS:
            mine = {b.batch_id for b in batches if b.unit_id == unit_id}
            assert audit_batches(world, unit_id, "accepted") == dict.fromkeys(mine, 1)
            assert audit_batches(world, unit_id, "acknowledged") == dict.fromkeys(mine, 1)


def test_answers_fetched_twice_are_stored_once(tmp_path: Path, database_url: str | None) -> None:
    """The same answers fetched a second time (a replica whose poll outlived its claim, a database restored from
    before the answers were recorded; simulated by putting every batch back to "receipted"): the poll stores
    nothing new, rewrites nothing, and the primary key refuses a second answer for an item outright."""
    with gateway_world(tmp_path, now_ms=MONDAY, database_url=database_url) as world:
        world.commission("WT-1", households=40)
        settle(world)
        first = answers_by_item(world)
        assert len(first) == world.store.outbox.item_count()
        execute(
            world,
            update(schema.batches).values(
                state="receipted", next_poll_ms=0, answered_at_ms=None, acknowledged_at_ms=None
            ),
        )
        world.clock.advance(60_000)
        reports = world.workers.run_once(dispatch=True)
        assert sum(r.answered for r in reports) == len(batch_rows(world))
        assert sum(r.answers_stored for r in reports) == 0
        assert answers_by_item(world) == first  # same bodies, same stored time: nothing rewritten
        assert {b.state for b in batch_rows(world)} == {"acknowledged"}
        assert_exactly_one_answer_per_item(world)
        # Storing the same answers directly: ignored too, and the table refuses a second row for an item.
        some = batch_rows(world)[0]
        body = rows(world, select(schema.answers.c.body).where(schema.answers.c.batch_id == some.batch_id))
        again = [exchange_pb2.SubjectAnswer.FromString(r.body) for r in body]
        assert (
            world.store.batches.store_answers(some.batch_id, again, kept_answer_set(world, some), world.clock.now_ms())
            == 0
        )
        item_id, (batch_id, status, answer, _) = next(iter(first.items()))
        with pytest.raises(IntegrityError), world.store.engine.begin() as conn:
            conn.execute(
                insert(schema.answers).values(
                    item_id=item_id, batch_id=batch_id, status=status, body=answer, stored_at_ms=0
                )
            )
        assert world.store.batches.answer_count() == len(first)


def kept_answer_set(world: GatewayWorld, batch: Row[Any]) -> Envelope:
    """The archived answer set that answered ``batch``, as the engine hands it to the ledger."""
    kept = rows(world, select(schema.archive).where(schema.archive.c.message_id == batch.answer_message_id))[0]
    return Envelope(bytes(kept.message_id), kept.sender, kept.message_type, bytes(kept.envelope))


def test_crash_between_storing_and_acknowledging(tmp_path: Path, database_url: str | None) -> None:
    """Answers stored, acknowledgement never sent (the process died): a restarted gateway on the same database
    acknowledges them, and the connector records exactly one acknowledgement per batch."""
    with gateway_world(tmp_path, now_ms=MONDAY, database_url=database_url) as world:
        world.commission("WT-1", households=40)
        world.workers.run_once(dispatch=True)
        drain(world)
        engine = world.engine
        for unit in world.store.units.all():
            engine.answers.poll(unit.unit_id, engine.clients[unit.unit_id])
        assert {b.state for b in batch_rows(world)} == {"answered"}
        assert world.store.batches.answer_count() == world.store.outbox.item_count()
        for unit_id in UNITS:
            assert not audit_batches(world, unit_id, "acknowledged")
        # "Restart": a fresh store object on the same database, then the usual cycles.
        world.engine.store = GatewayStore(world.store.engine)
        reports = world.workers.run_once(dispatch=True)
        assert sum(r.answers_stored for r in reports) == 0
        assert sum(r.acknowledged for r in reports) == len(batch_rows(world))
        assert {b.state for b in batch_rows(world)} == {"acknowledged"}
        for unit_id in UNITS:
            assert set(audit_batches(world, unit_id, "acknowledged").values()) == {1}
        assert_exactly_one_answer_per_item(world)


def test_more_answered_batches_than_one_call_may_name(tmp_path: Path, database_url: str | None) -> None:
    """Over 100 batches answered at once: fetched and acknowledged in calls of at most 100 ids each (the
    connector refuses larger ones), whatever fetch_group says."""
    settings = gateway_settings(batch_size=1, fetch_group=40, sends_per_cycle=200)
    down = frozenset({LAND, BANK})
    with gateway_world(tmp_path, now_ms=MONDAY, database_url=database_url, settings=settings, down=down) as world:
        world.commission("WT-1", households=36)  # 104 people
        world.workers.run_once(dispatch=True)
        tax = [b for b in batch_rows(world) if b.unit_id == TAX]
        assert len(tax) > 100 and {b.state for b in tax} == {"receipted"}
        drain(world)
        (report,) = [r for r in world.workers.run_once(dispatch=True) if r.unit_id == TAX]
        assert (report.error, report.answered, report.acknowledged) == (None, len(tax), len(tax))
        assert {b.state for b in batch_rows(world) if b.unit_id == TAX} == {"acknowledged"}
        assert audit_batches(world, TAX, "acknowledged") == {b.batch_id: 1 for b in tax}
        assert not [e for e in world.connectors[TAX].connector.store.audit_entries() if e["event"] == "refused"]


def _due_and_reason(batches: list[Row[Any]]) -> dict[str, tuple[date, date, str | None, bool]]:
    return {b.unit_id: (b.original_due, b.due, b.delay_reason, bool(b.overdue)) for b in batches}


def _everywhere(stage: str) -> dict[str, set[str]]:
    return {unit_id: {stage} for unit_id in UNITS}


def _stages(progress: dict[str, dict[str, int]]) -> dict[str, set[str]]:
    return {unit_id: set(stages) for unit_id, stages in progress.items()}


def test_overdue_items_stay_visible_until_answered(tmp_path: Path, database_url: str | None) -> None:
    with gateway_world(tmp_path, now_ms=MONDAY, database_url=database_url) as world:
        commission_id = world.commission("WT-1", households=10)
        world.workers.run_once(dispatch=True)  # sent and receipted; the connectors have not answered
        batches = batch_rows(world)
        assert len(batches) == len(UNITS)  # 10 households fit one batch per unit
        assert {b.state for b in batches} == {"receipted"}
        assert {(b.original_due, b.due) for b in batches} == {(DUE, DUE)}
        assert {b.received_at_ms for b in batches} == {MONDAY}
        assert world.engine.sweep_deadlines() == {}
        world.clock.set(beijing_ms(2026, 3, 11, 23))  # the due date itself is still in time
        world.workers.run_once(dispatch=True)
        assert world.engine.sweep_deadlines() == {}
        assert _stages(world.store.outbox.progress(commission_id)) == _everywhere("receipted")

        world.clock.set(beijing_ms(2026, 3, 12, 9))
        world.workers.run_once(dispatch=True)
        per_unit = {b.unit_id: b.subject_count for b in batches}
        assert world.engine.sweep_deadlines() == per_unit
        assert world.engine.sweep_deadlines() == per_unit  # stays overdue, counted again
        progress = world.store.outbox.progress(commission_id)
        assert progress == {u: {"overdue": n} for u, n in per_unit.items()}

        # Only the tax office answers (late): its items are answered, the others stay overdue and visible.
        world.connectors[TAX].connector.answer_pending()
        world.workers.run_once(dispatch=True)
        assert world.engine.sweep_deadlines() == {u: n for u, n in per_unit.items() if u != TAX}
        progress = world.store.outbox.progress(commission_id)
        assert progress[TAX] == {"answered": per_unit[TAX]}
        assert progress[LAND] == {"overdue": per_unit[LAND]} and progress[BANK] == {"overdue": per_unit[BANK]}
        assert not next(b for b in batch_rows(world) if b.unit_id == TAX).overdue

        world.clock.advance(7 * 86_400_000)  # a week later the others answer too
        settle(world)
        assert world.engine.sweep_deadlines() == {}
        assert _stages(world.store.outbox.progress(commission_id)) == _everywhere("answered")
        assert not any(b.overdue for b in batch_rows(world))
        assert_exactly_one_answer_per_item(world)


def _fake_notice(world: GatewayWorld, unit_id: str, batch_id: str, new_due: date, reason: str) -> None:
    """Fault injection: a delay notice the connector's own code would refuse, written into its database."""
    connector = world.connectors[unit_id].connector
    with connector.store.engine.begin() as conn:
        conn.execute(
            update(cstore.batches)
            .where(cstore.batches.c.batch_id == batch_id)
            .values(due=new_due, delay_reason=reason, delay_issued_at_ms=connector.courier.clock.now_ms())
        )


def test_delay_notices(tmp_path: Path, database_url: str | None) -> None:
    """A notice within clause 12 moves the due date (progress: delayed); one beyond it, or one that moves the
    date earlier, is ignored and the original due date stands."""
    with gateway_world(tmp_path, now_ms=MONDAY, database_url=database_url) as world:
        commission_id = world.commission("WT-1", households=10)
        world.workers.run_once(dispatch=True)
        ids = {b.unit_id: b.batch_id for b in batch_rows(world)}
        world.clock.set(beijing_ms(2026, 3, 9))
        world.connectors[TAX].connector.issue_delay(ids[TAX], date(2026, 3, 16), "volume")
        _fake_notice(world, LAND, ids[LAND], date(2026, 3, 19), "volume")  # LATEST + 1 working day
        _fake_notice(world, BANK, ids[BANK], date(2026, 3, 10), "technical")  # earlier than the original
        world.workers.run_once(dispatch=True)
        assert _due_and_reason(batch_rows(world)) == {
            TAX: (DUE, date(2026, 3, 16), "volume", False),
            LAND: (DUE, DUE, None, False),
            BANK: (DUE, DUE, None, False),
        }
        assert _stages(world.store.outbox.progress(commission_id)) == {
            TAX: {"delayed"},
            LAND: {"receipted"},
            BANK: {"receipted"},
        }
        # A second notice may move it again, up to the longest extension clause 12 allows.
        world.connectors[TAX].connector.issue_delay(ids[TAX], LATEST, "volume")
        world.workers.run_once(dispatch=True)
        assert _due_and_reason(batch_rows(world))[TAX] == (DUE, LATEST, "volume", False)

        world.clock.set(beijing_ms(2026, 3, 12))  # past the original due date, within the extension
        world.workers.run_once(dispatch=True)
        counts = {b.unit_id: b.subject_count for b in batch_rows(world)}
        assert world.engine.sweep_deadlines() == {LAND: counts[LAND], BANK: counts[BANK]}
        assert _stages(world.store.outbox.progress(commission_id)) == {
            TAX: {"delayed"},
            LAND: {"overdue"},
            BANK: {"overdue"},
        }
        world.clock.set(beijing_ms(2026, 3, 19))  # past the extension too
        assert set(world.engine.sweep_deadlines()) == set(UNITS)
        assert _stages(world.store.outbox.progress(commission_id)) == _everywhere("overdue")
        settle(world)
        assert _stages(world.store.outbox.progress(commission_id)) == _everywhere("answered")


def test_notice_fetched_after_the_due_date_clears_overdue(tmp_path: Path, database_url: str | None) -> None:
    """The connector issued its notice on the due date, but the gateway only fetched it the next day (after the
    sweep had marked the batch overdue): the extended due date has not passed, so the items are delayed."""
    with gateway_world(tmp_path, now_ms=MONDAY, database_url=database_url) as world:
        commission_id = world.commission("WT-1", households=10)
        world.workers.run_once(dispatch=True)
        ids = {b.unit_id: b.batch_id for b in batch_rows(world)}
        world.clock.set(beijing_ms(2026, 3, 11, 17))
        world.connectors[BANK].connector.issue_delay(ids[BANK], LATEST, "technical")
        world.clock.set(beijing_ms(2026, 3, 12, 9))
        assert set(world.engine.sweep_deadlines()) == set(UNITS)
        assert _stages(world.store.outbox.progress(commission_id))[BANK] == {"overdue"}
        world.workers.run_once(dispatch=True)
        assert _due_and_reason(batch_rows(world))[BANK] == (DUE, LATEST, "technical", False)
        assert _stages(world.store.outbox.progress(commission_id)) == {
            TAX: {"overdue"},
            LAND: {"overdue"},
            BANK: {"delayed"},
        }
        assert set(world.engine.sweep_deadlines()) == {TAX, LAND}
        with world.store.engine.connect() as conn:
            overdue = conn.execute(
                select(func.count()).select_from(schema.batches).where(schema.batches.c.overdue.is_(True))
            ).scalar_one()
        assert overdue == 2


class _Ticks(UnitWorkers):
    """The gateway's unit workers, remembering which kinds of cycle were started."""

    def __init__(self, workers: UnitWorkers) -> None:
        super().__init__(workers.engine, max_workers=2)
        self.started: list[bool] = []

    def tick(self, *, dispatch: bool) -> list[Future[CycleReport]]:
        self.started.append(dispatch)
        return super().tick(dispatch=dispatch)


@pytest.mark.parametrize(
    ("policy", "intervals", "polls"),
    [
        ("continuous", JobIntervals(dispatch_seconds=30, poll_seconds=60), False),  # dispatch cycles poll too
        ("continuous", JobIntervals(dispatch_seconds=120, poll_seconds=60), True),  # polls more often than that
        ("monthly", JobIntervals(dispatch_seconds=30, poll_seconds=60), True),  # 2 March: outside the window
    ],
)
def test_the_poll_job_starts_cycles_only_when_the_dispatch_job_does_not_poll_as_often(
    tmp_path: Path, policy: str, intervals: JobIntervals, polls: bool
) -> None:
    with gateway_world(tmp_path, now_ms=MONDAY) as world:
        ticks = _Ticks(world.workers)
        scheduler = GatewayScheduler(
            store=world.store,
            engine=world.engine,
            workers=ticks,
            policy=SchedulePolicy(policy),
            intervals=intervals,
            clock=world.clock,
            replica="test-1",
            lease_ms=60_000,
            key_check=lambda: None,
        )
        scheduler.poll()
        ticks.shutdown()
        assert ticks.started == ([False] if polls else [])


def test_progress_counts_formed_batches_not_tried_yet_as_queued(tmp_path: Path) -> None:
    """A caseworker reads "sent" as "the unit has it": a batch formed but not yet tried is still queued."""
    with gateway_world(tmp_path, now_ms=MONDAY) as world:
        commission_id = world.commission("WT-1", households=10)
        before = world.store.outbox.progress(commission_id)
        tax = world.store.units.all()[[u.unit_id for u in world.store.units.all()].index(TAX)]
        assert world.store.outbox.form_batches(TAX, frozenset(UNIT_DATA[tax.category]), 5, MONDAY) > 1
        after = world.store.outbox.progress(commission_id)
        assert after == before and set(after[TAX]) == {"queued"}
