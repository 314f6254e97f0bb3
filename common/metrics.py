"""What the gateway's and the connector's metrics have in common: envelope rejections by reason, gRPC server
requests by method and status, and the HTTP endpoint Prometheus scrapes (on its own port, see docs/operations.md).

Every metrics owner takes a ``CollectorRegistry``; label values come from small fixed sets (reason codes, method
names of the services we register, gRPC status names, configured party ids) and never from personal data.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from common.config import doc
from common.rpc import PortInUse

log = logging.getLogger("hedui.metrics")


class HasCode(Protocol):
    """An error with a stable reason code (every EnvelopeError)."""

    code: str


METRICS_LISTEN_DOC = (
    "host:port of the Prometheus endpoint (/metrics), its own port apart from the gRPC API; empty: no endpoint. "
    "Keep it on loopback or a management network."
)


def split_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:9464`` for IPv6) -> (host, port); raises ValueError when it is not one."""
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{listen!r} is not host:port (or empty to disable the endpoint)")
    return host, int(port)


@dataclass(frozen=True)
class MetricsSection:
    """The ``[metrics]`` section of a service's config (gateway and connector alike; each sets its default port)."""

    listen: str = doc(METRICS_LISTEN_DOC, default="127.0.0.1:9464")

    def __post_init__(self) -> None:
        if self.listen:
            split_listen(self.listen)


