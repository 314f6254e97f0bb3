"""Staff rosters: each party's exchange staff, registered with its peers in advance (Procedure V.(三)).

A roster version (trust.proto ``Roster``) is the complete list of a party's exchange staff from its effective time
on: staff id, name, roles, Ed25519 public key, validity window and revocation. Versions count 1, 2, 3 ... and chain
by digest; a member once listed stays listed (ended or revoked), so that an old message can still be judged by the
roster of its day. Every version is signed twice (``SignedRoster``):

* by the party's signing key:   Ed25519 over ``"hedui.v1.roster" || 0x00 || Roster bytes``;
* by the admin who made it:     Ed25519 over ``"hedui.v1.roster-admin" || 0x00 || Roster bytes``, with the staff key
  the roster in force at the version's issue time lists for ``admin_staff_id`` (version 1: the one it lists itself).

:class:`RosterHistory` owns the rules for accepting a new version (docs/exchange.md, "Rosters"): one place that
refuses rollback, gaps, forks, unsigned or under-signed versions, changes without the notice Procedure V.(三) asks
for, dropped members and members changed in place, each refusal a :class:`RosterError` with a stable reason code;
and it answers who was a member, in which state, at any moment (:meth:`RosterHistory.member_at`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from hedui.v1 import trust_pb2

from common.workdays import CHINA_TZ, WorkdayCalendar
from keys import _canonical
from keys.clock import DAY_MS, HOUR_MS, MINUTE_MS, check_time_ms
from keys.errors import TrustError
from keys.fingerprint import KEY_ID_BYTES, Algorithm
from keys.handles import PublicKey, SigningKey
from keys.keyring import Keyring
from keys.party import is_party_id
from keys.statements import staff_public_key
from keys.truststore import TrustStore

ROSTER_DOMAIN = b"hedui.v1.roster\x00"
ROSTER_ADMIN_DOMAIN = b"hedui.v1.roster-admin\x00"
#: A SignedRoster larger than this is refused before it is parsed (a roster of MAX_MEMBERS is about 80 KiB).
MAX_SIGNED_ROSTER_BYTES = 256 * 1024
MAX_MEMBERS = 500
#: The roles a member may hold, in the order a roster lists them (sorted).
ROLES = ("admin", "exchange", "intake", "report", "review")
MAX_NAME_LENGTH = 64
#: Procedure V.(三): changes are reported in advance; the default notice, in working days (configurable per party).
DEFAULT_NOTICE_WORKING_DAYS = 1
MAX_NOTICE_WORKING_DAYS = 20
#: How far in the receiver's future a version's issued_at may lie (clocks of two parties differ).
ISSUED_AT_SKEW_MS = 5 * MINUTE_MS
#: How far after its issue a version may take effect.
MAX_LEAD_MS = 366 * DAY_MS
#: How long a version may take from its sender to the receiver and still be judged by the times it states. A peer
#: delivers versions within its TrustSync interval (minutes); the receiver judges a version by when it RECEIVED it,
#: less this grace, never by the sender-written issue time alone: members it adds count from the notice counted from
#: (received - GRACE) at the earliest, and an end or revocation it sets counts from (received - GRACE) at the
#: earliest. So a version cannot be backdated past the notice nor disown what a member signed before it existed
#: (docs/exchange.md, "Rosters"). A version delivered later than this is still taken (refusing it would block every
#: later version as a gap); its additions simply count later than the sender asked.
RECEIPT_GRACE_MS = HOUR_MS
SIGNATURE_BYTES = 64
DIGEST_BYTES = 32
_STAFF_ID_RE = re.compile(r"[A-Za-z0-9-]{1,32}")

# Reason codes of member_at (the roster judges a staff member's signature made at a moment).
APPROVER_UNKNOWN = "approver_unknown"
APPROVER_NOT_YET_EFFECTIVE = "approver_not_yet_effective"
APPROVER_EXPIRED = "approver_expired"
APPROVER_REVOKED = "approver_revoked"
MEMBER_REASONS = (APPROVER_UNKNOWN, APPROVER_NOT_YET_EFFECTIVE, APPROVER_EXPIRED, APPROVER_REVOKED)

#: Reason codes of a refused version, in the order the checks run (docs/exchange.md, "Rosters").
REFUSALS = (
    "roster_malformed",
    "roster_wrong_party",
    "roster_unknown_party",
    "roster_untrusted_signer",
    "roster_bad_signature",
    "roster_rollback",
    "roster_gap",
    "roster_chain_mismatch",
    "roster_time_invalid",
    "roster_member_dropped",
    "roster_member_changed",
    "roster_unchanged",
    "roster_not_admin",
    "roster_bad_admin_signature",
    "roster_notice_too_short",
)


class RosterError(TrustError):
    """A roster version was refused (or cannot be built); ``code`` is one of :data:`REFUSALS`. Nothing changed.

    Messages name staff ids, versions and times, never a member's name.
    """

    code = "roster_malformed"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# -- the project's types ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RosterMember:
    """One member as a roster lists them. The name stays out of ``repr``: it must not slip into a log line."""

    staff_id: str
    name: str = field(repr=False)
    #: Sorted, distinct, from :data:`ROLES`.
    roles: tuple[str, ...]
    public_key: PublicKey
    valid_from_ms: int
    #: End of validity (exclusive); None while open-ended.
    valid_until_ms: int | None = None
    #: Signatures made at or after this moment are refused; None while not revoked.
    revoked_at_ms: int | None = None

    def has_role(self, role: str) -> bool:
        return role in self.roles

    def state_at(self, at_ms: int) -> str | None:
        """None if the member's own window holds ``at_ms`` and they were not revoked by then, else the reason."""
        if self.revoked_at_ms is not None and self.revoked_at_ms <= at_ms:
            return APPROVER_REVOKED
        if at_ms < self.valid_from_ms:
            return APPROVER_NOT_YET_EFFECTIVE
        if self.valid_until_ms is not None and at_ms >= self.valid_until_ms:
            return APPROVER_EXPIRED
        return None

    def to_proto(self) -> trust_pb2.RosterMember:
        return trust_pb2.RosterMember(
            staff_id=self.staff_id,
            name=self.name,
            roles=list(self.roles),
            public_key=self.public_key.raw,
            valid_from_ms=self.valid_from_ms,
            valid_until_ms=self.valid_until_ms or 0,
            revoked_at_ms=self.revoked_at_ms or 0,
        )

    @classmethod
    def from_proto(cls, msg: trust_pb2.RosterMember) -> RosterMember:
        """Validate and convert; raises RosterError (roster_malformed) naming what is wrong."""
        member = cls(
            staff_id=msg.staff_id,
            name=msg.name,
            roles=tuple(msg.roles),
            public_key=_public_key(bytes(msg.public_key), msg.staff_id),
            valid_from_ms=msg.valid_from_ms,
            valid_until_ms=msg.valid_until_ms or None,
            revoked_at_ms=msg.revoked_at_ms or None,
        )
        member.check()
        return member

    def check(self) -> None:
        """RosterError (roster_malformed) unless every field is well formed."""
        if not _STAFF_ID_RE.fullmatch(self.staff_id):
            raise _malformed("a staff id must be 1-32 characters of A-Z, a-z, 0-9 and '-'")
        who = f"member {self.staff_id}"
        if not 0 < len(self.name.strip()) == len(self.name) <= MAX_NAME_LENGTH or not self.name.isprintable():
            raise _malformed(f"{who}: the name must be 1-{MAX_NAME_LENGTH} printable characters, no outer spaces")
        if not self.roles or list(self.roles) != sorted(set(self.roles)) or not set(self.roles) <= set(ROLES):
            raise _malformed(f"{who}: roles must be sorted, distinct and from {', '.join(ROLES)}")
        if self.public_key.algorithm is not Algorithm.ED25519:
            raise _malformed(f"{who}: the key must be an Ed25519 key")
        _time(self.valid_from_ms, f"{who} valid_from_ms")
        if self.valid_until_ms is not None and _time(self.valid_until_ms, f"{who} valid_until_ms") <= (
            self.valid_from_ms
        ):
            raise _malformed(f"{who}: valid_until must be later than valid_from")
        if self.revoked_at_ms is not None:
            _time(self.revoked_at_ms, f"{who} revoked_at_ms")


