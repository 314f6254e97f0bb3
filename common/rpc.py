"""What every Hedui gRPC server does the same way: health checking and reflection (v1 and v1alpha) for standard
tools, a port it owns alone (reserved before anything else starts), the rule that plaintext is only ever served on
loopback, and requests decoded only after the caller was admitted.

grpcio decodes a request before any interceptor or handler sees it. A body that does not decode then ends as
``INTERNAL`` with an ERROR traceback in the log, and a caller that should have been refused as unauthenticated gets
that ``INTERNAL`` too. So every Hedui server ends its interceptor chain with a :class:`RequestGate`: the handlers
it hands to grpcio take the raw bytes, and the gate decodes them itself, after :meth:`RequestGate.handle` has
admitted the caller. An undecodable body is ``INVALID_ARGUMENT`` with one WARNING line and no traceback, and the
lines a peer can cause are rate-limited (:class:`RefusalLog`).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

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
#: Trailing metadata key (binary) of the refusing party's signed refusal: a sealed envelope carrying trust.proto
#: Refusal, signed by the unit and sealed for the caller (docs/exchange.md, "Signed refusals"). Below
#: MAX_SIGNED_REFUSAL_BYTES, well inside gRPC's default metadata limit.
REFUSAL_SIGNED_KEY = "hedui-refusal-bin"
MAX_SIGNED_REFUSAL_BYTES = 4096
#: The reflection service current tools ask first (grpcurl 1.9+, Postman, grpcui); older ones ask v1alpha.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
_REFLECTION_V1_FILE = "grpc/reflection/v1/reflection.proto"


class PortInUse(ConfigError):
    """A server cannot listen where its config says: another process holds the port, or the address is not one of
    this host's. Raised before the service has opened its database or started any work."""

    code = "port_in_use"


log = logging.getLogger("hedui.rpc")

if TYPE_CHECKING:
    _Interceptor = grpc.ServerInterceptor[Any, Any]
    _Handler = grpc.RpcMethodHandler[Any, Any]
else:  # the runtime classes are not generic; only their type stubs are
    _Interceptor = grpc.ServerInterceptor
    _Handler = grpc.RpcMethodHandler

#: A peer's refusal lines of one reason that are written per window; the rest are counted, and summed up in one
#: line ("refusal lines suppressed") once the window is over.
REFUSAL_LINES_PER_WINDOW = 5
#: The window of :data:`REFUSAL_LINES_PER_WINDOW`, in seconds.
REFUSAL_WINDOW_SECONDS = 60.0
#: Peers tracked one by one; refusals from further peers share one budget (peer "other"), so that a flood from
#: many addresses cannot grow the table without bound either.
REFUSAL_PEERS_TRACKED = 1024


@dataclass
class _Budget:
    """One (peer, reason)'s lines in the current window."""

    window_end: float
    written: int = 0
    suppressed: int = 0


class RefusalLog:
    """WARNING lines for refused requests, at most :data:`REFUSAL_LINES_PER_WINDOW` per peer and reason in a
    window of :data:`REFUSAL_WINDOW_SECONDS`; when a window in which lines were held back is over, one line
    says how many (it is written with the next refusal the server sees). Lines carry the peer and a reason code,
    never anything the request carried. Thread-safe."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        per_window: int = REFUSAL_LINES_PER_WINDOW,
        window_seconds: float = REFUSAL_WINDOW_SECONDS,
        max_peers: int = REFUSAL_PEERS_TRACKED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.per_window = per_window
        self.window_seconds = window_seconds
        self.max_peers = max_peers
        self.clock = clock
        self._budgets: dict[tuple[str, str], _Budget] = {}
        self._lock = threading.Lock()

    def warn(self, message: str, *, peer: str, reason: str, **fields: Any) -> None:
        """Write ``message`` as a WARNING with ``peer``, ``reason`` and ``fields``, unless this peer's budget for
        ``reason`` is spent in the current window."""
        now = self.clock()
        lines: list[tuple[str, dict[str, Any]]] = []
        with self._lock:
            for key in [k for k, b in self._budgets.items() if b.window_end <= now]:
                ended = self._budgets.pop(key)
                if ended.suppressed:
                    lines.append(self._summary(key, ended))
            key = (peer, reason)
            if key not in self._budgets and len(self._budgets) >= self.max_peers:
                key = ("other", reason)
            budget = self._budgets.setdefault(key, _Budget(window_end=now + self.window_seconds))
            if budget.written < self.per_window:
                budget.written += 1
                lines.append((message, {"peer": key[0], "reason": reason, **fields}))
            else:
                budget.suppressed += 1
        for text, extra in lines:  # outside the lock: a slow log handler must not hold up other calls
            self.logger.warning(text, extra=extra)

    def _summary(self, key: tuple[str, str], budget: _Budget) -> tuple[str, dict[str, Any]]:
        return (
            "refusal lines suppressed",
            {
                "peer": key[0],
                "reason": key[1],
                "suppressed": budget.suppressed,
                "window_seconds": self.window_seconds,
            },
        )


def peer_host(context: grpc.ServicerContext) -> str:
    """The caller's address without its port (``ipv4:10.1.2.3:51234`` -> ``10.1.2.3``): a port changes with every
    connection, so it would give a flooding peer a fresh budget each time."""
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    if kind in {"ipv4", "ipv6"}:
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer or "unknown"


@dataclass(frozen=True)
class IncomingCall:
    """One call as the gate holds it: the raw request (bytes, or an iterator of bytes for a client-streaming
    method), how to decode it, and the handler to run with the decoded request."""

    service: str
    method: str
    context: grpc.ServicerContext
    raw: Any
    deserialize: Callable[[bytes], Any] | None
    behaviour: Callable[[Any, grpc.ServicerContext], Any]
    streaming_request: bool
    gate: RequestGate = field(repr=False)

    def refuse(self, status: grpc.StatusCode, details: str, *, reason: str, message: str, **fields: Any) -> NoReturn:
        """End the call with ``status`` and ``details`` for the caller; write ``message`` (rate-limited, no
        traceback) with ``reason``, the method and ``fields`` to the log."""
        self.gate.refusals.warn(message, peer=peer_host(self.context), reason=reason, method=self.method, **fields)
        if self.gate.reason_key is not None:
            self.context.set_trailing_metadata(((self.gate.reason_key, reason),))
        self.context.abort(status, details)
        raise AssertionError("unreachable")  # context.abort raises

    def _decode_one(self, raw: bytes) -> Any:
        assert self.deserialize is not None
        try:
            return self.deserialize(raw)
        except Exception as exc:  # DecodeError, or anything else the parser raises: the bytes are the caller's
            self.refuse(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request body is not a {self.method} request message: it does not decode",
                reason="undecodable",
                message="request refused: the body does not decode",
                error=type(exc).__name__,
                size=len(raw),
            )

    def decode(self) -> Any:
        """The decoded request (for a client-streaming method, an iterator decoding each message as it is read);
        an undecodable body ends the call with ``INVALID_ARGUMENT``."""
        if self.deserialize is None:
            return self.raw
        if not self.streaming_request:
            return self._decode_one(self.raw)
        return self._decode_stream(self.raw)

    def _decode_stream(self, raw: Iterator[bytes]) -> Iterator[Any]:
        for message in raw:
            yield self._decode_one(message)

    def run(self, request: Any) -> Any:
        """Run the service's handler with the decoded ``request``."""
        return self.behaviour(request, self.context)


