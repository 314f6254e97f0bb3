"""The agency API over real mutual TLS on top of a ``gateway_world`` (as tests/test_agency.py's fixture builds it),
optionally reporting to metrics, and the whole procedure driven through it."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from hedui.v1 import agency_pb2

from connectors.metrics import ConnectorMetrics
from connectors.server import server_credentials
from gateway.archive.audit import AuditLog
from gateway.metrics import GatewayMetrics
from gateway.procedure.staff import StaffRegister
from gateway.procedure.workflow import Workflow
from gateway.server import serve_api
from keys.identity import PartyKeys
from tests.gateway_drive import settle
from tests.gateway_world import gateway_world
from tests.test_agency import BACKOFFICE, CLIENTS, COMMISSIONER, NOW, STAFF_ROLES, Agency


@contextmanager
def agency_world(
    root: Path,
    *,
    metrics: GatewayMetrics | None = None,
    unit_metrics: Mapping[str, ConnectorMetrics] | None = None,
    database_url: str | None = None,
) -> Iterator[Agency]:
    """Staff registered with keys (tests/test_agency.STAFF_ROLES), client certificates for CLIENTS, and the API
    serving on a loopback port; with ``metrics`` the API and the engine report to it; ``database_url``: the
    gateway's database (default: a SQLite file under ``root``)."""
    with gateway_world(
        root, now_ms=NOW, metrics=metrics, unit_metrics=unit_metrics, database_url=database_url
    ) as world:
        engine = world.store.engine
        audit = AuditLog(engine)
        register = StaffRegister(engine, audit)
        admin = PartyKeys.create("staff.220100.admin", now_ms=NOW - 1)
        register.bootstrap_admin(
            "A-0001", name="管理员", public_key=admin.signing_key(NOW).public.raw, valid_from_ms=NOW - 1, now_ms=NOW - 1
        )
        staff_keys = {}
        for staff_id, roles in STAFF_ROLES.items():
            # The same person as the units' roster lists (issue 11: rosters are registered with each other).
            world.staff.enrol(staff_id, roles)
            staff_keys[staff_id] = world.staff.keys[staff_id]
            register.register(
                "A-0001",
                staff_id,
                name=f"工作人员{staff_id[-1]}",
                roles=roles,
                public_key=world.staff.public_key(staff_id),
                valid_from_ms=NOW - 1,
                now_ms=NOW - 1,
            )
        workflow = Workflow(
            store=world.store, audit=audit, staff=register, clock=world.clock, agency=world.engine.courier.me
        )
        server_cert, server_key = world.pki.issue("agency.220100.api", server=True)
        for party in CLIENTS:
            world.pki.issue(party)
        world.pki.issue("agency.999999")  # a valid certificate of a party the gateway does not list
        credentials = server_credentials(server_cert, server_key, world.pki.ca_path)
        server, port, _ = serve_api(workflow, CLIENTS, listen="127.0.0.1:0", credentials=credentials, metrics=metrics)
        try:
            yield Agency(world, workflow, audit, staff_keys, port)
        finally:
            server.stop(None)


def whole_procedure(agency: Agency, households: int) -> str:
    """Submit, intake, review, two approvals, the exchange, the report and feedback (approved for the first
    household's applicant, refused for the second's); returns the commission id."""
    commissioner, office = agency.stub(COMMISSIONER), agency.stub(BACKOFFICE)
    cid = commissioner.SubmitCommission(agency.package(households)).commission_id
    office.RecordIntake(agency.intake(cid, "S-0001"))
    reviewed = office.RecordReview(agency.review(cid, "S-0002"))
    for staff_id in ("S-0001", "S-0002"):
        signature = agency.sign(staff_id, reviewed.exchange_digest)
        office.ApproveExchange(agency_pb2.ExchangeApproval(commission_id=cid, staff_id=staff_id, signature=signature))
    settle(agency.world)
    commissioner.GetProgress(agency_pb2.CommissionRef(commission_id=cid))
    office.IssueReport(agency.report(cid, "S-0005"))
    commissioner.GetReport(agency_pb2.CommissionRef(commission_id=cid))
    decisions = [
        agency_pb2.SubjectDecision(household_ref="H00000", member_index=1, decision=agency_pb2.DECISION_APPROVED),
        agency_pb2.SubjectDecision(household_ref="H00001", member_index=1, decision=agency_pb2.DECISION_REFUSED),
    ]
    commissioner.SubmitApprovalFeedback(agency_pb2.ApprovalFeedback(commission_id=cid, decisions=decisions))
    return cid