def _public_key(raw: bytes, staff_id: str) -> PublicKey:
    try:
        return staff_public_key(raw)
    except ValueError as exc:
        raise _malformed(f"member {staff_id[:32]}: {exc}") from exc


def _malformed(message: str) -> RosterError:
    return RosterError("roster_malformed", f"not a valid roster: {message}")


def _time(ms: int, what: str) -> int:
    try:
        return check_time_ms(ms, what)
    except ValueError as exc:
        raise _malformed(str(exc)) from exc


@dataclass(frozen=True)
class Roster:
    """One roster version: the complete list of a party's exchange staff from ``effective_at_ms`` on."""

    party_id: str
    version: int
    #: SHA-256 of the previous version's Roster bytes; empty for version 1.
    previous_digest: bytes
    issued_at_ms: int
    effective_at_ms: int
    #: Sorted by staff id; distinct staff ids and distinct keys.
    members: tuple[RosterMember, ...]
    admin_staff_id: str

    def __post_init__(self) -> None:
        if not is_party_id(self.party_id):
            raise _malformed("party_id is not a party id")
        if not 1 <= self.version < 2**63:
            raise _malformed("version counts from 1")
        if len(self.previous_digest) != (0 if self.version == 1 else DIGEST_BYTES):
            raise _malformed("previous_digest is empty for version 1 and a SHA-256 (32 bytes) after it")
        _time(self.issued_at_ms, "issued_at_ms")
        _time(self.effective_at_ms, "effective_at_ms")
        if not 0 < len(self.members) <= MAX_MEMBERS:
            raise _malformed(f"a roster lists 1 to {MAX_MEMBERS} members")
        ids = [m.staff_id for m in self.members]
        if ids != sorted(set(ids)):
            raise _malformed("members must be sorted by staff id, each listed once")
        if len({m.public_key.raw for m in self.members}) != len(self.members):
            # Procedure V.(二): two distinct people; one key under two ids would let one person sign twice.
            raise _malformed("two members share one public key")
        for member in self.members:
            member.check()
        if self.member(self.admin_staff_id) is None:
            raise _malformed("admin_staff_id names no member of this roster")

    def member(self, staff_id: str) -> RosterMember | None:
        return next((m for m in self.members if m.staff_id == staff_id), None)

    def to_proto(self) -> trust_pb2.Roster:
        return trust_pb2.Roster(
            party_id=self.party_id,
            version=self.version,
            previous_digest=self.previous_digest,
            issued_at_ms=self.issued_at_ms,
            effective_at_ms=self.effective_at_ms,
            members=[m.to_proto() for m in self.members],
            admin_staff_id=self.admin_staff_id,
        )

    def encode(self) -> bytes:
        """The canonical Roster bytes, as signed and chained."""
        return _canonical.encode(self.to_proto())

    @property
    def digest(self) -> bytes:
        """SHA-256 of the canonical Roster bytes: the next version's previous_digest."""
        return hashlib.sha256(self.encode()).digest()

    @classmethod
    def from_proto(cls, msg: trust_pb2.Roster) -> Roster:
        return cls(
            party_id=msg.party_id,
            version=msg.version,
            previous_digest=bytes(msg.previous_digest),
            issued_at_ms=msg.issued_at_ms,
            effective_at_ms=msg.effective_at_ms,
            members=tuple(RosterMember.from_proto(m) for m in msg.members),
            admin_staff_id=msg.admin_staff_id,
        )


