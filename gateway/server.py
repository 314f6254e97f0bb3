"""The gateway process: the gRPC API (agency service, health checking, reflection), the exchange engine with its
per-unit workers, the scheduler and the Prometheus endpoint, wired from one config file."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health
from hedui.v1 import agency_pb2_grpc
from sqlalchemy import Engine

from common.categories import unit_category_by_name
from common.config import ConfigError
from common.db import make_engine
from common.memory import tune_allocator
from common.metrics import MetricsServer, process_registry, serve_metrics
from common.rpc import check_plaintext, new_server, release_port, reserve_port, start_server
from common.tlsreload import CertificateSource, RevocationSource, dynamic_server_credentials
from common.workdays import CalendarSource
from gateway.api.agency import SERVER_OPTIONS as AGENCY_OPTIONS
from gateway.api.agency import SERVICE as AGENCY_SERVICE
from gateway.api.agency import AgencyServicer, AuthInterceptor
from gateway.archive.audit import AuditLog
from gateway.archive.checkpoints import Checkpointer
from gateway.certificates import publish_crl, revocation_source, units_to_tell
from gateway.certificates.requests import CertificateRequests, unit_policies
from gateway.config import GatewayConfig
from gateway.db.database import open_database
from gateway.exchange.engine import EngineSettings, ExchangeEngine, UnitWorkers
from gateway.exchange.schedule import GatewayScheduler, JobIntervals, SchedulePolicy
from gateway.exchange.store import GatewayStore
from gateway.exchange.transport import ClientTls, UnitClient, fetch_server_certificate
from gateway.metrics import GatewayMetrics
from gateway.ops.replica import ReplicaLease, ReplicaLock
from gateway.procedure.staff import StaffRegister
from gateway.procedure.workflow import Workflow
from gateway.trust.rosters import PeerRosters
from keys import keystore
from keys.clock import DAY_MS, Clock, SystemClock
from keys.crl import RevocationList
from keys.envelope import Courier
from keys.identity import PartyKeys
from keys.keyring import KeyRecord, KeyState
from keys.tls import TlsIdentity, check_tls
from keys.truststore import TrustStore

log = logging.getLogger("hedui.gateway")

#: Warn this long before a retiring key's overlap ends.
KEY_WARNING_DAYS = 7


def check_certificates(config: GatewayConfig) -> dict[str, TlsIdentity]:
    """The checked TLS identities by role ("server": the agency API, "client": towards connectors), each missing
    under its insecure_plaintext; raises TlsError naming every file that is wrong (``check-config`` says the same).
    Certificates that end soon are logged."""
    identities = {identity.role: identity for identity in check_tls(config.tls_files())}
    for identity in identities.values():
        if identity.expiry_warning() is not None:
            log.warning(
                "TLS certificate expires soon", extra={"role": identity.role, "days_left": round(identity.days_left())}
            )
    return identities


class KeyWatch:
    """The key-expiry job: lets time retire keys whose overlap ended, saves the keystore, warns ahead."""

    def __init__(self, config: GatewayConfig, party: PartyKeys, trust: TrustStore, clock: Clock) -> None:
        self.config, self.party, self.trust, self.clock = config, party, trust, clock
        self.lock = threading.Lock()

    def _retiring(self) -> list[tuple[str, KeyRecord, float]]:
        now = self.clock.now_ms()
        records = [(self.party.party_id, r) for r in self.party.records()]
        records += [(party, r) for party, ring in self.trust for r in ring]
        return [
            (party, record, (record.not_after_ms - now) / DAY_MS)
            for party, record in records
            if record.state is KeyState.RETIRING and record.not_after_ms is not None
        ]

    def days_left(self) -> dict[str, float]:
        """Days until each retiring key (ours and peers') stops being valid."""
        return {f"{party}/{record.key_id.hex()}": days for party, record, days in self._retiring()}

    def expiries(self) -> list[tuple[str, str, float]]:
        """(party, algorithm, days left) of each retiring key, for the metrics."""
        with self.lock:
            return [(party, record.algorithm.name.lower(), days) for party, record, days in self._retiring()]

    def __call__(self) -> None:
        with self.lock:
            now = self.clock.now_ms()
            if self.party.advance(now):
                passphrase = keystore.read_passphrase_file(self.config.keys.passphrase_file)
                keystore.save(self.config.keys.keystore, self.party, self.trust, passphrase)
                log.info("retired keys whose overlap ended; keystore saved")
            self.trust.advance(now)
            for key, days in self.days_left().items():
                if days <= KEY_WARNING_DAYS:
                    log.warning("key retires soon", extra={"key": key, "days_left": round(days, 1)})


@dataclass
class RunningGateway:
    server: grpc.Server
    port: int
    store: GatewayStore
    engine: ExchangeEngine
    workers: UnitWorkers
    scheduler: GatewayScheduler
    health: health.HealthServicer
    clients: dict[str, UnitClient]
    metrics: GatewayMetrics | None = None
    metrics_server: MetricsServer | None = None
    lease: ReplicaLease | None = None
    lock: ReplicaLock | None = None
    #: The units' certificate requests; ``.handler()`` is the CERTIFICATE_REQUEST trust item handler.
    certificate_requests: CertificateRequests | None = None

    def stop(self, grace: float | None = 2.0) -> None:
        self.health.enter_graceful_shutdown()
        self.scheduler.shutdown()
        self.workers.shutdown()
        self.server.stop(grace).wait()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        for client in self.clients.values():
            client.close()
        if self.lease is not None:
            self.lease.release()
            self.lease.engine.dispose()
        self.store.engine.dispose()
        if self.lock is not None:
            self.lock.release()


def build(config: GatewayConfig, *, on_lease_lost: Callable[[], None] | None = None) -> RunningGateway:
    """Wire and start everything the config describes.

    The order is what makes a refused start harmless: files are checked first, then this process takes its replica
    id on this host (a lock file), reserves the API port (bound, not yet listening) and serves the metrics port,
    then reads who holds the replica id in the database; only when none of these is refused does it write anything
    (migrations if asked and needed, then its replica lease, the units, its old claims). The API listens last.
    A refusal raises a HeduiError, having changed nothing. ``on_lease_lost`` is called if another process later
    takes the replica id (see gateway/ops/replica.py).
    """
    tune_allocator()
    # Certificates first: a wrong one would otherwise start a gateway that reaches no unit.
    identities = check_certificates(config)
    sources = {
        role: CertificateSource(identity.files, initial=identity, interval=config.tls.check_interval_seconds)
        for role, identity in identities.items()
    }
    revocations = revocation_source(config, lambda: b"".join(s.identity.ca_pem for s in sources.values()))
    passphrase = keystore.read_passphrase_file(config.keys.passphrase_file)
    party, trust = keystore.load(config.keys.keystore, passphrase)
    if party.party_id != config.agency.party_id:
        raise ConfigError(f"keystore belongs to {party.party_id}, config says {config.agency.party_id}")
    for unit in config.units:
        if trust.keyring(unit.party_id) is None:
            raise ConfigError(
                f"unit {unit.party_id} is not in the trust store: import its bundle with "
                "'hedui-keys import BUNDLE --fingerprint ...' first"
            )
    ex = config.exchange
    with ExitStack() as undo:
        lock = ReplicaLock(config.keys.keystore.parent, ex.replica_id)
        lock.acquire()
        undo.callback(lock.release)
        check_plaintext(config.server.listen, _server_credentials(sources.get("server")))
        reserved = reserve_port(config.server.listen)
        undo.callback(release_port, reserved)
        metrics = GatewayMetrics(process_registry())
        metrics_server = serve_metrics(config.metrics.listen, metrics.registry)
        if metrics_server is not None:
            undo.callback(metrics_server.stop)
        lease = ReplicaLease(make_engine(config.database.url), ex.replica_id, int(ex.lease_seconds * 1000))
        undo.callback(lease.engine.dispose)
        lease.check()  # reads only: a live holder of our id stops us here, before any migration
        engine = open_database(config.database.url, migrate=config.database.migrate_on_start)
        undo.callback(engine.dispose)
        lease.claim()  # the first write of a start that needs no migration
        undo.callback(lease.release)
        running = _start(
            config,
            party=party,
            trust=trust,
            tls=GatewayTls(sources, revocations),
            engine=engine,
            metrics=metrics,
            reserved=reserved,
        )
        running.metrics_server, running.lease, running.lock = metrics_server, lease, lock
        lease.start_heartbeat(on_lease_lost or (lambda: None))
        undo.pop_all()
    log.info("gateway running", extra={"port": running.port, "replica": ex.replica_id, "units": len(running.clients)})
    return running


def _start(
    config: GatewayConfig,
    *,
    party: PartyKeys,
    trust: TrustStore,
    tls: GatewayTls,
    engine: Engine,
    metrics: GatewayMetrics,
    reserved: Sequence[socket.socket],
) -> RunningGateway:
    """Everything after the replica id is ours: units, our old claims, the engine, the scheduler, and last the API
    on the port ``reserved`` held until then."""
    store = GatewayStore(engine)
    store.units.sync(
        (u.party_id, unit_category_by_name(u.category), u.endpoint, u.exchange_mode, u.enabled) for u in config.units
    )
    # Claims under our replica id are a previous run's, killed mid-step: release them now rather than after the lease.
    # (A live process with our id was refused above, so these are no one else's.)
    store.batches.release_claims(config.exchange.replica_id)
    clock = SystemClock()
    courier = Courier(party, trust, replay=store.replay, clock=clock)
    courier.on_reject = metrics.service.counting_rejections(courier.on_reject)
    metrics.watch_store(engine)
    tls.watch(metrics, engine, units_to_tell(config))
    ex = config.exchange
    clients = {
        u.party_id: UnitClient(
            u.endpoint,
            tls.sources.get("client"),
            ex.request_timeout_seconds,
            revocations=tls.revocations,
            on_revoked=lambda: metrics.service.peer_revoked("server"),
            recheck_seconds=config.tls.server_check_seconds,
        )
        for u in config.units
    }
    settings = EngineSettings(
        replica=ex.replica_id,
        batch_size=ex.batch_size,
        base_backoff_ms=int(ex.base_backoff_seconds * 1000),
        max_backoff_ms=int(ex.max_backoff_seconds * 1000),
        poll_interval_ms=int(ex.poll_interval_seconds * 1000),
        fetch_group=ex.fetch_group,
        envelope_ttl_ms=ex.envelope_ttl_minutes * 60_000,
        lease_ms=int(ex.lease_seconds * 1000),
        probe_interval_ms=int(ex.probe_interval_seconds * 1000),
    )
    calendar = CalendarSource(ex.holiday_file)
    exchange = ExchangeEngine(
        store, courier, clients, calendar.current(), settings, metrics=metrics, calendar_source=calendar
    )
    # At start: provisional due dates a newly installed holiday file can fix (the deadline sweep re-checks later).
    exchange.settle_due_dates()
    metrics.watch_calendar(lambda: exchange.calendar)
    workers = UnitWorkers(exchange, max_workers=max(4, len(clients)))
    sched = config.schedule
    key_watch = KeyWatch(config, party, trust, clock)
    metrics.watch_keys(key_watch.expiries)
    rosters = PeerRosters(engine)
    metrics.watch_rosters(lambda: rosters.metrics(clock.now_ms()))
    requests = certificate_requests(config, engine, tls.sources.get("client"))
    requests.on_refused = metrics.certificate_request_refused
    metrics.watch_certificate_requests(lambda: requests.ages(clock.now_ms()))
    scheduler = GatewayScheduler(
        store=store,
        engine=exchange,
        workers=workers,
        policy=SchedulePolicy(sched.policy, (sched.exchange_window[0], sched.exchange_window[1]), sched.report_day),
        intervals=JobIntervals(
            sched.dispatch_interval_seconds,
            ex.poll_interval_seconds,
            sched.sweep_interval_seconds,
            sched.key_check_interval_seconds,
            config.archive.checkpoint_interval_seconds,
        ),
        clock=clock,
        replica=ex.replica_id,
        lease_ms=settings.lease_ms,
        key_check=key_watch,
        metrics=metrics,
        checkpoint=Checkpointer(AuditLog(engine), party, clock),
    )
    audit = AuditLog(engine)
    workflow = Workflow(store=store, audit=audit, staff=StaffRegister(engine, audit), clock=clock, agency=party)
    scheduler.start()
    try:
        release_port(reserved)  # grpcio binds it now; nothing else on this host took it meanwhile but by a fluke
        server, port, health_servicer = _grpc_server(config, workflow, metrics, tls)
    except BaseException:
        scheduler.shutdown()
        workers.shutdown()
        raise
    running = RunningGateway(server, port, store, exchange, workers, scheduler, health_servicer, clients, metrics)
    running.certificate_requests = requests
    return running


def certificate_requests(
    config: GatewayConfig, engine: Engine, client: CertificateSource | None
) -> CertificateRequests:
    """The units' certificate requests (the CERTIFICATE_REQUEST handler: ``.handler()``), judged by [[units]] and
    each unit's current certificate: the last one issued through the gateway, else the one its connector presents
    to a TLS handshake of the gateway's own (with the client certificate of ``client``)."""
    requests = CertificateRequests(engine)
    endpoints = {u.party_id: u.endpoint for u in config.units}
    timeout = config.exchange.request_timeout_seconds

    def presented(party: str) -> bytes | None:
        if client is None or party not in endpoints:
            return None
        identity = client.identity
        try:
            return fetch_server_certificate(
                endpoints[party], ClientTls(identity.cert_pem, identity.key_pem, identity.ca_pem), timeout
            )
        except OSError:
            return None  # judged without it: only configured names are accepted

    requests.policy = unit_policies(
        ((u.party_id, u.endpoint, u.server_names) for u in config.units), requests, presented
    )
    return requests


@dataclass
class GatewayTls:
    """The gateway's TLS identities as they are reloaded (by role: "server" for the agency API, "client" towards
    the units), and the CA's revocation list it enforces (None: no ``[tls] crl_file``)."""

    sources: dict[str, CertificateSource]
    revocations: RevocationSource | None

    def watch(self, metrics: GatewayMetrics, engine: Engine, units: Sequence[str]) -> None:
        """Export the TLS metrics, count reloads and refused lists, and send every newer list to ``units`` (the list
        held at start too: queuing it again is a no-op)."""
        for source in self.sources.values():
            source.on_reload = metrics.service.certificate_reloaded
        metrics.service.watch_tls(list(self.sources.values()), self.revocations)
        metrics.service.revoked_peers.labels("server")
        revocations = self.revocations
        if revocations is None:
            return
        revocations.on_refused = metrics.service.crl_refused

        def send_on(crl: RevocationList) -> None:
            publish_crl(engine, crl.der, SystemClock().now_ms(), units)

        revocations.on_installed = send_on
        if revocations.held is not None:
            send_on(revocations.held)


def serve_api(
    workflow: Workflow,
    clients: Mapping[str, str],
    *,
    listen: str,
    credentials: grpc.ServerCredentials | None,
    max_workers: int = 8,
    metrics: GatewayMetrics | None = None,
    revocations: RevocationSource | None = None,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Start the agency API (with health checking and reflection) on ``listen``; ``credentials=None`` serves
    plaintext, which is only allowed on loopback. With ``metrics``, every call is counted by method and status;
    with ``revocations``, callers whose client certificate the CA revoked are refused."""
    on_revoked = (lambda: metrics.service.peer_revoked("client")) if metrics is not None else None
    interceptors: list[grpc.ServerInterceptor[Any, Any]] = [
        AuthInterceptor(clients, revocations=revocations, on_revoked=on_revoked)
    ]
    if metrics is not None:
        interceptors.insert(0, metrics.service.interceptor())  # outermost: refused calls are counted too
    server = new_server(max_workers=max_workers, interceptors=interceptors, options=AGENCY_OPTIONS)
    agency_pb2_grpc.add_AgencyServiceServicer_to_server(AgencyServicer(workflow, clients, metrics), server)
    port, health_servicer = start_server(server, [AGENCY_SERVICE], listen=listen, credentials=credentials)
    return server, port, health_servicer


def _server_credentials(source: CertificateSource | None) -> grpc.ServerCredentials | None:
    """The agency API's credentials, following renewed files (None: plaintext)."""
    return None if source is None else dynamic_server_credentials(source)


def _grpc_server(
    config: GatewayConfig, workflow: Workflow, metrics: GatewayMetrics, tls: GatewayTls
) -> tuple[grpc.Server, int, health.HealthServicer]:
    section = config.server
    clients = {c.party_id: c.role for c in config.clients}
    return serve_api(
        workflow,
        clients,
        listen=section.listen,
        credentials=_server_credentials(tls.sources.get("server")),
        max_workers=section.max_workers,
        metrics=metrics,
        revocations=tls.revocations,
    )
