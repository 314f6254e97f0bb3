"""What every Hedui gRPC server does the same way: health checking and reflection for standard tools, and the
rule that plaintext is only ever served on loopback."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.config import ConfigError

_HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
#: Trailing metadata key of a refusal's reason code (a short lower-case code such as ``staff_not_registered``), sent
#: by the connector next to the gRPC status so that the gateway can keep and show why a unit refused a batch.
REFUSAL_REASON_KEY = "hedui-refusal-reason"


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
    reflection.enable_server_reflection((*services, _HEALTH, reflection.SERVICE_NAME), server)
    if credentials is None and listen.rsplit(":", 1)[0].strip("[]") not in _LOOPBACK:
        raise ConfigError("plaintext is only allowed on loopback; configure the server's TLS certificate")
    try:
        port = server.add_insecure_port(listen) if credentials is None else server.add_secure_port(listen, credentials)
    except RuntimeError:
        # grpcio says only "failed to bind"; in practice another process holds the port or the address is not ours.
        raise ConfigError(f"cannot listen on {listen}: the port is in use or the address is not on this host") from None
    server.start()
    for name in ("", *services):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return port, health_servicer
