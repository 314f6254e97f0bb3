"""The exchange engine: send due query batches to each unit, collect receipts and answers, acknowledge them.

One unit's cycle (``unit_cycle``) forms batches from queued items, sends the ready ones, polls receipted ones
and acknowledges stored answers; a unit that none of this reached for a while gets a health probe instead, so that
an idle unit's health is known too. Units are worked independently (``UnitWorkers``): a unit that is down backs off
with exponential delay and jitter and never holds up the others. Every step is recorded before the next one, and
every call is idempotent at the connector, so a crash or a lost reply is repaired by doing the step again.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING

from google.protobuf.message import Message
from hedui.v1 import exchange_pb2

from common.categories import UNIT_DATA
from common.dates import from_pb
from common.logs import LogThrottle, database_error, database_error_code, public_commission_ref
from common.workdays import CHINA_TZ, CalendarSource, Deadline, WorkdayCalendar
from gateway.archive.audit import AuditLog
from gateway.archive.messages import Envelope
from gateway.exchange.batches import BatchWork, ResponsibleStaff
from gateway.exchange.refresh import KeyRefresh
from gateway.exchange.refusals import signed_refusal
from gateway.exchange.store import GatewayStore
from gateway.exchange.transport import TransportFailure, UnitClient, UnitDeferral, UnitRefusal, reason_label
from gateway.exchange.units import UnitRow
from gateway.trust.rosters import PeerRosters, judge_answer_staff
from keys.clock import from_ms
from keys.envelope import Courier, Opened, message_id_of
from keys.errors import EnvelopeError
from keys.trustsync import REFRESH_KEYS

if TYPE_CHECKING:
    from gateway.metrics import GatewayMetrics

log = logging.getLogger("hedui.gateway.exchange.engine")

_RECEIPT: Mapping[str, type[Message]] = {exchange_pb2.BatchReceipt.DESCRIPTOR.full_name: exchange_pb2.BatchReceipt}
_ANSWERS: Mapping[str, type[Message]] = {exchange_pb2.AnswerSet.DESCRIPTOR.full_name: exchange_pb2.AnswerSet}
_ACK: Mapping[str, type[Message]] = {
    exchange_pb2.AcknowledgeReceipt.DESCRIPTOR.full_name: exchange_pb2.AcknowledgeReceipt
}

#: Batch ids a connector takes in one FetchAnswers or AcknowledgeAnswers (docs/exchange.md); more are refused.
MAX_IDS_PER_CALL = 100
#: Subjects asked for in one FetchAnswers call at most (see ExchangeEngine._fetch_limit).
FETCH_SUBJECTS = 20_000
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


@dataclass
class CycleReport:
    """What one unit cycle did (for logs and metrics)."""

    unit_id: str
    formed: int = 0
    sent: int = 0
    answered: int = 0
    answers_stored: int = 0
    acknowledged: int = 0
    #: A call got the unit's reply (an answer, a refusal, or a health probe's SERVING).
    reached: bool = False
    #: The cycle called the unit's health check (nothing else reached it, and it was due).
    probed: bool = False
    #: The cycle synchronised trust with the unit because their keys disagreed ("refresh keys"; once a cycle).
    refreshed: bool = False
    error: str | None = None


class AnswerMismatch(Exception):
    """A unit's answer does not belong to the batch it names (digest or subjects differ)."""


