"""Staff rosters at the gateway (Procedure V.(三): both sides register their exchange staff with each other in
advance and report changes in advance; docs/exchange.md, "Rosters (Procedure V.(三))").

* :class:`OwnRoster`: the gateway's own roster. The staff register (gateway/procedure/staff.py) stays the source of
  truth for the agency's staff; every change made through ``hedui-gateway roster`` changes the register and makes
  the next signed roster version in one transaction, stores it, and publishes it to every unit as a ROSTER trust
  item. The roster lists the register's exchange staff and admins (intake-, review- and report-only staff are the
  agency's business, not the units').
* :class:`PeerRosters`: the units' rosters received, with their history: :meth:`PeerRosters.history` for whoever
  judges a unit's message by the roster of its day, :meth:`PeerRosters.handler` for the ROSTER trust items.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine

from common.db import reading
from common.errors import HeduiError
from common.rosterstore import ROSTER_ITEM, HeldRosters
from gateway.archive.audit import AuditLog
from gateway.archive.audit import lock as audit_lock
from gateway.db import schema as s
from gateway.trust._store import load_history, own_history, own_party, store_version
from gateway.trust.items import TrustItems
from keys.handles import SigningKey
from keys.identity import PartyKeys
from keys.keyring import Keyring
from keys.roster import Notice, Roster, RosterError, RosterHistory, RosterMember, build_roster, sign_roster
from keys.truststore import TrustStore

if TYPE_CHECKING:
    from gateway.procedure.staff import StaffMember, StaffRegister

__all__ = [
    "ROSTER_ITEM",
    "ROSTER_ROLES",
    "AnswerStaffVerdict",
    "OwnRoster",
    "PeerRosters",
    "RosterChangeRefused",
    "RosterHandler",
    "judge_answer_staff",
]

log = logging.getLogger("hedui.gateway.rosters")

#: Register members holding one of these roles are on the roster the units hold.
ROSTER_ROLES = frozenset({"exchange", "admin"})
_STAFF_ID_RE = re.compile(r"[A-Za-z0-9-]{1,32}")


class RosterChangeRefused(HeduiError):
    """A change of the gateway's own roster was refused; nothing was changed (register, roster and items alike)."""

    code = "roster_change"


def _roster_member(member: StaffMember) -> RosterMember:
    return RosterMember(
        staff_id=member.staff_id,
        name=member.name,
        roles=tuple(sorted(member.roles)),
        public_key=member.public_key,
        valid_from_ms=member.valid_from_ms,
        valid_until_ms=member.valid_until_ms,
        revoked_at_ms=member.revoked_at_ms,
    )


