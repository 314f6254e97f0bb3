"""The calendar must never stop the network (issue 10, item 10): a batch whose clause-12 due date falls in a year
without an official holiday schedule is receipted and answered with a provisional due date, said so in the receipt,
the unit's status, progress, the partial report and ``status``; never made overdue on it; and fixed, with an audit
entry, once the year's schedule is installed. Real connectors over mutual TLS, a real gateway store, injected
clocks: 28 December 2026, when the 7 working days run into 2027.

The 2027 file below is TEST DATA, not the official schedule (which was not public when this was written): it makes
1 January 2027 a holiday and nothing else, enough to see the provisional date move.
"""

from __future__ import annotations

import logging
from datetime import date, datetime
from pathlib import Path

import pytest
from hedui.v1 import exchange_pb2
from prometheus_client import CollectorRegistry
from sqlalchemy import select

from common.workdays import CHINA_TZ, CalendarSource, Deadline, WorkdayCalendar, YearSchedule
from connectors.metrics import ConnectorMetrics
from gateway.archive.audit import AuditLog
from gateway.cli import main as gateway_main
from gateway.db import schema
from gateway.metrics import GatewayMetrics
from gateway.procedure.commission import Caller
from gateway.procedure.report import build_report, render_html
from gateway.procedure.staff import StaffRegister
from gateway.procedure.workflow import Workflow
from keys.envelope import open_at
from keys.replay import MemoryReplayCache
from tests.exchange_world import GATEWAY, beijing_ms
from tests.gateway_drive import LAND, TAX, batch_rows, drain, operator_config, rows, settle
from tests.gateway_world import UNITS, GatewayWorld, gateway_world

#: Monday 28 December 2026: 29, 30, 31 December, then 2027.
RECEIVED = beijing_ms(2026, 12, 28)
#: Counting 2027 Monday to Friday: Fri 1 Jan, Mon 4, Tue 5, Wed 6 January.
PROVISIONAL = date(2027, 1, 6)
#: With the test schedule's 1 January holiday: Mon 4 .. Thu 7 January.
FINAL = date(2027, 1, 7)
TEST_2027 = """
[years.2027]
source = "TEST DATA for tests/test_calendar_provisional.py, not the official notice"
holidays = [["2027-01-01", "2027-01-01"]]
"""
#: 1 January 2027 00:00 Beijing time: the end of 31 December 2026, the last day the built-in calendar knows.
END_OF_2026 = datetime(2027, 1, 1, tzinfo=CHINA_TZ).timestamp()
END_OF_2027 = datetime(2028, 1, 1, tzinfo=CHINA_TZ).timestamp()


def _install_2027(path: Path) -> None:
    path.write_text(TEST_2027, encoding="utf-8")


def _receipt(world: GatewayWorld, batch_id: str) -> exchange_pb2.BatchReceipt:
    [row] = rows(world, select(schema.batches.c.receipt_envelope).where(schema.batches.c.batch_id == batch_id))
    courier = world.engine.courier
    # Opened again as archived (a fresh replay cache: the engine opened it once already); the signature is checked.
    opened = open_at(
        row.receipt_envelope,
        me=courier.me,
        trust=courier.trust,
        replay=MemoryReplayCache(),
        now_ms=world.clock.now_ms(),
        expect={exchange_pb2.BatchReceipt.DESCRIPTOR.full_name: exchange_pb2.BatchReceipt},
    )
    assert isinstance(opened.message, exchange_pb2.BatchReceipt)
    return opened.message


def test_provisional_deadline_counts_unknown_years_monday_to_friday() -> None:
    calendar = WorkdayCalendar()
    received = datetime(2026, 12, 28, 10, tzinfo=CHINA_TZ)
    assert calendar.deadline(received) == Deadline(PROVISIONAL, provisional=True)
    # Inside a known year the deadline is the exact due date, not provisional.
    march = datetime(2026, 3, 2, 10, tzinfo=CHINA_TZ)
    assert calendar.deadline(march) == Deadline(calendar.due_date(march), provisional=False)
    # A delay bound from a provisional date is provisional too; from a final one in a known span it is final.
    assert calendar.extension(Deadline(date(2026, 12, 21), False)) == Deadline(date(2026, 12, 28), False)
    assert calendar.extension(Deadline(PROVISIONAL, True)) == Deadline(date(2027, 1, 13), True)
    assert calendar.known_until(date(2026, 12, 2)) == date(2026, 12, 31)
    assert calendar.known_until(date(2027, 1, 2)) == date(2026, 12, 31)  # already run out
    assert calendar.known_until_timestamp(date(2026, 12, 2)) == END_OF_2026
    # Settling: still provisional without 2027; the exact date with it; a delay kept within clause 12.
    assert calendar.settle(received, PROVISIONAL, delayed=False) is None
    with_2027 = WorkdayCalendar({**calendar.schedules, 2027: _test_schedule()})
    assert with_2027.settle(received, PROVISIONAL, delayed=False) == (FINAL, FINAL)
    assert with_2027.settle(received, date(2027, 1, 12), delayed=True) == (FINAL, date(2027, 1, 12))
    assert with_2027.settle(received, date(2027, 1, 20), delayed=True) == (FINAL, date(2027, 1, 14))
    assert with_2027.settle(received, date(2027, 1, 6), delayed=True) == (FINAL, FINAL)