class ExchangeEngine:
    """Moves query batches between the outbox and the units' connectors."""

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
        if metrics is not None:
            metrics.add_units(clients)

    def _now(self) -> int:
        return self.courier.clock.now_ms()

    def _today(self) -> date:
        return from_ms(self._now()).astimezone(CHINA_TZ).date()

    def _open(self, reply: bytes, expect: Mapping[str, type[Message]], *, unit_id: str, request: bytes) -> Opened:
        """Open a unit's reply to ``request``: it must come from that unit and answer that very envelope.

        TLS already ties the connection to the unit, but the envelope is what is archived and must prove it by
        itself (docs/envelope.md): the sender is the unit we called, the correlation id our request's message id.
        """
        opened = self.courier.open(reply, expect=expect)
        if opened.header.sender != unit_id or opened.header.correlation_id != message_id_of(request):
            raise AnswerMismatch("reply is not from the unit called, or does not answer the request sent")
        return opened

    def _backoff_ms(self, failures: int) -> int:
        delay = min(self.settings.max_backoff_ms, self.settings.base_backoff_ms * 2 ** max(0, failures - 1))
        return int(delay * (0.5 + 0.5 * self.jitter()))

    # -- one unit ------------------------------------------------------------------------------------------------

    def unit_cycle(self, unit: UnitRow, *, dispatch: bool) -> CycleReport:
        """One round of work for one unit: form and send batches (when ``dispatch``), poll, acknowledge, and probe
        the unit's health when none of that reached it and a probe is due (``_probe_due``)."""
        report = CycleReport(unit.unit_id)
        if not unit.enabled or unit.exchange_mode == "media" or unit.unit_id not in self.clients:
            return report
        if self._now() < unit.next_attempt_ms:
            return report  # backing off: no call at all, a probe neither
        client = self.clients[unit.unit_id]
        try:
            if dispatch:
                self._dispatch(unit, client, report)
            answered, stored = self._poll(unit.unit_id, client, report)
            report.answered += answered
            report.answers_stored += stored
            report.acknowledged = self._acknowledge(unit.unit_id, client, report)
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
        return last is None or self._now() - last >= self.settings.probe_interval_ms

    def _unreachable(self, unit: UnitRow, failure: TransportFailure, report: CycleReport) -> None:
        failures = unit.consecutive_failures + 1
        error = f"{failure.status}: {failure.reason}" if failure.reason else failure.status
        self.store.units.failed(unit.unit_id, error, self._now() + self._backoff_ms(failures))
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
        now = self._now()
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
                    unit.unit_id, served, self.settings.batch_size, self._now(), limit=1
                )
                report.formed += formed
                if not self._send_ready(unit.unit_id, client, report, limit=1):
                    if formed:
                        continue
                    return
                report.sent += 1
                answered, stored = self._poll(unit.unit_id, client, report)
                report.answered += answered
                report.answers_stored += stored
        except TransportFailure:
            # The unit cannot be reached: its queue waits formed and ready for the next attempt, as it would have
            # had every batch been formed first.
            report.formed += self.store.outbox.form_batches(unit.unit_id, served, self.settings.batch_size, self._now())
            raise

    def _send_ready(self, unit_id: str, client: UnitClient, report: CycleReport, limit: int | None = None) -> int:
        sent = 0
        while sent < (self.settings.sends_per_cycle if limit is None else limit):
            work = self.store.batches.claim(
                unit_id,
                "ready",
                replica=self.settings.replica,
                now_ms=self._now(),
                lease_ms=self.settings.lease_ms,
                limit=1,
            )
            if not work:
                return sent
            self._send(work[0], client, report)
            sent += 1
        return sent

    def _send(self, batch: BatchWork, client: UnitClient, report: CycleReport) -> None:
        query = exchange_pb2.QueryBatch.FromString(batch.content)
        envelope = self.courier.seal(query, batch.unit_id, ttl_ms=self.settings.envelope_ttl_ms)
        # Clause 17: kept as sent, with its chain entry, before it leaves.
        sent = Envelope(message_id_of(envelope), self.courier.me.party_id, query.DESCRIPTOR.full_name, envelope)
        self.store.batches.sent(batch, sent, self._now())
        started = time.monotonic()
        try:
            reply = client.submit(envelope)
        except TransportFailure as failure:
            if self.refresh.after_refusal(failure, batch.unit_id, report):
                # Sealed afresh and sent again at once: the dispatch loop claims it again.
                self.store.batches.send_failed(batch.batch_id, REFRESH_KEYS, self._now())
                return
            self.store.batches.send_failed(batch.batch_id, "transport", self._now())
            raise
        except UnitRefusal as refusal:
            report.reached = True
            self._refused(batch, refusal, envelope)
            return
        report.reached = True
        try:
            opened = self._open(reply, _RECEIPT, unit_id=batch.unit_id, request=envelope)
            receipt = opened.message
            assert isinstance(receipt, exchange_pb2.BatchReceipt)
            if receipt.batch_id != batch.batch_id or receipt.batch_digest != batch.digest:
                raise AnswerMismatch("receipt names another batch")
            due = from_pb(receipt.due_date)
        except (EnvelopeError, AnswerMismatch, ValueError) as exc:
            # A receipt we cannot trust does not start the clock: send again later (at once after a key refresh).
            refreshed = self.refresh.after_reply(exc, batch.unit_id, report)
            retry = self._now() if refreshed else self._now() + self.settings.poll_interval_ms
            self.store.batches.send_failed(batch.batch_id, "bad_receipt", retry)
            log.log(
                logging.WARNING if refreshed else logging.ERROR,
                "receipt rejected; keys refreshed, sending again" if refreshed else "receipt rejected",
                extra={"unit": batch.unit_id, "batch_id": batch.batch_id, "reason": type(exc).__name__},
            )
            return
        self.store.batches.receipted(
            batch.batch_id,
            received_at_ms=receipt.received_at_ms,
            due=due,
            envelope=_kept(opened),
            next_poll_ms=self._now(),
            now_ms=self._now(),
            due_provisional=receipt.due_date_provisional,
        )
        if self.metrics is not None:
            self.metrics.receipted(batch.unit_id, len(query.subjects), time.monotonic() - started)
        log.info(
            "batch receipted",
            extra={
                "unit": batch.unit_id,
                "batch_id": batch.batch_id,
                "commission_id": public_commission_ref(query.commission_ref),
                "subjects": len(query.subjects),
                "due_provisional": receipt.due_date_provisional,
            },
        )

    def _refused(self, batch: BatchWork, refusal: UnitRefusal, request: bytes) -> None:
        """The unit refused the batch: for now (UnitDeferral: sent again after the batch's own backoff, the unit
        is not backed off, it answers), or for good (failed, kept in the batch row and shown in
        hedui_batches_failed and ``hedui-gateway status``; once the cause is fixed ``hedui-gateway resend`` puts it
        back). Its signed refusal, when it checks out, is kept with the refusal's chain entry."""
        signed, detail = signed_refusal(self.courier, batch, refusal, request)
        summary = refusal.summary if not detail else f"{refusal.summary} ({detail})"[:64]
        now = self._now()
        if self.metrics is not None:
            self.metrics.unit_refused(batch.unit_id, reason_label(refusal.reason))
        extra = {
            "unit": batch.unit_id,
            "batch_id": batch.batch_id,
            "status": refusal.status,
            "reason": refusal.reason or "-",
            "signed": signed is not None,
            "detail": str(refusal),
        }
        if isinstance(refusal, UnitDeferral):
            retry_at = now + self._backoff_ms(batch.attempts + 1)
            self.store.refusals.deferred(
                batch.batch_id, summary, status=refusal.status, code=refusal.reason, retry_at_ms=retry_at,
                now_ms=now, signed=signed,
            )  # fmt: skip
            log.warning("unit refused a batch for now; sent again later", extra={**extra, "retry_at_ms": retry_at})
            return
        self.store.refusals.refused(
            batch.batch_id, summary, status=refusal.status, code=refusal.reason, now_ms=now, signed=signed
        )
        log.error("unit refused a batch", extra=extra)

    def _poll(self, unit_id: str, client: UnitClient, report: CycleReport | None = None) -> tuple[int, int]:
        """Fetch the answers of the unit's receipted batches that are due for a poll; returns (batches answered,
        answers stored) and marks ``report`` reached once the unit replies."""
        answered = stored = 0
        while True:
            work = self.store.batches.claim(
                unit_id,
                "receipted",
                replica=self.settings.replica,
                now_ms=self._now(),
                lease_ms=self.settings.lease_ms,
                limit=self._fetch_limit(),
            )
            if not work:
                return answered, stored
            request = self.courier.seal(
                exchange_pb2.FetchAnswers(batch_ids=[b.batch_id for b in work]),
                unit_id,
                ttl_ms=self.settings.envelope_ttl_ms,
            )
            try:
                reply = client.fetch(request)
            except (TransportFailure, UnitRefusal) as failure:
                for batch in work:
                    self.store.batches.release(batch.batch_id, self.settings.replica)
                if (
                    report is not None
                    and isinstance(failure, TransportFailure)
                    and self.refresh.after_refusal(failure, unit_id, report)
                ):
                    continue  # asked again, sealed afresh
                raise
            if report is not None:
                report.reached = True
            try:
                opened = self._open(reply, _ANSWERS, unit_id=unit_id, request=request)
            except (EnvelopeError, AnswerMismatch) as exc:
                if report is not None and self.refresh.after_reply(exc, unit_id, report):
                    for batch in work:
                        self.store.batches.release(batch.batch_id, self.settings.replica)
                    continue
                for batch in work:
                    self.store.batches.still_pending_later(batch.batch_id, self._now() + self.settings.poll_interval_ms)
                log.error("answer set rejected", extra={"unit": unit_id, "reason": type(exc).__name__})
                return answered, stored
            # Kept with the first chain entry that rests on it (an answer or a delay): a reply saying only
            # "pending" changes nothing and is not kept.
            kept = _kept(opened)
            answer_set = opened.message
            assert isinstance(answer_set, exchange_pb2.AnswerSet)
            by_id: dict[str, BatchWork | None] = {b.batch_id: b for b in work}
            progressed = False
            for status in answer_set.batches:
                found = by_id.pop(status.batch_id, None)
                if found is None:
                    continue
                batch = found
                if status.state == exchange_pb2.BATCH_STATE_ANSWERED:
                    count = self._store_answer(batch, status.answer, kept)
                    if count is not None:
                        answered += 1
                        stored += count
                        progressed = True
                elif status.state == exchange_pb2.BATCH_STATE_PENDING:
                    self._pending(batch, status, kept)
                else:
                    self.store.batches.resend(batch.batch_id)
                    log.warning(
                        "unit does not know a receipted batch; sending it again",
                        extra={"unit": unit_id, "batch_id": batch.batch_id},
                    )
            for left_out in by_id.values():  # left out of a size-capped answer set: ask again at once
                if left_out is not None:
                    self.store.batches.release(left_out.batch_id, self.settings.replica)
                    progressed = True
            if not progressed:
                return answered, stored

    def _fetch_limit(self) -> int:
        """Batches asked for in one FetchAnswers: the configured group, but no more than FETCH_SUBJECTS subjects,
        so that an answer set (and the copies made of it while it is opened, parsed and stored) stays a few MiB
        however large batches are; each unit's worker holds one at a time."""
        return max(1, min(self.settings.fetch_group, FETCH_SUBJECTS // max(1, self.settings.batch_size)))

    def _store_answer(self, batch: BatchWork, answer: exchange_pb2.BatchAnswer, envelope: Envelope) -> int | None:
        expected = self.store.batches.item_ids(batch.unit_id, batch.batch_id)
        refs = [a.subject_ref for a in answer.subjects]
        valid = answer.batch_digest == batch.digest and len(refs) == len(expected)
        valid = valid and all(r.isdigit() and int(r) in expected for r in refs) and len(set(refs)) == len(refs)
        if not valid:
            self.store.batches.still_pending_later(batch.batch_id, self._now() + self.settings.poll_interval_ms)
            log.error(
                "answer does not match its batch; not stored", extra={"unit": batch.unit_id, "batch_id": batch.batch_id}
            )
            return None
        verdict = judge_answer_staff(
            self.rosters.history(batch.unit_id),
            answer.responsible_staff,
            answer.answered_at_ms,
            now_ms=self._now(),
            received_at_ms=batch.received_at_ms,
        )
        if verdict.reason is not None:
            # Procedure V.(三): the unit's staff are registered in advance; an answer naming others is not taken.
            # Polled again: a roster version still on its way may yet make it valid.
            self.store.batches.still_pending_later(batch.batch_id, self._now() + self.settings.poll_interval_ms)
            log.error(
                "answer names unit staff not registered for its time; not stored",
                extra={
                    "unit": batch.unit_id,
                    "batch_id": batch.batch_id,
                    "reason": verdict.reason,
                    "staff_id": verdict.staff_id or "-",
                },
            )
            if self.metrics is not None:
                self.metrics.answer_staff_refused(batch.unit_id, verdict.reason)
            return None
        staff = ResponsibleStaff(verdict.staff_ids, verdict.roster_version, answer.answered_at_ms)
        stored = self.store.batches.store_answers(batch.batch_id, answer.subjects, envelope, self._now(), staff=staff)
        if self.metrics is not None and verdict.roster_version is None:
            self.metrics.answer_staff_unverified(batch.unit_id)
        if self.metrics is not None and stored:
            received = batch.received_at_ms
            latency = None if received is None else (self._now() - received) / 1000
            self.metrics.answered(batch.unit_id, stored, latency)
        return stored

    def _pending(self, batch: BatchWork, status: exchange_pb2.BatchStatus, envelope: Envelope) -> None:
        original = batch.original_due or from_pb(status.due_date)
        due, reason = original, None
        if status.HasField("delay"):
            try:
                new_due = from_pb(status.delay.new_due_date)
                # Against a provisional original, the bound is provisional too (the same rule the unit used).
                limit = self.calendar.extension(Deadline(original, batch.due_provisional)).day
                allowed = original < new_due <= limit
            except ValueError:
                allowed = False
            if self.metrics is not None:
                notice = status.delay.new_due_date
                new_due_text = f"{notice.year:04d}-{notice.month:02d}-{notice.day:02d}"
                self.metrics.delay_notice(batch.unit_id, batch.batch_id, new_due_text, accepted=allowed)
            if allowed:
                due, reason = new_due, status.delay.reason[:32] or "unspecified"
            else:
                # Clause 12: more than 5 working days of delay is not accepted; the original due date stands.
                log.warning(
                    "delay notice beyond clause 12 ignored", extra={"unit": batch.unit_id, "batch_id": batch.batch_id}
                )
        self.store.batches.still_pending(
            batch.batch_id,
            due,
            reason,
            self._now() + self.settings.poll_interval_ms,
            today=self._today(),
            envelope=envelope,
            now_ms=self._now(),
        )

    def _acknowledge(self, unit_id: str, client: UnitClient, report: CycleReport) -> int:
        done = 0
        while True:
            ids = self.store.batches.unacknowledged(unit_id, min(MAX_IDS_PER_CALL, self.settings.fetch_group * 5))
            if not ids:
                return done
            request = self.courier.seal(
                exchange_pb2.AcknowledgeAnswers(batch_ids=ids), unit_id, ttl_ms=self.settings.envelope_ttl_ms
            )
            try:
                reply = client.acknowledge(request)
            except TransportFailure as failure:
                if self.refresh.after_refusal(failure, unit_id, report):
                    continue
                raise
            report.reached = True
            try:
                opened = self._open(reply, _ACK, unit_id=unit_id, request=request)
            except (EnvelopeError, AnswerMismatch) as exc:
                if self.refresh.after_reply(exc, unit_id, report):
                    continue
                log.error("acknowledgement receipt rejected", extra={"unit": unit_id, "reason": type(exc).__name__})
                return done
            assert isinstance(opened.message, exchange_pb2.AcknowledgeReceipt)
            confirmed = [i for i in opened.message.batch_ids if i in set(ids)]
            self.store.batches.acknowledged(confirmed, self._now())
            done += len(confirmed)
            if len(confirmed) < len(ids):
                return done

    # -- deadlines -----------------------------------------------------------------------------------------------

    def sweep_deadlines(self) -> dict[str, int]:
        """Fix provisional due dates the calendar now knows (:meth:`settle_due_dates`), then mark receipted batches
        past their final due date overdue; returns overdue items per unit. Batches past a provisional date are
        logged as provisionally overdue and not marked (docs/exchange.md, "Provisional due dates")."""
        self.settle_due_dates()
        today = self._today()
        overdue = self.store.batches.mark_overdue(today, self._now())
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
        audit entry. Returns how many became final. Each side fixes its own dates: this uses the gateway's calendar,
        whatever the unit's says (both follow the same official schedule)."""
        if self.calendar_source is not None:
            self.calendar = self.calendar_source.current()
        pending = self.store.provisional.provisional()
        if not pending:
            return 0
        audit = AuditLog(self.store.engine)
        fixed = 0
        for batch in pending:
            settled = self.calendar.settle(
                from_ms(batch.received_at_ms), batch.due, delayed=batch.delay_reason is not None
            )
            if settled is None:
                continue
            original, due = settled
            if self.store.provisional.settle_due(
                batch, original, due, audit=audit, actor=self.settings.replica, now_ms=self._now()
            ):
                fixed += 1
                log.info(
                    "provisional due date is final",
                    extra={
                        "unit": batch.unit_id,
                        "batch_id": batch.batch_id,
                        "provisional": batch.original_due.isoformat(),
                        "final": original.isoformat(),
                    },
                )
        return fixed


def _kept(opened: Opened) -> Envelope:
    """A checked reply as the archive keeps it: the bytes as received."""
    header = opened.header
    return Envelope(header.message_id, header.sender, header.message_type, opened.raw)


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
