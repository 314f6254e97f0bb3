"""Signed procedure steps (issue 11 item 3; Procedure V.(一)): intake, second review and report issue are each signed
by the staff member's registered key, the gateway verifies before it records, the chain and the report carry who
signed, and ``hedui-gateway archive steps`` proves from the archive alone that three different people took the steps
and two approved the exchange. Real gRPC over mutual TLS, real connectors, real SQLite files."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from hedui.v1 import agency_pb2
from sqlalchemy import delete, func, select, update

from gateway.cli import main as gateway_main
from gateway.db import schema
from keys import keystore
from keys.announcements import armor, read_bundle
from keys.cli import main as keys_main
from keys.steps import StepKind, check_report_signers, read_staff_keys, read_step
from keys.truststore import TrustStore
from tests.agency_world import agency_world
from tests.conftest import write_passphrase
from tests.conftest_pg import postgres_schema
from tests.gateway_drive import execute, operator_config, rows, settle
from tests.test_agency import BACKOFFICE, COMMISSIONER, LOWER_AGENCY, NOW, Agency

PASSPHRASE = "correct horse battery staple"


def _approve(agency: Agency, cid: str, staff: tuple[str, str] = ("S-0001", "S-0002")) -> None:
    office = agency.stub(BACKOFFICE)
    for staff_id in staff:
        signature = agency.sign(staff_id, agency.digest(cid))
        office.ApproveExchange(agency_pb2.ExchangeApproval(commission_id=cid, staff_id=staff_id, signature=signature))


def _submit(agency: Agency, start: int) -> str:
    return agency.stub(COMMISSIONER).SubmitCommission(agency.package(2, start=start)).commission_id


def _through_exchange(agency: Agency, start: int, intake: str = "S-0001", review: str = "S-0002") -> str:
    office = agency.stub(BACKOFFICE)
    cid = _submit(agency, start)
    office.RecordIntake(agency.intake(cid, intake))
    office.RecordReview(agency.review(cid, review))
    _approve(agency, cid)
    settle(agency.world)
    return cid


def _step_rows(agency: Agency) -> int:
    with agency.world.store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(schema.procedure_steps)).scalar_one())


def _refused(
    agency: Agency, cid: str, call: Callable[[Any], Any], request: Any, code: grpc.StatusCode, says: str
) -> None:
    """``request`` is refused with ``code`` and a message containing ``says``, and nothing changes."""
    office = agency.stub(BACKOFFICE)
    before = office.GetCommission(agency_pb2.CommissionRef(commission_id=cid))
    entries, steps = agency.audit.count(), _step_rows(agency)
    with pytest.raises(grpc.RpcError) as excinfo:
        call(request)
    assert excinfo.value.code() == code, excinfo.value.details()
    assert says in (excinfo.value.details() or "")
    after = office.GetCommission(agency_pb2.CommissionRef(commission_id=cid))
    assert after == before and agency.audit.count() == entries + 1  # + the GetCommission just read
    assert _step_rows(agency) == steps


NOT_VERIFY = (grpc.StatusCode.UNAUTHENTICATED, "step signature does not verify")
REQUIRED = (grpc.StatusCode.INVALID_ARGUMENT, "signature is required")
DENIED = (grpc.StatusCode.PERMISSION_DENIED, "is not registered for")


def _bad_decisions(
    make: Callable[..., Any], cid: str, other: str, staff_id: str, kind: StepKind, wrong_role: str
) -> list[tuple[str, Any, tuple[grpc.StatusCode, str]]]:
    """Requests for the step ``make`` builds (intake or review) that must all be refused."""
    other_kind = agency_pb2.STEP_KIND_REVIEW if kind == agency_pb2.STEP_KIND_INTAKE else agency_pb2.STEP_KIND_INTAKE
    unsigned = make(cid, staff_id)
    unsigned.signature = b""
    garbage = make(cid, staff_id)
    garbage.signature = bytes(range(64))
    short = make(cid, staff_id)
    short.signature = garbage.signature[:63]
    replayed = make(other, staff_id)  # a valid signature of the same step of another commission
    replayed.commission_id = cid
    return [
        ("no signature", unsigned, REQUIRED),
        ("not a signature", garbage, NOT_VERIFY),
        ("a signature of 63 bytes", short, NOT_VERIFY),
        ("another member's key", make(cid, staff_id, signer="S-0006"), NOT_VERIFY),
        ("a member without the role, with their own key", make(cid, wrong_role), DENIED),
        ("the other step kind signed", make(cid, staff_id, kind=other_kind), NOT_VERIFY),
        ("another commission's step", replayed, NOT_VERIFY),
        ("signed for another package", make(cid, staff_id, digest=bytes(32)), NOT_VERIFY),
        ("the opposite decision signed", make(cid, staff_id, signed_passed=False), NOT_VERIFY),
        (
            "another reason signed",
            make(cid, staff_id, passed=False, reason="材料不全", signed_reason="材料齐全"),
            NOT_VERIFY,
        ),
        ("another agency signed", make(cid, staff_id, agency_id="agency.220000"), NOT_VERIFY),
    ]


def _maker(agency: Agency, kind: StepKind) -> Callable[..., Any]:
    """Builds a StaffDecision whose signature may be over something else than what is sent."""

    def make(cid: str, staff_id: str, *, passed: bool = True, reason: str = "", **signing: Any) -> Any:
        request = agency_pb2.StaffDecision(commission_id=cid, staff_id=staff_id, passed=passed, reason=reason)
        signed_passed = signing.pop("signed_passed", passed)
        signed_reason = signing.pop("signed_reason", reason)
        step_kind = signing.pop("kind", kind)
        request.signature = agency.step_signature(
            cid, staff_id, step_kind, passed=signed_passed, reason=signed_reason, **signing
        )
        return request

    return make


def test_intake_and_review_are_refused_without_a_valid_signature_and_nothing_changes(tmp_path: Path) -> None:
    with agency_world(tmp_path) as agency:
        office = agency.stub(BACKOFFICE)
        cid, other = _submit(agency, 10), _submit(agency, 20)
        intake = _maker(agency, agency_pb2.STEP_KIND_INTAKE)
        office.RecordIntake(agency.intake(other, "S-0001"))  # the other commission's valid intake, to replay
        for name, request, (code, says) in _bad_decisions(
            intake, cid, other, "S-0001", agency_pb2.STEP_KIND_INTAKE, wrong_role="S-0005"
        ):
            _refused(agency, cid, office.RecordIntake, request, code, says)
            assert name
        done = office.RecordIntake(agency.intake(cid, "S-0001"))
        assert done.state == agency_pb2.COMMISSION_STATE_INTAKE_PASSED and done.intake_staff == "S-0001"

        review = _maker(agency, agency_pb2.STEP_KIND_REVIEW)
        office.RecordReview(agency.review(other, "S-0002"))
        for name, request, (code, says) in _bad_decisions(
            review, cid, other, "S-0002", agency_pb2.STEP_KIND_REVIEW, wrong_role="S-0003"
        ):
            _refused(agency, cid, office.RecordReview, request, code, says)
            assert name
        # A return signed as a return is recorded; its reason as sent is what was signed (spaces around included).
        third = _submit(agency, 30)
        returned = office.RecordIntake(agency.intake(third, "S-0001", passed=False, reason=" 材料不全 "))
        assert returned.state == agency_pb2.COMMISSION_STATE_RETURNED and returned.reason == "材料不全"
        kept = rows(agency.world, select(schema.procedure_steps))
        steps = [read_step(bytes(r.step)) for r in kept]
        assert [(s.commission_id, s.step, s.passed, s.reason) for s in steps if s.commission_id == third] == [
            (third, agency_pb2.STEP_KIND_INTAKE, False, " 材料不全 ")
        ]


def test_a_report_is_refused_without_a_valid_signature_and_nothing_changes(tmp_path: Path) -> None:
    with agency_world(tmp_path) as agency:
        office = agency.stub(BACKOFFICE)
        cid, other = _through_exchange(agency, 10), _through_exchange(agency, 20)
        office.IssueReport(agency.report(other, "S-0005"))
        unsigned = agency.report(cid, "S-0005")
        unsigned.signature = b""
        replayed = agency.report(other, "S-0005")
        replayed.commission_id = cid
        partial = agency.report(cid, "S-0005", partial=True)
        partial.partial = False  # signed as a partial report, sent as a complete one
        as_review = agency.report(cid, "S-0005")  # S-0005's signature over a review step of this commission
        as_review.signature = agency.step_signature(cid, "S-0005", agency_pb2.STEP_KIND_REVIEW)
        bad = [
            (unsigned, REQUIRED),
            (agency.report(cid, "S-0005", signer="S-0006"), NOT_VERIFY),
            (agency.report(cid, "S-0001"), DENIED),  # intake and exchange staff, not report
            (replayed, NOT_VERIFY),
            (partial, NOT_VERIFY),
            (as_review, NOT_VERIFY),
        ]
        for request, (code, says) in bad:
            _refused(agency, cid, office.IssueReport, request, code, says)
        with agency.world.store.engine.connect() as conn:
            issued = conn.execute(select(func.count()).select_from(schema.reports)).scalar_one()
        assert issued == 1
        signed = office.IssueReport(agency.report(cid, "S-0005"))
        assert agency_pb2.Report.FromString(signed.report).issued_by == "S-0005"


def test_three_different_people_even_with_valid_signatures(tmp_path: Path) -> None:
    """Procedure V.(一): a valid signature does not let one person take two of intake, review and report."""
    with agency_world(tmp_path) as agency:
        office = agency.stub(BACKOFFICE)
        cid = _submit(agency, 10)
        office.RecordIntake(agency.intake(cid, "S-0006"))
        _refused(agency, cid, office.RecordReview, agency.review(cid, "S-0006"), grpc.StatusCode.PERMISSION_DENIED,
                 "intake and second review need different staff members")  # fmt: skip
        office.RecordReview(agency.review(cid, "S-0002"))
        _approve(agency, cid)
        settle(agency.world)
        for staff_id in ("S-0006",):  # did intake; holds the report role
            _refused(agency, cid, office.IssueReport, agency.report(cid, staff_id), grpc.StatusCode.PERMISSION_DENIED,
                     "three different staff members")  # fmt: skip
        report = agency_pb2.Report.FromString(office.IssueReport(agency.report(cid, "S-0005")).report)
        assert [read_step(s.step).staff_id for s in report.steps] == ["S-0006", "S-0002", "S-0005"]


def test_the_report_carries_and_shows_who_signed(tmp_path: Path) -> None:
    with agency_world(tmp_path) as agency:
        cid = _through_exchange(agency, 10)
        signed = agency.stub(BACKOFFICE).IssueReport(agency.report(cid, "S-0005"))
        report = agency_pb2.Report.FromString(signed.report)
        steps = [read_step(s.step) for s in report.steps]
        assert [(s.step, s.staff_id, s.commission_id) for s in steps] == [
            (agency_pb2.STEP_KIND_INTAKE, "S-0001", cid),
            (agency_pb2.STEP_KIND_REVIEW, "S-0002", cid),
            (agency_pb2.STEP_KIND_REPORT, "S-0005", cid),
        ]
        assert {s.exchange_digest for s in steps} == {agency.digest(cid)}
        assert [a.staff_id for a in report.approvals] == ["S-0001", "S-0002"]
        assert all(a.approved_at_ms == NOW for a in report.approvals)
        keys = {staff_id: k.signing_key(NOW).public for staff_id, k in agency.staff_keys.items()}
        found = check_report_signers(report, keys)
        assert found.problems == [] and found.all_verified
        assert found.three_different_people and found.two_distinct_approvers
        # Another member's key in place of S-0002's: that step no longer verifies.
        swapped = check_report_signers(report, {**keys, "S-0002": keys["S-0006"]})
        assert not swapped.all_verified and any("S-0002" in p for p in swapped.problems)
        # The HTML names each signer as the staff register does, with the short fingerprint of their key.
        for staff_id in ("S-0001", "S-0002", "S-0005"):
            fingerprint = " ".join(keys[staff_id].fingerprint.split()[:3])
            assert f"<td>{staff_id}</td><td>工作人员{staff_id[-1]}</td><td><code>{fingerprint} …</code>" in signed.html
        assert "受理初审、审核复审、出具报告由三名不同工作人员完成" in signed.html
        assert "数据交换经2名不同工作人员审批" in signed.html


def test_the_chain_names_each_signed_step_and_approval_without_personal_data(tmp_path: Path) -> None:
    with agency_world(tmp_path) as agency:
        cid = _through_exchange(agency, 10)
        agency.stub(BACKOFFICE).IssueReport(agency.report(cid, "S-0005"))
        kept = {r.audit_seq: r for r in rows(agency.world, select(schema.procedure_steps))}
        entries = {e.seq: e for e in agency.audit.entries(limit=100_000)}
        assert sorted(entries[seq].action for seq in kept) == ["commission.intake", "commission.report",
                                                               "commission.review"]  # fmt: skip
        for seq, row in kept.items():
            detail = entries[seq].detail or ""
            assert f"step={hashlib.sha256(bytes(row.step)).hexdigest()}" in detail
            assert f"sig={hashlib.sha256(bytes(row.signature)).hexdigest()}" in detail
            assert f"key={bytes(row.key_id).hex()}" in detail and entries[seq].actor == row.staff_id
        approvals = [e for e in entries.values() if e.action == "commission.approve"]
        assert len(approvals) == 2 and all(f"digest={agency.digest(cid).hex()}" in (e.detail or "") for e in approvals)
        assert "工作人员" not in repr(list(entries.values()))


# -- proving it from the archive ----------------------------------------------------------------------------------


def _archive_steps(config: Path, cid: str, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    status = gateway_main(["archive", "steps", cid, "--config", str(config), *extra])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def test_signed_steps_on_postgresql(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same on the production database: steps kept, refused ones leave nothing, the archive proves them."""
    with postgres_schema() as url, agency_world(tmp_path, database_url=url) as agency:
        office = agency.stub(BACKOFFICE)
        cid = _submit(agency, 10)
        _refused(agency, cid, office.RecordIntake, agency.intake(cid, "S-0001", signer="S-0006"), *NOT_VERIFY)
        office.RecordIntake(agency.intake(cid, "S-0001"))
        office.RecordReview(agency.review(cid, "S-0002"))
        _approve(agency, cid)
        settle(agency.world)
        office.IssueReport(agency.report(cid, "S-0005"))
        assert _step_rows(agency) == 3
        config = operator_config(tmp_path, agency.world, url)
        status, out = _archive_steps(config, cid, capsys)
        assert status == 0 and "by 3 different people: yes" in out, out
        execute(agency.world, update(schema.procedure_steps).values(signature=bytes(64)))
        status, out = _archive_steps(config, cid, capsys)
        assert status == 1 and out.count("PROBLEM:") == 3, out


