"""Rosters for tests: a party with its keys, staff with their own keys, and signed versions made as an admin would
make them (keys/roster.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from common.workdays import WorkdayCalendar
from keys.handles import SigningKey
from keys.identity import PartyKeys
from keys.keyring import Keyring
from keys.roster import Notice, Roster, RosterMember, build_roster, notice_ends_at, sign_roster

CALENDAR = WorkdayCalendar()
NOTICE = Notice(CALENDAR, 1)


@dataclass
class RosterParty:
    """A party that writes roster versions: its keys, its staff keys by staff id, and the versions so far."""

    party: PartyKeys
    staff_keys: dict[str, SigningKey] = field(default_factory=dict)
    versions: list[Roster] = field(default_factory=list)

    @classmethod
    def create(cls, party_id: str, now_ms: int) -> RosterParty:
        return cls(PartyKeys.create(party_id, now_ms=now_ms - 1000))

    @property
    def party_id(self) -> str:
        return self.party.party_id

    def keyring(self) -> Keyring:
        return Keyring(self.party.records())

    def member(
        self, staff_id: str, roles: tuple[str, ...], valid_from_ms: int, name: str = "张三", **window: int | None
    ) -> RosterMember:
        """A member with a new key of their own (kept in ``staff_keys``)."""
        key = self.staff_keys.setdefault(staff_id, SigningKey.generate())
        return RosterMember(staff_id, name, tuple(sorted(roles)), key.public, valid_from_ms, **window)

    def version(
        self,
        members: list[RosterMember],
        *,
        issued_at_ms: int,
        effective_at_ms: int | None = None,
        admin: str = "S-0001",
        previous: Roster | bool | None = True,
    ) -> Roster:
        """The next version (``previous`` True: after the last one made here); effective after one working day
        of notice unless given."""
        before = (self.versions[-1] if self.versions else None) if previous is True else previous or None
        effective = notice_ends_at(issued_at_ms, 1, CALENDAR) if effective_at_ms is None else effective_at_ms
        roster = build_roster(
            before,
            party_id=self.party_id,
            members=members,
            issued_at_ms=issued_at_ms,
            effective_at_ms=effective,
            admin_staff_id=admin,
        )
        self.versions.append(roster)
        return roster

    def sign(self, roster: Roster, *, admin: str | None = None, party_key: SigningKey | None = None) -> bytes:
        key = party_key or self.party.signing_key(roster.issued_at_ms)
        return sign_roster(roster, key, self.staff_keys[admin or roster.admin_staff_id])

    def changed(self, roster: Roster, staff_id: str, **changes: object) -> list[RosterMember]:
        """The members of ``roster`` with one member changed."""
        return [dataclasses.replace(m, **changes) if m.staff_id == staff_id else m for m in roster.members]  # type: ignore[arg-type]
