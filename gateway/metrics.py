"""The gateway's metrics: what the exchange does per unit, what the scheduler and the API do, and what the
database holds (read at scrape time). docs/operations.md lists them with the alerts and the dashboard built on them.

Clause 22 asks for statistics on volumes, delays and hit rates per unit; the unit label is the party id of a
configured sharing unit, so every label takes values from a small fixed set. Batch ids, commission ids, ID numbers
and names never become label values.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

from hedui.v1 import agency_pb2
from prometheus_client import CollectorRegistry, Counter, Histogram
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
from common.trustitems import TrustItemStore
from common.workdays import WorkdayCalendar
from gateway.db import schema as s
from gateway.exchange.transport import APPROVAL_REASONS, DEFERRED_REASONS
from gateway.procedure.commission import STATE_TO_PB
from keys.errors import ENVELOPE_ERRORS
from keys.trustsync import kind_name

log = logging.getLogger("hedui.gateway.metrics")

#: SubmitBatch until the receipt is stored: a network call and two database writes.
ROUND_TRIP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_HOUR, _DAY = 3600.0, 86400.0
#: The unit's receipt until the answer is stored here: minutes for a system exchange, days when a unit answers by
#: hand; clause 12 allows 7 working days (about 9 calendar days) and 5 more with a delay notice.
ANSWER_BUCKETS = (
    60.0, 300.0, 900.0, _HOUR, 4 * _HOUR, 12 * _HOUR, _DAY, 2 * _DAY, 4 * _DAY, 7 * _DAY, 9 * _DAY, 12 * _DAY,
    16 * _DAY, 21 * _DAY,
)  # fmt: skip
JOB_OUTCOMES = ("ok", "failed", "skipped")
#: What starts a trust synchronisation with a unit (gateway/trust/schedule.py; refresh: gateway/exchange/engine.py).
TRUST_TRIGGERS = ("start", "interval", "items", "requested", "refresh")
#: Delay notices already counted, remembered per process (a pending batch carries its notice on every poll).
_SEEN_DELAYS_LIMIT = 10_000


def _decision_name(value: int) -> str:
    return agency_pb2.Decision.Name(value).removeprefix("DECISION_").lower()  # type: ignore[arg-type]


DECISIONS = tuple(_decision_name(v) for v in agency_pb2.Decision.values() if v)

#: Roster state at scrape time: (versions not in force per party, seconds each unit has not acknowledged our roster).
RosterReader = Callable[[], tuple[dict[str, int], dict[str, float]]]
#: Reason codes of a refused certificate request: the label values of hedui_certificate_requests_refused_total
#: ("other" for anything else).
CSR_REFUSALS = (
    "csr_unreadable",
    "csr_bad_signature",
    "csr_wrong_key_type",
    "csr_wrong_party",
    "csr_bad_names",
    "csr_bad_usage",
    "csr_usage_changed",
    "csr_usage_not_allowed",
    "csr_key_reused",
    "csr_names_changed",
    "csr_names_not_allowed",
)
#: Key expiry as (party id, algorithm name, days until the key stops being valid).
KeyExpiries = Callable[[], Iterable[tuple[str, str, float]]]


class GatewayMetrics:
    """Every metric the gateway exports, in ``registry``; the engine, scheduler and API report through it."""

    def __init__(self, registry: CollectorRegistry, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.service = ServiceMetrics(registry, (error.code for error in ENVELOPE_ERRORS), clock=clock)
        self.queries_sent = Counter(
            "hedui_queries_sent_total",
            "Subjects in query batches a unit receipted (a batch sent again after the unit lost it counts again).",
            ["unit"],
            registry=registry,
        )
        self.queries_answered = Counter(
            "hedui_queries_answered_total", "Answers stored, one per subject and unit.", ["unit"], registry=registry
        )
        self.receipts = Counter(
            "hedui_receipts_total",
            "Signed batch receipts stored (clause 12's clock starts).",
            ["unit"],
            registry=registry,
        )
        self.batch_round_trip = Histogram(
            "hedui_batch_round_trip_seconds",
            "From the SubmitBatch call until the unit's receipt is stored.",
            ["unit"],
            buckets=ROUND_TRIP_BUCKETS,
            registry=registry,
        )
        self.answer_latency = Histogram(
            "hedui_answer_latency_seconds",
            "Per batch, from the time the unit received it (its receipt) until its answers are stored here.",
            ["unit"],
            buckets=ANSWER_BUCKETS,
            registry=registry,
        )
        self.delay_notices = Counter(
            "hedui_delay_notices_total",
            "Delay notices seen (clause 12); accepted=false when the new due date is more than 5 working days late.",
            ["unit", "accepted"],
            registry=registry,
        )
        self.unit_retries = Counter(
            "hedui_unit_retries_total",
            "Unit cycles that failed on the transport, health probes included (the unit backs off and is tried again).",
            ["unit"],
            registry=registry,
        )
        self.unit_cycle_errors = Counter(
            "hedui_unit_cycle_errors_total",
            "Unit cycles that ended in an unexpected error on the gateway's side (logged as 'unit cycle failed' with "
            "its traceback); the unit is tried again at the next cycle.",
            ["unit"],
            registry=registry,
        )
        self.job_runs = Counter(
            "hedui_scheduler_job_runs_total",
            "Scheduler job runs by outcome; skipped when another replica holds the job's lease.",
            ["task", "outcome"],
            registry=registry,
        )
        self.unit_refusals = Counter(
            "hedui_unit_refusals_total",
            "Query batches a unit refused, by the unit's reason code (docs/exchange.md, Refusals; approval_* and "
            "approver_*: the unit did not accept our staff's exchange approvals). Every refusal counts, a batch "
            "refused again after a retry too; codes outside the known set are counted as other.",
            ["unit", "reason"],
            registry=registry,
        )
        self.approval_feedback = Counter(
            "hedui_approval_feedback_total",
            "Approval feedback decisions recorded (Procedure IV), by decision.",
            ["decision"],
            registry=registry,
        )
        for decision in DECISIONS:
            self.approval_feedback.labels(decision)
        self.answers_staff_unverified = Counter(
            "hedui_answers_staff_unverified_total",
            "Answer sets stored without checking the unit staff they name (Procedure V.(二)): the gateway held no "
            "version of the unit's roster in force at the answer's time.",
            ["unit"],
            registry=registry,
        )
        self.answers_staff_refused = Counter(
            "hedui_answers_staff_refused_total",
            "Answer sets not stored because the unit staff they name are not on the unit's roster, active, at the "
            "answer's time (or none are named, or the time is impossible), by reason; the batch is polled again.",
            ["unit", "reason"],
            registry=registry,
        )
        #: Trust synchronisations with units and the keys' lifetimes (common/metrics.py).
        self.trust = TrustMetrics(registry)
        self.certificate_requests_refused = Counter(
            "hedui_certificate_requests_refused_total",
            "Units' certificate requests refused at receipt (unreadable, not signed by their key, another party, "
            "other names or usages than allowed, the current key again), by reason; nothing was kept.",
            ["reason"],
            registry=registry,
        )
        for reason in CSR_REFUSALS:
            self.certificate_requests_refused.labels(reason)
        self._seen_delays: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._lock = threading.Lock()

    # -- set-up ------------------------------------------------------------------------------------------------

    def add_units(self, unit_ids: Iterable[str]) -> None:
        """Create the per-unit series at zero, so that rates and alerts see a unit before its first event."""
        unit_ids = list(unit_ids)
        for unit in unit_ids:
            for family in (
                self.queries_sent,
                self.queries_answered,
                self.receipts,
                self.unit_retries,
                self.unit_cycle_errors,
            ):
                family.labels(unit)
            self.batch_round_trip.labels(unit)
            self.answer_latency.labels(unit)
            self.answers_staff_unverified.labels(unit)
            for accepted in ("true", "false"):
                self.delay_notices.labels(unit, accepted)
            # At zero, so that the first approval refusal of a unit is an increase its alert sees.
            for reason in sorted(APPROVAL_REASONS | DEFERRED_REASONS):
                self.unit_refusals.labels(unit, reason)
        self.trust.add_peers(unit_ids, TRUST_TRIGGERS)

    def add_jobs(self, names: Iterable[str]) -> None:
        for name in names:
            for outcome in JOB_OUTCOMES:
                self.job_runs.labels(name, outcome)

    def watch_store(self, engine: Engine) -> None:
        """Export outbox depth, overdue items, failed batches, unit availability and commissions by state from the
        database, read when Prometheus scrapes (a few COUNT queries on indexed columns), with ``hedui_database_up``;
        while the database cannot be read the last values read stay exported (common.metrics.watch_database)."""
        self.service.watch_database(_StoreReader(engine))

    def watch_keys(self, expiries: KeyExpiries) -> None:
        """Export days until retiring keys (ours and the units') stop being valid, read at scrape time."""
        self.registry.register(_KeyCollector(expiries))

    def watch_calendar(self, calendar: Callable[[], WorkdayCalendar], clock: Callable[[], float] = time.time) -> None:
        """Export ``hedui_calendar_known_until`` of the calendar ``calendar()`` returns at scrape time (the one the
        deadline sweep uses: the holiday file re-read)."""
        self.registry.register(CalendarCollector(calendar, clock))

    # -- events ------------------------------------------------------------------------------------------------

    def receipted(self, unit: str, subjects: int, round_trip_seconds: float) -> None:
        self.receipts.labels(unit).inc()
        self.queries_sent.labels(unit).inc(subjects)
        self.batch_round_trip.labels(unit).observe(round_trip_seconds)

    def answered(self, unit: str, answers: int, latency_seconds: float | None) -> None:
        self.queries_answered.labels(unit).inc(answers)
        if latency_seconds is not None:
            self.answer_latency.labels(unit).observe(max(0.0, latency_seconds))

    def delay_notice(self, unit: str, batch_id: str, new_due: str, *, accepted: bool) -> None:
        """Count a delay notice once, however often the unit repeats it on later polls."""
        key = (batch_id, new_due)
        with self._lock:
            if key in self._seen_delays:
                return
            self._seen_delays[key] = None
            if len(self._seen_delays) > _SEEN_DELAYS_LIMIT:
                self._seen_delays.popitem(last=False)
        self.delay_notices.labels(unit, "true" if accepted else "false").inc()

    def answer_staff_unverified(self, unit: str) -> None:
        self.answers_staff_unverified.labels(unit).inc()

    def answer_staff_refused(self, unit: str, reason: str) -> None:
        self.answers_staff_refused.labels(unit, reason).inc()

    def watch_certificate_requests(self, reader: Callable[[], dict[str, float]]) -> None:
        """Export, per unit, how long its certificate request has waited to be signed (``reader()``: unit ->
        seconds, read at scrape time)."""
        self.registry.register(_CertificateRequestCollector(reader))

    def certificate_request_refused(self, reason: str) -> None:
        """A unit's certificate request was refused (keys/csr.py and gateway/certificates/requests.py codes)."""
        self.certificate_requests_refused.labels(reason if reason in CSR_REFUSALS else "other").inc()

    def watch_rosters(self, reader: RosterReader) -> None:
        """Export roster changes not yet in force per party (ours and the units') and the units that have not
        acknowledged our roster, read at scrape time."""
        self.registry.register(_RosterCollector(reader))

    def unit_refused(self, unit: str, reason: str) -> None:
        """A unit refused a batch (``reason``: a label from gateway.exchange.transport.reason_label)."""
        self.unit_refusals.labels(unit, reason).inc()

    def unit_failed(self, unit: str) -> None:
        self.unit_retries.labels(unit).inc()

    def cycle_failed(self, unit: str) -> None:
        self.unit_cycle_errors.labels(unit).inc()

    def job_run(self, job: str, outcome: str) -> None:
        self.job_runs.labels(job, outcome).inc()

    def database_failed(self) -> None:
        """Work of this process (a job, a unit cycle) failed on the database: hedui_database_up goes to 0."""
        self.service.database.failed()

    def feedback(self, decisions: Iterable[int]) -> None:
        for decision in decisions:
            self.approval_feedback.labels(_decision_name(decision)).inc()


_UNIT_UP = (
    "Whether the last call to the unit, an exchange call or a health probe, succeeded (1) or it is backing off after "
    "failures (0). Idle units are probed every [exchange] probe_interval_seconds."
)
_OUTBOX = "Subjects waiting to be sent to the unit: queued items not yet in a batch, and batches ready to send."
_OVERDUE = "Subjects in batches past their clause-12 due date without an answer (marked by the deadline sweep)."
_COMMISSIONS = "Commissions by workflow state."
_FAILED = (
    "Batches the unit refused for good (state failed): they wait for an operator, who fixes the cause and runs "
    "'hedui-gateway resend'."
)


class _StoreReader:
    """The database-backed series (a DatabaseReader: common.metrics exports them with their age)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily("hedui_unit_up", _UNIT_UP, labels=["unit"]),
            GaugeMetricFamily("hedui_outbox_depth", _OUTBOX, labels=["unit"]),
            GaugeMetricFamily("hedui_queries_overdue", _OVERDUE, labels=["unit"]),
            GaugeMetricFamily("hedui_commissions", _COMMISSIONS, labels=["state"]),
            GaugeMetricFamily("hedui_batches_failed", _FAILED, labels=["unit"]),
        )

    def describe(self) -> Iterator[Metric]:
        return iter([*self._families(), *trust_backlog_described()])

    def read(self) -> list[Metric]:
        up, outbox, overdue, commissions, failed = self._families()
        items = TrustItemStore(self.engine, s.trust_items, s.trust_deliveries)
        backlog = items.backlog(int(time.time() * 1000))
        with reading(self.engine) as conn:
            units = conn.execute(
                select(s.units.c.unit_id, s.units.c.consecutive_failures).where(
                    s.units.c.enabled.is_(True), s.units.c.exchange_mode != "media"
                )
            ).all()
            # One query per unit keeps each on the queue index's (unit_id, batch_id) prefix.
            queued = {
                u.unit_id: conn.execute(
                    select(func.count())
                    .select_from(s.items)
                    .where(
                        s.items.c.unit_id == u.unit_id,
                        s.items.c.batch_id.is_(None),
                        s.items.c.cancelled_at_ms.is_(None),
                    )
                ).scalar_one()
                for u in units
            }
            by_state = select(s.batches.c.unit_id, func.sum(s.batches.c.subject_count)).group_by(s.batches.c.unit_id)
            ready = {r[0]: int(r[1]) for r in conn.execute(by_state.where(s.batches.c.state == "ready"))}
            late_batches = by_state.where(s.batches.c.state == "receipted", s.batches.c.overdue.is_(True))
            late = {r[0]: int(r[1]) for r in conn.execute(late_batches)}
            refused = select(s.batches.c.unit_id, func.count()).where(s.batches.c.state == "failed")
            failures = {r[0]: int(r[1]) for r in conn.execute(refused.group_by(s.batches.c.unit_id))}
            by_commission_state = select(s.commissions.c.state, func.count()).group_by(s.commissions.c.state)
            states = {r[0]: int(r[1]) for r in conn.execute(by_commission_state)}
        for unit in units:
            up.add_metric([unit.unit_id], 1.0 if unit.consecutive_failures == 0 else 0.0)
            outbox.add_metric([unit.unit_id], float(queued[unit.unit_id] + ready.get(unit.unit_id, 0)))
            overdue.add_metric([unit.unit_id], float(late.get(unit.unit_id, 0)))
        # Also units disabled or switched to media since: their failed batches still wait for someone.
        for unit_id in sorted({u.unit_id for u in units} | set(failures)):
            failed.add_metric([unit_id], float(failures.get(unit_id, 0)))
        for state in sorted(set(STATE_TO_PB) | set(states)):
            commissions.add_metric([state], float(states.get(state, 0)))
        trust = trust_backlog_families((p, kind_name(k), n, age / 1000) for p, k, n, age in backlog)
        return [up, outbox, overdue, commissions, failed, *trust]


_KEY_EXPIRY = (
    "Seconds until a retiring key (ours or a unit's) stops being valid, the soonest per party and algorithm. Active "
    "keys without an end are not exported; negative until the key-expiry job has retired the key."
)


class _KeyCollector(Collector):
    def __init__(self, expiries: KeyExpiries) -> None:
        self.expiries = expiries

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("hedui_key_expiry_seconds", _KEY_EXPIRY, labels=["party", "algorithm"])

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("hedui_key_expiry_seconds", _KEY_EXPIRY, labels=["party", "algorithm"])
        soonest: dict[tuple[str, str], float] = {}
        for party, algorithm, days in self.expiries():
            soonest[(party, algorithm)] = min(days, soonest.get((party, algorithm), math.inf))
        for (party, algorithm), days in sorted(soonest.items()):
            family.add_metric([party, algorithm], days * 86_400)
        yield family


_ROSTER_PENDING = "Roster versions held (ours and each unit's) that are not yet in force (Procedure V.(三))."
_ROSTER_UNACKED = "Seconds since the oldest version of our roster that the unit has not acknowledged was published."


class _RosterCollector(Collector):
    def __init__(self, reader: RosterReader) -> None:
        self.reader = reader

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily("hedui_roster_changes_pending", _ROSTER_PENDING, labels=["party"]),
            GaugeMetricFamily("hedui_roster_unacknowledged_seconds", _ROSTER_UNACKED, labels=["unit"]),
        )

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        pending, unacked = self._families()
        try:
            by_party, ages = self.reader()
        except SQLAlchemyError as exc:  # the database's state is hedui_database_up's business
            log.debug("roster metrics not read", extra={"error": type(exc).__name__})
            by_party, ages = {}, {}
        for party, count in sorted(by_party.items()):
            pending.add_metric([party], float(count))
        for unit, seconds in sorted(ages.items()):
            unacked.add_metric([unit], seconds)
        yield pending
        yield unacked


_REQUEST_AGE = (
    "Seconds the unit's certificate request has waited to be signed by the agency's CA ('hedui-gateway tls "
    "sign-requests', or export-requests / import-certificates); no series while none waits."
)


class _CertificateRequestCollector(Collector):
    def __init__(self, reader: Callable[[], dict[str, float]]) -> None:
        self.reader = reader

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily("hedui_certificate_request_age_seconds", _REQUEST_AGE, labels=["unit"])

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        try:
            ages = self.reader()
        except SQLAlchemyError as exc:  # the database's state is hedui_database_up's business
            log.debug("certificate request metrics not read", extra={"error": type(exc).__name__})
            ages = {}
        for unit, seconds in sorted(ages.items()):
            family.add_metric([unit], seconds)
        yield family
