"""Leases on the scheduler's jobs, so that one replica at a time runs each job (the deadline sweep, the probes)."""

from __future__ import annotations

from sqlalchemy import Engine, or_, update

from gateway.db import schema as s
from gateway.db.statements import insert_ignore


class JobLeases:
    """The ``jobs`` table: who runs each job now, and how its runs went."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.is_postgres = engine.dialect.name == "postgresql"

    def acquire(self, name: str, replica: str, now_ms: int, lease_ms: int) -> bool:
        """Take the lease of job ``name``; False while another replica holds it."""
        with self.engine.begin() as conn:
            conn.execute(
                insert_ignore(self.engine, s.jobs),
                {"name": name, "lease_until_ms": 0, "runs": 0, "failures": 0},
            )
            return bool(
                conn.execute(
                    update(s.jobs)
                    .where(
                        s.jobs.c.name == name, or_(s.jobs.c.lease_until_ms < now_ms, s.jobs.c.lease_owner == replica)
                    )
                    .values(
                        lease_owner=replica,
                        lease_until_ms=now_ms + lease_ms,
                        last_started_ms=now_ms,
                        runs=s.jobs.c.runs + 1,
                    )
                ).rowcount
            )

    def release(self, name: str, replica: str, now_ms: int, ok: bool) -> None:
        """End this replica's lease of job ``name`` and record how the run went."""
        with self.engine.begin() as conn:
            conn.execute(
                update(s.jobs)
                .where(s.jobs.c.name == name, s.jobs.c.lease_owner == replica)
                .values(
                    lease_owner=None,
                    lease_until_ms=0,
                    last_finished_ms=now_ms,
                    last_status="ok" if ok else "failed",
                    failures=s.jobs.c.failures + (0 if ok else 1),
                )
            )
