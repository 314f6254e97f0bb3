"""The connector's gRPC exchange server: mutual TLS, the ExchangeService, health checking, reflection, the worker
that answers pending batches, and the Prometheus endpoint."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health
from hedui.v1 import exchange_pb2, exchange_pb2_grpc, trust_pb2

from common.categories import data_category_by_name
from common.config import ConfigError
from common.db import make_engine
from common.logs import LogThrottle, database_error, database_error_code, log_context, new_request_id
from common.metrics import MetricsServer, process_registry, serve_metrics
from common.rosterstore import ROSTER_ITEM
from common.rpc import (
    MAX_SIGNED_REFUSAL_BYTES,
    REFUSAL_REASON_KEY,
    REFUSAL_SIGNED_KEY,
    IncomingCall,
    RefusalLog,
    RequestGate,
    check_plaintext,
    new_server,
    release_port,
    reserve_port,
    start_server,
)
from common.tlsreload import CERTIFICATE_REVOKED, CertificateSource, RevocationSource, dynamic_server_credentials
from common.workdays import CalendarSource
from connectors.adapters.base import Adapter
from connectors.adapters.csv_files import CsvAdapter
from connectors.adapters.sql import SqlAdapter
from connectors.config import ConnectorConfig
from connectors.connector import Connector
from connectors.errors import Refusal
from connectors.metrics import ConnectorMetrics
from connectors.store import ConnectorStore
from connectors.synthetic import Population, SyntheticAdapter
from connectors.trust import ConnectorKeys, TrustDesk, TrustItems, default_handlers
from connectors.trust.duty import OnDuty
from connectors.trust.renewal import CERTIFICATE_ITEM, CertificateRenewal, RenewalJob
from connectors.trust.rosters import PeerRosters
from keys.clock import DAY_MS, MINUTE_MS
from keys.envelope import Courier, Policy
from keys.live import LiveKeystore, RotationPolicy, Watcher
from keys.roster import Notice
from keys.staffkeys import STAFF_PARTY_PREFIX
from keys.tls import TlsIdentity, check_tls, party_from_auth_context, read_private_key
from keys.truststore import TrustStore
from keys.trustsync import ANNOUNCEMENTS_METADATA_KEY, Handler

log = logging.getLogger("hedui.connector")

SERVICE_NAME = exchange_pb2.DESCRIPTOR.services_by_name["ExchangeService"].full_name
#: Envelopes are at most 32 MiB plus framing (docs/envelope.md).
MAX_MESSAGE_BYTES = 33 * 1024 * 1024


class ExchangeGate(RequestGate):
    """The connector's request gate (common/rpc.py): over mutual TLS, a caller whose certificate the CA revoked
    (``certificate_revoked``), whose certificate names no party, or a party this unit has no keys of (it could not send
    an envelope the unit accepts), is UNAUTHENTICATED before its request is decoded; an undecodable body is
    INVALID_ARGUMENT. Refusals carry their reason code in the trailing metadata, and are logged as WARNING lines
    rate-limited per peer and reason."""

    def __init__(
        self, connector: Connector, *, require_tls_identity: bool, revocations: RevocationSource | None = None
    ) -> None:
        super().__init__(RefusalLog(log), reason_key=REFUSAL_REASON_KEY)
        self.connector = connector
        self.require_tls_identity = require_tls_identity
        #: The CA's revocation list: a caller whose certificate it lists is refused before anything else.
        self.revocations = revocations

    def handle(self, call: IncomingCall) -> Any:
        """Name the TLS peer and refuse an unknown one, then decode and run, under a request id."""
        if call.service != SERVICE_NAME:
            return super().handle(call)  # health, reflection
        with log_context(request_id=new_request_id()):  # on every log line written while this call is handled
            if self.require_tls_identity:
                auth = call.context.auth_context()
                if self.revocations is not None and self.revocations.revokes_peer(auth):
                    if self.connector.metrics is not None:
                        self.connector.metrics.service.peer_revoked("client")
                    call.refuse(
                        grpc.StatusCode.UNAUTHENTICATED,
                        "client certificate is revoked",
                        reason=CERTIFICATE_REVOKED,
                        message="request refused",
                        caller=party_from_auth_context(auth),
                    )
                party = party_from_auth_context(auth)
                if party is None:
                    call.refuse(
                        grpc.StatusCode.UNAUTHENTICATED,
                        "client certificate names no party",
                        reason="no_tls_identity",
                        message="request refused",
                    )
                if self.connector.courier.trust.keyring(party) is None:
                    call.refuse(
                        grpc.StatusCode.UNAUTHENTICATED,
                        "client certificate names a party this unit holds no keys of",
                        reason="unknown_party",
                        message="request refused",
                        caller=party,
                    )
            return call.run(call.decode())


class ExchangeServicer(exchange_pb2_grpc.ExchangeServiceServicer):
    """Unwraps the SealedMessage, names the TLS peer, and maps refusals to gRPC statuses. Callers were admitted by
    the ExchangeGate before their request was decoded."""

    def __init__(self, connector: Connector) -> None:
        self.connector = connector
        #: One "store failed" line a minute, whatever the number of calls (the gateway retries every few seconds).
        self._store_log = LogThrottle(60.0)

    def _call(
        self,
        handler: Callable[[bytes, str | None], bytes],
        request: exchange_pb2.SealedMessage,
        context: grpc.ServicerContext,
    ) -> exchange_pb2.SealedMessage:
        return self._serve(
            lambda sealed, party: exchange_pb2.SealedMessage(envelope=handler(sealed.envelope, party)), request, context
        )

    def _serve(
        self,
        handler: Callable[[exchange_pb2.SealedMessage, str | None], exchange_pb2.SealedMessage],
        request: exchange_pb2.SealedMessage,
        context: grpc.ServicerContext,
    ) -> exchange_pb2.SealedMessage:
        party = party_from_auth_context(context.auth_context())
        try:
            return handler(request, party)
        except Refusal as refusal:
            self._abort(refusal, context)
        except Exception as exc:
            if database_error(exc) is None:
                raise
            # The unit's own store failed (disk full or read-only, file gone): hedui_database_up goes to 0, the log
            # says so once a minute without a traceback or the database's message, and the gateway backs off and
            # tries again (UNAVAILABLE is transient) instead of reading grpc's UNKNOWN.
            if self.connector.metrics is not None:
                self.connector.metrics.database_failed()
            held_back = self._store_log.admit(type(exc).__name__)
            if held_back is not None:
                log.warning(
                    "request failed on the store",
                    extra={"error": type(exc).__name__, "db_code": database_error_code(exc), "repeated": held_back},
                )
            context.set_trailing_metadata(((REFUSAL_REASON_KEY, "database_unavailable"),))
            context.abort(grpc.StatusCode.UNAVAILABLE, "the unit's exchange server cannot use its database just now")
        raise AssertionError("unreachable")  # context.abort raises

    @staticmethod
    def _abort(refusal: Refusal, context: grpc.ServicerContext) -> NoReturn:
        # The reason code travels too, so the gateway can say why (docs/exchange.md, "Refusals"); envelope
        # failures stay one opaque "invalid envelope" (or "refresh keys") to the caller, their precise reason here.
        public = refusal.public_reason or refusal.reason
        metadata: list[tuple[str, str | bytes]] = [(REFUSAL_REASON_KEY, public)]
        if refusal.signed is not None and len(refusal.signed) <= MAX_SIGNED_REFUSAL_BYTES:
            # The same reason, signed by the unit and sealed for the gateway that asked (docs/exchange.md,
            # "Signed refusals"): made only for a request whose envelope opened, so never for a stranger.
            metadata.append((REFUSAL_SIGNED_KEY, refusal.signed))
        metadata += [(ANNOUNCEMENTS_METADATA_KEY, a) for a in refusal.announcements]
        context.set_trailing_metadata(tuple(metadata))
        context.abort(refusal.status, str(refusal))

    def SyncTrust(
        self, request: exchange_pb2.SealedMessage, context: grpc.ServicerContext
    ) -> exchange_pb2.SealedMessage:
        """TrustSync in, TrustSync out (connectors/trust/sync.py), with announcements beside both envelopes."""
        return self._serve(self.connector.sync_trust, request, context)

    def SubmitBatch(
        self, request: exchange_pb2.SealedMessage, context: grpc.ServicerContext
    ) -> exchange_pb2.SealedMessage:
        return self._call(self.connector.submit, request, context)

    def FetchAnswers(
        self, request: exchange_pb2.SealedMessage, context: grpc.ServicerContext
    ) -> exchange_pb2.SealedMessage:
        return self._call(self.connector.fetch, request, context)

    def AcknowledgeAnswers(
        self, request: exchange_pb2.SealedMessage, context: grpc.ServicerContext
    ) -> exchange_pb2.SealedMessage:
        return self._call(self.connector.acknowledge, request, context)


def server_credentials(cert: Path, key: Path, ca: Path) -> grpc.ServerCredentials:
    """Mutual TLS: our certificate, and client certificates required to chain to ``ca``."""
    return grpc.ssl_server_credentials(
        [(read_private_key(key), cert.read_bytes())], root_certificates=ca.read_bytes(), require_client_auth=True
    )


#: Seconds between the answer worker's purges of what retention allows.
PURGE_INTERVAL_S = 60.0
#: Seconds between two "answer worker iteration failed" lines of the same error (those between are counted).
FAILURE_LOG_INTERVAL_S = 60.0


class AnswerWorker(threading.Thread):
    """Answers pending batches every ``interval`` seconds and purges what retention allows, until stopped."""

    def __init__(self, connector: Connector, interval: float, retention_days: int) -> None:
        super().__init__(name="hedui-answer-worker", daemon=True)
        self.connector = connector
        self.interval = interval
        self.retention_days = retention_days
        self.stopping = threading.Event()
        self.failure_log = LogThrottle(FAILURE_LOG_INTERVAL_S)

    def run(self) -> None:
        next_purge = 0.0
        while not self.stopping.is_set():
            try:
                while self.connector.answer_pending() and not self.stopping.is_set():
                    pass
                # Retention is counted in days: purging once a minute is soon enough, and spares a write
                # transaction on every turn of the loop.
                if time.monotonic() >= next_purge:
                    self.connector.purge(self.retention_days)
                    # The periodic re-check of provisional due dates, with the holiday file read again if an
                    # operator installed a new year's schedule (docs/operations.md, "Calendar running out").
                    source = self.connector.calendar_source
                    self.connector.settle_due_dates(source.current() if source is not None else None)
                    next_purge = time.monotonic() + PURGE_INTERVAL_S
            except Exception as exc:  # keep answering after an unexpected failure
                self._failed(exc)
            self.stopping.wait(self.interval)

    def _failed(self, exc: Exception) -> None:
        """Count a failed turn and log it, at most once a minute (the worker turns every few seconds, and a store
        that is down would fill the log): a database error by its class and code only, as its message may quote
        personal data; anything else with its traceback."""
        on_database = database_error(exc) is not None
        metrics = self.connector.metrics
        if on_database and metrics is not None:
            metrics.database_failed()
        held_back = self.failure_log.admit(type(exc).__name__)
        if held_back is None:
            return
        log.error(
            "answer worker iteration failed",
            extra={
                "error": type(exc).__name__,
                "db_code": database_error_code(exc) if on_database else None,
                "repeated": held_back or None,
            },
            exc_info=None if on_database else exc,
        )

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)


@dataclass
class RunningConnector:
    """A started server with its worker; ``stop()`` ends both."""

    server: grpc.Server
    port: int
    connector: Connector
    worker: AnswerWorker | None
    health: health.HealthServicer
    metrics_server: MetricsServer | None = None
    #: The server certificate in use, reloaded from its files (None: plaintext, or fixed credentials in tests).
    certificates: CertificateSource | None = None
    #: The CA's revocation list the gate enforces; its ``trust_item_handler()`` installs lists the gateway sends.
    revocations: RevocationSource | None = None
    #: The key job (keystore reload, retirement, scheduled rotation): connectors/trust/keys.py.
    key_job: Watcher | None = None
    #: The server certificate's renewal; its ``handler()`` is the CERTIFICATE trust item handler.
    renewal: CertificateRenewal | None = None
    renewal_job: RenewalJob | None = None

    def stop(self, grace: float | None = 1.0) -> None:
        self.health.enter_graceful_shutdown()
        if self.renewal_job is not None:
            self.renewal_job.stop()
        if self.worker is not None:
            self.worker.stop()
        if self.key_job is not None:
            self.key_job.stop()
        self.server.stop(grace).wait()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.connector.adapter.close()
        self.connector.store.engine.dispose()


def build_adapter(config: ConnectorConfig, *, require_database: bool = True) -> Adapter:
    """The adapter the config names. ``require_database=False`` (serve): a SQL database that is down at start is
    logged and waited for instead of stopping the connector, which can receipt batches without it."""
    section = config.adapter
    if section.kind == "sql":
        queries = {data_category_by_name(k): v for k, v in section.queries.items()}
        sql = SqlAdapter(
            section.url,
            queries,
            statement_timeout_seconds=section.statement_timeout_seconds,
            require_database=require_database,
        )
        if sql.unreachable is not None:
            log.warning(
                "the unit's database is unreachable at start; batches are receipted and answered once it is back",
                extra={"detail": sql.unreachable},
            )
        return sql
    if section.kind == "csv":
        if section.directory is None:
            raise ConfigError("adapter.directory is required for the csv adapter")
        files = {data_category_by_name(k): v for k, v in section.files.items()}
        return CsvAdapter(section.directory, files)
    return SyntheticAdapter(Population(section.seed), config.unit_category)


def build_connector(
    config: ConnectorConfig,
    *,
    courier: Courier | None = None,
    metrics: ConnectorMetrics | None = None,
    require_database: bool = True,
    serving: bool = False,
    handlers: Mapping[int, Handler] | None = None,
) -> Connector:
    """Wire a Connector from its config: keystore, store, adapter, calendar, staff register (and its metrics).
    ``serving``: also its live keys and the SyncTrust handler (connectors/trust/), which publish the connector's own
    announcements for its gateways; commands that only look (check-config) leave the store as it is."""
    live = None
    if courier is None:
        live = LiveKeystore.open(config.keys.keystore, config.keys.passphrase_file)
        if live.party.party_id != config.unit.party_id:
            raise ConfigError(f"keystore belongs to {live.party.party_id}, config says {config.unit.party_id}")
        engine = make_engine(config.database.url)
        store = ConnectorStore(engine)
        # Online: an envelope older than our envelope lifetime (plus skew) is expired (docs/envelope.md step 7c).
        policy = Policy.online(config.exchange.envelope_ttl_minutes * MINUTE_MS)
        courier = Courier(live.party, live.trust, replay=store.replay, clock=live.clock, policy=policy)
    else:
        store = ConnectorStore(make_engine(config.database.url))
    if metrics is not None:
        metrics.watch_store(store.engine)
    calendar = CalendarSource(config.exchange.holiday_file)
    staff: dict[str, set[str]] = {}
    for entry in config.staff:
        staff.setdefault(entry.gateway, set()).add(entry.staff_id)
    # The unit's notice rule: a gateway's roster version counts its new members from the notice after its receipt.
    notice_days = config.roster.notice_working_days
    rosters = PeerRosters(store.engine, notice=lambda: Notice(connector.calendar, notice_days))
    connector = Connector(
        courier=courier,
        store=store,
        adapter=build_adapter(config, require_database=require_database),
        unit_category=config.unit_category,
        calendar=calendar.current(),
        staff={gateway: frozenset(ids) for gateway, ids in staff.items()},
        threshold_categories=frozenset(data_category_by_name(n) for n in config.exchange.threshold_categories),
        max_subjects=config.exchange.max_subjects_per_batch,
        envelope_ttl_ms=config.exchange.envelope_ttl_minutes * 60_000,
        metrics=metrics,
        # The gateways' rosters the unit holds (issue 11): exchange approvals are verified against them.
        rosters=rosters,
        allow_unverified_approvals=config.exchange.allow_unverified_approvals,
        approval_max_age_ms=config.exchange.approval_max_age_days * DAY_MS,
    )
    connector.calendar_source = calendar
    connector.rosters, connector.duty = rosters, OnDuty(store.engine)
    connector.answer_staff = config.exchange.answer_staff
    legacy_staff_warnings(connector)
    if metrics is not None:
        metrics.watch_calendar(lambda: connector.calendar, lambda: connector.courier.clock.now_ms() / 1000)
        metrics.watch_rosters(connector)
    if live is not None and serving:
        attach_trust(
            connector,
            live,
            config.keys.rotation_policy(),
            handlers={ROSTER_ITEM: roster_handler(connector, live, config), **(handlers or {})},
            held_roster_version=connector.rosters.held_version if connector.rosters else (lambda peer: 0),
            peer_roster_version=roster_catch_up(connector),
        )
    return connector


def legacy_staff_warnings(connector: Connector) -> list[str]:
    """Say at start what the deprecated [[staff]] ids still do (Procedure V.(三) moved to signed rosters): which
    gateways they still serve (no roster of theirs held at all, and only with ``allow_unverified_approvals``), and
    which ids a received roster lacks. Returns the warning lines logged."""
    assert connector.rosters is not None
    lines = []
    now = connector.courier.clock.now_ms()
    legacy = connector.approvals.legacy_staff
    for gateway in sorted(legacy):
        history = connector.rosters.history(gateway)
        if history is None:
            if connector.approvals.allow_unverified:
                lines.append(
                    f"[[staff]] ids of {gateway} decide only while no roster of it is held (deprecated); "
                    "once one arrives every batch is verified against it"
                )
                log.warning(
                    "deprecated [[staff]] list in use while no roster of the gateway is held; once one arrives "
                    "every batch is verified against it and batches without an approval proof are refused",
                    extra={"gateway": gateway},
                )
            else:
                lines.append(f"no roster of {gateway} held yet: its batches are refused (approver_unknown)")
                log.warning("no roster of the gateway held yet: its batches are refused", extra={"gateway": gateway})
        else:
            log.info(
                "[[staff]] list ignored: a roster of the gateway is held, every batch is verified against it "
                "(a batch without an approval proof is refused: approval_missing)",
                extra={"gateway": gateway},
            )
    for gateway, missing in connector.rosters.missing_from_roster(legacy).items():
        lines.append(f"the roster of {gateway} lacks [[staff]] ids {', '.join(missing)}")
        log.warning(
            "[[staff]] ids the gateway's roster lacks", extra={"gateway": gateway, "staff_ids": ",".join(missing)}
        )
    own = connector.rosters.history(connector.party_id)
    if own is None or own.in_force(now) is None:
        log.warning(
            "the unit's own roster is not in force yet: answers name no responsible staff "
            "('hedui-connector roster init-admin', docs/operations.md)"
        )
    return lines


def roster_handler(connector: Connector, live: LiveKeystore, config: ConnectorConfig) -> Handler:
    """The ROSTER trust item handler: a gateway's signed roster version, judged with the trust store as it is now and
    the unit's notice (connectors/trust/rosters.py)."""
    assert connector.rosters is not None
    days = config.roster.notice_working_days
    # The calendar as it is now: a holiday file installed while serving counts from then on.
    return connector.rosters.handler(
        trust=lambda: live.trust, notice=lambda: Notice(connector.calendar, days), own_party_id=connector.party_id
    )


