"""The exchange engine: send due query batches to each unit, collect receipts and answers, acknowledge them.

One unit's cycle (``unit_cycle``) forms batches from queued items, sends the ready ones (gateway/exchange/sending.py),
polls receipted ones and acknowledges stored answers (gateway/exchange/answers.py); a unit that none of this reached
for a while gets a health probe instead, so that an idle unit's health is known too. Units are worked independently
(``UnitWorkers``): a unit that is down backs off with exponential delay and jitter and never holds up the others.
Every step is recorded before the next one, and every call is idempotent at the connector, so a crash or a lost
reply is repaired by doing the step again.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING

from common.categories import UNIT_DATA
from common.logs import LogThrottle, database_error, database_error_code
from common.workdays import CHINA_TZ, CalendarSource, WorkdayCalendar
from gateway.exchange.answers import AnswerCollector
from gateway.exchange.batches import BatchWork
from gateway.exchange.cycle import AnswerMismatch, CycleReport
from gateway.exchange.failures import TransportFailure
from gateway.exchange.refresh import KeyRefresh
from gateway.exchange.sending import BatchSender
from gateway.exchange.store import GatewayStore
from gateway.exchange.transport import UnitClient
from gateway.exchange.units import UnitRow
from gateway.trust.rosters import PeerRosters
from keys.clock import from_ms
from keys.envelope import Courier

if TYPE_CHECKING:
    from gateway.metrics import GatewayMetrics

__all__ = ["AnswerMismatch", "CycleReport", "EngineSettings", "ExchangeEngine", "UnitWorkers"]

log = logging.getLogger("hedui.gateway.exchange.engine")

#: Seconds between two "unit cycle failed" lines of one unit (the ones between are counted in the next).
CYCLE_FAILURE_LOG_INTERVAL_S = 60.0


@dataclass(frozen=True)
class EngineSettings:
    """Tuning of the engine (from the [exchange] config section)."""

    replica: str = "gateway-1"
    batch_size: int = 2000
    base_backoff_ms: int = 5_000
    max_backoff_ms: int = 1_800_000
    poll_interval_ms: int = 60_000
    fetch_group: int = 20
    envelope_ttl_ms: int = 3_600_000
    lease_ms: int = 120_000
    #: Batches sent per unit and cycle before the cycle yields (so polling is not starved).
    sends_per_cycle: int = 64
    #: A unit no call has reached for this long is probed with a health check in its next cycle.
    probe_interval_ms: int = 300_000


#: A healthy unit's last success is written at most this often (it decides probes, minutes apart, and `status`).
SUCCESS_REFRESH_MS = 10_000


class ExchangeEngine:
    """Moves query batches between the outbox and the units' connectors: runs each unit's cycle and keeps its
    health; the sending (``sender``) and the collecting of answers (``answers``) are its parts."""

    def __init__(
        self,
        store: GatewayStore,
        courier: Courier,
        clients: Mapping[str, UnitClient],
        calendar: WorkdayCalendar,
        settings: EngineSettings | None = None,
        *,
        jitter: Callable[[], float] = random.random,
        metrics: GatewayMetrics | None = None,
        calendar_source: CalendarSource | None = None,
    ) -> None:
        self.store = store
        self.courier = courier
        self.clients = clients
        self.calendar = calendar
        self.settings = settings or EngineSettings()
        self.jitter = jitter
        self.metrics = metrics
        #: Where the deadline sweep re-reads the holiday file (None: ``calendar`` stays as given).
        self.calendar_source = calendar_source
        #: The units' rosters, which name who may answer for them (Procedure V.(二), V.(三)).
        self.rosters = PeerRosters(store.engine)
        #: "Refresh keys" (gateway/exchange/refresh.py); its refresher is set once the trust syncer exists.
        self.refresh = KeyRefresh()
        self.sender = BatchSender(self)
        self.answers = AnswerCollector(self)
        if metrics is not None:
            metrics.add_units(clients)

    def now_ms(self) -> int:
        """The courier's clock: the time every step records."""
        return self.courier.clock.now_ms()

    def today(self) -> date:
        """Today in China (clause 12 counts days there)."""
        return from_ms(self.now_ms()).astimezone(CHINA_TZ).date()

    def backoff_ms(self, failures: int) -> int:
        """The pause after ``failures`` failures in a row: doubling from base_backoff_ms up to max_backoff_ms,
        of which a jittered half to all is taken."""
        delay = min(self.settings.max_backoff_ms, self.settings.base_backoff_ms * 2 ** max(0, failures - 1))
        return int(delay * (0.5 + 0.5 * self.jitter()))

    def claim(self, unit_id: str, state: str, limit: int) -> list[BatchWork]:
        """Claim up to ``limit`` of the unit's batches in ``state`` that are due now, for this replica and one lease
        (gateway/exchange/batches.py)."""
        return self.store.batches.claim(
            unit_id,
            state,
            replica=self.settings.replica,
            now_ms=self.now_ms(),
            lease_ms=self.settings.lease_ms,
            limit=limit,
        )

    # -- one unit ------------------------------------------------------------------------------------------------

    def unit_cycle(self, unit: UnitRow, *, dispatch: bool) -> CycleReport:
        """One round of work for one unit: form and send batches (when ``dispatch``), poll, acknowledge, and probe
        the unit's health when none of that reached it and a probe is due (``_probe_due``)."""
        report = CycleReport(unit.unit_id)
        if not unit.enabled or unit.exchange_mode == "media" or unit.unit_id not in self.clients:
            return report
        if self.now_ms() < unit.next_attempt_ms:
            return report  # backing off: no call at all, a probe neither
        client = self.clients[unit.unit_id]
        try:
            if dispatch:
                self._dispatch(unit, client, report)
            answered, stored = self.answers.poll(unit.unit_id, client, report)
            report.answered += answered
            report.answers_stored += stored
            report.acknowledged = self.answers.acknowledge(unit.unit_id, client, report)
            if not report.reached and self._probe_due(unit):
                report.probed = True
                client.check_health()
                report.reached = True
        except TransportFailure as failure:
            self._unreachable(unit, failure, report)
            return report
        if report.reached:
            self._reached(unit)
        return report

    def _probe_due(self, unit: UnitRow) -> bool:
        """Whether a cycle that made no call must probe the unit: it is down (its backoff has ended, and only a
        call can show it is back), or no call has reached it for ``probe_interval_ms``. Without the probe an idle
        unit (most are, outside the exchange window) would keep whatever health its last call left it."""
        if unit.consecutive_failures:
            return True
        last = unit.last_success_ms
        return last is None or self.now_ms() - last >= self.settings.probe_interval_ms

    def _unreachable(self, unit: UnitRow, failure: TransportFailure, report: CycleReport) -> None:
        failures = unit.consecutive_failures + 1
        error = f"{failure.status}: {failure.reason}" if failure.reason else failure.status
        self.store.units.failed(unit.unit_id, error, self.now_ms() + self.backoff_ms(failures))
        report.error = failure.status
        if self.metrics is not None:
            self.metrics.unit_failed(unit.unit_id)
        log.warning(
            "unit unreachable; backing off",
            extra={
                "unit": unit.unit_id,
                "status": failure.status,
                "reason": failure.reason or "-",
                "failures": failures,
                "call": "health_check" if report.probed else "exchange",
            },
        )

    def _reached(self, unit: UnitRow) -> None:
        now = self.now_ms()
        last = unit.last_success_ms
        if not unit.consecutive_failures and last is not None and now - last < SUCCESS_REFRESH_MS:
            return  # healthy and recorded moments ago: spare the database a write per poll
        self.store.units.succeeded(unit.unit_id, now)
        if unit.consecutive_failures:
            since = unit.last_success_ms
            log.info(
                "unit reachable again",
                extra={
                    "unit": unit.unit_id,
                    "failures": unit.consecutive_failures,
                    # Since the last call that reached it: with probes, at most probe_interval before it went down.
                    "down_seconds": round((now - since) / 1000) if since is not None else "-",
                    "last_error": unit.last_error or "-",
                },
            )

    def _dispatch(self, unit: UnitRow, client: UnitClient, report: CycleReport) -> None:
        """Form, send and collect one batch at a time: the unit answers the first batch while the next ones are
        formed, and answers come back while later batches go out, so the gateway, the units and the database
        work side by side instead of in turn (form everything, then send everything, then poll)."""
        served = frozenset(UNIT_DATA[unit.category])
        try:
            while report.sent < self.settings.sends_per_cycle:
                formed = self.store.outbox.form_batches(
                    unit.unit_id, served, self.settings.batch_size, self.now_ms(), limit=1
                )
                report.formed += formed
                if not self.sender.send_ready(unit.unit_id, client, report, limit=1):
                    if formed:
                        continue
                    return
                report.sent += 1
                answered, stored = self.answers.poll(unit.unit_id, client, report)
                report.answered += answered
                report.answers_stored += stored
        except TransportFailure:
            # The unit cannot be reached: its queue waits formed and ready for the next attempt, as it would have
            # had every batch been formed first.
            report.formed += self.store.outbox.form_batches(
                unit.unit_id, served, self.settings.batch_size, self.now_ms()
            )
            raise

    # -- deadlines -----------------------------------------------------------------------------------------------

    def sweep_deadlines(self) -> dict[str, int]:
        """Fix provisional due dates the calendar now knows (:meth:`settle_due_dates`), then mark receipted batches
        past their final due date overdue; returns overdue items per unit. Batches past a provisional date are
        logged as provisionally overdue and not marked (docs/exchange.md, "Provisional due dates")."""
        self.settle_due_dates()
        today = self.today()
        overdue = self.store.batches.mark_overdue(today, self.now_ms())
        for unit_id, count in overdue.items():
            log.warning("items overdue (clause 12)", extra={"unit": unit_id, "items": count})
        for unit_id, count in self.store.provisional.provisionally_overdue(today).items():
            log.warning(
                "items past a provisional due date; not marked overdue until the calendar knows the year",
                extra={"unit": unit_id, "items": count},
            )
        return overdue

    def settle_due_dates(self) -> int:
        """Recompute each provisional due date from its receipt time with the calendar (the holiday file read
        again first, when the engine has a source) and make final those it can now count exactly, each with an
        audit entry (gateway/exchange/provisional.py). Returns how many became final. Each side fixes its own
        dates: this uses the gateway's calendar, whatever the unit's says (both follow the same official
        schedule)."""
        if self.calendar_source is not None:
            self.calendar = self.calendar_source.current()
        return self.store.provisional.settle(self.calendar, actor=self.settings.replica, clock=self.courier.clock)


