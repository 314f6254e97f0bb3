"""What both ends of a trust synchronisation (ExchangeService.SyncTrust, trust.proto) do the same way.

A TrustSync message carries trust items (rosters, key announcements, revocation lists) and the sender's verdicts on
the items it received before (acknowledgements). Each receiver checks the message once against the limits here,
hands each item to the handler registered for its kind, and answers each with a TrustItemAck: applied (or held
already), or refused with a reason code. Beside the envelope (SealedMessage.key_announcements) travel the sender's
own key announcements, which the receiver applies before it opens the envelope. The normative description is
docs/exchange.md, "Trust synchronisation".

No network and no database here: the gateway (gateway/trust/) and the connector (connectors/trust/) add the call,
the item tables and the archive.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from hedui.v1 import trust_pb2

from keys.announcements import read_announcement
from keys.errors import KeysError, TrustError
from keys.live import MAX_ATTACHMENTS, LiveKeystore

log = logging.getLogger("hedui.keys.trustsync")

#: A kind's handler: (sender party id, item payload, now in ms) -> None when applied (or held already), else a
#: reason code (``a-z 0-9 _``, at most 40). A handler that refuses changes nothing.
Handler = Callable[[str, bytes, int], str | None]

#: Most items in one TrustSync, most bytes of one item's payload, most bytes of all items' payloads, most acks.
MAX_ITEMS = 64
MAX_ITEM_BYTES = 1024 * 1024
MAX_ITEMS_BYTES = 8 * 1024 * 1024
MAX_ACKS = 256
#: gRPC trailing metadata of a ``refresh_keys`` refusal: the refusing party's own announcements (one per value),
#: which the caller applies before it synchronises (the refusal may be the only way they can reach it).
ANNOUNCEMENTS_METADATA_KEY = "hedui-key-announcements-bin"
#: The refusal reason code that asks the caller to synchronise trust and send again (docs/exchange.md).
REFRESH_KEYS = "refresh_keys"
#: At most this many announcements go into a refusal's trailing metadata (gRPC's default limit is 8 KiB).
MAX_METADATA_ANNOUNCEMENTS = 8

_REASON_RE = re.compile(r"[a-z0-9_]{1,40}")
#: Every kind trust.proto defines, by number: ``key_announcement`` for TRUST_ITEM_KIND_KEY_ANNOUNCEMENT (kinds added to
#: the enum later are known here as soon as the generated code has them; their handlers come with them).
KIND_NAMES: dict[int, str] = {
    number: name.removeprefix("TRUST_ITEM_KIND_").lower()
    for name, number in trust_pb2.TrustItemKind.items()
    if number != trust_pb2.TRUST_ITEM_KIND_UNSPECIFIED
}


def kind_name(kind: int) -> str:
    """``key_announcement`` for TRUST_ITEM_KIND_KEY_ANNOUNCEMENT; ``unknown`` for any other number."""
    return KIND_NAMES.get(kind, "unknown")


def is_reason(value: str) -> bool:
    """Whether ``value`` is a well-formed reason code."""
    return _REASON_RE.fullmatch(value) is not None


class TrustSyncError(KeysError):
    """A TrustSync message breaks the limits or rules of docs/exchange.md (refused whole; nothing applied)."""

    code = "trust_sync"


def check_sync(message: trust_pb2.TrustSync) -> None:
    """Raise TrustSyncError unless ``message`` keeps the limits: at most MAX_ITEMS items of at most MAX_ITEM_BYTES
    (MAX_ITEMS_BYTES together), at most MAX_ACKS acks, each with a 32-byte SHA-256, a known kind and, when it refuses,
    a reason code."""
    if len(message.items) > MAX_ITEMS:
        raise TrustSyncError(f"a trust sync carries at most {MAX_ITEMS} items")
    sizes = [len(item.payload) for item in message.items]
    if any(size > MAX_ITEM_BYTES for size in sizes) or sum(sizes) > MAX_ITEMS_BYTES:
        raise TrustSyncError("a trust item is over the size limit")
    if len(message.acks) > MAX_ACKS:
        raise TrustSyncError(f"a trust sync carries at most {MAX_ACKS} acknowledgements")
    for ack in message.acks:
        if len(ack.item_sha256) != 32 or ack.kind not in KIND_NAMES:
            raise TrustSyncError("an acknowledgement names no item (SHA-256 of 32 bytes and a known kind)")
        if not ack.applied and not is_reason(ack.reason):
            raise TrustSyncError("a refusing acknowledgement needs a reason code (a-z 0-9 _, at most 40)")


@dataclass(frozen=True)
class Verdict:
    """What the receiver made of one item (and the ack it owes for it, None while no handler takes its kind)."""

    kind: int
    sha256: bytes
    ack: trust_pb2.TrustItemAck | None

    @property
    def reason(self) -> str | None:
        return None if self.ack is None or self.ack.applied else self.ack.reason


def apply_items(
    items: Sequence[trust_pb2.TrustItem], handlers: Mapping[int, Handler], sender: str, now_ms: int
) -> list[Verdict]:
    """Hand each item to its kind's handler, in order; the verdicts, each with the ack to send.

    An item of a kind the protocol does not know is refused (``unknown_kind``). An item of a known kind without a
    handler here (a release that does not take it yet), or whose handler failed unexpectedly, gets no ack: the peer
    keeps it pending and offers it again later.
    """
    verdicts = []
    for item in items:
        sha = hashlib.sha256(item.payload).digest()
        reason: str | None
        handler = handlers.get(item.kind)
        if item.kind not in KIND_NAMES:
            reason = "unknown_kind"
        elif handler is None:
            verdicts.append(Verdict(item.kind, sha, None))
            continue
        else:
            try:
                reason = handler(sender, bytes(item.payload), now_ms)
            except Exception as exc:  # a handler's bug: no verdict, the item comes again
                log.error(
                    "trust item handler failed",
                    extra={"peer": sender, "kind": kind_name(item.kind), "error": type(exc).__name__},
                    exc_info=exc,
                )
                verdicts.append(Verdict(item.kind, sha, None))
                continue
            if reason is not None and not is_reason(reason):
                reason = "refused"
        ack = trust_pb2.TrustItemAck(
            kind=item.kind,
            item_sha256=sha,
            applied=reason is None,
            reason=reason or "",
            at_ms=now_ms,
        )
        verdicts.append(Verdict(item.kind, sha, ack))
    return verdicts


def key_announcement_handler(keys: LiveKeystore) -> Handler:
    """The KEY_ANNOUNCEMENT handler: the announcement must be the sender's own, and is applied to the trust store
    (and the keystore saved) by the rules of keys/truststore.py; its TrustError reason is the refusal's code."""

    def handle(sender: str, payload: bytes, now_ms: int) -> str | None:
        try:
            announcement = read_announcement(payload)
            if announcement.message.party_id != sender:
                return "not_own_announcement"
            keys.apply_announcement(payload, now_ms=now_ms)
        except TrustError as refused:
            return refused.reason
        return None

    return handle


