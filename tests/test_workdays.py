"""The Chinese working-day calendar: official 2025 and 2026 schedules, 调休, refusal of unknown years."""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from common.workdays import (
    CHINA_TZ,
    OFFICIAL_SCHEDULES,
    CalendarError,
    CalendarSource,
    UnknownCalendarYear,
    WorkdayCalendar,
    load_schedule_file,
)

CAL = WorkdayCalendar()


@pytest.mark.parametrize(
    "day",
    ["2025-01-26", "2025-02-08", "2025-04-27", "2025-09-28", "2025-10-11",
     "2026-01-04", "2026-02-14", "2026-02-28", "2026-05-09", "2026-09-20", "2026-10-10"],
)  # fmt: skip
def test_adjusted_weekend_days_are_working_days(day: str) -> None:
    d = date.fromisoformat(day)
    assert d.weekday() >= 5
    assert CAL.is_working_day(d)


@pytest.mark.parametrize(
    "day",
    ["2025-01-01", "2025-01-28", "2025-02-04", "2025-05-05", "2025-06-02", "2025-10-08",
     "2026-01-02", "2026-02-16", "2026-02-23", "2026-04-06", "2026-05-05", "2026-06-19", "2026-09-25", "2026-10-07"],
)  # fmt: skip
def test_weekday_holidays_are_not_working_days(day: str) -> None:
    d = date.fromisoformat(day)
    assert d.weekday() < 5
    assert not CAL.is_working_day(d)


def test_working_day_counts_per_year_match_the_official_totals() -> None:
    # 261 weekdays - weekday holidays (18 in 2025, 19 in 2026) + working weekends (5 and 6) = 248 both years.
    for year, expected in ((2025, 248), (2026, 248)):
        start = date(year, 1, 1)
        count = sum(CAL.is_working_day(start + timedelta(days=i)) for i in range(365))
        assert count == expected, year


def test_due_date_is_seven_working_days_after_receipt_in_beijing_time() -> None:
    # 16:30 UTC on Sunday 1 March is already 00:30 on Monday 2 March in Beijing: Monday is not counted.
    assert CAL.due_date(datetime(2026, 3, 1, 16, 30, tzinfo=UTC)) == date(2026, 3, 11)
    # 15:30 UTC is still Sunday in Beijing: counting starts on Monday.
    assert CAL.due_date(datetime(2026, 3, 1, 15, 30, tzinfo=UTC)) == date(2026, 3, 10)
    assert CAL.due_date(datetime(2026, 2, 12, 9, tzinfo=CHINA_TZ)) == date(2026, 2, 28)
    assert CAL.due_date(datetime(2025, 9, 26, 9, tzinfo=CHINA_TZ)) == date(2025, 10, 13)


def test_delay_extension_is_five_working_days() -> None:
    assert CAL.latest_extension(date(2026, 3, 11)) == date(2026, 3, 18)
    assert CAL.latest_extension(date(2026, 9, 30)) == date(2026, 10, 13)  # 10 Oct is a working Saturday


def test_unknown_year_is_refused_not_guessed() -> None:
    with pytest.raises(UnknownCalendarYear) as excinfo:
        CAL.due_date(datetime(2026, 12, 28, 9, tzinfo=CHINA_TZ))
    assert "2027" in str(excinfo.value)
    with pytest.raises(UnknownCalendarYear):
        CAL.is_working_day(date(2024, 6, 3))


def test_operator_schedule_file_adds_a_year(tmp_path: Path) -> None:
    path = tmp_path / "holidays.toml"
    path.write_text(
        """
[years.2027]
source = "国务院办公厅关于2027年部分节假日安排的通知 (test data)"
holidays = [["2027-01-01", "2027-01-03"]]
working_weekends = []
""",
        encoding="utf-8",
    )
    cal = WorkdayCalendar.with_file(path)
    assert not cal.is_working_day(date(2027, 1, 1))
    assert cal.due_date(datetime(2026, 12, 28, 9, tzinfo=CHINA_TZ)) == date(2027, 1, 7)
    assert 2025 in cal.schedules and 2026 in cal.schedules


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[years.2027]\nsource = "x"\nholidays = [["2027-13-01", "2027-13-02"]]', "malformed"),
        ('[years.2027]\nsource = "x"\nworking_weekends = ["2027-01-04"]', "weekend"),
        ('[years.2027]\nsource = "x"\nholidays = [["2026-12-31", "2027-01-01"]]', "another year"),
        ("[years.2027]\nholidays = []", "source"),
        ('[years.2027]\nsource = "x"\nbogus = 1', "unknown keys"),
        ("[calendar]\nx = 1", "unknown keys"),
        ("not toml [", "cannot read"),
    ],
)
def test_bad_schedule_files_are_refused(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "holidays.toml"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(CalendarError) as excinfo:
        load_schedule_file(path)
    assert message in str(excinfo.value)


def test_official_schedules_are_consistent() -> None:
    for year, schedule in OFFICIAL_SCHEDULES.items():
        assert schedule.year == year and schedule.source
        assert not schedule.holidays & schedule.working_weekends


def test_a_holiday_file_not_there_yet_is_a_warning_and_is_read_when_it_appears(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The on-call drill: with holiday_file set to a path not written yet, gateway and connector refused to start;
    and a file configured for the first time needed a restart. Now the built-in years serve until it appears."""
    path = tmp_path / "holidays.toml"
    with caplog.at_level(logging.WARNING, logger="hedui"):
        source = CalendarSource(path)
    assert [r.getMessage() for r in caplog.records] == [
        "holiday file not there yet: the built-in years serve until it appears"
    ]
    assert 2027 not in source.current().schedules
    path.write_text(
        '[years.2027]\nsource = "test"\nholidays = [["2027-01-01", "2027-01-01"]]\nworking_weekends = []\n',
        encoding="utf-8",
    )
    assert 2027 in source.current().schedules
