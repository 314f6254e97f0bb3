"""The gateway's side of a trust synchronisation with one unit (ExchangeService.SyncTrust, docs/exchange.md).

One synchronisation is one or more rounds. Each round the gateway sends, sealed for the unit, a TrustSync with the
items the unit has not acknowledged yet, its verdicts on the items the unit sent in the previous round, and the
version of the unit's roster it holds; beside the envelope go the gateway's own key announcements. The unit applies
them and answers, in the same call, with its verdicts on the gateway's items and with its own pending items and its
own announcements. The gateway applies the unit's announcements (before it opens the reply), records the unit's
verdicts, and hands each of the unit's items to the handler of its kind; when it then owes verdicts, it runs the next
round at once (at most MAX_ROUNDS). Both envelopes of every round that carries items or acknowledgements either way
are kept in the message archive with chain entries (gateway/trust/events.py).

With several replicas on one database, a synchronisation with a unit runs under the job lease ``trust:<unit>``
(gateway/exchange/jobs.py), so one replica at a time talks trust to a unit; the lease's run history says when each
unit was last synchronised, which is what :class:`~gateway.trust.schedule.TrustSchedule` decides by.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from google.protobuf.message import Message
from hedui.v1 import trust_pb2

from common.errors import HeduiError
from common.trustitems import Ack
from gateway.archive.messages import Envelope
from gateway.exchange.store import GatewayStore
from gateway.exchange.transport import TransportFailure, UnitClient, UnitRefusal
from gateway.trust.events import TrustEvents
from gateway.trust.items import TrustItems
from keys.envelope import Courier, Opened, message_id_of
from keys.errors import EnvelopeError
from keys.live import LiveKeystore
from keys.trustsync import (
    Handler,
    TrustSyncError,
    apply_attachments,
    apply_items,
    check_sync,
    key_announcement_handler,
    kind_name,
)

if TYPE_CHECKING:
    from gateway.metrics import GatewayMetrics

log = logging.getLogger("hedui.gateway.trust")

_TRUST_SYNC: Mapping[str, type[Message]] = {trust_pb2.TrustSync.DESCRIPTOR.full_name: trust_pb2.TrustSync}
#: Rounds of one synchronisation at most; verdicts still owed after them go with the next synchronisation.
MAX_ROUNDS = 4
#: The job lease of a unit's synchronisation is named ``trust:<unit id>`` (the jobs table takes 64 characters).
JOB_PREFIX = "trust:"


def job_name(unit_id: str) -> str:
    """The jobs-table name of ``unit_id``'s synchronisation (a digest for ids too long to fit)."""
    name = JOB_PREFIX + unit_id
    return name if len(name) <= 64 else JOB_PREFIX + hashlib.sha256(unit_id.encode()).hexdigest()[:40]


def default_handlers(keys: LiveKeystore) -> dict[int, Handler]:
    """The handlers the gateway registers itself: key announcements. Rosters and others are added by their
    owners (gateway/server.py wires them)."""
    return {trust_pb2.TRUST_ITEM_KIND_KEY_ANNOUNCEMENT: key_announcement_handler(keys)}


class SyncRefused(HeduiError):
    """The unit's reply to SyncTrust cannot be trusted or used (it does not open, answers another request, or breaks
    the limits); the synchronisation is tried again later."""

    code = "trust_sync_refused"


class SyncBusy(HeduiError):
    """Another replica is synchronising with the unit right now."""

    code = "trust_sync_busy"


@dataclass
class SyncReport:
    """What one synchronisation did."""

    unit_id: str
    rounds: int = 0
    #: Our items offered, and those the unit acknowledged (applied or refused).
    offered: int = 0
    acknowledged: int = 0
    #: The unit's items received, applied and refused by us.
    received: int = 0
    applied: int = 0
    refused: int = 0
    #: Announcements beside the unit's replies that changed our trust store.
    announcements_applied: int = 0
    outcome: str = "ok"
    error: str | None = None
    refusals: list[str] = field(default_factory=list)


