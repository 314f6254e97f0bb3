"""The sharing unit's exchange desk: accepts query batches, answers them, reports delays, forgets when allowed.

Transport-independent: the gRPC servicer (connectors/server.py) hands it envelope bytes and the TLS peer's party
id and sends back what it returns. Every refusal is a :class:`Refusal` with an audit entry; a refused request
changes nothing else.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from datetime import date
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import Message
from hedui.v1 import exchange_pb2

from common.categories import UNIT_DATA
from common.dates import to_pb
from common.logs import public_commission_ref
from common.workdays import CHINA_TZ, CalendarSource, Deadline, WorkdayCalendar
from connectors.adapters.base import Adapter
from connectors.answer_queue import ANSWER_RETRY_BASE_MS, ANSWER_RETRY_MAX_MS, AnswerQueue
from connectors.approvals import SUBJECT_ALREADY_QUERIED, ApprovalCheck, GatewayRosters, NoRosters
from connectors.approvals import refusal as approval_refusal
from connectors.batch_rules import BATCH_ID_RE, MAX_NAME_LENGTH, MAX_REF_LENGTH, check_batch, invalid
from connectors.errors import DelayRefused, Refusal, envelope_refusal, sign_refusal
from connectors.store import BatchExists, ConnectorStore, Shares, SharesQueried, StoredBatch
from connectors.trust.duty import OnDuty
from connectors.trust.rosters import PeerRosters
from keys.clock import DAY_MS, MINUTE_MS, from_ms
from keys.envelope import Courier, Opened
from keys.errors import EnvelopeError, ReplayedEnvelope
from keys.live import ATTACHMENT_WINDOW_MS
from keys.trustsync import MAX_METADATA_ANNOUNCEMENTS, REFRESH_KEYS

if TYPE_CHECKING:
    from connectors.metrics import ConnectorMetrics
    from connectors.trust.keys import ConnectorKeys
    from connectors.trust.sync import TrustDesk

__all__ = [
    "ANSWER_RETRY_BASE_MS",
    "ANSWER_RETRY_MAX_MS",
    "MAX_ANSWER_BYTES",
    "MAX_IDS_PER_REQUEST",
    "MAX_NAME_LENGTH",
    "MAX_REF_LENGTH",
    "Connector",
]

log = logging.getLogger("hedui.connector")

MAX_IDS_PER_REQUEST = 100
#: Answers are returned until the response would pass this size; the gateway asks again for the rest.
MAX_ANSWER_BYTES = 24 * 1024 * 1024

_QUERY = {exchange_pb2.QueryBatch.DESCRIPTOR.full_name: exchange_pb2.QueryBatch}
_FETCH = {exchange_pb2.FetchAnswers.DESCRIPTOR.full_name: exchange_pb2.FetchAnswers}
_ACK = {exchange_pb2.AcknowledgeAnswers.DESCRIPTOR.full_name: exchange_pb2.AcknowledgeAnswers}


class Connector:
    """One sharing unit's side of the exchange."""

    def __init__(
        self,
        *,
        courier: Courier,
        store: ConnectorStore,
        adapter: Adapter,
        unit_category: int,
        calendar: WorkdayCalendar,
        staff: Mapping[str, frozenset[str]],
        threshold_categories: frozenset[int] = frozenset(),
        max_subjects: int = 5000,
        envelope_ttl_ms: int = 60 * MINUTE_MS,
        metrics: ConnectorMetrics | None = None,
        rosters: GatewayRosters | None = None,
        allow_unverified_approvals: bool = False,
        approval_max_age_ms: int = 45 * DAY_MS,
    ) -> None:
        """``rosters``: the gateways' rosters the unit holds, which exchange approvals are verified against (none:
        every approver is unknown); ``staff`` (``[[staff]]``, gateway -> staff ids) and
        ``allow_unverified_approvals``: the migration rule of connectors/approvals.py."""
        self.courier = courier
        self.store = store
        self.adapter = adapter
        self.served = frozenset(UNIT_DATA[unit_category])
        self.calendar = calendar
        self.approvals = ApprovalCheck(
            rosters=rosters or NoRosters(),
            legacy_staff=staff,
            allow_unverified=allow_unverified_approvals,
            max_age_ms=approval_max_age_ms,
        )
        self.threshold_categories = threshold_categories
        self.max_subjects = max_subjects
        self.envelope_ttl_ms = envelope_ttl_ms
        self.metrics = metrics
        #: Where a running service re-reads its holiday file (set by connectors.server.build_connector); None: the
        #: calendar given here stays.
        self.calendar_source: CalendarSource | None = None
        #: The rosters the unit holds (set by build_connector): a gateway's staff are judged by its roster in force
        #: when the batch was made; None: by the deprecated [[staff]] ids (``staff``) alone.
        self.rosters: PeerRosters | None = None
        #: Who is on duty (set by build_connector); once the unit's own roster is in force, each answer set names at
        #: least ``answer_staff`` of them (Procedure V.(二)) or is not made. None: answers name nobody.
        self.duty: OnDuty | None = None
        self.answer_staff = 1
        #: The trust synchronisation's handler (connectors/trust/sync.py); None: SyncTrust is refused.
        self.trust_desk: TrustDesk | None = None
        #: The live keys and their job (connectors/trust/keys.py), run by the server; None: keys as given, fixed.
        self.keys: ConnectorKeys | None = None
        #: The answering of accepted batches, run by the server's answer worker.
        self.answers = AnswerQueue(self)

    @property
    def party_id(self) -> str:
        return self.courier.me.party_id

    def now_ms(self) -> int:
        """The courier's clock: the time every step records."""
        return self.courier.clock.now_ms()

    def today(self) -> date:
        """Today in China (clause 12 counts days there)."""
        return from_ms(self.now_ms()).astimezone(CHINA_TZ).date()

    # -- receiving ---------------------------------------------------------------------------------------------

    def _open(self, data: bytes, expect: Mapping[str, type[Message]], tls_party: str | None) -> Opened:
        try:
            opened = self.courier.open(data, expect=expect)
        except EnvelopeError as error:
            refusal = envelope_refusal(error)
            if refusal.public_reason == REFRESH_KEYS:
                # Our own announcements go beside the refusal: they may be the only way the caller can learn a key
                # of ours it must seal for before it can talk to us at all (docs/exchange.md, "Refresh keys").
                since = self.now_ms() - ATTACHMENT_WINDOW_MS
                refusal.announcements = tuple(
                    self.courier.me.announcements(since_ms=since, limit=MAX_METADATA_ANNOUNCEMENTS)
                )
            raise refusal from error
        if tls_party is not None and opened.header.sender != tls_party:
            raise Refusal(
                grpc.StatusCode.PERMISSION_DENIED, "TLS identity does not match the envelope sender", "tls_mismatch"
            )
        return opened

    def open_request(self, data: bytes, expect: Mapping[str, type[Message]], tls_party: str | None) -> Opened:
        """Open an envelope from a gateway as every call does: a Refusal (``refresh_keys`` included) if it does not
        open, or if its sender is not the TLS peer."""
        return self._open(data, expect, tls_party)

    def reply_to(self, message: Message, opened: Opened) -> bytes:
        """Seal ``message`` for the sender of ``opened``, correlated with it."""
        return self._reply(message, opened)

    def sync_trust(self, request: exchange_pb2.SealedMessage, tls_party: str | None) -> exchange_pb2.SealedMessage:
        """SyncTrust (connectors/trust/sync.py): a sealed TrustSync and the gateway's announcements in, ours out."""
        try:
            if self.trust_desk is None:
                raise Refusal(
                    grpc.StatusCode.UNIMPLEMENTED, "this connector takes no trust synchronisation", "trust_unsupported"
                )
            return self.trust_desk.sync(request, tls_party)
        except Refusal as refusal:
            raise self._refuse(refusal, tls_party) from None

    def _reply(self, message: Message, opened: Opened) -> bytes:
        return self.courier.seal(
            message, opened.header.sender, ttl_ms=self.envelope_ttl_ms, correlation_id=opened.header.message_id
        )

    def _refuse(
        self,
        refusal: Refusal,
        gateway: str | None,
        batch_id: str | None = None,
        *,
        opened: Opened | None = None,
        batch_digest: bytes = b"",
    ) -> Refusal:
        """Record, count and log a refusal; for a request whose envelope opened (``opened``: the gateway is
        authenticated), attach the signed refusal the server sends along (docs/exchange.md, "Signed refusals")."""
        self.store.record(self.now_ms(), "refused", gateway=gateway, batch_id=batch_id, reason=refusal.reason)
        if opened is not None:
            refusal.signed = sign_refusal(
                self.courier, refusal, opened, batch_id=batch_id if batch_id and BATCH_ID_RE.match(batch_id) else "",
                batch_digest=batch_digest, now_ms=self.now_ms(), ttl_ms=self.envelope_ttl_ms,
            )  # fmt: skip
        if self.metrics is not None:
            self.metrics.refusals.labels(refusal.reason).inc()
            if isinstance(refusal.__cause__, EnvelopeError):
                # Counted here, not in the courier: a batch sent again after a lost receipt is a replay that is
                # answered with its stored receipt, not a rejection.
                self.metrics.service.envelope_rejected(refusal.__cause__)
        log.warning("request refused", extra={"reason": refusal.reason, "gateway": gateway or "-"})
        return refusal

    def submit(self, data: bytes, tls_party: str | None) -> bytes:
        """A sealed QueryBatch in, a sealed BatchReceipt out (the same receipt for the same batch, always)."""
        try:
            try:
                opened = self._open(data, _QUERY, tls_party)
            except Refusal as refusal:
                if isinstance(refusal.__cause__, ReplayedEnvelope):
                    # The identical bytes came again (a retry after a lost reply): they were authenticated on
                    # first receipt and the signature was checked again before the replay check fired.
                    stored = self.store.by_envelope(tls_party, hashlib.sha256(data).digest())
                    if stored is not None:
                        return self.courier.seal(
                            self._receipt(stored),
                            stored.gateway,
                            ttl_ms=self.envelope_ttl_ms,
                            correlation_id=stored.message_id,
                        )
                raise
        except Refusal as refusal:
            raise self._refuse(refusal, tls_party) from None
        batch = opened.message
        assert isinstance(batch, exchange_pb2.QueryBatch)
        gateway = opened.header.sender
        content = batch.SerializeToString(deterministic=True)
        digest = hashlib.sha256(content).digest()
        try:
            existing = self.store.get(batch.batch_id) if BATCH_ID_RE.match(batch.batch_id) else None
            if existing is not None:
                return self._same_batch_receipt(existing, gateway, digest, opened)
            self._validate(batch, gateway, opened.header.created_at_ms)
            received_at = self.now_ms()
            # Never refused for the calendar: a due date across a year without its official schedule is given
            # provisionally and fixed by settle_due_dates once the schedule is installed.
            due = self._due(received_at)
            stored = StoredBatch(
                batch_id=batch.batch_id,
                gateway=gateway,
                message_id=opened.header.message_id,
                envelope_sha256=hashlib.sha256(data).digest(),
                digest=digest,
                subject_count=len(batch.subjects),
                received_at_ms=received_at,
                original_due=due.day,
                due=due.day,
                state="pending",
                answered_at_ms=None,
                delay_reason=None,
                delay_issued_at_ms=None,
                due_provisional=due.provisional,
            )
            try:
                self.store.insert(stored, content, Shares.of(batch))
            except SharesQueried as exc:
                # Clause 16: approved subjects are queried once; the same ones again under another batch id (a
                # replay of an approved batch) are refused, whatever the approvals say.
                raise approval_refusal(
                    SUBJECT_ALREADY_QUERIED, f"subjects of this batch were received before in batch {exc.batch_id}"
                ) from None
            except BatchExists:
                # Lost a race with a concurrent submission of the same batch id.
                existing = self.store.get(batch.batch_id)
                assert existing is not None
                return self._same_batch_receipt(existing, gateway, digest, opened)
        except Refusal as refusal:
            raise self._refuse(refusal, gateway, batch.batch_id or None, opened=opened, batch_digest=digest) from None
        if self.metrics is not None:
            self.metrics.batches_received.inc()
        log.info(
            "batch accepted",
            extra={
                "gateway": gateway,
                "batch_id": stored.batch_id,
                "commission_id": public_commission_ref(batch.commission_ref),
                "subjects": stored.subject_count,
                "due_provisional": stored.due_provisional,
            },
        )
        return self._reply(self._receipt(stored), opened)

    def _same_batch_receipt(self, existing: StoredBatch, gateway: str, digest: bytes, opened: Opened) -> bytes:
        if existing.gateway != gateway or existing.digest != digest:
            raise Refusal(
                grpc.StatusCode.ALREADY_EXISTS, "batch id already used for different content", "batch_id_reused"
            )
        return self._reply(self._receipt(existing), opened)

    @staticmethod
    def _receipt(stored: StoredBatch) -> exchange_pb2.BatchReceipt:
        return exchange_pb2.BatchReceipt(
            batch_id=stored.batch_id,
            batch_digest=stored.digest,
            received_at_ms=stored.received_at_ms,
            due_date=to_pb(stored.original_due),
            subject_count=stored.subject_count,
            due_date_provisional=stored.due_provisional,
        )

    def _due(self, received_at_ms: int) -> Deadline:
        """Clause 12: 7 working days after receipt; provisional across a year the calendar does not know."""
        return self.calendar.deadline(from_ms(received_at_ms))

    def extension(self, stored: StoredBatch) -> date:
        """Clause 12: the latest date a delay notice may move the batch's due date to (provisional with it)."""
        return self.calendar.extension(Deadline(stored.original_due, stored.due_provisional)).day

    def settle_due_dates(self, calendar: WorkdayCalendar | None = None) -> int:
        """Fix the provisional due dates the calendar (``calendar`` from now on, when given: a holiday file read
        again) can now compute exactly, from each batch's receipt time; each change gets an audit entry. Returns
        how many were fixed. The gateway learns the final date from the next BatchStatus (docs/exchange.md)."""
        if calendar is not None:
            self.calendar = calendar
        fixed = 0
        for stored in self.store.provisional():
            settled = self.calendar.settle(
                from_ms(stored.received_at_ms), stored.due, delayed=stored.delay_reason is not None
            )
            if settled is None:
                continue
            original, due = settled
            if self.store.settle_due(stored.batch_id, original, due, self.now_ms()):
                fixed += 1
                log.info(
                    "provisional due date is final",
                    extra={
                        "batch_id": stored.batch_id,
                        "provisional": stored.original_due.isoformat(),
                        "final": original.isoformat(),
                    },
                )
        return fixed

    def _validate(self, batch: exchange_pb2.QueryBatch, gateway: str, created_at_ms: int) -> None:
        """Whole-batch checks (connectors/batch_rules.py), with the unit's settings as they are now."""
        check_batch(
            batch,
            served=self.served,
            max_subjects=self.max_subjects,
            threshold_categories=self.threshold_categories,
            approvals=self.approvals,
            gateway=gateway,
            unit=self.party_id,
            created_at_ms=created_at_ms,
        )

    # -- answering (connectors/answer_queue.py) ----------------------------------------------------------------

    def answer_pending(self, limit: int = 16) -> int:
        """Answer up to ``limit`` pending batches; returns how many were answered (:class:`AnswerQueue`)."""
        return self.answers.answer_pending(limit)

    @property
    def short_of_staff(self) -> bool:
        """The worker is holding answers back for want of registered staff on duty (a metric and an alert)."""
        return self.answers.short_of_staff

    def issue_delay(self, batch_id: str, new_due: date, reason: str) -> None:
        """Clause 12: notify that a pending batch will be answered by ``new_due`` (at most 5 working days past
        the original due date). The notice travels, signed, with the batch's status on the next fetch."""
        stored = self.store.get(batch_id)
        if stored is None or stored.state != "pending":
            raise DelayRefused("only a pending batch can be delayed")
        if not re.fullmatch(r"[a-z_]{1,32}", reason):
            raise DelayRefused("reason must be a short code such as technical or volume")
        latest = self.extension(stored)
        if new_due > latest:
            raise DelayRefused(f"clause 12 allows at most 5 working days of delay: {new_due} is after {latest}")
        if new_due <= stored.due:
            raise DelayRefused("a delay must move the due date later")
        self.store.set_delay(batch_id, new_due, reason, self.now_ms())
        if self.metrics is not None:
            self.metrics.delay_notices.inc()
        log.info("delay notice issued", extra={"batch_id": batch_id, "reason": reason})

    # -- fetching and acknowledging ----------------------------------------------------------------------------

    def fetch(self, data: bytes, tls_party: str | None) -> bytes:
        """A sealed FetchAnswers in, a sealed AnswerSet out."""
        try:
            opened = self._open(data, _FETCH, tls_party)
        except Refusal as refusal:
            raise self._refuse(refusal, tls_party) from None
        request = opened.message
        assert isinstance(request, exchange_pb2.FetchAnswers)
        if not 0 < len(request.batch_ids) <= MAX_IDS_PER_REQUEST:
            refused = invalid(f"ask for 1 to {MAX_IDS_PER_REQUEST} batch ids at a time", "bad_fetch")
            raise self._refuse(refused, opened.header.sender, opened=opened)
        found = self.store.answers_for(opened.header.sender, list(dict.fromkeys(request.batch_ids)))
        result, size = exchange_pb2.AnswerSet(), 0
        for batch_id in dict.fromkeys(request.batch_ids):
            status = exchange_pb2.BatchStatus(batch_id=batch_id, state=exchange_pb2.BATCH_STATE_UNKNOWN)
            if batch_id in found:
                stored, answer = found[batch_id]
                status.due_date.CopyFrom(to_pb(stored.due))
                status.due_date_provisional = stored.due_provisional
                if stored.delay_reason is not None and stored.delay_issued_at_ms is not None:
                    status.delay.CopyFrom(
                        exchange_pb2.DelayNotice(
                            batch_id=batch_id,
                            original_due_date=to_pb(stored.original_due),
                            new_due_date=to_pb(stored.due),
                            reason=stored.delay_reason,
                            issued_at_ms=stored.delay_issued_at_ms,
                        )
                    )
                if stored.state == "pending":
                    status.state = exchange_pb2.BATCH_STATE_PENDING
                elif answer is not None:
                    if size + len(answer) > MAX_ANSWER_BYTES and size:
                        break  # the rest on the next fetch
                    size += len(answer)
                    status.state = exchange_pb2.BATCH_STATE_ANSWERED
                    status.answer.ParseFromString(answer)
            result.batches.append(status)
        return self._reply(result, opened)

    def acknowledge(self, data: bytes, tls_party: str | None) -> bytes:
        """A sealed AcknowledgeAnswers in, a sealed AcknowledgeReceipt out."""
        try:
            opened = self._open(data, _ACK, tls_party)
        except Refusal as refusal:
            raise self._refuse(refusal, tls_party) from None
        request = opened.message
        assert isinstance(request, exchange_pb2.AcknowledgeAnswers)
        if not 0 < len(request.batch_ids) <= MAX_IDS_PER_REQUEST:
            refused = invalid(f"acknowledge 1 to {MAX_IDS_PER_REQUEST} batch ids at a time", "bad_ack")
            raise self._refuse(refused, opened.header.sender, opened=opened)
        now = self.now_ms()
        done = self.store.acknowledge(opened.header.sender, list(dict.fromkeys(request.batch_ids)), now)
        return self._reply(exchange_pb2.AcknowledgeReceipt(batch_ids=done, acknowledged_at_ms=now), opened)

    def purge(self, retention_days: int) -> int:
        """Forget content and answers acknowledged more than ``retention_days`` ago."""
        now = self.now_ms()
        return self.store.purge(now - retention_days * DAY_MS, now)
