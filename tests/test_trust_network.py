"""Trust that travels, between real processes (issue 11): a gateway and three connectors whose units verify every
approval against the agency's signed roster (no ``allow_unverified_approvals``).

Both sides register their staff with the roster commands (``hedui-gateway staff bootstrap-admin`` / ``roster add`` /
``roster end``, ``hedui-connector roster init-admin`` / ``on-duty``), each in a process of its own; the running
gateway's trust synchronisation carries the rosters both ways. Then:

* a commission approved by two rostered staff is answered by every unit asked, each answer set naming the unit's
  responsible staff member, verified by the gateway against the unit's roster (Procedure V.(二)(三));
* a member ended with ``hedui-gateway roster end`` (notice 0: at once) can approve nothing from that moment: the
  gateway refuses their approval, and a unit refuses a batch forged with an approval of theirs given after the end
  (the same approval given before the end is accepted);
* roster versions a peer must refuse arrive over the wire and are refused there, the reason in the signed
  acknowledgement, changing nothing: too short a notice (a unit that keeps the production notice of one working
  day), unsigned, signed by a member who is not an admin, a rollback to another version 1 (both directions).

Handler-level checks of each rule are in tests/test_roster.py, tests/test_gateway_rosters.py,
tests/test_connector_rosters.py and tests/test_connector_approvals.py; this is their wire path, once.
"""

from __future__ import annotations

import hashlib
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date

import grpc
import pytest
from hedui.v1 import agency_pb2, agency_pb2_grpc, exchange_pb2, exchange_pb2_grpc, records_pb2, trust_pb2
from sqlalchemy import Engine, Table, select

from common.db import make_engine
from connectors import store as cstore
from connectors.synthetic import Population
from connectors.trust.items import TrustItems as UnitItems
from demo.localnet import Network, build_network
from demo.rosters import (
    CommandFailed,
    StaffKeystore,
    agency_commands,
    connector_command,
    gateway_command,
    roster_state,
    run_command,
    run_unit_commands,
    staff_keystore,
    unit_commands,
    wait_for_rosters,
)
from gateway.db import schema
from gateway.exchange.approvals import TreeUnit
from gateway.trust.items import TrustItems as GatewayItems
from gateway.trust.rosters import PeerRosters
from keys import keystore
from keys.envelope import Courier
from keys.handles import SigningKey
from keys.identity import PartyKeys
from keys.keystore import FAST_FOR_TESTS
from keys.replay import MemoryReplayCache
from keys.roster import Roster, RosterMember, build_roster, sign_roster
from keys.statements import approval_message
from keys.steps import build_step, sign_step
from keys.truststore import TrustStore
from tests.approval_kit import prove
from tests.test_gateway_process import wait_until

GATEWAY = "agency.220100"
TAX, LAND, BANK = "unit.220100.tax", "unit.220100.land", "unit.220100.bank"
UNITS = {TAX: "tax", LAND: "land", BANK: "financial_institution"}
COMMISSIONER, BACKOFFICE = "commissioner.220102.mzj", "agency.220100.backoffice"
#: Asked of the tax and land units only: the bank keeps a longer notice and holds no roster of ours.
CATEGORIES = (records_pb2.DATA_CATEGORY_TAX, records_pb2.DATA_CATEGORY_REAL_ESTATE)
ROSTER = trust_pb2.TRUST_ITEM_KIND_ROSTER
GATEWAY_TABLES = (schema.trust_items, schema.trust_deliveries)
UNIT_TABLES = (cstore.trust_items, cstore.trust_deliveries)


def _now() -> int:
    return int(time.time() * 1000)


