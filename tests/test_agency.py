"""The agency API end to end over real mutual TLS: a commissioner submits a package, three different staff members
take it through intake, review and report, two sign the exchange, real connectors answer. Every refusal returns
its gRPC status and changes nothing."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from hedui.v1 import agency_pb2, agency_pb2_grpc, exchange_pb2, records_pb2
from sqlalchemy import func, select

from common.categories import UNIT_DATA, data_category_name
from common.logs import configure_logging
from connectors.server import server_credentials
from connectors.synthetic import Relation
from gateway.api.agency import REQUEST_ID_KEY
from gateway.archive.audit import AuditLog
from gateway.db import schema
from gateway.procedure.staff import StaffRegister
from gateway.procedure.workflow import Workflow
from gateway.server import serve_api
from keys.identity import PartyKeys
from keys.statements import approval_message, verify_report
from keys.steps import STEP_DOMAIN, StepKind, step_bytes
from tests.exchange_world import beijing_ms
from tests.gateway_drive import BANK, settle
from tests.gateway_world import CATEGORIES, GatewayWorld, gateway_world

NOW = beijing_ms(2026, 3, 2)
COMMISSIONER = "commissioner.220102.mzj"
OTHER_COMMISSIONER = "commissioner.220103.mzj"
LOWER_AGENCY = "agency.220102"
BACKOFFICE = "agency.220100.backoffice"
CLIENTS = {
    COMMISSIONER: "commissioner",
    OTHER_COMMISSIONER: "commissioner",
    LOWER_AGENCY: "lower_agency",
    BACKOFFICE: "staff_system",
}
# The exchange staff registered with the units in advance are S-0001 and S-0002 (tests/exchange_world.STAFF).
STAFF_ROLES = {
    "S-0001": ("intake", "exchange"),
    "S-0002": ("review", "exchange"),
    "S-0003": ("exchange",),
    "S-0004": ("exchange",),
    "S-0005": ("report",),
    "S-0006": ("intake", "review", "report"),
}
_RELATIONS = {
    Relation.APPLICANT: agency_pb2.RELATION_APPLICANT,
    Relation.SUPPORT_OBLIGOR: agency_pb2.RELATION_SUPPORT_OBLIGOR,
}


@dataclass
class Agency:
    world: GatewayWorld
    workflow: Workflow
    audit: AuditLog
    staff_keys: dict[str, PartyKeys]
    port: int

    def stub(self, party: str) -> agency_pb2_grpc.AgencyServiceStub:
        return agency_pb2_grpc.AgencyServiceStub(self.world.pki.channel(party, self.port))

    def package(self, households: int, start: int = 0) -> agency_pb2.SubmitCommissionRequest:
        request = agency_pb2.SubmitCommissionRequest(
            letter=agency_pb2.CommissionLetter(
                number=f"WT-2026-{start:04d}", date=records_pb2.Date(year=2026, month=2, day=27)
            ),
            programme=exchange_pb2.PROGRAMME_MINIMUM_LIVING_ALLOWANCE,
            income_from=records_pb2.YearMonth(year=2025, month=9),
            income_to=records_pb2.YearMonth(year=2026, month=2),
            assets_as_of=records_pb2.Date(year=2026, month=2, day=28),
            categories=list(CATEGORIES),
        )
        for household in self.world.population.households(households, start):
            h = request.households.add(household_ref=f"H{household.index:05d}")
            for member in household.members:
                h.members.add(
                    id_number=member.id_number,
                    name=member.name,
                    relation=_RELATIONS.get(member.relation, agency_pb2.RELATION_FAMILY_MEMBER),
                    authorisation=agency_pb2.PackageAuthorisation(
                        number=f"SQ-{member.id_number[-6:]}", signed=True, fingerprinted=True,
                        scan_sha256=hashlib.sha256(b"scan" + member.id_number.encode()).digest(),
                    ),
                    id_copy_sha256=hashlib.sha256(b"id" + member.id_number.encode()).digest(),
                )  # fmt: skip
        return request

    def sign(self, staff_id: str, digest: bytes) -> bytes:
        return self.staff_keys[staff_id].signing_key(NOW).sign(approval_message(digest))

    def digest(self, cid: str) -> bytes:
        """The commission's stored exchange digest (32 zero bytes for a commission that does not exist)."""
        with self.world.store.engine.connect() as conn:
            value = conn.execute(
                select(schema.commissions.c.exchange_digest).where(schema.commissions.c.ref == cid)
            ).scalar()
        return bytes(value) if value is not None else bytes(32)

    def step_signature(
        self,
        cid: str,
        staff_id: str,
        kind: StepKind,
        *,
        passed: bool = True,
        reason: str = "",
        partial: bool = False,
        signer: str | None = None,
        digest: bytes | None = None,
        agency_id: str | None = None,
    ) -> bytes:
        """``signer``'s (default: ``staff_id``'s) signature over the step as the gateway rebuilds it; 64 zero bytes
        for a staff id without keys. The step is signed as given, unchecked, so that tests can sign odd ones."""
        keys = self.staff_keys.get(signer or staff_id)
        if keys is None:
            return bytes(64)
        step = agency_pb2.ProcedureStep(
            agency=agency_id or self.world.engine.courier.me.party_id, commission_id=cid, step=kind, passed=passed,
            reason=reason, staff_id=staff_id, exchange_digest=self.digest(cid) if digest is None else digest,
            partial=partial,
        )  # fmt: skip
        return keys.signing_key(NOW).sign(STEP_DOMAIN + step_bytes(step))

    def intake(
        self, cid: str, staff_id: str, passed: bool = True, reason: str = "", **signing: Any
    ) -> agency_pb2.StaffDecision:
        """A RecordIntake request signed by the staff member (``signing``: see :meth:`step_signature`)."""
        signing = {"passed": passed, "reason": reason, **signing}
        signature = self.step_signature(cid, staff_id, agency_pb2.STEP_KIND_INTAKE, **signing)
        return agency_pb2.StaffDecision(
            commission_id=cid, staff_id=staff_id, passed=passed, reason=reason, signature=signature
        )

    def review(
        self, cid: str, staff_id: str, passed: bool = True, reason: str = "", **signing: Any
    ) -> agency_pb2.StaffDecision:
        """A RecordReview request signed by the staff member."""
        signing = {"passed": passed, "reason": reason, **signing}
        signature = self.step_signature(cid, staff_id, agency_pb2.STEP_KIND_REVIEW, **signing)
        return agency_pb2.StaffDecision(
            commission_id=cid, staff_id=staff_id, passed=passed, reason=reason, signature=signature
        )

    def report(self, cid: str, staff_id: str, partial: bool = False, **signing: Any) -> agency_pb2.IssueReportRequest:
        """An IssueReport request signed by the staff member."""
        signature = self.step_signature(cid, staff_id, agency_pb2.STEP_KIND_REPORT, partial=partial, **signing)
        return agency_pb2.IssueReportRequest(commission_id=cid, staff_id=staff_id, partial=partial, signature=signature)

    def commissions(self) -> int:
        with self.world.store.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(schema.commissions)).scalar_one())