class OwnRoster:
    """The gateway's own roster, made from its staff register and published to ``units``."""

    def __init__(self, register: StaffRegister, party: PartyKeys, *, notice: Notice, units: Sequence[str]) -> None:
        self.register = register
        self.engine: Engine = register.engine
        self.audit: AuditLog = register.audit
        self.party = party
        self.notice = notice
        self.units = tuple(units)
        self.items = TrustItems(self.engine)

    def history(self) -> RosterHistory | None:
        """Every version made so far; None before the first."""
        with reading(self.engine) as conn:
            return self._history(conn)

    def _history(self, conn: Connection) -> RosterHistory | None:
        party = own_party(conn)
        if party is not None and party != self.party.party_id:
            raise RosterChangeRefused(f"the database holds the roster of {party}, not of {self.party.party_id}")
        return load_history(conn, self.party.party_id)

    def earliest_effective(self, now_ms: int) -> int:
        """When a version adding members, made now, may take effect at the earliest (the configured notice)."""
        return self.notice.earliest_effective(now_ms)

    # -- changes -----------------------------------------------------------------------------------------------

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
    ) -> Roster | None:
        """Register a member and make the version that announces them: they take effect at the version's effective
        time, the notice after now (or at ``valid_from_ms`` when that is later; never sooner). A member without an
        exchange or admin role is not on the roster: registered from ``valid_from_ms`` (default now), and no version
        is made (None)."""
        from gateway.procedure.staff import check_roles  # noqa: PLC0415 - staff.py imports this package

        roles = check_roles(roles)
        on_roster = bool(roles & ROSTER_ROLES)
        effective = max(self.earliest_effective(now_ms), valid_from_ms or 0) if on_roster else valid_from_ms or now_ms

        def change(conn: Connection) -> int:
            self.register.register(
                admin_id, staff_id, name=name, roles=roles, public_key=public_key, valid_from_ms=effective,
                valid_until_ms=valid_until_ms, now_ms=now_ms, conn=conn,
            )  # fmt: skip
            return effective

        return self._change(admin_id, admin_key, now_ms, change, what=f"add={staff_id}", staff_id=staff_id)

    def end(
        self, admin_id: str, admin_key: SigningKey, staff_id: str, *, now_ms: int, at_ms: int | None = None
    ) -> Roster | None:
        """End a member's validity at ``at_ms`` (default: the notice after now), announced at once."""
        until = self.earliest_effective(now_ms) if at_ms is None else at_ms

        def change(conn: Connection) -> int:
            self.register.end(admin_id, staff_id, valid_until_ms=until, now_ms=now_ms, conn=conn)
            return now_ms

        return self._change(admin_id, admin_key, now_ms, change, what=f"end={staff_id}", staff_id=staff_id)

    def revoke(
        self, admin_id: str, admin_key: SigningKey, staff_id: str, *, now_ms: int, reason: str, urgent: bool
    ) -> Roster | None:
        """Revoke a member: ``urgent`` from now on (a lost or stolen key cannot wait), otherwise from the end of the
        notice; either way the version is announced at once (it only removes)."""
        at = now_ms if urgent else self.earliest_effective(now_ms)

        def change(conn: Connection) -> int:
            self.register.revoke(admin_id, staff_id, now_ms=now_ms, reason=reason, at_ms=at, conn=conn)
            return now_ms

        return self._change(admin_id, admin_key, now_ms, change, what=f"revoke={staff_id}", staff_id=staff_id)

    def publish(self, admin_id: str, admin_key: SigningKey, *, now_ms: int) -> Roster | None:
        """Make a version of the register as it is (the first version of a gateway that had staff before rosters,
        or after the register was changed by other means); it takes effect after the notice. It signs whatever the
        register holds: show the operator :meth:`unsigned_changes` first."""
        effective = self.earliest_effective(now_ms)

        def change(conn: Connection) -> int:
            return effective

        return self._change(admin_id, admin_key, now_ms, change, what="publish", staff_id=None)

    def _table(self, conn: Connection) -> list[RosterMember]:
        """The register's members the roster lists (exchange staff and admins), sorted by staff id."""
        return [_roster_member(m) for m in self.register.members(conn=conn) if m.roles & ROSTER_ROLES]

    def unsigned_changes(self) -> list[tuple[str, str]]:
        """``(staff_id, what)`` for each roster member the register holds otherwise than the latest signed version
        lists (``added``, ``changed``, ``missing``): what ``publish`` would sign (every member for a first version)."""
        with reading(self.engine) as conn:
            history = self._history(conn)
            table = self._table(conn)
        signed = history.latest.roster.members if history is not None and history.latest is not None else ()
        return _differences(signed, table)

    def _change(
        self,
        admin_id: str,
        admin_key: SigningKey,
        now_ms: int,
        change: Callable[[Connection], int],
        *,
        what: str,
        staff_id: str | None,
    ) -> Roster | None:
        """Run ``change`` on the register and make, check, store and publish the next version, all in one
        transaction: a refusal anywhere leaves register, roster and trust items as they were. None when the change
        leaves the roster as it was (a member who is not on it); ``publish`` of an unchanged roster is refused.

        Version N+1 is version N as signed plus exactly the change to ``staff_id`` (None: ``publish``, the register
        as it is). When the register's roster members differ from version N other than by this change (rows written
        into the staff table by other means), the change is refused naming them: an admin's signature must never
        carry members the admin did not add (security review, finding 1)."""
        with self.engine.begin() as conn:
            audit_lock(conn)
            history = self._history(conn) or RosterHistory(self.party.party_id)
            admin = self.register.get(admin_id, conn=conn)
            if admin is None or admin.public_key.raw != admin_key.public.raw:
                raise RosterChangeRefused(
                    f"the staff keystore given is not {admin_id[:32]}'s: its signing key is not the key registered "
                    "for that admin"
                )
            previous = history.latest.roster if history.latest is not None else None
            if previous is not None and staff_id is not None:
                _require_signed(previous, self._table(conn))
            effective = change(conn)
            members = self._table(conn)
            if previous is not None and staff_id is not None:
                # Version N as signed, with the one member changed (or added) as the register now holds them.
                changed = [m for m in members if m.staff_id == staff_id]
                members = sorted(
                    [m for m in previous.members if m.staff_id != staff_id] + changed, key=lambda m: m.staff_id
                )
            if previous is not None and tuple(members) == previous.members:
                if what == "publish":
                    raise RosterChangeRefused(f"version {previous.version} lists the register as it is already")
                return None
            try:
                roster = build_roster(
                    previous,
                    party_id=self.party.party_id,
                    members=members,
                    issued_at_ms=now_ms,
                    effective_at_ms=effective,
                    admin_staff_id=admin_id,
                )
                data = sign_roster(roster, self.party.signing_key(now_ms), admin_key)
                signed = history.check(data, keyring=Keyring(self.party.records()), now_ms=now_ms, notice=self.notice)
            except RosterError as exc:
                raise RosterChangeRefused(f"{exc} ({exc.code}); nothing was changed") from exc
            assert signed is not None  # a new version: its issue time is now
            store_version(conn, signed, own=True, now_ms=now_ms)
            self.items.publish(conn, ROSTER_ITEM, signed.data, now_ms, self.units)
            self.audit.append(
                conn,
                at_ms=now_ms,
                actor=admin_id,
                action="roster.version",
                after=f"v{roster.version}",
                detail=f"party={roster.party_id};{what};effective={roster.effective_at_ms};units={len(self.units)}",
            )
        log.info(
            "roster version made and published",
            extra={"version": roster.version, "admin": admin_id, "change": what, "units": len(self.units)},
        )
        return roster

    def signed_versions(self, after: int = 0) -> list[bytes]:
        """SignedRoster bytes of the versions after version ``after`` (for a peer that holds ``after``)."""
        return PeerRosters(self.engine).signed_versions(self.party.party_id, after)


