"""Gateway configuration (TOML), documented key by key; see deploy/gateway.example.toml."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from common.categories import unit_category_by_name
from common.config import ConfigError, DatabaseUrl, doc, load_file
from common.metrics import MetricsSection
from keys.live import RotationSettings
from keys.party import check_party_id
from keys.tls import TlsFiles, server_name

LEVELS = ("province", "city", "county")
EXCHANGE_MODES = ("system", "media", "both")
POLICIES = ("monthly", "continuous")

#: The party the agency API's server certificate names: "<agency party id>.api" ('hedui-keys ca issue --party
#: agency.220100.api --server', docs/operations.md); the agency's own party id is on its client certificate.
API_PARTY_SUFFIX = ".api"
_HOST = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)$")


def check_endpoint(endpoint: str) -> None:
    """Raise ValueError unless ``endpoint`` is host:port (a DNS name, an IPv4 address or [IPv6]; port 1-65535)."""
    host, sep, port = endpoint.rpartition(":")
    if not (sep and _HOST.match(host) and port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(
            f"units.endpoint must be host:port with a port 1-65535 (e.g. 10.20.1.11:50061), not {endpoint!r}"
        )


@dataclass(frozen=True)
class AgencySection:
    party_id: str = doc("This gateway's party id, e.g. agency.220100; must match the keystore.")
    region_code: str = doc("GB/T 2260 code of the agency's region (6 digits), e.g. 220100.")
    level: str = doc("Agency level: province, city or county.")
    name: str = doc("Human-readable name, e.g. 长春市社会救助家庭经济状况核对中心.", default="")

    def __post_init__(self) -> None:
        check_party_id(self.party_id)
        if not (len(self.region_code) == 6 and self.region_code.isdigit()):
            raise ValueError("agency.region_code must be 6 digits (GB/T 2260)")
        if self.level not in LEVELS:
            raise ValueError(f"agency.level must be one of {', '.join(LEVELS)}")


@dataclass(frozen=True)
class ServerSection:
    listen: str = doc("host:port of the gateway's gRPC API.", default="127.0.0.1:50051")
    tls_cert: Path | None = doc("PEM server certificate for the API (mutual TLS).", default=None)
    tls_key: Path | None = doc(
        "PEM private key of the server certificate; refused unless mode 0600 (owner only).", default=None
    )
    tls_ca: Path | None = doc("PEM CA that client certificates (agency back offices) must chain to.", default=None)
    insecure_plaintext: bool = doc("Serve the API without TLS; refused unless listen is on loopback.", default=False)
    max_workers: int = doc("gRPC worker threads.", default=8)


@dataclass(frozen=True)
class ClientTlsSection:
    cert: Path | None = doc("PEM client certificate the gateway presents to connectors.", default=None)
    key: Path | None = doc(
        "PEM private key of the client certificate; refused unless mode 0600 (owner only).", default=None
    )
    ca: Path | None = doc("PEM CA that connectors' server certificates must chain to.", default=None)
    insecure_plaintext: bool = doc("Talk to connectors without TLS (loopback test setups only).", default=False)


@dataclass(frozen=True)
class TlsSection:
    crl_file: Path | None = doc(
        "The private CA's certificate revocation list (DER or PEM), enforced on agency API callers and on the units' "
        "server certificates, and sent to every unit. Install it with 'hedui-gateway tls install-crl FILE' (checked, "
        "never older than the one in place); the running gateway picks it up. One list per CA of the bundle; the "
        "highest number of each is remembered in <file>.numbers.json, and once a list was held a missing file is an "
        "error at start (docs/keys.md). Unset: no list.",
        default=None,
    )
    check_interval_seconds: float = doc(
        "How often the certificate, key and CA files and the revocation list are looked at (one stat each); renewed "
        "files that pass every check are used for new handshakes from then on, without a restart.",
        default=5.0,
    )
    server_check_seconds: float = doc(
        "With a revocation list: how long a unit's server certificate, fetched by a TLS handshake of the gateway's "
        "own and found not revoked, is believed before it is checked again (also at once when the list changes).",
        default=300.0,
    )

    def __post_init__(self) -> None:
        if not 0.1 <= self.check_interval_seconds <= 3600:
            raise ValueError("tls.check_interval_seconds must be 0.1-3600")
        if not 1 <= self.server_check_seconds <= 86_400:
            raise ValueError("tls.server_check_seconds must be 1-86400")


@dataclass(frozen=True)
class KeysSection(RotationSettings):
    keystore: Path = doc("Keystore file made by 'hedui-keys init' (our keys, the units' keys).")
    passphrase_file: Path = doc(
        "File holding the keystore passphrase on one line; refused unless mode 0600 (owner only)."
    )
    rotate_agreement_days: float = doc(
        "Days our key-agreement key is used before the gateway rotates it by itself and announces the new one to "
        "every unit (0: never automatically).",
        default=30.0,
    )
    rotate_signing_days: float = doc(
        "Days our signing key is used before the gateway rotates it by itself (0: never automatically).",
        default=180.0,
    )
    rotation_lead_hours: float = doc(
        "How long before it takes over a new key is announced, so that every unit has applied it first; more than "
        "twice trust.sync_interval_seconds.",
        default=24.0,
    )
    rotation_overlap_days: float = doc(
        "How long an automatically rotated key stays valid after its successor took over (at most 90).",
        default=14.0,
    )
    watch_interval_seconds: float = doc(
        "How often the keystore file is checked for changes made by another program ('hedui-keys rotate', "
        "'revoke', 'import'; another replica's rotation), which are then loaded without a restart.",
        default=5.0,
    )


@dataclass(frozen=True)
class TrustSection:
    sync_interval_seconds: float = doc(
        "How often the gateway synchronises trust (rosters, key announcements, revocation lists) with each unit; "
        "also at start and within a dispatch interval of an item being published (docs/exchange.md).",
        default=300.0,
    )

    def __post_init__(self) -> None:
        if not 0 < self.sync_interval_seconds <= 86_400:
            raise ValueError("trust.sync_interval_seconds must be more than 0 and at most 86400 (a day)")


@dataclass(frozen=True)
class DatabaseSection:
    url: DatabaseUrl = doc("SQLAlchemy URL: sqlite:///path (embedded, WAL) or postgresql+psycopg://... (replicas).")
    migrate_on_start: bool = doc(
        "Apply pending migrations when serve starts (otherwise serve refuses an outdated schema).", default=False
    )


@dataclass(frozen=True)
class ExchangeSection:
    batch_size: int = doc("Subjects per query batch sent to a unit.", default=2000)
    request_timeout_seconds: float = doc("Deadline of one call to a connector.", default=30.0)
    base_backoff_seconds: float = doc("First retry delay after a unit failed; doubles per failure.", default=5.0)
    max_backoff_seconds: float = doc(
        "Longest retry delay for an unreachable unit ('hedui-gateway retry' ends a backoff at once).", default=1800.0
    )
    probe_interval_seconds: float = doc(
        "A unit no call has reached for this long gets a health check (grpc.health.v1, over the same mutual TLS) "
        "in its next cycle, so that idle units show as down too; a failed check backs off like a failed call.",
        default=300.0,
    )
    poll_interval_seconds: float = doc("How often receipted batches are asked for answers.", default=60.0)
    fetch_group: int = doc("Batch ids per FetchAnswers call (at most 100).", default=20)
    envelope_ttl_minutes: int = doc(
        "Lifetime of the envelopes the gateway sends, and the oldest envelope it takes from a unit (created longer "
        "ago than this plus the clock skew: expired, docs/envelope.md step 7c). Keep it equal to the units'.",
        default=60,
    )
    holiday_file: Path | None = doc("Official holiday schedules of years the built-in calendar lacks.", default=None)
    replica_id: str = doc("Name of this gateway process among replicas sharing one database.", default="gateway-1")
    lease_seconds: float = doc("How long a replica's claim on a batch or job lasts without renewal.", default=120.0)

    def __post_init__(self) -> None:
        if not 1 <= self.fetch_group <= 100:
            raise ValueError("exchange.fetch_group must be 1-100")
        if not 1 <= self.batch_size <= 100_000:
            raise ValueError("exchange.batch_size must be 1-100000")
        if not self.probe_interval_seconds > 0:
            raise ValueError("exchange.probe_interval_seconds must be more than 0")


@dataclass(frozen=True)
class ScheduleSection:
    policy: str = doc(
        "monthly (Procedure IV: dispatch only in the exchange window) or continuous (clause 8, real time).",
        default="monthly",
    )
    exchange_window: tuple[int, ...] = doc(
        "First and last day of the month on which batches are sent.", default=(11, 20)
    )
    report_day: int = doc("Day of the month by which results go back to commissioners.", default=27)
    dispatch_interval_seconds: float = doc("How often the dispatch job runs.", default=30.0)
    sweep_interval_seconds: float = doc("How often overdue items are looked for.", default=300.0)
    key_check_interval_seconds: float = doc("How often key expiry is checked.", default=3600.0)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"schedule.policy must be one of {', '.join(POLICIES)}")
        if len(self.exchange_window) != 2 or not 1 <= self.exchange_window[0] <= self.exchange_window[1] <= 31:
            raise ValueError("schedule.exchange_window must be [first_day, last_day] within 1-31")
        if not 1 <= self.report_day <= 31:
            raise ValueError("schedule.report_day must be 1-31")


@dataclass(frozen=True)
class ArchiveSection:
    checkpoint_interval_seconds: float = doc(
        "How often the gateway signs a checkpoint of the audit chain's head (another is signed at every report "
        "issue); entries after the last checkpoint are unattested (docs/operations.md, Audit log and archive).",
        default=3600.0,
    )

    def __post_init__(self) -> None:
        if not 60 <= self.checkpoint_interval_seconds <= 86_400:
            raise ValueError("archive.checkpoint_interval_seconds must be 60-86400 (a minute to a day)")


@dataclass(frozen=True)
class StaffSection:
    roster_notice_working_days: int = doc(
        "Procedure V.(三): working days of notice (Beijing time, the working-day calendar) before a roster change "
        "that adds staff takes effect. Applies to the changes 'hedui-gateway roster' makes and to the rosters the "
        "units send (a shorter notice is refused: roster_notice_too_short). Ending or revoking staff takes effect "
        "at once. 0-20; agree the same value with the units.",
        default=1,
    )

    def __post_init__(self) -> None:
        if not 0 <= self.roster_notice_working_days <= 20:
            raise ValueError("staff.roster_notice_working_days must be 0-20")


@dataclass(frozen=True)
class UnitEntry:
    party_id: str = doc("The unit's party id (its keys must be in the keystore's trust store).")
    category: str = doc("Unit category (clause 7): tax, land, housing, financial_institution, ...")
    endpoint: str = doc("host:port of the unit's connector.")
    exchange_mode: str = doc("system, media, or both (Procedure III.3).", default="system")
    enabled: bool = doc("Whether batches are sent to this unit.", default=True)
    server_names: tuple[str, ...] = doc(
        "DNS names and IP addresses the unit's server certificate may name besides the host of endpoint, checked in "
        "its certificate requests: a request naming other hosts than its current certificate must stay within "
        "these (docs/operations.md, 'Renewing certificates').",
        default=(),
    )

    def __post_init__(self) -> None:
        check_party_id(self.party_id)
        unit_category_by_name(self.category)
        check_endpoint(self.endpoint)
        for name in self.server_names:
            server_name(name)
        if self.exchange_mode not in EXCHANGE_MODES:
            raise ValueError(f"units.exchange_mode must be one of {', '.join(EXCHANGE_MODES)}")


CLIENT_ROLES = ("commissioner", "lower_agency", "staff_system")


@dataclass(frozen=True)
class ClientEntry:
    party_id: str = doc("Party id in the client certificate's hedui://party/ SAN, e.g. commissioner.220102.mzj.")
    role: str = doc(
        "commissioner (a same-level department), lower_agency (enters at review, Procedure III.(二)2) or "
        "staff_system (this agency's own back office, which acts for its registered staff)."
    )

    def __post_init__(self) -> None:
        check_party_id(self.party_id)
        if self.role not in CLIENT_ROLES:
            raise ValueError(f"clients.role must be one of {', '.join(CLIENT_ROLES)}")


@dataclass(frozen=True)
class GatewayConfig:
    """Everything ``hedui-gateway serve`` needs."""

    ENV_OVERRIDES: ClassVar[dict[str, str]] = {
        "HEDUI_GATEWAY_DATABASE_URL": "database.url",
        "HEDUI_GATEWAY_LISTEN": "server.listen",
        "HEDUI_GATEWAY_REPLICA_ID": "exchange.replica_id",
        "HEDUI_GATEWAY_METRICS_LISTEN": "metrics.listen",
    }

    agency: AgencySection
    keys: KeysSection
    database: DatabaseSection
    server: ServerSection = field(default_factory=ServerSection)
    client_tls: ClientTlsSection = field(default_factory=ClientTlsSection)
    tls: TlsSection = field(default_factory=TlsSection)
    exchange: ExchangeSection = field(default_factory=ExchangeSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    archive: ArchiveSection = field(default_factory=ArchiveSection)
    trust: TrustSection = field(default_factory=TrustSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    staff: StaffSection = field(default_factory=StaffSection)
    units: tuple[UnitEntry, ...] = doc("The sharing units this gateway exchanges with.", default=())
    clients: tuple[ClientEntry, ...] = doc("Who may call the agency API, and in which role.", default=())

    def __post_init__(self) -> None:
        ids = [u.party_id for u in self.units]
        if len(set(ids)) != len(ids):
            raise ValueError("a unit is listed twice in [[units]]")
        clients = [c.party_id for c in self.clients]
        if len(set(clients)) != len(clients):
            raise ValueError("a client is listed twice in [[clients]]")
        if self.keys.rotation_policy() is not None and (
            self.keys.rotation_lead_hours * 3600 <= 2 * self.trust.sync_interval_seconds
        ):
            # A rotation must reach every unit before the new key takes over: at least two synchronisations.
            raise ValueError("keys.rotation_lead_hours must be more than twice trust.sync_interval_seconds")

    def synchronised_units(self) -> list[str]:
        """The units trust items go to: every enabled unit that exchanges online (a media-only or disabled unit
        never synchronises, so it would never acknowledge)."""
        return [u.party_id for u in self.units if u.enabled and u.exchange_mode != "media"]

    def tls_files(self) -> list[TlsFiles]:
        """The TLS identities ``serve`` uses, to check (keys/tls.py ``check_tls``): the agency API's server
        certificate and the client certificate towards connectors, each unless its insecure_plaintext is set."""
        files = []
        server, client = self.server, self.client_tls
        if not server.insecure_plaintext:
            if not (server.tls_cert and server.tls_key and server.tls_ca):
                raise ConfigError(
                    "server.tls_cert, server.tls_key and server.tls_ca are required (or insecure_plaintext)"
                )
            party = self.agency.party_id + API_PARTY_SUFFIX
            files.append(TlsFiles("server", "server", party, server.tls_cert, server.tls_key, server.tls_ca))
        if not client.insecure_plaintext:
            if not (client.cert and client.key and client.ca):
                raise ConfigError(
                    "client_tls.cert, client_tls.key and client_tls.ca are required (or insecure_plaintext)"
                )
            files.append(TlsFiles("client_tls", "client", self.agency.party_id, client.cert, client.key, client.ca))
        return files

    @classmethod
    def load(cls, path: Path) -> GatewayConfig:
        return load_file(cls, path)