@pytest.fixture
def agency(tmp_path: Path) -> Iterator[Agency]:
    with gateway_world(tmp_path, now_ms=NOW) as world:
        engine = world.store.engine
        audit = AuditLog(engine)
        register = StaffRegister(engine, audit)
        admin = PartyKeys.create("staff.220100.admin", now_ms=NOW - 1)
        register.bootstrap_admin("A-0001", name="管理员", public_key=admin.signing_key(NOW).public.raw,
                                 valid_from_ms=NOW - 1, now_ms=NOW - 1)  # fmt: skip
        staff_keys = {}
        for staff_id, roles in STAFF_ROLES.items():
            world.staff.enrol(staff_id, roles)  # the units hold the same roster (issue 11)
            staff_keys[staff_id] = world.staff.keys[staff_id]
            public = world.staff.public_key(staff_id)
            register.register("A-0001", staff_id, name=f"工作人员{staff_id[-1]}", roles=roles,
                              public_key=public, valid_from_ms=NOW - 1, now_ms=NOW - 1)  # fmt: skip
        agency_keys = world.engine.courier.me
        workflow = Workflow(store=world.store, audit=audit, staff=register, clock=world.clock, agency=agency_keys)
        server_cert, server_key = world.pki.issue("agency.220100.api", server=True)
        for party in CLIENTS:
            world.pki.issue(party)
        world.pki.issue("agency.999999")  # a valid certificate of a party the gateway does not list
        credentials = server_credentials(server_cert, server_key, world.pki.ca_path)
        server, port, _ = serve_api(workflow, CLIENTS, listen="127.0.0.1:0", credentials=credentials)
        try:
            yield Agency(world, workflow, audit, staff_keys, port)
        finally:
            server.stop(None)