def _test_schedule() -> YearSchedule:
    return YearSchedule(2027, frozenset({date(2027, 1, 1)}), frozenset(), "TEST DATA")


def test_calendar_year_unknown_no_longer_stops_the_exchange(tmp_path: Path) -> None:
    """Fails before issue 10: every connector refused with calendar_year_unknown and the units backed off."""
    with gateway_world(tmp_path, now_ms=RECEIVED) as world:
        world.commission("WT-NY", households=3)
        settle(world)
        batches = batch_rows(world)
        assert batches and {b.state for b in batches} == {"acknowledged"}
        assert {(b.original_due, b.due, b.due_provisional) for b in batches} == {(PROVISIONAL, PROVISIONAL, True)}
        assert all(u.consecutive_failures == 0 for u in world.store.units.all())
        receipt = _receipt(world, batches[0].batch_id)
        assert receipt.due_date_provisional and (receipt.due_date.year, receipt.due_date.day) == (2027, 6)


def test_installing_the_year_makes_provisional_due_dates_final_with_an_audit_entry(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    holidays = tmp_path / "holidays.toml"
    holidays.write_text("", encoding="utf-8")  # the operator's file, still without 2027
    with gateway_world(tmp_path / "net", now_ms=RECEIVED) as world:
        source = CalendarSource(holidays)
        world.engine.calendar_source = source
        commission = world.commission("WT-FIX", households=2)
        world.workers.run_once(dispatch=True)  # sent and receipted; the connectors have not answered yet
        assert {b.state for b in batch_rows(world)} == {"receipted"}

        # Progress says provisional; the day after the provisional date nothing is overdue, only "provisionally".
        workflow = Workflow(
            store=world.store,
            audit=AuditLog(world.store.engine),
            staff=StaffRegister(world.store.engine, AuditLog(world.store.engine)),
            clock=world.clock,
            agency=world.engine.courier.me,
        )
        [(ref,)] = rows(world, select(schema.commissions.c.ref).where(schema.commissions.c.id == commission))
        world.clock.set(beijing_ms(2027, 1, 7))
        assert world.engine.sweep_deadlines() == {}
        assert not any(b.overdue for b in batch_rows(world))
        progress = workflow.queries.progress(ref, Caller("staff", "staff_system"))
        items = {u.unit_id: u.receipted for u in progress.units}
        for unit in progress.units:
            assert (unit.due_date.day, unit.due_date_provisional) == (6, True)
            assert (unit.overdue, unit.provisionally_overdue) == (0, items[unit.unit_id])

        # The partial report names each open unit's due date as provisional, in the signed data and the HTML.
        report = build_report(
            world.store.engine,
            commission,
            agency=GATEWAY,
            issued_by="S-0003",
            partial=True,
            now_ms=world.clock.now_ms(),
        )
        assert {(u.unit_id, u.due_date.day, u.due_date_provisional) for u in report.open_units} == {
            (u, 6, True) for u in UNITS
        }
        assert [n for n in report.footnotes if "暂定" in n and "调休" in n]
        assert "2027-01-06（暂定，见说明）" in render_html(report)

        # The operator installs 2027: the next sweep (no restart) fixes every date from the receipt time.
        _install_2027(holidays)
        with caplog.at_level(logging.INFO, logger="hedui"):
            world.engine.sweep_deadlines()
        assert {(b.original_due, b.due, b.due_provisional) for b in batch_rows(world)} == {(FINAL, FINAL, False)}
        audit = AuditLog(world.store.engine)
        fixed = [e for e in audit.entries() if e.action == "batch.due_final"]
        assert len(fixed) == len(batch_rows(world))
        assert {(e.before, e.after, e.commission_id) for e in fixed} == {("2027-01-06", "2027-01-07", commission)}
        assert audit.verify() == []
        assert len([r for r in caplog.records if r.getMessage() == "provisional due date is final"]) == len(fixed)
        progress = workflow.queries.progress(ref, Caller("staff", "staff_system"))
        assert {(u.due_date.day, u.due_date_provisional, u.provisionally_overdue) for u in progress.units} == {
            (7, False, 0)
        }

        # Each connector fixes its own copy on its periodic re-check, and says so in the next BatchStatus.
        tax = world.connectors[TAX].connector
        assert tax.settle_due_dates(WorkdayCalendar.with_file(holidays)) == 1
        [stored] = [b for b in (tax.store.get(r.batch_id) for r in batch_rows(world)) if b is not None]
        assert (stored.original_due, stored.due, stored.due_provisional) == (FINAL, FINAL, False)
        assert [e["reason"] for e in tax.store.audit_entries() if e["event"] == "due_date_final"] == [
            "2027-01-06->2027-01-07"
        ]

        # On the final date the batches are judged: past 7 January without an answer they are overdue.
        world.clock.set(beijing_ms(2027, 1, 8))
        assert sum(world.engine.sweep_deadlines().values()) == sum(b.subject_count for b in batch_rows(world))
        drain(world)
        settle(world)
        assert {b.state for b in batch_rows(world)} == {"acknowledged"}


def test_the_connector_says_provisional_in_its_status_and_fixes_it_at_start(tmp_path: Path) -> None:
    with gateway_world(tmp_path, now_ms=RECEIVED) as world:
        world.commission("WT-ST", households=2)
        world.workers.run_once(dispatch=True)
        land = world.connectors[LAND].connector
        [batch_id] = [b.batch_id for b in batch_rows(world) if b.unit_id == LAND]
        pending = land.store.answers_for(GATEWAY, [batch_id])[batch_id][0]
        assert pending.due_provisional
        # A delay notice from a provisional due date is bounded provisionally (5 weekdays after 6 January).
        land.issue_delay(batch_id, date(2027, 1, 13), "volume")
        holidays = tmp_path / "holidays.toml"
        _install_2027(holidays)
        assert land.settle_due_dates(WorkdayCalendar.with_file(holidays)) == 1
        fixed = land.store.get(batch_id)
        assert fixed is not None
        # The delay's date stands: still after the final date and within 5 working days of it (14 January).
        assert (fixed.original_due, fixed.due, fixed.due_provisional) == (FINAL, date(2027, 1, 13), False)
        assert land.settle_due_dates() == 0  # nothing left to fix; no second audit entry


def test_status_says_how_far_the_calendar_reaches_and_which_due_dates_are_provisional(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with gateway_world(tmp_path, now_ms=RECEIVED) as world:
        world.commission("WT-CLI", households=2)
        world.workers.run_once(dispatch=True)
        config = operator_config(tmp_path, world, None)
        capsys.readouterr()
        assert gateway_main(["status", "--config", str(config)]) == 0
        out = capsys.readouterr().out
    today = datetime.now(CHINA_TZ).date()
    known = WorkdayCalendar().known_until(today)
    assert f"calendar: official holiday schedules known until {known.isoformat()}" in out
    if (known - today).days < 60:
        assert f"install the {known.year + 1} schedule" in out
    assert out.count("provisional due dates: 1 batches/") == len(UNITS)
    assert out.count("latest 2027-01-06") == len(UNITS)


def test_calendar_known_until_is_exported_by_gateway_and_connector(tmp_path: Path) -> None:
    holidays = tmp_path / "holidays.toml"
    holidays.write_text("", encoding="utf-8")
    source = CalendarSource(holidays)
    clock = datetime(2026, 12, 2, 10, tzinfo=CHINA_TZ).timestamp
    gateway, connector = GatewayMetrics(CollectorRegistry()), ConnectorMetrics(CollectorRegistry())
    gateway.watch_calendar(source.current, clock)
    connector.watch_calendar(source.current, clock)
    for metrics in (gateway, connector):
        assert metrics.registry.get_sample_value("hedui_calendar_known_until") == END_OF_2026
    _install_2027(holidays)
    for metrics in (gateway, connector):
        assert metrics.registry.get_sample_value("hedui_calendar_known_until") == END_OF_2027


def test_a_bad_holiday_file_written_later_keeps_the_calendar_in_use(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    holidays = tmp_path / "holidays.toml"
    _install_2027(holidays)
    source = CalendarSource(holidays)
    assert source.current().knows(2027)
    holidays.write_text("[years.2028]\nholidays = 3\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="hedui.calendar"):
        assert source.current().knows(2027)
    assert [r.getMessage() for r in caplog.records] == ["holiday file not taken: the calendar read before stays in use"]