class UnitWorkers:
    """Runs unit cycles on a thread pool, at most one per unit at a time, so a slow unit delays only itself."""

    def __init__(self, engine: ExchangeEngine, max_workers: int = 16) -> None:
        self.engine = engine
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="hedui-unit")
        self._busy: dict[str, Future[CycleReport]] = {}
        self._lock = threading.Lock()
        #: Units whose last cycle ended in an error (the database went away mid-step): the claims this replica
        #: still holds on their batches are that cycle's, and are released before the unit's next cycle instead
        #: of waiting out the lease (lease_ms, 120 s) after the database is back.
        self._abandoned: set[str] = set()
        #: "unit cycle failed" at most once a minute per unit (every dispatch interval while the database is down).
        self.failure_log = LogThrottle(CYCLE_FAILURE_LOG_INTERVAL_S)

    def tick(self, *, dispatch: bool) -> list[Future[CycleReport]]:
        """Start a cycle for every unit that is not already in one; returns the started futures."""
        started = []
        for unit in self.engine.store.units.all():
            with self._lock:
                running = self._busy.get(unit.unit_id)
                if running is not None and not running.done():
                    continue
                if unit.unit_id in self._abandoned:
                    self._release_abandoned(unit.unit_id)
                future = self.pool.submit(self._cycle, unit, dispatch)
                self._busy[unit.unit_id] = future
            started.append(future)
        return started

    def _release_abandoned(self, unit_id: str) -> None:
        """Called under ``_lock`` with no cycle of the unit running or queued, so no live work holds a claim on
        its batches: whatever this replica holds there, the failed cycle left behind."""
        released = self.engine.store.batches.release_claims(self.engine.settings.replica, unit_id=unit_id)
        self._abandoned.discard(unit_id)
        if released:
            log.info("claims of a failed cycle released", extra={"unit": unit_id, "batches": released})

    def _cycle(self, unit: UnitRow, dispatch: bool) -> CycleReport:
        try:
            return self.engine.unit_cycle(unit, dispatch=dispatch)
        except Exception as exc:
            # A fault on this side (a bug, the database, a refused fetch): the unit is tried again next cycle.
            # Counted, so that a cycle failing over and over raises HeduiUnitCycleFailing.
            self._abandoned.add(unit.unit_id)
            on_database = database_error(exc) is not None
            if self.engine.metrics is not None:
                self.engine.metrics.cycle_failed(unit.unit_id)
                if on_database:
                    self.engine.metrics.database_failed()
            held_back = self.failure_log.admit(unit.unit_id)
            if held_back is not None:
                # A database error by its class and code only: its message may quote personal data.
                log.error(
                    "unit cycle failed",
                    extra={
                        "unit": unit.unit_id,
                        "error": type(exc).__name__,
                        "db_code": database_error_code(exc) if on_database else None,
                        "repeated": held_back or None,
                    },
                    exc_info=None if on_database else exc,
                )
            return CycleReport(unit.unit_id, error="internal")

    def run_once(self, *, dispatch: bool) -> list[CycleReport]:
        """Start a tick and wait for it (tests, benchmarks, the demo)."""
        return [f.result() for f in self.tick(dispatch=dispatch)]

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