def test_archive_steps_proves_a_clean_commission_and_the_report_verifies_with_the_exported_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with agency_world(tmp_path) as agency:
        office = agency.stub(BACKOFFICE)
        cid = _through_exchange(agency, 10)
        signed = office.IssueReport(agency.report(cid, "S-0005"))
        returned = _submit(agency, 20)
        office.RecordIntake(agency.intake(returned, "S-0001", passed=False, reason="材料不全"))
        waiting = _submit(agency, 30)
        office.RecordIntake(agency.intake(waiting, "S-0001"))
        config = operator_config(tmp_path, agency.world, None)
        keys_file = tmp_path / "signers.keys"
        status, out = _archive_steps(config, cid, capsys, "--export-keys", str(keys_file))
        assert status == 0, out
        assert "commission " + cid + ": report_issued" in out
        assert out.count("signature verifies") == 5
        assert "by 3 different people: yes (intake S-0001, review S-0002, report S-0005)" in out
        assert "approved by 2 distinct staff members: yes (S-0001, S-0002)" in out
        exported = read_staff_keys(keys_file.read_text(encoding="utf-8"))
        assert set(exported) == {"S-0001", "S-0002", "S-0005"}
        assert exported["S-0005"] == agency.staff_keys["S-0005"].signing_key(NOW).public
        status, out = _archive_steps(config, returned, capsys)  # returned at intake: one step, ended
        assert status == 0 and "returned" in out and "by 1 different people: yes (intake S-0001)" in out, out
        status, out = _archive_steps(config, waiting, capsys)  # still in progress: not yet provable
        assert status == 1 and "not yet provable" in out, out
        status, out = _archive_steps(config, "C0000000000000000", capsys)
        assert status == 1 and "no commission" in out

        # The commissioner checks the report, its steps and approvals with the agency's bundle and the keys.
        gateway = agency.world.engine.courier.me
        bundle = tmp_path / "agency.bundle"
        bundle.write_text(armor(gateway.bundle(NOW)), encoding="utf-8")
        fingerprint = read_bundle(gateway.bundle(NOW)).fingerprint
        report_file = tmp_path / "report.hsr"
        report_file.write_bytes(signed.SerializeToString())
        verify = ["verify-report", str(report_file), "--bundle", str(bundle), "--fingerprint", fingerprint]
        capsys.readouterr()
        assert keys_main(verify) == 0
        out = capsys.readouterr().out
        assert "signature not checked (no key given)" in out and "intake, review and report by three" in out
        assert keys_main([*verify, "--staff-keys", str(keys_file)]) == 0
        out = capsys.readouterr().out
        assert out.count("signature verifies") == 5 and "not checked" not in out
        assert "three different staff ids: yes" in out and "two distinct staff ids: yes" in out
        # A key file that gives S-0002 another member's key: the report's review step is caught.
        lines = keys_file.read_text(encoding="utf-8").replace(
            agency.staff_keys["S-0002"].signing_key(NOW).public.raw.hex(),
            agency.staff_keys["S-0006"].signing_key(NOW).public.raw.hex(),
        )
        wrong = tmp_path / "wrong.keys"
        wrong.write_text(lines, encoding="utf-8")
        assert keys_main([*verify, "--staff-keys", str(wrong)]) == 1
        captured = capsys.readouterr()
        assert "SIGNATURE DOES NOT VERIFY" in captured.out and "staff signatures failed" in captured.err


