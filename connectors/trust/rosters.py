"""Staff rosters at the sharing unit (Procedure V.(三): both sides register their exchange staff with each other in
advance and report changes in advance; docs/exchange.md, "Rosters (Procedure V.(三))").

* :class:`UnitRoster`: the unit's own roster, its exchange staff and the admins who maintain it, managed with
  ``hedui-connector roster``: every change is the next signed version (the unit's key and an admin's staff key),
  stored and published to every gateway the unit serves as a ROSTER trust item.
* :class:`PeerRosters`: the gateways' rosters received, with their history. :meth:`PeerRosters.history` is what the
  approval check judges a gateway's staff by (the roster in force when they signed); :meth:`PeerRosters.handler`
  applies the ROSTER trust items a gateway sends.

The tables live in the connector's own store and are created beside the others on first use: an existing store
keeps everything it holds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

from sqlalchemy import BigInteger, Column, Connection, Engine, MetaData, String, Table

from common.db import reading
from common.errors import HeduiError
from common.rosterstore import ROSTER_ITEM, HeldRosters, load_history, roster_table, store_version
from connectors import store as cstore
from connectors.trust.items import TrustItems
from keys.handles import SigningKey
from keys.identity import PartyKeys
from keys.keyring import Keyring
from keys.roster import (
    ROLES,
    Notice,
    Roster,
    RosterError,
    RosterHistory,
    RosterMember,
    build_roster,
    sign_roster,
)
from keys.statements import staff_public_key
from keys.truststore import TrustStore

log = logging.getLogger("hedui.connector.rosters")

metadata = MetaData()

#: Every version of the unit's own roster (``own``) and of each gateway's, as the SignedRoster bytes accepted
#: (common/rosterstore.py).
rosters = roster_table(metadata)

#: The unit's exchange staff on duty: the answer worker names them as responsible for each answer set.
on_duty = Table(
    "on_duty",
    metadata,
    Column("staff_id", String(32), primary_key=True),
    Column("since_ms", BigInteger, nullable=False),
)

#: Roles on a unit's roster: its exchange staff, and the admins who maintain the roster.
UNIT_ROLES = ("admin", "exchange")


class RosterChangeRefused(HeduiError):
    """A change of the unit's own roster (or of who is on duty) was refused; nothing was changed."""

    code = "roster_change"


def create_tables(engine: Engine) -> None:
    """Create the roster tables in a store that lacks them (never touching the others)."""
    metadata.create_all(engine)


def _load(conn: Connection, party_id: str, *, notice: Notice | None = None) -> RosterHistory | None:
    """Every version of ``party_id``'s roster held; a gateway's versions judged by when they were stored
    (received), the unit's own by their issue time."""
    return load_history(conn, rosters, party_id, notice=notice)


def _store(conn: Connection, signed_roster: bytes, history: RosterHistory, *, own: bool, now_ms: int) -> Roster:
    signed = history.versions[-1]
    assert signed.data == signed_roster
    store_version(conn, rosters, signed, own=own, now_ms=now_ms)
    return signed.roster


def record_event(conn: Connection, at_ms: int, event: str, party: str | None, reason: str) -> None:
    """An entry of the connector's audit table (codes and ids only, never a name)."""
    conn.execute(cstore.audit.insert().values(at_ms=at_ms, event=event, gateway=party, reason=reason))


