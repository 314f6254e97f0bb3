"""Server reflection as standard tools use it: grpcurl and grpcui ask ``grpc.reflection.v1`` first (the v1alpha name
is what older tools ask). Both names answer on the gateway's agency API and on the connector, over their real mutual
TLS (issue 10, item 9: grpcio-reflection serves only v1alpha).

The client here encodes and decodes with message classes built from the v1 descriptor, as a client generated from
``grpc/reflection/v1/reflection.proto`` would."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2 as alpha

from common.rpc import REFLECTION_V1
from tests.agency_world import agency_world
from tests.exchange_world import GATEWAY, exchange_world
from tests.test_agency import COMMISSIONER, NOW

AGENCY_SERVICE = "hedui.v1.AgencyService"
EXCHANGE_SERVICE = "hedui.v1.ExchangeService"


def _v1_classes() -> tuple[Any, Any]:
    pool = descriptor_pool.Default()
    request = message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionRequest"))
    response = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse")
    )
    return request, response


def _ask(channel: grpc.Channel, service: str, requests: list[dict[str, str]]) -> list[object]:
    """Call ``/<service>/ServerReflectionInfo`` with ``requests`` and return the responses."""
    request_class: Any
    response_class: Any
    if service == REFLECTION_V1:
        request_class, response_class = _v1_classes()
    else:
        request_class, response_class = alpha.ServerReflectionRequest, alpha.ServerReflectionResponse
    call = channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_class.FromString,
    )
    messages: Iterator[object] = iter([request_class(**r) for r in requests])
    return list(call(messages, timeout=10))


def _services(response: object) -> set[str]:
    return {s.name for s in response.list_services_response.service}  # type: ignore[attr-defined]


def _files(response: object) -> list[descriptor_pb2.FileDescriptorProto]:
    return [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in response.file_descriptor_response.file_descriptor_proto  # type: ignore[attr-defined]
    ]


def _check_reflection(channel: grpc.Channel, service: str, own_service: str) -> None:
    listed, described, itself = _ask(
        channel,
        service,
        [{"list_services": ""}, {"file_containing_symbol": own_service}, {"file_containing_symbol": REFLECTION_V1}],
    )
    assert {own_service, "grpc.health.v1.Health", REFLECTION_V1, "grpc.reflection.v1alpha.ServerReflection"} <= (
        _services(listed)
    )
    package = own_service.rsplit(".", 1)[0]
    assert any(f.package == package and f.service for f in _files(described))
    (v1_file,) = [f for f in _files(itself) if f.package == "grpc.reflection.v1"]
    assert v1_file.service[0].method[0].input_type == ".grpc.reflection.v1.ServerReflectionRequest"


@pytest.mark.parametrize("service", [REFLECTION_V1, "grpc.reflection.v1alpha.ServerReflection"])
def test_reflection_v1_and_v1alpha_on_the_agency_api(tmp_path: Path, service: str) -> None:
    with agency_world(tmp_path) as agency:
        channel = agency.world.pki.channel(COMMISSIONER, agency.port)
        try:
            _check_reflection(channel, service, AGENCY_SERVICE)
        finally:
            channel.close()


@pytest.mark.parametrize("service", [REFLECTION_V1, "grpc.reflection.v1alpha.ServerReflection"])
def test_reflection_v1_and_v1alpha_on_the_connector(tmp_path: Path, service: str) -> None:
    with exchange_world(tmp_path, now_ms=NOW) as world:
        channel = world.pki.channel(GATEWAY, world.running.port)
        try:
            _check_reflection(channel, service, EXCHANGE_SERVICE)
        finally:
            channel.close()