def test_archive_steps_fails_when_what_was_signed_is_altered(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with agency_world(tmp_path) as agency:
        cid = _through_exchange(agency, 10)
        agency.stub(BACKOFFICE).IssueReport(agency.report(cid, "S-0005"))
        config = operator_config(tmp_path, agency.world, None)
        assert _archive_steps(config, cid, capsys)[0] == 0
        p, a, st = schema.procedure_steps.c, schema.approvals.c, schema.staff.c
        review = rows(agency.world, select(schema.procedure_steps).where(p.kind == agency_pb2.STEP_KIND_REVIEW))[0]
        approval = rows(agency.world, select(schema.approvals).where(a.staff_id == "S-0002"))[0]
        s0002 = rows(agency.world, select(schema.staff).where(st.staff_id == "S-0002"))[0]
        # The review step re-signed by another holder of the review role under S-0002's name, bytes and all.
        forged = agency.step_signature(cid, "S-0002", agency_pb2.STEP_KIND_REVIEW, signer="S-0006")
        flipped = bytes(review.step)[:-1] + bytes([bytes(review.step)[-1] ^ 1])
        alterations = [
            ("step bytes", update(schema.procedure_steps).where(p.kind == review.kind).values(step=flipped),
             "not the one the chain names"),
            ("signature", update(schema.procedure_steps).where(p.kind == review.kind).values(signature=forged),
             "not the one the chain names"),
            ("step deleted", delete(schema.procedure_steps).where(p.kind == review.kind), "deleted"),
            ("staff key swapped", update(schema.staff).where(st.staff_id == "S-0002").values(
                public_key=agency.staff_keys["S-0006"].signing_key(NOW).public.raw), "not the key the chain says"),
            ("approval signature", update(schema.approvals).where(a.staff_id == "S-0002").values(
                signature=bytes(64)), "not the one the chain names"),
            ("staff revoked back then", update(schema.staff).where(st.staff_id == "S-0002").values(
                revoked_at_ms=NOW - 1), "not registered for review at that time"),
        ]  # fmt: skip
        for name, change, says in alterations:
            execute(agency.world, change)
            status, out = _archive_steps(config, cid, capsys)
            assert status == 1 and "PROBLEM:" in out and says in out, (name, out)
            # Put it back as it was.
            execute(agency.world, delete(schema.procedure_steps).where(p.kind == review.kind))
            execute(agency.world, schema.procedure_steps.insert().values(**review._asdict()))
            execute(agency.world, update(schema.approvals).where(a.staff_id == "S-0002").values(
                signature=approval.signature))  # fmt: skip
            execute(agency.world, update(schema.staff).where(st.staff_id == "S-0002").values(
                public_key=s0002.public_key, revoked_at_ms=None))  # fmt: skip
            assert _archive_steps(config, cid, capsys)[0] == 0, name


def test_sign_step_command_signs_what_the_gateway_rebuilds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A back office with a staff member's keystore signs with hedui-keys; the gateway accepts exactly that."""
    with agency_world(tmp_path) as agency:
        office = agency.stub(BACKOFFICE)
        cid = _submit(agency, 10)
        path = tmp_path / "s-0001.keystore.json"
        keystore.save(path, agency.staff_keys["S-0001"], TrustStore(), PASSPHRASE)
        passfile = write_passphrase(tmp_path / "s-0001.passphrase", PASSPHRASE)
        base = ["--keystore", str(path), "--passphrase-file", str(passfile), "sign-step"]
        fields = ["--agency", agency.world.engine.courier.me.party_id, "--commission", cid, "--staff-id", "S-0001",
                  "--digest", agency.digest(cid).hex()]  # fmt: skip
        capsys.readouterr()
        assert keys_main([*base, *fields, "--step", "intake", "--failed", "--reason", "材料不全"]) == 0
        signature = bytes.fromhex(capsys.readouterr().out.strip())
        request = agency_pb2.StaffDecision(
            commission_id=cid, staff_id="S-0001", passed=False, reason="材料不全", signature=signature
        )
        assert signature == agency.intake(cid, "S-0001", passed=False, reason="材料不全").signature
        assert office.RecordIntake(request).state == agency_pb2.COMMISSION_STATE_RETURNED
        for wrong, says in (
            (["--step", "intake"], "--passed, or --failed"),
            (["--step", "intake", "--failed"], "needs --reason"),
            (["--step", "intake", "--passed", "--reason", "x"], "--reason goes with --failed"),
            (["--step", "report", "--passed"], "a report step has no"),
            (["--step", "review", "--passed", "--partial"], "--partial goes with --step report"),
        ):
            assert keys_main([*base, *fields, *wrong]) == 1, wrong
            assert says in capsys.readouterr().err
        bad_digest = [*fields[:-1], "abc"]
        assert keys_main([*base, *bad_digest, "--step", "report"]) == 1
        assert "64 hex digits" in capsys.readouterr().err


def test_a_lower_agency_commission_is_proven_without_an_intake_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Procedure III.(二)2: it enters at review; review and report by two different people complete Procedure V.(一)."""
    with agency_world(tmp_path) as agency:
        office = agency.stub(BACKOFFICE)
        cid = agency.stub(LOWER_AGENCY).SubmitCommission(agency.package(2, start=50)).commission_id
        _refused(agency, cid, office.RecordIntake, agency.intake(cid, "S-0001"), grpc.StatusCode.FAILED_PRECONDITION,
                 "intake review needs state received")  # fmt: skip
        office.RecordReview(agency.review(cid, "S-0002"))
        _approve(agency, cid)
        settle(agency.world)
        signed = office.IssueReport(agency.report(cid, "S-0005"))
        status, out = _archive_steps(operator_config(tmp_path, agency.world, None), cid, capsys)
        assert status == 0 and "(entered at review from a lower-level agency)" in out, out
        assert "by 2 different people: yes (review S-0002, report S-0005)" in out
        report_file = tmp_path / "report.hsr"
        report_file.write_bytes(signed.SerializeToString())
        gateway = agency.world.engine.courier.me
        bundle = tmp_path / "agency.bundle"
        bundle.write_text(armor(gateway.bundle(NOW)), encoding="utf-8")
        fingerprint = read_bundle(gateway.bundle(NOW)).fingerprint
        capsys.readouterr()
        verify = ["verify-report", str(report_file), "--bundle", str(bundle), "--fingerprint", fingerprint]
        assert keys_main(verify) == 0
        assert "review and report by two different staff ids: yes" in capsys.readouterr().out
