"""The verification report (核对报告) built from real answers: connectors over mutual TLS answer a commission, the
gateway stores the answers, and the report is built, signed, rendered and verified from that database; open
items refuse it unless a partial report names them; ``hedui-keys verify-report`` checks the signed file."""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from hedui.v1 import agency_pb2, exchange_pb2, records_pb2
from sqlalchemy import select, update

from common.categories import RECORD_FIELD
from connectors.synthetic import Household, Relation
from gateway.db import schema
from gateway.exchange.outbox import SubjectInput
from gateway.procedure.report import (
    FIELD_LABELS,
    OBJECTION_WORKING_DAYS,
    REPORT_DOMAIN,
    ReportRefused,
    annual_income_fen,
    build_report,
    describe_record,
    mask_id_number,
    money,
    render_html,
    sign_report,
    verify_signed_report,
    verify_signed_report_by,
)
from gateway.procedure.routing import route
from keys.announcements import armor, read_bundle
from keys.cli import main as keys_main
from keys.errors import TrustError
from keys.identity import PartyKeys
from keys.statements import read_signed_report
from keys.truststore import TrustStore
from tests.conftest import write_passphrase
from tests.conftest_pg import postgres_schema
from tests.exchange_world import GATEWAY, beijing_ms
from tests.gateway_drive import BANK, LAND, TAX, bring_up, execute, rows, settle
from tests.gateway_world import CATEGORIES, GatewayWorld, commission_input, gateway_world

MONDAY = beijing_ms(2026, 3, 2)
ISSUED = beijing_ms(2026, 3, 16, 15)
COMMISSIONER = "office.220102.civil"
LETTER = "JL-220102-2026-0012"
SCRIPT_NAME = "张<script>alert(1)</script>"
#: 20,000 yuan: the deposit limit sent with the threshold commission.
LIMIT_FEN = 2_000_000
PASSPHRASE = "correct horse battery staple"

_RELATIONS = {
    Relation.APPLICANT: agency_pb2.RELATION_APPLICANT,
    Relation.SUPPORT_OBLIGOR: agency_pb2.RELATION_SUPPORT_OBLIGOR,
}


def _submit(
    world: GatewayWorld, ref: str, households: list[Household], *, thresholds: tuple[tuple[int, int], ...] = ()
) -> int:
    """Enqueue a commission as the workflow does once the exchange is approved: the verification list with its
    household references, member positions and relations, and the commission letter."""
    members = [(h, i, m) for h in households for i, m in enumerate(h.members)]
    subjects = [
        SubjectInput(
            subject_ref=f"{ref}-{n}",
            id_number=m.id_number,
            name=m.name,
            auth_number=f"AUTH-{ref}-{n}",
            auth_digest=hashlib.sha256(m.id_number.encode()).digest(),
        )
        for n, (_, _, m) in enumerate(members)
    ]
    commission = commission_input(ref, thresholds=thresholds)
    units = route(CATEGORIES, world.store.units.all())
    commission_id = world.enqueue(commission, subjects, units)
    execute(
        world,
        update(schema.commissions)
        .where(schema.commissions.c.id == commission_id)
        .values(letter_number=LETTER, letter_date=date(2026, 3, 1), commissioner=COMMISSIONER),
    )
    for n, (household, index, member) in enumerate(members):
        execute(
            world,
            update(schema.subjects)
            .where(schema.subjects.c.commission_id == commission_id, schema.subjects.c.subject_ref == f"{ref}-{n}")
            .values(
                household_ref=household.household_id,
                member_index=index,
                relation=_RELATIONS.get(member.relation, agency_pb2.RELATION_FAMILY_MEMBER),
            ),
        )
    return commission_id


@dataclass
class Answered:
    """What the database holds for a commission, read back independently of gateway/procedure/report.py."""

    subjects: list[Any]
    #: subject id -> [(unit id, status, records)]
    answers: dict[int, list[tuple[str, int, list[records_pb2.Record]]]]

    def household_records(self, household_ref: str) -> list[records_pb2.Record]:
        ids = [p.id for p in self.subjects if p.household_ref == household_ref]
        return [r for i in ids for _, _, records in self.answers.get(i, []) for r in records]


