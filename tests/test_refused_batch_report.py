"""Regression test for issue 10 item 8: when a unit refused a commission's batches for good (state failed), the
refusal of a complete report said "Wait for the answers" — but nobody sends a failed batch again until an operator
fixes the cause and runs ``hedui-gateway resend``. The message now says so, for the items concerned."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hedui.v1 import agency_pb2

from tests.agency_world import agency_world
from tests.gateway_drive import settle
from tests.test_agency import BACKOFFICE, COMMISSIONER, Agency


@pytest.fixture
def agency(tmp_path: Path) -> Iterator[Agency]:
    with agency_world(tmp_path) as world:
        yield world


def test_report_refused_for_a_refused_batch_says_resend_not_wait(agency: Agency) -> None:
    commissioner, office = agency.stub(COMMISSIONER), agency.stub(BACKOFFICE)
    cid = commissioner.SubmitCommission(agency.package(2)).commission_id
    office.RecordIntake(agency.intake(cid, "S-0001"))
    reviewed = office.RecordReview(agency.review(cid, "S-0002"))
    # S-0003 and S-0004 may approve at the agency, but the roster the units hold lists S-0004 without the exchange
    # role (Procedure V.(三)): every unit refuses the batches for good (approver_not_exchange_staff).
    agency.world.staff.enrol("S-0004", ("review",))
    for staff_id in ("S-0003", "S-0004"):
        signature = agency.sign(staff_id, reviewed.exchange_digest)
        office.ApproveExchange(agency_pb2.ExchangeApproval(commission_id=cid, staff_id=staff_id, signature=signature))
    settle(agency.world)
    progress = commissioner.GetProgress(agency_pb2.CommissionRef(commission_id=cid))
    assert progress.units and all(u.failed and not u.answered for u in progress.units)

    with pytest.raises(grpc.RpcError) as excinfo:
        office.IssueReport(agency.report(cid, "S-0005"))
    assert excinfo.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    message = excinfo.value.details() or ""
    assert "hedui-gateway resend --unit" in message
    assert "refused the batches" in message
    assert "Wait for the answers" not in message
    for unit in progress.units:
        assert unit.unit_id in message
    # A partial report can still be issued, naming the units as missing.
    signed = office.IssueReport(agency.report(cid, "S-0005", partial=True))
    report = agency_pb2.Report.FromString(signed.report)
    assert sorted(report.units_not_answered) == sorted(u.unit_id for u in progress.units)
