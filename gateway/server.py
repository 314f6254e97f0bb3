"""The gateway process: the gRPC API (agency service, health checking, reflection), the exchange engine with its
per-unit workers, the scheduler and the Prometheus endpoint, wired from one config file."""

from __future__ import annotations

import logging
import socket
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
from gateway.certificates import publish_crl, revocation_source
from gateway.certificates.requests import CERTIFICATE_REQUEST_ITEM, CertificateRequests, unit_policies
from gateway.config import GatewayConfig
from gateway.db.database import open_database
from gateway.exchange.engine import EngineSettings, ExchangeEngine, UnitWorkers
from gateway.exchange.schedule import GatewayScheduler, JobIntervals, SchedulePolicy
from gateway.exchange.store import GatewayStore
from gateway.exchange.transport import ClientTls, UnitClient, fetch_server_certificate
from gateway.metrics import GatewayMetrics
from gateway.ops.replica import ReplicaLease, ReplicaLock
from gateway.procedure.approval_trees import complete_trees
from gateway.procedure.staff import StaffRegister
from gateway.procedure.workflow import Workflow
from gateway.trust import GatewayKeys, TrustItems, TrustSchedule, TrustSyncer, default_handlers
from gateway.trust.rosters import ROSTER_ITEM, PeerRosters
from keys.clock import MINUTE_MS, SystemClock
from keys.crl import RevocationList
from keys.envelope import Courier, Policy
from keys.live import LiveKeystore, Watcher
from keys.roster import Notice
from keys.tls import TlsIdentity, check_tls
from keys.trustsync import Handler

log = logging.getLogger("hedui.gateway")


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
    #: The live keystore, its watch, and the trust synchronisations with units (gateway/trust/).
    keys: GatewayKeys | None = None
    trust: TrustSchedule | None = None
    key_watch: Watcher | None = None
    #: The units' certificate requests; ``.handler()`` is the CERTIFICATE_REQUEST trust item handler.
    certificate_requests: CertificateRequests | None = None

    def stop(self, grace: float | None = 2.0) -> None:
        self.health.enter_graceful_shutdown()
        self.scheduler.shutdown()
        if self.key_watch is not None:
            self.key_watch.stop()
        if self.trust is not None:
            self.trust.shutdown()
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
    live = LiveKeystore.open(config.keys.keystore, config.keys.passphrase_file)
    party, trust = live.party, live.trust
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
            live=live,
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
    live: LiveKeystore,
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
    clock = live.clock
    party = live.party
    # Commissions stored before approval trees, not yet approved: their trees, before staff can read a digest.
    complete_trees(engine, AuditLog(engine), gateway=party.party_id, units=store.units.all(), now_ms=clock.now_ms())
    # Online: an envelope older than our envelope lifetime (plus skew) is expired (docs/envelope.md step 7c).
    policy = Policy.online(config.exchange.envelope_ttl_minutes * MINUTE_MS)
    courier = Courier(party, live.trust, replay=store.replay, clock=clock, policy=policy)
    courier.on_reject = metrics.service.counting_rejections(courier.on_reject)
    metrics.watch_store(engine)
    tls.watch(metrics, engine, config.synchronised_units())
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
    # The agency's notice rule: a unit's roster version counts its new members from the notice after its receipt.
    notice_days = config.staff.roster_notice_working_days
    rosters = PeerRosters(engine, notice=lambda: Notice(calendar.current(), notice_days))
    exchange.rosters = rosters  # the answer staff are judged by the units' rosters so read
    metrics.watch_rosters(lambda: rosters.metrics(clock.now_ms()))
    requests = certificate_requests(config, engine, tls.sources.get("client"))
    requests.on_refused = metrics.certificate_request_refused
    metrics.watch_certificate_requests(lambda: requests.ages(clock.now_ms()))
    keys, trust_schedule = _trust(
        config,
        live=live,
        store=store,
        courier=courier,
        clients=clients,
        metrics=metrics,
        exchange=exchange,
        handlers={
            ROSTER_ITEM: roster_handler(rosters, live, config, calendar),
            CERTIFICATE_REQUEST_ITEM: requests.handler(),
        },
        held_roster_version=rosters.held_version,
        peer_roster_version=rosters.catch_up(TrustItems(engine), party.party_id, clock.now_ms),
    )
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
        key_check=keys.key_job,
        metrics=metrics,
        checkpoint=Checkpointer(AuditLog(engine), party, clock),
        trust_sync=trust_schedule.start_due,
    )
    audit = AuditLog(engine)
    workflow = Workflow(store=store, audit=audit, staff=StaffRegister(engine, audit), clock=clock, agency=party)
    key_watch = Watcher("hedui-keystore-watch", keys.watch, config.keys.watch_interval_seconds)
    scheduler.start()
    key_watch.start()
    try:
        release_port(reserved)  # grpcio binds it now; nothing else on this host took it meanwhile but by a fluke
        server, port, health_servicer = _grpc_server(config, workflow, metrics, tls)
    except BaseException:
        scheduler.shutdown()
        key_watch.stop()
        trust_schedule.shutdown()
        workers.shutdown()
        raise
    running = RunningGateway(server, port, store, exchange, workers, scheduler, health_servicer, clients, metrics)
    running.keys, running.trust, running.key_watch = keys, trust_schedule, key_watch
    running.certificate_requests = requests
    return running