def process_registry() -> CollectorRegistry:
    """A fresh registry for a serving process, with the standard process and Python runtime metrics."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


@dataclass
class MetricsServer:
    """The running HTTP endpoint serving ``/metrics``."""

    server: WSGIServer
    thread: threading.Thread
    port: int

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve_metrics(listen: str, registry: CollectorRegistry) -> MetricsServer | None:
    """Serve ``registry`` on ``listen`` (host:port); an empty ``listen`` serves nothing.

    A port that cannot be bound stops the start with PortInUse. The services bind it before they open their
    database: a gateway running on without ``/metrics`` would leave every alert silent, and an operator who wants
    no endpoint says so with an empty ``listen``.
    """
    if not listen:
        return None
    host, port = split_listen(listen)
    try:
        server, thread = start_http_server(port, host, registry=registry)
    except OSError as exc:
        raise PortInUse(
            f"cannot serve metrics on {listen} ({exc.strerror or type(exc).__name__}): another process holds the "
            'port or the address is not on this host; set [metrics] listen to a free port, or to "" for no endpoint'
        ) from None
    # Not "serving": that word in the log marks the service itself ready, and the endpoint starts before it.
    log.info("metrics endpoint listening", extra={"listen": listen})
    return MetricsServer(server, thread, int(server.server_port))


if TYPE_CHECKING:
    _Interceptor = grpc.ServerInterceptor[Any, Any]
    _Handler = grpc.RpcMethodHandler[Any, Any]
else:  # the runtime classes are not generic; only their type stubs are
    _Interceptor = grpc.ServerInterceptor
    _Handler = grpc.RpcMethodHandler


def _status(context: grpc.ServicerContext, default: grpc.StatusCode) -> str:
    # ServicerContext.code() exists at runtime (grpcio >= 1.38) but not in the type stubs.
    code = getattr(context, "code", lambda: None)()
    return (code if isinstance(code, grpc.StatusCode) else default).name


class RequestCounter(_Interceptor):
    """A server interceptor counting every call of a registered method by service, method and final status.

    Calls to methods the server does not have are not counted: their names come from the caller, and a label
    must never take a value a caller chooses. Put it first in the interceptor list, so that calls refused by an
    authorisation interceptor after it are counted with their status too.
    """

    def __init__(self, counter: Counter) -> None:
        self.counter = counter

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], _Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, _, method = handler_call_details.method.lstrip("/").partition("/")
        done = _Done(self.counter, service, method)
        kinds: tuple[tuple[Callable[..., Any] | None, Callable[..., _Handler], bool], ...] = (
            (handler.unary_unary, grpc.unary_unary_rpc_method_handler, False),
            (handler.stream_unary, grpc.stream_unary_rpc_method_handler, False),
            (handler.unary_stream, grpc.unary_stream_rpc_method_handler, True),
            (handler.stream_stream, grpc.stream_stream_rpc_method_handler, True),
        )
        for behaviour, make, streaming in kinds:
            if behaviour is not None:
                wrapped = done.streaming(behaviour) if streaming else done.unary(behaviour)
                return make(
                    wrapped,
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler


@dataclass(frozen=True)
class _Done:
    """Counts one method's calls once each, when they end."""

    counter: Counter
    service: str
    method: str

    def _count(self, status: str) -> None:
        self.counter.labels(self.service, self.method, status).inc()

    def unary(self, behaviour: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                response = behaviour(request, context)
            except BaseException:
                self._count(_status(context, grpc.StatusCode.UNKNOWN))
                raise
            self._count(_status(context, grpc.StatusCode.OK))
            return response

        return call

    def streaming(self, behaviour: Callable[[Any, grpc.ServicerContext], Iterator[Any]]) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from behaviour(request, context)
            except GeneratorExit:  # the client went away mid-stream
                self._count(grpc.StatusCode.CANCELLED.name)
                raise
            except BaseException:
                self._count(_status(context, grpc.StatusCode.UNKNOWN))
                raise
            self._count(_status(context, grpc.StatusCode.OK))

        return call


class ServiceMetrics:
    """The metrics every Hedui service exports; the gateway's and the connector's metrics each hold one."""

    def __init__(self, registry: CollectorRegistry, envelope_reasons: Iterable[str]) -> None:
        self.registry = registry
        self.envelope_rejections = Counter(
            "hedui_envelope_rejections_total",
            "Envelopes refused on opening, by reason (docs/envelope.md): a forged, replayed, expired or misdirected "
            "message, or a key the trust store does not know or no longer accepts.",
            ["reason"],
            registry=registry,
        )
        for reason in envelope_reasons:
            self.envelope_rejections.labels(reason)
        self.grpc_requests = Counter(
            "hedui_grpc_server_requests_total",
            "gRPC calls handled by this server, by service, method and final status code.",
            ["service", "method", "code"],
            registry=registry,
        )

    def envelope_rejected(self, error: HasCode) -> None:
        self.envelope_rejections.labels(error.code).inc()

    def counting_rejections(self, then: Callable[[Any], None]) -> Callable[[Any], None]:
        """An ``on_reject`` hook for a Courier: count the rejection, then do what ``then`` did (log it)."""

        def on_reject(error: Any) -> None:
            self.envelope_rejected(error)
            then(error)

        return on_reject

    def interceptor(self) -> RequestCounter:
        """The server interceptor that fills ``hedui_grpc_server_requests_total``."""
        return RequestCounter(self.grpc_requests)

    def watch_certificates(self, not_after: Mapping[str, float], clock: Callable[[], float] = time.time) -> None:
        """Export the seconds until each TLS certificate the process presents stops being valid, by role ("server",
        "client"): ``not_after`` holds each one's notAfter as a POSIX time, read once at start as the certificate
        is; the seconds are counted at scrape time."""
        self.registry.register(_CertificateCollector(dict(not_after), clock))


_CERTIFICATE_EXPIRY = (
    "Seconds until the TLS certificate this process presents stops being valid (its notAfter), by role: server "
    "(the gRPC server's certificate) or client (the gateway's certificate towards the connectors). Certificates are "
    "read at start: after renewing one, restart the service, or this keeps counting down to the old one's end."
)


class _CertificateCollector(Collector):
    def __init__(self, not_after: dict[str, float], clock: Callable[[], float]) -> None:
        self.not_after = not_after
        self.clock = clock

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("hedui_tls_certificate_expiry_seconds", _CERTIFICATE_EXPIRY, labels=["role"])

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("hedui_tls_certificate_expiry_seconds", _CERTIFICATE_EXPIRY, labels=["role"])
        now = self.clock()
        for role, end in sorted(self.not_after.items()):
            family.add_metric([role], end - now)
        yield family
