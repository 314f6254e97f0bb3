"""Conversions between the wire's Date / YearMonth messages and Python dates, with validation."""

from __future__ import annotations

from datetime import date

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
