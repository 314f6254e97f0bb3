"""Refusals the connector reports to a gateway: one gRPC status each, a public message without personal data,
and a reason code for the audit table and the logs."""

from __future__ import annotations

import grpc

from common.errors import HeduiError
from keys.errors import (
    BadSignature,
    EnvelopeError,
    ExpiredEnvelope,
    KeyNotValidThen,
    NotYetValidEnvelope,
    ReplayedEnvelope,
    RevokedKey,
    UnknownKey,
    WrongRecipient,
)
from keys.trustsync import REFRESH_KEYS


class Refusal(HeduiError):
    """A request the connector will not carry out; nothing about it was stored as accepted."""

    code = "refused"

    def __init__(self, status: grpc.StatusCode, message: str, reason: str, *, public_reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        #: The reason code the caller is told, when it differs from ``reason`` (kept for the audit table and logs).
        self.public_reason = public_reason
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


class DelayRefused(HeduiError):
    """A delay notice the regulation does not allow (clause 12: at most 5 working days past the due date)."""

    code = "delay_refused"
