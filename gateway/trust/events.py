"""Trust synchronisation as audit chain entries and archived envelopes (clause 17: the archive is complete).

Every TrustSync envelope the gateway sends and every one it accepts from a unit is kept in the message archive with
the chain entry that names it, when its round carries items or acknowledgements either way; each item applied or
refused, and each acknowledgement a unit gave, is an entry of its own. Ids, kinds, digests, counts and reason codes
only: a roster's names never enter the chain.

======================  ========  ====================================================================
action                  actor     detail
======================  ========  ====================================================================
``trust.sent``          exchange  ``unit``, ``items``, ``acks``, ``env``, ``sha256``
``trust.received``      the unit  ``items``, ``acks``, ``env``, ``sha256``
``trust.applied``       the unit  ``kind``, ``item`` (SHA-256 of the payload), ``via`` (``item`` or ``attachment``)
``trust.refused``       the unit  ``kind``, ``item``, ``reason``
``trust.acknowledged``  the unit  ``kind``, ``item``, ``applied`` (``yes``/``no``), ``reason`` when refused
======================  ========  ====================================================================
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Engine

from gateway.archive.audit import AuditLog
from gateway.archive.events import EXCHANGE_ACTOR
from gateway.archive.messages import Envelope, MessageArchive
from keys.trustsync import kind_name


class TrustEvents:
    """Writes the trust synchronisation's chain entries and keeps its envelopes, one transaction each."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.audit = AuditLog(engine)
        self.archive = MessageArchive(engine)

    def envelope(self, envelope: Envelope, *, unit_id: str, direction: str, items: int, acks: int, now_ms: int) -> None:
        """Keep a TrustSync envelope: ours as sent ("out"), or the unit's as received ("in"), with its entry."""
        outgoing = direction == "out"
        fields: list[tuple[str, str | int]] = [("unit", unit_id)] if outgoing else []
        fields += [
            ("items", items),
            ("acks", acks),
            ("env", envelope.message_id.hex()),
            ("sha256", envelope.sha256.hex()),
        ]
        with self.engine.begin() as conn:
            seq = self.audit.append_generated(
                conn, at_ms=now_ms, actor=EXCHANGE_ACTOR if outgoing else unit_id,
                action="trust.sent" if outgoing else "trust.received", fields=fields,
            )  # fmt: skip
            self.archive.keep_in(conn, envelope, direction=direction, now_ms=now_ms, audit_seq=seq)

    def verdicts(
        self, unit_id: str, verdicts: Sequence[tuple[int, bytes, str | None]], *, via: str, now_ms: int
    ) -> None:
        """Items of the unit applied (reason None) or refused, as (kind, SHA-256 of the payload, reason)."""
        if not verdicts:
            return
        with self.engine.begin() as conn:
            for kind, sha, reason in verdicts:
                fields: list[tuple[str, str | int]] = [("kind", kind_name(kind)), ("item", sha.hex())]
                fields.append(("via", via) if reason is None else ("reason", reason))
                self.audit.append_generated(
                    conn, at_ms=now_ms, actor=unit_id, action="trust.applied" if reason is None else "trust.refused",
                    fields=fields,
                )  # fmt: skip

    def acknowledged(self, unit_id: str, acks: Sequence[tuple[int, bytes, bool, str]], *, now_ms: int) -> None:
        """The unit's verdicts on our items, as (kind, SHA-256, applied, reason)."""
        if not acks:
            return
        with self.engine.begin() as conn:
            for kind, sha, applied, reason in acks:
                fields: list[tuple[str, str | int]] = [
                    ("kind", kind_name(kind)), ("item", sha.hex()), ("applied", "yes" if applied else "no"),
                ]  # fmt: skip
                if not applied:
                    fields.append(("reason", reason))
                self.audit.append_generated(
                    conn, at_ms=now_ms, actor=unit_id, action="trust.acknowledged", fields=fields
                )
