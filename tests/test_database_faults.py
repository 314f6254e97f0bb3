"""Database faults an operator can see: the database really fails (SQLite made read-only or removed, a PostgreSQL
role that can no longer log in and whose connections are cut), and the gateway and the connector count and log
each failure once a minute, export ``hedui_database_up`` and the last values read, never log a statement's
parameters, and work the batches a failed cycle had claimed as soon as the database is back, not after the lease."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hedui.v1 import records_pb2
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, create_engine, event, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError

from common.db import make_engine
from common.logs import LogThrottle, configure_logging
from common.workdays import WorkdayCalendar
from connectors.connector import Connector
from connectors.metrics import ConnectorMetrics
from connectors.server import AnswerWorker
from connectors.store import ConnectorStore
from connectors.synthetic import Population, SyntheticAdapter
from gateway.db import schema
from gateway.exchange.schedule import GatewayScheduler, JobIntervals, SchedulePolicy
from gateway.metrics import GatewayMetrics
from gateway.procedure.routing import route
from keys.clock import FixedClock
from keys.envelope import Courier
from keys.identity import PartyKeys
from keys.truststore import TrustStore
from tests.conftest_pg import postgres_schema, postgres_url
from tests.exchange_world import GATEWAY, SEED, STAFF, UNIT, beijing_ms
from tests.gateway_world import CATEGORIES, GatewayWorld, commission_input, gateway_world, subjects_of

MONDAY = beijing_ms(2026, 3, 16)  # inside the exchange window
#: A name that must never reach a log line, whatever fails.
MARK = "张三测试"
JOBS = "hedui_scheduler_job_runs_total"


class Ticker:
    """A monotonic clock the test moves (seconds)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Log:
    """Everything the process's log handler writes while the test runs, as JSON lines."""

    def __init__(self, stream: io.StringIO) -> None:
        self.stream = stream

    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self, message: str | None = None) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.text().splitlines()]
        return [line for line in lines if message is None or line["message"] == message]


@pytest.fixture
def log() -> Iterator[Log]:
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    configure_logging("INFO", json_lines=True, stream=stream)
    try:
        yield Log(stream)
    finally:
        for handler in [h for h in root.handlers if h.get_name() == "hedui"]:
            root.removeHandler(handler)
        root.setLevel(level)


def enqueue_with_mark(world: GatewayWorld, ref: str, households: int) -> None:
    """A commission whose first subject is named MARK."""
    subjects = subjects_of(world.population, ref, households)
    subjects[0] = dataclasses.replace(subjects[0], name=MARK)
    units = route(CATEGORIES, world.store.units.all())
    world.enqueue(commission_input(ref), subjects, units)


def make_scheduler(world: GatewayWorld, metrics: GatewayMetrics, ticker: Ticker) -> GatewayScheduler:
    return GatewayScheduler(
        store=world.store,
        engine=world.engine,
        workers=world.workers,
        policy=SchedulePolicy("continuous"),
        intervals=JobIntervals(),
        clock=world.clock,
        replica="test-1",
        lease_ms=120_000,
        key_check=lambda: None,
        metrics=metrics,
        log_clock=ticker,
    )


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


# -- nothing of a failed statement reaches the log ------------------------------------------------------------


def _log_every_way(error: BaseException) -> None:
    """Log a database error the ways code in and around the gateway does."""
    ours = logging.getLogger("hedui.test")
    try:
        raise RuntimeError("the job's work failed") from error
    except RuntimeError:
        ours.exception("job failed")
    ours.error("store write failed: %s", error)
    ours.error("store write failed", extra={"detail": str(error)})
    # APScheduler's executor and grpc's server log exceptions that escape a job or a handler this way.
    logging.getLogger("apscheduler.executors.default").error('Job "dispatch" raised an exception', exc_info=error)
    logging.getLogger("grpc._server").error("Exception calling application: %s", error, exc_info=error)


def test_sql_parameters_and_database_messages_never_reach_the_log_sqlite(tmp_path: Path, log: Log) -> None:
    """Regression: SQLAlchemy put a failed statement's parameters ("[parameters: ('张三测试', ...)]") into the text
    of its exceptions, and every ERROR line with a traceback carried them into the journal."""
    engine = make_engine(f"sqlite:///{tmp_path / 'people.db'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT UNIQUE)"))
        conn.execute(text("INSERT INTO people (name) VALUES (:name)"), {"name": MARK})
    with pytest.raises(IntegrityError) as caught, engine.begin() as conn:
        conn.execute(text("INSERT INTO people (name) VALUES (:name)"), {"name": MARK})
    engine.dispose()
    assert MARK not in str(caught.value)  # hide_parameters: not even the exception's own text has them
    _log_every_way(caught.value)
    assert MARK not in log.text()
    assert "[SQL:" not in log.text()
    lines = log.lines()
    assert len(lines) == 5
    assert "sqlalchemy.exc.IntegrityError [SQLITE_CONSTRAINT_UNIQUE] in INSERT" in lines[0]["exception"]
    assert "Traceback (most recent call last)" in lines[0]["exception"]  # the frames stay: they hold code only
    assert "RuntimeError: the job's work failed" in lines[0]["exception"]
    assert "was the direct cause of the following exception" in lines[0]["exception"]
    assert (
        lines[1]["message"] == "store write failed: sqlalchemy.exc.IntegrityError [SQLITE_CONSTRAINT_UNIQUE] in INSERT"
    )


