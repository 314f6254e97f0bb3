"""The unit's side of the rosters (connectors/trust/): its own roster, the gateways' rosters it holds, the staff a
batch names judged by the gateway's roster of the batch's day, the on-duty staff every answer set names, and, end to
end between a real gateway and real connectors on loopback, the gateway checking those names against the unit's
roster. SyncTrust (helper SYNC) is not on this branch: the signed roster bytes each side publishes are handed to the
other side's ROSTER handler directly, as the syncer will."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, func, select

from common.db import make_engine
from connectors import store as cstore
from connectors.metrics import ConnectorMetrics
from connectors.store import ConnectorStore
from connectors.trust.duty import OnDuty
from connectors.trust.items import TrustItems, trust_deliveries
from connectors.trust.rosters import PeerRosters, RosterChangeRefused, UnitRoster, rosters
from gateway.archive.audit import AuditLog
from gateway.db import schema
from gateway.procedure.staff import StaffRegister
from gateway.trust.rosters import OwnRoster
from gateway.trust.rosters import PeerRosters as GatewayRosters
from keys.clock import DAY_MS, HOUR_MS, MINUTE_MS
from keys.handles import SigningKey
from keys.identity import PartyKeys
from keys.keyring import Keyring
from keys.roster import RosterMember, build_roster, notice_ends_at, sign_roster
from keys.truststore import TrustStore
from tests.exchange_world import GATEWAY, STAFF, UNIT, beijing_ms, exchange_world
from tests.gateway_drive import drain, rows, settle
from tests.gateway_world import GatewayWorld, gateway_world
from tests.roster_world import CALENDAR, NOTICE, RosterParty

MONDAY = beijing_ms(2026, 3, 2)


def _unit(tmp_path: Path) -> tuple[UnitRoster, dict[str, SigningKey]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'unit.db'}")
    ConnectorStore(engine)
    party = PartyKeys.create(UNIT, now_ms=MONDAY - DAY_MS)
    keys = {s: SigningKey.generate() for s in ("U-01", "U-02", "U-03")}
    return UnitRoster(engine, party, notice=NOTICE, gateways=[GATEWAY, "agency.220000"]), keys


def _count(engine: Engine) -> tuple[int, ...]:
    with engine.connect() as conn:
        return tuple(
            conn.execute(select(func.count()).select_from(table)).scalar_one()
            for table in (rosters, trust_deliveries, cstore.audit)
        )


def test_the_unit_roster_grows_by_signed_versions_published_to_every_gateway(tmp_path: Path) -> None:
    own, keys = _unit(tmp_path)
    v1 = own.init_admin("U-01", keys["U-01"], name="单位管理员", now_ms=MONDAY, roles="admin,exchange")
    assert v1.version == 1 and v1.effective_at_ms == notice_ends_at(MONDAY, 1, CALENDAR)
    later = MONDAY + 2 * DAY_MS
    v2 = own.add(
        "U-01", keys["U-01"], "U-02", name="交换员", roles="exchange", public_key=keys["U-02"].public.raw, now_ms=later
    )
    assert v2.version == 2 and v2.member("U-02") is not None
    items = TrustItems(own.engine)
    assert [len(items.pending(g)) for g in own.gateways] == [2, 2]
    revoked = own.revoke("U-01", keys["U-01"], "U-02", now_ms=later + HOUR_MS, urgent=True)
    assert revoked.effective_at_ms == later + HOUR_MS
    history = own.history()
    assert history is not None and history.member_at("U-02", later + HOUR_MS) == (None, "approver_revoked")


def test_a_gateway_behind_on_the_unit_roster_is_sent_the_versions_it_lacks(tmp_path: Path) -> None:
    """TrustSync.peer_roster_version: a gateway that says it holds version 1 is offered 2 and 3 (in order, as ROSTER
    items), whatever it was sent before; one that holds the latest is offered nothing new (common/rosterstore.py,
    the catch-up both sides use)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'unit.db'}")
    ConnectorStore(engine)
    party = PartyKeys.create(UNIT, now_ms=MONDAY - DAY_MS)
    keys = {s: SigningKey.generate() for s in ("U-01", "U-02", "U-03")}
    own = UnitRoster(engine, party, notice=NOTICE, gateways=[GATEWAY])
    own.init_admin("U-01", keys["U-01"], name="单位管理员", now_ms=MONDAY)
    for day, staff_id in ((2, "U-02"), (3, "U-03")):
        own.add(
            "U-01", keys["U-01"], staff_id, name="交换员", roles="exchange", public_key=keys[staff_id].public.raw,
            now_ms=MONDAY + day * DAY_MS,
        )  # fmt: skip
    history = own.history()
    assert history is not None
    versions = [v.data for v in history.versions]
    late = "agency.220000"  # a gateway the versions were never published for
    items = TrustItems(engine)
    catch_up = PeerRosters(engine).catch_up(items, UNIT, lambda: MONDAY + 4 * DAY_MS)
    catch_up(late, 3)
    assert items.pending(late) == []
    catch_up(late, 1)
    assert [p.payload for p in items.pending(late)] == versions[1:]
    catch_up(late, 0)
    assert sorted(p.payload for p in items.pending(late)) == sorted(versions)
    assert [p.payload for p in items.pending(GATEWAY)] == versions  # the gateway it was published for: unchanged


