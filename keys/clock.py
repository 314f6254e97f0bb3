"""Injectable time. Everything in the trust core takes "now" from a Clock, in milliseconds since the epoch (UTC)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    """Source of the current time."""

    def now_ms(self) -> int:
        """Milliseconds since 1970-01-01T00:00:00Z."""
        ...


class SystemClock:
    """The machine's clock."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class FixedClock:
    """A clock that moves only when told to; for tests, vectors and benchmarks."""

    def __init__(self, now_ms: int) -> None:
        self._now = now_ms
        self._lock = threading.Lock()

    def now_ms(self) -> int:
        return self._now

    def set(self, now_ms: int) -> None:
        with self._lock:
            self._now = now_ms

    def advance(self, ms: int) -> None:
        with self._lock:
            self._now += ms


def to_ms(moment: datetime) -> int:
    """An aware datetime as milliseconds since the epoch; naive datetimes are refused."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime: give a time zone")
    return int(moment.timestamp() * 1000)


#: The latest time a signed document may carry: 9999-12-31T23:59:59.999Z, the end of what a datetime (and an
#: ISO-8601 year of four digits) can show. A later time is no real time; a document carrying one is malformed.
MAX_TIME_MS = 253_402_300_799_999


def check_time_ms(ms: int, what: str) -> int:
    """``ms`` if it is a time from 1970 to the year 9999 (0..MAX_TIME_MS); ValueError naming ``what`` otherwise.

    Parsers call this on every time they read, so that an out-of-range time is refused as malformed, with their own
    error, before anything tries to show it.
    """
    if not 0 <= ms <= MAX_TIME_MS:
        raise ValueError(f"{what} is not a time between 1970 and the year 9999")
    return ms


def from_ms(ms: int) -> datetime:
    """Milliseconds since the epoch as an aware UTC datetime (ValueError outside the years 1..9999)."""
    try:
        return datetime.fromtimestamp(ms / 1000, tz=UTC)
    except (OverflowError, OSError) as exc:
        raise ValueError(f"{ms} ms is outside the years a date can show") from exc


def iso(ms: int | None) -> str:
    """ISO-8601 UTC rendering for humans; '-' for an open end. Never raises: a time no date can show (from an old
    keystore or a foreign program) is shown as its number of milliseconds."""
    if ms is None:
        return "-"
    try:
        return from_ms(ms).strftime("%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return f"{ms} ms after 1970 (out of range)"


SECOND_MS = 1000
MINUTE_MS = 60 * SECOND_MS
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