@dataclass
class TrustNetwork:
    net: Network
    staff: dict[str, StaffKeystore]
    gateway: Engine
    connectors: dict[str, subprocess.Popen[bytes]]

    def stub(self, party: str) -> agency_pb2_grpc.AgencyServiceStub:
        tls = self.net.root / "tls"
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(tls / "ca.crt").read_bytes(),
            private_key=(tls / f"{party}.client.key").read_bytes(),
            certificate_chain=(tls / f"{party}.client.crt").read_bytes(),
        )
        channel = grpc.secure_channel(f"127.0.0.1:{self.net.gateway_port}", credentials)
        return agency_pb2_grpc.AgencyServiceStub(channel)

    def unit_stub(self, unit: str) -> tuple[grpc.Channel, exchange_pb2_grpc.ExchangeServiceStub]:
        """An ExchangeService stub to ``unit`` with the gateway's own client certificate."""
        tls = self.net.root / "tls"
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(tls / "ca.crt").read_bytes(),
            private_key=(tls / f"{GATEWAY}.client.key").read_bytes(),
            certificate_chain=(tls / f"{GATEWAY}.client.crt").read_bytes(),
        )
        channel = grpc.secure_channel(f"localhost:{self.net.connector_ports[unit]}", credentials)
        return channel, exchange_pb2_grpc.ExchangeServiceStub(channel)

    def party(self, party: str) -> tuple[PartyKeys, TrustStore]:
        """A party's keys and trust store as the running service's keystore holds them."""
        path, secret = self.net.root / "keys" / f"{party}.keystore.json", self.net.root / "keys" / f"{party}.passphrase"
        return keystore.load(path, keystore.read_passphrase_file(secret))

    def key(self, staff_id: str) -> SigningKey:
        return self.staff[staff_id].signing_key(_now())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrustNetwork]:
    """The network, started, with both sides' staff registered by the commands and the rosters exchanged."""
    root = tmp_path_factory.mktemp("trust") / "net"
    net = build_network(
        root, UNITS, kdf=FAST_FOR_TESTS, clients={COMMISSIONER: "commissioner", BACKOFFICE: "staff_system"},
        trust_sync_interval=1.0, dispatch_interval=0.3, poll_interval=0.3, answer_interval=0.2, batch_size=50,
    )  # fmt: skip
    # The bank's operator keeps the production notice, one working day, while the agency announces at once: the
    # bank must refuse every version of ours that adds staff (Procedure V.(三): registered in advance).
    bank = net.connector_configs[BANK]
    bank.write_text(bank.read_text().replace("notice_working_days = 0", "notice_working_days = 1"))
    now = _now()
    staff = {s: staff_keystore(net, GATEWAY, s, now_ms=now, kdf=FAST_FOR_TESTS) for s in ("A-0001", "S-0001",
                                                                                      "S-0002", "S-0003")}  # fmt: skip
    admins = {u: staff_keystore(net, u, "U-0001", now_ms=now, kdf=FAST_FOR_TESTS) for u in (TAX, LAND)}
    gateway = make_engine(f"sqlite:///{root / 'data' / 'gateway.db'}")
    try:
        connectors = net.start_connectors()
        net.start_gateway()
        # The units' admins and the agency's work at the same time, each side with its own commands.
        members = [(staff["S-0001"], "核对员1", "exchange"), (staff["S-0002"], "核对员2", "exchange"),
                   (staff["S-0003"], "复核员", "review")]  # fmt: skip
        # The admin also does the intake check: intake and review by two different people (Procedure V.(一)).
        agency = agency_commands(net, staff["A-0001"], "管理员", members, admin_roles="admin,intake")
        with ThreadPoolExecutor(2) as pool:
            units_done = pool.submit(
                run_unit_commands, {u: unit_commands(net, u, admins[u], "单位管理员") for u in admins}
            )
            for command in agency:
                run_command(command)
            units_done.result()
        wait_for_rosters(net, [TAX, LAND], timeout=30)
        yield TrustNetwork(net, {**staff, **{f"{u}/U-0001": admins[u] for u in admins}}, gateway, connectors)
    finally:
        net.stop_all()
        gateway.dispose()


