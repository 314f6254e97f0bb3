"""Exchange events as audit chain entries (clause 17: the archive is complete): a batch sent, receipted, answered,
delayed, refused or overdue. Each is written in the transaction of the state change it records, one entry per batch
event (never per subject), with ids, counts, dates and reason codes only: no personal data.

Entries (``actor``; ``before`` → ``after``; ``detail`` as ``key=value`` pairs joined by ``;``):

===================  ========  =======================  =====================================================
action               actor     before → after           detail
===================  ========  =======================  =====================================================
``batch.sent``       exchange  — → —                    ``unit``, ``batch``, ``items``, ``env``, ``sha256``
``batch.receipted``  the unit  ready → receipted        ``batch``, ``items``, ``due``, ``env``, ``sha256``
``batch.answered``   the unit  receipted → answered     ``batch``, ``answers``, ``env``, ``sha256``
``batch.delay``      the unit  old due → new due        ``batch``, ``reason``, ``env``, ``sha256``
``batch.refused``    the unit  ready → failed           ``batch``, ``items``, ``status``, ``reason`` (+ env)
``batch.deferred``   the unit  ready → ready            ``batch``, ``items``, ``status``, ``reason`` (+ env)
``batch.overdue``    exchange  receipted → overdue      ``unit``, ``batch``, ``items``, ``due``
===================  ========  =======================  =====================================================

``env`` is the message id (32 hex digits) and ``sha256`` the SHA-256 (64 hex digits) of the envelope kept in the
archive: the query batch envelope sent, the unit's receipt, its answer set, or its signed refusal (a refusal names
one, "(+ env)", when the unit signed it: docs/exchange.md, "Signed refusals"). ``batch.deferred`` is a refusal the
batch is sent again after (``approver_unknown``: the unit may not hold our roster yet), written when the batch is
first so refused for that reason, not at every retry. Dates are ``YYYY-MM-DD``; ``items``
counts the batch's subjects, ``answers`` the answers newly stored; ``reason`` and ``status`` are codes (a unit's
free-text delay reason that is not a code is recorded as ``other``). The commission is the entry's commission_id.
"""

from __future__ import annotations

import re
from datetime import date

from sqlalchemy import Connection, Engine

from gateway.archive.audit import AuditLog
from gateway.archive.messages import Envelope, MessageArchive

#: The actor of events the gateway's exchange engine causes itself.
EXCHANGE_ACTOR = "exchange"
_CODE_RE = re.compile(r"[A-Za-z0-9_]{1,32}")


def _code(value: str | None, fallback: str) -> str:
    """A unit-supplied reason as a code, or ``fallback``: its free text never enters the chain."""
    return value if value is not None and _CODE_RE.fullmatch(value) else fallback