class TrustSyncer:
    """Runs trust synchronisations with units; see the module docstring."""

    def __init__(
        self,
        *,
        store: GatewayStore,
        courier: Courier,
        clients: Mapping[str, UnitClient],
        keys: LiveKeystore,
        handlers: Mapping[int, Handler] | None = None,
        held_roster_version: Callable[[str], int] = lambda peer: 0,
        peer_roster_version: Callable[[str, int], None] | None = None,
        envelope_ttl_ms: int = 3_600_000,
        replica: str = "gateway-1",
        lease_ms: int = 120_000,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.store = store
        self.courier = courier
        self.clients = clients
        self.keys = keys
        self.handlers: dict[int, Handler] = dict(handlers) if handlers is not None else default_handlers(keys)
        self.held_roster_version = held_roster_version
        #: Told (unit, version) of each TrustSync received: the highest version of our roster the unit holds.
        self.peer_roster_version = peer_roster_version
        self.envelope_ttl_ms = envelope_ttl_ms
        self.replica = replica
        self.lease_ms = lease_ms
        self.metrics = metrics
        self.items = TrustItems(store.engine)
        self.events = TrustEvents(store.engine)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _now(self) -> int:
        return self.courier.clock.now_ms()

    def _lock(self, unit_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(unit_id, threading.Lock())

    # -- one synchronisation ---------------------------------------------------------------------------------------

    def sync(self, unit_id: str, *, trigger: str = "interval") -> SyncReport:
        """Synchronise trust with ``unit_id`` now. Raises TransportFailure / UnitRefusal (the call failed), SyncRefused
        (the reply cannot be used) or SyncBusy (another replica is at it); whatever was applied before stays."""
        client = self.clients[unit_id]
        name = job_name(unit_id)
        report = SyncReport(unit_id)
        with self._lock(unit_id):
            if not self.store.jobs.acquire(name, self.replica, self._now(), self.lease_ms):
                raise SyncBusy(f"another replica is synchronising trust with {unit_id}")
            try:
                self._rounds(unit_id, client, report)
            except Exception as exc:
                report.outcome, report.error = "failed", type(exc).__name__
                self.store.jobs.release(name, self.replica, self._now(), False)
                self._count(unit_id, trigger, report)
                raise
            self.store.jobs.release(name, self.replica, self._now(), True)
        self._count(unit_id, trigger, report)
        return report

    def _count(self, unit_id: str, trigger: str, report: SyncReport) -> None:
        if self.metrics is not None:
            self.metrics.trust.synced(unit_id, trigger, report.outcome)

    def _rounds(self, unit_id: str, client: UnitClient, report: SyncReport) -> None:
        owed: list[trust_pb2.TrustItemAck] = []
        while report.rounds < MAX_ROUNDS:
            report.rounds += 1
            pending = self.items.pending(unit_id)
            body = trust_pb2.TrustSync(
                items=[trust_pb2.TrustItem(kind=p.kind, payload=p.payload) for p in pending],  # type: ignore[arg-type]
                acks=owed,
                peer_roster_version=max(0, self.held_roster_version(unit_id)),
            )
            envelope = self.courier.seal(body, unit_id, ttl_ms=self.envelope_ttl_ms)
            sent = Envelope(message_id_of(envelope), self.courier.me.party_id, body.DESCRIPTOR.full_name, envelope)
            # Kept before it leaves when it carries anything; a round with nothing either way is not archived (it
            # proves only that both sides were there, which the metrics say).
            if body.items or body.acks:
                self._keep_sent(sent, unit_id, body)
            report.offered += len(pending)
            try:
                reply, announcements = client.sync_trust(envelope, self.keys.attachments())
            except TransportFailure as failure:
                self.apply_announcements(unit_id, failure.announcements)
                raise
            self.apply_announcements(unit_id, announcements, report)
            message, opened = self._open(reply, unit_id=unit_id, request=envelope)
            if message.items or message.acks:
                if not (body.items or body.acks):
                    self._keep_sent(sent, unit_id, body)
                header = opened.header
                self.events.envelope(
                    Envelope(header.message_id, header.sender, header.message_type, opened.raw),
                    unit_id=unit_id, direction="in", items=len(message.items), acks=len(message.acks),
                    now_ms=self._now(),
                )  # fmt: skip
            owed = self._take(unit_id, message, report)
            if not owed:
                return

    def _keep_sent(self, sent: Envelope, unit_id: str, body: trust_pb2.TrustSync) -> None:
        self.events.envelope(
            sent, unit_id=unit_id, direction="out", items=len(body.items), acks=len(body.acks), now_ms=self._now()
        )

    def _open(self, reply: bytes, *, unit_id: str, request: bytes) -> tuple[trust_pb2.TrustSync, Opened]:
        try:
            opened = self.courier.open(reply, expect=_TRUST_SYNC)
            if opened.header.sender != unit_id or opened.header.correlation_id != message_id_of(request):
                raise SyncRefused("the reply is not from the unit called, or does not answer the request sent")
            message = opened.message
            assert isinstance(message, trust_pb2.TrustSync)
            check_sync(message)
        except (EnvelopeError, TrustSyncError) as exc:
            raise SyncRefused(f"the unit's TrustSync reply was refused ({exc.code})") from exc
        return message, opened

    def _take(self, unit_id: str, message: trust_pb2.TrustSync, report: SyncReport) -> list[trust_pb2.TrustItemAck]:
        """Record the unit's verdicts on our items, apply its items; returns the verdicts we owe it."""
        now = self._now()
        if self.peer_roster_version is not None:
            self.peer_roster_version(unit_id, message.peer_roster_version)
        acks = [Ack(a.kind, bytes(a.item_sha256), a.applied, a.reason) for a in message.acks]
        report.acknowledged += self.items.acked(unit_id, acks, now)
        self.events.acknowledged(unit_id, [(a.kind, a.sha256, a.applied, a.reason) for a in acks], now_ms=now)
        for ack in acks:
            if not ack.applied:
                log.warning(
                    "a unit refused a trust item of ours",
                    extra={"unit": unit_id, "kind": ack.kind, "item": ack.sha256.hex()[:16], "reason": ack.reason},
                )
        verdicts = apply_items(message.items, self.handlers, unit_id, now)
        report.received += len(message.items)
        decided = [v for v in verdicts if v.ack is not None]
        report.applied += sum(1 for v in decided if v.reason is None)
        report.refused += sum(1 for v in decided if v.reason is not None)
        report.refusals += [v.reason for v in decided if v.reason is not None]
        self.events.verdicts(unit_id, [(v.kind, v.sha256, v.reason) for v in decided], via="item", now_ms=now)
        if self.metrics is not None:
            for verdict in decided:
                self.metrics.trust.item_received(unit_id, kind_name(verdict.kind), verdict.reason)
        return [v.ack for v in decided if v.ack is not None]

    # -- announcements beside envelopes and refusals ---------------------------------------------------------------

    def apply_announcements(
        self, unit_id: str, announcements: Sequence[bytes], report: SyncReport | None = None
    ) -> int:
        """Apply the unit's own announcements sent beside a reply or a refusal; returns how many changed our trust
        store (each of those gets a chain entry)."""
        if not announcements:
            return 0
        now = self._now()
        results = apply_attachments(self.keys, unit_id, announcements, now)
        changed = [r for r in results if r.changed]
        self.events.verdicts(
            unit_id,
            [(trust_pb2.TRUST_ITEM_KIND_KEY_ANNOUNCEMENT, r.sha256, None) for r in changed],
            via="attachment",
            now_ms=now,
        )
        if report is not None:
            report.announcements_applied += len(changed)
        for result in results:
            if result.reason is not None and result.reason != "unknown_key":
                log.info(
                    "a unit's announcement beside its reply was not applied",
                    extra={"unit": unit_id, "item": result.sha256.hex()[:16], "reason": result.reason},
                )
        return len(changed)

    def refresh(self, unit_id: str, announcements: Sequence[bytes] = ()) -> bool:
        """ "Refresh keys": a unit refused our envelope for a key it does not hold as usable, or its reply did not
        open for a key we do not hold: apply what it sent beside the refusal, then synchronise at once. True when
        the synchronisation succeeded (the caller seals and sends again); False, logged, when it did not."""
        self.apply_announcements(unit_id, announcements)
        try:
            report = self.sync(unit_id, trigger="refresh")
        except (TransportFailure, UnitRefusal, SyncRefused, SyncBusy) as exc:
            log.warning("refresh of keys with a unit failed", extra={"unit": unit_id, "error": type(exc).__name__})
            return False
        log.info(
            "keys refreshed with a unit",
            extra={"unit": unit_id, "announcements": report.announcements_applied, "rounds": report.rounds},
        )
        return True
