"""The connector's metrics: batches received and answered, refusals by reason, delay notices and the pending
backlog, next to the envelope and gRPC metrics every Hedui service has (docs/operations.md).

Labels take values from small fixed sets: answer statuses and refusal reason codes defined in this package.
Batch ids, gateway-chosen references, ID numbers and names never become label values.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from hedui.v1 import exchange_pb2
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from common.db import reading
from common.metrics import (
    CalendarCollector,
    ServiceMetrics,
    TrustMetrics,
    trust_backlog_described,
    trust_backlog_families,
)
from common.rosterstore import ROSTER_ITEM
from common.trustitems import TrustItemStore
from common.workdays import WorkdayCalendar
from connectors import store as cstore
from keys.errors import ENVELOPE_ERRORS
from keys.trustsync import kind_name

if TYPE_CHECKING:
    from connectors.connector import Connector
    from connectors.trust.renewal import CertificateRenewal

log = logging.getLogger("hedui.connector.metrics")


def status_name(status: int) -> str:
    """SUBJECT_STATUS_NO_RECORD -> "no_record"."""
    return exchange_pb2.SubjectStatus.Name(status).removeprefix("SUBJECT_STATUS_").lower()  # type: ignore[arg-type]


SUBJECT_STATUSES = tuple(status_name(v) for v in exchange_pb2.SubjectStatus.values() if v)
#: Reason codes of a refused certificate (keys/csr.py, connectors/trust/renewal.py): the label values of
#: hedui_connector_certificates_refused_total ("other" for anything else).
CERTIFICATE_REFUSALS = (
    "certificate_unreadable",
    "certificate_wrong_ca",
    "certificate_not_requested",
    "certificate_key_missing",
    "certificate_wrong_names",
    "certificate_wrong_usage",
    "certificate_is_ca",
    "certificate_not_valid",
    "certificate_not_written",
)


class ConnectorMetrics:
    """Every metric the connector exports, in ``registry``."""

    def __init__(self, registry: CollectorRegistry, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.service = ServiceMetrics(registry, (error.code for error in ENVELOPE_ERRORS), clock=clock)
        self.batches_received = Counter(
            "hedui_connector_batches_received_total",
            "Query batches accepted (a batch submitted again is receipted again but counted once).",
            registry=registry,
        )
        self.subjects_answered = Counter(
            "hedui_connector_subjects_answered_total",
            "Subjects answered, by answer status.",
            ["status"],
            registry=registry,
        )
        for status in SUBJECT_STATUSES:
            self.subjects_answered.labels(status)
        self.refusals = Counter(
            "hedui_connector_refusals_total",
            "Requests refused, by reason code (envelope_* for envelopes that did not open).",
            ["reason"],
            registry=registry,
        )
        self.delay_notices = Counter(
            "hedui_connector_delay_notices_total",
            "Delay notices (clause 12) issued by this process: automatic ones when an adapter failure reaches the due "
            "date ('hedui-connector delay' records its notices from a process of its own).",
            registry=registry,
        )

        #: Trust synchronisations with gateways and the keys' lifetimes (common/metrics.py).
        self.trust = TrustMetrics(registry)
        self.adapter_failures = Counter(
            "hedui_connector_adapter_failures_total",
            "Attempts to answer a batch from the unit's data that failed (database down, a query that no longer fits "
            "its schema); the batch stays pending and is tried again after a growing pause.",
            registry=registry,
        )

        self.certificates_refused = Counter(
            "hedui_connector_certificates_refused_total",
            "Certificates a gateway sent in answer to the unit's certificate request that the unit refused (not our "
            "CA's, not for the pending key, other names or usages, not valid), by reason; nothing was installed.",
            ["reason"],
            registry=registry,
        )

    def watch_store(self, engine: Engine) -> None:
        """Export the number of batches waiting for an answer, read from the store at scrape time, with
        ``hedui_database_up``; while the store cannot be read the last value read stays exported."""
        self.service.watch_database(_PendingReader(engine))

    def database_failed(self) -> None:
        """Work of this process (the answer worker) failed on the store: hedui_database_up goes to 0."""
        self.service.database.failed()

    def watch_calendar(self, calendar: Callable[[], WorkdayCalendar], clock: Callable[[], float] = time.time) -> None:
        """Export ``hedui_calendar_known_until`` of the calendar ``calendar()`` returns at scrape time."""
        self.registry.register(CalendarCollector(calendar, clock))

    def watch_rosters(self, connector: Connector) -> None:
        """Export roster changes not yet in force (per party, the unit's own included), the gateways that have not
        acknowledged the unit's roster, and whether answers are held back for want of staff on duty."""
        self.registry.register(_RosterCollector(connector))

    def watch_renewal(self, renewal: CertificateRenewal) -> None:
        """Export the state of the unit's certificate renewal (a request outstanding, how long it has waited) and
        count the certificates it refused, by reason."""
        self.registry.register(_RenewalCollector(renewal))
        for reason in CERTIFICATE_REFUSALS:
            self.certificates_refused.labels(reason)
        renewal.on_refused = self.certificate_refused

    def certificate_refused(self, reason: str) -> None:
        """A certificate sent in answer to our request was refused (keys/csr.py reason codes)."""
        self.certificates_refused.labels(reason if reason in CERTIFICATE_REFUSALS else "other").inc()

    def answered(self, statuses: Iterable[int]) -> None:
        # One increment per status rather than per subject: a batch of thousands has a handful of statuses, and a
        # labelled increment costs more than counting in a dict.
        tally: dict[int, int] = {}
        for status in statuses:
            tally[status] = tally.get(status, 0) + 1
        for status, count in tally.items():
            self.subjects_answered.labels(status_name(status)).inc(count)


_PENDING = "Query batches received and not yet answered."


class _PendingReader:
    """The store-backed series (a DatabaseReader: common.metrics exports it with its age)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("hedui_connector_pending_batches", _PENDING)
        yield from trust_backlog_described()

    def read(self) -> list[Metric]:
        query = select(func.count()).select_from(cstore.batches).where(cstore.batches.c.state == "pending")
        with reading(self.engine) as conn:
            pending = int(conn.execute(query).scalar_one())
        items = TrustItemStore(self.engine, cstore.trust_items, cstore.trust_deliveries)
        backlog = items.backlog(int(time.time() * 1000))
        trust = trust_backlog_families((p, kind_name(k), n, age / 1000) for p, k, n, age in backlog)
        return [GaugeMetricFamily("hedui_connector_pending_batches", _PENDING, value=pending), *trust]


_ROSTER_PENDING = (
    "Roster versions held (the unit's own and each gateway's) that are not yet in force (Procedure V.(三))."
)
_ROSTER_UNACKED = (
    "Seconds since the oldest version of the unit's roster that the gateway has not acknowledged was published."
)
_STAFF_SHORT = (
    "1 while the answer worker holds answers back because fewer registered exchange staff are on duty than "
    "[exchange] answer_staff ('hedui-connector roster on-duty')."
)


class _RosterCollector(Collector):
    """Roster series read at scrape time from the connector's store."""

    def __init__(self, connector: Connector) -> None:
        from connectors.trust.items import TrustItems  # noqa: PLC0415 - the trust wing imports this package's store

        self.connector = connector
        self.items = TrustItems(connector.store.engine)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily("hedui_connector_roster_changes_pending", _ROSTER_PENDING, labels=["party"]),
            GaugeMetricFamily("hedui_connector_roster_unacknowledged_seconds", _ROSTER_UNACKED, labels=["gateway"]),
            GaugeMetricFamily("hedui_connector_answer_staff_short", _STAFF_SHORT),
        )

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        pending, unacked, short = self._families()
        connector = self.connector
        now = connector.courier.clock.now_ms()
        try:
            if connector.rosters is not None:
                for party, count in sorted(connector.rosters.pending(now).items()):
                    pending.add_metric([party], float(count))
            for peer, kind, age_ms in self.items.unacknowledged(now):
                if kind == ROSTER_ITEM:
                    unacked.add_metric([peer], age_ms / 1000)
        except SQLAlchemyError as exc:  # a store that cannot be read is hedui_database_up's business
            log.debug("roster metrics not read", extra={"error": type(exc).__name__})
        short.add_metric([], 1.0 if connector.short_of_staff else 0.0)
        yield from (pending, unacked, short)


_REQUEST_PENDING = (
    "1 while the unit's certificate request waits for its certificate (a new key is pending at the unit), else 0."
)
_REQUEST_AGE = "Seconds the unit's outstanding certificate request has waited for its certificate."


class _RenewalCollector(Collector):
    """The certificate renewal's state, read at scrape time from the connector's store."""

    def __init__(self, renewal: CertificateRenewal) -> None:
        self.renewal = renewal

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily("hedui_connector_certificate_request_pending", _REQUEST_PENDING),
            GaugeMetricFamily("hedui_connector_certificate_request_age_seconds", _REQUEST_AGE),
        )

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        pending, age = self._families()
        try:
            waiting, seconds = self.renewal.metrics()
        except SQLAlchemyError as exc:  # a store that cannot be read is hedui_database_up's business
            log.debug("renewal metrics not read", extra={"error": type(exc).__name__})
            return
        pending.add_metric([], float(waiting))
        age.add_metric([], seconds or 0.0)
        yield from (pending, age)
