"""The unit's answering of the batches it accepted: each looked up through the adapter (connectors/answering.py) and
stored with the unit's responsible staff named; a batch the adapter cannot answer stays pending, is tried again after
a growing pause, and gets the clause-12 delay notice when its due date arrives.

Runs in the connector's answer worker (connectors/server.py ``AnswerWorker``), apart from the calls the gateway
makes (connectors/connector.py), which only ever read what is stored here.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from hedui.v1 import exchange_pb2

from common.dates import from_pb, year_month
from common.logs import LogThrottle
from connectors.adapters.base import AdapterError, LookupContext
from connectors.answering import answer_subjects
from connectors.store import StoredBatch
from connectors.trust.duty import Responsible

if TYPE_CHECKING:
    from connectors.connector import Connector

log = logging.getLogger("hedui.connector")

#: First pause before an unanswerable batch is tried again, and the longest pause.
ANSWER_RETRY_BASE_MS = 5_000
ANSWER_RETRY_MAX_MS = 5 * 60_000


class AnswerQueue:
    """Answers the connector's pending batches, a few at a time."""

    def __init__(self, connector: Connector) -> None:
        #: The connector whose store, adapter, staff on duty and settings the answering uses (read at each call:
        #: the server's wiring and tests set them after construction).
        self.connector = connector
        #: Batches whose answering failed: batch id -> (consecutive failures, earliest next try). In memory only:
        #: a restart tries everything at once, which is what an operator who just fixed the database wants.
        self._retry: dict[str, tuple[int, int]] = {}
        #: The worker is holding answers back for want of registered staff on duty (a metric and an alert).
        self.short_of_staff = False
        self._staff_log = LogThrottle(60.0)

    def responsible_staff(self, at_ms: int) -> Responsible:
        """The unit's staff to name on an answer made at ``at_ms`` (see connectors/trust/duty.py)."""
        c = self.connector
        if c.duty is None or c.rosters is None:
            return Responsible((), legacy=True)
        return c.duty.responsible(c.rosters.history(c.party_id), at_ms, c.answer_staff)

    def answer_pending(self, limit: int = 16) -> int:
        """Answer up to ``limit`` pending batches; returns how many were answered. Adapter failures leave a batch
        pending, tried again after a growing pause (ANSWER_RETRY_BASE_MS doubling up to ANSWER_RETRY_MAX_MS, so a
        database that is down is not hammered), and issue the clause-12 delay notice when its due date arrives."""
        c = self.connector
        answered = 0
        now = c.now_ms()
        waiting = {batch_id for batch_id, (_, next_ms) in self._retry.items() if next_ms > now}
        responsible = self.responsible_staff(now)
        self.short_of_staff = responsible.reason is not None
        if responsible.reason is not None:
            held_back = self._staff_log.admit(responsible.reason)
            if held_back is not None:
                # Procedure V.(二): the unit's side of the exchange names its responsible staff; it answers nothing
                # rather than an answer set the gateway would refuse.
                log.warning(
                    "answers held back: too few registered exchange staff on duty",
                    extra={
                        "reason": responsible.reason,
                        "on_duty": len(responsible.staff_ids),
                        "required": c.answer_staff,
                        "repeated": held_back or None,
                    },
                )
            return 0
        for stored, content in c.store.pending(limit, exclude=waiting):
            batch = exchange_pb2.QueryBatch.FromString(content)
            try:
                answer = self._answer(batch, stored)
            except AdapterError as exc:
                c.store.count_attempt(stored.batch_id)
                failures = self._retry.get(stored.batch_id, (0, 0))[0] + 1
                pause = min(ANSWER_RETRY_MAX_MS, ANSWER_RETRY_BASE_MS * 2 ** (failures - 1))
                self._retry[stored.batch_id] = (failures, c.now_ms() + pause)
                # AdapterError messages never carry personal data (connectors/adapters/base.py): the DBA gets the
                # reason (a refused login, a column that does not fit) without a debugger.
                log.error(
                    "adapter failed; batch stays pending",
                    extra={
                        "batch_id": stored.batch_id,
                        "reason": exc.code,
                        "detail": str(exc),
                        "failures": failures,
                        "retry_in_s": pause // 1000,
                    },
                )
                if c.metrics is not None:
                    c.metrics.adapter_failures.inc()
                self._delay_if_due(stored)
                continue
            self._retry.pop(stored.batch_id, None)
            # Named as of the answer's own time, which is what the gateway judges them by.
            named = self.responsible_staff(answer.answered_at_ms)
            if named.reason is not None:
                self.short_of_staff = True
                break
            answer.responsible_staff.extend(named.staff_ids)
            if c.store.store_answer(stored.batch_id, answer.SerializeToString(deterministic=True), c.now_ms()):
                answered += 1
                if c.metrics is not None:
                    c.metrics.answered(s.status for s in answer.subjects)
        return answered

    def _answer(self, batch: exchange_pb2.QueryBatch, stored: StoredBatch) -> exchange_pb2.BatchAnswer:
        c = self.connector
        now = c.now_ms()
        context = LookupContext(
            categories=tuple(batch.categories),
            income_from=year_month(batch.income_from),
            income_to=year_month(batch.income_to),
            assets_as_of=from_pb(batch.assets_as_of),
            produced_at_ms=now,
        )
        limits = {int(t.category): t.limit_fen for t in batch.thresholds if t.category in c.threshold_categories}
        answer = answer_subjects(batch.subjects, c.adapter, context, limits, today=c.today())
        answer.batch_id, answer.batch_digest, answer.answered_at_ms = batch.batch_id, stored.digest, now
        return answer

    def _delay_if_due(self, stored: StoredBatch) -> None:
        c = self.connector
        if stored.delay_reason is None and c.today() >= stored.due:
            c.issue_delay(stored.batch_id, c.extension(stored), "technical")
