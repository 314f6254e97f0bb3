"""The units the gateway exchanges with, as its database knows them: what the config says of each, and each one's
health (consecutive failures, backoff, last success and error)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, insert, select, update

from common.db import reading
from common.errors import HeduiError
from gateway.archive.audit import AuditLog
from gateway.db import schema as s


@dataclass(frozen=True)
class UnitRow:
    unit_id: str
    category: int
    endpoint: str
    exchange_mode: str
    enabled: bool
    consecutive_failures: int
    next_attempt_ms: int
    #: When a call to the unit last got a reply (an exchange call or a health probe); None if never.
    last_success_ms: int | None = None
    #: Why the last failed call failed: ``status`` or ``status: reason`` (codes only, no personal data).
    last_error: str | None = None


@dataclass(frozen=True)
class RetriedUnit:
    """A unit whose backoff ``hedui-gateway retry`` ended: its failures so far and when it would have been tried."""

    unit_id: str
    consecutive_failures: int
    was_due_ms: int
    last_error: str | None


class RetryRefused(HeduiError):
    """A retry that names a unit the gateway's database does not know; nothing was changed."""

    code = "retry_refused"


class UnitStore:
    """The ``units`` table: the config's units and their health."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.is_postgres = engine.dialect.name == "postgresql"

    def sync(self, entries: Iterable[tuple[str, int, str, str, bool]]) -> None:
        """Make the units table say what the config says (unit id, category, endpoint, mode, enabled); health
        columns of known units are kept."""
        with self.engine.begin() as conn:
            known = {r.unit_id for r in conn.execute(select(s.units.c.unit_id))}
            for unit_id, category, endpoint, mode, enabled in entries:
                values = {"category": category, "endpoint": endpoint, "exchange_mode": mode, "enabled": enabled}
                if unit_id in known:
                    conn.execute(update(s.units).where(s.units.c.unit_id == unit_id).values(**values))
                else:
                    conn.execute(
                        insert(s.units).values(unit_id=unit_id, consecutive_failures=0, next_attempt_ms=0, **values)
                    )

    def all(self) -> list[UnitRow]:
        """Every unit, in id order."""
        with reading(self.engine) as conn:
            rows = conn.execute(
                select(
                    s.units.c.unit_id,
                    s.units.c.category,
                    s.units.c.endpoint,
                    s.units.c.exchange_mode,
                    s.units.c.enabled,
                    s.units.c.consecutive_failures,
                    s.units.c.next_attempt_ms,
                    s.units.c.last_success_ms,
                    s.units.c.last_error,
                ).order_by(s.units.c.unit_id)
            ).all()
        return [UnitRow(**r._mapping) for r in rows]

    def failed(self, unit_id: str, error: str, retry_at_ms: int) -> None:
        """Record a transport failure (``error``: ``status`` or ``status: reason``) and when to try the unit again."""
        with self.engine.begin() as conn:
            conn.execute(
                update(s.units)
                .where(s.units.c.unit_id == unit_id)
                .values(
                    consecutive_failures=s.units.c.consecutive_failures + 1,
                    next_attempt_ms=retry_at_ms,
                    last_error=error[:64],
                )
            )

    def succeeded(self, unit_id: str, now_ms: int) -> None:
        """A call to the unit got a reply: it is up, its backoff ends."""
        with self.engine.begin() as conn:
            conn.execute(
                update(s.units)
                .where(s.units.c.unit_id == unit_id, s.units.c.consecutive_failures != 0)
                .values(consecutive_failures=0, next_attempt_ms=0, last_error=None)
            )
            conn.execute(update(s.units).where(s.units.c.unit_id == unit_id).values(last_success_ms=now_ms))

    def retry(
        self, unit_ids: Sequence[str], *, audit: AuditLog, actor: str, now_ms: int
    ) -> tuple[list[RetriedUnit], list[str]]:
        """End the backoff of the named units that are down (consecutive failures): their next attempt is now,
        so the next cycle (at most one dispatch interval away) calls them. ``consecutive_failures`` and
        ``last_error`` are kept: the unit counts as down (hedui_unit_up 0) until a call succeeds, and a failed
        retry backs off from where it was. One audit entry per unit changed, in the same transaction. A unit
        unknown to the database is refused with RetryRefused and nothing changes. Returns the units retried and
        those that were up (nothing to retry)."""
        wanted = list(dict.fromkeys(unit_ids))
        u = s.units.c
        with self.engine.begin() as conn:
            query = select(u.unit_id, u.consecutive_failures, u.next_attempt_ms, u.last_error).where(
                u.unit_id.in_(wanted)
            )
            if self.is_postgres:
                query = query.with_for_update()
            found = {r.unit_id: r for r in conn.execute(query)}
            unknown = [i for i in wanted if i not in found]
            if unknown:
                raise RetryRefused(
                    f"no unit {', '.join(unknown)} in the gateway's database (see 'hedui-gateway status'); "
                    "nothing was changed"
                )
            retried, idle = [], []
            for unit_id in wanted:
                row = found[unit_id]
                if row.consecutive_failures == 0:  # up: no backoff to end
                    idle.append(unit_id)
                    continue
                conn.execute(update(s.units).where(u.unit_id == unit_id).values(next_attempt_ms=0))
                audit.append(
                    conn,
                    at_ms=now_ms,
                    actor=actor,
                    action="unit.retry",
                    before="backing_off",
                    after="retry_now",
                    detail=(
                        f"unit={unit_id};failures={row.consecutive_failures};"
                        f"was_due_in_s={max(0, (row.next_attempt_ms - now_ms + 999) // 1000)}"
                    ),
                )
                retried.append(
                    RetriedUnit(unit_id, int(row.consecutive_failures), int(row.next_attempt_ms), row.last_error)
                )
        return retried, idle
