"""A small real exchange network for tests: a private CA, parties with keys that trust each other, a connector
serving on loopback over mutual TLS, and a gateway-side courier and stub to talk to it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import grpc
from hedui.v1 import exchange_pb2, exchange_pb2_grpc, records_pb2

from common.categories import UNIT_DATA
from common.db import make_engine
from common.workdays import CHINA_TZ, WorkdayCalendar
from connectors.adapters.base import Adapter
from connectors.connector import Connector
from connectors.server import RunningConnector, server_credentials, start
from connectors.store import ConnectorStore
from connectors.synthetic import Population, SyntheticAdapter
from gateway.exchange.approvals import TreeUnit
from keys.announcements import read_bundle
from keys.clock import FixedClock, to_ms
from keys.envelope import Courier, Opened
from keys.identity import PartyKeys
from keys.replay import MemoryReplayCache
from keys.tls import create_ca, issue_certificate
from keys.truststore import TrustStore
from tests.approval_kit import StaffKit, prove

GATEWAY = "agency.220100"
UNIT = "unit.220100.tax"
STAFF = ("S-0001", "S-0002")
SEED = 20261127
#: Another unit of the same commission, so that a batch's unit proof is not empty.
NEIGHBOUR = TreeUnit("unit.220100.land", tuple(sorted(UNIT_DATA[records_pb2.UNIT_CATEGORY_LAND])))


def beijing_ms(year: int, month: int, day: int, hour: int = 10) -> int:
    return to_ms(datetime(year, month, day, hour, tzinfo=CHINA_TZ))


@dataclass
class Pki:
    """CA and leaf certificates written to files, as an operator would have them."""

    root: Path
    ca_cert: bytes = b""
    ca_key: bytes = b""
    files: dict[str, tuple[Path, Path]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Dated two years back, so that a test can issue an expired leaf certificate under it.
        self.ca_cert, self.ca_key = create_ca("Hedui test CA", now=datetime.now(UTC) - timedelta(days=730))
        (self.root / "ca.crt").write_bytes(self.ca_cert)

    def issue(self, party: str, *, server: bool = False) -> tuple[Path, Path]:
        cert, key = issue_certificate(
            self.ca_cert,
            self.ca_key,
            party,
            server_names=["localhost", "127.0.0.1"] if server else [],
            client=not server,
            server=server,
        )
        paths = (self.root / f"{party}.crt", self.root / f"{party}.key")
        paths[0].write_bytes(cert)
        paths[1].write_bytes(key)
        paths[1].chmod(0o600)  # the programs refuse a private key others can read
        self.files[party] = paths
        return paths

    @property
    def ca_path(self) -> Path:
        return self.root / "ca.crt"

    def channel(self, party: str, port: int) -> grpc.Channel:
        cert, key = self.files[party] if party in self.files else self.issue(party)
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.ca_cert, private_key=key.read_bytes(), certificate_chain=cert.read_bytes()
        )
        return grpc.secure_channel(f"localhost:{port}", creds)


def enrol(a: tuple[PartyKeys, TrustStore], b: tuple[PartyKeys, TrustStore], now_ms: int) -> None:
    """Each side imports the other's bundle with the real fingerprint."""
    for (me, _), (_, other_trust) in ((a, b), (b, a)):
        bundle = me.bundle(now_ms)
        other_trust.import_bundle(bundle, expected_fingerprint=read_bundle(bundle).fingerprint)