@dataclass(frozen=True)
class SignedRoster:
    """A parsed SignedRoster, structure checked, signatures not yet (:class:`RosterHistory` checks them)."""

    roster: Roster
    #: The canonical Roster bytes both signatures cover.
    roster_bytes: bytes
    signer_key_id: bytes
    signature: bytes
    admin_signature: bytes
    #: The canonical SignedRoster bytes (what travels as a ROSTER trust item and what is stored).
    data: bytes

    @property
    def digest(self) -> bytes:
        """SHA-256 of the Roster bytes (what the next version chains to)."""
        return hashlib.sha256(self.roster_bytes).digest()

    @property
    def item_sha256(self) -> bytes:
        """SHA-256 of the SignedRoster bytes (the trust item's digest a receipt names)."""
        return hashlib.sha256(self.data).digest()


def read_signed_roster(data: bytes) -> SignedRoster:
    """Parse SignedRoster bytes: canonical only, bounded in size, every field checked; RosterError otherwise."""
    if len(data) > MAX_SIGNED_ROSTER_BYTES:
        raise _malformed(f"larger than {MAX_SIGNED_ROSTER_BYTES} bytes")
    try:
        signed = _canonical.parse_canonical(trust_pb2.SignedRoster, bytes(data))
        message = _canonical.parse_canonical(trust_pb2.Roster, signed.roster)
    except _canonical.NotCanonical as exc:
        raise _malformed(str(exc)) from exc
    if len(signed.signer_key_id) != KEY_ID_BYTES:
        raise _malformed(f"signer_key_id is {KEY_ID_BYTES} bytes")
    if len(signed.signature) != SIGNATURE_BYTES or len(signed.admin_signature) != SIGNATURE_BYTES:
        raise _malformed(f"both signatures are {SIGNATURE_BYTES} bytes")
    return SignedRoster(
        roster=Roster.from_proto(message),
        roster_bytes=bytes(signed.roster),
        signer_key_id=bytes(signed.signer_key_id),
        signature=bytes(signed.signature),
        admin_signature=bytes(signed.admin_signature),
        data=bytes(data),
    )