class UnitRoster:
    """The unit's own roster, published to ``gateways``."""

    def __init__(self, engine: Engine, party: PartyKeys, *, notice: Notice, gateways: Sequence[str]) -> None:
        create_tables(engine)
        self.engine = engine
        self.party = party
        self.notice = notice
        self.gateways = tuple(gateways)
        self.items = TrustItems(engine)

    def history(self) -> RosterHistory | None:
        with reading(self.engine) as conn:
            return _load(conn, self.party.party_id)

    def earliest_effective(self, now_ms: int) -> int:
        return self.notice.earliest_effective(now_ms)

    def init_admin(
        self, staff_id: str, admin_key: SigningKey, *, name: str, now_ms: int, roles: Iterable[str] = ("admin",)
    ) -> Roster:
        """Version 1: the first admin, whose staff keystore signs it; in force after the notice."""
        member = _new_member(
            staff_id,
            name,
            roles,
            admin_key.public.raw,
            valid_from_ms=self.earliest_effective(now_ms),
            valid_until_ms=None,
        )
        if not member.has_role("admin"):
            raise RosterChangeRefused("the first member must hold the admin role")

        def change(previous: Roster | None) -> tuple[list[RosterMember], int]:
            if previous is not None:
                raise RosterChangeRefused(
                    "the unit has a roster already; an admin adds members with 'hedui-connector roster add'"
                )
            return [member], member.valid_from_ms

        return self._change(staff_id, admin_key, now_ms, change, what=f"init={staff_id}")

    def add(
        self,
        admin_id: str,
        admin_key: SigningKey,
        staff_id: str,
        *,
        name: str,
        roles: Iterable[str],
        public_key: bytes,
        now_ms: int,
        valid_from_ms: int | None = None,
        valid_until_ms: int | None = None,
    ) -> Roster:
        """The next version with a new member, in force (and the member valid) after the notice at the earliest."""
        effective = max(self.earliest_effective(now_ms), valid_from_ms or 0)
        member = _new_member(staff_id, name, roles, public_key, valid_from_ms=effective, valid_until_ms=valid_until_ms)

        def change(previous: Roster | None) -> tuple[list[RosterMember], int]:
            held = _require(previous)
            if held.member(staff_id) is not None:
                raise RosterChangeRefused(f"staff id {staff_id} is on the roster already; staff ids are never reused")
            return [*held.members, member], effective

        return self._change(admin_id, admin_key, now_ms, change, what=f"add={staff_id}")

    def end(
        self, admin_id: str, admin_key: SigningKey, staff_id: str, *, now_ms: int, at_ms: int | None = None
    ) -> Roster:
        """End a member's validity at ``at_ms`` (default: when the notice ends); announced at once."""
        until = self.earliest_effective(now_ms) if at_ms is None else at_ms
        if until < now_ms:
            raise RosterChangeRefused("a member's validity ends now or later, never in the past")

        def change(previous: Roster | None) -> tuple[list[RosterMember], int]:
            members = _replaced(_require(previous), staff_id, until, revoke=False)
            return members, now_ms

        return self._change(admin_id, admin_key, now_ms, change, what=f"end={staff_id}")

    def revoke(self, admin_id: str, admin_key: SigningKey, staff_id: str, *, now_ms: int, urgent: bool) -> Roster:
        """Revoke a member: ``urgent`` from now on, otherwise from the end of the notice; announced at once."""
        at = now_ms if urgent else self.earliest_effective(now_ms)

        def change(previous: Roster | None) -> tuple[list[RosterMember], int]:
            return _replaced(_require(previous), staff_id, at, revoke=True), now_ms

        return self._change(admin_id, admin_key, now_ms, change, what=f"revoke={staff_id}")

    def _change(
        self,
        admin_id: str,
        admin_key: SigningKey,
        now_ms: int,
        change: Callable[[Roster | None], tuple[list[RosterMember], int]],
        *,
        what: str,
    ) -> Roster:
        """Make, check (by the rules a gateway applies), store and publish the next version in one transaction."""
        with self.engine.begin() as conn:
            history = _load(conn, self.party.party_id) or RosterHistory(self.party.party_id)
            previous = history.latest.roster if history.latest is not None else None
            members, effective = change(previous)
            listed = next((m for m in members if m.staff_id == admin_id), None)
            if listed is None or not listed.has_role("admin"):
                raise RosterChangeRefused(f"{admin_id[:32]} is not an admin on the unit's roster (roster_not_admin)")
            if listed.public_key.raw != admin_key.public.raw:
                raise RosterChangeRefused(
                    f"the staff keystore given is not {admin_id}'s: its signing key is not the key on the roster"
                )
            _keep_an_admin(members, admin_id, now_ms)
            try:
                roster = build_roster(
                    previous, party_id=self.party.party_id, members=members, issued_at_ms=now_ms,
                    effective_at_ms=effective, admin_staff_id=admin_id,
                )  # fmt: skip
                data = sign_roster(roster, self.party.signing_key(now_ms), admin_key)
                history.accept(data, keyring=Keyring(self.party.records()), now_ms=now_ms, notice=self.notice)
            except RosterError as exc:
                raise RosterChangeRefused(f"{exc} ({exc.code}); nothing was changed") from exc
            _store(conn, data, history, own=True, now_ms=now_ms)
            self.items.publish(conn, ROSTER_ITEM, data, now_ms, self.gateways)
            record_event(conn, now_ms, "roster_version", self.party.party_id, f"v{roster.version};{what}"[:64])
        log.info(
            "roster version made and published",
            extra={"version": roster.version, "admin": admin_id, "gateways": len(self.gateways)},
        )
        return roster


def _require(previous: Roster | None) -> Roster:
    if previous is None:
        raise RosterChangeRefused("the unit has no roster yet: start with 'hedui-connector roster init-admin'")
    return previous