def _answered(world: GatewayWorld, commission_id: int) -> Answered:
    subjects = rows(
        world,
        select(schema.subjects).where(schema.subjects.c.commission_id == commission_id).order_by(schema.subjects.c.id),
    )
    found = rows(
        world,
        select(schema.items.c.subject_id, schema.items.c.unit_id, schema.answers.c.status, schema.answers.c.body)
        .select_from(schema.items.join(schema.answers, schema.answers.c.item_id == schema.items.c.id))
        .where(schema.items.c.commission_id == commission_id),
    )
    answers: dict[int, list[tuple[str, int, list[records_pb2.Record]]]] = defaultdict(list)
    for row in found:
        body = exchange_pb2.SubjectAnswer.FromString(row.body)
        answers[row.subject_id].append((row.unit_id, row.status, list(body.records)))
    return Answered(subjects, dict(answers))


@dataclass
class Exchanged:
    world: GatewayWorld
    full: int
    threshold: int
    households: list[Household]


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def exchanged(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exchanged]:
    """One exchange network, two fully answered commissions: deposits as amounts, then deposits as limit flags
    (the bank configured to answer deposits as threshold flags, as its connector config would say). On SQLite
    and on the real PostgreSQL."""
    with ExitStack() as stack:
        url = stack.enter_context(postgres_schema()) if request.param == "postgresql" else None
        world = stack.enter_context(gateway_world(tmp_path_factory.mktemp("report"), now_ms=MONDAY, database_url=url))
        households = list(world.population.households(8))
        last = households[-1]
        households[-1] = replace(last, members=(replace(last.members[0], name=SCRIPT_NAME), *last.members[1:]))
        full = _submit(world, "RPT-1", households)
        settle(world)
        world.connectors[BANK].connector.threshold_categories = frozenset({records_pb2.DATA_CATEGORY_DEPOSITS})
        threshold = _submit(
            world,
            "RPT-T",
            list(world.population.households(12, start=100)),
            thresholds=((records_pb2.DATA_CATEGORY_DEPOSITS, LIMIT_FEN),),
        )
        settle(world)
        world.clock.set(ISSUED)
        yield Exchanged(world, full, threshold, households)


def _report(ex: Exchanged, commission_id: int | None = None, **changes: Any) -> agency_pb2.Report:
    args: dict[str, Any] = {"agency": GATEWAY, "issued_by": "S-0003", "partial": False, "now_ms": ISSUED}
    args.update(changes)
    return build_report(ex.world.store.engine, ex.full if commission_id is None else commission_id, **args)


def _gateway_keys(ex: Exchanged) -> PartyKeys:
    return ex.world.engine.courier.me


def _trusting(owner: PartyKeys, now_ms: int) -> TrustStore:
    """A commissioner's trust store that imported ``owner``'s bundle after comparing its fingerprint."""
    trust = TrustStore()
    bundle = owner.bundle(now_ms)
    trust.import_bundle(bundle, expected_fingerprint=read_bundle(bundle).fingerprint)
    return trust


# -- content ----------------------------------------------------------------------------------------------------------


