"""Reading files that come from outside the trust core (sealed files, bundles, reports, keystores, PEM files) with a
size limit that holds while reading, not only when the file was looked at.

A ``stat()`` before ``read_bytes()`` is not enough: a symlink to /dev/zero reports size 0 and then never ends, a FIFO
blocks on open until someone writes to it, and a file can grow between the two calls. So the file is opened with
O_NONBLOCK (a FIFO then opens at once instead of waiting for a writer), the *opened* descriptor is checked to be a
regular file, and at most ``limit + 1`` bytes are read.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from keys.errors import KeysError

_CHUNK = 1024 * 1024


def read_bounded(
    path: Path | str,
    limit: int,
    error_cls: type[KeysError],
    *,
    what: str = "file",
    name: str | None = None,
    check: Callable[[os.stat_result], None] | None = None,
) -> bytes:
    """The bytes of the regular file at ``path``, at most ``limit`` of them.

    Raises ``error_cls`` naming the file (``name``, default the path) and ``what`` it should be (never its content)
    when the path is not a regular file (a FIFO, a device such as /dev/zero, a folder) or holds more than ``limit``
    bytes. ``check``, if given, sees the opened file's ``fstat`` (the file actually read, not whatever the path named
    a moment earlier) and may raise. OSError from opening or reading is left to the caller, which knows what a
    missing file means to it.
    """
    name = name or str(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error_cls(f"{name} is not a regular file, so it cannot be a {what}")
        if check is not None:
            check(info)
        if info.st_size > limit:
            raise error_cls(f"{name} is too large to be a {what} (more than {limit} bytes)")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(_CHUNK, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            # The file grew after fstat (it is being written or was swapped in place).
            raise error_cls(f"{name} is too large to be a {what} (more than {limit} bytes)")
        return b"".join(chunks)
    finally:
        os.close(fd)