@dataclass
class World:
    clock: FixedClock
    pki: Pki
    gateway: Courier
    connector: Connector
    running: RunningConnector
    channel: grpc.Channel
    stub: exchange_pb2_grpc.ExchangeServiceStub
    population: Population
    #: The gateway's exchange staff with their keys, and the roster of them the connector holds.
    staff: StaffKit

    def seal(
        self, message: exchange_pb2.QueryBatch | exchange_pb2.FetchAnswers | exchange_pb2.AcknowledgeAnswers
    ) -> bytes:
        return self.gateway.seal(message, UNIT)

    def open(self, reply: exchange_pb2.SealedMessage) -> Opened:
        return self.gateway.open(reply.envelope, expect=REPLY_TYPES)

    def submit(self, batch: exchange_pb2.QueryBatch) -> exchange_pb2.BatchReceipt:
        opened = self.open(self.stub.SubmitBatch(exchange_pb2.SealedMessage(envelope=self.seal(batch))))
        assert isinstance(opened.message, exchange_pb2.BatchReceipt)
        return opened.message

    def fetch(self, *batch_ids: str) -> exchange_pb2.AnswerSet:
        request = exchange_pb2.FetchAnswers(batch_ids=list(batch_ids))
        opened = self.open(self.stub.FetchAnswers(exchange_pb2.SealedMessage(envelope=self.seal(request))))
        assert isinstance(opened.message, exchange_pb2.AnswerSet)
        return opened.message

    def acknowledge(self, *batch_ids: str) -> exchange_pb2.AcknowledgeReceipt:
        request = exchange_pb2.AcknowledgeAnswers(batch_ids=list(batch_ids))
        opened = self.open(self.stub.AcknowledgeAnswers(exchange_pb2.SealedMessage(envelope=self.seal(request))))
        assert isinstance(opened.message, exchange_pb2.AcknowledgeReceipt)
        return opened.message

    def subjects(self, count: int, start: int = 0) -> list[exchange_pb2.QuerySubject]:
        """``count`` people of the synthetic population, each with an authorisation reference."""
        people = [m for h in self.population.households(count, start) for m in h.members][:count]
        return [
            exchange_pb2.QuerySubject(
                subject_ref=f"P{start + i:06d}",
                id_number=m.id_number,
                name=m.name,
                authorisation=exchange_pb2.Authorisation(
                    number=f"AUTH-{start + i:06d}", scan_sha256=hashlib.sha256(m.id_number.encode()).digest()
                ),
            )
            for i, m in enumerate(people)
        ]

    def batch(
        self, batch_id: str, subjects: list[exchange_pb2.QuerySubject], **overrides: object
    ) -> exchange_pb2.QueryBatch:
        batch = exchange_pb2.QueryBatch(
            batch_id=batch_id,
            # One commission per batch: a unit refuses subjects of a commission it received in another batch.
            commission_ref=f"WT-{batch_id}"[:64],
            purpose=exchange_pb2.PROGRAMME_MINIMUM_LIVING_ALLOWANCE,
            categories=[records_pb2.DATA_CATEGORY_TAX],
            income_from=records_pb2.YearMonth(year=2025, month=9),
            income_to=records_pb2.YearMonth(year=2026, month=2),
            assets_as_of=records_pb2.Date(year=2026, month=2, day=28),
            staff_ids=list(STAFF),
            subjects=subjects,
        )
        for name, value in overrides.items():
            batch.ClearField(name)  # type: ignore[arg-type]
            if isinstance(value, list):
                getattr(batch, name).extend(value)
            elif hasattr(value, "CopyFrom"):
                getattr(batch, name).CopyFrom(value)
            else:
                setattr(batch, name, value)
        if "approval" not in overrides:
            self.approve(batch)
        return batch

    def approve(self, batch: exchange_pb2.QueryBatch, staff: list[str] | None = None, *, at_ms: int = 0) -> None:
        """Give ``batch`` a valid approval proof for what it carries, as if its subjects were a whole commission
        asking this unit and NEIGHBOUR, with approvals of ``staff`` (its ``staff_ids`` by default) signed with
        their keys at ``at_ms`` (now by default). A batch whose content cannot have a proof (a threshold for a
        category not asked: refused before approvals are looked at) is left without one."""
        staff = list(batch.staff_ids) if staff is None else staff
        limits = {int(t.category): int(t.limit_fen) for t in batch.thresholds}
        mine = TreeUnit(UNIT, tuple(sorted(set(batch.categories))), tuple(sorted(limits.items())))
        if len(set(batch.categories)) != len(batch.categories) or not set(limits) <= set(mine.categories):
            return
        proved = prove(
            GATEWAY,
            batch.commission_ref,
            list(batch.subjects),
            [mine, NEIGHBOUR],
            programme=batch.purpose,
            income_from=(batch.income_from.year, batch.income_from.month),
            income_to=(batch.income_to.year, batch.income_to.month),
            assets_as_of=date(batch.assets_as_of.year, batch.assets_as_of.month, batch.assets_as_of.day),
        )
        made = proved.batch(
            batch.batch_id,
            UNIT,
            range(len(batch.subjects)),
            self.staff.approvals(proved.root, staff, at_ms or self.clock.now_ms()),
        )
        batch.ClearField("subjects")
        batch.subjects.extend(made.subjects)
        batch.approval.CopyFrom(made.approval)


REPLY_TYPES = {
    m.DESCRIPTOR.full_name: m
    for m in (exchange_pb2.BatchReceipt, exchange_pb2.AnswerSet, exchange_pb2.AcknowledgeReceipt)
}


@contextmanager
def exchange_world(
    root: Path,
    *,
    now_ms: int,
    database_url: str | None = None,
    adapter: Adapter | None = None,
    unit_category: int = records_pb2.UNIT_CATEGORY_TAX,
    threshold_categories: frozenset[int] = frozenset(),
    max_subjects: int = 500,
    unit_keys: tuple[PartyKeys, TrustStore] | None = None,
) -> Iterator[World]:
    """A connector for UNIT serving on 127.0.0.1 over mutual TLS, and GATEWAY's courier; all stopped on exit."""
    clock = FixedClock(now_ms)
    root.mkdir(parents=True, exist_ok=True)
    pki = Pki(root)
    server_cert, server_key = pki.issue(UNIT, server=True)
    pki.issue(GATEWAY)
    gateway_side = (PartyKeys.create(GATEWAY, now_ms=now_ms - 1), TrustStore())
    unit_side = unit_keys or (PartyKeys.create(UNIT, now_ms=now_ms - 1), TrustStore())
    enrol(gateway_side, unit_side, now_ms)
    store = ConnectorStore(make_engine(database_url or f"sqlite:///{root / 'connector.db'}"))
    population = Population(SEED)
    staff = StaffKit(GATEWAY, now_ms)
    for staff_id in STAFF:
        staff.enrol(staff_id)
    connector = Connector(
        courier=Courier(unit_side[0], unit_side[1], replay=store.replay, clock=clock),
        store=store,
        adapter=adapter or SyntheticAdapter(population, unit_category),
        unit_category=unit_category,
        calendar=WorkdayCalendar(),
        staff={GATEWAY: frozenset(STAFF)},
        threshold_categories=threshold_categories,
        max_subjects=max_subjects,
        rosters=staff.rosters(),
    )
    running = start(
        connector,
        listen="127.0.0.1:0",
        credentials=server_credentials(server_cert, server_key, pki.ca_path),
        worker_interval=None,
    )
    channel = pki.channel(GATEWAY, running.port)
    try:
        yield World(
            clock=clock,
            pki=pki,
            gateway=Courier(gateway_side[0], gateway_side[1], replay=MemoryReplayCache(), clock=clock),
            connector=connector,
            running=running,
            channel=channel,
            stub=exchange_pb2_grpc.ExchangeServiceStub(channel),
            population=population,
            staff=staff,
        )
    finally:
        channel.close()
        running.stop(grace=None)