def _package(ref: str, start: int) -> agency_pb2.SubmitCommissionRequest:
    request = agency_pb2.SubmitCommissionRequest(
        letter=agency_pb2.CommissionLetter(number=ref, date=records_pb2.Date(year=2026, month=11, day=2)),
        programme=exchange_pb2.PROGRAMME_MINIMUM_LIVING_ALLOWANCE,
        income_from=records_pb2.YearMonth(year=2025, month=11),
        income_to=records_pb2.YearMonth(year=2026, month=10),
        assets_as_of=records_pb2.Date(year=2026, month=10, day=31),
        categories=CATEGORIES,
    )
    for household in Population(20261202).households(3, start=start):
        entry = request.households.add(household_ref=f"H{household.index:05d}")
        for member in household.members:
            entry.members.add(
                id_number=member.id_number,
                name=member.name,
                relation=agency_pb2.RELATION_APPLICANT if not len(entry.members) else agency_pb2.RELATION_FAMILY_MEMBER,
                authorisation=agency_pb2.PackageAuthorisation(
                    number=f"SQ{household.index:05d}{len(entry.members):02d}", signed=True, fingerprinted=True,
                    scan_sha256=hashlib.sha256(b"scan " + member.id_number.encode()).digest(),
                ),
                id_copy_sha256=hashlib.sha256(b"id copy " + member.id_number.encode()).digest(),
            )  # fmt: skip
    return request


def _reviewed(world: TrustNetwork, ref: str, start: int) -> agency_pb2.Commission:
    """A commission of three households from ``start``, taken in by A-0001 and reviewed by S-0003, each step signed
    with their own key."""
    commission = world.stub(COMMISSIONER).SubmitCommission(_package(ref, start))
    office = world.stub(BACKOFFICE)
    for staff_id, kind, record in (
        ("A-0001", agency_pb2.STEP_KIND_INTAKE, office.RecordIntake),
        ("S-0003", agency_pb2.STEP_KIND_REVIEW, office.RecordReview),
    ):
        step = build_step(agency=GATEWAY, commission_id=commission.commission_id, kind=kind, staff_id=staff_id,
                          exchange_digest=commission.exchange_digest)  # fmt: skip
        commission = record(
            agency_pb2.StaffDecision(commission_id=commission.commission_id, staff_id=staff_id, passed=True,
                                     signature=sign_step(step, world.key(staff_id)))
        )  # fmt: skip
    return commission


def _approve(world: TrustNetwork, commission: agency_pb2.Commission, staff_id: str) -> agency_pb2.Commission:
    signature = world.key(staff_id).sign(approval_message(commission.exchange_digest))
    return world.stub(BACKOFFICE).ApproveExchange(
        agency_pb2.ExchangeApproval(commission_id=commission.commission_id, staff_id=staff_id, signature=signature)
    )


def _receipts(engine: Engine, tables: tuple[Table, Table], payloads: list[bytes]) -> dict[bytes, str]:
    """Per payload, the peer's acknowledgement as the publisher recorded it (its trust_items and trust_deliveries
    tables): applied, or the refusal's reason."""
    items, deliveries = tables
    i, d = items.c, deliveries.c
    shas = [hashlib.sha256(p).digest() for p in payloads]
    with engine.connect() as conn:
        rows = conn.execute(
            select(i.sha256, d.acked_at_ms, d.applied, d.reason)
            .join_from(deliveries, items, d.item_id == i.id)
            .where(i.sha256.in_(shas))
        ).all()
    return {bytes(r.sha256): "applied" if r.applied else str(r.reason) for r in rows if r.acked_at_ms is not None}


def _acked_at(engine: Engine, payload: bytes) -> int | None:
    """When the gateway acknowledged the unit's item (None: not yet)."""
    i, d = cstore.trust_items.c, cstore.trust_deliveries.c
    with engine.connect() as conn:
        return conn.execute(
            select(d.acked_at_ms)
            .join_from(cstore.trust_deliveries, cstore.trust_items, d.item_id == i.id)
            .where(i.sha256 == hashlib.sha256(payload).digest())
        ).scalar_one_or_none()


