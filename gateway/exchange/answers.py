"""Collecting a unit's answers: polling its receipted batches, checking and storing each answer (its batch, its
subjects, the unit staff it names), taking delay notices within clause 12, and acknowledging what is stored so the
unit may forget it.

Part of one unit cycle (gateway/exchange/engine.py), which decides when to send and when to poll.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from google.protobuf.message import Message
from hedui.v1 import exchange_pb2

from common.dates import from_pb
from common.workdays import Deadline
from gateway.archive.messages import Envelope
from gateway.exchange.batches import BatchWork, ResponsibleStaff
from gateway.exchange.cycle import AnswerMismatch, CycleReport, kept, open_reply
from gateway.exchange.failures import TransportFailure, UnitRefusal
from gateway.exchange.transport import UnitClient
from gateway.trust.rosters import judge_answer_staff
from keys.errors import EnvelopeError

if TYPE_CHECKING:
    from gateway.exchange.engine import ExchangeEngine

log = logging.getLogger("hedui.gateway.exchange.engine")

_ANSWERS: Mapping[str, type[Message]] = {exchange_pb2.AnswerSet.DESCRIPTOR.full_name: exchange_pb2.AnswerSet}
_ACK: Mapping[str, type[Message]] = {
    exchange_pb2.AcknowledgeReceipt.DESCRIPTOR.full_name: exchange_pb2.AcknowledgeReceipt
}

#: Batch ids a connector takes in one FetchAnswers or AcknowledgeAnswers (docs/exchange.md); more are refused.
MAX_IDS_PER_CALL = 100
#: Subjects asked for in one FetchAnswers call at most (see AnswerCollector.fetch_limit).
FETCH_SUBJECTS = 20_000


class AnswerCollector:
    """Fetches, checks, stores and acknowledges one unit's answers."""

    def __init__(self, exchange: ExchangeEngine) -> None:
        #: The engine whose store, courier, settings, calendar, rosters and "refresh keys" the collecting uses
        #: (read at each call: tests and the deadline sweep change them after construction).
        self.exchange = exchange

    def poll(self, unit_id: str, client: UnitClient, report: CycleReport | None = None) -> tuple[int, int]:
        """Fetch the answers of the unit's receipted batches that are due for a poll; returns (batches answered,
        answers stored) and marks ``report`` reached once the unit replies."""
        ex = self.exchange
        answered = stored = 0
        while True:
            work = ex.claim(unit_id, "receipted", limit=self.fetch_limit())
            if not work:
                return answered, stored
            request = ex.courier.seal(
                exchange_pb2.FetchAnswers(batch_ids=[b.batch_id for b in work]),
                unit_id,
                ttl_ms=ex.settings.envelope_ttl_ms,
            )
            try:
                reply = client.fetch(request)
            except (TransportFailure, UnitRefusal) as failure:
                for batch in work:
                    ex.store.batches.release(batch.batch_id, ex.settings.replica)
                if (
                    report is not None
                    and isinstance(failure, TransportFailure)
                    and ex.refresh.after_refusal(failure, unit_id, report)
                ):
                    continue  # asked again, sealed afresh
                raise
            if report is not None:
                report.reached = True
            try:
                opened = open_reply(ex.courier, reply, _ANSWERS, unit_id=unit_id, request=request)
            except (EnvelopeError, AnswerMismatch) as exc:
                if report is not None and ex.refresh.after_reply(exc, unit_id, report):
                    for batch in work:
                        ex.store.batches.release(batch.batch_id, ex.settings.replica)
                    continue
                for batch in work:
                    ex.store.batches.still_pending_later(batch.batch_id, ex.now_ms() + ex.settings.poll_interval_ms)
                log.error("answer set rejected", extra={"unit": unit_id, "reason": type(exc).__name__})
                return answered, stored
            # Kept with the first chain entry that rests on it (an answer or a delay): a reply saying only
            # "pending" changes nothing and is not kept.
            envelope = kept(opened)
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
                    count = self._store_answer(batch, status.answer, envelope)
                    if count is not None:
                        answered += 1
                        stored += count
                        progressed = True
                elif status.state == exchange_pb2.BATCH_STATE_PENDING:
                    self._pending(batch, status, envelope)
                else:
                    ex.store.batches.resend(batch.batch_id)
                    log.warning(
                        "unit does not know a receipted batch; sending it again",
                        extra={"unit": unit_id, "batch_id": batch.batch_id},
                    )
            for left_out in by_id.values():  # left out of a size-capped answer set: ask again at once
                if left_out is not None:
                    ex.store.batches.release(left_out.batch_id, ex.settings.replica)
                    progressed = True
            if not progressed:
                return answered, stored

    def fetch_limit(self) -> int:
        """Batches asked for in one FetchAnswers: the configured group, but no more than FETCH_SUBJECTS subjects,
        so that an answer set (and the copies made of it while it is opened, parsed and stored) stays a few MiB
        however large batches are; each unit's worker holds one at a time."""
        settings = self.exchange.settings
        return max(1, min(settings.fetch_group, FETCH_SUBJECTS // max(1, settings.batch_size)))

    def _store_answer(self, batch: BatchWork, answer: exchange_pb2.BatchAnswer, envelope: Envelope) -> int | None:
        ex = self.exchange
        expected = ex.store.batches.item_ids(batch.unit_id, batch.batch_id)
        refs = [a.subject_ref for a in answer.subjects]
        valid = answer.batch_digest == batch.digest and len(refs) == len(expected)
        valid = valid and all(r.isdigit() and int(r) in expected for r in refs) and len(set(refs)) == len(refs)
        if not valid:
            ex.store.batches.still_pending_later(batch.batch_id, ex.now_ms() + ex.settings.poll_interval_ms)
            log.error(
                "answer does not match its batch; not stored", extra={"unit": batch.unit_id, "batch_id": batch.batch_id}
            )
            return None
        verdict = judge_answer_staff(
            ex.rosters.history(batch.unit_id),
            answer.responsible_staff,
            answer.answered_at_ms,
            now_ms=ex.now_ms(),
            received_at_ms=batch.received_at_ms,
        )
        if verdict.reason is not None:
            # Procedure V.(三): the unit's staff are registered in advance; an answer naming others is not taken.
            # Polled again: a roster version still on its way may yet make it valid.
            ex.store.batches.still_pending_later(batch.batch_id, ex.now_ms() + ex.settings.poll_interval_ms)
            log.error(
                "answer names unit staff not registered for its time; not stored",
                extra={
                    "unit": batch.unit_id,
                    "batch_id": batch.batch_id,
                    "reason": verdict.reason,
                    "staff_id": verdict.staff_id or "-",
                },
            )
            if ex.metrics is not None:
                ex.metrics.answer_staff_refused(batch.unit_id, verdict.reason)
            return None
        staff = ResponsibleStaff(verdict.staff_ids, verdict.roster_version, answer.answered_at_ms)
        stored = ex.store.batches.store_answers(batch.batch_id, answer.subjects, envelope, ex.now_ms(), staff=staff)
        if ex.metrics is not None and verdict.roster_version is None:
            ex.metrics.answer_staff_unverified(batch.unit_id)
        if ex.metrics is not None and stored:
            received = batch.received_at_ms
            latency = None if received is None else (ex.now_ms() - received) / 1000
            ex.metrics.answered(batch.unit_id, stored, latency)
        return stored

    def _pending(self, batch: BatchWork, status: exchange_pb2.BatchStatus, envelope: Envelope) -> None:
        ex = self.exchange
        original = batch.original_due or from_pb(status.due_date)
        due, reason = original, None
        if status.HasField("delay"):
            try:
                new_due = from_pb(status.delay.new_due_date)
                # Against a provisional original, the bound is provisional too (the same rule the unit used).
                limit = ex.calendar.extension(Deadline(original, batch.due_provisional)).day
                allowed = original < new_due <= limit
            except ValueError:
                allowed = False
            if ex.metrics is not None:
                notice = status.delay.new_due_date
                new_due_text = f"{notice.year:04d}-{notice.month:02d}-{notice.day:02d}"
                ex.metrics.delay_notice(batch.unit_id, batch.batch_id, new_due_text, accepted=allowed)
            if allowed:
                due, reason = new_due, status.delay.reason[:32] or "unspecified"
            else:
                # Clause 12: more than 5 working days of delay is not accepted; the original due date stands.
                log.warning(
                    "delay notice beyond clause 12 ignored", extra={"unit": batch.unit_id, "batch_id": batch.batch_id}
                )
        ex.store.batches.still_pending(
            batch.batch_id,
            due,
            reason,
            ex.now_ms() + ex.settings.poll_interval_ms,
            today=ex.today(),
            envelope=envelope,
            now_ms=ex.now_ms(),
        )

    def acknowledge(self, unit_id: str, client: UnitClient, report: CycleReport) -> int:
        """Acknowledge the unit's stored answers (it may forget them then); returns how many it confirmed."""
        ex = self.exchange
        done = 0
        while True:
            ids = ex.store.batches.unacknowledged(unit_id, min(MAX_IDS_PER_CALL, ex.settings.fetch_group * 5))
            if not ids:
                return done
            request = ex.courier.seal(
                exchange_pb2.AcknowledgeAnswers(batch_ids=ids), unit_id, ttl_ms=ex.settings.envelope_ttl_ms
            )
            try:
                reply = client.acknowledge(request)
            except TransportFailure as failure:
                if ex.refresh.after_refusal(failure, unit_id, report):
                    continue
                raise
            report.reached = True
            try:
                opened = open_reply(ex.courier, reply, _ACK, unit_id=unit_id, request=request)
            except (EnvelopeError, AnswerMismatch) as exc:
                if ex.refresh.after_reply(exc, unit_id, report):
                    continue
                log.error("acknowledgement receipt rejected", extra={"unit": unit_id, "reason": type(exc).__name__})
                return done
            assert isinstance(opened.message, exchange_pb2.AcknowledgeReceipt)
            confirmed = [i for i in opened.message.batch_ids if i in set(ids)]
            ex.store.batches.acknowledged(confirmed, ex.now_ms())
            done += len(confirmed)
            if len(confirmed) < len(ids):
                return done