def build_roster(
    previous: Roster | None,
    *,
    party_id: str,
    members: Iterable[RosterMember],
    issued_at_ms: int,
    effective_at_ms: int,
    admin_staff_id: str,
) -> Roster:
    """The version after ``previous`` (version 1 when None) listing ``members`` (sorted here); RosterError for a
    roster that could not be parsed back. Whether a peer accepts it is :meth:`RosterHistory.check`'s question."""
    if previous is not None and previous.party_id != party_id:
        raise RosterError("roster_wrong_party", f"the previous version is {previous.party_id}'s, not {party_id}'s")
    return Roster(
        party_id=party_id,
        version=1 if previous is None else previous.version + 1,
        previous_digest=b"" if previous is None else previous.digest,
        issued_at_ms=issued_at_ms,
        effective_at_ms=effective_at_ms,
        members=tuple(sorted(members, key=lambda m: m.staff_id)),
        admin_staff_id=admin_staff_id,
    )


def sign_roster(roster: Roster, party_key: SigningKey, admin_key: SigningKey) -> bytes:
    """Canonical SignedRoster bytes: ``roster`` signed by the party's signing key and by the admin's staff key."""
    body = roster.encode()
    return _canonical.encode(
        trust_pb2.SignedRoster(
            roster=body,
            signer_key_id=party_key.key_id,
            signature=party_key.sign(ROSTER_DOMAIN + body),
            admin_signature=admin_key.sign(ROSTER_ADMIN_DOMAIN + body),
        )
    )


# -- notice in working days ----------------------------------------------------------------------------------------


def _working(calendar: WorkdayCalendar, day: date) -> bool:
    """Whether ``day`` is a working day; in a year without an official schedule, Monday to Friday (provisional,
    as common/workdays.py counts such years)."""
    schedule = calendar.schedules.get(day.year)
    if schedule is None:
        return day.weekday() < 5
    return day in schedule.working_weekends or (day.weekday() < 5 and day not in schedule.holidays)


def notice_ends_at(issued_at_ms: int, working_days: int, calendar: WorkdayCalendar) -> int:
    """The earliest effective time of a change issued at ``issued_at_ms`` with ``working_days`` of notice: the moment
    when ``working_days`` x 24 hours of working-day time (Beijing time, days the calendar counts as working days)
    have passed since the issue. Issued on Monday 10:00 with one working day: Tuesday 10:00; on Friday 18:00:
    Monday 18:00; on Saturday: Tuesday 00:00."""
    if not 0 <= working_days <= MAX_NOTICE_WORKING_DAYS:
        raise ValueError(f"the notice is 0 to {MAX_NOTICE_WORKING_DAYS} working days")
    remaining = working_days * DAY_MS
    moment = issued_at_ms
    while remaining > 0:
        local = datetime.fromtimestamp(moment / 1000, CHINA_TZ)
        day = local.date()
        next_day = datetime(day.year, day.month, day.day, tzinfo=CHINA_TZ) + timedelta(days=1)
        day_end = int(next_day.timestamp() * 1000)
        if _working(calendar, day):
            taken = min(remaining, day_end - moment)
            remaining -= taken
            if remaining == 0:
                return moment + taken
        moment = day_end
    return moment


