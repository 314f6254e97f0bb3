"""Refusals the connector reports to a gateway: one gRPC status each, a public message without personal data,
and a reason code for the audit table and the logs."""

from __future__ import annotations

import logging
import re

import grpc
from hedui.v1 import trust_pb2

from common.errors import HeduiError
from keys.envelope import Courier, Opened
from keys.errors import (
    BadSignature,
    EnvelopeError,
    ExpiredEnvelope,
    KeyNotValidThen,
    KeysError,
    NotYetValidEnvelope,
    ReplayedEnvelope,
    RevokedKey,
    UnknownKey,
    WrongRecipient,
)
from keys.trustsync import REFRESH_KEYS


class Refusal(HeduiError):
    """A request the connector will not carry out; nothing about it was stored as accepted.

    ``detail`` is a short printable note without personal data (a staff id) for the signed refusal; ``signed`` the
    sealed trust.proto Refusal envelope for the gateway, once the connector made it (connectors/connector.py)."""

    code = "refused"

    def __init__(
        self,
        status: grpc.StatusCode,
        message: str,
        reason: str,
        *,
        detail: str = "",
        public_reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        #: A staff id or the like (never personal data) that the signed refusal names.
        self.detail = detail
        #: The reason code the caller is told, when it differs from ``reason`` (kept for the audit table and logs).
        self.public_reason = public_reason
        #: The sealed, signed Refusal sent beside the status (docs/exchange.md, "Signed refusals").
        self.signed: bytes | None = None
        #: Our own key announcements, sent beside a ``refresh_keys`` refusal (docs/exchange.md, "Refresh keys").
        self.announcements: tuple[bytes, ...] = ()


_ENVELOPE_STATUS: dict[type[EnvelopeError], grpc.StatusCode] = {
    UnknownKey: grpc.StatusCode.UNAUTHENTICATED,
    RevokedKey: grpc.StatusCode.UNAUTHENTICATED,
    KeyNotValidThen: grpc.StatusCode.UNAUTHENTICATED,
    BadSignature: grpc.StatusCode.UNAUTHENTICATED,
    WrongRecipient: grpc.StatusCode.UNAUTHENTICATED,
    ExpiredEnvelope: grpc.StatusCode.FAILED_PRECONDITION,
    NotYetValidEnvelope: grpc.StatusCode.FAILED_PRECONDITION,
    ReplayedEnvelope: grpc.StatusCode.ALREADY_EXISTS,
}


def envelope_refusal(error: EnvelopeError) -> Refusal:
    """The opaque refusal for an envelope that failed to open; the precise reason stays in ``reason``. The caller is
    told ``invalid_envelope``, or ``refresh_keys`` (UNAUTHENTICATED) when the envelope names a signing or recipient
    key this unit does not hold as usable: unknown, retired or revoked (keys/errors.py ``refresh_keys``)."""
    if error.refresh_keys:
        return Refusal(
            grpc.StatusCode.UNAUTHENTICATED, error.public_message, f"envelope_{error.code}", public_reason=REFRESH_KEYS
        )
    status = _ENVELOPE_STATUS.get(type(error), grpc.StatusCode.INVALID_ARGUMENT)
    return Refusal(status, error.public_message, f"envelope_{error.code}", public_reason="invalid_envelope")


log = logging.getLogger("hedui.connector")

#: A signed refusal's detail: printable ASCII, at most 64 characters (a staff id; never personal data).
_DETAIL_RE = re.compile(r"[ -~]{0,64}")


def sign_refusal(
    courier: Courier, refusal: Refusal, opened: Opened, *, batch_id: str, batch_digest: bytes, now_ms: int, ttl_ms: int
) -> bytes | None:
    """The refusal of the request ``opened`` as a trust.proto Refusal, signed by us and sealed for its sender, its
    correlation id the request's message id (docs/exchange.md, "Signed refusals"); None if it cannot be made (the
    refusal stands without it)."""
    message = trust_pb2.Refusal(
        request_message_id=opened.header.message_id,
        request_type=opened.header.message_type,
        batch_id=batch_id,
        batch_digest=batch_digest,
        reason=refusal.reason,
        detail=refusal.detail if _DETAIL_RE.fullmatch(refusal.detail) else "",
        refused_at_ms=now_ms,
    )
    try:
        return courier.seal(message, opened.header.sender, ttl_ms=ttl_ms, correlation_id=opened.header.message_id)
    except KeysError as exc:  # never let the receipt of a refusal stand in the way of the refusal itself
        log.warning("signed refusal not made", extra={"reason": refusal.reason, "error": exc.code})
        return None


class DelayRefused(HeduiError):
    """A delay notice the regulation does not allow (clause 12: at most 5 working days past the due date)."""

    code = "delay_refused"
