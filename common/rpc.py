"""What every Hedui gRPC server does the same way: health checking and reflection for standard tools, and the
rule that plaintext is only ever served on loopback."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.config import ConfigError

_HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


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
    if credentials is None:
        if listen.rsplit(":", 1)[0].strip("[]") not in _LOOPBACK:
            raise ConfigError("plaintext is only allowed on loopback; configure the server's TLS certificate")
        port = server.add_insecure_port(listen)
    else:
        port = server.add_secure_port(listen, credentials)
    server.start()
    for name in ("", *services):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return port, health_servicer
