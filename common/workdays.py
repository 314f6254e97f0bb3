"""The Chinese working-day calendar, for the deadlines of clause 12.

Clause 12: a sharing unit answers within 7 working days of receiving a query; with a written notice it may extend
by at most 5 working days. Working days are Monday to Friday, except the public holidays the State Council
announces each year, plus the adjusted working weekends (调休) it announces with them.

The State Council publishes each year's schedule in the autumn before, sometimes only weeks before the year
starts. A year without a schedule cannot be computed honestly, so the exact methods of :class:`WorkdayCalendar`
(``is_working_day``, ``due_date``, ``latest_extension``) refuse (``UnknownCalendarYear``) instead of guessing; an
operator adds the official schedule of a new year in a TOML file (see :func:`load_schedule_file`).

The exchange must not stop meanwhile, so :meth:`WorkdayCalendar.deadline` and :meth:`WorkdayCalendar.extension`
give a *provisional* date instead (:class:`Deadline`): every day of a year without a schedule counts as a working
day from Monday to Friday and as a day off on Saturday and Sunday — no public holidays, no adjusted working weekends.
The real date is then later when a public holiday falls on a weekday in the span (元旦, 春节 …) and earlier when an
adjusted working weekend (调休) does; days of known years in the span count as usual. Once the year's schedule is
installed, the same call gives the exact date and ``provisional`` is false (docs/exchange.md, "Provisional due
dates").
"""

from __future__ import annotations

import logging
import threading
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from common.errors import HeduiError

log = logging.getLogger("hedui.calendar")

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
class Deadline:
    """A clause-12 date and whether it is provisional: counted across a year without an official schedule, whose
    days were taken as Monday-Friday working days (see the module docstring). A provisional date may turn out later
    (a public holiday in the span) or earlier (an adjusted working weekend) once the schedule is known."""

    day: date
    provisional: bool


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

    def knows(self, year: int) -> bool:
        """Whether the calendar holds the official schedule of ``year``."""
        return year in self.schedules

    def _advance(self, start: date, count: int) -> Deadline:
        """The ``count``-th working day after ``start``, counting days of unknown years Monday to Friday."""
        if count < 0:
            raise ValueError("count must not be negative")
        day, provisional = start, False
        while count:
            day += timedelta(days=1)
            schedule = self.schedules.get(day.year)
            if schedule is None:
                provisional = True
                working = day.weekday() < 5
            else:
                working = day in schedule.working_weekends or (day.weekday() < 5 and day not in schedule.holidays)
            if working:
                count -= 1
        return Deadline(day, provisional)

    def deadline(self, received_at: datetime, working_days: int = ANSWER_WORKING_DAYS) -> Deadline:
        """Clause 12: the due date of a query received at ``received_at``, never refused: exact where every day
        counted lies in a known year (then equal to :meth:`due_date`), provisional otherwise."""
        if received_at.tzinfo is None:
            raise ValueError("received_at must carry a time zone")
        return self._advance(received_at.astimezone(CHINA_TZ).date(), working_days)

    def extension(self, due: Deadline) -> Deadline:
        """Clause 12: the latest date a delay notice may move ``due`` to; provisional if ``due`` is or if the five
        working days after it cross a year without a schedule."""
        limit = self._advance(due.day, MAX_DELAY_WORKING_DAYS)
        return Deadline(limit.day, limit.provisional or due.provisional)

    def settle(self, received_at: datetime, due: date, *, delayed: bool) -> tuple[date, date] | None:
        """Fix a stored provisional due date once the calendar knows the years it spans: ``(original due, current
        due)`` recomputed from the receipt time, or None while the date is still provisional.

        Without a delay notice both are the exact date. With one, the notice's date ``due`` stands if it is still
        after the exact original date and within the clause-12 extension of it; otherwise it is brought back into
        that range (to the exact date when the delay is no longer needed, to the latest extension when it went
        beyond it)."""
        exact = self.deadline(received_at)
        if exact.provisional:
            return None
        if not delayed:
            return exact.day, exact.day
        limit = self.extension(exact).day
        return exact.day, min(max(due, exact.day), limit)

    def known_until(self, today: date) -> date:
        """The last day of the unbroken run of known years from ``today``'s year on; the day before 1 January of
        ``today``'s year when that year itself is unknown (the calendar has already run out)."""
        year = today.year
        while year in self.schedules:
            year += 1
        return date(year - 1, 12, 31)

    def known_until_timestamp(self, today: date) -> float:
        """Unix time of the end of :meth:`known_until` in Beijing time (``hedui_calendar_known_until``)."""
        last = self.known_until(today)
        end = datetime(last.year, last.month, last.day, tzinfo=CHINA_TZ) + timedelta(days=1)
        return end.timestamp()


class CalendarSource:
    """The calendar of a running service: the built-in schedules plus the operator's holiday file, read again when
    the file changes (size or modification time), so that installing a new year's schedule needs no restart.

    The first read happens here and raises CalendarError for a bad file (the service does not start with it); a
    file that is not there yet is a warning, and the built-in years serve until it appears (every site that
    installs its first holiday file would otherwise need a restart, or could not start). A bad file written later is
    logged and the calendar read before stays in use. Thread-safe."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp = self._stat()
        if path is not None and self._stamp is None:
            log.warning(
                "holiday file not there yet: the built-in years serve until it appears",
                extra={"path": str(path), "built_in_until": max(WorkdayCalendar().schedules, default=0)},
            )
            self._calendar = WorkdayCalendar()
        else:
            self._calendar = WorkdayCalendar.with_file(path)

    def _stat(self) -> tuple[int, int] | None:
        if self.path is None:
            return None
        try:
            info = Path(self.path).stat()
        except OSError:
            return None
        return (info.st_mtime_ns, info.st_size)

    def current(self) -> WorkdayCalendar:
        """The calendar, re-read first if the holiday file changed since the last read."""
        with self._lock:
            stamp = self._stat()
            if stamp != self._stamp and stamp is not None:
                try:
                    calendar = WorkdayCalendar.with_file(self.path)
                except CalendarError as exc:
                    log.warning(
                        "holiday file not taken: the calendar read before stays in use", extra={"detail": str(exc)}
                    )
                else:
                    years = sorted(set(calendar.schedules) - set(self._calendar.schedules))
                    log.info("holiday file read again", extra={"new_years": ",".join(map(str, years)) or "-"})
                    self._calendar = calendar
                self._stamp = stamp
            return self._calendar


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
