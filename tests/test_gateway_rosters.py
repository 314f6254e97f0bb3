"""The gateway's rosters (gateway/trust/rosters.py): its own roster made from the staff register, signed by an admin's
staff key and the gateway's key, stored and published to every unit in one transaction with the register change;
the units' rosters received with their history; the register's approval check agreeing with the roster in force.
Real SQLite files and the real PostgreSQL when it answers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hedui.v1 import trust_pb2
from sqlalchemy import Engine, func, select, text

from common.db import make_engine
from gateway.archive.audit import AuditLog
from gateway.db import schema as s
from gateway.db.database import open_database, upgrade
from gateway.procedure.staff import StaffError, StaffRegister, approval_message
from gateway.trust.items import TrustItems
from gateway.trust.rosters import OwnRoster, PeerRosters, RosterChangeRefused
from keys.clock import DAY_MS, HOUR_MS, MINUTE_MS
from keys.handles import SigningKey
from keys.identity import PartyKeys
from keys.keyring import Keyring
from keys.roster import RosterHistory, notice_ends_at
from keys.truststore import TrustStore
from tests.exchange_world import beijing_ms
from tests.roster_world import CALENDAR, NOTICE, RosterParty

GATEWAY = "agency.220100"
UNITS = ("unit.220100.tax", "unit.220100.land")
MONDAY = beijing_ms(2026, 3, 2)
DIGEST = bytes(range(32))


@pytest.fixture
def engine(database_url: str | None, tmp_path: Path) -> Iterator[Engine]:
    engine = open_database(database_url or f"sqlite:///{tmp_path / 'gateway.db'}", migrate=True)
    yield engine
    engine.dispose()


@dataclass
class Agency:
    """A gateway with a register: admin A-0001 (admin, exchange), S-0001 (exchange) and R-0001 (review only)."""

    register: StaffRegister
    own: OwnRoster
    keys: dict[str, SigningKey]

    def approves(self, staff_id: str, at_ms: int) -> bool:
        signature = self.keys[staff_id].sign(approval_message(DIGEST))
        return self.register.verify_approval(staff_id, DIGEST, signature, at_ms)


@pytest.fixture
def agency(engine: Engine) -> Agency:
    register = StaffRegister(engine, AuditLog(engine))
    keys = {s: SigningKey.generate() for s in ("A-0001", "S-0001", "R-0001", "S-0002", "S-0003")}
    register.bootstrap_admin(
        "A-0001", name="管理员", public_key=keys["A-0001"].public.raw, valid_from_ms=MONDAY - DAY_MS,
        now_ms=MONDAY - DAY_MS, roles=("admin", "exchange"),
    )  # fmt: skip
    for staff_id, roles in (("S-0001", ("exchange",)), ("R-0001", ("review",))):
        register.register(
            "A-0001", staff_id, name=f"员工 {staff_id}", roles=roles, public_key=keys[staff_id].public.raw,
            valid_from_ms=MONDAY - DAY_MS, now_ms=MONDAY - DAY_MS,
        )  # fmt: skip
    party = PartyKeys.create(GATEWAY, now_ms=MONDAY - DAY_MS)
    return Agency(register, OwnRoster(register, party, notice=NOTICE, units=UNITS), keys)


def _counts(engine: Engine) -> tuple[int, ...]:
    with engine.connect() as conn:
        return tuple(
            conn.execute(select(func.count()).select_from(table)).scalar_one()
            for table in (s.staff, s.rosters, s.trust_items, s.trust_deliveries, s.audit_log)
        )


def _unit_view(agency: Agency, now_ms: int) -> RosterHistory:
    """What a unit holds after applying every ROSTER item published to it, in order."""
    history = RosterHistory(GATEWAY)
    keyring = Keyring(agency.own.party.records())
    for item in TrustItems(agency.register.engine).pending(UNITS[0]):
        assert item.kind == trust_pb2.TRUST_ITEM_KIND_ROSTER
        history.accept(item.payload, keyring=keyring, now_ms=now_ms, notice=NOTICE)
    return history


def test_the_first_version_lists_exchange_staff_and_admins_and_reaches_every_unit(agency: Agency) -> None:
    roster = agency.own.publish("A-0001", agency.keys["A-0001"], now_ms=MONDAY)
    assert roster is not None and roster.version == 1
    assert [m.staff_id for m in roster.members] == ["A-0001", "S-0001"]  # R-0001 reviews only: not the units' business
    assert roster.effective_at_ms == notice_ends_at(MONDAY, 1, CALENDAR)
    items = TrustItems(agency.register.engine)
    assert [len(items.pending(unit)) for unit in UNITS] == [1, 1]
    assert _unit_view(agency, MONDAY).held_version == 1
    entries = agency.register.audit.entries()
    assert entries[-1].action == "roster.version" and entries[-1].actor == "A-0001"
    assert "员工" not in (entries[-1].detail or "") and "管理员" not in (entries[-1].detail or "")
    # Before the first version is in force the register alone decides, as before rosters existed.
    assert agency.approves("S-0001", MONDAY + HOUR_MS)
    with pytest.raises(RosterChangeRefused, match="as it is already"):
        agency.own.publish("A-0001", agency.keys["A-0001"], now_ms=MONDAY + MINUTE_MS)


def test_a_member_added_takes_effect_with_the_version_everywhere_at_once(agency: Agency) -> None:
    agency.own.publish("A-0001", agency.keys["A-0001"], now_ms=MONDAY)
    tuesday = MONDAY + DAY_MS + HOUR_MS
    roster = agency.own.add(
        "A-0001", agency.keys["A-0001"], "S-0002", name="新同事", roles="exchange",
        public_key=agency.keys["S-0002"].public.raw, now_ms=tuesday,
    )  # fmt: skip
    assert roster is not None and roster.version == 2
    member = agency.register.get("S-0002")
    assert member is not None and member.valid_from_ms == roster.effective_at_ms == notice_ends_at(tuesday, 1, CALENDAR)
    unit = _unit_view(agency, tuesday)
    for at in (roster.effective_at_ms - 1, roster.effective_at_ms):
        # The gateway accepts exactly what the unit will verify, at every moment.
        assert (
            agency.approves("S-0002", at) == (unit.member_at("S-0002", at)[1] is None) == (at >= member.valid_from_ms)
        )


def test_ending_and_urgent_revocation_are_announced_at_once(agency: Agency) -> None:
    agency.own.publish("A-0001", agency.keys["A-0001"], now_ms=MONDAY)
    in_force = MONDAY + 2 * DAY_MS
    assert agency.approves("S-0001", in_force)
    ended = agency.own.end("A-0001", agency.keys["A-0001"], "S-0001", now_ms=in_force)
    assert ended is not None and ended.effective_at_ms == in_force
    until = notice_ends_at(in_force, 1, CALENDAR)
    assert agency.approves("S-0001", until - 1) and not agency.approves("S-0001", until)
    assert _unit_view(agency, in_force).member_at("S-0001", until) == (None, "approver_expired")
    lost = in_force + HOUR_MS
    with pytest.raises(StaffError, match="last active admin"):
        agency.own.revoke("A-0001", agency.keys["A-0001"], "A-0001", now_ms=lost, reason="key-lost", urgent=True)
    agency.own.add(
        "A-0001", agency.keys["A-0001"], "S-0003", name="第二管理员", roles="admin,exchange",
        public_key=agency.keys["S-0003"].public.raw, now_ms=lost,
    )  # fmt: skip
    later = notice_ends_at(lost, 1, CALENDAR) + MINUTE_MS
    urgent = agency.own.revoke("S-0003", agency.keys["S-0003"], "A-0001", now_ms=later, reason="key-lost", urgent=True)
    assert urgent is not None and urgent.effective_at_ms == later
    assert agency.approves("A-0001", later - 1) and not agency.approves("A-0001", later)
    assert _unit_view(agency, later).member_at("A-0001", later) == (None, "approver_revoked")


def test_a_member_off_the_roster_changes_the_register_only(agency: Agency) -> None:
    agency.own.publish("A-0001", agency.keys["A-0001"], now_ms=MONDAY)
    before = _counts(agency.register.engine)
    made = agency.own.add(
        "A-0001", agency.keys["A-0001"], "S-0002", name="初审员", roles="intake",
        public_key=agency.keys["S-0002"].public.raw, now_ms=MONDAY + HOUR_MS,
    )  # fmt: skip
    assert made is None
    after = _counts(agency.register.engine)
    assert after[0] == before[0] + 1 and after[1:4] == before[1:4]


def test_a_refused_change_changes_nothing(agency: Agency) -> None:
    agency.own.publish("A-0001", agency.keys["A-0001"], now_ms=MONDAY)
    before = _counts(agency.register.engine)
    later = MONDAY + 3 * DAY_MS
    new = {"name": "某人", "roles": "exchange", "public_key": agency.keys["S-0002"].public.raw, "now_ms": later}
    with pytest.raises(RosterChangeRefused, match="not A-0001's"):
        agency.own.add("A-0001", agency.keys["S-0001"], "S-0002", **new)  # type: ignore[arg-type]
    with pytest.raises(StaffError, match="only an active admin"):
        agency.own.add("S-0001", agency.keys["S-0001"], "S-0002", **new)  # type: ignore[arg-type]
    with pytest.raises(StaffError, match="never reused"):
        agency.own.add("A-0001", agency.keys["A-0001"], "S-0001", **new)  # type: ignore[arg-type]
    assert _counts(agency.register.engine) == before


def test_a_unit_roster_is_applied_once_and_a_bad_one_changes_nothing(engine: Engine) -> None:
    unit = RosterParty.create(UNITS[0], MONDAY)
    trust = TrustStore()
    trust.set_keyring(UNITS[0], unit.keyring())
    peers = PeerRosters(engine)
    handler = peers.handler(trust=lambda: trust, notice=lambda: NOTICE, own_party_id=GATEWAY)
    v1 = unit.version([unit.member("U-01", ("admin", "exchange"), MONDAY)], issued_at_ms=MONDAY, admin="U-01")
    assert peers.history(UNITS[0]) is None and peers.held_version(UNITS[0]) == 0
    assert handler(UNITS[0], unit.sign(v1), MONDAY) is None
    assert handler(UNITS[0], unit.sign(v1), MONDAY + 1) is None  # delivered again: held already
    assert peers.held_version(UNITS[0]) == 1
    before = _counts(engine)
    wednesday = MONDAY + 2 * DAY_MS
    early = unit.version(
        [*v1.members, unit.member("U-02", ("exchange",), wednesday)],
        issued_at_ms=wednesday,
        effective_at_ms=wednesday,
        admin="U-01",
    )
    assert handler(UNITS[0], unit.sign(early), wednesday) == "roster_notice_too_short"
    assert handler(UNITS[1], unit.sign(early), wednesday) == "roster_wrong_party"
    assert handler(GATEWAY, unit.sign(early), wednesday) == "roster_wrong_party"
    assert handler(UNITS[0], b"\x0a\x01", wednesday) == "roster_malformed"
    assert _counts(engine) == before
    history = peers.history(UNITS[0])
    assert history is not None and history.member_at("U-01", v1.effective_at_ms)[1] is None
    assert peers.pending(MONDAY) == {UNITS[0]: 1} and peers.pending(v1.effective_at_ms) == {}


def test_a_backdated_unit_version_is_judged_by_its_receipt_and_histories_are_parsed_once(engine: Engine) -> None:
    """Security review findings 2 and 7: the receipt time is kept (stored_at_ms) and judges what a unit's version
    changes; an unchanged version is refused; the parsed history is reused until a version is added."""
    unit = RosterParty.create(UNITS[0], MONDAY)
    trust = TrustStore()
    trust.set_keyring(UNITS[0], unit.keyring())
    peers = PeerRosters(engine, notice=lambda: NOTICE)
    handler = peers.handler(trust=lambda: trust, notice=lambda: NOTICE, own_party_id=GATEWAY)
    v1 = unit.version(
        [unit.member("U-01", ("admin", "exchange"), MONDAY), unit.member("U-02", ("exchange",), MONDAY)],
        issued_at_ms=MONDAY,
        admin="U-01",
    )
    assert handler(UNITS[0], unit.sign(v1), MONDAY) is None
    first = peers.history(UNITS[0])
    assert first is not None and peers.history(UNITS[0]) is first  # parsed once
    friday = beijing_ms(2026, 3, 6, 15)
    unchanged = unit.version(list(v1.members), issued_at_ms=friday, effective_at_ms=friday, admin="U-01")
    assert handler(UNITS[0], unit.sign(unchanged), friday) == "roster_unchanged"
    unit.versions.pop()
    # Made on Friday, stating Monday: revokes U-02 from Monday (which would disown U-02's answers of the week).
    backdated = unit.version(
        unit.changed(v1, "U-02", revoked_at_ms=MONDAY), issued_at_ms=MONDAY, effective_at_ms=MONDAY, admin="U-01"
    )
    assert handler(UNITS[0], unit.sign(backdated), friday) is None  # late versions are still taken
    history = peers.history(UNITS[0])
    assert history is not None and history is not first and history.held_version == 2
    wednesday = MONDAY + 2 * DAY_MS
    assert history.member_at("U-02", wednesday)[1] is None
    assert history.member_at("U-02", friday) == (None, "approver_revoked")
    # A fresh reader (another process) judges alike from what is stored.
    assert PeerRosters(engine).history(UNITS[0]).member_at("U-02", wednesday)[1] is None  # type: ignore[union-attr]


def test_rows_slipped_into_the_staff_table_never_ride_on_the_next_admin_change(
    agency: Agency, capsys: pytest.CaptureFixture[str]
) -> None:
    """Security review finding 1: a database writer adds staff rows directly; the next legitimate change must not
    sign them. The change is refused naming them, nothing changes; publish shows them before signing."""
    agency.own.publish("A-0001", agency.keys["A-0001"], now_ms=MONDAY)
    evil = {sid: SigningKey.generate() for sid in ("X-0001", "X-0002")}
    with agency.register.engine.begin() as conn:
        for sid, key in evil.items():
            conn.execute(
                s.staff.insert().values(
                    staff_id=sid, name="某某", roles="exchange", public_key=key.public.raw, valid_from_ms=MONDAY,
                    valid_until_ms=None, registered_by="A-0001", registered_at_ms=MONDAY, revoked_at_ms=None,
                )
            )  # fmt: skip
    before = _counts(agency.register.engine)
    tuesday = MONDAY + DAY_MS + HOUR_MS
    with pytest.raises(RosterChangeRefused, match=r"X-0001 \(added\), X-0002 \(added\)") as caught:
        agency.own.add(
            "A-0001", agency.keys["A-0001"], "S-0002", name="新同事", roles="exchange",
            public_key=agency.keys["S-0002"].public.raw, now_ms=tuesday,
        )  # fmt: skip
    assert "某某" not in str(caught.value)
    with pytest.raises(RosterChangeRefused, match="X-0001"):
        agency.own.end("A-0001", agency.keys["A-0001"], "S-0001", now_ms=tuesday)
    assert _counts(agency.register.engine) == before
    assert _unit_view(agency, tuesday).held_version == 1  # nothing signed, nothing published
    assert agency.own.unsigned_changes() == [("X-0001", "added"), ("X-0002", "added")]
    # A changed row (another key for a listed member) is named too.
    with agency.register.engine.begin() as conn:
        conn.execute(s.staff.delete().where(s.staff.c.staff_id.in_(list(evil))))
        conn.execute(
            s.staff.update().where(s.staff.c.staff_id == "S-0001").values(public_key=evil["X-0001"].public.raw)
        )
    assert agency.own.unsigned_changes() == [("S-0001", "changed")]
    with pytest.raises(RosterChangeRefused, match=r"S-0001 \(changed\)"):
        agency.own.revoke("A-0001", agency.keys["A-0001"], "A-0001", now_ms=tuesday, reason="key-lost", urgent=True)


def test_the_next_version_is_the_signed_one_plus_exactly_the_change(agency: Agency) -> None:
    agency.own.publish("A-0001", agency.keys["A-0001"], now_ms=MONDAY)
    tuesday = MONDAY + DAY_MS + HOUR_MS
    roster = agency.own.add(
        "A-0001", agency.keys["A-0001"], "S-0002", name="新同事", roles="exchange",
        public_key=agency.keys["S-0002"].public.raw, now_ms=tuesday,
    )  # fmt: skip
    assert roster is not None and [m.staff_id for m in roster.members] == ["A-0001", "S-0001", "S-0002"]
    history = agency.own.history()
    assert history is not None and history.versions[0].roster.members == roster.members[:2]
    assert agency.own.unsigned_changes() == []


def test_staff_add_and_revoke_refer_to_the_roster_once_there_is_one(agency: Agency, tmp_path: Path) -> None:
    from gateway.cli import _no_roster_yet  # noqa: PLC0415

    _no_roster_yet(agency.register, "add")  # no roster yet: the old commands still work
    agency.own.publish("A-0001", agency.keys["A-0001"], now_ms=MONDAY)
    with pytest.raises(StaffError, match="hedui-gateway roster add"):
        _no_roster_yet(agency.register, "add")


def test_migration_0012_keeps_existing_staff_and_batches(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        upgrade(engine, "0010")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO staff (staff_id, name, roles, public_key, valid_from_ms, registered_by, "
                    "registered_at_ms) VALUES ('A-0001', 'N', 'admin', :key, 1, 'bootstrap', 1)"
                ),
                {"key": SigningKey.generate().public.raw},
            )
        upgrade(engine)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT staff_id FROM staff")).scalar_one() == "A-0001"
            assert conn.execute(text("SELECT count(*) FROM rosters")).scalar_one() == 0
            assert conn.execute(text("SELECT count(*) FROM answer_staff")).scalar_one() == 0
    finally:
        engine.dispose()


# -- the command lines, as an admin runs them -----------------------------------------------------------------------


def test_cli_roster_add_end_revoke_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main as gateway_main  # noqa: PLC0415
    from tests.test_staff import Keystore, bundle_fingerprint  # noqa: PLC0415

    people = {s: Keystore(tmp_path, f"staff.220100.{s.lower()}") for s in ("A-0001", "S-0001", "S-0002")}
    agency = Keystore(tmp_path, GATEWAY)
    config = tmp_path / "gateway.toml"
    units = "".join(
        f'[[units]]\nparty_id = "{unit}"\ncategory = "tax"\nendpoint = "127.0.0.1:{50061 + i}"\n\n'
        for i, unit in enumerate(UNITS)
    )
    config.write_text(
        f'[agency]\nparty_id = "{GATEWAY}"\nregion_code = "220100"\nlevel = "city"\n\n'
        f'[keys]\nkeystore = "{agency.path}"\npassphrase_file = "{agency.passfile}"\n\n'
        f'[database]\nurl = "sqlite:///{tmp_path / "gateway.db"}"\n\n'
        f"[staff]\nroster_notice_working_days = 2\n\n{units}",
        encoding="utf-8",
    )

    def gateway(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = gateway_main([*args, "--config", str(config)])
        out, err = capsys.readouterr()
        return code, out, err

    def signed(admin: str = "A-0001", keystore: str = "A-0001") -> list[str]:
        person = people[keystore]
        return ["--admin", admin, "--admin-keystore", str(person.path), "--passphrase-file", str(person.passfile)]

    assert gateway_main(["migrate", "--config", str(config)]) == 0
    bootstrap = ["--staff-id", "A-0001", "--name", "王管理", "--public-key-file", str(people["A-0001"].bundle)]
    assert gateway("staff", "bootstrap-admin", *bootstrap, "--roles", "admin,exchange")[0] == 0
    code, out, err = gateway("roster", "publish", *signed())
    assert code == 0, err
    assert "roster version 1" in out and "published to 2 units" in out
    assert "differs in:\n  A-0001: added\n" in out  # publish shows what it signs
    code, _, err = gateway("roster", "publish", *signed(keystore="S-0001"))
    assert code == 1 and "not A-0001's" in err
    add = ["--staff-id", "S-0001", "--name", "李交换", "--roles", "exchange", "--public-key-file",
           str(people["S-0001"].bundle)]  # fmt: skip
    # Review finding 9: the bundle is taken only with the fingerprint of the member's key letter, and only if it
    # matches (a bundle file swapped on its way to the admin is refused).
    with pytest.raises(SystemExit):
        gateway("roster", "add", *signed(), *add)
    wrong = bundle_fingerprint(capsys, people["S-0002"].bundle)
    code, _, err = gateway("roster", "add", *signed(), *add, "--fingerprint", wrong)
    assert code == 1 and "fingerprint" in err
    right = bundle_fingerprint(capsys, people["S-0001"].bundle)
    code, out, err = gateway("roster", "add", *signed(), *add, "--fingerprint", right)
    assert code == 0, err
    assert "roster version 2" in out
    code, _, err = gateway("staff", "add", *add, "--admin", "A-0001")
    assert code == 1 and "hedui-gateway roster add" in err
    code, out, err = gateway("roster", "list")
    assert code == 0 and "李交换" in out and "S-0001       pending" in out
    assert "李交换" not in err and "王管理" not in err  # names reach the terminal, never the log
    code, out, _ = gateway("roster", "history")
    assert code == 0 and "v1" in out and "v2" in out and out.count("not yet acknowledged") == 4
    code, out, _ = gateway("roster", "show", "--version", "1")
    assert code == 0 and "admin A-0001" in out and "李交换" not in out
    code, out, _ = gateway("roster", "pending")
    assert code == 0 and f"{GATEWAY}" in out and "v2" in out
    code, out, err = gateway("roster", "end", *signed(), "--staff-id", "S-0001")
    assert code == 0, err
    assert "roster version 3" in out
    code, out, err = gateway("roster", "revoke", *signed(), "--staff-id", "S-0001", "--reason", "key-lost", "--urgent")
    assert code == 0, err  # an ended member can still be revoked, at once
    assert "roster version 4" in out and "revoked now" in out
    code, _, err = gateway("roster", "list", "--party", UNITS[0])
    assert code == 1 and "no roster held" in err
    code, _, err = gateway("roster", "show", "--version", "9")
    assert code == 1 and "not held" in err
    assert gateway_main(["audit", "verify", "--config", str(config)]) == 0


# -- the unit staff an answer set names ---------------------------------------------------------------------------


def test_answer_staff_are_judged_by_the_unit_roster_at_the_answer_time() -> None:
    from gateway.trust.rosters import judge_answer_staff  # noqa: PLC0415

    unit = RosterParty.create(UNITS[0], MONDAY)
    v1 = unit.version(
        [unit.member("U-01", ("admin", "exchange"), MONDAY), unit.member("U-02", ("admin",), MONDAY)],
        issued_at_ms=MONDAY,
        admin="U-01",
    )
    history = RosterHistory(UNITS[0])
    history.accept(unit.sign(v1), keyring=unit.keyring(), now_ms=MONDAY, notice=NOTICE)
    at = v1.effective_at_ms + HOUR_MS

    def judge(staff: list[str], answered_at: int = at, received: int | None = MONDAY) -> tuple[int | None, str | None]:
        verdict = judge_answer_staff(history, staff, answered_at, now_ms=at, received_at_ms=received)
        return verdict.roster_version, verdict.reason

    assert judge(["U-01"]) == (1, None)
    assert judge(["U-01"], answered_at=MONDAY + HOUR_MS) == (None, None)  # no version in force then: unverified
    assert judge_answer_staff(None, [], at, now_ms=at, received_at_ms=None).reason is None
    assert judge([]) == (None, "answer_staff_missing")
    assert judge(["U-01", "U-01"]) == (None, "answer_staff_malformed")
    assert judge(["U 01"]) == (None, "answer_staff_malformed")
    assert judge(["U-02"]) == (None, "approver_not_exchange_staff")
    assert judge(["U-09"]) == (None, "approver_unknown")
    assert judge(["U-01"], answered_at=at + HOUR_MS) == (None, "answer_time_invalid")  # in the gateway's future
    assert judge(["U-01"], received=at + HOUR_MS) == (None, "answer_time_invalid")  # before the unit's receipt


def test_a_peer_holding_an_older_version_is_sent_what_follows(agency: Agency) -> None:
    agency.own.publish("A-0001", agency.keys["A-0001"], now_ms=MONDAY)
    agency.own.end("A-0001", agency.keys["A-0001"], "S-0001", now_ms=MONDAY + HOUR_MS)
    peers = PeerRosters(agency.register.engine)
    assert len(peers.signed_versions(GATEWAY)) == 2
    later = peers.signed_versions(GATEWAY, after=1)
    assert len(later) == 1 and later == agency.own.signed_versions(after=1)
    # A unit enrolled later applies them in order from nothing.
    history = RosterHistory(GATEWAY)
    for data in peers.signed_versions(GATEWAY):
        history.accept(data, keyring=Keyring(agency.own.party.records()), now_ms=MONDAY + HOUR_MS, notice=NOTICE)
    assert history.held_version == 2