def test_full_report_lists_every_member_and_every_returned_row(exchanged: Exchanged) -> None:
    report = _report(exchanged)
    db = _answered(exchanged.world, exchanged.full)
    assert (report.commission_id, report.letter_number, report.commissioner) == ("RPT-1", LETTER, COMMISSIONER)
    assert (report.agency, report.issued_by, report.issued_at_ms, report.partial) == (GATEWAY, "S-0003", ISSUED, False)
    assert report.programme == exchange_pb2.PROGRAMME_MINIMUM_LIVING_ALLOWANCE
    assert (report.income_from.year, report.income_from.month, report.income_to.month) == (2025, 9, 2)
    assert (report.assets_as_of.year, report.assets_as_of.month, report.assets_as_of.day) == (2026, 2, 28)
    assert not report.units_not_answered

    # Households in the package's order, members in their positions, with relation, name and ID number.
    assert [h.household_ref for h in report.households] == [h.household_id for h in exchanged.households]
    for household, listed in zip(report.households, exchanged.households, strict=True):
        assert [(m.member_index, m.name, m.id_number) for m in household.members] == [
            (i, p.name, p.id_number) for i, p in enumerate(listed.members)
        ]
        assert household.members[0].relation == agency_pb2.RELATION_APPLICANT
    by_id = {p.id_number: p.id for p in db.subjects}
    total = 0
    for household in report.households:
        for member in household.members:
            answers = db.answers[by_id[member.id_number]]
            # Every unit answered every member; its status is the one stored.
            assert dict(member.unit_status) == {unit: status for unit, status, _ in answers}
            assert set(member.unit_status) == {TAX, LAND, BANK}
            expected = sorted(
                (r.category, unit, r.SerializeToString(deterministic=True))
                for unit, _, records in answers
                for r in records
            )
            got = [(f.category, f.unit_id, f.record.SerializeToString(deterministic=True)) for f in member.findings]
            assert sorted(got) == expected
            assert [f.category for f in member.findings] == sorted(f.category for f in member.findings)
            for finding in member.findings:
                # The unit that returned the row and when it produced it (the moment it answered the batch).
                assert finding.record.category == finding.category
                assert finding.record.WhichOneof("body") == RECORD_FIELD[finding.category]
                assert MONDAY <= finding.record.produced_at_ms < ISSUED
            total += len(member.findings)
    assert total == sum(len(records) for answers in db.answers.values() for _, _, records in answers) > 0
    scripted = report.households[-1].members[0]
    assert scripted.name == SCRIPT_NAME and not scripted.findings
    assert set(scripted.unit_status.values()) <= {
        exchange_pb2.SUBJECT_STATUS_NAME_MISMATCH,
        exchange_pb2.SUBJECT_STATUS_NO_RECORD,
    }


def test_summary_figures_follow_the_answers(exchanged: Exchanged) -> None:
    report = _report(exchanged)
    db = _answered(exchanged.world, exchanged.full)
    kinds_seen: set[str | None] = set()
    for household in report.households:
        records = db.household_records(household.household_ref)
        kinds_seen |= {r.WhichOneof("body") for r in records}
        deposits = sum(r.deposit.balance_fen for r in records if r.WhichOneof("body") == "deposit")
        taxable = sum(r.tax.taxable_income_fen for r in records if r.WhichOneof("body") == "tax")
        summary = household.summary
        assert summary.deposits_fen == deposits
        assert summary.properties == sum(r.WhichOneof("body") == "real_estate" for r in records)
        # The income period September to February is six months: taxable income counts twice for a year.
        assert summary.annual_income_fen == taxable * 12 // 6
        assert (summary.vehicles, summary.business_roles, summary.deposits_above_limit) == (0, 0, 0)
    assert {"deposit", "real_estate", "tax"} <= kinds_seen
    assert sum(h.summary.deposits_fen for h in report.households) > 0
    assert sum(h.summary.properties for h in report.households) > 0


def test_deposits_answered_as_limit_flags_count_members_above_the_limit(exchanged: Exchanged) -> None:
    report = _report(exchanged, exchanged.threshold)
    db = _answered(exchanged.world, exchanged.threshold)
    flags = 0
    for household in report.households:
        records = db.household_records(household.household_ref)
        assert not [r for r in records if r.WhichOneof("body") == "deposit"]  # no amounts left the bank
        above = 0
        for p in (p for p in db.subjects if p.household_ref == household.household_ref):
            mine = [r for _, _, records in db.answers[p.id] for r in records]
            flags += sum(r.WhichOneof("body") == "deposit_threshold" for r in mine)
            above += any(r.WhichOneof("body") == "deposit_threshold" and r.deposit_threshold.above_limit for r in mine)
        assert household.summary.deposits_above_limit == above
        assert household.summary.deposits_fen == 0
    assert flags > 0
    assert sum(h.summary.deposits_above_limit for h in report.households) > 0


def test_annual_income_rule() -> None:
    def record(**body: Any) -> records_pb2.Record:
        return records_pb2.Record(**body)

    records = [
        record(tax=records_pb2.TaxRecord(taxable_income_fen=1_000_000)),
        record(tax=records_pb2.TaxRecord(taxable_income_fen=500_001)),
        record(social_insurance=records_pb2.SocialInsurance(monthly_benefit_fen=300_000)),
        record(employment=records_pb2.Employment(monthly_unemployment_benefit_fen=180_000)),
        record(state_payroll=records_pb2.StatePayroll(monthly_salary_fen=450_000)),
        record(deposit=records_pb2.Deposit(balance_fen=99_999_999)),
        record(social_assistance=records_pb2.SocialAssistance(monthly_amount_fen=60_000)),
    ]
    # (1,500,001 * 12) // 9 for taxable income over a nine-month period, plus (3,000 + 1,800 + 4,500) yuan * 12.
    assert annual_income_fen(records, 9) == 2_000_001 + 930_000 * 12
    assert annual_income_fen(records, 12) == 1_500_001 + 930_000 * 12
    assert annual_income_fen([], 6) == 0


