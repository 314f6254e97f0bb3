"""Regression tests for issue 10 item 3: a request body that does not decode ended as INTERNAL with an ERROR
traceback in the server's log, on the agency API and on the connector, and a client with a CA-issued certificate
the server does not list got that INTERNAL instead of UNAUTHENTICATED (grpcio decodes before any interceptor runs).

Now every Hedui server ends its interceptor chain with a RequestGate (common/rpc.py): the caller is admitted
first, the body decoded after, an undecodable one is INVALID_ARGUMENT with one WARNING line and no traceback, and a
peer's refusal lines are rate-limited. Real servers on loopback, raw bytes on the wire."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hedui.v1 import agency_pb2_grpc

from common.rpc import (
    REFUSAL_LINES_PER_WINDOW,
    REFUSAL_REASON_KEY,
    RefusalLog,
    new_server,
    start_server,
)
from connectors.server import server_credentials
from gateway.api.agency import SERVICE, AgencyServicer, AuthInterceptor
from tests.agency_world import agency_world
from tests.exchange_world import World, beijing_ms, exchange_world
from tests.test_agency import BACKOFFICE, CLIENTS, COMMISSIONER, Agency

#: Not protobuf: a tag with the invalid wire type 7.
GARBAGE = b"\xff\xff\xff\xff\x0f"
#: Protobuf, but field 1 (a string in every request message below) holds bytes that are not UTF-8.
NOT_UTF8 = b"\x0a\x02\xff\xfe"
UNDECODABLE = "request refused: the body does not decode"


@pytest.fixture
def agency(tmp_path: Path) -> Iterator[Agency]:
    with agency_world(tmp_path) as world:
        yield world


@pytest.fixture
def unit(tmp_path: Path) -> Iterator[World]:
    with exchange_world(tmp_path, now_ms=beijing_ms(2026, 3, 2)) as world:
        yield world


def _raw_call(channel: grpc.Channel, method: str, body: bytes) -> grpc.RpcError:
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as excinfo:
        call(body, timeout=10)
    return excinfo.value


def _metadata(error: grpc.RpcError, key: str) -> list[str]:
    return [str(m.value) for m in error.trailing_metadata() or () if m.key == key]


def _assert_quiet(caplog: pytest.LogCaptureFixture) -> None:
    """No ERROR line and no traceback anywhere in the log (grpcio's own loggers included)."""
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info or "Traceback" in r.getMessage()]
    assert loud == []