@dataclass(frozen=True)
class Notice:
    """The notice rule a receiver applies: ``working_days`` counted with ``calendar``."""

    calendar: WorkdayCalendar
    working_days: int = DEFAULT_NOTICE_WORKING_DAYS

    def __post_init__(self) -> None:
        if not 0 <= self.working_days <= MAX_NOTICE_WORKING_DAYS:
            raise ValueError(f"the roster notice is 0 to {MAX_NOTICE_WORKING_DAYS} working days")

    def earliest_effective(self, issued_at_ms: int) -> int:
        return notice_ends_at(issued_at_ms, self.working_days, self.calendar)


def adds_members(previous: Roster | None, roster: Roster) -> list[str]:
    """Staff ids ``roster`` lists that ``previous`` did not (all of them for version 1)."""
    held = set() if previous is None else {m.staff_id for m in previous.members}
    return [m.staff_id for m in roster.members if m.staff_id not in held]


# -- the history and its acceptance rules ----------------------------------------------------------------------------


class RosterHistory:
    """Every version of one party's roster held, oldest first, and the rules for accepting the next one.

    Build it empty (``RosterHistory(party_id)``) or from stored versions (:meth:`from_stored`); :meth:`accept`
    verifies a new version against what is held and appends it, or raises RosterError and changes nothing.

    Each version is judged with the moment the receiver got it (see :data:`RECEIPT_GRACE_MS`); for versions of
    one's own roster that moment is their issue time. ``notice`` is the receiver's notice rule used to count when
    the members a version adds begin (the one :meth:`accept` is given replaces it); without one, members count from
    (received - grace) at the earliest, and the notice is only checked against the stated issue time on accepting.
    """

    def __init__(self, party_id: str, *, notice: Notice | None = None) -> None:
        if not is_party_id(party_id):
            raise ValueError("not a party id")
        self.party_id = party_id
        self.notice = notice
        self._versions: list[SignedRoster] = []
        #: When each version was received (parallel to _versions).
        self._received: list[int] = []
        #: staff id -> when the member counts from: the effective time of the first version that listed them, or
        #: the notice after its receipt (less the grace) when that is later.
        self._listed_since: dict[str, int] = {}
        #: staff id -> the effective time of the first version that listed them (as the party stated it).
        self._stated_since: dict[str, int] = {}
        #: (staff id, "revoked" | "until", the value) -> the earliest moment that end counts from: the receipt (less
        #: the grace) of the first version that set it.
        self._end_floor: dict[tuple[str, str, int], int] = {}

    @classmethod
    def from_stored(
        cls, party_id: str, versions: Iterable[bytes | tuple[bytes, int]], *, notice: Notice | None = None
    ) -> RosterHistory:
        """The history of versions accepted earlier (signatures were checked then; the keys that made them may
        have rotated since). Their order, numbering, party and digest chain are checked again: RosterError
        (roster_chain_mismatch) when the store was changed. Each item is the SignedRoster bytes with the moment
        they were received, or the bytes alone for versions of one's own roster (received when issued)."""
        history = cls(party_id, notice=notice)
        for item in versions:
            data, received = item if isinstance(item, tuple) else (item, None)
            signed = read_signed_roster(data)
            history._require_sequence(signed.roster)
            history._append(signed, signed.roster.issued_at_ms if received is None else received)
        return history

    # -- reading -----------------------------------------------------------------------------------------------

    @property
    def versions(self) -> tuple[SignedRoster, ...]:
        return tuple(self._versions)

    @property
    def latest(self) -> SignedRoster | None:
        return self._versions[-1] if self._versions else None

    @property
    def held_version(self) -> int:
        """The highest version held; 0 for none (TrustSync.peer_roster_version)."""
        return self._versions[-1].roster.version if self._versions else 0

    def in_force(self, at_ms: int) -> Roster | None:
        """The version in force at ``at_ms``: the highest version whose effective time is at or before it."""
        for signed in reversed(self._versions):
            if signed.roster.effective_at_ms <= at_ms:
                return signed.roster
        return None

    def received_at(self, version: int) -> int:
        """When version ``version`` (held) was received."""
        return self._received[version - 1]

    def listed_since(self, staff_id: str) -> int | None:
        """When ``staff_id`` counts from as listed: the version that first listed them took (or takes) effect, or
        the notice after its receipt (less the grace) ended when that is later; None if no version lists them."""
        return self._listed_since.get(staff_id)

    def _judged(self, member: RosterMember) -> RosterMember:
        """``member`` with the end and revocation a version set counted from its receipt (less the grace) at the
        earliest: a version cannot disown what the member signed before it was received."""
        revoked, until = member.revoked_at_ms, member.valid_until_ms
        if revoked is not None:
            revoked = max(revoked, self._end_floor.get((member.staff_id, "revoked", revoked), revoked))
        if until is not None:
            until = max(until, self._end_floor.get((member.staff_id, "until", until), until))
        if (revoked, until) == (member.revoked_at_ms, member.valid_until_ms):
            return member
        return dataclasses.replace(member, revoked_at_ms=revoked, valid_until_ms=until)

    def member_at(self, staff_id: str, at_ms: int) -> tuple[RosterMember | None, str | None]:
        """``(member, None)`` if ``staff_id`` was an active member at ``at_ms``, else ``(None, reason)``.

        Judged by the version in force at ``at_ms`` and the member's own window: not listed there (or no version in
        force yet): approver_unknown; revoked at or before ``at_ms``: approver_revoked; before their valid_from, or
        before the version that first listed them took effect: approver_not_yet_effective; at or after their
        valid_until: approver_expired. A message is judged at the moment it was made, so a member removed later
        still verifies what they signed before. Times a version states count from its receipt less the grace at
        the earliest (:data:`RECEIPT_GRACE_MS`), so a backdated version changes nothing before it was received; the
        member returned carries those judged times.
        """
        return self._member_at(staff_id, at_ms, as_received=True)

    def _member_at(self, staff_id: str, at_ms: int, *, as_received: bool) -> tuple[RosterMember | None, str | None]:
        roster = self.in_force(at_ms)
        listed = roster.member(staff_id) if roster is not None else None
        if listed is None:
            return None, APPROVER_UNKNOWN
        member = self._judged(listed) if as_received else listed
        reason = member.state_at(at_ms)
        since = (self._listed_since if as_received else self._stated_since)[staff_id]
        if reason is None and at_ms < since:
            reason = APPROVER_NOT_YET_EFFECTIVE
        return (member, None) if reason is None else (None, reason)

    def status(self, staff_id: str, at_ms: int) -> str:
        """For operators' listings: ``active``, ``pending`` (announced, not yet in force), ``expired``, ``revoked``
        as the latest version held lists the member at ``at_ms``, or ``unknown`` (never listed)."""
        listed = self.latest.roster.member(staff_id) if self.latest is not None else None
        if listed is None:
            return "unknown"
        member = self._judged(listed)
        if member.revoked_at_ms is not None and member.revoked_at_ms <= at_ms:
            return "revoked"
        if member.valid_until_ms is not None and member.valid_until_ms <= at_ms:
            return "expired"
        return "pending" if max(member.valid_from_ms, self._listed_since[staff_id]) > at_ms else "active"

    def pending(self, now_ms: int) -> list[Roster]:
        """Versions held that are not yet in force at ``now_ms`` (changes announced, waiting for their time)."""
        return [s.roster for s in self._versions if s.roster.effective_at_ms > now_ms]

    # -- accepting ---------------------------------------------------------------------------------------------

    def accept(
        self, data: bytes, *, keyring: Keyring | None, now_ms: int, notice: Notice, received_at_ms: int | None = None
    ) -> bool:
        """Verify SignedRoster ``data`` as the next version and append it: True when appended, False when the very
        same version is held already (a repeated delivery). RosterError, with nothing changed, when refused.
        ``received_at_ms``: when it was received (default ``now_ms``; a version of one's own roster: its issue
        time)."""
        signed = self.check(data, keyring=keyring, now_ms=now_ms, notice=notice)
        if signed is None:
            return False
        self.notice = notice
        self._append(signed, now_ms if received_at_ms is None else received_at_ms)
        return True

    def check(self, data: bytes, *, keyring: Keyring | None, now_ms: int, notice: Notice) -> SignedRoster | None:
        """The checks of :meth:`accept` without appending: the parsed version, or None if held already.

        ``keyring`` holds the party's signing keys (from the trust store for a peer, the party's own keyring for
        one's own roster); None when the party is not known at all. The checks run in the order docs/exchange.md
        gives; the first that fails raises.
        """
        signed = read_signed_roster(data)
        roster = signed.roster
        if roster.party_id != self.party_id:
            raise RosterError(
                "roster_wrong_party", f"the roster is {roster.party_id}'s, not {self.party_id}'s (who sent it)"
            )
        if roster.version <= self.held_version and self._versions[roster.version - 1].data == signed.data:
            return None  # held already: the same bytes were verified when they first came
        self._check_party_signature(signed, keyring, now_ms)
        self._require_sequence(roster)
        previous = self.latest.roster if self.latest is not None else None
        _check_times(previous, roster, now_ms)
        _check_members(previous, roster)
        if previous is not None and roster.members == previous.members:
            # A version must change something: a flood of empty versions would only cost every receiver (finding 7).
            raise RosterError(
                "roster_unchanged", f"version {roster.version} lists the members exactly as version {previous.version}"
            )
        self._check_admin(signed)
        added = adds_members(previous, roster)
        earliest = notice.earliest_effective(roster.issued_at_ms)
        if added and roster.effective_at_ms < earliest:
            # Procedure V.(三): staff are registered in advance. Ending or revoking members may take effect at once.
            raise RosterError(
                "roster_notice_too_short",
                f"version {roster.version} adds {', '.join(added[:5])} and takes effect before the notice of "
                f"{notice.working_days} working day(s) ends ({_iso(earliest)}); only ending or revoking members may "
                "take effect sooner",
            )
        return signed

    def _check_party_signature(self, signed: SignedRoster, keyring: Keyring | None, now_ms: int) -> None:
        if keyring is None:
            raise RosterError("roster_unknown_party", f"no keys of {self.party_id} are held: enrol the party first")
        signer = keyring.get(signed.signer_key_id)
        issued = signed.roster.issued_at_ms
        if signer is None or signer.algorithm is not Algorithm.ED25519:
            raise RosterError("roster_untrusted_signer", f"the roster is not signed by a known key of {self.party_id}")
        # As for key announcements: valid when it says it was made AND the party's signing key now, so a retired
        # (erased, perhaps leaked) key cannot sign backdated versions.
        if not TrustStore._trusted_signer(keyring, signer, issued, now_ms):
            raise RosterError(
                "roster_untrusted_signer",
                f"key {signer.key_id.hex()} of {self.party_id} was not valid at the roster's issue time or is not "
                "the party's signing key now",
            )
        if not signer.public.verify(signed.signature, ROSTER_DOMAIN + signed.roster_bytes):
            raise RosterError("roster_bad_signature", f"the party signature of {self.party_id}'s roster is not valid")

    def _require_sequence(self, roster: Roster) -> None:
        if roster.party_id != self.party_id:
            raise RosterError("roster_wrong_party", f"a version of {roster.party_id} among {self.party_id}'s")
        held = self.held_version
        if roster.version <= held:
            raise RosterError(
                "roster_rollback",
                f"version {roster.version} of {self.party_id} differs from the one held, and version {held} is held "
                "already: older versions are never taken again",
            )
        if roster.version != held + 1:
            raise RosterError(
                "roster_gap", f"version {roster.version} follows version {held + 1}, which is not held: send it first"
            )
        expected = self._versions[-1].digest if self._versions else b""
        if roster.previous_digest != expected:
            raise RosterError(
                "roster_chain_mismatch",
                f"version {roster.version} does not chain to the version {held} held (previous_digest differs)",
            )

    def _check_admin(self, signed: SignedRoster) -> None:
        roster = signed.roster
        admin_id, issued = roster.admin_staff_id, roster.issued_at_ms
        first = self._versions[0].roster if self._versions else roster
        if not self._versions or first.effective_at_ms > issued:
            # Bootstrap: version 1 was not in force yet when this was issued (or this is version 1, which may take
            # effect at its issue time with a notice of 0 days), so its admins speak for the party (their windows
            # may not have begun), unless a version since ended or revoked them.
            listed = first.member(admin_id)
            current = (self._versions[-1].roster if self._versions else roster).member(admin_id)
            ended = current is None or any(
                end is not None and end <= issued for end in (current.revoked_at_ms, current.valid_until_ms)
            )
            if listed is None or ended or not listed.has_role("admin"):
                raise RosterError(
                    "roster_not_admin",
                    f"{admin_id} is not an admin of version 1 of {self.party_id}'s roster at the issue time",
                )
            admin = listed
        else:
            # Who may make the next version is judged by the chain as the party stated it (the party key signs every
            # version too): a version received late must not make the next one a refused gap. Receipt times judge
            # what members sign (member_at).
            member, reason = self._member_at(admin_id, issued, as_received=False)
            if member is None or not member.has_role("admin"):
                judge = self.in_force(issued)
                raise RosterError(
                    "roster_not_admin",
                    f"{admin_id} is not an active admin of the roster in force at the issue time "
                    f"(version {judge.version if judge else 0}: {reason or 'no admin role'})",
                )
            admin = member
        if not admin.public_key.verify(signed.admin_signature, ROSTER_ADMIN_DOMAIN + signed.roster_bytes):
            raise RosterError("roster_bad_admin_signature", f"the admin signature of {admin_id} is not valid")

    def _append(self, signed: SignedRoster, received_at_ms: int) -> None:
        roster = signed.roster
        floor = received_at_ms - RECEIPT_GRACE_MS
        previous = self._versions[-1].roster if self._versions else None
        begins = max(roster.effective_at_ms, floor if self.notice is None else self.notice.earliest_effective(floor))
        for member in roster.members:
            self._listed_since.setdefault(member.staff_id, begins)
            self._stated_since.setdefault(member.staff_id, roster.effective_at_ms)
            old = previous.member(member.staff_id) if previous is not None else None
            for kind, value, before in (
                ("revoked", member.revoked_at_ms, old.revoked_at_ms if old else None),
                ("until", member.valid_until_ms, old.valid_until_ms if old else None),
            ):
                if value is not None and (old is None or value != before):
                    # Set by this version (a new member's own end counts from when the member does anyway).
                    self._end_floor.setdefault((member.staff_id, kind, value), floor)
        self._versions.append(signed)
        self._received.append(received_at_ms)