def test_footnotes_cite_the_regulation_and_the_objection_window(exchanged: Exchanged) -> None:
    notes = list(_report(exchanged).footnotes)
    assert any("仅用于社会救助审核审批" in n and "第十六条" in n for n in notes)
    assert any("信息共享单位反馈数据" in n and "第五条" in n for n in notes)
    assert any(f"{OBJECTION_WORKING_DAYS}个工作日内" in n and "复核" in n for n in notes)
    assert any("年收入估算" in n and "6个月" in n for n in notes)
    assert not any("部分报告" in n for n in notes)


def test_the_same_database_gives_the_same_report(exchanged: Exchanged) -> None:
    first = _report(exchanged).SerializeToString(deterministic=True)
    with exchanged.world.store.engine.connect() as conn:
        again = build_report(conn, exchanged.full, agency=GATEWAY, issued_by="S-0003", partial=False, now_ms=ISSUED)
    assert again.SerializeToString(deterministic=True) == first


# -- refusals ---------------------------------------------------------------------------------------------------------


def test_open_items_refuse_the_report_unless_partial_and_the_partial_report_names_them(
    tmp_path: Path, database_url: str | None
) -> None:
    with ExitStack() as stack:
        world = stack.enter_context(
            gateway_world(tmp_path, now_ms=MONDAY, database_url=database_url, down=frozenset({LAND}))
        )
        commission_id = _submit(world, "RPT-OPEN", list(world.population.households(5)))
        settle(world)
        land_items = len(
            rows(
                world,
                select(schema.items.c.id).where(
                    schema.items.c.commission_id == commission_id, schema.items.c.unit_id == LAND
                ),
            )
        )
        args: dict[str, Any] = {"agency": GATEWAY, "issued_by": "S-0003", "now_ms": world.clock.now_ms()}
        with pytest.raises(ReportRefused) as refused:
            build_report(world.store.engine, commission_id, partial=False, **args)
        assert refused.value.open_items == {LAND: land_items}
        message = str(refused.value)
        assert f"{land_items} item(s)" in message and LAND in message and "partial report" in message
        assert not re.search(r"\d{17}[\dX]", message)  # counts and unit ids only: no ID number

        partial = build_report(world.store.engine, commission_id, partial=True, **args)
        assert partial.partial and list(partial.units_not_answered) == [LAND]
        missing = [n for n in partial.footnotes if n.startswith("部分报告")]
        assert len(missing) == 1 and LAND in missing[0] and f"{land_items}项" in missing[0] and "S-0003" in missing[0]
        assert "国土资源" in missing[0]
        for member in (m for h in partial.households for m in h.members):
            assert set(member.unit_status) == {TAX, BANK}
            assert {f.unit_id for f in member.findings} <= {TAX, BANK}
        page = render_html(partial)
        assert "部分报告" in page and f"{LAND}：未反馈" in page

        # The land registry comes back and answers: the report is complete, and "partial" asks for nothing more.
        bring_up(world, LAND, stack)
        world.clock.advance(3_600_000)
        settle(world)
        args["now_ms"] = world.clock.now_ms()
        for flag in (False, True):
            complete = build_report(world.store.engine, commission_id, partial=flag, **args)
            assert not complete.partial and not complete.units_not_answered
            assert not [n for n in complete.footnotes if n.startswith("部分报告")]


def test_cancelled_queries_are_listed_as_not_answered_without_blocking(
    tmp_path: Path, database_url: str | None
) -> None:
    with gateway_world(tmp_path, now_ms=MONDAY, database_url=database_url, down=frozenset({LAND})) as world:
        commission_id = _submit(world, "RPT-CANCEL", list(world.population.households(3)))
        settle(world)
        execute(
            world,
            update(schema.items)
            .where(schema.items.c.commission_id == commission_id, schema.items.c.unit_id == LAND)
            .values(cancelled_at_ms=world.clock.now_ms()),
        )
        report = build_report(
            world.store.engine, commission_id, agency=GATEWAY, issued_by="S-0003", partial=False, now_ms=MONDAY
        )
        assert not report.partial and list(report.units_not_answered) == [LAND]
        assert any("已撤销" in n and LAND in n for n in report.footnotes)