@pytest.mark.postgres
def test_sql_parameters_and_database_messages_never_reach_the_log_postgres(log: Log) -> None:
    """Regression: PostgreSQL quotes the row in its message ("DETAIL: Key (name)=(张三测试) already exists."), which
    no parameter hiding removes; the log keeps only the class and the SQLSTATE."""
    with postgres_schema() as url:
        engine = make_engine(url)
        try:
            with engine.begin() as conn:
                conn.execute(text("CREATE TABLE people (id SERIAL PRIMARY KEY, name TEXT UNIQUE)"))
                conn.execute(text("INSERT INTO people (name) VALUES (:name)"), {"name": MARK})
            with pytest.raises(IntegrityError) as caught, engine.begin() as conn:
                conn.execute(text("INSERT INTO people (name) VALUES (:name)"), {"name": MARK})
        finally:
            engine.dispose()
    assert MARK in str(caught.value.orig)  # the server's DETAIL quotes the value...
    _log_every_way(caught.value)
    assert MARK not in log.text()  # ...and the log never does
    assert "DETAIL" not in log.text() and "[SQL:" not in log.text()
    first = log.lines()[0]
    assert "sqlalchemy.exc.IntegrityError [23505] in INSERT" in first["exception"]


# -- SQLite read-only: jobs fail at their lease -----------------------------------------------------------------


@contextmanager
def read_only(engine: Engine) -> Iterator[None]:
    """Every connection of ``engine`` refuses writes (as SQLite does on a file system remounted read-only after an
    I/O error, or a disk that cannot take a journal page); the connections open now are replaced."""

    def refuse_writes(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA query_only = ON")

    event.listen(engine, "connect", refuse_writes)
    engine.dispose()
    try:
        yield
    finally:
        event.remove(engine, "connect", refuse_writes)
        engine.dispose()


def test_jobs_failing_at_their_lease_are_counted_and_logged_once_a_minute(tmp_path: Path, log: Log) -> None:
    """Regression: while the database refused writes, every job failed taking its lease, before the code that
    counted failures: outcome="failed" stayed 0, the log had only APScheduler's line (with the database's
    message) hundreds of times, and the database-backed series vanished from the scrape."""
    ticker = Ticker()
    metrics = GatewayMetrics(CollectorRegistry(), clock=ticker)
    with gateway_world(tmp_path, now_ms=MONDAY, metrics=metrics) as world:
        enqueue_with_mark(world, "WT-1", households=3)
        scheduler = make_scheduler(world, metrics, ticker)
        registry = metrics.registry
        assert value(registry, "hedui_database_up") == 1
        assert value(registry, "hedui_database_scrape_age_seconds") == 0
        queued = value(registry, "hedui_outbox_depth", unit="unit.220100.tax")
        assert queued
        with read_only(world.store.engine):
            for _ in range(5):
                assert scheduler.run_job("dispatch", scheduler.dispatch) is False  # never raises to APScheduler
            for _ in range(3):
                assert scheduler.run_job("deadline-sweep", scheduler.sweep) is False
            assert value(registry, JOBS, task="dispatch", outcome="failed") == 5
            assert value(registry, JOBS, task="deadline-sweep", outcome="failed") == 3
            failed = log.lines("job failed")
            assert [line["job"] for line in failed] == ["dispatch", "deadline-sweep"]
            for line in failed:
                assert line["level"] == "ERROR" and line["stage"] == "lease" and line["error"] == "OperationalError"
                assert line["db_code"].startswith("SQLITE_READONLY") and "exception" not in line
            # Reads still work on a read-only disk: the scrape reads, but the gauge says the database is not usable.
            ticker.now += 20
            assert value(registry, "hedui_database_up") == 0
            assert value(registry, "hedui_outbox_depth", unit="unit.220100.tax") == queued
            # A minute on, one more line stands for the runs in between.
            ticker.now += 45
            assert scheduler.run_job("dispatch", scheduler.dispatch) is False
            assert scheduler.run_job("dispatch", scheduler.dispatch) is False
            later = log.lines("job failed")[2:]
            assert [(line["job"], line["repeated"], line["failures"]) for line in later] == [("dispatch", 4, 6)]
        assert scheduler.run_job("dispatch", lambda: None)
        assert log.lines("job recovered") == [
            {**log.lines("job recovered")[0], "job": "dispatch", "failures": 7, "level": "INFO"}
        ]
        assert value(registry, JOBS, task="dispatch", outcome="ok") == 1
        assert value(registry, "hedui_database_up") == 0  # a minute after the last failure...
        ticker.now += 61
        assert value(registry, "hedui_database_up") == 1  # ...it is up again
    assert not [line for line in log.lines() if line["logger"].startswith("apscheduler")]
    assert MARK not in log.text()


# -- PostgreSQL: the role cannot log in and its connections are cut mid-exchange --------------------------------


@dataclasses.dataclass
class PostgresOutage:
    """A database and role of the test's own on the real server, which it takes away and gives back."""

    admin: Engine
    role: str
    url: str

    def begin(self) -> None:
        with self.admin.connect() as conn:
            conn.execute(text(f'ALTER ROLE "{self.role}" NOLOGIN'))
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = :role"),
                {"role": self.role},
            )

    def end(self) -> None:
        with self.admin.connect() as conn:
            conn.execute(text(f'ALTER ROLE "{self.role}" LOGIN'))


