"""What the gateway's and the connector's metrics have in common: envelope rejections by reason, gRPC server
requests by method and status, and the HTTP endpoint Prometheus scrapes (on its own port, see docs/operations.md).

Every metrics owner takes a ``CollectorRegistry``; label values come from small fixed sets (reason codes, method
names of the services we register, gRPC status names, configured party ids) and never from personal data.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
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
from common.db import DatabaseHealth
from common.logs import LogThrottle, database_error, database_error_code
from common.rpc import HANDLER_KINDS, PortInUse
from common.tlsreload import CertificateSource, RevocationSource
from common.workdays import CHINA_TZ, WorkdayCalendar

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
        for kind, make, _, streaming_response in HANDLER_KINDS:
            behaviour = getattr(handler, kind)
            if behaviour is not None:
                wrapped = done.streaming(behaviour) if streaming_response else done.unary(behaviour)
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


class DatabaseReader(Protocol):
    """Series read from the database when Prometheus scrapes (a few COUNT queries)."""

    def describe(self) -> Iterable[Metric]:
        """The families ``read`` returns, empty (the registry checks names with it, without touching the database)."""
        ...

    def read(self) -> Sequence[Metric]:
        """The families with their current values; raises the database's error when it cannot be read."""
        ...


class ServiceMetrics:
    """The metrics every Hedui service exports; the gateway's and the connector's metrics each hold one.

    ``database`` is what the process has lately seen of its database (``hedui_database_up``, once
    :meth:`watch_database` is called); its work reports failures there. ``clock`` (monotonic seconds) times that
    and the age of the database-backed series; tests inject one."""

    def __init__(
        self,
        registry: CollectorRegistry,
        envelope_reasons: Iterable[str],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.clock = clock
        self.database = DatabaseHealth(clock=clock)
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
        self.tls_reloads = Counter(
            "hedui_tls_certificate_reloads_total",
            "Renewed TLS files looked at while serving, by role and outcome: installed (used for new handshakes from "
            "then on) or refused (the previous certificate stays; see hedui_tls_certificate_reload_failing).",
            ["role", "outcome"],
            registry=registry,
        )
        self.crl_refusals = Counter(
            "hedui_tls_crl_refusals_total",
            "Certificate revocation lists refused, by reason: not signed by the CA, older than the one held "
            "(rollback), unreadable ... The list held stays in force.",
            ["reason"],
            registry=registry,
        )
        self.revoked_peers = Counter(
            "hedui_tls_revoked_peers_total",
            "Peers refused because the CA revoked their TLS certificate, by side: client (a caller of this server) "
            "or server (a unit's connector the gateway called, found by its certificate check).",
            ["side"],
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
        """Export the seconds until each TLS certificate stops being valid, by role, from fixed notAfter times
        (POSIX); a serving process uses :meth:`watch_tls`, which follows reloaded certificates."""
        fixed = dict(not_after)
        self.registry.register(_CertificateCollector(lambda: fixed, clock))

    def watch_tls(
        self,
        sources: Sequence[CertificateSource],
        revocations: RevocationSource | None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Export the process's TLS state at scrape time: the seconds each certificate in use has left (by role),
        whether renewed files were refused, and the age and next update of the revocation list in force; count
        reloads, refused lists and revoked peers from now on (each series starts at 0)."""
        for source in sources:
            for outcome in ("installed", "refused"):
                self.tls_reloads.labels(source.role, outcome)
        for code in CRL_REFUSAL_CODES:
            self.crl_refusals.labels(code)
        self.revoked_peers.labels("client")
        self.registry.register(_TlsStateCollector(list(sources), revocations, clock))

    def certificate_reloaded(self, role: str, installed: bool) -> None:
        """A CertificateSource's ``on_reload`` hook."""
        self.tls_reloads.labels(role, "installed" if installed else "refused").inc()

    def crl_refused(self, code: str) -> None:
        """A RevocationSource's ``on_refused`` hook (a code outside the known set counts as crl_invalid)."""
        self.crl_refusals.labels(code if code in CRL_REFUSAL_CODES else "crl_invalid").inc()

    def peer_revoked(self, side: str) -> None:
        """A peer presented a certificate the CA revoked: side "client" (a caller of this server) or "server" (a
        unit's connector the gateway called)."""
        self.revoked_peers.labels(side).inc()

    def watch_database(self, reader: DatabaseReader) -> None:
        """Export ``reader``'s series, read at scrape time, with ``hedui_database_up`` and the age of the values:
        while the database cannot be read the last values read stay exported (their alerts keep firing, not fall
        silent) and ``hedui_database_scrape_age_seconds`` says how old they are."""
        self.registry.register(_DatabaseCollector(reader, self.database, self.clock))


_CERTIFICATE_EXPIRY = (
    "Seconds until the TLS certificate this process presents stops being valid (its notAfter), by role: server "
    "(the gRPC server's certificate) or client (the gateway's certificate towards the connectors). Follows renewed "
    "certificates as the process reloads them (common/tlsreload.py); negative once ended."
)
_RELOAD_FAILING = (
    "1 when the TLS files of this role on disk were changed but refused (key not the certificate's, not signed by "
    "the CA, expired, wrong party or usage): the process keeps presenting the previous certificate; 0 otherwise."
)
_CRL_NEXT_UPDATE = (
    "Seconds until the next update the CA promised in the revocation list this process enforces (negative: overdue; "
    "the list stays in force). Absent when the process holds no list."
)
_CRL_AGE = "Seconds since the revocation list this process enforces was signed (its thisUpdate)."
_CRL_NUMBER = "The CRL number of the revocation list this process enforces (never goes down)."
#: Reason codes of a refused revocation list (keys/crl.py), the label values of hedui_tls_crl_refusals_total.
CRL_REFUSAL_CODES = (
    "crl_unreadable",
    "crl_wrong_issuer",
    "crl_bad_signature",
    "crl_unnumbered",
    "crl_rollback",
    "crl_number_reused",
    "crl_invalid",
)


class _CertificateCollector(Collector):
    def __init__(self, not_after: Callable[[], Mapping[str, float]], clock: Callable[[], float]) -> None:
        self.not_after = not_after
        self.clock = clock

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("hedui_tls_certificate_expiry_seconds", _CERTIFICATE_EXPIRY, labels=["role"])

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("hedui_tls_certificate_expiry_seconds", _CERTIFICATE_EXPIRY, labels=["role"])
        now = self.clock()
        for role, end in sorted(self.not_after().items()):
            family.add_metric([role], end - now)
        yield family


class _TlsStateCollector(Collector):
    """The certificates in use (seconds left) and reload failures by role, and the revocation list's number, age
    and next update, read at scrape time."""

    def __init__(
        self, sources: Sequence[CertificateSource], revocations: RevocationSource | None, clock: Callable[[], float]
    ) -> None:
        self.sources = sources
        self.revocations = revocations
        self.clock = clock

    @staticmethod
    def _families() -> tuple[
        GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily
    ]:
        return (
            GaugeMetricFamily("hedui_tls_certificate_expiry_seconds", _CERTIFICATE_EXPIRY, labels=["role"]),
            GaugeMetricFamily("hedui_tls_certificate_reload_failing", _RELOAD_FAILING, labels=["role"]),
            GaugeMetricFamily("hedui_tls_crl_next_update_seconds", _CRL_NEXT_UPDATE),
            GaugeMetricFamily("hedui_tls_crl_age_seconds", _CRL_AGE),
            GaugeMetricFamily("hedui_tls_crl_number", _CRL_NUMBER),
        )

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        expiry, failing, next_update, age, number = self._families()
        now = self.clock()
        for source in sorted(self.sources, key=lambda s: s.role):
            source.refresh()  # a server without new connections has not asked its fetcher lately
            expiry.add_metric([source.role], source.identity.not_after.timestamp() - now)
            failing.add_metric([source.role], 1.0 if source.failing else 0.0)
        revocations = self.revocations
        if revocations is not None:
            revocations.refresh()
            held = revocations.held
            seconds, old = revocations.seconds_to_next_update(), revocations.age_seconds()
            if seconds is not None:
                next_update.add_metric([], seconds)
            if old is not None:
                age.add_metric([], old)
            if held is not None:
                number.add_metric([], held.number)
        yield from (expiry, failing, next_update, age, number)


_DATABASE_UP = (
    "Whether this process's database works (1) or not (0): 0 when the read at this scrape failed, or an operation "
    "of the process's work (scheduler job, unit cycle, answer worker) failed on the database in the last minute."
)
_DATABASE_AGE = (
    "Seconds since the database-backed series of this scrape were read: 0 normally; while the database cannot "
    "be read, the last values read are exported and this grows. Before the first successful read: the seconds since "
    "the process started, with no database-backed series at all."
)
#: The collector's "database not readable" line at most this often (Prometheus scrapes every 15-30 s).
_SCRAPE_LOG_INTERVAL_S = 60.0


class _DatabaseCollector(Collector):
    """A DatabaseReader's series, kept at their last known values while the database cannot be read."""

    def __init__(self, reader: DatabaseReader, health: DatabaseHealth, clock: Callable[[], float]) -> None:
        self.reader = reader
        self.health = health
        self.clock = clock
        self.throttle = LogThrottle(_SCRAPE_LOG_INTERVAL_S, clock=clock)
        self._last: Sequence[Metric] = ()
        self._read_at: float | None = None
        self._started = clock()
        self._lock = threading.Lock()

    @staticmethod
    def _own() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily("hedui_database_up", _DATABASE_UP),
            GaugeMetricFamily("hedui_database_scrape_age_seconds", _DATABASE_AGE),
        )

    def describe(self) -> Iterator[Metric]:
        yield from self.reader.describe()
        yield from self._own()

    def collect(self) -> Iterator[Metric]:
        up, age = self._own()
        with self._lock:  # two scrapes at once read once each, but never interleave the cache
            try:
                self._last, self._read_at = tuple(self.reader.read()), self.clock()
            except Exception as exc:
                if database_error(exc) is None:
                    raise
                self.health.failed()
                held_back = self.throttle.admit(type(exc).__name__)
                if held_back is not None:
                    log.warning(
                        "metrics: database not readable; exporting the last values read",
                        extra={
                            "error": type(exc).__name__,
                            "db_code": database_error_code(exc),
                            "age_s": None if self._read_at is None else round(self.clock() - self._read_at),
                            "repeated": held_back or None,
                        },
                    )
            else:
                self.throttle.clear()  # the next failure is news again
            last, read_at = self._last, self._read_at
        up.add_metric([], 1.0 if self.health.up else 0.0)
        yield up
        # Always exported: a process whose database was gone from its start has no last values to show, and an
        # age that grows from the start says so (an alert on the age needs no special case).
        age.add_metric([], max(0.0, self.clock() - (self._started if read_at is None else read_at)))
        yield age
        yield from last


_CALENDAR_KNOWN_UNTIL = (
    "Unix time of the end (midnight, Beijing time) of the last day the working-day calendar knows: the official "
    "holiday schedules it holds, built in and from the holiday file, without a gap from the current year on. Due "
    "dates past it are provisional (docs/exchange.md); install the next year's schedule before it is reached "
    "(docs/operations.md, 'Calendar running out')."
)


class CalendarCollector(Collector):
    """``hedui_calendar_known_until``, read at scrape time from ``calendar()`` (the calendar in use now, which a
    re-read holiday file may replace) on the day ``clock()`` (POSIX seconds) gives in Beijing time."""

    def __init__(self, calendar: Callable[[], WorkdayCalendar], clock: Callable[[], float] = time.time) -> None:
        self.calendar = calendar
        self.clock = clock

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("hedui_calendar_known_until", _CALENDAR_KNOWN_UNTIL)

    def collect(self) -> Iterator[Metric]:
        today = datetime.fromtimestamp(self.clock(), tz=CHINA_TZ).date()
        value = self.calendar().known_until_timestamp(today)
        yield GaugeMetricFamily("hedui_calendar_known_until", _CALENDAR_KNOWN_UNTIL, value=value)


# -- trust that travels (both services) ---------------------------------------------------------------------------

_TRUST_UNACKNOWLEDGED = (
    "Trust items this party published (rosters, key announcements, revocation lists) that the peer has not "
    "acknowledged yet, by peer and kind (docs/exchange.md, 'Trust synchronisation')."
)
_TRUST_OLDEST = (
    "Seconds since the oldest trust item the peer has not acknowledged was published, by peer and kind; absent when "
    "the peer has acknowledged everything."
)
_KEY_EXPIRY_DAYS = (
    "Days until a key stops being valid, for every key that is neither retired nor revoked: own keys (owner=own) "
    "and peers' keys (owner=peer); +Inf for a key without an end (in use, no successor announced). A party whose "
    "every key of an algorithm has a finite value here has no successor for it."
)
_KEY_ROTATION_DUE = (
    "Days until the own key in use of each algorithm is due for its scheduled rotation ([keys] rotate_*_days); "
    "negative when it is overdue (the key job cannot rotate). Absent while a successor is waiting to take over or "
    "automatic rotation of that key is off."
)

#: (peer, kind name, how many, age in seconds of the oldest) of the items a peer has not acknowledged.
TrustBacklog = Iterable[tuple[str, str, int, float]]
#: (party, key id hex, algorithm name, owner "own"/"peer", days left, days until rotation due or None).
KeyRows = Callable[[], Iterable[tuple[str, str, str, str, float, float | None]]]


def trust_backlog_families(backlog: TrustBacklog) -> list[Metric]:
    """``hedui_trust_unacknowledged`` and ``hedui_trust_unacknowledged_oldest_seconds`` from the deliveries not yet
    acknowledged; a side's database reader adds them to what it reads at scrape time."""
    count = GaugeMetricFamily("hedui_trust_unacknowledged", _TRUST_UNACKNOWLEDGED, labels=["peer", "kind"])
    oldest = GaugeMetricFamily("hedui_trust_unacknowledged_oldest_seconds", _TRUST_OLDEST, labels=["peer", "kind"])
    tally: dict[tuple[str, str], tuple[int, float]] = {}
    for peer, kind, number, age in backlog:
        known, age_max = tally.get((peer, kind), (0, 0.0))
        tally[(peer, kind)] = (known + number, max(age_max, age))
    for (peer, kind), (number, age_max) in sorted(tally.items()):
        count.add_metric([peer, kind], float(number))
        oldest.add_metric([peer, kind], age_max)
    return [count, oldest]


def trust_backlog_described() -> list[Metric]:
    return trust_backlog_families(())


class TrustMetrics:
    """Trust synchronisations and the items they carried, and the keys' lifetimes (gateway and connector)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.syncs = Counter(
            "hedui_trust_syncs_total",
            "Trust synchronisations (SyncTrust) by peer, what started them (start, interval, items, requested, "
            "refresh; at a connector: peer, the gateway called) and outcome (ok, failed).",
            ["peer", "trigger", "outcome"],
            registry=registry,
        )
        self.items = Counter(
            "hedui_trust_items_received_total",
            "Trust items received from a peer, by kind and verdict (applied, or refused: a reason code).",
            ["peer", "kind", "verdict"],
            registry=registry,
        )

    def add_peers(self, peers: Iterable[str], triggers: Sequence[str]) -> None:
        """Create the series of each peer at zero, so that rates and alerts see a peer before its first sync."""
        for peer in peers:
            for trigger in triggers:
                for outcome in ("ok", "failed"):
                    self.syncs.labels(peer, trigger, outcome)

    def synced(self, peer: str, trigger: str, outcome: str) -> None:
        self.syncs.labels(peer, trigger, outcome).inc()

    def item_received(self, peer: str, kind: str, reason: str | None) -> None:
        self.items.labels(peer, kind, "applied" if reason is None else reason).inc()

    def watch_keys(self, rows: KeyRows) -> None:
        """Export ``hedui_key_expiry_days`` and ``hedui_key_rotation_due_days`` from ``rows()`` at scrape time."""
        self.registry.register(_KeyCollector(rows))


class _KeyCollector(Collector):
    def __init__(self, rows: KeyRows) -> None:
        self.rows = rows

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily("hedui_key_expiry_days", _KEY_EXPIRY_DAYS, labels=["party", "key", "algorithm", "owner"]),
            GaugeMetricFamily("hedui_key_rotation_due_days", _KEY_ROTATION_DUE, labels=["party", "algorithm"]),
        )

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        expiry, due = self._families()
        for party, key, algorithm, owner, days_left, rotation_due in self.rows():
            expiry.add_metric([party, key, algorithm, owner], days_left)
            if rotation_due is not None:
                due.add_metric([party, algorithm], rotation_due)
        yield expiry
        yield due