class ExchangeEvents:
    """Writes the exchange's chain entries, and keeps the envelopes they name, inside the caller's transaction."""

    def __init__(self, engine: Engine) -> None:
        self.audit = AuditLog(engine)
        self.archive = MessageArchive(engine)

    def _with_envelope(
        self,
        conn: Connection,
        envelope: Envelope,
        *,
        direction: str,
        now_ms: int,
        action: str,
        actor: str,
        commission_id: int | None,
        fields: list[tuple[str, str | int]],
        before: str | None = None,
        after: str | None = None,
    ) -> int:
        fields = [*fields, ("env", envelope.message_id.hex()), ("sha256", envelope.sha256.hex())]
        seq = self.audit.append_generated(
            conn, at_ms=now_ms, actor=actor, action=action, fields=fields, commission_id=commission_id,
            before=before, after=after,
        )  # fmt: skip
        self.archive.keep_in(conn, envelope, direction=direction, now_ms=now_ms, audit_seq=seq)
        return seq

    def sent(
        self, conn: Connection, *, unit_id: str, batch_id: str, commission_id: int, items: int, envelope: Envelope,
        now_ms: int,
    ) -> int:  # fmt: skip
        """A query batch envelope is about to go to the unit: kept as sent, before it leaves."""
        return self._with_envelope(
            conn, envelope, direction="out", now_ms=now_ms, action="batch.sent", actor=EXCHANGE_ACTOR,
            commission_id=commission_id, fields=[("unit", unit_id), ("batch", batch_id), ("items", items)],
        )  # fmt: skip

    def receipted(
        self, conn: Connection, *, unit_id: str, batch_id: str, commission_id: int, items: int, due: date,
        envelope: Envelope, now_ms: int,
    ) -> int:  # fmt: skip
        """The unit's signed receipt starts the clause-12 clock."""
        return self._with_envelope(
            conn, envelope, direction="in", now_ms=now_ms, action="batch.receipted", actor=unit_id,
            commission_id=commission_id, before="ready", after="receipted",
            fields=[("batch", batch_id), ("items", items), ("due", due.isoformat())],
        )  # fmt: skip

    def answered(
        self, conn: Connection, *, unit_id: str, batch_id: str, commission_id: int, answers: int,
        envelope: Envelope, now_ms: int,
    ) -> int:  # fmt: skip
        """The unit's answer set answered the batch; ``answers`` were newly stored."""
        return self._with_envelope(
            conn, envelope, direction="in", now_ms=now_ms, action="batch.answered", actor=unit_id,
            commission_id=commission_id, before="receipted", after="answered",
            fields=[("batch", batch_id), ("answers", answers)],
        )  # fmt: skip

    def delayed(
        self, conn: Connection, *, unit_id: str, batch_id: str, commission_id: int, old_due: date, new_due: date,
        reason: str | None, envelope: Envelope, now_ms: int,
    ) -> int:  # fmt: skip
        """A delay notice within clause 12 was accepted: the batch's due date moved."""
        return self._with_envelope(
            conn, envelope, direction="in", now_ms=now_ms, action="batch.delay", actor=unit_id,
            commission_id=commission_id, before=old_due.isoformat(), after=new_due.isoformat(),
            fields=[("batch", batch_id), ("reason", _code(reason, "other"))],
        )  # fmt: skip

    def refused(
        self, conn: Connection, *, unit_id: str, batch_id: str, commission_id: int, items: int, status: str,
        reason: str | None, now_ms: int, envelope: Envelope | None = None, deferred: bool = False,
    ) -> int:  # fmt: skip
        """The unit refused the batch: for good (``batch.refused``), or for now (``deferred``: ``batch.deferred``,
        sent again later). A gRPC status and the unit's reason code, and the unit's signed refusal ``envelope`` when
        it sent one that checked out."""
        action, after = ("batch.deferred", "ready") if deferred else ("batch.refused", "failed")
        fields: list[tuple[str, str | int]] = [
            ("batch", batch_id), ("items", items), ("status", _code(status, "other")),
            ("reason", _code(reason, "unspecified")),
        ]  # fmt: skip
        if envelope is not None:
            return self._with_envelope(
                conn, envelope, direction="in", now_ms=now_ms, action=action, actor=unit_id,
                commission_id=commission_id, before="ready", after=after, fields=fields,
            )  # fmt: skip
        return self.audit.append_generated(
            conn, at_ms=now_ms, actor=unit_id, action=action, commission_id=commission_id,
            before="ready", after=after, fields=fields,
        )  # fmt: skip

    def overdue(
        self, conn: Connection, *, unit_id: str, batch_id: str, commission_id: int, items: int, due: date,
        now_ms: int,
    ) -> int:  # fmt: skip
        """The batch's due date passed without an answer (clause 12)."""
        return self.audit.append_generated(
            conn, at_ms=now_ms, actor=EXCHANGE_ACTOR, action="batch.overdue", commission_id=commission_id,
            before="receipted", after="overdue",
            fields=[("unit", unit_id), ("batch", batch_id), ("items", items), ("due", due.isoformat())],
        )  # fmt: skip
