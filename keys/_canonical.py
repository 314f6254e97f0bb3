"""Strict protobuf parsing: exactly one byte string is accepted for each message.

Protobuf parsers are lenient (unknown fields, repeated scalars, out-of-order fields, non-minimal varints all parse).
Signed bytes must not be malleable, so every signed structure is parsed and then re-encoded deterministically
without unknown fields; the input is accepted only if the two byte strings are identical.

Before the protobuf runtime sees the bytes, :func:`parse` walks the top-level fields and refuses two things it would
quietly accept: a known field with another wire type than its declared one (protobuf keeps it as an unknown field
and leaves the real field at its default, so a version written as bytes would read as version 0) and groups (wire
types 3 and 4, which proto3 has no use for). Unknown fields of an ordinary wire type and repeated fields pass this
step (the last value of a repeated scalar wins, as in protobuf) and are refused by :func:`require_canonical`: a
receiver can read the version of a later format before deciding that it cannot read the rest
(docs/envelope.md section 4.1).
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

M = TypeVar("M", bound=Message)


class NotCanonical(ValueError):
    """The bytes do not parse, or are not the canonical encoding of what they parse to."""


_FIXED64 = frozenset({FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64, FieldDescriptor.TYPE_DOUBLE})
_FIXED32 = frozenset({FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_SFIXED32, FieldDescriptor.TYPE_FLOAT})
_LENGTH_DELIMITED = frozenset({FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_MESSAGE})
_MAX_VARINT_BYTES = 10


def _wire_type(field: FieldDescriptor) -> int:
    if field.type in _LENGTH_DELIMITED:
        return 2
    if field.type in _FIXED64:
        return 1
    if field.type in _FIXED32:
        return 5
    return 0  # integers, booleans and enums


def _varint(data: bytes, offset: int) -> tuple[int, int]:
    """The varint at ``offset`` and the offset after it; NotCanonical if it is truncated or over 10 bytes."""
    value, shift = 0, 0
    for index in range(offset, min(len(data), offset + _MAX_VARINT_BYTES)):
        value |= (data[index] & 0x7F) << shift
        shift += 7
        if not data[index] & 0x80:
            return value, index + 1
    raise NotCanonical("truncated or overlong varint")


def check_wire_shape(descriptor: Descriptor, data: bytes) -> None:
    """NotCanonical if a top-level field of ``data`` is a group, has an undefined wire type, runs past the end, or
    is a field of ``descriptor`` written with another wire type than its declared one."""
    offset = 0
    while offset < len(data):
        key, offset = _varint(data, offset)
        number, wire_type = key >> 3, key & 7
        if number == 0 or wire_type in (3, 4, 6, 7):
            raise NotCanonical(f"{descriptor.name} has a group or an invalid field key")
        field = descriptor.fields_by_number.get(number)
        packed = field is not None and field.is_repeated and wire_type == 2
        if field is not None and wire_type != _wire_type(field) and not packed:
            raise NotCanonical(f"{descriptor.name} field {number} has the wrong wire type")
        if wire_type == 0:
            _, offset = _varint(data, offset)
        elif wire_type == 2:
            length, offset = _varint(data, offset)
            offset += length
        else:
            offset += 8 if wire_type == 1 else 4
        if offset > len(data):
            raise NotCanonical(f"{descriptor.name} field {number} runs past the end")


def parse(cls: type[M], data: bytes) -> M:
    """Parse ``data`` as ``cls`` without the canonical check (first step of open; see docs/envelope.md), after
    :func:`check_wire_shape`: wrong wire types and groups are refused here, unknown and repeated fields later."""
    check_wire_shape(cls.DESCRIPTOR, bytes(data))  # type: ignore[arg-type]  # upb descriptors are the same API
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