def test_a_refused_unit_roster_change_changes_nothing(tmp_path: Path) -> None:
    own, keys = _unit(tmp_path)
    own.init_admin("U-01", keys["U-01"], name="单位管理员", now_ms=MONDAY)
    before = _count(own.engine)
    later = MONDAY + 2 * DAY_MS
    member = {"name": "某人", "roles": "exchange", "public_key": keys["U-02"].public.raw, "now_ms": later}
    with pytest.raises(RosterChangeRefused, match="not U-01's"):
        own.add("U-01", keys["U-03"], "U-02", **member)  # type: ignore[arg-type]
    with pytest.raises(RosterChangeRefused, match="roster_not_admin"):
        own.add("U-09", keys["U-01"], "U-02", **member)  # type: ignore[arg-type]
    with pytest.raises(RosterChangeRefused, match="roles are admin, exchange"):
        own.add("U-01", keys["U-01"], "U-02", **{**member, "roles": "review"})  # type: ignore[arg-type]
    with pytest.raises(RosterChangeRefused, match="never reused"):
        own.add("U-01", keys["U-01"], "U-01", **member)  # type: ignore[arg-type]
    with pytest.raises(RosterChangeRefused, match="no admin"):
        own.revoke("U-01", keys["U-01"], "U-01", now_ms=later, urgent=True)
    with pytest.raises(RosterChangeRefused, match="has a roster already"):
        own.init_admin("U-03", keys["U-03"], name="另一个", now_ms=later)
    assert _count(own.engine) == before


