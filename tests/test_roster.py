"""keys/roster.py: signed staff rosters (Procedure V.(三)) and the rules for accepting the next version.

Every refusal is a RosterError with its stable reason code, and the history is unchanged after it; a message is
judged by the roster in force when it was made.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hedui.v1 import trust_pb2
from hypothesis import given
from hypothesis import strategies as st

from keys import _canonical
from keys.clock import DAY_MS, HOUR_MS, MAX_TIME_MS, MINUTE_MS, SystemClock
from keys.fingerprint import Algorithm
from keys.handles import SigningKey
from keys.roster import (
    MAX_SIGNED_ROSTER_BYTES,
    RECEIPT_GRACE_MS,
    Notice,
    Roster,
    RosterError,
    RosterHistory,
    RosterMember,
    notice_ends_at,
    read_signed_roster,
)
from tests.exchange_world import beijing_ms
from tests.roster_world import CALENDAR, NOTICE, RosterParty
from tests.test_fuzz_parsers import FUZZ, mutated, only

PARTY = "agency.220100"
#: Monday 2 March 2026, 10:00 Beijing time: an ordinary working day.
MONDAY = beijing_ms(2026, 3, 2)
TUESDAY = beijing_ms(2026, 3, 3)


def _first_two(party: RosterParty) -> tuple[RosterHistory, Roster, Roster]:
    """Version 1 (A admin+exchange, B exchange) accepted on Monday; version 2 (adds C) made on Wednesday."""
    v1 = party.version(
        [party.member("S-0001", ("admin", "exchange"), MONDAY), party.member("S-0002", ("exchange",), MONDAY)],
        issued_at_ms=MONDAY,
    )
    history = RosterHistory(party.party_id)
    assert history.accept(party.sign(v1), keyring=party.keyring(), now_ms=MONDAY, notice=NOTICE)
    wednesday = MONDAY + 2 * DAY_MS
    v2 = party.version(
        [*v1.members, party.member("S-0003", ("exchange",), wednesday)],
        issued_at_ms=wednesday,
    )
    return history, v1, v2


@pytest.fixture
def party() -> RosterParty:
    return RosterParty.create(PARTY, MONDAY)


def _refused(history: RosterHistory, data: bytes, code: str, party: RosterParty, now_ms: int) -> RosterError:
    before = [v.data for v in history.versions]
    with pytest.raises(RosterError) as caught:
        history.accept(data, keyring=party.keyring(), now_ms=now_ms, notice=NOTICE)
    assert caught.value.code == code, str(caught.value)
    assert [v.data for v in history.versions] == before, "a refused version changed the history"
    return caught.value


# -- the notice, in working days ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("issued", "expected"),
    [
        (beijing_ms(2026, 3, 2, 10), beijing_ms(2026, 3, 3, 10)),  # Monday 10:00 -> Tuesday 10:00
        (beijing_ms(2026, 3, 6, 18), beijing_ms(2026, 3, 9, 18)),  # Friday 18:00 -> Monday 18:00
        (beijing_ms(2026, 3, 7, 10), beijing_ms(2026, 3, 10, 0)),  # Saturday -> Tuesday 00:00
        (beijing_ms(2026, 9, 30, 10), beijing_ms(2026, 10, 8, 10)),  # National Day holidays are not counted
        (beijing_ms(2026, 10, 9, 12), beijing_ms(2026, 10, 10, 12)),  # Saturday 10 Oct is an adjusted working day
    ],
)
def test_the_notice_counts_working_day_time_in_beijing(issued: int, expected: int) -> None:
    assert notice_ends_at(issued, 1, CALENDAR) == expected


def test_a_notice_of_zero_days_ends_at_once_and_a_longer_one_later() -> None:
    assert notice_ends_at(MONDAY, 0, CALENDAR) == MONDAY
    assert notice_ends_at(MONDAY, 3, CALENDAR) == beijing_ms(2026, 3, 5)
    with pytest.raises(ValueError, match="working days"):
        Notice(CALENDAR, 21)


# -- accepting versions ---------------------------------------------------------------------------------------------


def test_versions_chain_and_a_message_is_judged_by_the_roster_of_its_day(party: RosterParty) -> None:
    history, v1, v2 = _first_two(party)
    wednesday = v2.issued_at_ms
    assert history.accept(party.sign(v2), keyring=party.keyring(), now_ms=wednesday, notice=NOTICE)
    assert history.held_version == 2
    assert v2.previous_digest == v1.digest
    # Before version 1 took effect nobody was registered with the peer.
    assert history.member_at("S-0001", MONDAY + HOUR_MS) == (None, "approver_unknown")
    member, reason = history.member_at("S-0001", TUESDAY)
    assert reason is None and member is not None and member.has_role("admin")
    # C is listed by version 2, which takes effect a working day after Wednesday 10:00.
    assert history.member_at("S-0003", wednesday + HOUR_MS) == (None, "approver_unknown")
    assert history.member_at("S-0003", wednesday + DAY_MS)[1] is None
    assert [r.version for r in history.pending(wednesday)] == [2]
    assert history.pending(wednesday + DAY_MS) == []


def test_a_version_held_already_is_applied_again_without_change(party: RosterParty) -> None:
    history, v1, _ = _first_two(party)
    assert history.accept(party.sign(v1), keyring=party.keyring(), now_ms=TUESDAY, notice=NOTICE) is False
    assert history.held_version == 1


def test_too_short_a_notice_is_refused(party: RosterParty) -> None:
    history, v1, _ = _first_two(party)
    party.versions.pop()
    wednesday = MONDAY + 2 * DAY_MS
    early = party.version(
        [*v1.members, party.member("S-0003", ("exchange",), wednesday)],
        issued_at_ms=wednesday,
        effective_at_ms=wednesday + 23 * HOUR_MS,
    )
    error = _refused(history, party.sign(early), "roster_notice_too_short", party, wednesday)
    assert "S-0003" in str(error)
    # A longer notice configured at the receiver refuses a version the default would accept.
    party.versions.pop()
    ok = party.version([*v1.members, party.member("S-0003", ("exchange",), wednesday)], issued_at_ms=wednesday)
    with pytest.raises(RosterError, match="2 working day"):
        history.check(party.sign(ok), keyring=party.keyring(), now_ms=wednesday, notice=Notice(CALENDAR, 2))


def test_version_one_needs_the_notice_too(party: RosterParty) -> None:
    v1 = party.version(
        [party.member("S-0001", ("admin",), MONDAY)], issued_at_ms=MONDAY, effective_at_ms=MONDAY + MINUTE_MS
    )
    _refused(RosterHistory(PARTY), party.sign(v1), "roster_notice_too_short", party, MONDAY)


def test_version_one_without_notice_is_signed_by_its_own_admin(party: RosterParty) -> None:
    """With a notice of 0 working days, version 1 takes effect at its issue time: `hedui-connector roster
    init-admin` and the gateway's first `roster add` were refused (roster_not_admin), because the admin was looked up in
    the roster in force at the issue time, which is version 1 itself and was not held yet. Version 1's own admins speak
    for the party whenever nothing is held yet."""
    zero = Notice(CALENDAR, 0)
    v1 = party.version([party.member("S-0001", ("admin",), MONDAY)], issued_at_ms=MONDAY, effective_at_ms=MONDAY)
    history = RosterHistory(PARTY)
    assert history.accept(party.sign(v1), keyring=party.keyring(), now_ms=MONDAY, notice=zero)
    v2 = party.version(
        [*v1.members, party.member("S-0002", ("exchange",), MONDAY + MINUTE_MS)],
        issued_at_ms=MONDAY + MINUTE_MS,
        effective_at_ms=MONDAY + MINUTE_MS,
    )
    assert history.accept(party.sign(v2), keyring=party.keyring(), now_ms=MONDAY + MINUTE_MS, notice=zero)
    # Still only version 1's admins: a member it does not list as an admin cannot sign it.
    other = RosterParty.create(PARTY, MONDAY)
    v1_other = other.version(
        [other.member("S-0001", ("admin",), MONDAY), other.member("S-0002", ("exchange",), MONDAY)],
        issued_at_ms=MONDAY,
        effective_at_ms=MONDAY,
        admin="S-0002",
    )
    with pytest.raises(RosterError) as caught:
        RosterHistory(PARTY).accept(other.sign(v1_other), keyring=other.keyring(), now_ms=MONDAY, notice=zero)
    assert caught.value.code == "roster_not_admin"


def test_ending_or_revoking_members_may_take_effect_at_once(party: RosterParty) -> None:
    history, v1, _ = _first_two(party)
    party.versions.pop()
    noon = TUESDAY + 2 * HOUR_MS
    urgent = party.version(party.changed(v1, "S-0002", revoked_at_ms=noon), issued_at_ms=noon, effective_at_ms=noon)
    assert history.accept(party.sign(urgent), keyring=party.keyring(), now_ms=noon, notice=NOTICE)
    # Judged at creation time: what B signed before the revocation still verifies, nothing after it.
    assert history.member_at("S-0002", noon - MINUTE_MS)[1] is None
    assert history.member_at("S-0002", noon) == (None, "approver_revoked")
    ended = party.version(
        party.changed(urgent, "S-0001", valid_until_ms=noon + DAY_MS), issued_at_ms=noon + 1, effective_at_ms=noon + 1
    )
    assert history.accept(party.sign(ended), keyring=party.keyring(), now_ms=noon + 1, notice=NOTICE)
    assert history.member_at("S-0001", noon + DAY_MS - 1)[1] is None
    assert history.member_at("S-0001", noon + DAY_MS) == (None, "approver_expired")


def test_an_addition_still_waiting_is_not_brought_forward_by_a_later_urgent_version(party: RosterParty) -> None:
    history, _, v2 = _first_two(party)
    wednesday = v2.issued_at_ms
    history.accept(party.sign(v2), keyring=party.keyring(), now_ms=wednesday, notice=NOTICE)
    soon = wednesday + HOUR_MS
    urgent = party.version(party.changed(v2, "S-0002", revoked_at_ms=soon), issued_at_ms=soon, effective_at_ms=soon)
    assert history.accept(party.sign(urgent), keyring=party.keyring(), now_ms=soon, notice=NOTICE)
    assert history.in_force(soon + 1) == urgent
    # Version 3 is in force and lists C, but C counts only from version 2's effective time.
    assert history.member_at("S-0003", soon + 1) == (None, "approver_not_yet_effective")
    assert history.member_at("S-0003", v2.effective_at_ms)[1] is None


def test_an_unsigned_or_forged_version_is_refused(party: RosterParty) -> None:
    history, _, v2 = _first_two(party)
    now = v2.issued_at_ms
    signed = trust_pb2.SignedRoster.FromString(party.sign(v2))
    forged = trust_pb2.SignedRoster()
    forged.CopyFrom(signed)
    forged.signature = bytes(64)
    _refused(history, _canonical.encode(forged), "roster_bad_signature", party, now)
    forged.CopyFrom(signed)
    forged.ClearField("signature")
    _refused(history, _canonical.encode(forged), "roster_malformed", party, now)
    forged.CopyFrom(signed)
    forged.admin_signature = SigningKey.generate().sign(b"hedui.v1.roster-admin\x00" + signed.roster)
    _refused(history, _canonical.encode(forged), "roster_bad_admin_signature", party, now)
    stranger = SigningKey.generate()
    _refused(history, party.sign(v2, party_key=stranger), "roster_untrusted_signer", party, now)
    with pytest.raises(RosterError) as caught:
        history.accept(party.sign(v2), keyring=None, now_ms=now, notice=NOTICE)
    assert caught.value.code == "roster_unknown_party"


def test_a_retired_party_key_cannot_sign_a_backdated_version(party: RosterParty) -> None:
    history, _, v2 = _first_two(party)
    old_key = party.party.signing_key(MONDAY)
    party.party.rotate(Algorithm.ED25519, now_ms=MONDAY + HOUR_MS, overlap_ms=HOUR_MS)
    later = v2.issued_at_ms  # after the old key retired
    _refused(history, party.sign(v2, party_key=old_key), "roster_untrusted_signer", party, later)
    assert history.accept(party.sign(v2), keyring=party.keyring(), now_ms=later, notice=NOTICE)


def test_a_version_signed_by_a_non_admin_is_refused(party: RosterParty) -> None:
    history, v1, _ = _first_two(party)
    party.versions.pop()
    wednesday = MONDAY + 2 * DAY_MS
    by_b = party.version(
        [*v1.members, party.member("S-0003", ("exchange",), wednesday)], issued_at_ms=wednesday, admin="S-0002"
    )
    error = _refused(history, party.sign(by_b), "roster_not_admin", party, wednesday)
    assert "S-0002" in str(error)


def test_an_admin_of_a_version_not_yet_in_force_cannot_sign(party: RosterParty) -> None:
    history, v1, v2 = _first_two(party)
    wednesday = v2.issued_at_ms
    promoted = [*v2.members[:2], party.member("S-0004", ("admin",), wednesday)]
    party.versions.pop()
    v2b = party.version([*v1.members, *promoted[2:]], issued_at_ms=wednesday)
    history.accept(party.sign(v2b), keyring=party.keyring(), now_ms=wednesday, notice=NOTICE)
    v3 = party.version(
        party.changed(v2b, "S-0002", revoked_at_ms=wednesday + MINUTE_MS),
        issued_at_ms=wednesday + MINUTE_MS,
        effective_at_ms=wednesday + MINUTE_MS,
        admin="S-0004",
    )
    _refused(history, party.sign(v3), "roster_not_admin", party, wednesday + MINUTE_MS)


def test_the_first_admins_may_correct_version_one_before_it_takes_effect(party: RosterParty) -> None:
    v1 = party.version([party.member("S-0001", ("admin", "exchange"), MONDAY)], issued_at_ms=MONDAY)
    history = RosterHistory(PARTY)
    history.accept(party.sign(v1), keyring=party.keyring(), now_ms=MONDAY, notice=NOTICE)
    later = MONDAY + HOUR_MS
    v2 = party.version([*v1.members, party.member("S-0002", ("exchange",), later)], issued_at_ms=later)
    assert history.accept(party.sign(v2), keyring=party.keyring(), now_ms=later, notice=NOTICE)


def test_rollback_and_gaps_are_refused(party: RosterParty) -> None:
    history, v1, v2 = _first_two(party)
    wednesday = v2.issued_at_ms
    history.accept(party.sign(v2), keyring=party.keyring(), now_ms=wednesday, notice=NOTICE)
    other_v1 = party.version(
        [party.member("S-0009", ("admin",), MONDAY)], issued_at_ms=MONDAY, admin="S-0009", previous=None
    )
    _refused(history, party.sign(other_v1), "roster_rollback", party, wednesday)
    v3 = party.version(list(v2.members), issued_at_ms=wednesday + 1, previous=v2)
    v4 = party.version(list(v3.members), issued_at_ms=wednesday + 2, previous=v3)
    _refused(history, party.sign(v4), "roster_gap", party, wednesday + 2)
    fork = dataclasses.replace(v3, previous_digest=v1.digest)
    _refused(history, party.sign(fork), "roster_chain_mismatch", party, wednesday + 2)
    fresh = RosterHistory(PARTY)
    _refused(fresh, party.sign(v2), "roster_gap", party, wednesday)


def test_members_are_never_dropped_nor_changed_in_place(party: RosterParty) -> None:
    history, v1, _ = _first_two(party)
    party.versions.pop()
    now = TUESDAY + HOUR_MS
    dropped = party.version(list(v1.members[:1]), issued_at_ms=now, effective_at_ms=now)
    _refused(history, party.sign(dropped), "roster_member_dropped", party, now)
    new_key = SigningKey.generate().public
    for changes in ({"public_key": new_key}, {"roles": ("admin", "exchange")}, {"name": "李四"}):
        changed = party.version(party.changed(v1, "S-0002", **changes), issued_at_ms=now, previous=v1)
        _refused(history, party.sign(changed), "roster_member_changed", party, now)
    ended = party.version(
        party.changed(v1, "S-0002", valid_until_ms=now + DAY_MS), issued_at_ms=now, effective_at_ms=now, previous=v1
    )
    history.accept(party.sign(ended), keyring=party.keyring(), now_ms=now, notice=NOTICE)
    extended = party.version(
        party.changed(ended, "S-0002", valid_until_ms=None), issued_at_ms=now + 1, effective_at_ms=now + DAY_MS * 3
    )
    _refused(history, party.sign(extended), "roster_member_changed", party, now + 1)


def test_bad_times_are_refused(party: RosterParty) -> None:
    history, v1, _ = _first_two(party)
    party.versions.pop()
    now = TUESDAY
    future = party.version(list(v1.members), issued_at_ms=now + HOUR_MS, previous=v1)
    _refused(history, party.sign(future), "roster_time_invalid", party, now)
    backwards = party.version(list(v1.members), issued_at_ms=now, effective_at_ms=now - 1, previous=v1)
    _refused(history, party.sign(backwards), "roster_time_invalid", party, now)
    before_v1 = party.version(list(v1.members), issued_at_ms=MONDAY - 1, effective_at_ms=now, previous=v1)
    _refused(history, party.sign(before_v1), "roster_time_invalid", party, now)
    retroactive = party.version(
        party.changed(v1, "S-0002", revoked_at_ms=MONDAY), issued_at_ms=now, effective_at_ms=now, previous=v1
    )
    _refused(history, party.sign(retroactive), "roster_time_invalid", party, now)
    # A time past the year 9999 is no time at all: the version does not even parse.
    message = trust_pb2.SignedRoster.FromString(party.sign(v1))
    roster = trust_pb2.Roster.FromString(message.roster)
    roster.effective_at_ms = MAX_TIME_MS + 1
    message.roster = _canonical.encode(roster)
    _refused(history, _canonical.encode(message), "roster_malformed", party, now)


def test_a_version_of_another_party_is_refused(party: RosterParty) -> None:
    other = RosterParty.create("unit.220100.tax", MONDAY)
    v1 = other.version([other.member("S-0001", ("admin",), MONDAY)], issued_at_ms=MONDAY)
    _refused(RosterHistory(PARTY), other.sign(v1), "roster_wrong_party", party, MONDAY)


# -- parsing --------------------------------------------------------------------------------------------------------


def test_only_canonical_bounded_rosters_parse(party: RosterParty) -> None:
    v1 = party.version([party.member("S-0001", ("admin",), MONDAY)], issued_at_ms=MONDAY)
    data = party.sign(v1)
    assert read_signed_roster(data).roster == v1
    for bad in (data + b"\x28\x01", data[:-1], b"\x00" * (MAX_SIGNED_ROSTER_BYTES + 1), b""):
        with pytest.raises(RosterError) as caught:
            read_signed_roster(bad)
        assert caught.value.code == "roster_malformed"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"staff_id": "S 1"}, "staff id"),
        ({"name": " 张三"}, "name"),
        ({"name": "张\n三"}, "name"),
        ({"roles": ("exchange", "admin")}, "roles"),
        ({"roles": ("exchange", "owner")}, "roles"),
        ({"roles": ()}, "roles"),
        ({"valid_until_ms": MONDAY}, "valid_until"),
        ({"valid_from_ms": -1}, "valid_from_ms"),
    ],
)
def test_a_malformed_member_is_refused(party: RosterParty, change: dict[str, object], message: str) -> None:
    member = dataclasses.replace(party.member("S-0001", ("admin",), MONDAY), **change)  # type: ignore[arg-type]
    with pytest.raises(RosterError, match=message) as caught:
        party.version([member], issued_at_ms=MONDAY)
    assert caught.value.code == "roster_malformed"


def test_members_sorted_with_distinct_keys_and_an_admin_among_them(party: RosterParty) -> None:
    a = party.member("S-0001", ("admin",), MONDAY)
    b = party.member("S-0002", ("exchange",), MONDAY)
    roster = party.version([b, a], issued_at_ms=MONDAY)
    assert [m.staff_id for m in roster.members] == ["S-0001", "S-0002"]
    with pytest.raises(RosterError, match="share one public key"):
        party.version([a, dataclasses.replace(b, public_key=a.public_key)], issued_at_ms=MONDAY, previous=None)
    with pytest.raises(RosterError, match="sorted"):
        dataclasses.replace(roster, members=(b, a))
    with pytest.raises(RosterError, match="admin_staff_id"):
        party.version([b], issued_at_ms=MONDAY, previous=None)


def test_a_small_order_key_is_not_a_staff_key(party: RosterParty) -> None:
    v1 = party.version([party.member("S-0001", ("admin",), MONDAY)], issued_at_ms=MONDAY)
    message = trust_pb2.SignedRoster.FromString(party.sign(v1))
    roster = trust_pb2.Roster.FromString(message.roster)
    roster.members[0].public_key = bytes(32)  # the identity point: verifies signatures nobody made
    message.roster = _canonical.encode(roster)
    with pytest.raises(RosterError, match="not a valid Ed25519 point"):
        read_signed_roster(_canonical.encode(message))


def test_a_member_name_never_shows_in_repr_or_errors(party: RosterParty) -> None:
    member = party.member("S-0001", ("admin",), MONDAY, name="王秘密")
    assert "王秘密" not in repr(member)
    bad = dataclasses.replace(member, roles=("boss",))
    with pytest.raises(RosterError) as caught:
        bad.check()
    assert "王秘密" not in str(caught.value)


# -- stored histories -----------------------------------------------------------------------------------------------


def test_a_stored_history_loads_and_a_changed_store_is_refused(party: RosterParty) -> None:
    history, _, v2 = _first_two(party)
    history.accept(party.sign(v2), keyring=party.keyring(), now_ms=v2.issued_at_ms, notice=NOTICE)
    stored = [v.data for v in history.versions]
    again = RosterHistory.from_stored(PARTY, stored)
    assert again.held_version == 2
    assert again.member_at("S-0003", v2.effective_at_ms) == history.member_at("S-0003", v2.effective_at_ms)
    with pytest.raises(RosterError):
        RosterHistory.from_stored(PARTY, list(reversed(stored)))
    with pytest.raises(RosterError):
        RosterHistory.from_stored(PARTY, stored[1:])


def test_member_window_before_valid_from_is_not_yet_effective(party: RosterParty) -> None:
    later = TUESDAY + 5 * DAY_MS
    v1 = party.version(
        [party.member("S-0001", ("admin",), MONDAY), party.member("S-0002", ("exchange",), later)],
        issued_at_ms=MONDAY,
    )
    history = RosterHistory(PARTY)
    history.accept(party.sign(v1), keyring=party.keyring(), now_ms=MONDAY, notice=NOTICE)
    assert history.member_at("S-0002", TUESDAY) == (None, "approver_not_yet_effective")
    assert history.member_at("S-0002", later)[1] is None
    assert history.member_at("S-0099", later) == (None, "approver_unknown")
    assert isinstance(history.member_at("S-0002", later)[0], RosterMember)


def test_before_version_one_takes_effect_its_admins_speak_unless_since_revoked(party: RosterParty) -> None:
    members = [
        party.member("S-0001", ("admin",), MONDAY),
        party.member("S-0002", ("admin",), MONDAY),
        party.member("S-0003", ("exchange",), MONDAY),
    ]
    v1 = party.version(members, issued_at_ms=MONDAY)
    history = RosterHistory(PARTY)
    history.accept(party.sign(v1), keyring=party.keyring(), now_ms=MONDAY, notice=NOTICE)
    soon = MONDAY + HOUR_MS
    # An immediate version is in force before version 1 is: its members still count only from version 1's time.
    v2 = party.version(party.changed(v1, "S-0003", revoked_at_ms=soon), issued_at_ms=soon, effective_at_ms=soon)
    assert history.accept(party.sign(v2), keyring=party.keyring(), now_ms=soon, notice=NOTICE)
    assert history.member_at("S-0001", soon + 1) == (None, "approver_not_yet_effective")
    later = soon + MINUTE_MS
    v3 = party.version(
        party.changed(v2, "S-0002", revoked_at_ms=later), issued_at_ms=later, effective_at_ms=later, admin="S-0001"
    )
    assert history.accept(party.sign(v3), keyring=party.keyring(), now_ms=later, notice=NOTICE)
    last = later + MINUTE_MS
    v4 = party.version(
        party.changed(v3, "S-0001", valid_until_ms=TUESDAY + DAY_MS), issued_at_ms=last, effective_at_ms=last,
        admin="S-0002",
    )  # fmt: skip
    _refused(history, party.sign(v4), "roster_not_admin", party, last)  # S-0002 was revoked by version 3


# -- fuzzing: only RosterError, and nothing changed -------------------------------------------------------------------

_FUZZ_PARTY = RosterParty.create(PARTY, MONDAY)
_FUZZ_V1 = _FUZZ_PARTY.version([_FUZZ_PARTY.member("S-0001", ("admin",), MONDAY)], issued_at_ms=MONDAY)
_FUZZ_DATA = _FUZZ_PARTY.sign(_FUZZ_V1)


@FUZZ
@given(st.binary(max_size=512) | st.deferred(lambda: mutated(_FUZZ_DATA)))
def test_a_damaged_roster_raises_only_roster_error_and_changes_nothing(data: bytes) -> None:
    history = RosterHistory(PARTY)
    only(RosterError, lambda: read_signed_roster(data))
    only(RosterError, lambda: history.accept(data, keyring=_FUZZ_PARTY.keyring(), now_ms=MONDAY, notice=NOTICE))
    if data != _FUZZ_DATA:
        assert history.held_version == 0 or history.versions[0].roster == _FUZZ_V1


# -- security review of issue 11: backdated versions (finding 2), versions that change nothing (finding 7) -----------

FRIDAY = beijing_ms(2026, 3, 6, 15)


def _backdated(party: RosterParty) -> tuple[RosterHistory, list[bytes]]:
    """Version 1 received on Monday; versions 2 (adds S-0003) and 3 (revokes S-0002 from Monday) both made and
    received on Friday 15:00 but stating Monday as their issue time (and their effect as of Monday/Tuesday)."""
    v1 = party.version(
        [party.member("S-0001", ("admin", "exchange"), MONDAY), party.member("S-0002", ("exchange",), MONDAY)],
        issued_at_ms=MONDAY,
    )
    history = RosterHistory(party.party_id)
    data = [party.sign(v1)]
    assert history.accept(data[0], keyring=party.keyring(), now_ms=MONDAY, notice=NOTICE)
    v2 = party.version(
        [*v1.members, party.member("S-0003", ("exchange",), v1.effective_at_ms)],
        issued_at_ms=MONDAY,
        effective_at_ms=v1.effective_at_ms,
    )
    v3 = party.version(party.changed(v2, "S-0002", revoked_at_ms=MONDAY), issued_at_ms=MONDAY, effective_at_ms=MONDAY)
    for version in (v2, v3):
        data.append(party.sign(version))
        # Taken although it arrives days late: a refused version would block every later one as a gap.
        assert history.accept(data[-1], keyring=party.keyring(), now_ms=FRIDAY, notice=NOTICE)
    return history, data


def test_a_backdated_addition_counts_from_the_notice_after_its_receipt(party: RosterParty) -> None:
    history, _ = _backdated(party)
    wednesday = MONDAY + 2 * DAY_MS
    begins = notice_ends_at(FRIDAY - RECEIPT_GRACE_MS, 1, CALENDAR)
    assert history.member_at("S-0003", wednesday) == (None, "approver_not_yet_effective")  # before it existed
    assert history.member_at("S-0003", FRIDAY) == (None, "approver_not_yet_effective")  # notice not dodged
    assert history.member_at("S-0003", begins - 1) == (None, "approver_not_yet_effective")
    assert history.member_at("S-0003", begins)[1] is None
    assert history.listed_since("S-0003") == begins and history.status("S-0003", FRIDAY) == "pending"


def test_a_backdated_revocation_cannot_disown_earlier_signatures(party: RosterParty) -> None:
    history, _ = _backdated(party)
    wednesday = MONDAY + 2 * DAY_MS
    floor = FRIDAY - RECEIPT_GRACE_MS
    assert history.member_at("S-0002", wednesday)[1] is None  # what S-0002 signed on Wednesday still stands
    assert history.member_at("S-0002", floor - 1)[1] is None
    assert history.member_at("S-0002", floor) == (None, "approver_revoked")
    assert history.status("S-0002", FRIDAY) == "revoked"


def test_the_judgement_survives_a_reload_with_the_receipt_times(party: RosterParty) -> None:
    history, data = _backdated(party)
    again = RosterHistory.from_stored(PARTY, [(data[0], MONDAY), (data[1], FRIDAY), (data[2], FRIDAY)], notice=NOTICE)
    for staff_id in ("S-0001", "S-0002", "S-0003"):
        for at in (MONDAY + 2 * DAY_MS, FRIDAY - RECEIPT_GRACE_MS, FRIDAY, FRIDAY + 4 * DAY_MS):
            assert again.member_at(staff_id, at) == history.member_at(staff_id, at)
    # Without receipt times (one's own roster) a version counts from its issue: the times as stated.
    own = RosterHistory.from_stored(PARTY, data)
    assert own.member_at("S-0002", MONDAY + 2 * DAY_MS) == (None, "approver_revoked")


def test_an_honest_late_version_is_taken_and_its_members_count_later(party: RosterParty) -> None:
    history, _, v2 = _first_two(party)
    late = v2.issued_at_ms + 6 * HOUR_MS  # the unit was unreachable for six hours
    assert history.accept(party.sign(v2), keyring=party.keyring(), now_ms=late, notice=NOTICE)
    begins = notice_ends_at(late - RECEIPT_GRACE_MS, 1, CALENDAR)
    assert begins > v2.effective_at_ms
    assert history.member_at("S-0003", v2.effective_at_ms)[1] == "approver_not_yet_effective"
    assert history.member_at("S-0003", begins)[1] is None
    # Delivered within the grace: judged exactly as stated.
    other = RosterParty.create(PARTY, MONDAY)
    timely, _, v2b = _first_two(other)
    soon = v2b.issued_at_ms + RECEIPT_GRACE_MS
    assert timely.accept(other.sign(v2b), keyring=other.keyring(), now_ms=soon, notice=NOTICE)
    assert timely.member_at("S-0003", v2b.effective_at_ms)[1] is None


def test_a_version_that_changes_nothing_is_refused(party: RosterParty) -> None:
    history, v1, _ = _first_two(party)
    party.versions.pop()
    same = party.version(list(v1.members), issued_at_ms=TUESDAY, effective_at_ms=TUESDAY)
    with pytest.raises(RosterError) as caught:
        history.accept(party.sign(same), keyring=party.keyring(), now_ms=TUESDAY, notice=NOTICE)
    assert caught.value.code == "roster_unchanged" and history.held_version == 1


def test_a_staff_bundle_is_read_only_with_its_key_letter_fingerprint(tmp_path: Path) -> None:
    """Review finding 9: keys/staffkeys.read_staff_bundle requires the fingerprint (both CLIs' ``roster add``)."""
    from keys.errors import TrustError  # noqa: PLC0415
    from keys.staffkeys import read_staff_bundle  # noqa: PLC0415
    from tests.test_staff import Keystore  # noqa: PLC0415

    person = Keystore(tmp_path, "staff.220100.s-0009")
    now = SystemClock().now_ms()
    for missing in (None, "", "  "):
        with pytest.raises(TrustError, match="--fingerprint"):
            read_staff_bundle(person.bundle, fingerprint=missing, now_ms=now)
