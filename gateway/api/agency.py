"""The AgencyService: the gRPC API agencies' back offices and commissioners use (docs/agency-api.md).

Authorisation is an interceptor that refuses before any handler runs, and before the request is decoded: the client
certificate must name a party listed in the config's [[clients]], and the party's role must be allowed to call the
method. Handlers convert the
generated messages to the workflow's calls; every refusal maps to one gRPC status and changes nothing.

Each call gets a short random request id, and every log line written while it is handled carries that id and the
commission id the call is about (see common/logs.py), so one request can be followed through the log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import date
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from hedui.v1 import agency_pb2, agency_pb2_grpc

from common.dates import from_pb
from common.logs import database_error, database_error_code, log_context, new_request_id, public_commission_ref
from common.rpc import IncomingCall, RefusalLog, RequestGate
from common.tlsreload import CERTIFICATE_REVOKED, RevocationSource
from gateway.procedure.commission import PB_TO_STATE, Caller, WorkflowError
from gateway.procedure.intake import InvalidPackage
from gateway.procedure.queries import ListFilter
from gateway.procedure.workflow import Workflow
from keys.tls import party_from_auth_context

if TYPE_CHECKING:
    from gateway.metrics import GatewayMetrics

log = logging.getLogger("hedui.gateway.api.agency")

SERVICE = agency_pb2.DESCRIPTOR.services_by_name["AgencyService"].full_name
_READ = frozenset({"commissioner", "lower_agency", "staff_system"})
_SUBMIT = frozenset({"commissioner", "lower_agency"})
_STAFF = frozenset({"staff_system"})

#: Which client roles may call which method.
METHOD_ROLES: Mapping[str, frozenset[str]] = {
    "SubmitCommission": _SUBMIT,
    "GetCommission": _READ,
    "ListCommissions": _READ,
    "RecordIntake": _STAFF,
    "RecordReview": _STAFF,
    "ApproveExchange": _STAFF,
    "GetProgress": _READ,
    "IssueReport": _STAFF,
    "GetReport": _READ,
    "SubmitApprovalFeedback": _SUBMIT,
}

T = TypeVar("T")


#: The largest request the agency API takes (gRPC's default of 4 MiB would refuse a package well below
#: gateway.procedure.intake.MAX_SUBJECTS members, ~125 bytes each); larger ones are RESOURCE_EXHAUSTED.
MAX_REQUEST_BYTES = 16 * 1024 * 1024
#: Server options of the agency API.
SERVER_OPTIONS = (("grpc.max_receive_message_length", MAX_REQUEST_BYTES),)

#: Trailing metadata key of every AgencyService reply: the request id under which the gateway logged the call.
REQUEST_ID_KEY = "hedui-request-id"


class AuthInterceptor(RequestGate):
    """Refuses calls to the AgencyService from callers whose certificate the CA revoked, unknown parties or roles not
    allowed for the method, before the request is even decoded: an unlisted client is UNAUTHENTICATED whatever it sends.
    It is the server's request gate (common/rpc.py): a request body that does not decode is INVALID_ARGUMENT, and
    refusals are logged as WARNING lines rate-limited per peer and reason."""

    def __init__(
        self,
        clients: Mapping[str, str],
        refusals: RefusalLog | None = None,
        *,
        revocations: RevocationSource | None = None,
        on_revoked: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(refusals if refusals is not None else RefusalLog(log))
        self.clients = dict(clients)
        #: The CA's revocation list: a caller whose certificate it lists is refused before anything else.
        self.revocations = revocations
        self.on_revoked = on_revoked

    def handle(self, call: IncomingCall) -> Any:
        """Authenticate and authorise, then decode and run the handler, with the call's request id (and the
        commission it names) on every log line."""
        if call.service != SERVICE:
            return super().handle(call)  # health, reflection
        context, method = call.context, call.method
        request_id = new_request_id()
        # The caller gets the id its request has in the gateway's journal, to quote when asking why.
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        with log_context(request_id=request_id):
            auth = context.auth_context()
            party = party_from_auth_context(auth)
            if self.revocations is not None and self.revocations.revokes_peer(auth):
                if self.on_revoked is not None:
                    self.on_revoked()
                call.refuse(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "client certificate is revoked",
                    reason=CERTIFICATE_REVOKED,
                    message="caller refused: certificate revoked",
                    caller=party,
                )
            role = self.clients.get(party or "")
            if party is None or role is None:
                call.refuse(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "client certificate names no registered client",
                    reason="unregistered_client",
                    message="caller refused: not a registered client",
                )
            if role not in METHOD_ROLES.get(method, frozenset()):
                call.refuse(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"a {role} may not call {method}",
                    reason="role_not_allowed",
                    message="caller refused: role may not call",
                    caller=party,
                )
            request = call.decode()
            commission = public_commission_ref(getattr(request, "commission_id", None))
            with log_context(commission_id=commission):
                response = call.run(request)
                made = None if commission else public_commission_ref(getattr(response, "commission_id", None))
                log.info("request done", extra={"method": method, "caller": party, "commission_id": made})
                return response


def _list_filter(request: agency_pb2.ListCommissionsRequest) -> ListFilter:
    """The filters of a ListCommissions request; INVALID_ARGUMENT for a state or a date that is not one."""
    state = PB_TO_STATE.get(request.state)
    if request.state and state is None:
        raise WorkflowError(grpc.StatusCode.INVALID_ARGUMENT, f"state {request.state} is not a commission state")
    days: dict[str, date | None] = {}
    for name in ("created_from", "created_until"):
        days[name] = None
        if request.HasField(name):
            try:
                days[name] = from_pb(getattr(request, name))
            except ValueError:
                raise WorkflowError(grpc.StatusCode.INVALID_ARGUMENT, f"{name} is not a calendar date") from None
    return ListFilter(state, request.commissioner, days["created_from"], days["created_until"])


class AgencyServicer(agency_pb2_grpc.AgencyServiceServicer):
    """Maps API calls onto the workflow."""

    def __init__(self, workflow: Workflow, clients: Mapping[str, str], metrics: GatewayMetrics | None = None) -> None:
        self.workflow = workflow
        self.queries = workflow.queries  # the read side: view, list, progress, report, and the audit of reads
        self.feedback = workflow.feedback
        self.clients = dict(clients)
        self.metrics = metrics

    def _caller(self, context: grpc.ServicerContext) -> Caller:
        party = party_from_auth_context(context.auth_context()) or ""
        return Caller(party, self.clients.get(party, ""))

    def _run(
        self, context: grpc.ServicerContext, call: Callable[[Caller], T], read: tuple[str, str | None] | None = None
    ) -> T:
        """Run ``call`` as the caller; a successful read is audited as ``read`` = (action, commission id)."""
        caller = self._caller(context)
        try:
            result = call(caller)
            if read is not None:
                self.queries.audit_read(caller, *read)
            return result
        except InvalidPackage as exc:
            log.info("package refused", extra={"caller": caller.party_id, "problems": len(exc.problems)})
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except WorkflowError as exc:
            log.info("request refused", extra={"caller": caller.party_id, "status": exc.status.name})
            context.abort(exc.status, str(exc))
        except Exception as exc:
            # Never grpc's own "Exception calling application: <message>": a database's message may quote a row.
            if database_error(exc) is not None:
                log.warning(
                    "request failed on the database",
                    extra={"caller": caller.party_id, "error": type(exc).__name__, "db_code": database_error_code(exc)},
                )
                context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    "the gateway's database cannot be used just now (its operators are alerted); try again later, "
                    "after GetCommission shows whether this step was recorded",
                )
            log.exception("request failed", extra={"caller": caller.party_id})
            context.abort(
                grpc.StatusCode.INTERNAL,
                "the gateway failed on this request; its operators find why in the journal under the hedui-request-id "
                "of this reply",
            )
        raise AssertionError("unreachable")  # context.abort raises

    def SubmitCommission(
        self, request: agency_pb2.SubmitCommissionRequest, context: grpc.ServicerContext
    ) -> agency_pb2.Commission:
        return self._run(context, lambda c: self.workflow.submit(request, c))

    def GetCommission(self, request: agency_pb2.CommissionRef, context: grpc.ServicerContext) -> agency_pb2.Commission:
        return self._run(
            context,
            lambda c: self.queries.view(request.commission_id, c),
            ("commission.view", request.commission_id),
        )

    def ListCommissions(
        self, request: agency_pb2.ListCommissionsRequest, context: grpc.ServicerContext
    ) -> agency_pb2.ListCommissionsResponse:
        def listed(caller: Caller) -> agency_pb2.ListCommissionsResponse:
            page = self.queries.list(caller, _list_filter(request), request.limit, request.page_token)
            return agency_pb2.ListCommissionsResponse(
                commissions=page.commissions, next_page_token=page.next_page_token
            )

        return self._run(context, listed, ("commission.list", None))

    def RecordIntake(self, request: agency_pb2.StaffDecision, context: grpc.ServicerContext) -> agency_pb2.Commission:
        return self._run(
            context,
            lambda c: self.workflow.intake(
                request.commission_id, request.staff_id, request.passed, request.reason, c, signature=request.signature
            ),
        )

    def RecordReview(self, request: agency_pb2.StaffDecision, context: grpc.ServicerContext) -> agency_pb2.Commission:
        return self._run(
            context,
            lambda c: self.workflow.review(
                request.commission_id, request.staff_id, request.passed, request.reason, c, signature=request.signature
            ),
        )

    def ApproveExchange(
        self, request: agency_pb2.ExchangeApproval, context: grpc.ServicerContext
    ) -> agency_pb2.Commission:
        return self._run(
            context, lambda c: self.workflow.approve(request.commission_id, request.staff_id, request.signature, c)
        )

    def GetProgress(self, request: agency_pb2.CommissionRef, context: grpc.ServicerContext) -> agency_pb2.Progress:
        return self._run(
            context,
            lambda c: self.queries.progress(request.commission_id, c),
            ("commission.progress", request.commission_id),
        )

    def IssueReport(
        self, request: agency_pb2.IssueReportRequest, context: grpc.ServicerContext
    ) -> agency_pb2.SignedReport:
        return self._run(
            context,
            lambda c: self.workflow.issue_report(
                request.commission_id, request.staff_id, request.partial, c, signature=request.signature
            ),
        )

    def GetReport(self, request: agency_pb2.CommissionRef, context: grpc.ServicerContext) -> agency_pb2.SignedReport:
        return self._run(
            context,
            lambda c: self.queries.report(request.commission_id, c),
            ("report.get", request.commission_id),
        )

    def SubmitApprovalFeedback(
        self, request: agency_pb2.ApprovalFeedback, context: grpc.ServicerContext
    ) -> agency_pb2.FeedbackReceipt:
        receipt = self._run(context, lambda c: agency_pb2.FeedbackReceipt(recorded=self.feedback.record(request, c)))
        if self.metrics is not None:
            self.metrics.feedback(d.decision for d in request.decisions)
        return receipt