def test_a_store_made_before_rosters_keeps_its_batches(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    cstore.metadata.create_all(engine)  # a store as the previous release left it: no roster tables
    with engine.begin() as conn:
        conn.execute(cstore.audit.insert().values(at_ms=1, event="accepted", gateway=GATEWAY, batch_id="B-1"))
    PeerRosters(engine)
    OnDuty(engine)
    with engine.connect() as conn:
        assert conn.execute(select(cstore.audit.c.batch_id)).scalar_one() == "B-1"
        assert conn.execute(select(func.count()).select_from(rosters)).scalar_one() == 0


def test_a_gateway_roster_decides_once_in_force_and_the_toml_ids_before(tmp_path: Path) -> None:
    engine = ConnectorStore(make_engine(f"sqlite:///{tmp_path / 'unit.db'}")).engine
    gateway = RosterParty.create(GATEWAY, MONDAY)
    trust_ring = gateway.keyring()
    peers = PeerRosters(engine)
    handler = peers.handler(trust=lambda: _trust(GATEWAY, trust_ring), notice=lambda: NOTICE, own_party_id=UNIT)
    legacy = {GATEWAY: frozenset({"S-0001", "S-0002", "S-0009"})}
    v1 = gateway.version(
        [
            gateway.member("S-0001", ("admin", "exchange"), MONDAY),
            gateway.member("S-0002", ("exchange",), MONDAY),
            gateway.member("S-0004", ("admin",), MONDAY),
        ],
        issued_at_ms=MONDAY,
    )
    assert handler(GATEWAY, gateway.sign(v1), MONDAY) is None
    assert handler(GATEWAY, gateway.sign(v1), MONDAY) is None
    assert handler(UNIT, gateway.sign(v1), MONDAY) == "roster_wrong_party"
    assert handler(GATEWAY, gateway.sign(v1)[:-3], MONDAY) == "roster_malformed"
    # Judged by the roster in force at the batch's time (the approval check, connectors/approvals.py).
    history = peers.history(GATEWAY)
    assert history is not None
    assert history.member_at("S-0009", v1.effective_at_ms) == (None, "approver_unknown")
    assert history.member_at("S-0002", MONDAY + HOUR_MS)[1] is not None
    member, reason = history.member_at("S-0004", v1.effective_at_ms)
    assert reason is None and member is not None and not member.has_role("exchange")
    assert peers.missing_from_roster(legacy) == {GATEWAY: ["S-0009"]}
    assert peers.held_version(GATEWAY) == 1 and peers.pending(MONDAY) == {GATEWAY: 1}


def test_a_backdated_gateway_version_is_judged_by_its_receipt_and_parsed_once(tmp_path: Path) -> None:
    """Security review findings 2 and 7 at the unit: an addition stated as of Monday but received on Friday counts
    from the notice after Friday; an unchanged version is refused; the history is parsed once per version held."""
    engine = ConnectorStore(make_engine(f"sqlite:///{tmp_path / 'unit.db'}")).engine
    gateway = RosterParty.create(GATEWAY, MONDAY)
    ring = gateway.keyring()
    peers = PeerRosters(engine, notice=lambda: NOTICE)
    handler = peers.handler(trust=lambda: _trust(GATEWAY, ring), notice=lambda: NOTICE, own_party_id=UNIT)
    v1 = gateway.version([gateway.member("S-0001", ("admin", "exchange"), MONDAY)], issued_at_ms=MONDAY)
    assert handler(GATEWAY, gateway.sign(v1), MONDAY) is None
    first = peers.history(GATEWAY)
    assert first is not None and peers.history(GATEWAY) is first
    friday = beijing_ms(2026, 3, 6, 15)
    same = gateway.version(list(v1.members), issued_at_ms=friday, effective_at_ms=friday)
    assert handler(GATEWAY, gateway.sign(same), friday) == "roster_unchanged"
    gateway.versions.pop()
    v2 = gateway.version(
        [*v1.members, gateway.member("S-0002", ("exchange",), v1.effective_at_ms)],
        issued_at_ms=MONDAY,
        effective_at_ms=v1.effective_at_ms,
    )
    assert handler(GATEWAY, gateway.sign(v2), friday) is None
    history = peers.history(GATEWAY)
    assert history is not None and history is not first and history.held_version == 2
    begins = notice_ends_at(friday - HOUR_MS, 1, CALENDAR)
    assert history.member_at("S-0002", MONDAY + 2 * DAY_MS) == (None, "approver_not_yet_effective")
    assert history.member_at("S-0002", friday) == (None, "approver_not_yet_effective")
    assert history.member_at("S-0002", begins)[1] is None


def _trust(party: str, ring: Keyring) -> TrustStore:
    trust = TrustStore()
    trust.set_keyring(party, ring)
    return trust


def test_approvals_are_judged_by_the_signed_gateway_roster_the_unit_holds(tmp_path: Path) -> None:
    """The approval check of a real connector reads the gateway's signed roster from its own store (PeerRosters):
    a member revoked by a later version can no longer approve from the revocation on, the others still can."""
    with exchange_world(tmp_path, now_ms=MONDAY) as world:
        connector = world.connector
        connector.rosters = PeerRosters(connector.store.engine)
        connector.approvals = dataclasses.replace(connector.approvals, rosters=connector.rosters)
        gateway = world.gateway.me
        staff = {s: world.staff.key(s) for s in (*STAFF, "S-0003")}
        members = [RosterMember(s, "员工", ("admin", "exchange"), k.public, MONDAY) for s, k in staff.items()]
        v1 = build_roster(
            None, party_id=GATEWAY, members=members, issued_at_ms=MONDAY,
            effective_at_ms=notice_ends_at(MONDAY, 1, CALENDAR), admin_staff_id="S-0001",
        )  # fmt: skip
        handler = connector.rosters.handler(
            trust=lambda: connector.courier.trust, notice=lambda: NOTICE, own_party_id=UNIT
        )
        world.clock.set(MONDAY + HOUR_MS)
        with pytest.raises(grpc.RpcError) as unknown:  # no roster of the gateway held yet
            world.submit(world.batch("B-early", world.subjects(2)))
        assert unknown.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert handler(GATEWAY, sign_roster(v1, gateway.signing_key(MONDAY), staff["S-0001"]), MONDAY) is None
        with pytest.raises(grpc.RpcError) as early:  # held, not yet in force when the approvals were given
            world.submit(world.batch("B-early-2", world.subjects(2)))
        assert "approver_unknown" in (early.value.details() or "")
        world.clock.set(v1.effective_at_ms + HOUR_MS)
        receipt = world.submit(world.batch("B-ok", world.subjects(2)))
        assert receipt.batch_id == "B-ok"
        revoked_at = world.clock.now_ms()
        v2 = build_roster(
            v1, party_id=GATEWAY, issued_at_ms=revoked_at, effective_at_ms=revoked_at, admin_staff_id="S-0001",
            members=[RosterMember(m.staff_id, m.name, m.roles, m.public_key, m.valid_from_ms,
                                  revoked_at_ms=revoked_at if m.staff_id == "S-0002" else None) for m in members],
        )  # fmt: skip
        assert handler(GATEWAY, sign_roster(v2, gateway.signing_key(revoked_at), staff["S-0001"]), revoked_at) is None
        world.clock.advance(MINUTE_MS)
        with pytest.raises(grpc.RpcError) as refused:
            world.submit(world.batch("B-late", world.subjects(2)))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "S-0002" in (refused.value.details() or "") and "approver_revoked" in (refused.value.details() or "")
        assert world.submit(world.batch("B-others", world.subjects(2), staff_ids=["S-0001", "S-0003"]))


def test_answers_name_the_staff_on_duty_or_wait_for_them(tmp_path: Path) -> None:
    with exchange_world(tmp_path, now_ms=MONDAY) as world:
        connector = world.connector
        engine = connector.store.engine
        connector.rosters, connector.duty = PeerRosters(engine), OnDuty(engine)
        metrics = ConnectorMetrics(CollectorRegistry())
        metrics.watch_rosters(connector)
        world.submit(world.batch("B-legacy", world.subjects(2)))
        assert connector.answer_pending() == 1  # no roster of the unit yet: named nobody, as before rosters
        assert list(world.fetch("B-legacy").batches[0].answer.responsible_staff) == []
        keys = {s: SigningKey.generate() for s in ("U-01", "U-02", "U-03")}
        own = UnitRoster(engine, connector.courier.me, notice=NOTICE, gateways=[GATEWAY])
        own.init_admin("U-01", keys["U-01"], name="管理员", now_ms=MONDAY, roles="admin,exchange")
        own.add("U-01", keys["U-01"], "U-02", name="交换员", roles="exchange",
                public_key=keys["U-02"].public.raw, now_ms=MONDAY + MINUTE_MS)  # fmt: skip
        history = own.history()
        assert history is not None
        world.clock.set(history.versions[-1].roster.effective_at_ms + MINUTE_MS)
        world.submit(world.batch("B-1", world.subjects(2)))
        assert connector.answer_pending() == 0 and connector.short_of_staff  # nobody on duty
        assert metrics.registry.get_sample_value("hedui_connector_answer_staff_short") == 1.0
        with pytest.raises(RosterChangeRefused, match="not an exchange member"):
            connector.duty.set(["U-09"], history, now_ms=world.clock.now_ms())
        connector.duty.set(["U-01", "U-02"], history, now_ms=world.clock.now_ms())
        connector.answer_staff = 2  # the two-person rule on the unit's side
        assert connector.answer_pending() == 1 and not connector.short_of_staff
        assert list(world.fetch("B-1").batches[0].answer.responsible_staff) == ["U-01", "U-02"]
        own.revoke("U-01", keys["U-01"], "U-02", now_ms=world.clock.now_ms(), urgent=True)
        world.submit(world.batch("B-2", world.subjects(2)))
        assert connector.answer_pending() == 0 and connector.short_of_staff  # one left; two required
        connector.answer_staff = 1
        assert connector.answer_pending() == 1
        assert list(world.fetch("B-2").batches[0].answer.responsible_staff) == ["U-01"]
        assert metrics.registry.get_sample_value("hedui_connector_roster_unacknowledged_seconds", {"gateway": GATEWAY})


# -- end to end: a real gateway and real connectors, rosters handed over as the syncer will -------------------------


def _exchange_rosters(world: GatewayWorld, unit_id: str, tmp_path: Path) -> tuple[UnitRoster, dict[str, SigningKey]]:
    """The unit makes its roster (U-01 admin and exchange) and the gateway its own (A-0001, and STAFF as exchange
    staff); each side's published versions are applied by the other side's ROSTER handler."""
    connector = world.connectors[unit_id].connector
    engine = connector.store.engine
    connector.rosters, connector.duty = PeerRosters(engine), OnDuty(engine)
    now = world.clock.now_ms()
    keys = {s: SigningKey.generate() for s in ("U-01", "U-02", "A-0001", *STAFF)}
    own = UnitRoster(engine, connector.courier.me, notice=NOTICE, gateways=[GATEWAY])
    own.init_admin("U-01", keys["U-01"], name="单位管理员", now_ms=now, roles="admin,exchange")
    register = StaffRegister(world.store.engine, AuditLog(world.store.engine))
    register.bootstrap_admin("A-0001", name="管理员", public_key=keys["A-0001"].public.raw, valid_from_ms=now,
                             now_ms=now)  # fmt: skip
    for staff_id in STAFF:
        register.register("A-0001", staff_id, name="核对员", roles="exchange", public_key=keys[staff_id].public.raw,
                          valid_from_ms=now, now_ms=now)  # fmt: skip
    gateway_own = OwnRoster(register, world.engine.courier.me, notice=NOTICE, units=[unit_id])
    gateway_own.publish("A-0001", keys["A-0001"], now_ms=now)
    _deliver(world, unit_id)
    return own, keys


def _deliver(world: GatewayWorld, unit_id: str) -> None:
    connector = world.connectors[unit_id].connector
    assert connector.rosters is not None
    now = world.clock.now_ms()
    at_gateway = GatewayRosters(world.store.engine).handler(
        trust=lambda: world.engine.courier.trust, notice=lambda: NOTICE, own_party_id=GATEWAY
    )
    at_unit = connector.rosters.handler(
        trust=lambda: connector.courier.trust, notice=lambda: NOTICE, own_party_id=unit_id
    )
    for item in TrustItems(connector.store.engine).pending(GATEWAY):
        assert at_gateway(unit_id, item.payload, now) is None
        TrustItems(connector.store.engine).acked(GATEWAY, item.sha256, applied=True, reason=None, at_ms=now)
    from gateway.trust.items import TrustItems as GatewayItems  # noqa: PLC0415

    for sent in GatewayItems(world.store.engine).pending(unit_id):
        assert at_unit(GATEWAY, sent.payload, now) is None
        GatewayItems(world.store.engine).acked(unit_id, sent.sha256, applied=True, reason=None, at_ms=now)


def test_answer_staff_checked_by_the_gateway_end_to_end(tmp_path: Path) -> None:
    tax = "unit.220100.tax"
    with gateway_world(tmp_path, now_ms=MONDAY) as world:
        own, keys = _exchange_rosters(world, tax, tmp_path)
        connector = world.connectors[tax].connector
        assert connector.duty is not None
        history = own.history()
        assert history is not None
        world.clock.set(notice_ends_at(MONDAY, 1, CALENDAR) + MINUTE_MS)  # both rosters in force
        connector.duty.set(["U-01"], history, now_ms=world.clock.now_ms())
        world.commission("E2E-1", households=4)
        settle(world)
        staff_rows = rows(world, select(schema.answer_staff))
        tax_batches = {r.batch_id for r in rows(world, select(schema.batches).where(schema.batches.c.unit_id == tax))}
        by_batch = {r.batch_id: r for r in staff_rows}
        assert tax_batches and all(by_batch[b].staff_ids == "U-01" and by_batch[b].roster_version == 1
                                   for b in tax_batches)  # fmt: skip
        # The other units have no roster yet: their answers are stored, unverified.
        others = [r for r in staff_rows if r.batch_id not in tax_batches]
        assert others and all(r.roster_version is None and r.staff_ids == "" for r in others)

        # The unit adds U-02 and puts them on duty once in force at the unit, but the gateway has not yet received
        # the version: it refuses the answers naming U-02 and keeps polling until the version arrives.
        now = world.clock.now_ms()
        own.add("U-01", keys["U-01"], "U-02", name="交换员", roles="exchange",
                public_key=keys["U-02"].public.raw, now_ms=now)  # fmt: skip
        held = own.history()
        assert held is not None
        world.clock.set(held.versions[-1].roster.effective_at_ms + MINUTE_MS)
        connector.duty.set(["U-02"], held, now_ms=world.clock.now_ms())
        world.commission("E2E-2", households=2)
        world.workers.run_once(dispatch=True)
        drain(world)
        world.workers.run_once(dispatch=True)
        pending = rows(
            world,
            select(schema.batches).where(schema.batches.c.unit_id == tax, schema.batches.c.state == "receipted"),
        )
        assert pending, "the answers naming U-02 were stored before the gateway held U-02's version"
        _deliver(world, tax)
        world.clock.advance(MINUTE_MS)
        settle(world)
        late = {r.batch_id: r for r in rows(world, select(schema.answer_staff))}
        assert all(late[p.batch_id].staff_ids == "U-02" and late[p.batch_id].roster_version == 2 for p in pending)


# -- the command lines, as the unit's admin runs them ---------------------------------------------------------------


def test_cli_unit_roster(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from connectors.cli import main  # noqa: PLC0415
    from demo.localnet import free_port  # noqa: PLC0415
    from tests.test_connector_cli import _setup  # noqa: PLC0415
    from tests.test_staff import Keystore, bundle_fingerprint  # noqa: PLC0415

    config, _, _ = _setup(tmp_path, free_port())
    people = {s: Keystore(tmp_path, f"staff.220100.{s.lower()}") for s in ("U-01", "U-02")}

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(["roster", *args, "--config", str(config)])
        out, err = capsys.readouterr()
        return code, out, err

    def signed(person: str = "U-01") -> list[str]:
        return ["--admin-keystore", str(people[person].path), "--passphrase-file", str(people[person].passfile)]

    code, out, err = run("init-admin", "--staff-id", "U-01", "--name", "赵管理", *signed())
    assert code == 0, err
    assert "roster version 1" in out and "published to 1 gateways" in out
    code, _, err = run("init-admin", "--staff-id", "U-01", "--name", "赵管理", *signed())
    assert code == 1 and "has a roster already" in err
    fingerprint = bundle_fingerprint(capsys, people["U-02"].bundle)
    add = ["--staff-id", "U-02", "--name", "钱交换", "--roles", "exchange", "--public-key-file",
           str(people["U-02"].bundle), "--fingerprint", fingerprint]  # fmt: skip
    code, _, err = run("add", "--admin", "U-02", *signed("U-02"), *add)
    assert code == 1 and "not an admin" in err
    # Review finding 9: no bundle without the fingerprint of the member's key letter, and only a matching one.
    with pytest.raises(SystemExit):
        run("add", "--admin", "U-01", *signed(), *add[:-2])
    wrong = bundle_fingerprint(capsys, people["U-01"].bundle)
    code, _, err = run("add", "--admin", "U-01", *signed(), *add[:-2], "--fingerprint", wrong)
    assert code == 1 and "fingerprint" in err
    code, out, err = run("add", "--admin", "U-01", *signed(), *add)
    assert code == 0, err
    assert "roster version 2" in out
    code, out, err = run("list")
    assert code == 0 and "钱交换" in out and "U-02         pending" in out
    assert "钱交换" not in err and "赵管理" not in err
    code, out, _ = run("history")
    assert code == 0 and "v1" in out and "v2" in out
    code, out, _ = run("pending")
    assert code == 0 and "unit.220100.tax" in out
    code, out, err = run("on-duty", "--set", "U-02")
    assert code == 0, err
    assert "on duty: U-02" in out and "not in force yet" in out
    code, out, _ = run("migrate-check")
    assert code == 0 and "no roster received: the [[staff]] ids decide" in out and "S-1, S-2" in out
    code, out, err = run("revoke", "--admin", "U-01", *signed(), "--staff-id", "U-02", "--urgent")
    assert code == 0, err
    assert "roster version 3" in out and "revoked now" in out
    code, _, err = run("list", "--party", "agency.220100")
    assert code == 1 and "no roster held" in err


def test_the_start_log_says_what_the_toml_ids_still_do(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from connectors.server import legacy_staff_warnings  # noqa: PLC0415

    with exchange_world(tmp_path, now_ms=MONDAY) as world:
        connector = world.connector
        connector.rosters = PeerRosters(connector.store.engine)
        assert legacy_staff_warnings(connector) == [
            f"no roster of {GATEWAY} held yet: its batches are refused (approver_unknown)"
        ]
        connector.approvals = dataclasses.replace(connector.approvals, allow_unverified=True)
        assert legacy_staff_warnings(connector) == [
            f"[[staff]] ids of {GATEWAY} decide only while no roster of it is held (deprecated); "
            "once one arrives every batch is verified against it"
        ]
        staff = SigningKey.generate()
        member = RosterMember("S-0001", "员工", ("admin", "exchange"), staff.public, MONDAY)
        v1 = build_roster(
            None, party_id=GATEWAY, issued_at_ms=MONDAY, effective_at_ms=notice_ends_at(MONDAY, 1, CALENDAR),
            admin_staff_id="S-0001", members=[member],
        )  # fmt: skip
        handler = connector.rosters.handler(
            trust=lambda: connector.courier.trust, notice=lambda: NOTICE, own_party_id=UNIT
        )
        assert handler(GATEWAY, sign_roster(v1, world.gateway.me.signing_key(MONDAY), staff), MONDAY) is None
        world.clock.set(v1.effective_at_ms)
        caplog.clear()
        assert legacy_staff_warnings(connector) == [f"the roster of {GATEWAY} lacks [[staff]] ids S-0002"]
        assert "员工" not in caplog.text


def test_the_unit_cannot_end_or_revoke_its_last_admin(tmp_path: Path) -> None:
    """On-call review H1: ending the only admin with a date (however soon) would leave a roster nobody can change."""
    with exchange_world(tmp_path, now_ms=MONDAY) as world:
        engine = world.connector.store.engine
        keys = {s: SigningKey.generate() for s in ("U-01", "U-02")}
        own = UnitRoster(engine, world.connector.courier.me, notice=NOTICE, gateways=[GATEWAY])
        own.init_admin("U-01", keys["U-01"], name="管理员", now_ms=MONDAY, roles="admin,exchange")
        own.add("U-01", keys["U-01"], "U-02", name="交换员", roles="exchange",
                public_key=keys["U-02"].public.raw, now_ms=MONDAY + MINUTE_MS)  # fmt: skip
        history = own.history()
        assert history is not None
        held = history.held_version
        with pytest.raises(RosterChangeRefused, match="no admin"):
            own.end("U-01", keys["U-01"], "U-01", now_ms=MONDAY + 2 * MINUTE_MS)
        with pytest.raises(RosterChangeRefused, match="no admin"):
            own.revoke("U-01", keys["U-01"], "U-01", now_ms=MONDAY + 2 * MINUTE_MS, urgent=True)
        after = own.history()
        assert after is not None and after.held_version == held
