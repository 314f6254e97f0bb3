"""The agency's staff register (Procedure V): who works on commissions, in which roles, and the Ed25519 key their
exchange approvals are checked with.

Procedure V.(一) has intake, second review and report issue done by three different staff members, V.(二) asks two
staff members for an exchange, and V.(三) has both sides register their exchange staff with each other in advance.
This register is the agency's own list. Only an active admin changes it; the very first admin is bootstrapped into an
empty register (``hedui-gateway staff bootstrap-admin``). Every change is audited in the same transaction
(gateway/archive/audit.py) with the roles as detail, never the name.

A member is *active at* a moment inside [valid_from, valid_until) and before their revocation. Approvals are checked
at the moment the gateway records them (its own clock, not a time the signer claims), so revoking a member stops
their approvals from then on while the approvals they gave earlier stay verifiable at the time they were given.
"""

from __future__ import annotations

import builtins
import dataclasses
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, Row, select, update

from common.db import reading
from common.errors import HeduiError
from gateway.archive.audit import AuditError, AuditLog
from gateway.archive.audit import lock as audit_lock
from gateway.db import schema
from gateway.trust._store import own_history
from keys.fingerprint import Algorithm
from keys.handles import PublicKey
from keys.statements import APPROVAL_DOMAIN, approval_message, staff_public_key

__all__ = [
    "APPROVAL_DOMAIN",
    "BOOTSTRAP_ACTOR",
    "ROLES",
    "StaffError",
    "StaffMember",
    "StaffRegister",
    "approval_message",
]

#: Roles a staff member can hold (Procedure V: intake review, second review, exchange, report issue) and admin, who
#: maintains this register.
ROLES = ("intake", "review", "exchange", "report", "admin")
#: Who registered the first admin (there was nobody to do it).
BOOTSTRAP_ACTOR = "bootstrap"
MAX_NAME_LENGTH = 64
_STAFF_ID_RE = re.compile(r"[A-Za-z0-9-]{1,32}")
_REASON_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")


class StaffError(HeduiError):
    """A change to the staff register was refused (bad input, no permission, unknown or duplicate member)."""

    code = "staff"


@dataclass(frozen=True)
class StaffMember:
    """One registered staff member. The name stays out of ``repr`` so that it cannot slip into a log line."""

    staff_id: str
    name: str = field(repr=False)
    roles: frozenset[str]
    public_key: PublicKey
    valid_from_ms: int
    #: End of validity (exclusive); None while open-ended.
    valid_until_ms: int | None
    registered_by: str
    registered_at_ms: int
    revoked_at_ms: int | None = None

    def active_at(self, at_ms: int) -> bool:
        """True if the member may act at ``at_ms``: inside the validity window and not yet revoked then."""
        if at_ms < self.valid_from_ms:
            return False
        if self.valid_until_ms is not None and at_ms >= self.valid_until_ms:
            return False
        return self.revoked_at_ms is None or at_ms < self.revoked_at_ms

    def has_role(self, role: str) -> bool:
        return role in self.roles

    @property
    def roles_text(self) -> str:
        """The roles in the fixed order of :data:`ROLES`, comma-separated (as stored and audited)."""
        return ",".join(r for r in ROLES if r in self.roles)


def check_staff_id(value: str) -> str:
    """Return ``value`` if it is a well-formed staff id (1-32 of A-Z, a-z, 0-9 and '-', e.g. S-0001)."""
    if not _STAFF_ID_RE.fullmatch(value):
        raise StaffError("staff id must be 1-32 characters of A-Z, a-z, 0-9 and '-', e.g. S-0001")
    return value


def check_roles(roles: Iterable[str]) -> frozenset[str]:
    """The roles as a set (a string is read as a comma-separated list); StaffError for none or an unknown one."""
    result = frozenset(r.strip() for r in roles.split(",")) - {""} if isinstance(roles, str) else frozenset(roles)
    unknown = sorted(result - set(ROLES))
    if unknown:
        raise StaffError(f"unknown role(s) {', '.join(repr(r)[:40] for r in unknown)}; roles are {', '.join(ROLES)}")
    if not result:
        raise StaffError(f"a staff member needs at least one role of {', '.join(ROLES)}")
    return result


def _check_name(name: str) -> str:
    # The name itself is never repeated in an error: it is a person's name.
    if not 0 < len(name.strip()) == len(name) <= MAX_NAME_LENGTH:
        raise StaffError(f"name must be 1-{MAX_NAME_LENGTH} characters without leading or trailing spaces")
    if not name.isprintable():
        raise StaffError("name contains control characters")
    return name


def _check_key(public_key: bytes) -> PublicKey:
    try:
        return staff_public_key(public_key)
    except ValueError as exc:
        raise StaffError(f"public key refused: {exc}") from exc


