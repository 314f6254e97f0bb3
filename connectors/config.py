"""Connector configuration (TOML), documented key by key; see deploy/connector.example.toml."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from common.categories import UNIT_DATA, data_category_by_name, unit_category_by_name
from common.config import ConfigError, DatabaseUrl, doc, load_file
from common.metrics import METRICS_LISTEN_DOC, MetricsSection
from keys.live import RotationSettings
from keys.party import check_party_id
from keys.tls import TlsFiles


@dataclass(frozen=True)
class UnitSection:
    party_id: str = doc("This connector's party id, e.g. unit.220100.tax; must match the keystore.")
    category: str = doc("Unit category (clause 7): tax, land, housing, financial_institution, ...")
    name: str = doc("Human-readable name of the unit, e.g. 长春市税务局.", default="")

    def __post_init__(self) -> None:
        check_party_id(self.party_id)
        unit_category_by_name(self.category)


@dataclass(frozen=True)
class ServerSection:
    listen: str = doc("host:port of the gRPC exchange server.", default="127.0.0.1:50061")
    tls_cert: Path | None = doc("PEM server certificate (issued by 'hedui-keys ca issue --server').", default=None)
    tls_key: Path | None = doc(
        "PEM private key of the server certificate; refused unless mode 0600 (owner only).", default=None
    )
    tls_ca: Path | None = doc("PEM CA certificate that client (gateway) certificates must chain to.", default=None)
    insecure_plaintext: bool = doc(
        "Serve without TLS. Only for a loopback-only test setup; refused unless listen is on 127.0.0.1.",
        default=False,
    )
    max_workers: int = doc("gRPC worker threads.", default=8)


@dataclass(frozen=True)
class TlsSection:
    crl_file: Path | None = doc(
        "Where the connector keeps the private CA's certificate revocation list, which the gateway sends over the "
        "wire (or 'hedui-connector tls install-crl FILE' installs); gateways whose client certificate it lists are "
        "refused. One list per CA of the bundle; the highest number of each is remembered in <file>.numbers.json, and "
        "once a list was held a missing file is an error at start (docs/keys.md). Unset: crl.der in the keystore's "
        "folder (the service writes it).",
        default=None,
    )
    check_interval_seconds: float = doc(
        "How often the certificate, key and CA files and the revocation list are looked at (one stat each); renewed "
        "files that pass every check are used for new handshakes from then on, without a restart.",
        default=5.0,
    )

    renew_before_days: int = doc(
        "The connector asks for a new server certificate this many days before the one in use ends: a new key made "
        "here (never leaving the host) and a certificate request sent to the gateways, which sign it with the "
        "network CA; the certificate comes back over the wire and is installed without a restart "
        "(docs/operations.md, 'Renewing certificates'). 0: only on demand ('hedui-connector tls request-renewal').",
        default=30,
    )
    renewal_timeout_days: int = doc(
        "How long a certificate request may wait for its certificate before the next check makes a new one (with a "
        "new key; the old request's certificate is refused if it comes later).",
        default=7,
    )
    renewal_check_seconds: float = doc(
        "How often the running connector checks whether its certificate is due for renewal.", default=3600.0
    )
    renewal_key_file: Path | None = doc(
        "Where the new key waits for its certificate (mode 0600; written by the connector, so its folder must be "
        "writable by the connector's user). Unset: the server key's file name with '.pending' added.",
        default=None,
    )
    renewal_gateways: tuple[str, ...] = doc(
        "The gateways a certificate request is sent to (party ids). Empty: every gateway in the trust store. With "
        "several gateways, name the one whose agency signs the network's certificates.",
        default=(),
    )

    def __post_init__(self) -> None:
        if not 0.1 <= self.check_interval_seconds <= 3600:
            raise ValueError("tls.check_interval_seconds must be 0.1-3600")
        if not 0 <= self.renew_before_days <= 365:
            raise ValueError("tls.renew_before_days must be 0-365")
        if not 1 <= self.renewal_timeout_days <= 90:
            raise ValueError("tls.renewal_timeout_days must be 1-90")
        if not 1 <= self.renewal_check_seconds <= 86_400:
            raise ValueError("tls.renewal_check_seconds must be 1-86400")
        for party in self.renewal_gateways:
            check_party_id(party)


@dataclass(frozen=True)
class KeysSection(RotationSettings):
    keystore: Path = doc("Keystore file made by 'hedui-keys init' (holds our keys and trusted gateways).")
    passphrase_file: Path = doc(
        "File holding the keystore passphrase on one line; refused unless mode 0600 (owner only)."
    )
    rotate_agreement_days: float = doc(
        "Days our key-agreement key is used before the connector rotates it by itself and announces the new one to "
        "every gateway (0: never automatically).",
        default=30.0,
    )
    rotate_signing_days: float = doc(
        "Days our signing key is used before the connector rotates it by itself (0: never automatically).",
        default=180.0,
    )
    rotation_lead_hours: float = doc(
        "How long before it takes over a new key is announced, so that every gateway has applied it first; more "
        "than twice the gateways' trust.sync_interval_seconds (5 minutes by default).",
        default=24.0,
    )
    rotation_overlap_days: float = doc(
        "How long an automatically rotated key stays valid after its successor took over (at most 90).",
        default=14.0,
    )
    watch_interval_seconds: float = doc(
        "How often the keystore file is checked for changes made by another program ('hedui-keys rotate', "
        "'revoke', 'import') and keys are retired or rotated when due; changes are loaded without a restart.",
        default=5.0,
    )


@dataclass(frozen=True)
class DatabaseSection:
    url: DatabaseUrl = doc("SQLAlchemy URL of the connector's own store (batches, answers, audit).")


@dataclass(frozen=True)
class AdapterSection:
    kind: str = doc("Where the unit's data comes from: sql, csv or synthetic.")
    url: DatabaseUrl = doc("sql: SQLAlchemy URL of the unit's database (read-only account recommended).", default="")
    queries: dict[str, str] = doc(
        "sql: data category -> parameterised SELECT using :id_numbers (and :income_from, :income_to, :as_of).",
        default_factory=dict,
    )
    statement_timeout_seconds: int = doc(
        "sql: longest a query may run on the unit's database before it is cancelled (sessions are also read-only).",
        default=30,
    )
    directory: Path | None = doc("csv: folder holding the exported files.", default=None)
    files: dict[str, str] = doc("csv: data category -> file name in directory.", default_factory=dict)
    seed: int = doc("synthetic: seed of the synthetic population (tests, demo, benchmarks).", default=1)

    def __post_init__(self) -> None:
        if self.kind not in {"sql", "csv", "synthetic"}:
            raise ValueError("adapter.kind must be sql, csv or synthetic")
        if not 1 <= self.statement_timeout_seconds <= 3600:
            raise ValueError("adapter.statement_timeout_seconds must be between 1 and 3600")
        for name in (*self.queries, *self.files):
            data_category_by_name(name)


@dataclass(frozen=True)
class ExchangeSection:
    max_subjects_per_batch: int = doc("Largest query batch accepted; larger ones are refused.", default=5000)
    threshold_categories: tuple[str, ...] = doc(
        "Data categories answered as threshold flags (above the limit sent in the query: yes/no) instead of "
        "amounts — data minimisation. Only deposits support it today.",
        default=(),
    )
    answer_interval_seconds: float = doc("How often the answer worker looks for pending batches.", default=2.0)
    retention_days: int = doc(
        "Days an acknowledged batch's content and answer are kept before they are purged.", default=30
    )
    envelope_ttl_minutes: int = doc(
        "Lifetime of the envelopes the connector sends, and the oldest envelope it takes from a gateway (created "
        "longer ago than this plus the clock skew: expired, docs/envelope.md step 7c). Keep it equal to the "
        "gateway's.",
        default=60,
    )
    holiday_file: Path | None = doc(
        "TOML with official holiday schedules of years the built-in calendar lacks (common/workdays.py).",
        default=None,
    )
    answer_staff: int = doc(
        "Procedure V.(二): how many of the unit's exchange staff, on duty ('hedui-connector roster on-duty') and "
        "on the unit's roster in force, each answer set names as responsible (1-8; 2 for the two-person rule on the "
        "unit's side). With fewer on duty the worker answers nothing and says why (log, metric, alert). Applies once "
        "the unit's own roster is in force.",
        default=1,
    )
    allow_unverified_approvals: bool = doc(
        "Migration only. The unit verifies every batch's exchange approvals (two staff signatures) against the "
        "gateway's roster it holds, and refuses batches it cannot verify. True: only while it holds no roster of a "
        "gateway at all, it accepts that gateway's batches (with or without an approval proof) whose staff ids are "
        "all in [[staff]] instead, without checking any signature. Once it holds a roster of the gateway, every "
        "batch is verified against it and a batch without an approval proof is refused (approval_missing). Turn it "
        "off once every gateway's roster has arrived (docs/operations.md).",
        default=False,
    )
    approval_max_age_days: int = doc(
        "Oldest exchange approval accepted: a batch whose approvals were given more than this many days before "
        "the gateway sent it is refused (approval_time_invalid), so an approval signed with a key since revoked "
        "cannot be backdated to before its revocation forever (docs/exchange.md). 1-366; agree it with the "
        "gateways (an exchange approved but not sent within it is approved again).",
        default=45,
    )

    def __post_init__(self) -> None:
        if not 1 <= self.answer_staff <= 8:
            raise ValueError("exchange.answer_staff must be 1-8")
        if not 1 <= self.approval_max_age_days <= 366:
            raise ValueError("exchange.approval_max_age_days must be 1-366")


@dataclass(frozen=True)
class RosterSection:
    notice_working_days: int = doc(
        "Procedure V.(三): working days of notice (Beijing time) before a roster change that adds staff takes "
        "effect, for the unit's own changes and for the gateways' rosters it receives (shorter: refused, "
        "roster_notice_too_short). Ending or revoking staff takes effect at once. 0-20; agree it with the gateways.",
        default=1,
    )

    def __post_init__(self) -> None:
        if not 0 <= self.notice_working_days <= 20:
            raise ValueError("roster.notice_working_days must be 0-20")


@dataclass(frozen=True)
class ConnectorMetricsSection(MetricsSection):
    listen: str = doc(METRICS_LISTEN_DOC, default="127.0.0.1:9465")  # beside a gateway on the same host


@dataclass(frozen=True)
class StaffEntry:
    gateway: str = doc("Party id of the gateway whose staff member this is.")
    staff_id: str = doc("The staff member's id as the agency registered it (Procedure V.(三)).")


@dataclass(frozen=True)
class ConnectorConfig:
    """Everything ``hedui-connector serve`` needs."""

    ENV_OVERRIDES: ClassVar[dict[str, str]] = {
        "HEDUI_CONNECTOR_DATABASE_URL": "database.url",
        "HEDUI_CONNECTOR_LISTEN": "server.listen",
        "HEDUI_CONNECTOR_METRICS_LISTEN": "metrics.listen",
    }

    unit: UnitSection
    keys: KeysSection
    database: DatabaseSection
    adapter: AdapterSection
    server: ServerSection = field(default_factory=ServerSection)
    tls: TlsSection = field(default_factory=TlsSection)
    exchange: ExchangeSection = field(default_factory=ExchangeSection)
    metrics: ConnectorMetricsSection = field(default_factory=ConnectorMetricsSection)
    roster: RosterSection = field(default_factory=RosterSection)
    staff: tuple[StaffEntry, ...] = doc(
        "Deprecated: a migration source only, with exchange.allow_unverified_approvals. Exchange staff ids of a "
        "gateway, checked only while the unit holds no roster of that gateway (then the roster decides; "
        "'hedui-connector roster migrate-check').",
        default=(),
    )

    def __post_init__(self) -> None:
        served = UNIT_DATA[self.unit_category]
        for name in self.exchange.threshold_categories:
            if data_category_by_name(name) not in served:
                raise ValueError(f"threshold category {name} is not served by a {self.unit.category} unit")
        for name in (*self.adapter.queries, *self.adapter.files):
            if data_category_by_name(name) not in served:
                raise ValueError(f"adapter category {name} is not served by a {self.unit.category} unit")

    @property
    def unit_category(self) -> int:
        return unit_category_by_name(self.unit.category)

    def tls_files(self) -> list[TlsFiles]:
        """The server certificate ``serve`` presents, to check (keys/tls.py ``check_tls``); none with
        insecure_plaintext."""
        server = self.server
        if server.insecure_plaintext:
            return []
        if not (server.tls_cert and server.tls_key and server.tls_ca):
            raise ConfigError("server.tls_cert, server.tls_key and server.tls_ca are required (or insecure_plaintext)")
        return [TlsFiles("server", "server", self.unit.party_id, server.tls_cert, server.tls_key, server.tls_ca)]

    @property
    def renewal_key_path(self) -> Path | None:
        """Where a renewal's new key waits: tls.renewal_key_file, else the server key's name + '.pending' (None
        under insecure_plaintext)."""
        if self.server.insecure_plaintext or self.server.tls_key is None:
            return None
        return self.tls.renewal_key_file or self.server.tls_key.with_name(self.server.tls_key.name + ".pending")

    @property
    def crl_path(self) -> Path:
        """The revocation list's file: tls.crl_file, else crl.der beside the keystore."""
        return self.tls.crl_file or self.keys.keystore.parent / "crl.der"

    @classmethod
    def load(cls, path: Path) -> ConnectorConfig:
        return load_file(cls, path)