def test_rosters_travel_both_ways_and_the_bank_refuses_too_short_a_notice(world: TrustNetwork) -> None:
    assert wait_until(lambda: roster_state(world.net, _now()).receipts.get(BANK, "").startswith("refused"), 15)
    history = run_command(gateway_command(world.net, "roster", "history"))
    versions = history.split("\nv")
    assert len(versions) == 2 and versions[0].startswith("v1 ") and versions[1].startswith("2 ")
    for version in versions:
        assert f"{TAX:32} applied" in version and f"{LAND:32} applied" in version
    # The bank keeps one working day of notice: version 1, which adds everyone at once, is refused for it, and
    # version 2 then follows a version it does not hold.
    assert f"{BANK:32} refused: roster_notice_too_short" in versions[0]
    assert f"{BANK:32} refused: roster_gap" in versions[1]
    # Refused: nothing changed at the bank.
    with pytest.raises(CommandFailed, match=f"no roster held: {GATEWAY}"):
        run_command(connector_command(world.net, BANK, "roster", "history", "--party", GATEWAY))
    # The bank agrees the agency's notice and restarts; the agency's operator offers it the refused versions again.
    bank = world.connectors[BANK]
    bank.terminate()
    bank.wait(20)
    config = world.net.connector_configs[BANK]
    config.write_text(config.read_text().replace("notice_working_days = 1", "notice_working_days = 0"))
    world.connectors.update(world.net.start_connectors(only=[BANK]))
    resent = run_command(gateway_command(world.net, "roster", "resend", "--unit", BANK))
    assert "2 refused version(s) (v1, v2) offered to unit.220100.bank again" in resent
    assert wait_until(lambda: roster_state(world.net, _now()).receipts.get(BANK) == "applied", 20)
    at_bank = run_command(connector_command(world.net, BANK, "roster", "history", "--party", GATEWAY))
    assert [line.split()[0] for line in at_bank.splitlines()] == ["v1", "v2"]
    again = run_command(gateway_command(world.net, "roster", "resend", "--unit", BANK))
    assert "refused no version of our roster: nothing to send again" in again
    at_tax = run_command(connector_command(world.net, TAX, "roster", "list", "--party", GATEWAY))
    assert "version 2 held, 2 in force now" in at_tax
    assert all(f"{s:12} active" in at_tax for s in ("A-0001", "S-0001", "S-0002")) and "S-0003" not in at_tax
    at_gateway = run_command(gateway_command(world.net, "roster", "list", "--party", LAND))
    assert "version 1 held, 1 in force now" in at_gateway and "U-0001       active" in at_gateway
    # The unit's admin sees the gateway's receipt of the unit's own version.
    own_history = run_command(connector_command(world.net, LAND, "roster", "history"))
    assert own_history.splitlines()[0].startswith("v1 ") and f"{GATEWAY:32} applied" in own_history


def test_an_approved_commission_is_answered_naming_each_units_verified_staff(world: TrustNetwork) -> None:
    commission = _reviewed(world, "TN-1", start=0)
    _approve(world, commission, "S-0001")
    commission = _approve(world, commission, "S-0002")
    assert commission.state == agency_pb2.COMMISSION_STATE_EXCHANGING
    ref = agency_pb2.CommissionRef(commission_id=commission.commission_id)
    office = world.stub(COMMISSIONER)

    def answered() -> bool:
        progress = office.GetProgress(ref)
        return len(progress.units) == 2 and all(u.answered == commission.subjects for u in progress.units)

    assert wait_until(answered, 30), office.GetProgress(ref)
    b, a = schema.batches.c, schema.answer_staff.c
    with world.gateway.connect() as conn:
        rows = conn.execute(
            select(b.unit_id, a.staff_ids, a.roster_version)
            .join_from(schema.batches, schema.answer_staff, a.batch_id == b.batch_id)
            .join(schema.commissions, schema.commissions.c.id == b.commission_id)
            .where(schema.commissions.c.ref == commission.commission_id)
        ).all()
    assert sorted((r.unit_id, r.staff_ids, r.roster_version) for r in rows) == [
        (LAND, "U-0001", 1),
        (TAX, "U-0001", 1),
    ]
    status = run_command(gateway_command(world.net, "status"))
    assert status.count("answer staff U-0001: 1 batch, checked against the unit's roster v1") == 2


