"""Deterministic test vectors of signed staff rosters (docs/exchange.md, "Rosters (Procedure V.(三))").

:func:`build_vectors` returns the document that ``scripts/make_vectors.py`` writes to ``tests/vectors/rosters_v1.json``;
``tests/test_vectors.py`` builds it again, compares the two byte for byte, rebuilds every version's bytes from its
fields with nothing but the protobuf wire rules, verifies the signatures with another Ed25519 implementation, and
replays every refusal against keys/roster.py.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

from hedui.v1 import trust_pb2

from common.workdays import WorkdayCalendar
from keys import _canonical
from keys.clock import HOUR_MS, MINUTE_MS
from keys.handles import SigningKey
from keys.keyring import KeyRecord, Keyring, KeyState
from keys.roster import (
    DEFAULT_NOTICE_WORKING_DAYS,
    ISSUED_AT_SKEW_MS,
    MAX_SIGNED_ROSTER_BYTES,
    ROSTER_ADMIN_DOMAIN,
    ROSTER_DOMAIN,
    Notice,
    Roster,
    RosterError,
    RosterHistory,
    RosterMember,
    build_roster,
    notice_ends_at,
    read_signed_roster,
    sign_roster,
)
from tests import vectorgen as base
from tests.vectorgen import Json
from tests.vectorgen_formats import key_seed

FORMAT = "hedui-roster-v1-test-vectors"
#: The built-in official schedules only, never an operator's file.
CALENDAR = WorkdayCalendar()
PARTY = base.SENDER
PARTY_NOT_BEFORE_MS = base.KEYS_NOT_BEFORE_MS
#: Monday 21 September 2026, 22:13:20 Beijing time (envelope_v1.json's created_at).
V1_ISSUED_MS = base.CREATED_AT_MS
#: Wednesday 23 September 2026, same time.
V2_ISSUED_MS = V1_ISSUED_MS + 2 * 24 * HOUR_MS
#: Thursday 24 September 2026: the Mid-Autumn holidays (25-27 September) follow.
THURSDAY_MS = V1_ISSUED_MS + 3 * 24 * HOUR_MS
STAFF = {
    "S-0001": ("王芳", ("admin", "exchange")),
    "S-0002": ("李强", ("exchange",)),
    "S-0003": ("Ayşe·Zhang", ("exchange", "review")),
}


def staff_key(staff_id: str) -> SigningKey:
    return base.signing_key(key_seed(f"roster/{staff_id}"))


def party_key() -> SigningKey:
    return base.signing_key(base.SENDER_SIGNING_SEED)


def _member(staff_id: str, valid_from_ms: int, **window: int | None) -> RosterMember:
    name, roles = STAFF[staff_id]
    return RosterMember(staff_id, name, roles, staff_key(staff_id).public, valid_from_ms, **window)


def _notice(issued_ms: int) -> int:
    return notice_ends_at(issued_ms, DEFAULT_NOTICE_WORKING_DAYS, CALENDAR)


def _versions() -> tuple[Roster, Roster, Roster]:
    v1 = build_roster(
        None,
        party_id=PARTY,
        members=[_member("S-0001", V1_ISSUED_MS), _member("S-0002", V1_ISSUED_MS)],
        issued_at_ms=V1_ISSUED_MS,
        effective_at_ms=_notice(V1_ISSUED_MS),
        admin_staff_id="S-0001",
    )
    v2 = build_roster(
        v1,
        party_id=PARTY,
        members=[*v1.members, _member("S-0003", _notice(V2_ISSUED_MS))],
        issued_at_ms=V2_ISSUED_MS,
        effective_at_ms=_notice(V2_ISSUED_MS),
        admin_staff_id="S-0001",
    )
    revoked = THURSDAY_MS + HOUR_MS
    v3 = build_roster(
        v2,
        party_id=PARTY,
        members=[dataclasses.replace(m, revoked_at_ms=revoked) if m.staff_id == "S-0002" else m for m in v2.members],
        issued_at_ms=revoked,
        effective_at_ms=revoked,
        admin_staff_id="S-0001",
    )
    return v1, v2, v3


def _signed(roster: Roster, *, admin: str | None = None, key: SigningKey | None = None) -> bytes:
    return sign_roster(roster, key or party_key(), staff_key(admin or roster.admin_staff_id))


def _member_json(member: RosterMember) -> Json:
    return {
        "staff_id": member.staff_id,
        "name": member.name,
        "roles": list(member.roles),
        "public_key": member.public_key.raw.hex(),
        "valid_from_ms": member.valid_from_ms,
        "valid_until_ms": member.valid_until_ms or 0,
        "revoked_at_ms": member.revoked_at_ms or 0,
    }


def _version_json(name: str, description: str, roster: Roster) -> Json:
    data = _signed(roster)
    signed = read_signed_roster(data)
    return {
        "name": name,
        "description": description,
        "roster": {
            "party_id": roster.party_id,
            "version": roster.version,
            "previous_digest": roster.previous_digest.hex(),
            "issued_at_ms": roster.issued_at_ms,
            "effective_at_ms": roster.effective_at_ms,
            "members": [_member_json(m) for m in roster.members],
            "admin_staff_id": roster.admin_staff_id,
        },
        "roster_bytes": signed.roster_bytes.hex(),
        "roster_sha256": signed.digest.hex(),
        "party_signature": signed.signature.hex(),
        "admin_signature": signed.admin_signature.hex(),
        "signer_key_id": signed.signer_key_id.hex(),
        "signed_roster": data.hex(),
        "item_sha256": signed.item_sha256.hex(),
    }


def keyring() -> Keyring:
    """The receiver's view of the party's keys: one active signing key from PARTY_NOT_BEFORE_MS on."""
    return Keyring([KeyRecord(party_key().public, KeyState.ACTIVE, PARTY_NOT_BEFORE_MS)])


def _mutated(data: bytes, change: Callable[[trust_pb2.SignedRoster], None]) -> bytes:
    signed = trust_pb2.SignedRoster.FromString(data)
    change(signed)
    return _canonical.encode(signed)


def _refusals(v1: Roster, v2: Roster) -> list[Json]:
    wednesday = V2_ISSUED_MS
    s3 = _member("S-0003", _notice(wednesday))
    with_c = [*v1.members, s3]

    def v2_like(**changes: object) -> Roster:
        fields: dict[str, object] = {
            "party_id": PARTY,
            "members": with_c,
            "issued_at_ms": wednesday,
            "effective_at_ms": _notice(wednesday),
            "admin_staff_id": "S-0001",
        }
        fields.update(changes)
        return build_roster(v1, **fields)  # type: ignore[arg-type]

    thursday_c = _member("S-0003", THURSDAY_MS + 24 * HOUR_MS)
    stranger = base.signing_key(key_seed("roster/stranger"))
    other_v1 = build_roster(
        None,
        party_id=PARTY,
        members=[_member("S-0002", V1_ISSUED_MS)],
        issued_at_ms=V1_ISSUED_MS,
        effective_at_ms=_notice(V1_ISSUED_MS),
        admin_staff_id="S-0002",
    )
    skipped = build_roster(v2, party_id=PARTY, members=v2.members, issued_at_ms=wednesday + 1,
                           effective_at_ms=wednesday + 1, admin_staff_id="S-0001")  # fmt: skip
    new_key = dataclasses.replace(v1.members[1], public_key=stranger.public)
    new_roles = dataclasses.replace(v1.members[1], roles=("admin", "exchange"))
    wrong_party = dataclasses.replace(v2_like(), party_id="agency.220100")
    cases: list[tuple[str, str, int, list[str], bytes, str]] = [
        ("notice-too-short", "Version 2 adds S-0003 one hour after its issue; the notice is one working day.",
         wednesday, ["v1"], _signed(v2_like(effective_at_ms=wednesday + HOUR_MS)), "roster_notice_too_short"),
        ("notice-over-a-holiday", "Issued on Thursday 24 September 2026 with effect on Friday at the same time: "
         "25-27 September are holidays (Mid-Autumn Festival), so one working day ends on Monday 28 September.",
         THURSDAY_MS, ["v1"],
         _signed(v2_like(members=[*v1.members, thursday_c], issued_at_ms=THURSDAY_MS,
                         effective_at_ms=THURSDAY_MS + 24 * HOUR_MS)),
         "roster_notice_too_short"),
        ("party-signature-invalid", "Version 2 with 64 zero bytes as the party signature.", wednesday, ["v1"],
         _mutated(_signed(v2), lambda s: setattr(s, "signature", bytes(64))), "roster_bad_signature"),
        ("party-signature-missing", "Version 2 without its party signature (unsigned).", wednesday, ["v1"],
         _mutated(_signed(v2), lambda s: s.ClearField("signature")), "roster_malformed"),
        ("signer-not-the-party", "Version 2 signed by a key the receiver does not hold for the party.", wednesday,
         ["v1"], _signed(v2, key=stranger), "roster_untrusted_signer"),
        ("admin-not-an-admin", "Version 2 made and signed by S-0002, who holds no admin role.", wednesday, ["v1"],
         _signed(v2_like(admin_staff_id="S-0002")), "roster_not_admin"),
        ("admin-signature-invalid", "Version 2 with S-0002's signature where S-0001's belongs.", wednesday, ["v1"],
         _signed(v2, admin="S-0002"), "roster_bad_admin_signature"),
        ("rollback", "Another version 1 offered after version 2 is held.", wednesday, ["v1", "v2"],
         _signed(other_v1), "roster_rollback"),
        ("gap", "Version 3 offered while only version 1 is held.", wednesday, ["v1"], _signed(skipped),
         "roster_gap"),
        ("chain-mismatch", "Version 2 whose previous_digest is not SHA-256 of the version 1 held.", wednesday,
         ["v1"], _signed(dataclasses.replace(v2, previous_digest=bytes(32))), "roster_chain_mismatch"),
        ("member-dropped", "Version 2 without S-0002 (members are ended or revoked, never dropped).", wednesday,
         ["v1"], _signed(v2_like(members=[v1.members[0], s3])), "roster_member_dropped"),
        ("member-key-changed", "Version 2 giving S-0002 another key (a new key is a new staff id).", wednesday,
         ["v1"], _signed(v2_like(members=[v1.members[0], new_key, s3])), "roster_member_changed"),
        ("member-roles-changed", "Version 2 making S-0002 an admin in place.", wednesday, ["v1"],
         _signed(v2_like(members=[v1.members[0], new_roles, s3])), "roster_member_changed"),
        ("unchanged", "Version 2 listing version 1's members exactly as they were (a version changes something).",
         wednesday, ["v1"], _signed(v2_like(members=v1.members)), "roster_unchanged"),
        ("issued-in-the-future", "Version 2 issued one hour after the receiver's now (more than the skew).",
         wednesday - HOUR_MS, ["v1"], _signed(v2), "roster_time_invalid"),
        ("effective-before-issue", "Version 2 taking effect a minute before its issue.", wednesday, ["v1"],
         _signed(v2_like(effective_at_ms=wednesday - MINUTE_MS)), "roster_time_invalid"),
        ("not-canonical", "Version 2 followed by an unknown field 5 = 1 (28 01).", wednesday, ["v1"],
         _signed(v2) + b"\x28\x01", "roster_malformed"),
        ("wrong-party", "A version 2 naming agency.220100, received from agency.220000.", wednesday, ["v1"],
         _signed(wrong_party), "roster_wrong_party"),
    ]  # fmt: skip
    return [
        {
            "name": name,
            "description": description,
            "held": held,
            "now_ms": now,
            "notice_working_days": DEFAULT_NOTICE_WORKING_DAYS,
            "signed_roster": data.hex(),
            "code": code,
        }
        for name, description, now, held, data, code in cases
    ]


def _member_at(v1: Roster, v2: Roster, v3: Roster) -> list[Json]:
    history = RosterHistory(PARTY)
    for roster in (v1, v2, v3):
        history.accept(_signed(roster), keyring=keyring(), now_ms=roster.issued_at_ms, notice=Notice(CALENDAR))
    checks = [
        ("S-0001", v1.effective_at_ms - 1), ("S-0001", v1.effective_at_ms), ("S-0003", v2.issued_at_ms),
        ("S-0003", v2.effective_at_ms), ("S-0002", v3.effective_at_ms - 1), ("S-0002", v3.effective_at_ms),
        ("S-0009", v2.effective_at_ms),
    ]  # fmt: skip
    out = []
    for staff_id, at in checks:
        member, reason = history.member_at(staff_id, at)
        in_force = history.in_force(at)
        out.append(
            {
                "staff_id": staff_id,
                "at_ms": at,
                "version_in_force": in_force.version if in_force else 0,
                "active": member is not None,
                "reason": reason,
            }
        )
    return out


def build_vectors() -> Json:
    """The whole vector document, as written to tests/vectors/rosters_v1.json."""
    v1, v2, v3 = _versions()
    for check in (v1, v2, v3):  # the generator's own output must be accepted by the reference implementation
        assert read_signed_roster(_signed(check)).roster == check
    try:
        _member_at(v1, v2, v3)
    except RosterError as exc:  # pragma: no cover - a broken generator
        raise AssertionError(str(exc)) from exc
    return {
        "format": FORMAT,
        "specification": "docs/exchange.md, section 'Rosters (Procedure V.(三))'",
        "regenerate": "python scripts/make_vectors.py",
        "conventions": [
            "Byte strings are lower-case hex; times are milliseconds since the epoch (UTC); names are UTF-8.",
            "The party's signing key is envelope_v1.json's sender signing key; staff keys are made from the seed "
            "SHAKE-256('hedui.v1.test-vector-key' || 0x00 || 'roster/' || staff_id), 32 bytes.",
            "versions: 'roster_bytes' is the canonical Roster of 'roster'; 'party_signature' is Ed25519 by the "
            "party key over roster_domain || roster_bytes, 'admin_signature' Ed25519 by admin_staff_id's key over "
            "roster_admin_domain || roster_bytes; 'signed_roster' is the canonical SignedRoster; 'roster_sha256' "
            "is what the next version's previous_digest holds; 'item_sha256' is SHA-256 of signed_roster (the "
            "trust item's digest).",
            "member_at: after v1, v2 and v3 are accepted, who was an active member at 'at_ms', or the reason not.",
            "refusals: the receiver holds the versions named in 'held' (accepted in order, each at its issue "
            "time), with the party key valid from party.not_before_ms and the built-in working-day calendar; at "
            "'now_ms' it refuses 'signed_roster' with reason 'code' and holds what it held before.",
        ],
        "constants": {
            "roster_domain": ROSTER_DOMAIN.hex(),
            "roster_admin_domain": ROSTER_ADMIN_DOMAIN.hex(),
            "notice_working_days": DEFAULT_NOTICE_WORKING_DAYS,
            "issued_at_skew_ms": ISSUED_AT_SKEW_MS,
            "max_signed_roster_bytes": MAX_SIGNED_ROSTER_BYTES,
        },
        "party": {
            "party_id": PARTY,
            "signing_seed": base.SENDER_SIGNING_SEED.hex(),
            "public": party_key().public.raw.hex(),
            "key_id": party_key().key_id.hex(),
            "not_before_ms": PARTY_NOT_BEFORE_MS,
        },
        "staff": [
            {
                "staff_id": staff_id,
                "seed": key_seed(f"roster/{staff_id}").hex(),
                "public": staff_key(staff_id).public.raw.hex(),
            }
            for staff_id in sorted(STAFF)
        ],
        "versions": [
            _version_json(
                "v1",
                "The first version: S-0001 (admin, exchange) and S-0002 (exchange), in force one "
                "working day after its issue.",
                v1,
            ),
            _version_json("v2", "Adds S-0003 with one working day of notice; chains to v1.", v2),
            _version_json("v3", "Revokes S-0002 at once (a change that only ends or revokes needs no notice).", v3),
        ],
        "member_at": _member_at(v1, v2, v3),
        "refusals": _refusals(v1, v2),
    }


def render(vectors: Json) -> str:
    """The exact text of the vector file."""
    return json.dumps(vectors, indent=2, ensure_ascii=False) + "\n"
