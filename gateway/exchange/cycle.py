"""What the parts of one unit cycle share: the cycle's report, and how a unit's reply is opened and kept.

The engine (gateway/exchange/engine.py) runs the cycle; the sender (sending.py) and the answer collector
(answers.py) fill in its report and open the unit's replies the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from google.protobuf.message import Message

from gateway.archive.messages import Envelope
from keys.envelope import Courier, Opened, message_id_of


@dataclass
class CycleReport:
    """What one unit cycle did (for logs and metrics)."""

    unit_id: str
    formed: int = 0
    sent: int = 0
    answered: int = 0
    answers_stored: int = 0
    acknowledged: int = 0
    #: A call got the unit's reply (an answer, a refusal, or a health probe's SERVING).
    reached: bool = False
    #: The cycle called the unit's health check (nothing else reached it, and it was due).
    probed: bool = False
    #: The cycle synchronised trust with the unit because their keys disagreed ("refresh keys"; once a cycle).
    refreshed: bool = False
    error: str | None = None


class AnswerMismatch(Exception):
    """A unit's answer does not belong to the batch it names (digest or subjects differ)."""


def open_reply(
    courier: Courier, reply: bytes, expect: Mapping[str, type[Message]], *, unit_id: str, request: bytes
) -> Opened:
    """Open a unit's reply to ``request``: it must come from that unit and answer that very envelope.

    TLS already ties the connection to the unit, but the envelope is what is archived and must prove it by
    itself (docs/envelope.md): the sender is the unit we called, the correlation id our request's message id.
    """
    opened = courier.open(reply, expect=expect)
    if opened.header.sender != unit_id or opened.header.correlation_id != message_id_of(request):
        raise AnswerMismatch("reply is not from the unit called, or does not answer the request sent")
    return opened


def kept(opened: Opened) -> Envelope:
    """A checked reply as the archive keeps it: the bytes as received."""
    header = opened.header
    return Envelope(header.message_id, header.sender, header.message_type, opened.raw)
