"""When the engine works: the schedule policy of Procedure IV and the jobs that carry it out.

``monthly`` (Procedure IV): commissions are taken in on days 1-10, batches are sent to units on days 11-20 (the
exchange window), results go back by the 27th. ``continuous`` (clause 8, real-time verification): batches are sent
whenever there are queued items. Under both, receipted batches are polled and deadlines swept every day, and the
``trust-sync`` job starts the trust synchronisations with units that are due (gateway/trust/schedule.py).

The jobs are APScheduler 3 interval jobs. Whether a job may run is decided in the database, not in the process:
each run takes the job's lease in the ``jobs`` table, so replicas sharing a database never run the same job at the
same time, a crashed replica's lease simply expires, and run history survives restarts.

A run that fails, wherever (taking the lease while the database is down, the job's work, giving the lease back),
is counted (``hedui_scheduler_job_runs_total{outcome="failed"}``) and logged as ``job failed`` with the job, the
stage and the error's class, at most once a minute per job with the number of runs it stands for; a database error's
message is never logged (it may quote personal data). The first good run after failures logs ``job recovered``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from common.logs import LogThrottle, database_error, database_error_code
from common.workdays import CHINA_TZ
from gateway.exchange.engine import ExchangeEngine, UnitWorkers
from gateway.exchange.store import GatewayStore
from keys.clock import Clock, from_ms

if TYPE_CHECKING:
    from gateway.metrics import GatewayMetrics

log = logging.getLogger("hedui.gateway.exchange.schedule")

#: A failing job's "job failed" line at most this often: a database that is down fails the dispatch job every
#: 30 s (and more often after misfires), which would bury everything else in the log.
FAILURE_LOG_INTERVAL_S = 60.0


@dataclass(frozen=True)
class SchedulePolicy:
    """Procedure IV's monthly cycle, or continuous exchange."""

    policy: str = "monthly"
    exchange_window: tuple[int, int] = (11, 20)
    report_day: int = 27

    def dispatch_allowed(self, today: date) -> bool:
        """May batches be sent to units today?"""
        if self.policy == "continuous":
            return True
        first, last = self.exchange_window
        return first <= today.day <= last

    def report_due(self, today: date) -> date:
        """The day results of this month's cycle are due back to commissioners (Procedure IV: by the 27th)."""
        return today.replace(day=min(self.report_day, 28 if today.month == 2 else 30))


@dataclass(frozen=True)
class JobIntervals:
    dispatch_seconds: float = 30.0
    poll_seconds: float = 60.0
    sweep_seconds: float = 300.0
    key_check_seconds: float = 3600.0
    checkpoint_seconds: float = 3600.0


