"""The adapter interface between the connector and a sharing unit's own data.

An adapter answers one question: for these ID numbers and these data categories, which rows does the unit hold,
and under which name? Everything else — name matching, threshold flags, statuses, persistence, envelopes — is the
connector's job, done once for every adapter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Protocol

from hedui.v1 import records_pb2

from common.errors import HeduiError


class AdapterError(HeduiError):
    """The unit's data source failed or is misconfigured. The message never contains personal data."""

    code = "adapter"


@dataclass(frozen=True)
class LookupContext:
    """What the query asks beyond the people: which data, for which period."""

    #: Data categories to look up (already restricted to what this unit serves).
    categories: tuple[int, ...]
    #: Income period, inclusive, as (year, month).
    income_from: tuple[int, int]
    income_to: tuple[int, int]
    #: Assets are reported as of this date.
    assets_as_of: date
    #: Stamped on every record as the time the unit produced it (milliseconds since the epoch).
    produced_at_ms: int
    extra: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Finding:
    """One row the unit holds for an ID number: the name it is registered under and the typed record."""

    name: str
    record: records_pb2.Record


class Adapter(Protocol):
    """A source of findings. Implementations must be safe to call from one worker thread at a time."""

    def fetch(self, id_numbers: Sequence[str], context: LookupContext) -> Mapping[str, list[Finding]]:
        """Findings per ID number for the requested categories; ID numbers the unit does not know are absent.

        Raise AdapterError when the source fails; the connector retries later and the batch stays pending.
        """
        ...

    def close(self) -> None:
        """Release connections and files."""
        ...
