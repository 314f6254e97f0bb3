"""The connector's side of a trust synchronisation: the handler of ExchangeService.SyncTrust (docs/exchange.md,
"Trust synchronisation").

A gateway calls with a sealed TrustSync: its items, its verdicts on the items this connector sent in its previous
reply, and the version of this unit's roster it holds; beside the envelope, the gateway's own key announcements. The
connector applies those announcements first (so an envelope signed with a key just rotated opens), opens the
envelope as every call (the TLS identity must be its sender; a key it does not hold as usable is refused with
``refresh_keys``), records the gateway's verdicts, hands each item to the handler of its kind, and answers with its
verdicts on them and with its own items the gateway has not acknowledged, sealed for the gateway, with its own
announcements beside. Both envelopes are kept in the store's archive, and each verdict is an audit entry (codes and
digests only).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import grpc
from hedui.v1 import exchange_pb2, trust_pb2

from common.trustitems import Ack
from connectors.errors import Refusal
from connectors.trust.items import TrustItems
from keys.envelope import message_id_of
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
    from connectors.connector import Connector

log = logging.getLogger("hedui.connector.trust")

_TRUST_SYNC = {trust_pb2.TrustSync.DESCRIPTOR.full_name: trust_pb2.TrustSync}


def default_handlers(keys: LiveKeystore) -> dict[int, Handler]:
    """The handlers the connector registers itself: key announcements (rosters and revocation lists are added by
    their owners, connectors/server.py)."""
    return {trust_pb2.TRUST_ITEM_KIND_KEY_ANNOUNCEMENT: key_announcement_handler(keys)}


class TrustDesk:
    """Answers SyncTrust for one connector; see the module docstring."""

    def __init__(
        self,
        connector: Connector,
        keys: LiveKeystore,
        *,
        handlers: Mapping[int, Handler] | None = None,
        held_roster_version: Callable[[str], int] = lambda peer: 0,
        peer_roster_version: Callable[[str, int], None] | None = None,
    ) -> None:
        self.connector = connector
        self.keys = keys
        self.handlers: dict[int, Handler] = dict(handlers) if handlers is not None else default_handlers(keys)
        self.held_roster_version = held_roster_version
        #: Told (gateway, version) of each TrustSync received: the highest version of our roster the gateway holds.
        self.peer_roster_version = peer_roster_version
        self.items = TrustItems(connector.store.engine)

    def _now(self) -> int:
        return self.connector.courier.clock.now_ms()

    def sync(self, request: exchange_pb2.SealedMessage, tls_party: str | None) -> exchange_pb2.SealedMessage:
        """One SyncTrust call; raises Refusal (audited by the connector) for a request it will not take."""
        store, metrics = self.connector.store, self.connector.metrics
        applied = apply_attachments(self.keys, tls_party, list(request.key_announcements), self._now())
        for result in applied:
            if result.changed:
                code = f"attachment:{result.sha256.hex()[:32]}"
                store.record(self._now(), "trust_applied", gateway=tls_party, reason=code)
        opened = self.connector.open_request(request.envelope, _TRUST_SYNC, tls_party)
        gateway, message = opened.header.sender, opened.message
        assert isinstance(message, trust_pb2.TrustSync)
        try:
            check_sync(message)
        except TrustSyncError as exc:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(exc), "bad_trust_sync") from exc
        now = self._now()
        if self.peer_roster_version is not None:
            self.peer_roster_version(gateway, message.peer_roster_version)
        acks = [Ack(a.kind, bytes(a.item_sha256), a.applied, a.reason) for a in message.acks]
        acknowledged = self.items.acked(gateway, acks, now)
        for ack in acks:
            said = "applied" if ack.applied else ack.reason
            store.record(now, "trust_acknowledged", gateway=gateway, reason=f"{said}:{ack.sha256.hex()[:16]}")
        verdicts = apply_items(message.items, self.handlers, gateway, now)
        owed = []
        for verdict in verdicts:
            if verdict.ack is None:
                continue
            owed.append(verdict.ack)
            if verdict.reason is None:
                code = f"{kind_name(verdict.kind)}:{verdict.sha256.hex()[:32]}"
                store.record(now, "trust_applied", gateway=gateway, reason=code)
            else:
                code = f"{verdict.reason}:{verdict.sha256.hex()[:16]}"
                store.record(now, "trust_refused", gateway=gateway, reason=code)
            if metrics is not None:
                metrics.trust.item_received(gateway, kind_name(verdict.kind), verdict.reason)
        pending = self.items.pending(gateway)
        reply = trust_pb2.TrustSync(
            items=[trust_pb2.TrustItem(kind=p.kind, payload=p.payload) for p in pending],  # type: ignore[arg-type]
            acks=owed,
            peer_roster_version=max(0, self.held_roster_version(gateway)),
        )
        sealed = self.connector.reply_to(reply, opened)
        if message.items or message.acks or reply.items or reply.acks:
            # Both envelopes, the signed receipts of what was delivered; a round with nothing either way is not kept.
            header = opened.header
            store.keep(
                message_id=header.message_id, peer=gateway, direction="in", message_type=header.message_type,
                envelope=opened.raw, at_ms=now,
            )  # fmt: skip
            store.keep(
                message_id=message_id_of(sealed), peer=gateway, direction="out",
                message_type=reply.DESCRIPTOR.full_name, envelope=sealed, at_ms=now,
            )  # fmt: skip
        if metrics is not None:
            metrics.trust.synced(gateway, "peer", "ok")
        if acknowledged or owed:
            log.info(
                "trust synchronised",
                extra={
                    "gateway": gateway,
                    "acknowledged": acknowledged,
                    "received": len(owed),
                    "offered": len(pending),
                },
            )
        return exchange_pb2.SealedMessage(envelope=sealed, key_announcements=self.keys.attachments())