class GatewayScheduler:
    """Runs dispatch, poll, deadline-sweep and key-expiry jobs under database leases."""

    def __init__(
        self,
        *,
        store: GatewayStore,
        engine: ExchangeEngine,
        workers: UnitWorkers,
        policy: SchedulePolicy,
        intervals: JobIntervals,
        clock: Clock,
        replica: str,
        lease_ms: int,
        key_check: Callable[[], None],
        metrics: GatewayMetrics | None = None,
        log_clock: Callable[[], float] = time.monotonic,
        checkpoint: Callable[[], None] | None = None,
        trust_sync: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.engine = engine
        self.workers = workers
        self.policy = policy
        self.intervals = intervals
        self.clock = clock
        self.replica = replica
        self.lease_ms = lease_ms
        self.key_check = key_check
        #: Signs a checkpoint of the audit chain (gateway/archive/checkpoints.py).
        self.checkpoint = checkpoint
        #: Starts the trust synchronisations that are due (gateway/trust/schedule.py), every dispatch interval.
        self.trust_sync = trust_sync
        self.scheduler = BackgroundScheduler(timezone=CHINA_TZ)
        self.runs: dict[str, int] = {}
        self.failures: dict[str, int] = {}
        #: Failed runs of each job since its last good one.
        self.failing: dict[str, int] = {}
        self.failure_log = LogThrottle(FAILURE_LOG_INTERVAL_S, clock=log_clock)
        self.metrics = metrics
        if metrics is not None:
            metrics.add_jobs(self.jobs())

    def _today(self) -> date:
        return from_ms(self.clock.now_ms()).astimezone(CHINA_TZ).date()

    def run_job(self, name: str, body: Callable[[], None]) -> bool:
        """Run ``body`` if this replica gets the job's lease; returns whether it ran. Never raises (APScheduler
        would log every failure itself, with the database's message): see the module's docstring."""
        failure: tuple[str, Exception] | None = None
        leased = False
        try:
            if not self.store.jobs.acquire(name, self.replica, self.clock.now_ms(), self.lease_ms):
                self._succeeded(name)  # the database answered; another replica holds the lease
                if self.metrics is not None:
                    self.metrics.job_run(name, "skipped")
                return False
            leased = True
            try:
                body()
            except Exception as exc:
                failure = ("run", exc)
            self.store.jobs.release(name, self.replica, self.clock.now_ms(), failure is None)
        except Exception as exc:  # taking or giving back the lease failed: the database is down, full, read-only
            failure = failure or ("release" if leased else "lease", exc)
        self.runs[name] = self.runs.get(name, 0) + 1
        if failure is None:
            self._succeeded(name)
        else:
            self.failures[name] = self.failures.get(name, 0) + 1
            self._failed(name, *failure)
        if self.metrics is not None:
            self.metrics.job_run(name, "ok" if failure is None else "failed")
        return leased

    def _failed(self, name: str, stage: str, exc: Exception) -> None:
        failing = self.failing[name] = self.failing.get(name, 0) + 1
        on_database = database_error(exc) is not None
        if on_database and self.metrics is not None:
            self.metrics.database_failed()
        held_back = self.failure_log.admit(name)
        if held_back is None:
            return
        log.error(
            "job failed",
            extra={
                "job": name,
                "stage": stage,
                "error": type(exc).__name__,
                "db_code": database_error_code(exc) if on_database else None,
                "failures": failing,
                "repeated": held_back or None,
            },
            # A bug needs its traceback; a database error is said by its class and code (its message and a
            # traceback a minute would only repeat what the database says, and may quote personal data).
            exc_info=None if on_database else exc,
        )

    def _succeeded(self, name: str) -> None:
        failing = self.failing.pop(name, 0)
        if failing:
            self.failure_log.forget(name)
            log.info("job recovered", extra={"job": name, "failures": failing})

    def dispatch(self) -> None:
        """Start unit cycles that send batches (in the exchange window) and poll."""
        self.workers.tick(dispatch=self.policy.dispatch_allowed(self._today()))

    def poll(self) -> None:
        """Start unit cycles that only poll and acknowledge (answers arrive any day). While batches may be sent
        and the dispatch job runs at least as often, its cycles poll as well, and this one has nothing to add."""
        if self.intervals.dispatch_seconds <= self.intervals.poll_seconds and self.policy.dispatch_allowed(
            self._today()
        ):
            return
        self.workers.tick(dispatch=False)

    def sweep(self) -> None:
        self.engine.sweep_deadlines()

    def jobs(self) -> dict[str, tuple[float, Callable[[], None]]]:
        jobs = {
            "dispatch": (self.intervals.dispatch_seconds, self.dispatch),
            "poll": (self.intervals.poll_seconds, self.poll),
            "deadline-sweep": (self.intervals.sweep_seconds, self.sweep),
            "key-expiry": (self.intervals.key_check_seconds, self.key_check),
        }
        if self.checkpoint is not None:
            jobs["audit-checkpoint"] = (self.intervals.checkpoint_seconds, self.checkpoint)
        if self.trust_sync is not None:
            jobs["trust-sync"] = (self.intervals.dispatch_seconds, self.trust_sync)
        return jobs

    def start(self) -> None:
        for name, (seconds, body) in self.jobs().items():
            self.scheduler.add_job(
                self.run_job,
                IntervalTrigger(seconds=seconds, timezone=CHINA_TZ),
                args=(name, body),
                id=name,
                name=name,
                max_instances=1,
                coalesce=True,
                misfire_grace_time=max(1, int(seconds)),
                next_run_time=from_ms(self.clock.now_ms()),
            )
        self.scheduler.start()

    def shutdown(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
