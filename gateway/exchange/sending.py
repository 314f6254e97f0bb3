"""Sending ready query batches to a unit: sealed, archived as sent before they leave, and then receipted (the
clause-12 clock starts), refused for good, or refused for now (sent again after the batch's own backoff).

Part of one unit cycle (gateway/exchange/engine.py), which decides when to send and when to poll.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from google.protobuf.message import Message
from hedui.v1 import exchange_pb2

from common.dates import from_pb
from common.logs import public_commission_ref
from gateway.archive.messages import Envelope
from gateway.exchange.batches import BatchWork
from gateway.exchange.cycle import AnswerMismatch, CycleReport, kept, open_reply
from gateway.exchange.failures import TransportFailure, UnitDeferral, UnitRefusal, reason_label
from gateway.exchange.refusals import signed_refusal
from gateway.exchange.transport import UnitClient
from keys.envelope import message_id_of
from keys.errors import EnvelopeError
from keys.trustsync import REFRESH_KEYS

if TYPE_CHECKING:
    from gateway.exchange.engine import ExchangeEngine

log = logging.getLogger("hedui.gateway.exchange.engine")

_RECEIPT: Mapping[str, type[Message]] = {exchange_pb2.BatchReceipt.DESCRIPTOR.full_name: exchange_pb2.BatchReceipt}


class BatchSender:
    """Sends one unit's ready batches and records what became of each (receipt, refusal, or a retry)."""

    def __init__(self, exchange: ExchangeEngine) -> None:
        #: The engine whose store, courier, settings and "refresh keys" the sending uses (read at each call:
        #: tests and the wiring change them after construction).
        self.exchange = exchange

    def send_ready(self, unit_id: str, client: UnitClient, report: CycleReport, limit: int | None = None) -> int:
        """Claim and send the unit's ready batches one at a time, at most ``limit`` (default: ``sends_per_cycle``);
        returns how many were sent."""
        ex = self.exchange
        sent = 0
        while sent < (ex.settings.sends_per_cycle if limit is None else limit):
            work = ex.claim(unit_id, "ready", limit=1)
            if not work:
                return sent
            self._send(work[0], client, report)
            sent += 1
        return sent

    def _send(self, batch: BatchWork, client: UnitClient, report: CycleReport) -> None:
        ex = self.exchange
        query = exchange_pb2.QueryBatch.FromString(batch.content)
        envelope = ex.courier.seal(query, batch.unit_id, ttl_ms=ex.settings.envelope_ttl_ms)
        # Clause 17: kept as sent, with its chain entry, before it leaves.
        sent = Envelope(message_id_of(envelope), ex.courier.me.party_id, query.DESCRIPTOR.full_name, envelope)
        ex.store.batches.sent(batch, sent, ex.now_ms())
        started = time.monotonic()
        try:
            reply = client.submit(envelope)
        except TransportFailure as failure:
            if ex.refresh.after_refusal(failure, batch.unit_id, report):
                # Sealed afresh and sent again at once: the dispatch loop claims it again.
                ex.store.batches.send_failed(batch.batch_id, REFRESH_KEYS, ex.now_ms())
                return
            ex.store.batches.send_failed(batch.batch_id, "transport", ex.now_ms())
            raise
        except UnitRefusal as refusal:
            report.reached = True
            self._refused(batch, refusal, envelope)
            return
        report.reached = True
        try:
            opened = open_reply(ex.courier, reply, _RECEIPT, unit_id=batch.unit_id, request=envelope)
            receipt = opened.message
            assert isinstance(receipt, exchange_pb2.BatchReceipt)
            if receipt.batch_id != batch.batch_id or receipt.batch_digest != batch.digest:
                raise AnswerMismatch("receipt names another batch")
            due = from_pb(receipt.due_date)
        except (EnvelopeError, AnswerMismatch, ValueError) as exc:
            # A receipt we cannot trust does not start the clock: send again later (at once after a key refresh).
            refreshed = ex.refresh.after_reply(exc, batch.unit_id, report)
            retry = ex.now_ms() if refreshed else ex.now_ms() + ex.settings.poll_interval_ms
            ex.store.batches.send_failed(batch.batch_id, "bad_receipt", retry)
            log.log(
                logging.WARNING if refreshed else logging.ERROR,
                "receipt rejected; keys refreshed, sending again" if refreshed else "receipt rejected",
                extra={"unit": batch.unit_id, "batch_id": batch.batch_id, "reason": type(exc).__name__},
            )
            return
        ex.store.batches.receipted(
            batch.batch_id,
            received_at_ms=receipt.received_at_ms,
            due=due,
            envelope=kept(opened),
            next_poll_ms=ex.now_ms(),
            now_ms=ex.now_ms(),
            due_provisional=receipt.due_date_provisional,
        )
        if ex.metrics is not None:
            ex.metrics.receipted(batch.unit_id, len(query.subjects), time.monotonic() - started)
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
        ex = self.exchange
        signed, detail = signed_refusal(ex.courier, batch, refusal, request)
        summary = refusal.summary if not detail else f"{refusal.summary} ({detail})"[:64]
        now = ex.now_ms()
        if ex.metrics is not None:
            ex.metrics.unit_refused(batch.unit_id, reason_label(refusal.reason))
        extra = {
            "unit": batch.unit_id,
            "batch_id": batch.batch_id,
            "status": refusal.status,
            "reason": refusal.reason or "-",
            "signed": signed is not None,
            "detail": str(refusal),
        }
        if isinstance(refusal, UnitDeferral):
            retry_at = now + ex.backoff_ms(batch.attempts + 1)
            ex.store.refusals.deferred(
                batch.batch_id, summary, status=refusal.status, code=refusal.reason, retry_at_ms=retry_at,
                now_ms=now, signed=signed,
            )  # fmt: skip
            log.warning("unit refused a batch for now; sent again later", extra={**extra, "retry_at_ms": retry_at})
            return
        ex.store.refusals.refused(
            batch.batch_id, summary, status=refusal.status, code=refusal.reason, now_ms=now, signed=signed
        )
        log.error("unit refused a batch", extra=extra)
