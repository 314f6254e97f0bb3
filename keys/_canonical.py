"""Strict protobuf parsing: exactly one byte string is accepted for each message.

Protobuf parsers are lenient (unknown fields, repeated scalars, out-of-order fields, non-minimal varints all parse).
Signed bytes must not be malleable, so every signed structure is parsed and then re-encoded deterministically
without unknown fields; the input is accepted only if the two byte strings are identical.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.message import DecodeError, Message

M = TypeVar("M", bound=Message)


class NotCanonical(ValueError):
    """The bytes do not parse, or are not the canonical encoding of what they parse to."""


def parse(cls: type[M], data: bytes) -> M:
    """Parse ``data`` as ``cls`` without the canonical check (first step of open; see docs/envelope.md)."""
    msg = cls()
    try:
        msg.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise NotCanonical(f"not a valid {cls.DESCRIPTOR.name}") from exc
    return msg


def require_canonical(msg: Message, data: bytes) -> None:
    """Raise NotCanonical unless ``data`` is the canonical encoding of ``msg`` (unknown fields dropped)."""
    msg.DiscardUnknownFields()
    if encode(msg) != data:
        raise NotCanonical(f"{msg.DESCRIPTOR.name} is not canonically encoded")


def parse_canonical(cls: type[M], data: bytes) -> M:
    """Parse ``data`` as ``cls`` and require it to be canonical."""
    msg = parse(cls, data)
    require_canonical(msg, data)
    return msg


def encode(msg: Message) -> bytes:
    """The canonical (deterministic) encoding of ``msg``."""
    return msg.SerializeToString(deterministic=True)