def test_a_member_ended_can_no_longer_approve_at_the_gateway_nor_at_a_unit(world: TrustNetwork) -> None:
    ended = run_command(
        gateway_command(world.net, "roster", "end", "--admin", "A-0001", "--admin-keystore",
                        str(world.staff["A-0001"].keystore), "--passphrase-file",
                        str(world.staff["A-0001"].passphrase_file), "--staff-id", "S-0002")
    )  # fmt: skip
    assert "S-0002 ends at" in ended and "roster version" in ended
    own = PeerRosters(world.gateway).own()
    assert own is not None and own.latest is not None
    member = own.latest.roster.member("S-0002")
    assert member is not None and member.valid_until_ms is not None
    end_ms = member.valid_until_ms
    # The gateway: S-0002 is no longer registered for the exchange.
    commission = _reviewed(world, "TN-2", start=10)
    _approve(world, commission, "S-0001")
    with pytest.raises(grpc.RpcError) as refused:
        _approve(world, commission, "S-0002")
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "S-0002 is not registered for exchange now" in (refused.value.details() or "")
    # A unit, once version 3 reached it, refuses a batch with an approval S-0002 gave after the end. Forged here
    # with the gateway's own keys and the staff members' own keys: everything else about the batch verifies.
    sha = hashlib.sha256(own.latest.data).digest()
    assert wait_until(lambda: _receipts(world.gateway, GATEWAY_TABLES, [own.latest.data]).get(sha) == "applied", 15)
    while _now() <= end_ms + 5:
        time.sleep(0.01)
    gateway_keys, gateway_trust = world.party(GATEWAY)
    courier = Courier(gateway_keys, gateway_trust, replay=MemoryReplayCache())
    subjects = [
        exchange_pb2.QuerySubject(
            subject_ref=f"P{i}", id_number=m.id_number, name=m.name,
            authorisation=exchange_pb2.Authorisation(number=f"AUTH-{i}",
                                                     scan_sha256=hashlib.sha256(m.id_number.encode()).digest()),
        )
        for i, m in enumerate(m for h in Population(7).households(2) for m in h.members)
    ]  # fmt: skip
    proved = prove(
        GATEWAY, "TN-FORGED", subjects,
        [TreeUnit(TAX, (records_pb2.DATA_CATEGORY_TAX,)), TreeUnit(LAND, (records_pb2.DATA_CATEGORY_REAL_ESTATE,))],
        income_from=(2025, 11), income_to=(2026, 10), assets_as_of=date(2026, 10, 31),
    )  # fmt: skip

    def batch(batch_id: str, at_ms: int) -> bytes:
        approvals = [
            exchange_pb2.StaffApproval(staff_id=s, signature=world.key(s).sign(approval_message(proved.root)),
                                       approved_at_ms=at_ms)
            for s in ("S-0001", "S-0002")
        ]  # fmt: skip
        return courier.seal(proved.batch(batch_id, TAX, range(len(subjects)), approvals), TAX)

    channel, stub = world.unit_stub(TAX)
    try:
        with pytest.raises(grpc.RpcError) as late:
            stub.SubmitBatch(exchange_pb2.SealedMessage(envelope=batch("B-AFTER-END", end_ms + 1)), timeout=10)
        assert late.value.code() == grpc.StatusCode.PERMISSION_DENIED
        reasons = [str(m.value) for m in late.value.trailing_metadata() or () if m.key == "hedui-refusal-reason"]
        assert reasons == ["approver_expired"] and "S-0002" in (late.value.details() or "")
        # The same approvals given a moment before the end verify: the end alone made the difference.
        receipt = stub.SubmitBatch(exchange_pb2.SealedMessage(envelope=batch("B-BEFORE-END", end_ms - 1)), timeout=10)
        assert receipt.envelope
    finally:
        channel.close()


