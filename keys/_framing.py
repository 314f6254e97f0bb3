"""Canonical protobuf framing of messages whose fields are all ``bytes``/``string`` (Envelope, InnerPayload).

These two messages carry the large parts of an envelope, so they are encoded and decoded here directly instead of
through the protobuf runtime: no intermediate copies, and the canonical form is checked by construction. Field n
is encoded as tag ``(n << 3) | 2``, a minimal varint length and the bytes; fields appear in number order; empty
fields are omitted. This is exactly what ``SerializeToString(deterministic=True)`` produces for these messages.
"""

from __future__ import annotations

_MAX_VARINT_BYTES = 5  # lengths are below 2^35; our limits are far lower


class FramingError(ValueError):
    """The bytes are not the canonical encoding of the expected fields."""


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode(*fields: bytes) -> bytes:
    """Canonical encoding of fields 1..n (empty ones omitted)."""
    parts: list[bytes] = []
    for number, value in enumerate(fields, 1):
        if value:
            parts += (bytes([number << 3 | 2]), _varint(len(value)), value)
    return b"".join(parts)


def decode(data: bytes, count: int) -> list[bytes]:
    """Like :func:`decode_views`, as bytes."""
    return [bytes(v) for v in decode_views(data, count)]


def decode_views(data: bytes | memoryview, count: int) -> list[memoryview]:
    """The ``count`` fields of a canonical encoding, as views into ``data`` (no copies; absent fields empty).

    FramingError for anything else: unknown, repeated or out-of-order fields, other wire types, non-minimal or
    overlong lengths, trailing bytes.
    """
    view = memoryview(data)
    fields = [view[0:0]] * count
    offset, last = 0, 0
    while offset < len(data):
        tag = data[offset]
        number, wire_type = tag >> 3, tag & 7
        if wire_type != 2 or not last < number <= count:
            raise FramingError("unexpected field")
        offset += 1
        length, shift, start = 0, 0, offset
        while True:
            if offset >= len(data) or offset - start >= _MAX_VARINT_BYTES:
                raise FramingError("truncated or overlong length")
            byte = data[offset]
            offset += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        if offset - start > 1 and data[offset - 1] == 0:
            raise FramingError("length is not minimally encoded")
        if length == 0 or offset + length > len(data):
            raise FramingError("empty field encoded, or field runs past the end")
        fields[number - 1] = view[offset : offset + length]
        offset += length
        last = number
    return fields
