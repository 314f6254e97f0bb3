"""Allocator settings for the long-running services.

Envelopes of several MiB are allocated and freed for every batch. With glibc's defaults each such buffer is an
mmap that is unmapped on free, so the next batch page-faults the same memory back in (about a thousand faults per
MiB). Raising the mmap and trim thresholds keeps that memory in the heap for reuse. It changes no result, only
speed; peak memory stays bounded by the largest envelope in flight. Other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("hedui.memory")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 64 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024


def tune_allocator() -> bool:
    """Apply the thresholds when running on glibc; returns whether they were applied."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    log.debug("allocator thresholds %s", "applied" if applied else "not applied")
    return applied