def test_garbage_body_on_the_agency_api_is_invalid_argument_with_one_warning_and_no_traceback(
    agency: Agency, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    commissioner = agency.world.pki.channel(COMMISSIONER, agency.port)
    office = agency.world.pki.channel(BACKOFFICE, agency.port)
    entries = agency.audit.count()
    calls = [
        (commissioner, "GetCommission", GARBAGE),
        (commissioner, "SubmitCommission", NOT_UTF8),
        (office, "RecordIntake", GARBAGE),
    ]
    for channel, method, body in calls:
        caplog.clear()
        error = _raw_call(channel, f"/{SERVICE}/{method}", body)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, method
        assert "does not decode" in (error.details() or "")
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert [r.getMessage() for r in warnings] == [UNDECODABLE]
        assert warnings[0].reason == "undecodable" and warnings[0].method == method  # type: ignore[attr-defined]
        _assert_quiet(caplog)
    assert agency.audit.count() == entries and agency.commissions() == 0


def test_unlisted_client_with_a_garbage_body_is_unauthenticated_not_internal(
    agency: Agency, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    stranger = agency.world.pki.channel("agency.999999", agency.port)  # CA-issued, not in [[clients]]
    for body in (GARBAGE, NOT_UTF8, b""):
        error = _raw_call(stranger, f"/{SERVICE}/GetCommission", body)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    # A role that may not call the method is refused before decoding too.
    office = agency.world.pki.channel(BACKOFFICE, agency.port)
    assert _raw_call(office, f"/{SERVICE}/SubmitCommission", GARBAGE).code() == grpc.StatusCode.PERMISSION_DENIED
    assert not [r for r in caplog.records if r.getMessage() == UNDECODABLE]
    _assert_quiet(caplog)


def test_health_and_reflection_keep_working_and_refuse_garbage_the_same_way(
    agency: Agency, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    channel = agency.world.pki.channel(COMMISSIONER, agency.port)
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE)).status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    assert SERVICE in [s.name for reply in replies for s in reply.list_services_response.service]

    assert _raw_call(channel, "/grpc.health.v1.Health/Check", GARBAGE).code() == grpc.StatusCode.INVALID_ARGUMENT
    info = channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=None,
        response_deserializer=None,
    )
    with pytest.raises(grpc.RpcError) as excinfo:
        list(info(iter([GARBAGE]), timeout=10))
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [r.getMessage() for r in caplog.records] == [UNDECODABLE, UNDECODABLE]
    _assert_quiet(caplog)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_peer_cannot_flood_the_log_with_refusals(agency: Agency, caplog: pytest.LogCaptureFixture) -> None:
    """A real agency API whose refusal log has an injected clock: a peer's garbage beyond the budget is counted,
    not written, and the count comes in one line once the window is over."""
    caplog.set_level(logging.WARNING)
    clock = _Clock()
    logger = logging.getLogger("hedui.test.refusals")
    gate = AuthInterceptor(CLIENTS, refusals=RefusalLog(logger, clock=clock))
    server = new_server(max_workers=4, interceptors=[gate])
    agency_pb2_grpc.add_AgencyServiceServicer_to_server(AgencyServicer(agency.workflow, CLIENTS), server)
    cert, key = agency.world.pki.files["agency.220100.api"]
    port, _ = start_server(
        server, [SERVICE], listen="127.0.0.1:0", credentials=server_credentials(cert, key, agency.world.pki.ca_path)
    )
    try:
        commissioner = agency.world.pki.channel(COMMISSIONER, port)
        stranger = agency.world.pki.channel("agency.999999", port)
        for _ in range(30):
            _raw_call(commissioner, f"/{SERVICE}/GetCommission", GARBAGE)
        for _ in range(10):
            _raw_call(stranger, f"/{SERVICE}/GetCommission", GARBAGE)
        lines = [(r.getMessage(), r.reason) for r in caplog.records]  # type: ignore[attr-defined]
        assert (
            lines
            == [(UNDECODABLE, "undecodable")] * REFUSAL_LINES_PER_WINDOW
            + [("caller refused: not a registered client", "unregistered_client")] * REFUSAL_LINES_PER_WINDOW
        )

        caplog.clear()
        clock.now += 61
        _raw_call(commissioner, f"/{SERVICE}/GetCommission", GARBAGE)
        summaries = {r.reason: r.suppressed for r in caplog.records if r.getMessage() == "refusal lines suppressed"}  # type: ignore[attr-defined]
        assert summaries == {
            "undecodable": 30 - REFUSAL_LINES_PER_WINDOW,
            "unregistered_client": 10 - REFUSAL_LINES_PER_WINDOW,
        }
        assert [r.getMessage() for r in caplog.records].count(UNDECODABLE) == 1  # a new window
        _assert_quiet(caplog)
    finally:
        server.stop(None)


def test_refusal_log_keeps_a_bounded_table_of_peers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    refusals = RefusalLog(logging.getLogger("hedui.test.refusals"), per_window=1, max_peers=3, clock=_Clock())
    for i in range(10):
        refusals.warn("refused", peer=f"10.0.0.{i}", reason="undecodable")
    peers = [r.peer for r in caplog.records]  # type: ignore[attr-defined]
    assert peers == ["10.0.0.0", "10.0.0.1", "10.0.0.2", "other"]


def test_garbage_body_on_the_connector_is_invalid_argument_with_one_warning_and_no_traceback(
    unit: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    for method in ("SubmitBatch", "FetchAnswers", "AcknowledgeAnswers"):
        caplog.clear()
        error = _raw_call(unit.channel, f"/hedui.v1.ExchangeService/{method}", GARBAGE)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _metadata(error, REFUSAL_REASON_KEY) == ["undecodable"]
        assert [r.getMessage() for r in caplog.records] == [UNDECODABLE]
        _assert_quiet(caplog)
    assert unit.connector.store.batch_count() == 0


def test_unlisted_party_on_the_connector_is_unauthenticated_whatever_it_sends(
    unit: World, caplog: pytest.LogCaptureFixture
) -> None:
    """A certificate from the network's CA for a party the unit holds no keys of: refused before decoding."""
    caplog.set_level(logging.WARNING)
    stranger = unit.pki.channel("agency.999999", unit.running.port)
    for body in (GARBAGE, b""):
        error = _raw_call(stranger, "/hedui.v1.ExchangeService/SubmitBatch", body)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert _metadata(error, REFUSAL_REASON_KEY) == ["unknown_party"]
    assert not [r for r in caplog.records if r.getMessage() == UNDECODABLE]
    _assert_quiet(caplog)
