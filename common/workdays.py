"""The Chinese working-day calendar, for the deadlines of clause 12.

Clause 12: a sharing unit answers within 7 working days of receiving a query; with a written notice it may extend
by at most 5 working days. Working days are Monday to Friday, except the public holidays the State Council
announces each year, plus the adjusted working weekends (调休) it announces with them.

The State Council publishes each year's schedule in the autumn before. A year without a schedule cannot be
computed honestly, so :class:`WorkdayCalendar` refuses (``UnknownCalendarYear``) instead of guessing; an operator
adds the official schedule of a new year in a TOML file (see :func:`load_schedule_file`).
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from common.errors import HeduiError

#: Deadlines are counted in Beijing time, whatever the server's time zone.
CHINA_TZ = timezone(timedelta(hours=8), "CST")

#: Clause 12.
ANSWER_WORKING_DAYS = 7
MAX_DELAY_WORKING_DAYS = 5


class CalendarError(HeduiError):
    """A schedule is missing or inconsistent."""

    code = "calendar"


class UnknownCalendarYear(CalendarError):
    """A date falls in a year whose official holiday schedule the calendar does not have."""

    code = "calendar_year_unknown"

    def __init__(self, year: int) -> None:
        super().__init__(
            f"no official holiday schedule for {year}: add it to the calendar file "
            f"(calendar.holiday_file) from the State Council's notice before deadlines in {year} can be computed"
        )
        self.year = year


@dataclass(frozen=True)
class YearSchedule:
    """One year's official schedule: the days off (whole announced ranges) and the working weekend days."""

    year: int
    holidays: frozenset[date]
    working_weekends: frozenset[date]
    source: str = ""

    def __post_init__(self) -> None:
        outside = [d for d in self.holidays | self.working_weekends if d.year != self.year]
        if outside:
            raise CalendarError(f"schedule {self.year} lists dates of another year")
        if self.holidays & self.working_weekends:
            raise CalendarError(f"schedule {self.year} lists a day both as holiday and as working day")
        if any(d.weekday() < 5 for d in self.working_weekends):
            raise CalendarError(f"schedule {self.year}: an adjusted working day must fall on a weekend")


def _days(first: str, last: str) -> set[date]:
    start, end = date.fromisoformat(first), date.fromisoformat(last)
    return {start + timedelta(days=i) for i in range((end - start).days + 1)}


def _schedule(year: int, source: str, ranges: Iterable[tuple[str, str]], working: Iterable[str]) -> YearSchedule:
    holidays: set[date] = set()
    for first, last in ranges:
        holidays |= _days(first, last)
    return YearSchedule(year, frozenset(holidays), frozenset(date.fromisoformat(d) for d in working), source)


#: Official schedules (State Council General Office notices on public-holiday arrangements).
OFFICIAL_SCHEDULES: Mapping[int, YearSchedule] = {
    2025: _schedule(
        2025,
        "国务院办公厅关于2025年部分节假日安排的通知",
        [
            ("2025-01-01", "2025-01-01"),  # 元旦
            ("2025-01-28", "2025-02-04"),  # 春节
            ("2025-04-04", "2025-04-06"),  # 清明节
            ("2025-05-01", "2025-05-05"),  # 劳动节
            ("2025-05-31", "2025-06-02"),  # 端午节
            ("2025-10-01", "2025-10-08"),  # 国庆节、中秋节
        ],
        ["2025-01-26", "2025-02-08", "2025-04-27", "2025-09-28", "2025-10-11"],
    ),
    2026: _schedule(
        2026,
        "国务院办公厅关于2026年部分节假日安排的通知",
        [
            ("2026-01-01", "2026-01-03"),  # 元旦
            ("2026-02-15", "2026-02-23"),  # 春节
            ("2026-04-04", "2026-04-06"),  # 清明节
            ("2026-05-01", "2026-05-05"),  # 劳动节
            ("2026-06-19", "2026-06-21"),  # 端午节
            ("2026-09-25", "2026-09-27"),  # 中秋节
            ("2026-10-01", "2026-10-07"),  # 国庆节
        ],
        ["2026-01-04", "2026-02-14", "2026-02-28", "2026-05-09", "2026-09-20", "2026-10-10"],
    ),
}


