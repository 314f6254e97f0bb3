"""One live process per replica id.

Several gateways may share one database, each under its own ``exchange.replica_id``; the id is whose batch claims and
job leases are whose. A second gateway started with an id a live one holds would take that one's work for its own
(and, at start, release its claims). Two guards stop it before it changes anything:

- :class:`ReplicaLock`, an exclusive ``flock`` on ``gateway-replica-<id>.lock`` in the keystore's folder (the state
  directory): a second process with the same id and the same files on this host stops before it opens the
  database. The kernel drops the lock when its holder dies, however it dies.
- :class:`ReplicaLease`, a row per id in the ``replicas`` table: who holds the id (host, boot id, pid and the
  process's start time), renewed by the holder every quarter of ``exchange.lease_seconds``. A new process reads it
  first (a read only), and claims it with one compare-and-set ``UPDATE`` (or ``INSERT``), the first write of its
  start, only if the lease has run out or its holder is provably gone: a process on this host and this boot whose
  pid no longer runs with that start time (a gateway killed and restarted by systemd takes its id back at once). A
  holder on another host is taken to be alive until its lease runs out.

A holder that cannot renew (the database is down) keeps the id while the row still names it; if another process
claimed the id meanwhile, the holder's next renewal finds that out and it stops (``on_lost``).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, inspect, select, update
from sqlalchemy.exc import SQLAlchemyError

from common.config import ConfigError
from common.db import reading
from common.errors import HeduiError
from gateway.db import schema
from gateway.db.statements import insert_ignore

log = logging.getLogger("hedui.gateway")

_REPLICA_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


class ReplicaInUse(HeduiError):
    """Another live process holds this replica id: this one did not start, and changed nothing."""

    code = "replica_in_use"


class ReplicaLeaseLost(HeduiError):
    """While this gateway ran, another process claimed its replica id (this one could not renew its lease in time)."""

    code = "replica_lease_lost"


def check_replica_id(replica: str) -> str:
    """Return ``replica`` if it can name a replica (letters, digits, ``.``, ``_``, ``-``; at most 64, as a host
    name), else raise ConfigError."""
    if not _REPLICA_ID.fullmatch(replica):
        raise ConfigError(
            "exchange.replica_id must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit "
            "(the host name is a good one)"
        )
    return replica


def _process_start(pid: int) -> str:
    """The start time of process ``pid`` in clock ticks since boot (``/proc/PID/stat`` field 22), or "" when it does
    not run or cannot be seen. With the pid it names one process of one boot: a reused pid has another."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return ""
    fields = stat.rpartition(")")[2].split()  # the command name before ")" may hold spaces
    return fields[19] if len(fields) > 19 else ""


