"""Replay caches: has this sender's message id been seen?

An envelope is only checked against the cache after its signature and time window passed, so only genuine
messages from trusted senders are remembered, and only until they expire: after that the time-window check rejects
a replay on its own. That bounds the cache by the legitimate traffic of one expiry window.
"""

from __future__ import annotations

import heapq
import threading
from typing import Protocol


class ReplayCache(Protocol):
    """Remembers (sender, message id) pairs until they can no longer pass the time-window check."""

    def remember(self, sender: str, message_id: bytes, *, keep_until_ms: int, now_ms: int) -> bool:
        """Record the pair; True if it was new, False if it had been seen (a replay). Must be atomic."""
        ...


class MemoryReplayCache:
    """In-process replay cache; a database-backed one replaces it where several processes share traffic."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, bytes], int] = {}
        self._expiry: list[tuple[int, str, bytes]] = []
        self._lock = threading.Lock()

    def remember(self, sender: str, message_id: bytes, *, keep_until_ms: int, now_ms: int) -> bool:
        with self._lock:
            self._prune(now_ms)
            key = (sender, message_id)
            if key in self._seen:
                return False
            self._seen[key] = keep_until_ms
            heapq.heappush(self._expiry, (keep_until_ms, sender, message_id))
            return True

    def _prune(self, now_ms: int) -> None:
        while self._expiry and self._expiry[0][0] < now_ms:
            _, sender, message_id = heapq.heappop(self._expiry)
            self._seen.pop((sender, message_id), None)

    def __len__(self) -> int:
        return len(self._seen)