def _differences(signed: Sequence[RosterMember], table: Sequence[RosterMember]) -> list[tuple[str, str]]:
    held = {m.staff_id: m for m in signed}
    now = {m.staff_id: m for m in table}
    out: list[tuple[str, str]] = []
    for staff_id in sorted(held.keys() | now.keys()):
        before, after = held.get(staff_id), now.get(staff_id)
        if before != after:
            out.append((staff_id, "added" if before is None else "missing" if after is None else "changed"))
    return out


def _require_signed(previous: Roster, table: Sequence[RosterMember]) -> None:
    """RosterChangeRefused naming the staff ids whose register rows differ from the signed version ``previous``."""
    differences = _differences(previous.members, table)
    if differences:
        named = ", ".join(f"{staff_id} ({what})" for staff_id, what in differences[:10])
        more = f" and {len(differences) - 10} more" if len(differences) > 10 else ""
        raise RosterChangeRefused(
            f"the staff register differs from the signed roster version {previous.version}: {named}{more}. It was "
            "changed other than by 'hedui-gateway roster'; an operator must look at these rows before any admin "
            "signs the next version ('hedui-gateway roster publish' shows and signs the register as it is); nothing "
            "was changed"
        )


class RosterHandler:
    """The ROSTER trust item handler: ``handler(sender, payload, now_ms) -> None | reason``.

    Verifies the SignedRoster against the history held for the sender (keys/roster.py, with the sender's keys from
    the trust store and the configured notice) and stores it with an audit entry; None when applied or held already,
    the reason code when refused, having changed nothing.
    """

    def __init__(
        self, engine: Engine, *, trust: Callable[[], TrustStore], notice: Callable[[], Notice], own_party_id: str
    ) -> None:
        self.engine = engine
        self.trust = trust
        self.notice = notice
        self.own_party_id = own_party_id
        self.audit = AuditLog(engine)

    def __call__(self, sender: str, payload: bytes, now_ms: int) -> str | None:
        if sender == self.own_party_id:
            return "roster_wrong_party"
        with self.engine.begin() as conn:
            audit_lock(conn)  # two replicas applying the same peer's versions take turns
            notice = self.notice()
            history = load_history(conn, sender, notice=notice) or RosterHistory(sender, notice=notice)
            try:
                signed = history.check(payload, keyring=self.trust().keyring(sender), now_ms=now_ms, notice=notice)
            except RosterError as exc:
                log.warning(
                    "roster refused",
                    extra={"party": sender, "reason": exc.code, "held_version": history.held_version},
                )
                return exc.code
            if signed is None:
                return None
            roster = signed.roster
            store_version(conn, signed, own=False, now_ms=now_ms)
            self.audit.append(
                conn,
                at_ms=now_ms,
                actor=sender,
                action="roster.received",
                after=f"v{roster.version}",
                detail=f"party={sender};effective={roster.effective_at_ms};members={len(roster.members)}",
            )
        log.info(
            "roster version applied",
            extra={"party": sender, "version": roster.version, "effective_at_ms": roster.effective_at_ms},
        )
        return None