def roster_catch_up(connector: Connector) -> Callable[[str, int], None] | None:
    """What a gateway's TrustSync.peer_roster_version asks for: every version of the unit's roster after the one it
    holds is (again) published for it (common/rosterstore.py ``HeldRosters.catch_up``); None without rosters."""
    rosters = connector.rosters
    if rosters is None:
        return None
    return rosters.catch_up(TrustItems(connector.store.engine), connector.party_id, connector.courier.clock.now_ms)


def attach_trust(
    connector: Connector,
    live: LiveKeystore,
    policy: RotationPolicy | None,
    *,
    handlers: Mapping[int, Handler] | None = None,
    held_roster_version: Callable[[str], int] = lambda peer: 0,
    peer_roster_version: Callable[[str, int], None] | None = None,
) -> ConnectorKeys:
    """Give ``connector`` its live keys and the SyncTrust handler (connectors/trust/): key announcements handled
    here, rosters and revocation lists by the handlers their owners register through ``handlers``."""
    keys = ConnectorKeys(live, TrustItems(connector.store.engine), policy)
    connector.keys = keys
    connector.trust_desk = TrustDesk(
        connector,
        live,
        handlers={**default_handlers(live), **(handlers or {})},
        held_roster_version=held_roster_version,
    )
    if connector.metrics is not None:
        connector.metrics.trust.add_peers(live.trust.parties(), ("peer",))
        connector.metrics.trust.watch_keys(lambda: [
            (r.party, r.key_id, r.algorithm.name.lower(), r.owner, r.days_left, r.rotation_due_days)
            for r in keys.expiries()
        ])  # fmt: skip
    return keys