def test_no_report_for_unknown_returned_or_terminated_commissions(exchanged: Exchanged) -> None:
    with pytest.raises(ReportRefused, match="does not exist"):
        _report(exchanged, 9999)
    world = exchanged.world
    for state in ("returned", "terminated"):
        execute(world, update(schema.commissions).where(schema.commissions.c.id == exchanged.full).values(state=state))
        try:
            with pytest.raises(ReportRefused, match=state):
                _report(exchanged)
        finally:
            execute(
                world,
                update(schema.commissions).where(schema.commissions.c.id == exchanged.full).values(state="exchanging"),
            )


# -- signature --------------------------------------------------------------------------------------------------------


def test_signed_report_verifies_with_the_gateway_key_and_the_trust_store(exchanged: Exchanged) -> None:
    party = _gateway_keys(exchanged)
    report = _report(exchanged)
    signed = sign_report(report, party, ISSUED)
    assert signed.report == report.SerializeToString(deterministic=True)
    key = party.signing_key(ISSUED)
    assert signed.signer_key_id == key.key_id
    assert key.public.verify(signed.signature, REPORT_DOMAIN + signed.report)
    assert REPORT_DOMAIN == b"hedui.v1.report\x00"
    assert verify_signed_report(signed, key.public) == report
    assert verify_signed_report_by(signed, _trusting(party, ISSUED), GATEWAY) == report
    assert signed.html == render_html(report, signer_key_id=key.key_id)
    # Ed25519 is deterministic: the same report signs to the same bytes.
    assert sign_report(report, party, ISSUED).SerializeToString() == signed.SerializeToString()