def test_roster_versions_a_peer_must_refuse_are_refused_over_the_wire_and_change_nothing(
    world: TrustNetwork,
) -> None:
    own = PeerRosters(world.gateway).own()
    assert own is not None and own.latest is not None
    held = own.latest.roster
    now = _now()
    gateway_keys, _ = world.party(GATEWAY)
    party_key, admin_key = gateway_keys.signing_key(now), world.key("A-0001")
    newcomer = RosterMember("S-0009", "新人", ("exchange",), SigningKey.generate().public, now)

    def next_version(admin: str) -> Roster:
        return build_roster(held, party_id=GATEWAY, members=[*held.members, newcomer], issued_at_ms=now,
                            effective_at_ms=now, admin_staff_id=admin)  # fmt: skip

    first = own.versions[0].roster
    other_first = build_roster(None, party_id=GATEWAY, members=first.members, issued_at_ms=now,
                               effective_at_ms=now, admin_staff_id="A-0001")  # fmt: skip
    forged = {
        "roster_malformed": trust_pb2.SignedRoster(roster=next_version("A-0001").encode()).SerializeToString(),
        "roster_not_admin": sign_roster(next_version("S-0001"), party_key, world.key("S-0001")),
        "roster_rollback": sign_roster(other_first, party_key, admin_key),
    }
    with world.gateway.begin() as conn:
        for payload in forged.values():
            GatewayItems(world.gateway).publish(conn, ROSTER, payload, now, [TAX])
    payloads = list(forged.values())
    assert wait_until(lambda: len(_receipts(world.gateway, GATEWAY_TABLES, payloads)) == 3, 15)
    receipts = _receipts(world.gateway, GATEWAY_TABLES, payloads)
    assert {code: receipts[hashlib.sha256(p).digest()] for code, p in forged.items()} == {c: c for c in forged}
    at_tax = run_command(connector_command(world.net, TAX, "roster", "history", "--party", GATEWAY))
    assert [line.split()[0] for line in at_tax.splitlines()] == [f"v{n}" for n in range(1, held.version + 1)]

    # The other way: the tax unit offers another version 1 of its own roster; the gateway refuses it.
    tax_keys, _ = world.party(TAX)
    unit_admin = world.key(f"{TAX}/U-0001")
    unit_history = PeerRosters(world.gateway).history(TAX)
    assert unit_history is not None and unit_history.latest is not None
    again = build_roster(None, party_id=TAX, members=unit_history.latest.roster.members, issued_at_ms=_now(),
                         effective_at_ms=_now(), admin_staff_id="U-0001")  # fmt: skip
    payload = sign_roster(again, tax_keys.signing_key(_now()), unit_admin)
    unit_engine = make_engine(f"sqlite:///{world.net.root / 'data' / f'{TAX}.db'}")
    try:
        with unit_engine.begin() as conn:
            UnitItems(unit_engine).publish(conn, ROSTER, payload, _now(), [GATEWAY])
        sha = hashlib.sha256(payload).digest()
        assert wait_until(lambda: sha in _receipts(unit_engine, UNIT_TABLES, [payload]), 15)
        assert _receipts(unit_engine, UNIT_TABLES, [payload])[sha] == "roster_rollback"
        # Offered again by the unit's operator, it is refused again for the same reason: resending fixes nothing.
        refused_at = _acked_at(unit_engine, payload)
        resent = run_command(connector_command(world.net, TAX, "roster", "resend", "--gateway", GATEWAY))
        assert f"1 refused version(s) offered to {GATEWAY} again" in resent
        assert wait_until(lambda: (_acked_at(unit_engine, payload) or 0) > (refused_at or 0), 15)
        assert _receipts(unit_engine, UNIT_TABLES, [payload])[sha] == "roster_rollback"
    finally:
        unit_engine.dispose()
    assert PeerRosters(world.gateway).held_version(TAX) == 1