@dataclass(frozen=True)
class AttachmentResult:
    """One announcement found beside an envelope: its SHA-256, whether it changed our trust store, and the reason
    code when it was refused."""

    sha256: bytes
    changed: bool
    reason: str | None


def apply_attachments(
    keys: LiveKeystore, sender: str | None, announcements: Sequence[bytes], now_ms: int
) -> list[AttachmentResult]:
    """Apply the announcements a peer sent beside its envelope, in order, before the envelope is opened; only the
    first MAX_ATTACHMENTS are looked at, and only the sender's own (``sender`` None: the sender is not known before
    the envelope is opened, a connector without TLS; each announcement then speaks for the party it names). Each
    verifies on its own against the trust store, so an attachment from anyone can change nothing the party itself
    did not sign; one that does not apply is left (a reason code in the result), the others still apply."""
    results = []
    handle = key_announcement_handler(keys)
    for data in announcements[:MAX_ATTACHMENTS]:
        sha = hashlib.sha256(data).digest()
        try:
            party = sender or read_announcement(bytes(data)).message.party_id
        except TrustError as refused:
            results.append(AttachmentResult(sha, False, refused.reason))
            continue
        before = keys.trust.keyring(party)
        try:
            reason = handle(party, bytes(data), now_ms)
        except KeysError as exc:  # the keystore could not be saved: the announcement comes again
            log.warning("announcement not applied", extra={"peer": party, "error": type(exc).__name__})
            reason = "not_saved"
        results.append(AttachmentResult(sha, keys.trust.keyring(party) is not before, reason))
    return results


def items_within_budget(payloads: Sequence[tuple[int, bytes]]) -> int:
    """How many of ``payloads`` (kind, payload), taken in order, fit into one TrustSync."""
    total = 0
    for count, (_, payload) in enumerate(payloads[:MAX_ITEMS]):
        total += len(payload)
        if total > MAX_ITEMS_BYTES:
            return count
    return min(len(payloads), MAX_ITEMS)