def _trust(
    config: GatewayConfig,
    *,
    live: LiveKeystore,
    store: GatewayStore,
    courier: Courier,
    clients: Mapping[str, UnitClient],
    metrics: GatewayMetrics,
    exchange: ExchangeEngine,
    handlers: Mapping[int, Handler] | None = None,
    held_roster_version: Callable[[str], int] = lambda peer: 0,
    peer_roster_version: Callable[[str, int], None] | None = None,
) -> tuple[GatewayKeys, TrustSchedule]:
    """The live keys and the trust synchronisations with units (gateway/trust/): our own announcements published
    for every unit reached online, the item handlers (key announcements; rosters and revocation lists are
    registered by their owners through ``handlers``), "refresh keys" for the exchange, and the metrics."""
    online = [u.party_id for u in config.units if u.exchange_mode != "media"]
    keys = GatewayKeys(live, TrustItems(store.engine), online, config.keys.rotation_policy())
    syncer = TrustSyncer(
        store=store,
        courier=courier,
        clients=clients,
        keys=live,
        handlers={**default_handlers(live), **(handlers or {})},
        held_roster_version=held_roster_version,
        peer_roster_version=peer_roster_version,
        envelope_ttl_ms=config.exchange.envelope_ttl_minutes * 60_000,
        replica=config.exchange.replica_id,
        lease_ms=int(config.exchange.lease_seconds * 1000),
        metrics=metrics,
    )
    exchange.refresh.refresher = syncer.refresh
    metrics.watch_keys(keys.retiring)
    metrics.trust.watch_keys(lambda: [
        (r.party, r.key_id, r.algorithm.name.lower(), r.owner, r.days_left, r.rotation_due_days)
        for r in keys.expiries()
    ])  # fmt: skip
    return keys, TrustSchedule(syncer, interval_ms=int(config.trust.sync_interval_seconds * 1000))


def roster_handler(
    rosters: PeerRosters, live: LiveKeystore, config: GatewayConfig, calendar: CalendarSource
) -> Handler:
    """The ROSTER trust item handler: a unit's signed roster version, judged with the trust store as it is now and
    the agency's notice (gateway/trust/rosters.py)."""
    days = config.staff.roster_notice_working_days
    return rosters.handler(
        trust=lambda: live.trust,
        notice=lambda: Notice(calendar.current(), days),
        own_party_id=live.party.party_id,
    )


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
        for crl in revocations.lists:  # one per CA
            send_on(crl)


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
