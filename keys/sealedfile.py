"""Sealed files (.hsf): one file sealed for one party, for media exchange on disc or USB stick.

An .hsf file is exactly one sealed envelope v1 (docs/envelope.md) whose inner message is a ``hedui.v1.SealedFile``
(file name, content, media type). It is opened like any envelope, with the recipient's persistent replay store
(keys/replay.py, :class:`~keys.replay.FileReplayCache`), so that a file opens once; then the file name it carries
must be a plain name that can be written into a folder as it is. The byte layout and the checks are in
docs/envelope.md, section "Sealed files".
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from hedui.v1 import media_pb2

from keys.envelope import Courier, Header
from keys.errors import SealedFileError

#: Largest file content ``hedui-keys seal`` takes (the envelope allows 32 MiB of payload; this leaves room).
MAX_CONTENT_BYTES = 30 * 1024 * 1024
#: Largest .hsf file ``hedui-keys open`` reads: the content, its name and media type, and the envelope around them.
MAX_SEALED_FILE_BYTES = MAX_CONTENT_BYTES + 8192
#: Longest file name, in bytes of UTF-8 (what Linux file systems allow for one name).
MAX_FILE_NAME_BYTES = 255
#: Longest media type (RFC 6838 allows 127 + 1 + 127 characters).
MAX_MEDIA_TYPE_LENGTH = 255

SEALED_FILE_TYPE = media_pb2.SealedFile.DESCRIPTOR.full_name
_EXPECT = {SEALED_FILE_TYPE: media_pb2.SealedFile}


@dataclass(frozen=True)
class OpenedFile:
    """A sealed file that passed every check: the checked envelope header and what the file carried."""

    header: Header
    file_name: str
    content: bytes
    media_type: str


def check_file_name(name: str) -> str:
    """``name`` if it is a plain file name that writes into a folder as it is; SealedFileError otherwise.

    A plain name is 1 to 255 bytes of UTF-8, does not start with ``.`` (so neither ``.``, ``..`` nor a hidden file
    such as ``.bash_login`` or ``.ssh``), and has no ``/`` or ``\\`` (a path on some system), no control character
    (general category Cc: U+0000..U+001F, U+007F..U+009F) and no format character (category Cf, e.g. U+202E
    RIGHT-TO-LEFT OVERRIDE, which makes ``invoice<U+202E>fdp.exe`` show as "invoiceexe.pdf", or U+200B).
    """
    if not name or len(name.encode("utf-8", "surrogatepass")) > MAX_FILE_NAME_BYTES:
        raise SealedFileError("the sealed file carries an empty or overlong file name; refusing to write it")
    if any(ch in "/\\" or unicodedata.category(ch) in {"Cc", "Cf"} for ch in name):
        raise SealedFileError(
            "the sealed file carries an unsafe file name (a path, a control or an invisible format character); refusing"
        )
    if name.startswith("."):
        raise SealedFileError("the sealed file carries a file name starting with '.' (hidden, '.' or '..'); refusing")
    return name


def seal_file(
    courier: Courier, file_name: str, content: bytes, recipient: str, *, ttl_ms: int, media_type: str = ""
) -> bytes:
    """The .hsf bytes of ``content`` named ``file_name``, sealed by ``courier``'s party for ``recipient``."""
    check_file_name(file_name)
    if len(content) > MAX_CONTENT_BYTES:
        raise SealedFileError(f"a sealed file holds at most {MAX_CONTENT_BYTES} bytes")
    if len(media_type) > MAX_MEDIA_TYPE_LENGTH:
        raise SealedFileError(f"a media type is at most {MAX_MEDIA_TYPE_LENGTH} characters")
    message = media_pb2.SealedFile(file_name=file_name, content=content, media_type=media_type)
    return courier.seal(message, recipient, ttl_ms=ttl_ms)


def open_sealed_file(courier: Courier, data: bytes) -> OpenedFile:
    """Open .hsf bytes sent to ``courier``'s party now; raises an EnvelopeError subclass (as for any envelope,
    ``ReplayedEnvelope`` when the courier's replay cache has seen it) or SealedFileError, and nothing else."""
    opened = courier.open(data, expect=_EXPECT)
    message = opened.message
    assert isinstance(message, media_pb2.SealedFile)  # expect= names only this type
    return OpenedFile(
        header=opened.header,
        file_name=check_file_name(message.file_name),
        content=message.content,
        media_type=message.media_type,
    )
