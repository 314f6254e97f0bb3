"""Conversions between the wire's Date / YearMonth messages and Python dates, with validation."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

from hedui.v1 import records_pb2


def to_pb(day: date) -> records_pb2.Date:
    return records_pb2.Date(year=day.year, month=day.month, day=day.day)


def from_pb(msg: records_pb2.Date) -> date:
    """Raises ValueError for an absent or impossible date."""
    if msg.year == 0:
        raise ValueError("date is missing")
    return date(msg.year, msg.month, msg.day)


def year_month(msg: records_pb2.YearMonth) -> tuple[int, int]:
    """Raises ValueError unless the month is 1-12 in a plausible year."""
    if not (1900 <= msg.year <= 2999 and 1 <= msg.month <= 12):
        raise ValueError("year-month is missing or out of range")
    return (msg.year, msg.month)


#: Operators type times in Beijing time (UTC+8, no daylight saving), where the agencies and units are.
_BEIJING = timezone(timedelta(hours=8), "CST")


def beijing_moment_ms(text: str, *, end_of_day: bool = False) -> int:
    """``YYYY-MM-DD`` (the start of that day, or with ``end_of_day`` the start of the next: "through that day") or
    ``YYYY-MM-DDTHH:MM``, Beijing time, as milliseconds since the epoch. ValueError for anything else."""
    try:
        if "T" in text:
            moment = datetime.fromisoformat(text)
            if moment.tzinfo is not None:
                raise ValueError("give the time without a zone: it is read as Beijing time")
            moment = moment.replace(tzinfo=_BEIJING)
        else:
            day = date.fromisoformat(text)
            moment = datetime(day.year, day.month, day.day, tzinfo=_BEIJING) + timedelta(days=int(end_of_day))
    except ValueError:
        raise ValueError(f"a time is YYYY-MM-DD or YYYY-MM-DDTHH:MM (Beijing time), not {text[:20]!r}") from None
    return int(moment.timestamp() * 1000)


def beijing_text(ms: int | None) -> str:
    """``YYYY-MM-DD HH:MM`` in Beijing time; "open" for None (an open end)."""
    if ms is None:
        return "open"
    return datetime.fromtimestamp(ms / 1000, _BEIJING).strftime("%Y-%m-%d %H:%M")