def _check_times(previous: Roster | None, roster: Roster, now_ms: int) -> None:
    def refuse(message: str) -> RosterError:
        return RosterError("roster_time_invalid", f"version {roster.version}: {message}")

    if roster.issued_at_ms > now_ms + ISSUED_AT_SKEW_MS:
        raise refuse("issued in the future")
    if previous is not None and roster.issued_at_ms < previous.issued_at_ms:
        raise refuse("issued before the version it follows")
    if not roster.issued_at_ms <= roster.effective_at_ms <= roster.issued_at_ms + MAX_LEAD_MS:
        raise refuse("takes effect before its issue, or more than a year after it")


def _check_members(previous: Roster | None, roster: Roster) -> None:
    """Members are never dropped nor changed in place: name, key, roles and valid_from stay; valid_until may only be
    set or brought forward and revoked_at only set, never to a moment before the issue (history is not rewritten)."""
    if previous is None:
        return
    issued = roster.issued_at_ms
    for old in previous.members:
        new = roster.member(old.staff_id)
        who = f"member {old.staff_id}"
        if new is None:
            raise RosterError(
                "roster_member_dropped",
                f"{who} of version {previous.version} is missing: end or revoke members, never drop them",
            )
        if (new.name, new.public_key, new.roles, new.valid_from_ms) != (
            old.name,
            old.public_key,
            old.roles,
            old.valid_from_ms,
        ):
            raise RosterError(
                "roster_member_changed",
                f"{who}: name, key, roles and valid_from never change; register a new staff id (and key) instead",
            )
        if new.revoked_at_ms != old.revoked_at_ms:
            if old.revoked_at_ms is not None:
                raise RosterError("roster_member_changed", f"{who}: a revocation is never undone or moved")
            if new.revoked_at_ms is not None and new.revoked_at_ms < issued:
                raise RosterError("roster_time_invalid", f"{who}: revoked at a moment before the version's issue")
        if new.valid_until_ms != old.valid_until_ms:
            if new.valid_until_ms is None or (
                old.valid_until_ms is not None and new.valid_until_ms > old.valid_until_ms
            ):
                raise RosterError("roster_member_changed", f"{who}: a validity window is never extended")
            if new.valid_until_ms < issued:
                raise RosterError("roster_time_invalid", f"{who}: ended at a moment before the version's issue")


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, CHINA_TZ).strftime("%Y-%m-%d %H:%M Beijing time")