def _boot_id() -> str:
    try:
        return _BOOT_ID.read_text(encoding="ascii").strip()[:64]
    except OSError:
        return ""


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a replica id, as its row says."""

    instance: str
    host: str
    boot_id: str
    pid: int
    process_start: str
    started_ms: int
    heartbeat_ms: int
    lease_until_ms: int

    @classmethod
    def this_process(cls, now_ms: int, lease_ms: int) -> Holder:
        pid = os.getpid()
        return cls(
            instance=secrets.token_hex(16),
            host=socket.gethostname()[:255],
            boot_id=_boot_id(),
            pid=pid,
            process_start=_process_start(pid),
            started_ms=now_ms,
            heartbeat_ms=now_ms,
            lease_until_ms=now_ms + lease_ms,
        )

    def gone(self, me: Holder) -> bool:
        """True when this holder provably no longer runs: it ran on this host, and either the host has rebooted
        since or its pid now runs another process (or none). A holder elsewhere cannot be checked from here."""
        if self.host != me.host or not self.boot_id or not me.boot_id:
            return False
        if self.boot_id != me.boot_id:
            return True
        if self.pid == me.pid:
            return True  # our own pid, so not that process any more (it would hold the lock file we hold)
        if self.process_start:
            return _process_start(self.pid) != self.process_start
        return not Path(f"/proc/{self.pid}").exists()

    def describe(self, now_ms: int) -> str:
        since = datetime.fromtimestamp(self.started_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        until = datetime.fromtimestamp(self.lease_until_ms / 1000, UTC).strftime("%H:%M:%S UTC")
        heartbeat = max(0, (now_ms - self.heartbeat_ms) // 1000)
        return (
            f"host {self.host}, process {self.pid}, since {since}, last heartbeat {heartbeat} s ago, "
            f"lease until {until}"
        )


class ReplicaLock:
    """An exclusive ``flock`` on ``<directory>/gateway-replica-<id>.lock``, held for the life of the process."""

    def __init__(self, directory: Path, replica: str) -> None:
        self.path = Path(directory) / f"gateway-replica-{check_replica_id(replica)}.lock"
        self.replica = replica
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise ReplicaInUse naming the process that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", errors="replace").strip() or "unknown"
            os.close(fd)
            raise ReplicaInUse(
                f"replica id {self.replica} is in use by a gateway on this host (process {holder}, lock "
                f"{self.path}): stop it first, or give this one its own exchange.replica_id"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (the file stays; it holds no state)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the only descriptor drops the flock


class ReplicaLease:
    """This process's claim on its replica id in the ``replicas`` table, and the heartbeat that renews it."""

    def __init__(self, engine: Engine, replica: str, lease_ms: int, *, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.replica = check_replica_id(replica)
        self.lease_ms = lease_ms
        self.clock = clock
        self.me = Holder.this_process(self._now(), lease_ms)
        self.claimed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _now(self) -> int:
        return int(self.clock() * 1000)

    def _read(self) -> Holder | None:
        if not inspect(self.engine).has_table(schema.replicas.name):
            return None  # a schema older than the lease: nothing to read (the migration creates it)
        t = schema.replicas
        with reading(self.engine) as conn:
            row = conn.execute(
                select(*(t.c[name] for name in Holder.__dataclass_fields__)).where(t.c.replica_id == self.replica)
            ).first()
        return None if row is None else Holder(**row._asdict())

    def _refuse_if_held(self, holder: Holder | None, now_ms: int) -> None:
        if holder is None or holder.instance == self.me.instance:
            return
        if holder.lease_until_ms > now_ms and not holder.gone(self.me):
            raise ReplicaInUse(
                f"replica id {self.replica} is held by a live gateway ({holder.describe(now_ms)}): give this one "
                "its own exchange.replica_id (HEDUI_GATEWAY_REPLICA_ID), or stop the other. If that gateway's host "
                "has failed, start this one again after its lease ends (exchange.lease_seconds after its last "
                "heartbeat)"
            )

    def check(self) -> None:
        """Raise ReplicaInUse if a live process holds the id. Only reads (a missing table is no holder)."""
        self._refuse_if_held(self._read(), self._now())

    def claim(self) -> None:
        """Claim the id: insert our row, or replace the row read a moment ago if its holder is gone or its lease
        over, in one compare-and-set. Raises ReplicaInUse if the holder is alive or the row changed meanwhile."""
        now = self._now()
        holder = self._read()
        self._refuse_if_held(holder, now)
        me = self.me
        values = {
            "instance": me.instance,
            "host": me.host,
            "boot_id": me.boot_id,
            "pid": me.pid,
            "process_start": me.process_start,
            "started_ms": now,
            "heartbeat_ms": now,
            "lease_until_ms": now + self.lease_ms,
        }
        t = schema.replicas
        with self.engine.begin() as conn:
            if holder is None:
                done = conn.execute(insert_ignore(self.engine, t), {"replica_id": self.replica, **values}).rowcount
            else:
                done = conn.execute(
                    update(t)
                    .where(
                        t.c.replica_id == self.replica,
                        t.c.instance == holder.instance,
                        t.c.heartbeat_ms == holder.heartbeat_ms,
                    )
                    .values(**values)
                ).rowcount
        if not done:
            raise ReplicaInUse(f"replica id {self.replica} was claimed by another gateway starting at the same time")
        self.claimed = True
        log.info("replica id claimed", extra={"replica": self.replica, "lease_seconds": self.lease_ms / 1000})

    def renew(self) -> bool:
        """Extend our lease; False when the row no longer names us (another process claimed the id)."""
        now = self._now()
        t = schema.replicas
        with self.engine.begin() as conn:
            return bool(
                conn.execute(
                    update(t)
                    .where(t.c.replica_id == self.replica, t.c.instance == self.me.instance)
                    .values(heartbeat_ms=now, lease_until_ms=now + self.lease_ms)
                ).rowcount
            )

    def start_heartbeat(self, on_lost: Callable[[], None]) -> None:
        """Renew every quarter lease in a thread; call ``on_lost`` once if the id was taken from us."""

        def beat() -> None:
            interval = max(self.lease_ms / 4000, 0.5)
            while not self._stop.wait(interval):
                try:
                    if self.renew():
                        continue
                except SQLAlchemyError as exc:  # the database is down: keep the id while the row names us
                    log.warning("replica lease not renewed", extra={"error": type(exc).__name__})
                    continue
                self.claimed = False
                log.error("replica id taken by another gateway; stopping", extra={"replica": self.replica})
                on_lost()
                return

        self._thread = threading.Thread(target=beat, name="hedui-replica-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and end our lease at once, so that a restart (here or elsewhere) need not wait."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not self.claimed:
            return
        self.claimed = False
        t = schema.replicas
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    update(t)
                    .where(t.c.replica_id == self.replica, t.c.instance == self.me.instance)
                    .values(lease_until_ms=0)
                )
        except SQLAlchemyError as exc:  # the lease then ends by itself
            log.warning("replica lease not released", extra={"error": type(exc).__name__})
