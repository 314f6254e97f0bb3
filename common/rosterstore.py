"""Signed staff rosters held in a database, the gateway's and the connector's alike (keys/roster.py has the format and
the rules for accepting a version; docs/exchange.md, "Rosters (Procedure V.(三))").

Table (the gateway's migration 0012 creates it; the connector's store creates it on first use)::

    rosters(party_id VARCHAR(64), version BIGINT, own BOOL, signed BLOB, sha256 BLOB(32), issued_at_ms BIGINT,
            effective_at_ms BIGINT, admin_staff_id VARCHAR(32), stored_at_ms BIGINT, PK(party_id, version))

Every version of the holder's own roster (``own``) and of its peers', as the SignedRoster bytes accepted. A version
is never changed or deleted: an old message is judged by the roster of its day. A roster names staff (personal data
of staff, shown to operators): nothing here is logged.
"""

from __future__ import annotations

from collections.abc import Callable

from hedui.v1 import trust_pb2
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    LargeBinary,
    MetaData,
    String,
    Table,
    func,
    select,
)

from common.db import reading
from common.trustitems import TrustItemStore
from keys.roster import Notice, RosterHistory, SignedRoster

ROSTER_ITEM = trust_pb2.TRUST_ITEM_KIND_ROSTER


def roster_table(metadata: MetaData) -> Table:
    """The ``rosters`` table, defined on ``metadata``."""
    return Table(
        "rosters",
        metadata,
        Column("party_id", String(64), primary_key=True),
        Column("version", BigInteger, primary_key=True, autoincrement=False),
        Column("own", Boolean, nullable=False),
        Column("signed", LargeBinary, nullable=False),
        # SHA-256 of ``signed``: the trust item's digest its receipt names.
        Column("sha256", LargeBinary(32), nullable=False),
        Column("issued_at_ms", BigInteger, nullable=False),
        Column("effective_at_ms", BigInteger, nullable=False),
        Column("admin_staff_id", String(32), nullable=False),
        Column("stored_at_ms", BigInteger, nullable=False),
    )


def load_history(
    conn: Connection, rosters: Table, party_id: str, *, notice: Notice | None = None
) -> RosterHistory | None:
    """Every version of ``party_id``'s roster held in ``rosters``, as a history; None when none is held. A peer's
    versions are judged by when they were stored (received), the holder's own by their issue time (keys/roster.py,
    RECEIPT_GRACE_MS); ``notice`` as for :class:`~keys.roster.RosterHistory`."""
    rows = conn.execute(
        select(rosters.c.signed, rosters.c.own, rosters.c.stored_at_ms)
        .where(rosters.c.party_id == party_id)
        .order_by(rosters.c.version)
    ).all()
    if not rows:
        return None
    versions = [bytes(r.signed) if r.own else (bytes(r.signed), int(r.stored_at_ms)) for r in rows]
    return RosterHistory.from_stored(party_id, versions, notice=notice)


def store_version(conn: Connection, rosters: Table, signed: SignedRoster, *, own: bool, now_ms: int) -> None:
    """Add an accepted version (the caller checked it against the history in the same transaction)."""
    roster = signed.roster
    conn.execute(
        rosters.insert().values(
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


class HeldRosters:
    """The rosters a party holds in its ``rosters`` table: each peer's history, and its own.

    ``notice``: the holder's notice rule, by which the members a peer's version adds count from the notice after
    its receipt at the earliest (keys/roster.py, RECEIPT_GRACE_MS); without it, from the receipt.
    """

    def __init__(self, engine: Engine, rosters: Table, *, notice: Callable[[], Notice] | None = None) -> None:
        self.engine = engine
        self.rosters = rosters
        self.notice = notice
        #: party -> ((latest version, its item digest, notice), the history parsed): a history is parsed once per
        #: version held, not once per message judged by it.
        self._cache: dict[str, tuple[tuple[int, bytes, object], RosterHistory]] = {}

    def history(self, party_id: str) -> RosterHistory | None:
        """Every version of ``party_id``'s roster held, or None when none is held. Parsed once per latest version
        (cached): callers read it and never change it."""
        notice = self.notice() if self.notice is not None else None
        notice_key = None if notice is None else (notice.working_days, id(notice.calendar))
        r = self.rosters.c
        with reading(self.engine) as conn:
            head = conn.execute(
                select(r.version, r.sha256).where(r.party_id == party_id).order_by(r.version.desc()).limit(1)
            ).first()
            if head is None:
                return None
            key = (int(head.version), bytes(head.sha256), notice_key)
            cached = self._cache.get(party_id)
            if cached is not None and cached[0] == key:
                return cached[1]
            history = load_history(conn, self.rosters, party_id, notice=notice)
        assert history is not None
        self._cache[party_id] = (key, history)
        return history

    def held_version(self, party_id: str) -> int:
        """The highest version of ``party_id``'s roster held; 0 for none (TrustSync.peer_roster_version)."""
        r = self.rosters.c
        with reading(self.engine) as conn:
            value = conn.execute(select(func.max(r.version)).where(r.party_id == party_id)).scalar_one()
        return int(value or 0)

    def signed_versions(self, party_id: str, after: int = 0) -> list[bytes]:
        """SignedRoster bytes of ``party_id``'s versions after version ``after``, in order: what a peer holding
        ``after`` of that roster (TrustSync.peer_roster_version) still needs."""
        r = self.rosters.c
        with reading(self.engine) as conn:
            rows = conn.execute(
                select(r.signed).where(r.party_id == party_id, r.version > after).order_by(r.version)
            ).all()
        return [row.signed for row in rows]

    def parties(self) -> list[str]:
        """Every party whose roster is held (the holder's own included once it has one)."""
        r = self.rosters.c
        with reading(self.engine) as conn:
            return [row[0] for row in conn.execute(select(r.party_id).distinct().order_by(r.party_id))]

    def pending(self, now_ms: int) -> dict[str, int]:
        """Per party, roster versions held that are not yet in force at ``now_ms``."""
        r = self.rosters.c
        with reading(self.engine) as conn:
            rows = conn.execute(
                select(r.party_id, func.count()).where(r.effective_at_ms > now_ms).group_by(r.party_id)
            ).all()
        return {str(row[0]): int(row[1]) for row in rows}

    def catch_up(self, items: TrustItemStore, own_party: str, now_ms: Callable[[], int]) -> Callable[[str, int], None]:
        """What a peer's TrustSync.peer_roster_version asks for, as the syncer's hook ``(peer, held) -> None``:
        every version of our roster (``own_party``'s) after the one the peer holds is (again) published for it as a
        ROSTER trust item, in version order; a version it acknowledged stays acknowledged."""

        def catch_up(peer: str, held: int) -> None:
            versions = self.signed_versions(own_party, after=max(0, held))
            if not versions:
                return
            now = now_ms()
            with self.engine.begin() as conn:
                for data in versions:
                    items.publish(conn, ROSTER_ITEM, data, now, [peer])

        return catch_up