@dataclass(frozen=True)
class WorkdayCalendar:
    """Working days by the official schedules it holds; refuses dates in other years."""

    schedules: Mapping[int, YearSchedule] = field(default_factory=lambda: dict(OFFICIAL_SCHEDULES))

    @classmethod
    def with_file(cls, path: Path | None) -> WorkdayCalendar:
        """The built-in schedules, extended (or, for the same year, replaced) by an operator's file."""
        schedules = dict(OFFICIAL_SCHEDULES)
        if path is not None:
            schedules.update(load_schedule_file(path))
        return cls(schedules)

    def _year(self, day: date) -> YearSchedule:
        schedule = self.schedules.get(day.year)
        if schedule is None:
            raise UnknownCalendarYear(day.year)
        return schedule

    def is_working_day(self, day: date) -> bool:
        schedule = self._year(day)
        if day in schedule.working_weekends:
            return True
        return day.weekday() < 5 and day not in schedule.holidays

    def add_working_days(self, start: date, count: int) -> date:
        """The ``count``-th working day after ``start`` (``start`` itself is not counted)."""
        if count < 0:
            raise ValueError("count must not be negative")
        day = start
        while count:
            day += timedelta(days=1)
            if self.is_working_day(day):
                count -= 1
        return day

    def working_days_between(self, start: date, end: date) -> int:
        """Working days in (start, end]; negative if end is before start."""
        if end < start:
            return -self.working_days_between(end, start)
        return sum(self.is_working_day(start + timedelta(days=i)) for i in range(1, (end - start).days + 1))

    def due_date(self, received_at: datetime, working_days: int = ANSWER_WORKING_DAYS) -> date:
        """Clause 12: the last day (Beijing time) to answer a query received at ``received_at``."""
        if received_at.tzinfo is None:
            raise ValueError("received_at must carry a time zone")
        return self.add_working_days(received_at.astimezone(CHINA_TZ).date(), working_days)

    def latest_extension(self, due: date) -> date:
        """Clause 12: the latest date a delay notice may move ``due`` to (5 working days later)."""
        return self.add_working_days(due, MAX_DELAY_WORKING_DAYS)


def load_schedule_file(path: Path) -> dict[int, YearSchedule]:
    """Read official schedules from TOML::

        [years.2027]
        source = "国务院办公厅关于2027年部分节假日安排的通知"
        holidays = [["2027-01-01", "2027-01-03"], ["2027-02-05", "2027-02-11"]]   # announced ranges, inclusive
        working_weekends = ["2027-02-14"]

    Unknown keys, malformed dates and inconsistent days are errors.
    """
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CalendarError(f"cannot read holiday file {path}: {exc}") from exc
    unknown = set(doc) - {"years"}
    if unknown:
        raise CalendarError(f"{path}: unknown keys {sorted(unknown)}")
    result: dict[int, YearSchedule] = {}
    for key, entry in doc.get("years", {}).items():
        result[int(key)] = _parse_year(path, key, entry)
    return result


def _parse_year(path: Path, key: str, entry: Any) -> YearSchedule:
    if not (key.isdigit() and isinstance(entry, dict)):
        raise CalendarError(f"{path}: [years.{key}] must be a year with a table")
    unknown = set(entry) - {"source", "holidays", "working_weekends"}
    if unknown:
        raise CalendarError(f"{path}: [years.{key}] has unknown keys {sorted(unknown)}")
    if not str(entry.get("source", "")).strip():
        raise CalendarError(f"{path}: [years.{key}] needs 'source' naming the official notice")
    try:
        ranges = [(str(r[0]), str(r[1])) for r in entry.get("holidays", [])]
        return _schedule(int(key), str(entry["source"]), ranges, [str(d) for d in entry.get("working_weekends", [])])
    except (ValueError, IndexError, TypeError) as exc:
        raise CalendarError(f"{path}: [years.{key}] has a malformed date or range: {exc}") from exc
