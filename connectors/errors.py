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


class Refusal(HeduiError):
    """A request the connector will not carry out; nothing about it was stored as accepted.

    ``detail`` is a short printable note without personal data (a staff id) for the signed refusal; ``signed`` the
    sealed trust.proto Refusal envelope for the gateway, once the connector made it (connectors/connector.py)."""

    code = "refused"

    def __init__(self, status: grpc.StatusCode, message: str, reason: str, *, detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.signed: bytes | None = None


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
    """The opaque refusal for an envelope that failed to open; the precise reason stays in ``reason``."""
    status = _ENVELOPE_STATUS.get(type(error), grpc.StatusCode.INVALID_ARGUMENT)
    return Refusal(status, error.public_message, f"envelope_{error.code}")


class DelayRefused(HeduiError):
    """A delay notice the regulation does not allow (clause 12: at most 5 working days past the due date)."""

    code = "delay_refused"