def start(
    connector: Connector,
    *,
    listen: str,
    credentials: grpc.ServerCredentials | None,
    max_workers: int = 8,
    worker_interval: float | None = 2.0,
    retention_days: int = 30,
    revocations: RevocationSource | None = None,
    key_interval: float = 5.0,
) -> RunningConnector:
    """Start serving on ``listen`` (port 0 picks a free one). ``credentials=None`` serves plaintext and is only
    allowed on loopback; ``worker_interval=None`` starts no worker (tests drive ``answer_pending`` themselves).
    When the connector has metrics, every call is counted by method and status. ``revocations``: callers whose
    client certificate the CA's list revokes are refused (``certificate_revoked``)."""
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    interceptors: list[grpc.ServerInterceptor[Any, Any]] = []
    if connector.metrics is not None:
        interceptors.append(connector.metrics.service.interceptor())  # outermost: refused calls are counted too
    interceptors.append(ExchangeGate(connector, require_tls_identity=credentials is not None, revocations=revocations))
    # At start: provisional due dates that a calendar loaded with a new holiday file can now fix.
    connector.settle_due_dates()
    server = new_server(max_workers=max_workers, options=options, interceptors=interceptors)
    exchange_pb2_grpc.add_ExchangeServiceServicer_to_server(ExchangeServicer(connector), server)
    port, health_servicer = start_server(server, [SERVICE_NAME], listen=listen, credentials=credentials)
    worker = None
    if worker_interval is not None:
        worker = AnswerWorker(connector, worker_interval, retention_days)
        worker.start()
    key_job = None
    if connector.keys is not None:
        key_job = Watcher("hedui-key-job", connector.keys.turn, key_interval)
        key_job.run_once()  # keys due at start are retired or rotated before the first call
        key_job.start()
    log.info("connector serving", extra={"port": port, "party": connector.party_id})
    running = RunningConnector(
        server=server, port=port, connector=connector, worker=worker, health=health_servicer, revocations=revocations
    )
    running.key_job = key_job
    return running