#: The four kinds of gRPC method handler, for interceptors that wrap a handler's behaviour: the handler's attribute,
#: the factory that makes one, whether the requests stream and whether the responses stream.
HANDLER_KINDS: tuple[tuple[str, Callable[..., _Handler], bool, bool], ...] = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler, False, False),
    ("unary_stream", grpc.unary_stream_rpc_method_handler, False, True),
    ("stream_unary", grpc.stream_unary_rpc_method_handler, True, False),
    ("stream_stream", grpc.stream_stream_rpc_method_handler, True, True),
)


class RequestGate(_Interceptor):
    """The innermost interceptor of every Hedui server: decodes each request only once :meth:`handle` admitted
    the caller, and refuses an undecodable one with ``INVALID_ARGUMENT`` and a rate-limited WARNING line.

    The plain gate admits every caller (health checking, reflection, and servers whose handlers decide alone).
    A service that authenticates callers subclasses it and overrides :meth:`handle`: refuse first, with
    :meth:`IncomingCall.refuse`, then ``call.run(call.decode())``. ``reason_key`` names a trailing metadata key
    that carries the refusal's reason code to the caller (the connector's :data:`REFUSAL_REASON_KEY`).
    """

    def __init__(self, refusals: RefusalLog | None = None, *, reason_key: str | None = None) -> None:
        self.refusals = refusals if refusals is not None else RefusalLog(log)
        self.reason_key = reason_key

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], _Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, _, method = handler_call_details.method.lstrip("/").partition("/")
        for kind, make, streaming_request, _ in HANDLER_KINDS:
            behaviour = getattr(handler, kind)
            if behaviour is not None:
                return make(
                    self._raw(service, method, behaviour, handler.request_deserializer, streaming_request),
                    request_deserializer=None,  # grpcio passes the bytes through; the gate decodes them
                    response_serializer=handler.response_serializer,
                )
        return handler

    def _raw(
        self,
        service: str,
        method: str,
        behaviour: Callable[[Any, grpc.ServicerContext], Any],
        deserialize: Callable[[bytes], Any] | None,
        streaming_request: bool,
    ) -> Callable[[Any, grpc.ServicerContext], Any]:
        def call(raw: Any, context: grpc.ServicerContext) -> Any:
            return self.handle(
                IncomingCall(service, method, context, raw, deserialize, behaviour, streaming_request, self)
            )

        return call

    def handle(self, call: IncomingCall) -> Any:
        """Admit, decode, run. Subclasses refuse callers here before ``call.decode()``."""
        return call.run(call.decode())


def new_server(
    *,
    max_workers: int,
    interceptors: Sequence[grpc.ServerInterceptor[Any, Any]] = (),
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Server:
    """A gRPC server that owns its port alone and decodes requests only after admitting the caller.

    grpcio binds with SO_REUSEPORT by default, so a second process told to listen on a port that is already
    served binds without error and the kernel hands it some of the connections: a connector started twice, or
    any local process, would silently take over part of another server's traffic. Hedui servers refuse that.

    The chain of ``interceptors`` ends with a :class:`RequestGate`: the last interceptor if it is one (a
    service's authenticating gate), else a plain one is added. A gate anywhere else is a mistake (the
    interceptors inside it would see raw bytes) and raises ValueError.
    """
    chain = list(interceptors)
    if any(isinstance(i, RequestGate) for i in chain[:-1]):
        raise ValueError("the RequestGate must be the last interceptor")
    if not chain or not isinstance(chain[-1], RequestGate):
        chain.append(RequestGate())
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=chain,
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
