"""Replay caches: has this sender's message id been seen?

An envelope is only checked against the cache after its signature and time window passed, so only genuine
messages from trusted senders are remembered, and only until they expire: after that the time-window check rejects
a replay on its own. That bounds the cache by the legitimate traffic of one expiry window.

:class:`MemoryReplayCache` lives as long as its process; :class:`FileReplayCache` is a keystore owner's persistent
one (a SQLite file beside the keystore), which ``hedui-keys open`` uses so that a sealed file opens only once.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from keys.errors import ReplayStoreError


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


#: ``PRAGMA application_id`` of a replay store ("HDRP"), so that no other SQLite file is mistaken for one.
REPLAY_STORE_APPLICATION_ID = 0x48445250
#: ``PRAGMA user_version`` of the replay store layout described in docs/keys.md.
REPLAY_STORE_VERSION = 1
#: Entries are pruned this long after the time check would refuse their envelope anyway, so that a clock set back
#: by up to a day does not let a pruned envelope pass both the time check and the replay check.
PRUNE_GRACE_MS = 24 * 60 * 60 * 1000
#: How long a process waits for another one that holds the store's write lock (an ``open`` writing its file).
BUSY_TIMEOUT_S = 60.0
#: How long an existing but empty store file is given to become a store: another process that has just created it
#: lays it out within milliseconds; a file still empty after this was emptied or replaced, and is refused.
EMPTY_STORE_WAIT_S = 2.0

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS store (party_id TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS seen (sender TEXT NOT NULL, message_id BLOB NOT NULL, "
    "keep_until_ms INTEGER NOT NULL, PRIMARY KEY (sender, message_id)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS seen_keep_until ON seen (keep_until_ms)",
)


class FileReplayCache:
    """A keystore owner's persistent replay cache: one SQLite file, shared by every process on the machine.

    ``hedui-keys open`` uses it so that a sealed file (.hsf) opens once per keystore, across runs, restarts and
    concurrent processes (docs/envelope.md section 11, docs/keys.md "Replay store"). The services keep their replay
    cache in their database (common/replaystore.py); the trust core has no database layer, so this is the standard
    library's sqlite3 on a local file: the primary key (sender, message id) makes check-and-insert one atomic step,
    SQLite's file locks make it atomic across processes, and a committed row survives a crash (rollback journal,
    ``synchronous=FULL``). A lock file and a flat list would need all of that written by hand.

    The file records the party it belongs to and is refused for another one, or when group or others may read or
    write it (whoever can delete a row can replay a file). Entries are pruned once their envelope has expired for
    :data:`PRUNE_GRACE_MS`, so the file holds at most the files opened in the last 32 days.
    """

    def __init__(self, path: Path, *, party_id: str, busy_timeout_s: float = BUSY_TIMEOUT_S) -> None:
        self.path = Path(path)
        self._depth = 0
        self._db = self._connect(busy_timeout_s)
        try:
            self._prepare(party_id)
        except BaseException:
            self._db.close()
            raise

    def _connect(self, busy_timeout_s: float) -> sqlite3.Connection:
        created = False
        try:
            # Created 0600 before SQLite opens it: sqlite3 would create it with the umask's mode.
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            created = True
        except FileExistsError:
            pass
        except OSError as exc:
            raise ReplayStoreError(f"cannot create the replay store {self.path}: {exc.strerror}") from exc
        info = self._stat()
        if not created:
            # An empty file that we did not create is either a store another process created a moment ago and is
            # laying out (it commits within milliseconds) or a store that was emptied (`: > x.replay`) or replaced:
            # taken as a new store, it would let every sealed file it remembered open again.
            deadline = time.monotonic() + EMPTY_STORE_WAIT_S
            while info.st_size == 0 and stat.S_ISREG(info.st_mode) and time.monotonic() < deadline:
                time.sleep(0.02)
                info = self._stat()
            if info.st_size == 0 and stat.S_ISREG(info.st_mode):
                raise ReplayStoreError(
                    f"the replay store {self.path} is empty: it was truncated or replaced; restore it from the "
                    "backup or, if this keystore never opened a file, delete it"
                )
        if not stat.S_ISREG(info.st_mode):
            raise ReplayStoreError(f"the replay store {self.path} is not a regular file")
        if stat.S_IMODE(info.st_mode) & 0o077:
            raise ReplayStoreError(
                f"the replay store {self.path} is readable or writable by other users (mode "
                f"{stat.S_IMODE(info.st_mode):o}); whoever can change it can make a sealed file open twice. Run "
                f"chmod 600 {self.path} after checking who could have changed it"
            )
        try:
            db = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as exc:
            raise ReplayStoreError(f"cannot open the replay store {self.path}: {exc}") from exc
        return db

    def _stat(self) -> os.stat_result:
        try:
            return self.path.stat()
        except OSError as exc:
            raise ReplayStoreError(f"cannot read the replay store {self.path}: {exc.strerror}") from exc

    def _prepare(self, party_id: str) -> None:
        """Create the layout in a new (empty) file, or check that an existing file is this party's store."""
        with self.transaction():
            application_id = self._db.execute("PRAGMA application_id").fetchone()[0]
            if application_id == 0 and self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                for statement in _SCHEMA:
                    self._db.execute(statement)
                self._db.execute("INSERT INTO store (party_id) VALUES (?)", (party_id,))
                self._db.execute(f"PRAGMA application_id = {REPLAY_STORE_APPLICATION_ID}")
                self._db.execute(f"PRAGMA user_version = {REPLAY_STORE_VERSION}")
                return
            if application_id != REPLAY_STORE_APPLICATION_ID:
                raise ReplayStoreError(f"{self.path} is not a Hedui replay store")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version != REPLAY_STORE_VERSION:
                raise ReplayStoreError(
                    f"the replay store {self.path} has layout version {version}; this release reads version "
                    f"{REPLAY_STORE_VERSION} only"
                )
            owners = [row[0] for row in self._db.execute("SELECT party_id FROM store")]
            if owners != [party_id]:
                raise ReplayStoreError(
                    f"the replay store {self.path} belongs to another keystore (party {owners[0] if owners else '-'}),"
                    f" not to {party_id}: give each keystore its own replay store"
                )

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Hold the store's write lock: every :meth:`remember` inside becomes permanent together, when the block
        ends normally, and is undone if it raises. Other processes wait (up to the busy timeout) meanwhile.

        ``hedui-keys open`` writes the opened file inside one, so that a sealed file whose content could not be
        written (the output exists, a full disk) is not counted as opened, and two racing opens cannot both win.
        """
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise ReplayStoreError(f"cannot lock the replay store {self.path}: {exc}") from exc
        self._depth = 1
        try:
            yield
        except BaseException:
            self._depth = 0
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise
        self._depth = 0
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise ReplayStoreError(f"cannot write the replay store {self.path}: {exc}") from exc

    def remember(self, sender: str, message_id: bytes, *, keep_until_ms: int, now_ms: int) -> bool:
        """Record the pair (pruning what has long expired); True if it was new, False if it had been seen."""
        with self.transaction():
            try:
                self._db.execute("DELETE FROM seen WHERE keep_until_ms < ?", (now_ms - PRUNE_GRACE_MS,))
                inserted = self._db.execute(
                    "INSERT OR IGNORE INTO seen (sender, message_id, keep_until_ms) VALUES (?, ?, ?)",
                    (sender, bytes(message_id), keep_until_ms),
                ).rowcount
            except sqlite3.Error as exc:
                raise ReplayStoreError(f"cannot write the replay store {self.path}: {exc}") from exc
        return inserted == 1

    def __len__(self) -> int:
        try:
            return int(self._db.execute("SELECT count(*) FROM seen").fetchone()[0])
        except sqlite3.Error as exc:
            raise ReplayStoreError(f"cannot read the replay store {self.path}: {exc}") from exc

    def close(self) -> None:
        """Close the file (an open transaction is rolled back)."""
        self._db.close()

    def __enter__(self) -> FileReplayCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_replay_store_path(keystore_path: Path) -> Path:
    """Where a keystore's replay store lives unless configured: beside it, named ``<keystore file>.replay``.

    The keystore path is resolved first (symlinks, ``..``): a symlink to the keystore under another name must find
    the same store, not a fresh one in which every sealed file opens again.
    """
    keystore_path = Path(os.path.realpath(keystore_path))
    return keystore_path.with_name(keystore_path.name + ".replay")
