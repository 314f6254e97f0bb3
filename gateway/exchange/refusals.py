"""A unit's refusal of a query batch, as the gateway records it: for good (the batch fails and waits for an
operator) or for now (sent again after its own backoff), with the unit's signed refusal when it sent one that
checked out (docs/exchange.md, "Signed refusals"): kept in the archive with the refusal's chain entry and named by
the batch (``batches.refusal_message_id``).

Like every audited change of a batch, each takes the audit chain's lock before it updates the batch row
(gateway/exchange/batches.py).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from google.protobuf.message import Message
from hedui.v1 import exchange_pb2, trust_pb2
from sqlalchemy import Engine, select, update
from sqlalchemy.engine import Connection

from gateway.archive.audit import lock
from gateway.archive.events import ExchangeEvents
from gateway.archive.messages import Envelope
from gateway.db import schema as s
from gateway.exchange.batches import BatchWork
from gateway.exchange.failures import UnitRefusal
from keys.envelope import Courier, message_id_of
from keys.errors import EnvelopeError

log = logging.getLogger("hedui.gateway.exchange.engine")

_REFUSAL: Mapping[str, type[Message]] = {trust_pb2.Refusal.DESCRIPTOR.full_name: trust_pb2.Refusal}
_STAFF_ID_RE = re.compile(r"[A-Za-z0-9-]{1,32}")
_QUERY_BATCH = exchange_pb2.QueryBatch.DESCRIPTOR.full_name


def signed_refusal(
    courier: Courier, batch: BatchWork, refusal: UnitRefusal, request: bytes
) -> tuple[Envelope | None, str]:
    """The unit's signed refusal of ``batch`` (sent as the envelope ``request``) as the archive keeps it, and its
    detail when that is a staff id. (None, "") when the unit sent none, or one that does not open, or that does not
    answer this very request for this batch with the reason it gave: such bytes prove nothing and are not kept."""
    if refusal.signed is None:
        return None, ""
    where = {"unit": batch.unit_id, "batch_id": batch.batch_id}
    try:
        opened = courier.open(refusal.signed, expect=_REFUSAL)
    except EnvelopeError as exc:
        log.warning("signed refusal ignored", extra={**where, "error": exc.code})
        return None, ""
    header, signed = opened.header, opened.message
    assert isinstance(signed, trust_pb2.Refusal)
    request_id = message_id_of(request)
    if (
        header.sender != batch.unit_id
        or header.correlation_id != request_id
        or signed.request_message_id != request_id
        or signed.request_type != _QUERY_BATCH
        or signed.batch_id != batch.batch_id
        or signed.batch_digest != batch.digest
        or signed.reason != (refusal.reason or "")
    ):
        log.warning("signed refusal ignored", extra={**where, "error": "mismatch"})
        return None, ""
    kept = Envelope(header.message_id, header.sender, header.message_type, opened.raw)
    return kept, signed.detail if _STAFF_ID_RE.fullmatch(signed.detail) else ""


class RefusedBatches:
    """Records the units' refusals of batches."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.events = ExchangeEvents(engine)

    @staticmethod
    def _finish(conn: Connection, batch_id: str, **values: object) -> bool:
        """As BatchLedger._finish: only a batch still ready (a late writer never moves a batch backwards)."""
        return bool(
            conn.execute(
                update(s.batches)
                .where(s.batches.c.batch_id == batch_id, s.batches.c.state == "ready")
                .values(claimed_by=None, claim_until_ms=None, **values)
            ).rowcount
        )

    @staticmethod
    def _facts(conn: Connection, batch_id: str) -> tuple[str, int, int]:
        b = s.batches.c
        row = conn.execute(select(b.unit_id, b.commission_id, b.subject_count).where(b.batch_id == batch_id)).one()
        return row.unit_id, row.commission_id, row.subject_count

    def refused(
        self,
        batch_id: str,
        reason: str,
        *,
        status: str,
        code: str | None,
        now_ms: int,
        signed: Envelope | None = None,
    ) -> None:
        """The unit refused the batch for a reason a retry cannot cure: an operator must look at it, and once the
        cause is fixed puts it back with ``BatchLedger.resend_failed``. ``reason`` is kept in ``last_error``; the chain
        entry ``batch.refused`` records the gRPC ``status`` and the unit's reason ``code``, and names the unit's
        signed refusal ``signed`` (kept in the archive, and named by the batch) when it sent one."""
        with self.engine.begin() as conn:
            lock(conn)
            changed = self._finish(
                conn, batch_id, state="failed", attempts=s.batches.c.attempts + 1, last_error=reason[:64]
            )
            if changed:
                unit_id, commission_id, items = self._facts(conn, batch_id)
                self.events.refused(
                    conn, unit_id=unit_id, batch_id=batch_id, commission_id=commission_id, items=items,
                    status=status, reason=code, now_ms=now_ms, envelope=signed,
                )  # fmt: skip
                self._keep_refusal(conn, batch_id, signed)

    def deferred(
        self,
        batch_id: str,
        reason: str,
        *,
        status: str,
        code: str | None,
        retry_at_ms: int,
        now_ms: int,
        signed: Envelope | None = None,
    ) -> None:
        """The unit refused the batch for now (failures.DEFERRED_REASONS): it stays ready and is sent again at
        ``retry_at_ms``; ``reason`` is kept in ``last_error``. The first refusal for a reason is a ``batch.deferred``
        chain entry (with the signed refusal, kept and named by the batch); the same refusal again writes none."""
        b = s.batches.c
        with self.engine.begin() as conn:
            lock(conn)
            before = conn.execute(select(b.last_error).where(b.batch_id == batch_id)).scalar_one_or_none()
            changed = self._finish(
                conn, batch_id, attempts=b.attempts + 1, last_error=reason[:64], next_attempt_ms=retry_at_ms
            )
            if changed and before != reason[:64]:
                unit_id, commission_id, items = self._facts(conn, batch_id)
                self.events.refused(
                    conn, unit_id=unit_id, batch_id=batch_id, commission_id=commission_id, items=items,
                    status=status, reason=code, now_ms=now_ms, envelope=signed, deferred=True,
                )  # fmt: skip
                self._keep_refusal(conn, batch_id, signed)

    @staticmethod
    def _keep_refusal(conn: Connection, batch_id: str, signed: Envelope | None) -> None:
        """Name the signed refusal (archived by its chain entry) from the batch: set once it is kept."""
        if signed is not None:
            conn.execute(
                update(s.batches).where(s.batches.c.batch_id == batch_id).values(refusal_message_id=signed.message_id)
            )