def check_certificates(config: ConnectorConfig) -> TlsIdentity | None:
    """The checked server certificate (None under insecure_plaintext); raises TlsError naming every file that is
    wrong (``check-config`` says the same). A certificate that ends soon is logged."""
    identities = check_tls(config.tls_files())
    for identity in identities:
        if identity.expiry_warning() is not None:
            log.warning(
                "TLS certificate expires soon", extra={"role": identity.role, "days_left": round(identity.days_left())}
            )
    return identities[0] if identities else None


def gateways_of(trust: TrustStore) -> list[str]:
    """The gateways the unit serves: the parties in its trust store (staff keys excepted)."""
    return [party for party in trust.parties() if not party.startswith(STAFF_PARTY_PREFIX)]


def certificate_renewal(
    config: ConnectorConfig,
    connector: Connector,
    *,
    on_installed: Callable[[], object] | None = None,
) -> CertificateRenewal | None:
    """The server certificate's renewal as the config describes it (None under insecure_plaintext): requests go
    to ``tls.renewal_gateways``, else to every gateway in the trust store."""
    files = config.tls_files()
    pending = config.renewal_key_path
    if not files or pending is None:
        return None
    named = config.tls.renewal_gateways
    trust = connector.courier.trust
    return CertificateRenewal(
        connector.store.engine,
        files[0],
        pending_key=pending,
        gateways=(lambda: list(named)) if named else (lambda: gateways_of(trust)),
        renew_before_days=config.tls.renew_before_days,
        timeout_days=config.tls.renewal_timeout_days,
        clock=connector.courier.clock,
        on_installed=on_installed,
    )


