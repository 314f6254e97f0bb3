"""The ``rosters`` table (migration 0012; defined and read as in common/rosterstore.py): every version of the
gateway's own roster and of each unit's, as the SignedRoster bytes accepted. Shared by the staff register (which must
agree with the gateway's own roster) and by gateway/trust/rosters.py (which writes it)."""

from __future__ import annotations

from sqlalchemy import Connection, select

from common import rosterstore
from gateway.db import schema as s
from keys.roster import Notice, RosterHistory, SignedRoster


def load_history(conn: Connection, party_id: str, *, notice: Notice | None = None) -> RosterHistory | None:
    """Every version of ``party_id``'s roster held, as a history; None when none is held. A peer's versions are
    judged by when they were stored (received); the gateway's own by their issue time."""
    return rosterstore.load_history(conn, s.rosters, party_id, notice=notice)


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
    rosterstore.store_version(conn, s.rosters, signed, own=own, now_ms=now_ms)
