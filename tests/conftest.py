"""Shared fixtures: two enrolled parties on one fixed clock, each trusting the other's published bundle.

``pair`` is the usual entry point: an agency gateway ("agency.220000") and a sharing unit's connector
("unit.220100.tax"), each with its own keys, a trust store holding the other's bundle (imported with the fingerprint
computed from the owner's own key records, as a person would read it out on the phone), a MemoryReplayCache and a
Courier on the shared FixedClock. ``make_side`` builds further parties for the wrong-sender and wrong-recipient cases.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hedui.v1 import media_pb2

from keys import Courier, FixedClock, MemoryReplayCache, PartyKeys, TrustStore, bundle_fingerprint
from keys.keyring import KeyState
from tests.conftest_pg import postgres_schema

AGENCY_ID = "agency.220000"
UNIT_ID = "unit.220100.tax"
#: 2026-01-01T00:00:00Z: a round, recent moment far from the epoch and from the int64 limits.
START_MS = 1_767_225_600_000


@dataclass
class Side:
    """One party as the tests drive it: its keys, what it trusts, its replay cache and its courier."""

    keys: PartyKeys
    trust: TrustStore
    replay: MemoryReplayCache
    courier: Courier

    @property
    def party_id(self) -> str:
        return self.keys.party_id


@dataclass
class Pair:
    """Two parties that enrolled each other, on one clock."""

    clock: FixedClock
    agency: Side
    unit: Side


def write_passphrase(path: Path, passphrase: str) -> Path:
    """A passphrase file as an operator makes it: one line, readable by its owner only (the programs refuse others)."""
    path.write_text(passphrase + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


def real_fingerprint(owner: PartyKeys) -> str:
    """The fingerprint the owner reads out for its current bundle, computed from its own records."""
    published = [(r.algorithm, r.public.raw) for r in owner.records() if r.state is not KeyState.RETIRED]
    return bundle_fingerprint(owner.party_id, published)


def enrol(trust: TrustStore, owner: PartyKeys, *, now_ms: int, own_party_id: str | None = None) -> None:
    """Import ``owner``'s bundle into ``trust`` after checking it against the owner's real fingerprint."""
    trust.import_bundle(owner.bundle(now_ms), expected_fingerprint=real_fingerprint(owner), own_party_id=own_party_id)


def new_side(party_id: str, clock: FixedClock) -> Side:
    keys = PartyKeys.create(party_id, now_ms=clock.now_ms())
    trust = TrustStore()
    replay = MemoryReplayCache()
    return Side(keys, trust, replay, Courier(keys, trust, replay=replay, clock=clock))


def introduce(a: Side, b: Side, *, now_ms: int) -> None:
    """Each of ``a`` and ``b`` imports the other's bundle."""
    enrol(a.trust, b.keys, now_ms=now_ms, own_party_id=a.party_id)
    enrol(b.trust, a.keys, now_ms=now_ms, own_party_id=b.party_id)


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(START_MS)


@pytest.fixture
def pair(clock: FixedClock) -> Pair:
    agency, unit = new_side(AGENCY_ID, clock), new_side(UNIT_ID, clock)
    introduce(agency, unit, now_ms=clock.now_ms())
    return Pair(clock, agency, unit)


@pytest.fixture
def agency(pair: Pair) -> Side:
    return pair.agency


@pytest.fixture
def unit(pair: Pair) -> Side:
    return pair.unit


@pytest.fixture
def make_side(clock: FixedClock) -> Callable[[str], Side]:
    """Factory for more parties on the same clock (not enrolled with anyone)."""

    def make(party_id: str) -> Side:
        return new_side(party_id, clock)

    return make


@pytest.fixture
def sealed_file() -> media_pb2.SealedFile:
    """A small inner message whose name and content must never show up in a log."""
    return media_pb2.SealedFile(
        file_name="低保核对-220100-名单.csv", content=b"id,name\n220104199001011234,ZHANG-SAN\n", media_type="text/csv"
    )


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """The gateway database of a test that runs on both back ends: None (a SQLite file in the test's directory, as
    ``gateway_world`` makes it) or the URL of a fresh PostgreSQL schema (skipped loudly without a server)."""
    if request.param == "sqlite":
        yield None
        return
    with postgres_schema() as url:
        yield url