def _check_window(valid_from_ms: int, valid_until_ms: int | None) -> None:
    if valid_from_ms < 0:
        raise StaffError("valid_from must not be before 1970")
    if valid_until_ms is not None and valid_until_ms <= valid_from_ms:
        raise StaffError("valid_until must be later than valid_from")


def _member(row: Row[Any]) -> StaffMember:
    return StaffMember(
        staff_id=row.staff_id,
        name=row.name,
        roles=frozenset(r for r in row.roles.split(",") if r),
        # Checked when registered; libsodium refuses small-order keys again on every verification.
        public_key=PublicKey(Algorithm.ED25519, bytes(row.public_key)),
        valid_from_ms=row.valid_from_ms,
        valid_until_ms=row.valid_until_ms,
        registered_by=row.registered_by,
        registered_at_ms=row.registered_at_ms,
        revoked_at_ms=row.revoked_at_ms,
    )


class StaffRegister:
    """The staff register in the gateway database; every change goes into ``audit`` in the same transaction."""

    def __init__(self, engine: Engine, audit: AuditLog) -> None:
        self.engine = engine
        self.audit = audit

    # -- reading ---------------------------------------------------------------------------------------------------

    def get(self, staff_id: str, *, conn: Connection | None = None) -> StaffMember | None:
        """The member with ``staff_id`` (revoked and expired ones included), or None.

        Pass ``conn`` when calling inside a transaction of your own: on SQLite every transaction holds the write
        lock from its start (BEGIN IMMEDIATE), so a second connection would wait for the first to finish.
        """
        if conn is not None:
            return self._get(conn, staff_id)
        with reading(self.engine) as own:
            return self._get(own, staff_id)

    def list(self) -> builtins.list[StaffMember]:
        """Every member ever registered, by staff id."""
        with reading(self.engine) as conn:
            rows = conn.execute(select(schema.staff).order_by(schema.staff.c.staff_id)).all()
        return [_member(row) for row in rows]

    def members(self, *, conn: Connection) -> builtins.list[StaffMember]:
        """Every member ever registered, by staff id, read in ``conn``'s transaction."""
        return sorted(self._all(conn), key=lambda m: m.staff_id)

    def active(self, staff_id: str, at_ms: int, *, conn: Connection | None = None) -> StaffMember | None:
        """The member with ``staff_id`` if they are active at ``at_ms``, else None (``conn``: see :meth:`get`)."""
        member = self.get(staff_id, conn=conn)
        return member if member is not None and member.active_at(at_ms) else None

    def verify_approval(
        self,
        staff_id: str,
        digest: bytes,
        signature: bytes,
        at_ms: int,
        *,
        role: str | None = "exchange",
        conn: Connection | None = None,
    ) -> bool:
        """True if ``signature`` is ``staff_id``'s approval of the exchange with ``digest``, made at ``at_ms``.

        The member must be registered, active at ``at_ms`` and (unless ``role`` is None) hold ``role``; the
        signature must verify with their registered key over :func:`approval_message` of ``digest``. Any failure
        is False: the caller records and reports one "approval refused" without saying which check failed.
        Raises ValueError for a digest that is not 32 bytes (a programming error, not a bad approval). Pass
        ``conn`` when the approval is recorded in a transaction of your own (see :meth:`get`).
        """
        message = approval_message(digest)
        member = self.active(staff_id, at_ms, conn=conn) if _STAFF_ID_RE.fullmatch(staff_id) else None
        if member is None or (role is not None and not member.has_role(role)):
            return False
        if not self.on_roster(member, at_ms, conn=conn):
            return False
        return member.public_key.verify(signature, message)

    def on_roster(self, member: StaffMember, at_ms: int, *, conn: Connection | None = None) -> bool:
        """Whether the gateway's own roster, as its peers hold it, agrees that ``member`` may act at ``at_ms``
        (Procedure V.(三)): an active member of the version in force then, with the same key. True while no version
        of the roster is in force yet at ``at_ms`` (before the first one takes effect the register alone decides, as
        it did before rosters existed), so that what the gateway accepts and what a unit verifies never differ once
        there is one."""
        if conn is None:
            with reading(self.engine) as own:
                return self.on_roster(member, at_ms, conn=own)
        history = own_history(conn)
        if history is None or history.in_force(at_ms) is None:
            return True
        listed, _ = history.member_at(member.staff_id, at_ms)
        return listed is not None and listed.public_key.raw == member.public_key.raw

    # -- changing --------------------------------------------------------------------------------------------------

    def bootstrap_admin(
        self,
        staff_id: str,
        *,
        name: str,
        public_key: bytes,
        valid_from_ms: int,
        valid_until_ms: int | None = None,
        now_ms: int,
        roles: Iterable[str] = ("admin",),
    ) -> StaffMember:
        """Register the first admin. Refused unless the register is empty: after that only admins register."""
        member = self._validated(
            staff_id,
            name=name,
            roles=roles,
            public_key=public_key,
            valid_from_ms=valid_from_ms,
            valid_until_ms=valid_until_ms,
            now_ms=now_ms,
            registered_by=BOOTSTRAP_ACTOR,
        )
        if "admin" not in member.roles:
            raise StaffError("the bootstrapped member must hold the admin role")
        with self.engine.begin() as conn:
            audit_lock(conn)  # two bootstraps at once must not both see an empty register
            if conn.execute(select(schema.staff.c.staff_id).limit(1)).first() is not None:
                raise StaffError(
                    "the staff register is not empty: the first admin exists already; "
                    "an admin registers further staff with 'hedui-gateway staff add --admin ADMIN_ID'"
                )
            self._insert(conn, member)
        return member

    def register(
        self,
        actor_admin_id: str,
        staff_id: str,
        *,
        name: str,
        roles: Iterable[str],
        public_key: bytes,
        valid_from_ms: int,
        valid_until_ms: int | None = None,
        now_ms: int,
        conn: Connection | None = None,
    ) -> StaffMember:
        """Register a staff member; ``actor_admin_id`` must be an admin active at ``now_ms``.

        Staff ids are never reused: a member who leaves is revoked, and a successor gets a new id. Raises
        StaffError, with nothing changed, for bad input, a missing permission or a staff id already taken. With
        ``conn`` the change joins that transaction (which must hold the audit lock: gateway/trust/rosters.py makes
        the roster version in the same transaction).
        """
        member = self._validated(
            staff_id,
            name=name,
            roles=roles,
            public_key=public_key,
            valid_from_ms=valid_from_ms,
            valid_until_ms=valid_until_ms,
            now_ms=now_ms,
            registered_by=actor_admin_id,
        )
        # The admin check and the insert must not race a revocation of the admin: under the audit lock.
        with self._transaction(conn) as tx:
            self._require_admin(tx, actor_admin_id, now_ms)
            if self._get(tx, staff_id) is not None:
                raise StaffError(f"staff id {staff_id} is registered already; staff ids are never reused")
            self._insert(tx, member)
        return member

    def revoke(
        self,
        actor_admin_id: str,
        staff_id: str,
        *,
        now_ms: int,
        reason: str,
        at_ms: int | None = None,
        conn: Connection | None = None,
    ) -> StaffMember:
        """Revoke a member from ``at_ms`` (default ``now_ms``, never earlier) on; ``reason`` is a short code such as
        ``left`` or ``key-lost``.

        Refused for an unknown or already revoked member, and for the last active admin (nobody could change
        the register any more: the bootstrap works on an empty register only). ``conn``: see :meth:`register`.
        """
        check_staff_id(staff_id)
        if not _REASON_RE.fullmatch(reason):
            raise StaffError("reason must be a short lower-case code such as left, moved or key-lost")
        revoked_at = now_ms if at_ms is None else at_ms
        if revoked_at < now_ms:
            raise StaffError("a revocation takes effect now or later, never in the past")
        with self._transaction(conn) as tx:
            self._require_admin(tx, actor_admin_id, now_ms)
            member = self._get(tx, staff_id)
            if member is None:
                raise StaffError(f"no staff member {staff_id} in the register")
            if member.revoked_at_ms is not None:
                raise StaffError(f"staff member {staff_id} is revoked already")
            self._keep_an_admin(tx, member, revoked_at)
            tx.execute(update(schema.staff).where(schema.staff.c.staff_id == staff_id).values(revoked_at_ms=revoked_at))
            self.audit.append(
                tx,
                at_ms=now_ms,
                actor=actor_admin_id,
                action="staff.revoke",
                before="active" if member.active_at(now_ms) else "inactive",
                after="revoked",
                detail=f"staff={staff_id};reason={reason}" + (f";at={revoked_at}" if revoked_at != now_ms else ""),
            )
        return dataclasses.replace(member, revoked_at_ms=revoked_at)

    def end(
        self,
        actor_admin_id: str,
        staff_id: str,
        *,
        valid_until_ms: int,
        now_ms: int,
        conn: Connection | None = None,
    ) -> StaffMember:
        """End a member's validity at ``valid_until_ms`` (now or later, and never later than an end already set):
        the member acts until then, not after (a departure announced with notice, Procedure V.(三)). Refused like
        :meth:`revoke`; ``conn``: see :meth:`register`."""
        check_staff_id(staff_id)
        if valid_until_ms < now_ms:
            raise StaffError("a member's validity ends now or later, never in the past")
        with self._transaction(conn) as tx:
            self._require_admin(tx, actor_admin_id, now_ms)
            member = self._get(tx, staff_id)
            if member is None:
                raise StaffError(f"no staff member {staff_id} in the register")
            if member.revoked_at_ms is not None:
                raise StaffError(f"staff member {staff_id} is revoked already")
            if member.valid_until_ms is not None and member.valid_until_ms <= valid_until_ms:
                raise StaffError(f"staff member {staff_id} ends already at or before that time; a window never grows")
            if valid_until_ms <= member.valid_from_ms:
                raise StaffError(f"staff member {staff_id} would end before their validity begins; revoke them")
            self._keep_an_admin(tx, member, valid_until_ms)
            tx.execute(
                update(schema.staff).where(schema.staff.c.staff_id == staff_id).values(valid_until_ms=valid_until_ms)
            )
            self.audit.append(
                tx,
                at_ms=now_ms,
                actor=actor_admin_id,
                action="staff.end",
                before="open" if member.valid_until_ms is None else str(member.valid_until_ms),
                after=str(valid_until_ms),
                detail=f"staff={staff_id}",
            )
        return dataclasses.replace(member, valid_until_ms=valid_until_ms)

    def _keep_an_admin(self, conn: Connection, member: StaffMember, from_ms: int) -> None:
        """StaffError if ``member`` is an admin and no other admin is active at ``from_ms``, when they stop."""
        if not member.has_role("admin"):
            return
        others = [
            m for m in self._all(conn) if m.staff_id != member.staff_id and m.has_role("admin") and m.active_at(from_ms)
        ]
        if not others:
            raise StaffError(f"{member.staff_id} is the last active admin; register another admin first")

    @contextmanager
    def _transaction(self, conn: Connection | None) -> Iterator[Connection]:
        """``conn`` (whose owner holds the audit lock), or a transaction of our own that takes it."""
        if conn is not None:
            audit_lock(conn)  # re-entrant within a transaction
            yield conn
            return
        with self.engine.begin() as own:
            audit_lock(own)
            yield own

    # -- internals -------------------------------------------------------------------------------------------------

    @staticmethod
    def _validated(
        staff_id: str,
        *,
        name: str,
        roles: Iterable[str],
        public_key: bytes,
        valid_from_ms: int,
        valid_until_ms: int | None,
        now_ms: int,
        registered_by: str,
    ) -> StaffMember:
        check_staff_id(staff_id)
        _check_window(valid_from_ms, valid_until_ms)
        return StaffMember(
            staff_id=staff_id,
            name=_check_name(name),
            roles=check_roles(roles),
            public_key=_check_key(public_key),
            valid_from_ms=valid_from_ms,
            valid_until_ms=valid_until_ms,
            registered_by=registered_by,
            registered_at_ms=now_ms,
        )

    @staticmethod
    def _get(conn: Connection, staff_id: str) -> StaffMember | None:
        row = conn.execute(select(schema.staff).where(schema.staff.c.staff_id == staff_id)).first()
        return None if row is None else _member(row)

    @staticmethod
    def _all(conn: Connection) -> builtins.list[StaffMember]:
        return [_member(row) for row in conn.execute(select(schema.staff))]

    def _require_admin(self, conn: Connection, actor_admin_id: str, now_ms: int) -> None:
        admin = self._get(conn, actor_admin_id) if _STAFF_ID_RE.fullmatch(actor_admin_id) else None
        if admin is None or not admin.active_at(now_ms) or not admin.has_role("admin"):
            raise StaffError(
                "only an active admin changes the staff register; "
                f"{actor_admin_id[:32]!r} is not one (see 'hedui-gateway staff list')"
            )

    def _insert(self, conn: Connection, member: StaffMember) -> None:
        # Procedure V.(二) asks for two *distinct* staff members: one key under two staff ids would let one person
        # give both approvals. Keys of revoked members stay taken as well.
        holder = conn.execute(
            select(schema.staff.c.staff_id).where(schema.staff.c.public_key == member.public_key.raw)
        ).first()
        if holder is not None:
            raise StaffError(
                f"this public key is registered for {holder.staff_id} already; every staff member needs a key "
                "of their own ('hedui-keys init' in their own keystore)"
            )
        conn.execute(
            schema.staff.insert().values(
                staff_id=member.staff_id,
                name=member.name,
                roles=member.roles_text,
                public_key=member.public_key.raw,
                valid_from_ms=member.valid_from_ms,
                valid_until_ms=member.valid_until_ms,
                registered_by=member.registered_by,
                registered_at_ms=member.registered_at_ms,
                revoked_at_ms=None,
            )
        )
        try:
            self.audit.append(
                conn,
                at_ms=member.registered_at_ms,
                actor=member.registered_by,
                action="staff.register",
                after="active",
                detail=f"staff={member.staff_id};roles={member.roles_text}",
            )
        except AuditError as exc:  # cannot happen for a checked member; keep the register and the log in step
            raise StaffError(f"the change could not be audited: {exc}") from exc
