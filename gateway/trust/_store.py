"""The ``rosters`` table (migration 0012): every version of the gateway's own roster and of each unit's, as the
SignedRoster bytes accepted. Shared by the staff register (which must agree with the gateway's own roster) and by
gateway/trust/rosters.py (which writes it)."""

from __future__ import annotations

from sqlalchemy import Connection, select

from gateway.db import schema as s
from keys.roster import Notice, RosterHistory, SignedRoster


def load_history(conn: Connection, party_id: str, *, notice: Notice | None = None) -> RosterHistory | None:
    """Every version of ``party_id``'s roster held, as a history; None when none is held. A peer's versions are
    judged by when they were stored (received); the gateway's own by their issue time."""
    rows = conn.execute(
        select(s.rosters.c.signed, s.rosters.c.own, s.rosters.c.stored_at_ms)
        .where(s.rosters.c.party_id == party_id)
        .order_by(s.rosters.c.version)
    ).all()
    if not rows:
        return None
    versions = [bytes(r.signed) if r.own else (bytes(r.signed), int(r.stored_at_ms)) for r in rows]
    return RosterHistory.from_stored(party_id, versions, notice=notice)


def own_party(conn: Connection) -> str | None:
    """The party id of the gateway's own roster, once it has one."""
    row = conn.execute(select(s.rosters.c.party_id).where(s.rosters.c.own.is_(True)).limit(1)).first()
    return None if row is None else str(row.party_id)


def own_history(conn: Connection) -> RosterHistory | None:
    """The gateway's own roster history; None before its first version."""
    party = own_party(conn)
    return None if party is None else load_history(conn, party)


def store_version(conn: Connection, signed: SignedRoster, *, own: bool, now_ms: int) -> None:
    """Add an accepted version (the caller checked it against the history in the same transaction)."""
    roster = signed.roster
    conn.execute(
        s.rosters.insert().values(
            party_id=roster.party_id,
            version=roster.version,
            own=own,
            signed=signed.data,
            sha256=signed.item_sha256,
            issued_at_ms=roster.issued_at_ms,
            effective_at_ms=roster.effective_at_ms,
            admin_staff_id=roster.admin_staff_id,
            stored_at_ms=now_ms,
        )
    )
