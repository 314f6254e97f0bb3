"""Who is on duty at the unit: the exchange staff the answer worker names as responsible for each answer set
(BatchAnswer.responsible_staff; Procedure V.(二) asks for staff on both sides of an exchange, and the unit may require
two: ``[exchange] answer_staff``).

An operator sets the list with ``hedui-connector roster on-duty --set S-01,S-02``; only members of the unit's own roster
with the exchange role can be on duty, and the worker names, for each answer, those of them who are active members of
the version in force at the answer's time, because that is what the gateway checks the names against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, delete, select

from common.db import reading
from connectors.trust.rosters import RosterChangeRefused, create_tables, on_duty, record_event
from keys.roster import RosterHistory

#: At most this many staff are named on one answer set.
MAX_RESPONSIBLE = 8


@dataclass(frozen=True)
class Responsible:
    """The staff to name on an answer made now, or why the answer must wait."""

    staff_ids: tuple[str, ...]
    #: None when the answer may go out: at least the required number are on duty and registered; else a reason code.
    reason: str | None = None
    #: The unit's roster has no version in force yet: answers go out naming nobody (the gateway stores them as
    #: unverified), as before rosters existed.
    legacy: bool = False


class OnDuty:
    """The on-duty list in the connector's store."""

    def __init__(self, engine: Engine) -> None:
        create_tables(engine)
        self.engine = engine

    def staff(self) -> list[str]:
        with reading(self.engine) as conn:
            return [r.staff_id for r in conn.execute(select(on_duty.c.staff_id).order_by(on_duty.c.staff_id))]

    def set(self, staff_ids: Sequence[str], own: RosterHistory | None, *, now_ms: int) -> list[str]:
        """Replace the on-duty list; every id must be an exchange member of the unit's latest roster version, not
        revoked or ended. RosterChangeRefused (nothing changed) otherwise."""
        wanted = sorted(set(staff_ids))
        if len(wanted) > MAX_RESPONSIBLE:
            raise RosterChangeRefused(f"at most {MAX_RESPONSIBLE} staff can be on duty at once")
        latest = own.latest.roster if own is not None and own.latest is not None else None
        if wanted and latest is None:
            raise RosterChangeRefused("the unit has no roster yet: 'hedui-connector roster init-admin' first")
        for staff_id in wanted:
            member = latest.member(staff_id) if latest is not None else None
            if member is None or not member.has_role("exchange"):
                raise RosterChangeRefused(f"{staff_id[:32]} is not an exchange member of the unit's roster")
            if any(end is not None and end <= now_ms for end in (member.revoked_at_ms, member.valid_until_ms)):
                raise RosterChangeRefused(f"{staff_id} has left the roster (ended or revoked)")
        with self.engine.begin() as conn:
            conn.execute(delete(on_duty))
            for staff_id in wanted:
                conn.execute(on_duty.insert().values(staff_id=staff_id, since_ms=now_ms))
            record_event(conn, now_ms, "on_duty", None, ",".join(wanted)[:64] or "none")
        return wanted

    def responsible(self, own: RosterHistory | None, at_ms: int, minimum: int) -> Responsible:
        """The on-duty staff who are active exchange members of the unit's roster in force at ``at_ms``; a reason
        code when fewer than ``minimum`` are (the worker then does not answer)."""
        if own is None or own.in_force(at_ms) is None:
            return Responsible((), legacy=True)
        named = []
        for staff_id in self.staff():
            member, _ = own.member_at(staff_id, at_ms)
            if member is not None and member.has_role("exchange"):
                named.append(staff_id)
        if len(named) < minimum:
            return Responsible(tuple(named), reason="answer_staff_missing")
        return Responsible(tuple(named[:MAX_RESPONSIBLE]))
