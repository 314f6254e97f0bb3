"""The connector's gRPC exchange server: mutual TLS, the ExchangeService, health checking, reflection, the worker
that answers pending batches, and the Prometheus endpoint."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health
from hedui.v1 import exchange_pb2, exchange_pb2_grpc

from common.categories import data_category_by_name
from common.config import ConfigError
from common.db import make_engine
from common.logs import log_context, new_request_id
from common.metrics import MetricsServer, process_registry, serve_metrics
from common.rpc import REFUSAL_REASON_KEY, check_plaintext, new_server, release_port, reserve_port, start_server
from common.workdays import WorkdayCalendar
from connectors.adapters.base import Adapter
from connectors.adapters.csv_files import CsvAdapter
from connectors.adapters.sql import SqlAdapter
from connectors.config import ConnectorConfig
from connectors.connector import Connector
from connectors.errors import Refusal
from connectors.metrics import ConnectorMetrics
from connectors.store import ConnectorStore
from connectors.synthetic import Population, SyntheticAdapter
from keys import keystore
from keys.envelope import Courier, Policy
from keys.tls import TlsIdentity, check_tls, party_from_auth_context, read_private_key

log = logging.getLogger("hedui.connector")

SERVICE_NAME = exchange_pb2.DESCRIPTOR.services_by_name["ExchangeService"].full_name
#: Envelopes are at most 32 MiB plus framing (docs/envelope.md).
MAX_MESSAGE_BYTES = 33 * 1024 * 1024


class ExchangeServicer(exchange_pb2_grpc.ExchangeServiceServicer):
    """Unwraps the SealedMessage, names the TLS peer, and maps refusals to gRPC statuses."""

    def __init__(self, connector: Connector, *, require_tls_identity: bool) -> None:
        self.connector = connector
        self.require_tls_identity = require_tls_identity

    def _call(
        self,
        handler: Callable[[bytes, str | None], bytes],
        request: exchange_pb2.SealedMessage,
        context: grpc.ServicerContext,
    ) -> exchange_pb2.SealedMessage:
        with log_context(request_id=new_request_id()):  # on every log line written while this call is handled
            party = party_from_auth_context(context.auth_context())
            if self.require_tls_identity and party is None:
                log.warning("request refused", extra={"reason": "no_tls_identity"})
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "client certificate names no party")
            try:
                return exchange_pb2.SealedMessage(envelope=handler(request.envelope, party))
            except Refusal as refusal:
                # The reason code travels too, so the gateway can say why (docs/exchange.md, "Refusals"); envelope
                # failures stay one opaque "invalid envelope" to the caller, their precise reason stays here.
                public = "invalid_envelope" if refusal.reason.startswith("envelope_") else refusal.reason
                context.set_trailing_metadata(((REFUSAL_REASON_KEY, public),))
                context.abort(refusal.status, str(refusal))
        raise AssertionError("unreachable")  # context.abort raises

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


class AnswerWorker(threading.Thread):
    """Answers pending batches every ``interval`` seconds and purges what retention allows, until stopped."""

    def __init__(self, connector: Connector, interval: float, retention_days: int) -> None:
        super().__init__(name="hedui-answer-worker", daemon=True)
        self.connector = connector
        self.interval = interval
        self.retention_days = retention_days
        self.stopping = threading.Event()

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
                    next_purge = time.monotonic() + PURGE_INTERVAL_S
            except Exception:  # keep answering after an unexpected failure; it is logged with its type only
                log.exception("answer worker iteration failed")
            self.stopping.wait(self.interval)

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

    def stop(self, grace: float | None = 1.0) -> None:
        self.health.enter_graceful_shutdown()
        if self.worker is not None:
            self.worker.stop()
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
) -> Connector:
    """Wire a Connector from its config: keystore, store, adapter, calendar, staff register (and its metrics)."""
    if courier is None:
        passphrase = keystore.read_passphrase_file(config.keys.passphrase_file)
        party, trust = keystore.load(config.keys.keystore, passphrase)
        if party.party_id != config.unit.party_id:
            raise ConfigError(f"keystore belongs to {party.party_id}, config says {config.unit.party_id}")
        engine = make_engine(config.database.url)
        store = ConnectorStore(engine)
        courier = Courier(party, trust, replay=store.replay, policy=Policy())
    else:
        store = ConnectorStore(make_engine(config.database.url))
    if metrics is not None:
        metrics.watch_store(store.engine)
    staff: dict[str, set[str]] = {}
    for entry in config.staff:
        staff.setdefault(entry.gateway, set()).add(entry.staff_id)
    return Connector(
        courier=courier,
        store=store,
        adapter=build_adapter(config, require_database=require_database),
        unit_category=config.unit_category,
        calendar=WorkdayCalendar.with_file(config.exchange.holiday_file),
        staff={gateway: frozenset(ids) for gateway, ids in staff.items()},
        threshold_categories=frozenset(data_category_by_name(n) for n in config.exchange.threshold_categories),
        max_subjects=config.exchange.max_subjects_per_batch,
        envelope_ttl_ms=config.exchange.envelope_ttl_minutes * 60_000,
        metrics=metrics,
    )


def start(
    connector: Connector,
    *,
    listen: str,
    credentials: grpc.ServerCredentials | None,
    max_workers: int = 8,
    worker_interval: float | None = 2.0,
    retention_days: int = 30,
) -> RunningConnector:
    """Start serving on ``listen`` (port 0 picks a free one). ``credentials=None`` serves plaintext and is only
    allowed on loopback; ``worker_interval=None`` starts no worker (tests drive ``answer_pending`` themselves).
    When the connector has metrics, every call is counted by method and status."""
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    interceptors: list[grpc.ServerInterceptor[Any, Any]] = []
    if connector.metrics is not None:
        interceptors.append(connector.metrics.service.interceptor())
    server = new_server(max_workers=max_workers, options=options, interceptors=interceptors)
    exchange_pb2_grpc.add_ExchangeServiceServicer_to_server(
        ExchangeServicer(connector, require_tls_identity=credentials is not None), server
    )
    port, health_servicer = start_server(server, [SERVICE_NAME], listen=listen, credentials=credentials)
    worker = None
    if worker_interval is not None:
        worker = AnswerWorker(connector, worker_interval, retention_days)
        worker.start()
    log.info("connector serving", extra={"port": port, "party": connector.party_id})
    return RunningConnector(server=server, port=port, connector=connector, worker=worker, health=health_servicer)


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


def serve(config: ConnectorConfig) -> RunningConnector:
    """Start the connector the config describes.

    The ports come before the store: the gRPC port is reserved (bound, not listening) and the metrics endpoint
    started before the database is opened, so that a second connector told to use a port another process holds
    stops with PortInUse having created, migrated or changed nothing."""
    server = config.server
    # Certificates first: with a wrong one the connector would start and refuse every gateway's handshake.
    identity = check_certificates(config)
    credentials = None
    if identity is not None:
        credentials = grpc.ssl_server_credentials(
            [(identity.key_pem, identity.cert_pem)], root_certificates=identity.ca_pem, require_client_auth=True
        )
    check_plaintext(server.listen, credentials)
    reserved = reserve_port(server.listen)
    try:
        metrics = ConnectorMetrics(process_registry())
        metrics_server = serve_metrics(config.metrics.listen, metrics.registry)
    except BaseException:
        release_port(reserved)
        raise
    try:
        if identity is not None:
            metrics.service.watch_certificates({identity.role: identity.not_after.timestamp()})
        connector = build_connector(config, metrics=metrics, require_database=False)
        release_port(reserved)  # start() binds it for good now
        running = start(
            connector,
            listen=server.listen,
            credentials=credentials,
            max_workers=server.max_workers,
            worker_interval=config.exchange.answer_interval_seconds,
            retention_days=config.exchange.retention_days,
        )
    except BaseException:
        release_port(reserved)
        if metrics_server is not None:
            metrics_server.stop()
        raise
    running.metrics_server = metrics_server
    return running