def _new_member(
    staff_id: str,
    name: str,
    roles: Iterable[str],
    public_key: bytes,
    *,
    valid_from_ms: int,
    valid_until_ms: int | None,
) -> RosterMember:
    wanted = sorted({r.strip() for r in (roles.split(",") if isinstance(roles, str) else roles)} - {""})
    if not wanted or not set(wanted) <= set(UNIT_ROLES):
        raise RosterChangeRefused(f"a unit's roster lists exchange staff and admins: roles are {', '.join(UNIT_ROLES)}")
    try:
        member = RosterMember(
            staff_id, name, tuple(wanted), staff_public_key(public_key), valid_from_ms, valid_until_ms, None
        )
        member.check()
    except (RosterError, ValueError) as exc:
        raise RosterChangeRefused(str(exc)) from exc
    assert set(member.roles) <= set(ROLES)
    return member


def _replaced(roster: Roster, staff_id: str, at_ms: int, *, revoke: bool) -> list[RosterMember]:
    member = roster.member(staff_id)
    if member is None:
        raise RosterChangeRefused(f"no member {staff_id[:32]} on the roster")
    if member.revoked_at_ms is not None:
        raise RosterChangeRefused(f"member {staff_id} is revoked already")
    if not revoke and member.valid_until_ms is not None and member.valid_until_ms <= at_ms:
        raise RosterChangeRefused(f"member {staff_id} ends already at or before that time; a window never grows")
    if not revoke and at_ms <= member.valid_from_ms:
        raise RosterChangeRefused(f"member {staff_id} would end before their validity begins; revoke them")
    changed = RosterMember(
        member.staff_id, member.name, member.roles, member.public_key, member.valid_from_ms,
        member.valid_until_ms if revoke else at_ms, at_ms if revoke else None,
    )  # fmt: skip
    return [changed if m.staff_id == staff_id else m for m in roster.members]


def _keep_an_admin(members: list[RosterMember], admin_id: str, now_ms: int) -> None:
    """A roster nobody can change any more would need a new enrolment: keep one admin who stays, with no end and not
    revoked (the change's own admin, or another); an admin whose end is set, however far, does not count."""
    if not any(m.has_role("admin") and m.valid_until_ms is None and m.revoked_at_ms is None for m in members):
        raise RosterChangeRefused(f"that would leave no admin on the roster; add another admin before ({admin_id})")


class RosterHandler:
    """The ROSTER trust item handler for a gateway's roster: ``handler(sender, payload, now_ms) -> None | reason``
    (None when applied or held already; the reason code, with nothing changed, when refused)."""

    def __init__(
        self, engine: Engine, *, trust: Callable[[], TrustStore], notice: Callable[[], Notice], own_party_id: str
    ) -> None:
        create_tables(engine)
        self.engine, self.trust, self.notice, self.own_party_id = engine, trust, notice, own_party_id

    def __call__(self, sender: str, payload: bytes, now_ms: int) -> str | None:
        if sender == self.own_party_id:
            return "roster_wrong_party"
        with self.engine.begin() as conn:
            notice = self.notice()
            history = _load(conn, sender, notice=notice) or RosterHistory(sender, notice=notice)
            try:
                appended = history.accept(payload, keyring=self.trust().keyring(sender), now_ms=now_ms, notice=notice)
            except RosterError as exc:
                log.warning("roster refused", extra={"gateway": sender, "reason": exc.code})
                return exc.code
            if not appended:
                return None
            roster = _store(conn, payload, history, own=False, now_ms=now_ms)
            record_event(conn, now_ms, "roster_received", sender, f"v{roster.version}")
        log.info("roster version applied", extra={"gateway": sender, "version": roster.version})
        return None


class PeerRosters(HeldRosters):
    """The rosters the unit holds: each gateway's history (and its own); ``history``, ``held_version``,
    ``signed_versions``, ``parties``, ``pending`` and ``catch_up`` as in common/rosterstore.py.

    ``notice``: the unit's notice rule, by which the members a gateway's version adds count from the notice after
    its receipt at the earliest (keys/roster.py, RECEIPT_GRACE_MS); without it, from the receipt.
    """

    def __init__(self, engine: Engine, *, notice: Callable[[], Notice] | None = None) -> None:
        create_tables(engine)
        super().__init__(engine, rosters, notice=notice)

    def handler(
        self, *, trust: Callable[[], TrustStore], notice: Callable[[], Notice], own_party_id: str
    ) -> RosterHandler:
        return RosterHandler(self.engine, trust=trust, notice=notice, own_party_id=own_party_id)

    def missing_from_roster(self, legacy: Mapping[str, frozenset[str]]) -> dict[str, list[str]]:
        """Per gateway whose roster is held, the ``[[staff]]`` ids of the config its latest version lacks."""
        out: dict[str, list[str]] = {}
        for gateway, ids in sorted(legacy.items()):
            history = self.history(gateway)
            if history is not None and history.latest is not None:
                listed = {m.staff_id for m in history.latest.roster.members}
                missing = sorted(ids - listed)
                if missing:
                    out[gateway] = missing
        return out