def test_every_bit_flip_of_the_report_bytes_fails(exchanged: Exchanged) -> None:
    party = _gateway_keys(exchanged)
    signed = sign_report(_report(exchanged), party, ISSUED)
    public = party.signing_key(ISSUED).public
    trust = _trusting(party, ISSUED)
    bits = len(signed.report) * 8
    for bit in sorted({*range(0, bits, max(1, bits // 150)), bits - 1, 0}):
        tampered = agency_pb2.SignedReport()
        tampered.CopyFrom(signed)
        data = bytearray(signed.report)
        data[bit // 8] ^= 1 << (bit % 8)
        tampered.report = bytes(data)
        with pytest.raises(TrustError):
            verify_signed_report(tampered, public)
        with pytest.raises(TrustError):
            verify_signed_report_by(tampered, trust, GATEWAY)
    bad_signature = agency_pb2.SignedReport()
    bad_signature.CopyFrom(signed)
    bad_signature.signature = bytes([signed.signature[0] ^ 0x80]) + signed.signature[1:]
    with pytest.raises(TrustError, match="does not verify"):
        verify_signed_report(bad_signature, public)


def test_wrong_key_wrong_agency_unknown_party_and_revoked_key_fail(exchanged: Exchanged) -> None:
    report = _report(exchanged)
    party = PartyKeys.create(GATEWAY, now_ms=MONDAY)
    signed = sign_report(report, party, ISSUED)
    other = PartyKeys.create("agency.220000", now_ms=MONDAY)
    with pytest.raises(TrustError, match="not by key"):
        verify_signed_report(signed, other.signing_key(ISSUED).public)
    with pytest.raises(TrustError, match="not in the trust store"):
        verify_signed_report_by(signed, _trusting(other, ISSUED), GATEWAY)
    # Another agency's keys do not vouch for a report naming this one.
    with pytest.raises(TrustError, match="names agency"):
        verify_signed_report_by(signed, _trusting(other, ISSUED), "agency.220000")
    # The trust store knows the gateway, but under other keys (a bundle from a different key set).
    with pytest.raises(TrustError, match="not known to hold"):
        verify_signed_report_by(signed, _trusting(_gateway_keys(exchanged), ISSUED), GATEWAY)
    trust = _trusting(party, ISSUED)
    assert verify_signed_report_by(signed, trust, GATEWAY) == report
    key_id = party.signing_key(ISSUED).key_id
    trust.apply_announcement(party.revoke(key_id, now_ms=ISSUED + 1, reason="compromised"), now_ms=ISSUED + 1)
    with pytest.raises(TrustError, match="revoked"):
        verify_signed_report_by(signed, trust, GATEWAY)


def test_a_report_is_signed_only_by_its_agency_with_a_key_valid_at_issue(exchanged: Exchanged) -> None:
    party = _gateway_keys(exchanged)
    with pytest.raises(ValueError, match="names agency"):
        sign_report(_report(exchanged, agency="agency.220000"), party, ISSUED)
    # Issued (back-dated) before the gateway's key existed: nobody could verify it, so it is not signed.
    with pytest.raises(ValueError, match="not valid at the report's issue time"):
        sign_report(_report(exchanged, now_ms=MONDAY - 86_400_000), party, ISSUED)


# -- rendering --------------------------------------------------------------------------------------------------------


def test_html_escapes_every_value_and_masks_id_numbers(exchanged: Exchanged) -> None:
    report = _report(exchanged)
    page = sign_report(report, _gateway_keys(exchanged), ISSUED).html
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    numbers = [m.id_number for h in report.households for m in h.members]
    for number in numbers:
        assert number not in page
        assert mask_id_number(number) in page
    assert mask_id_number("220102199001011234") == "220102********1234"
    unmasked = render_html(report, mask_ids=False)
    assert all(number in unmasked for number in numbers)


def test_html_is_a_printable_chinese_report(exchanged: Exchanged) -> None:
    report = _report(exchanged)
    signed = sign_report(report, _gateway_keys(exchanged), ISSUED)
    page = signed.html
    assert page.startswith("<!DOCTYPE html>") and '<html lang="zh-CN">' in page and "@page { size: A4" in page
    assert "核对报告" in page and LETTER in page and COMMISSIONER in page and GATEWAY in page
    assert "最低生活保障" in page and "2025年09月至2026年02月" in page and "2026年02月28日" in page
    assert "2026-03-16 15:00:00（北京时间）" in page
    assert "申请人" in page and "家庭汇总" in page and "未反馈单位" in page
    assert signed.signer_key_id.hex() in page and hashlib.sha256(signed.report).hexdigest() in page
    assert "hedui-keys verify-report" in page
    for note in report.footnotes:
        assert note.replace("<", "&lt;") in page
    # Every returned row with its unit and produced time; money as yuan.
    findings = [f for h in report.households for m in h.members for f in m.findings]
    for finding in findings:
        assert finding.unit_id in page
    deposit = next(f.record.deposit for f in findings if f.record.WhichOneof("body") == "deposit")
    assert money(deposit.balance_fen) in page
    assert re.search(r"¥\d{1,3}(,\d{3})*\.\d{2}", page)
    assert "<script" not in page.lower().replace("&lt;script", "")


def test_money_and_record_labels() -> None:
    assert (money(123456), money(5), money(0), money(-100_000_050)) == ("¥1,234.56", "¥0.05", "¥0.00", "-¥1,000,000.50")
    body_fields = {
        f.name
        for field in records_pb2.Record.DESCRIPTOR.oneofs_by_name["body"].fields
        for f in getattr(records_pb2.Record(), field.name).DESCRIPTOR.fields
    }
    assert body_fields <= set(FIELD_LABELS)
    estate = records_pb2.Record(
        real_estate=records_pb2.RealEstate(
            certificate_no="吉(2019)长春市不动产权第0001234号",
            area_centi_m2=8_523,
            co_owner_count=1,
            registered_on=records_pb2.Date(year=2019, month=5, day=7),
        )
    )
    assert describe_record(estate) == [
        ("证书编号", "吉(2019)长春市不动产权第0001234号"),
        ("面积", "85.23 平方米"),
        ("其他共有人数", "1人"),
        ("登记日期", "2019-05-07"),
    ]
    business = records_pb2.Record(
        business=records_pb2.BusinessRegistration(
            role=records_pb2.BUSINESS_ROLE_INVESTOR, share_basis_points=2_550, registered_capital_fen=100_000_000
        )
    )
    assert ("身份", "出资人（股东）") in describe_record(business)
    assert ("出资比例", "25.50%") in describe_record(business)
    assert ("注册资本", "¥1,000,000.00") in describe_record(business)


# -- hedui-keys verify-report -------------------------------------------------------------------------------------


def _keystore(root: Path, party_id: str) -> list[str]:
    root.mkdir()
    passfile = write_passphrase(root / "passphrase", PASSPHRASE)
    args = ["--keystore", str(root / "keystore.json"), "--passphrase-file", str(passfile)]
    assert keys_main([*args, "init", party_id]) == 0
    return args


def test_cli_verify_report_ok_and_tampered(
    exchanged: Exchanged, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    party = _gateway_keys(exchanged)
    signed = sign_report(_report(exchanged), party, ISSUED)
    report_file = tmp_path / "RPT-1.report"
    report_file.write_bytes(signed.SerializeToString())
    assert read_signed_report(report_file.read_bytes()) == signed
    bundle_file = tmp_path / "gateway.bundle"
    bundle_file.write_text(armor(party.bundle(ISSUED)))
    fingerprint = read_bundle(party.bundle(ISSUED)).fingerprint

    # The commissioner's keystore trusts the gateway after comparing the fingerprint.
    commissioner = _keystore(tmp_path / "commissioner", COMMISSIONER)
    assert keys_main([*commissioner, "import", str(bundle_file), "--fingerprint", fingerprint]) == 0
    capsys.readouterr()
    assert keys_main([*commissioner, "verify-report", str(report_file)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK: the report is signed by {GATEWAY}")
    assert "RPT-1" in out and "2026-03-16 15:00:00 Beijing time" in out and "partial:     no" in out
    assert hashlib.sha256(signed.report).hexdigest() in out

    # Without a keystore: the gateway's bundle and the fingerprint from its key letter.
    assert (
        keys_main(["verify-report", str(report_file), "--bundle", str(bundle_file), "--fingerprint", fingerprint]) == 0
    )
    assert "OK:" in capsys.readouterr().out
    wrong = " ".join(["12345"] * 8)
    assert keys_main(["verify-report", str(report_file), "--bundle", str(bundle_file), "--fingerprint", wrong]) == 1
    assert "fingerprint mismatch" in capsys.readouterr().err

    # One bit of the report changed (the asset date's day, the last byte): the signature fails, exit 1.
    tampered = agency_pb2.SignedReport()
    tampered.CopyFrom(signed)
    tampered.report = signed.report[:-1] + bytes([signed.report[-1] ^ 1])
    tampered_file = tmp_path / "tampered.report"
    tampered_file.write_bytes(tampered.SerializeToString())
    assert keys_main([*commissioner, "verify-report", str(tampered_file)]) == 1
    err = capsys.readouterr().err
    assert "signature does not verify" in err
    assert (
        keys_main(["verify-report", str(tampered_file), "--bundle", str(bundle_file), "--fingerprint", fingerprint])
        == 1
    )

    # A keystore that never imported the gateway; a file that is no report at all.
    stranger = _keystore(tmp_path / "stranger", "office.220103.civil")
    capsys.readouterr()
    assert keys_main([*stranger, "verify-report", str(report_file)]) == 1
    assert "not in the trust store" in capsys.readouterr().err
    assert keys_main([*commissioner, "verify-report", str(bundle_file)]) == 1
    assert "not a signed report" in capsys.readouterr().err


def test_cli_shows_a_partial_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with gateway_world(tmp_path / "world", now_ms=MONDAY, down=frozenset({BANK})) as world:
        commission_id = _submit(world, "RPT-P", list(world.population.households(2)))
        settle(world)
        party = world.engine.courier.me
        report = build_report(
            world.store.engine, commission_id, agency=GATEWAY, issued_by="S-0003", partial=True, now_ms=ISSUED
        )
        signed = sign_report(report, party, ISSUED)
        bundle_file = tmp_path / "gateway.bundle"
        bundle_file.write_text(armor(party.bundle(ISSUED)))
        fingerprint = read_bundle(party.bundle(ISSUED)).fingerprint
    report_file = tmp_path / "RPT-P.report"
    report_file.write_bytes(signed.SerializeToString())
    capsys.readouterr()
    assert (
        keys_main(["verify-report", str(report_file), "--bundle", str(bundle_file), "--fingerprint", fingerprint]) == 0
    )
    assert f"partial:     yes, units not answered: {BANK}" in capsys.readouterr().out
    assert TAX in {u for m in report.households[0].members for u in m.unit_status}
