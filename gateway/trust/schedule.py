"""When the gateway synchronises trust with each unit: at start, every ``[trust] sync_interval_seconds``, at once when
an item is published for the unit, and at once when the exchange asks for it ("refresh keys").

The scheduler's ``trust-sync`` job calls :meth:`TrustSchedule.tick` at every dispatch interval: a few cheap reads
(the units, the run history of the ``trust:<unit>`` leases, the newest unacknowledged item per unit) decide which
units are due, and their synchronisations run on a small thread pool of their own, so a unit that does not answer
delays no other. A command-line process that publishes an item (a roster change) cannot signal the running gateway;
this read is how the gateway notices it within one dispatch interval. A unit whose synchronisation failed is tried
again after a pause that doubles up to the interval.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from sqlalchemy import select

from common.db import reading
from common.logs import LogThrottle, database_error
from gateway.db import schema as s
from gateway.exchange.failures import TransportFailure, UnitRefusal
from gateway.trust.sync import JOB_PREFIX, SyncBusy, SyncRefused, SyncReport, TrustSyncer, job_name

log = logging.getLogger("hedui.gateway.trust.schedule")

#: First pause after a failed synchronisation (doubling per failure, at most the sync interval).
RETRY_BASE_MS = 5_000


class TrustSchedule:
    """Decides which units are due for a trust synchronisation and runs those synchronisations."""

    def __init__(self, syncer: TrustSyncer, *, interval_ms: int, max_workers: int = 4) -> None:
        self.syncer = syncer
        self.interval_ms = interval_ms
        self.started_ms = syncer.courier.clock.now_ms()
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="hedui-trust")
        self._lock = threading.Lock()
        self._requested: set[str] = set()
        self._failures: dict[str, int] = {}
        self._next_try: dict[str, int] = {}
        self._running: dict[str, Future[SyncReport | None]] = {}
        self.failure_log = LogThrottle(60.0)

    def request(self, unit_id: str) -> None:
        """Synchronise with ``unit_id`` at the next tick, whatever else says."""
        with self._lock:
            self._requested.add(unit_id)

    def _runs(self) -> dict[str, tuple[int | None, int | None]]:
        """jobs-table name -> (last started, last finished with success) of the trust leases."""
        j = s.jobs.c
        query = select(j.name, j.last_started_ms, j.last_finished_ms, j.last_status).where(
            j.name.like(JOB_PREFIX + "%")
        )
        with reading(self.syncer.store.engine) as conn:
            return {
                r.name: (r.last_started_ms, r.last_finished_ms if r.last_status == "ok" else None)
                for r in conn.execute(query)
            }

    def due(self, now_ms: int) -> list[tuple[str, str]]:
        """(unit, trigger) of every unit to synchronise now: trigger ``requested``, ``start``, ``items`` or
        ``interval``."""
        units = [
            u.unit_id
            for u in self.syncer.store.units.all()
            if u.enabled and u.exchange_mode != "media" and u.unit_id in self.syncer.clients
        ]
        runs, newest = self._runs(), self.syncer.items.newest_pending()
        with self._lock:
            requested, self._requested = self._requested, set()
            next_try = dict(self._next_try)
        due = []
        for unit in units:
            started, succeeded = runs.get(job_name(unit), (None, None))
            if unit in requested:
                due.append((unit, "requested"))
            elif now_ms < next_try.get(unit, 0):
                continue
            elif succeeded is None or succeeded < self.started_ms:
                due.append((unit, "start"))
            elif unit in newest and newest[unit] >= (started or 0):
                due.append((unit, "items"))
            elif now_ms - succeeded >= self.interval_ms:
                due.append((unit, "interval"))
        return due

    def tick(self) -> list[Future[SyncReport | None]]:
        """Start the synchronisations that are due (the scheduler's ``trust-sync`` job)."""
        started = []
        for unit, trigger in self.due(self.syncer.courier.clock.now_ms()):
            with self._lock:
                running = self._running.get(unit)
                if running is not None and not running.done():
                    continue
                future = self.pool.submit(self._run, unit, trigger)
                self._running[unit] = future
            started.append(future)
        return started

    def start_due(self) -> None:
        """The scheduler's ``trust-sync`` job: :meth:`tick`, not waiting for the synchronisations it started."""
        self.tick()

    def run_once(self) -> list[SyncReport | None]:
        """A tick, waited for (tests, the demo)."""
        return [f.result() for f in self.tick()]

    def _run(self, unit: str, trigger: str) -> SyncReport | None:
        try:
            report = self.syncer.sync(unit, trigger=trigger)
        except SyncBusy:
            return None
        except (TransportFailure, UnitRefusal, SyncRefused) as exc:
            self._failed(unit, exc)
            return None
        except Exception as exc:  # a bug or the database: logged with its class, tried again after the pause
            self._failed(unit, exc)
            return None
        with self._lock:
            self._failures.pop(unit, None)
            self._next_try.pop(unit, None)
        if report.acknowledged or report.applied or report.refused:
            log.info(
                "trust synchronised",
                extra={
                    "unit": unit,
                    "trigger": trigger,
                    "acknowledged": report.acknowledged,
                    "applied": report.applied,
                    "refused": report.refused,
                },
            )
        return report

    def _failed(self, unit: str, exc: Exception) -> None:
        now = self.syncer.courier.clock.now_ms()
        with self._lock:
            failures = self._failures[unit] = self._failures.get(unit, 0) + 1
            pause = min(self.interval_ms, RETRY_BASE_MS * 2 ** min(failures - 1, 20))
            self._next_try[unit] = now + pause
        held_back = self.failure_log.admit(unit)
        if held_back is not None:
            expected = isinstance(exc, (TransportFailure, UnitRefusal, SyncRefused)) or database_error(exc) is not None
            log.warning(
                "trust synchronisation failed",
                extra={
                    "unit": unit,
                    "error": type(exc).__name__,
                    "status": getattr(exc, "status", None),
                    "reason": getattr(exc, "reason", None),
                    "failures": failures,
                    "repeated": held_back or None,
                },
                exc_info=None if expected else exc,
            )

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