def _code(excinfo: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return excinfo.value.code()


def _through_review(agency: Agency, households: int = 6) -> agency_pb2.Commission:
    commissioner, office = agency.stub(COMMISSIONER), agency.stub(BACKOFFICE)
    commission = commissioner.SubmitCommission(agency.package(households))
    office.RecordIntake(agency.intake(commission.commission_id, "S-0001"))
    return office.RecordReview(agency.review(commission.commission_id, "S-0002"))


def test_whole_procedure_from_package_to_signed_report(agency: Agency) -> None:
    commissioner, office = agency.stub(COMMISSIONER), agency.stub(BACKOFFICE)
    commission = commissioner.SubmitCommission(agency.package(8))
    assert commission.state == agency_pb2.COMMISSION_STATE_RECEIVED
    assert commission.households == 8 and commission.subjects >= 8
    cid = commission.commission_id
    office.RecordIntake(agency.intake(cid, "S-0001"))
    reviewed = office.RecordReview(agency.review(cid, "S-0002"))
    assert reviewed.state == agency_pb2.COMMISSION_STATE_REVIEW_PASSED
    digest = reviewed.exchange_digest
    one = office.ApproveExchange(
        agency_pb2.ExchangeApproval(commission_id=cid, staff_id="S-0001", signature=agency.sign("S-0001", digest))
    )
    assert one.state == agency_pb2.COMMISSION_STATE_REVIEW_PASSED
    two = office.ApproveExchange(
        agency_pb2.ExchangeApproval(commission_id=cid, staff_id="S-0002", signature=agency.sign("S-0002", digest))
    )
    assert two.state == agency_pb2.COMMISSION_STATE_EXCHANGING
    assert list(two.approving_staff) == ["S-0001", "S-0002"]
    progress = commissioner.GetProgress(agency_pb2.CommissionRef(commission_id=cid))
    assert {u.unit_id for u in progress.units} == set(agency.world.connectors)
    with pytest.raises(grpc.RpcError) as excinfo:  # items still open: only a partial report
        office.IssueReport(agency.report(cid, "S-0005"))
    assert _code(excinfo) == grpc.StatusCode.FAILED_PRECONDITION
    assert f"of commission {cid} are still open" in (excinfo.value.details() or "")  # the id the caller knows
    settle(agency.world)
    progress = commissioner.GetProgress(agency_pb2.CommissionRef(commission_id=cid))
    assert all(u.answered == commission.subjects and u.queued == 0 for u in progress.units)
    signed = office.IssueReport(agency.report(cid, "S-0005"))
    report = verify_report(signed, agency.world.engine.courier.me.signing_key(NOW).public)
    assert report.commission_id == cid and not report.partial and len(report.households) == 8
    assert "核对报告" in signed.html
    fetched = commissioner.GetReport(agency_pb2.CommissionRef(commission_id=cid))
    assert fetched.report == signed.report and fetched.signature == signed.signature
    with pytest.raises(grpc.RpcError) as excinfo:
        office.IssueReport(agency.report(cid, "S-0005"))
    assert _code(excinfo) == grpc.StatusCode.FAILED_PRECONDITION
    assert "issued already: fetch it with GetReport" in (excinfo.value.details() or "")
    decision = agency_pb2.SubjectDecision(household_ref="H00000", member_index=1, decision=agency_pb2.DECISION_APPROVED)
    receipt = commissioner.SubmitApprovalFeedback(agency_pb2.ApprovalFeedback(commission_id=cid, decisions=[decision]))
    assert receipt.recorded == 1
    zeroth = agency_pb2.SubjectDecision(household_ref="H00000", member_index=0, decision=agency_pb2.DECISION_APPROVED)
    for decisions, says in (
        ([decision, zeroth], "decisions[1]: this commission has no member 0 in a household with that household_ref"),
        ([decision, decision], "decisions[1] names the same member as decisions[0]"),
    ):
        with pytest.raises(grpc.RpcError) as excinfo:
            commissioner.SubmitApprovalFeedback(agency_pb2.ApprovalFeedback(commission_id=cid, decisions=decisions))
        assert _code(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
        assert says in (excinfo.value.details() or "")
    assert agency.audit.verify() == []
    actions = [e.action for e in agency.audit.entries()]
    assert {"commission.submit", "commission.progress", "report.get", "commission.report"} <= set(actions)


def test_lower_level_agency_commission_enters_at_review(agency: Agency) -> None:
    commission = agency.stub(LOWER_AGENCY).SubmitCommission(agency.package(2, start=40))
    assert commission.state == agency_pb2.COMMISSION_STATE_INTAKE_PASSED and commission.from_lower_agency


def test_invalid_package_lists_every_problem_and_creates_nothing(agency: Agency) -> None:
    request = agency.package(3)
    member = request.households[0].members[0]
    bad_number = member.id_number[:17] + ("0" if member.id_number[17] != "0" else "1")
    member.id_number = bad_number
    request.households[1].members[0].authorisation.number = ""
    request.households[2].household_ref = request.households[1].household_ref
    with pytest.raises(grpc.RpcError) as excinfo:
        agency.stub(COMMISSIONER).SubmitCommission(request)
    assert _code(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    details = excinfo.value.details() or ""
    assert "member 1.id_number: ID number check digit is wrong" in details
    assert "authorisation.number" in details and "household_ref used twice" in details
    assert bad_number not in details and member.name not in details
    assert agency.commissions() == 0


def test_refusals_change_nothing(agency: Agency) -> None:
    commissioner, office = agency.stub(COMMISSIONER), agency.stub(BACKOFFICE)
    cid = commissioner.SubmitCommission(agency.package(3)).commission_id

    def refused(call: object, request: object, code: grpc.StatusCode) -> None:
        before = office.GetCommission(agency_pb2.CommissionRef(commission_id=cid))
        entries = agency.audit.count()
        with pytest.raises(grpc.RpcError) as excinfo:
            call(request)  # type: ignore[operator]
        assert _code(excinfo) == code, excinfo.value.details()
        assert agency.audit.count() == entries
        assert office.GetCommission(agency_pb2.CommissionRef(commission_id=cid)) == before

    # illegal transition: review before intake
    refused(office.RecordReview, agency.review(cid, "S-0002"),
            grpc.StatusCode.FAILED_PRECONDITION)  # fmt: skip
    # wrong staff: a reviewer recording intake
    refused(office.RecordIntake, agency.intake(cid, "S-0002"),
            grpc.StatusCode.PERMISSION_DENIED)  # fmt: skip
    # a return without a reason, a decision without a staff member
    refused(office.RecordIntake, agency.intake(cid, "S-0001", passed=False),
            grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
    refused(office.RecordIntake, agency.intake(cid, ""),
            grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
    office.RecordIntake(agency.intake(cid, "S-0006"))
    # the same staff member for intake and review (Procedure V.(一))
    refused(office.RecordReview, agency.review(cid, "S-0006"),
            grpc.StatusCode.PERMISSION_DENIED)  # fmt: skip
    digest = office.RecordReview(agency.review(cid, "S-0002")).exchange_digest
    # a forged approval signature
    refused(office.ApproveExchange, agency_pb2.ExchangeApproval(commission_id=cid, staff_id="S-0003",
            signature=agency.sign("S-0004", digest)), grpc.StatusCode.UNAUTHENTICATED)  # fmt: skip
    office.ApproveExchange(
        agency_pb2.ExchangeApproval(commission_id=cid, staff_id="S-0003", signature=agency.sign("S-0003", digest))
    )
    # the same staff member approving twice (Procedure V.(二))
    refused(office.ApproveExchange, agency_pb2.ExchangeApproval(commission_id=cid, staff_id="S-0003",
            signature=agency.sign("S-0003", digest)), grpc.StatusCode.PERMISSION_DENIED)  # fmt: skip
    # one approval only: no exchange, no report
    refused(office.IssueReport, agency.report(cid, "S-0005", partial=True),
            grpc.StatusCode.FAILED_PRECONDITION)  # fmt: skip
    with agency.world.store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(schema.items)).scalar_one() == 0
    # a commissioner may not act for staff, and sees only its own commissions
    refused(agency.stub(COMMISSIONER).RecordIntake, agency.intake(cid, "S-0001"), grpc.StatusCode.PERMISSION_DENIED)
    refused(agency.stub(OTHER_COMMISSIONER).GetProgress, agency_pb2.CommissionRef(commission_id=cid),
            grpc.StatusCode.NOT_FOUND)  # fmt: skip
    # an unknown client
    refused(agency.stub("agency.999999").GetCommission, agency_pb2.CommissionRef(commission_id=cid),
            grpc.StatusCode.UNAUTHENTICATED)  # fmt: skip


def test_a_category_no_registered_unit_holds_is_refused_at_submission_and_at_approval(agency: Agency) -> None:
    # Nobody would be asked it, and the report would show "nothing found": a case worker would read that as "none".
    commissioner, office = agency.stub(COMMISSIONER), agency.stub(BACKOFFICE)
    request = agency.package(2)
    request.categories.append(records_pb2.DATA_CATEGORY_VEHICLES)  # public security: not registered here
    with pytest.raises(grpc.RpcError) as excinfo:
        commissioner.SubmitCommission(request)
    assert _code(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    assert "no sharing unit registered with this gateway holds vehicles (机动车辆)" in (excinfo.value.details() or "")
    assert agency.commissions() == 0

    # Registered at submission, disabled by the operator before the exchange is approved.
    commission = _through_review(agency, households=2)
    store = agency.world.store

    def bank_enabled(enabled: bool) -> None:
        store.units.sync(
            (u.unit_id, u.category, u.endpoint, u.exchange_mode, enabled or u.unit_id != BANK)
            for u in store.units.all()
        )

    bank_enabled(False)
    approval = agency_pb2.ExchangeApproval(
        commission_id=commission.commission_id,
        staff_id="S-0003",
        signature=agency.sign("S-0003", commission.exchange_digest),
    )
    entries = agency.audit.count()
    with pytest.raises(grpc.RpcError) as excinfo:
        office.ApproveExchange(approval)
    assert _code(excinfo) == grpc.StatusCode.FAILED_PRECONDITION
    assert "no enabled sharing unit holds deposits (存款) now" in (excinfo.value.details() or "")
    assert agency.audit.count() == entries
    bank_enabled(True)
    assert office.ApproveExchange(approval).state == agency_pb2.COMMISSION_STATE_REVIEW_PASSED


def test_returned_and_terminated_carry_reasons(agency: Agency) -> None:
    commissioner, office = agency.stub(COMMISSIONER), agency.stub(BACKOFFICE)
    first = commissioner.SubmitCommission(agency.package(2, start=10)).commission_id
    returned = office.RecordIntake(agency.intake(first, "S-0001", passed=False, reason="纸质材料与电子数据包不一致"))
    assert returned.state == agency_pb2.COMMISSION_STATE_RETURNED and returned.reason
    second = _through_review(agency, 2)
    assert second.state == agency_pb2.COMMISSION_STATE_REVIEW_PASSED
    third = commissioner.SubmitCommission(agency.package(2, start=20)).commission_id
    office.RecordIntake(agency.intake(third, "S-0001"))
    terminated = office.RecordReview(agency.review(third, "S-0002", passed=False, reason="授权书不完整"))
    assert terminated.state == agency_pb2.COMMISSION_STATE_TERMINATED
    listed = commissioner.ListCommissions(agency_pb2.ListCommissionsRequest())
    assert {c.commission_id for c in listed.commissions} >= {first, third}


def test_a_letter_makes_one_commission_and_a_retry_gets_it_back(agency: Agency) -> None:
    """A client that lost the reply sends the same package again: it gets the same commission, and nobody is
    queried twice. Another package under the same letter number is refused; a returned letter may come again."""
    commissioner, office = agency.stub(COMMISSIONER), agency.stub(BACKOFFICE)
    package = agency.package(2, start=30)
    first = commissioner.SubmitCommission(package)
    entries = agency.audit.count()
    assert commissioner.SubmitCommission(package) == first
    assert agency.commissions() == 1 and agency.audit.count() == entries

    other = agency.package(3, start=30)  # same letter number, one more household
    with pytest.raises(grpc.RpcError) as excinfo:
        commissioner.SubmitCommission(other)
    assert _code(excinfo) == grpc.StatusCode.ALREADY_EXISTS
    assert first.commission_id in (excinfo.value.details() or "")
    assert agency.commissions() == 1 and agency.audit.count() == entries

    # Another commissioner's letter may carry the same number.
    assert agency.stub(OTHER_COMMISSIONER).SubmitCommission(package).commission_id != first.commission_id
    # Returned at intake, the corrected package comes under the same letter.
    office.RecordIntake(agency.intake(first.commission_id, "S-0001", passed=False, reason="材料不全"))
    again = commissioner.SubmitCommission(other)
    assert again.commission_id != first.commission_id and again.state == agency_pb2.COMMISSION_STATE_RECEIVED


def test_listing_refuses_a_limit_or_state_that_is_not_one(agency: Agency) -> None:
    commissioner = agency.stub(COMMISSIONER)
    for request in (
        agency_pb2.ListCommissionsRequest(limit=-1),
        agency_pb2.ListCommissionsRequest(limit=1001),
        agency_pb2.ListCommissionsRequest(state=99),  # type: ignore[arg-type]
    ):
        with pytest.raises(grpc.RpcError) as excinfo:
            commissioner.ListCommissions(request)
        assert _code(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    commissioner.SubmitCommission(agency.package(1, start=40))
    assert len(commissioner.ListCommissions(agency_pb2.ListCommissionsRequest(limit=0)).commissions) == 1


def _request_id(metadata: object) -> str:
    return next(str(m.value) for m in metadata or () if m.key == REQUEST_ID_KEY)  # type: ignore[attr-defined]


def test_every_reply_carries_the_request_id_the_gateways_journal_has(agency: Agency) -> None:
    commissioner = agency.stub(COMMISSIONER)
    root, stream = logging.getLogger(), io.StringIO()
    level = root.level
    configure_logging("INFO", json_lines=True, stream=stream)
    try:
        with pytest.raises(grpc.RpcError) as excinfo:
            commissioner.ListCommissions(agency_pb2.ListCommissionsRequest(limit=-1))
    finally:
        for handler in [h for h in root.handlers if h.get_name() == "hedui"]:
            root.removeHandler(handler)
        root.setLevel(level)
    request_id = _request_id(excinfo.value.trailing_metadata())
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line.get("request_id") for line in lines if line["message"] == "request refused"] == [request_id]
    _, call = commissioner.ListCommissions.with_call(agency_pb2.ListCommissionsRequest())
    assert _request_id(call.trailing_metadata()) not in ("", request_id)


def test_the_api_guide_lists_which_unit_holds_which_category_as_the_code_routes() -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "agency-api.md").read_text(encoding="utf-8")
    table = text[text.index("| unit category |") :]
    text = table[: table.index("\n\n")]  # that table alone: the guide has other tables of backquoted names
    listed = {
        match.group(1): set(re.findall(r"`([a-z_]+)`", match.group(2)))
        for match in re.finditer(r"^\| `([a-z_]+)` [^|]*\| (.*) \|$", text, re.M)
    }
    unit_names = {int(v): n.removeprefix("UNIT_CATEGORY_").lower() for n, v in records_pb2.UnitCategory.items()}
    expected = {unit_names[unit]: {data_category_name(c) for c in data} for unit, data in UNIT_DATA.items() if data}
    assert listed == expected


def test_a_database_failure_under_a_call_is_unavailable_and_quotes_no_row(
    agency: Agency, caplog: pytest.LogCaptureFixture
) -> None:
    """grpc would answer an exception in a handler with INTERNAL and "Exception calling application: <message>",
    and a database's message may quote the statement or a row. The caller gets UNAVAILABLE with a fixed text; the
    journal gets the error's class and code, without a traceback."""
    office = agency.stub(BACKOFFICE)
    cid = agency.stub(COMMISSIONER).SubmitCommission(agency.package(2)).commission_id
    with agency.world.store.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE commissions RENAME TO commissions_away")
    try:
        with caplog.at_level(logging.INFO, logger="hedui"), pytest.raises(grpc.RpcError) as excinfo:
            office.GetCommission(agency_pb2.CommissionRef(commission_id=cid))
    finally:
        with agency.world.store.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE commissions_away RENAME TO commissions")
    assert _code(excinfo) == grpc.StatusCode.UNAVAILABLE
    details = excinfo.value.details() or ""
    assert "database cannot be used" in details
    assert "SELECT" not in details and "commissions" not in details and "Exception calling" not in details
    failed = [r for r in caplog.records if r.getMessage() == "request failed on the database"]
    assert len(failed) == 1 and failed[0].levelno == logging.WARNING and not failed[0].exc_info
    assert office.GetCommission(agency_pb2.CommissionRef(commission_id=cid)).commission_id == cid


@pytest.mark.parametrize(
    "reason",
    [
        "材料\x00不全",
        "\x1b[31mRED",
        "材料不全\n请补正",
        "材料不全\r",
        "\u202e全不料材",
        "材料\u200b不全",
        "材料\u2028不全",
    ],
)
def test_a_reason_with_control_escape_line_break_or_bidi_characters_is_refused(agency: Agency, reason: str) -> None:
    """RecordIntake and RecordReview took any text as the reason of a return or termination (NUL, ANSI escape
    sequences, line breaks, a right-to-left override) and gave it back to the commissioner unchanged."""
    commissioner, office = agency.stub(COMMISSIONER), agency.stub(BACKOFFICE)
    first = commissioner.SubmitCommission(agency.package(1, start=30)).commission_id
    second = commissioner.SubmitCommission(agency.package(1, start=40)).commission_id
    office.RecordIntake(agency.intake(second, "S-0001"))
    entries = agency.audit.count()
    steps = (
        (office.RecordIntake, agency.intake, first, "S-0001"),
        (office.RecordReview, agency.review, second, "S-0002"),
    )
    for call, request, cid, staff_id in steps:
        with pytest.raises(grpc.RpcError) as excinfo:
            call(request(cid, staff_id, passed=False, reason=reason))
        assert _code(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
        assert "reason" in (excinfo.value.details() or "")
    assert agency.audit.count() == entries
    # Chinese text with spaces (ASCII and ideographic) inside is a reason; spaces around it are removed.
    returned = office.RecordIntake(
        agency.intake(first, "S-0001", passed=False, reason="\u3000材料不全：缺 授权书\u3000身份证复印件 ")
    )
    assert returned.reason == "材料不全：缺 授权书\u3000身份证复印件"