class PeerRosters(HeldRosters):
    """The rosters the gateway holds: each unit's history (and its own, for metrics); ``history``, ``held_version``,
    ``signed_versions``, ``parties``, ``pending`` and ``catch_up`` as in common/rosterstore.py.

    ``notice``: the agency's notice rule, by which the members a unit's version adds count from the notice after
    its receipt at the earliest (keys/roster.py, RECEIPT_GRACE_MS); without it, from the receipt.
    """

    def __init__(self, engine: Engine, *, notice: Callable[[], Notice] | None = None) -> None:
        super().__init__(engine, s.rosters, notice=notice)

    def metrics(self, now_ms: int) -> tuple[dict[str, int], dict[str, float]]:
        """For gateway.metrics (RosterReader): versions not yet in force per party, and per unit the seconds since
        the oldest version of our roster it has not acknowledged was published."""
        ages = {
            peer: age_ms / 1000
            for peer, kind, age_ms in TrustItems(self.engine).unacknowledged(now_ms)
            if kind == ROSTER_ITEM
        }
        return self.pending(now_ms), ages

    def own(self) -> RosterHistory | None:
        """The gateway's own roster history; None before its first version."""
        with reading(self.engine) as conn:
            return own_history(conn)

    def handler(
        self, *, trust: Callable[[], TrustStore], notice: Callable[[], Notice], own_party_id: str
    ) -> RosterHandler:
        """The ROSTER trust item handler for the syncer (see :class:`RosterHandler`)."""
        return RosterHandler(self.engine, trust=trust, notice=notice, own_party_id=own_party_id)


#: At most this many staff may be named on one answer set (the connector names up to 8).
MAX_ANSWER_STAFF = 8
#: How far past the gateway's clock (or before the batch's receipt) an answer's time may lie.
ANSWER_TIME_SKEW_MS = 5 * 60 * 1000


@dataclass(frozen=True)
class AnswerStaffVerdict:
    """The gateway's judgement of the staff an answer set names (BatchAnswer.responsible_staff, Procedure V.(二))."""

    staff_ids: tuple[str, ...]
    #: The unit's roster version in force at the answer's time the names were checked against; None: unverified (no
    #: version of the unit's roster in force at that time yet), stored and counted.
    roster_version: int | None = None
    #: Why the answer set is refused (not stored, polled again), or None.
    reason: str | None = None
    #: The staff id the refusal is about.
    staff_id: str = ""


def judge_answer_staff(
    history: RosterHistory | None,
    staff_ids: Sequence[str],
    answered_at_ms: int,
    *,
    now_ms: int,
    received_at_ms: int | None,
) -> AnswerStaffVerdict:
    """Judge the unit staff an answer set names by the unit's roster in force at the answer's time.

    Refused: an answer time in the future or before the unit received the batch (``answer_time_invalid``), no staff
    named although the unit's roster is in force (``answer_staff_missing``), malformed or repeated ids
    (``answer_staff_malformed``), or a name that is not an active exchange member then (``approver_unknown``,
    ``approver_not_yet_effective``, ``approver_expired``, ``approver_revoked``, ``approver_not_exchange_staff``).
    """
    named = tuple(staff_ids)
    if answered_at_ms > now_ms + ANSWER_TIME_SKEW_MS or (
        received_at_ms is not None and answered_at_ms < received_at_ms - ANSWER_TIME_SKEW_MS
    ):
        return AnswerStaffVerdict(named, reason="answer_time_invalid")
    if history is None or history.in_force(answered_at_ms) is None:
        return AnswerStaffVerdict(named)
    roster = history.in_force(answered_at_ms)
    assert roster is not None
    if not named:
        return AnswerStaffVerdict(named, reason="answer_staff_missing")
    well_formed = all(_STAFF_ID_RE.fullmatch(s) for s in named)
    if len(named) > MAX_ANSWER_STAFF or len(set(named)) != len(named) or not well_formed:
        return AnswerStaffVerdict(named, reason="answer_staff_malformed")
    for staff_id in named:
        member, reason = history.member_at(staff_id, answered_at_ms)
        if member is None:
            return AnswerStaffVerdict(named, reason=reason, staff_id=staff_id)
        if not member.has_role("exchange"):
            return AnswerStaffVerdict(named, reason="approver_not_exchange_staff", staff_id=staff_id)
    return AnswerStaffVerdict(named, roster_version=roster.version)