@pytest.fixture
def outage() -> Iterator[PostgresOutage]:
    base = make_url(postgres_url())
    name = f"hedui_fault_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE ROLE "{name}" LOGIN'))
        conn.execute(text(f'CREATE DATABASE "{name}" OWNER "{name}"'))
    url = base.set(username=name, password=None, database=name).render_as_string(hide_password=False)
    try:
        yield PostgresOutage(admin, name, url)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER ROLE "{name}" LOGIN'))
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = :r"), {"r": name})
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
            conn.execute(text(f'DROP ROLE IF EXISTS "{name}"'))
        admin.dispose()


@pytest.mark.postgres
def test_claims_of_a_cycle_cut_off_by_a_database_outage_are_worked_again_when_it_returns(
    tmp_path: Path, log: Log, outage: PostgresOutage
) -> None:
    """Regression: a batch claimed when PostgreSQL went away mid-exchange waited out the whole claim lease (120 s)
    after the database was back; now the next cycle of its unit takes it at once, at the same clock time."""
    ticker = Ticker()
    metrics = GatewayMetrics(CollectorRegistry(), clock=ticker)
    with gateway_world(tmp_path, now_ms=MONDAY, database_url=outage.url, metrics=metrics) as world:
        enqueue_with_mark(world, "WT-1", households=3)
        scheduler = make_scheduler(world, metrics, ticker)
        registry = metrics.registry
        tax = "unit.220100.tax"
        before = value(registry, "hedui_outbox_depth", unit=tax)
        assert before and value(registry, "hedui_unit_up", unit=tax) == 1

        # The database goes the moment the gateway records the tax bureau's receipt: the unit has the batch, the
        # gateway's claim on it stays behind.
        cut: list[str] = []

        def outage_at_receipt(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
            if not cut and statement.startswith("UPDATE batches") and "receipt_envelope" in statement:
                cut.append("now")
                outage.begin()

        event.listen(world.store.engine, "before_cursor_execute", outage_at_receipt)
        reports = world.workers.run_once(dispatch=True)
        event.remove(world.store.engine, "before_cursor_execute", outage_at_receipt)
        assert cut and any(r.error == "internal" for r in reports)

        # While it is down: jobs fail at their lease, counted and logged once; the scrape keeps the last values.
        for _ in range(4):
            assert scheduler.run_job("dispatch", scheduler.dispatch) is False
        assert value(registry, JOBS, task="dispatch", outcome="failed") == 4
        (failed,) = log.lines("job failed")
        assert (failed["job"], failed["stage"], failed["error"]) == ("dispatch", "lease", "OperationalError")
        ticker.now += 30
        assert value(registry, "hedui_database_up") == 0
        assert value(registry, "hedui_outbox_depth", unit=tax) == before
        assert value(registry, "hedui_unit_up", unit=tax) == 1
        assert value(registry, "hedui_database_scrape_age_seconds") == 30
        assert log.lines("metrics: database not readable; exporting the last values read")

        # The database is back; the clock has not moved, so no claim lease has run out.
        outage.end()
        with world.store.engine.connect() as conn:
            stuck = conn.execute(
                select(schema.batches.c.batch_id, schema.batches.c.unit_id).where(
                    schema.batches.c.claimed_by.is_not(None)
                )
            ).all()
        assert stuck, "the cut-off cycle left no claim behind: the test did not cut where it meant to"

        def dispatch_and_wait() -> None:
            world.workers.run_once(dispatch=True)

        assert scheduler.run_job("dispatch", dispatch_and_wait)
        assert log.lines("job recovered")[0]["failures"] == 4
        with world.store.engine.connect() as conn:
            states = dict(
                conn.execute(
                    select(schema.batches.c.batch_id, schema.batches.c.state).where(
                        schema.batches.c.batch_id.in_([b for b, _ in stuck])
                    )
                ).all()
            )
        assert set(states.values()) == {"receipted"}, states
        assert log.lines("claims of a failed cycle released")
        ticker.now += 61
        assert value(registry, "hedui_database_up") == 1
        assert value(registry, "hedui_database_scrape_age_seconds") == 0
    text_of_log = log.text()
    assert MARK not in text_of_log and "[SQL:" not in text_of_log and "parameters" not in text_of_log
    for line in log.lines("unit cycle failed"):
        assert line["error"] == "OperationalError" and "exception" not in line


# -- the connector -----------------------------------------------------------------------------------------------


def test_connector_store_gone_keeps_its_last_values_and_logs_once_a_minute(tmp_path: Path, log: Log) -> None:
    """Regression: when the connector's store could not be read, hedui_connector_pending_batches vanished from
    the scrape and the answer worker logged a traceback (with the database's message) every turn."""
    ticker = Ticker()
    metrics = ConnectorMetrics(CollectorRegistry(), clock=ticker)
    folder = tmp_path / "store"
    folder.mkdir()
    engine = make_engine(f"sqlite:///{folder / 'connector.db'}")
    store = ConnectorStore(engine)
    metrics.watch_store(store.engine)
    registry = metrics.registry
    assert value(registry, "hedui_connector_pending_batches") == 0
    assert value(registry, "hedui_database_up") == 1

    party = PartyKeys.create(UNIT, now_ms=MONDAY - 1)
    connector = Connector(
        courier=Courier(party, TrustStore(), replay=store.replay, clock=FixedClock(MONDAY)),
        store=store,
        adapter=SyntheticAdapter(Population(SEED), records_pb2.UNIT_CATEGORY_TAX),
        unit_category=records_pb2.UNIT_CATEGORY_TAX,
        calendar=WorkdayCalendar(),
        staff={GATEWAY: frozenset(STAFF)},
        metrics=metrics,
    )

    shutil.rmtree(folder)  # the store's folder is gone (a disk unmounted, a volume lost)
    engine.dispose()
    with pytest.raises(OperationalError):
        store.pending(1)
    worker = AnswerWorker(connector, interval=0.01, retention_days=30)
    worker.start()
    time.sleep(0.5)  # some fifty turns, every one failing on the store
    worker.stop()
    (failed,) = log.lines("answer worker iteration failed")
    assert failed["error"] == "OperationalError" and failed["db_code"] == "SQLITE_CANTOPEN"
    assert "exception" not in failed
    ticker.now += 45
    assert value(registry, "hedui_database_up") == 0
    assert value(registry, "hedui_connector_pending_batches") == 0  # the last value read
    assert value(registry, "hedui_database_scrape_age_seconds") == 45
    assert len(log.lines("metrics: database not readable; exporting the last values read")) == 1
    engine.dispose()


def test_log_throttle_lets_one_line_a_minute_through_and_counts_the_rest() -> None:
    ticker = Ticker()
    throttle = LogThrottle(60.0, clock=ticker)
    assert throttle.admit("dispatch") == 0
    assert [throttle.admit("dispatch") for _ in range(3)] == [None, None, None]
    assert throttle.admit("poll") == 0  # each key on its own
    ticker.now += 60
    assert throttle.admit("dispatch") == 3
    assert throttle.forget("dispatch") == 0
    assert throttle.admit("dispatch") == 0  # forgotten: the next one is news


def test_a_store_gone_before_the_first_scrape_still_exports_its_age(tmp_path: Path, log: Log) -> None:
    """The on-call drill: a database lost before anyone scraped left only hedui_database_up 0, and no age to say how
    long the process had been blind. The age now counts from the start until a read succeeds."""
    ticker = Ticker()
    metrics = ConnectorMetrics(CollectorRegistry(), clock=ticker)
    folder = tmp_path / "store"
    folder.mkdir()
    engine = make_engine(f"sqlite:///{folder / 'connector.db'}")
    store = ConnectorStore(engine)
    metrics.watch_store(store.engine)
    shutil.rmtree(folder)
    engine.dispose()
    ticker.now += 40
    registry = metrics.registry
    assert value(registry, "hedui_database_up") == 0
    assert value(registry, "hedui_database_scrape_age_seconds") == 40
    assert value(registry, "hedui_connector_pending_batches") is None  # nothing was ever read: nothing to repeat
