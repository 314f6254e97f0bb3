"""What every Hedui gRPC server does the same way: health checking and reflection (v1 and v1alpha) for standard
tools, a port it owns alone (reserved before anything else starts), and the rule that plaintext is only ever served
on loopback."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from concurrent import futures
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from common.config import ConfigError

_HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
#: Trailing metadata key of a refusal's reason code (a short lower-case code such as ``staff_not_registered``), sent
#: by the connector next to the gRPC status so that the gateway can keep and show why a unit refused a batch.
REFUSAL_REASON_KEY = "hedui-refusal-reason"
#: The reflection service current tools ask first (grpcurl 1.9+, Postman, grpcui); older ones ask v1alpha.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
_REFLECTION_V1_FILE = "grpc/reflection/v1/reflection.proto"


class PortInUse(ConfigError):
    """A server cannot listen where its config says: another process holds the port, or the address is not one of
    this host's. Raised before the service has opened its database or started any work."""

    code = "port_in_use"


def new_server(
    *,
    max_workers: int,
    interceptors: Sequence[grpc.ServerInterceptor[Any, Any]] = (),
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Server:
    """A gRPC server that owns its port alone.

    grpcio binds with SO_REUSEPORT by default, so a second process told to listen on a port that is already
    served binds without error and the kernel hands it some of the connections: a connector started twice, or
    any local process, would silently take over part of another server's traffic. Hedui servers refuse that.
    """
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=list(interceptors),
        options=[("grpc.so_reuseport", 0), *options],
    )


def start_server(
    server: grpc.Server, services: Sequence[str], *, listen: str, credentials: grpc.ServerCredentials | None
) -> tuple[int, health.HealthServicer]:
    """Add health checking and reflection for ``services``, bind ``listen`` and start serving.

    ``credentials=None`` serves plaintext, refused unless ``listen`` is on loopback. Returns the bound port (port 0
    picks a free one) and the health servicer, already reporting SERVING for ``services``.
    """
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection(server, (*services, _HEALTH))
    check_plaintext(listen, credentials)
    try:
        port = server.add_insecure_port(listen) if credentials is None else server.add_secure_port(listen, credentials)
    except RuntimeError:
        # grpcio 1.85 raises RuntimeError("Failed to bind to address ...") and says no more; with so_reuseport off
        # (new_server) that is another process holding the port, or an address that is not this host's.
        raise PortInUse(
            f"cannot listen on {listen}: the port is in use (is another instance running?) "
            "or the address is not on this host"
        ) from None
    server.start()
    for name in ("", *services):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return port, health_servicer


def check_plaintext(listen: str, credentials: grpc.ServerCredentials | None) -> None:
    """Raise ConfigError for plaintext (``credentials=None``) anywhere but on loopback."""
    if credentials is None and listen.rsplit(":", 1)[0].strip("[]") not in _LOOPBACK:
        raise ConfigError("plaintext is only allowed on loopback; configure the server's TLS certificate")


def reserve_port(listen: str) -> list[socket.socket]:
    """Bind (without listening) every address ``listen`` (host:port) resolves to, and return the sockets; raises
    PortInUse if one is taken. Port 0 reserves nothing.

    A service reserves its port before it opens its database, so that a second instance told to use a port already
    served stops having changed nothing, and closes the reservation just before :func:`start_server` binds it for
    good. Meanwhile the port refuses connections (bound, not listening): a client or a TCP health check sees the
    service as up only once it serves. (grpcio's own bind also listens at once, so binding the server early would
    accept connections during a migration of many minutes.)
    """
    host, _, port_text = listen.rpartition(":")
    host = host.strip("[]")
    if not port_text.isdigit() or int(port_text) == 0:
        return []
    try:
        addresses = socket.getaddrinfo(host or None, int(port_text), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise PortInUse(f"cannot listen on {listen}: the host does not resolve ({exc.strerror})") from None
    reserved: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in addresses:
            sock = socket.socket(family, kind, proto)
            reserved.append(sock)
            # As grpcio's listener does: a previous run's connections in TIME_WAIT do not make the port "in use".
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError as exc:
        release_port(reserved)
        raise PortInUse(
            f"cannot listen on {listen}: the port is in use (is another instance running?) or the address is not on "
            f"this host ({exc.strerror or type(exc).__name__})"
        ) from None
    return reserved


def release_port(reserved: Sequence[socket.socket]) -> None:
    """Close the sockets of :func:`reserve_port`."""
    for sock in reserved:
        sock.close()


def enable_reflection(server: grpc.Server, services: Sequence[str]) -> None:
    """Serve reflection for ``services`` under both names: ``grpc.reflection.v1.ServerReflection`` and
    ``grpc.reflection.v1alpha.ServerReflection``.

    grpcio-reflection (1.85) implements only v1alpha. The v1 protocol is the same messages with the same field
    numbers in another package, so the same servicer answers both: v1 calls are decoded and encoded with the
    v1alpha message classes, which produce the same bytes. The v1 file descriptor (v1alpha's, renamed) is added to
    the descriptor pool, so that a tool can also ``describe`` the v1 service itself.
    """
    names = (*services, reflection.SERVICE_NAME, REFLECTION_V1)
    _add_reflection_v1_descriptor()
    servicer = reflection.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": handler}),)
    )


def _add_reflection_v1_descriptor() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_REFLECTION_V1_FILE)
        return  # added by an earlier server of this process, or by a grpcio-reflection that ships v1
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    alpha = proto.package
    proto.name, proto.package = _REFLECTION_V1_FILE, "grpc.reflection.v1"
    proto.options.Clear()  # language options (java_package, go_package) name the v1alpha package
    for message in proto.message_type:
        for field_ in message.field:
            if field_.type_name.startswith(f".{alpha}."):
                field_.type_name = f".grpc.reflection.v1.{field_.type_name[len(alpha) + 2 :]}"
    for method in proto.service[0].method:
        method.input_type = method.input_type.replace(f".{alpha}.", ".grpc.reflection.v1.")
        method.output_type = method.output_type.replace(f".{alpha}.", ".grpc.reflection.v1.")
    pool.Add(proto)