def revocation_source(config: ConnectorConfig, ca_pem: Callable[[], bytes]) -> RevocationSource:
    """The revocation list the connector enforces, from its file (tls.crl_file, else crl.der beside the keystore);
    raises CrlError when the file holds a list the CA did not sign (``check-config`` says the same)."""
    return RevocationSource(config.crl_path, ca_pem, interval=config.tls.check_interval_seconds)


def serve(config: ConnectorConfig) -> RunningConnector:
    """Start the connector the config describes.

    The ports come before the store: the gRPC port is reserved (bound, not listening) and the metrics endpoint
    started before the database is opened, so that a second connector told to use a port another process holds
    stops with PortInUse having created, migrated or changed nothing. The server certificate is reloaded from its
    files when they are renewed (common/tlsreload.py); the CA's revocation list is enforced on every caller."""
    server = config.server
    # Certificates first: with a wrong one the connector would start and refuse every gateway's handshake.
    identity = check_certificates(config)
    credentials = None
    source = revocations = None
    if identity is not None:
        source = CertificateSource(identity.files, initial=identity, interval=config.tls.check_interval_seconds)
        credentials = dynamic_server_credentials(source)
        revocations = revocation_source(config, lambda: source.identity.ca_pem)
    check_plaintext(server.listen, credentials)
    reserved = reserve_port(server.listen)
    try:
        metrics = ConnectorMetrics(process_registry())
        metrics_server = serve_metrics(config.metrics.listen, metrics.registry)
    except BaseException:
        release_port(reserved)
        raise
    try:
        if source is not None:
            source.on_reload = metrics.service.certificate_reloaded
            metrics.service.watch_tls([source], revocations)
        if revocations is not None:
            revocations.on_refused = metrics.service.crl_refused
        crl = revocations.trust_item_handler() if revocations is not None else None
        connector = build_connector(
            config,
            metrics=metrics,
            require_database=False,
            serving=True,
            handlers={trust_pb2.TRUST_ITEM_KIND_REVOCATION_LIST: crl} if crl is not None else None,
        )
        renewal = None
        if source is not None:
            certificates = source
            renewal = certificate_renewal(config, connector, on_installed=lambda: certificates.refresh(force=True))
        if renewal is not None:
            metrics.watch_renewal(renewal)
            if connector.trust_desk is not None:  # before the first call: certificates sent to us are installed
                connector.trust_desk.handlers[CERTIFICATE_ITEM] = renewal.handler()
        release_port(reserved)  # start() binds it for good now
        running = start(
            connector,
            listen=server.listen,
            credentials=credentials,
            max_workers=server.max_workers,
            worker_interval=config.exchange.answer_interval_seconds,
            retention_days=config.exchange.retention_days,
            revocations=revocations,
            key_interval=config.keys.watch_interval_seconds,
        )
    except BaseException:
        release_port(reserved)
        if metrics_server is not None:
            metrics_server.stop()
        raise
    running.metrics_server = metrics_server
    running.certificates = source
    if renewal is not None:
        running.renewal = renewal
        running.renewal_job = RenewalJob(renewal, config.tls.renewal_check_seconds)
        running.renewal_job.start()
    return running
