"""A complete exchange network on one machine's loopback, written to a folder: a private CA, keystores that trust
each other, certificates, connector configs with synthetic data, and a gateway config.

Used by the demo, the crash-safety test and the benchmarks; an operator can read the generated files as a worked
example of a real installation (the same files, with real addresses, are what deploy/ documents).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from keys import keystore
from keys.announcements import read_bundle
from keys.clock import SystemClock
from keys.identity import PartyKeys
from keys.tls import create_ca, issue_certificate
from keys.truststore import TrustStore

STAFF = ("S-0001", "S-0002")


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that nothing listens on right now. They are held bound together
    while chosen, so the kernel cannot hand out the same port twice (which, choosing one at a time, it may)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class Network:
    """The files of a loopback network and the processes started from them."""

    root: Path
    gateway_party: str
    gateway_config: Path
    connector_configs: dict[str, Path]
    connector_ports: dict[str, int]
    gateway_port: int
    #: Prometheus endpoints (http://127.0.0.1:PORT/metrics) of the gateway and of each connector.
    gateway_metrics_port: int = 0
    connector_metrics_ports: dict[str, int] = field(default_factory=dict)
    #: --log-format of the processes started: text, or json (one JSON object per line).
    log_format: str = "text"
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    #: The loopback CA (certificate PEM, key PEM), kept so that tests can renew certificates while the network runs.
    ca: tuple[bytes, bytes] | None = None

    def renew_certificate(self, party: str, *, server: bool) -> None:
        """Issue ``party`` a new certificate and key (server: a connector's, else a client's) and put them in place
        of the old pair, each by rename, key first: a running service reloads the pair without a restart."""
        assert self.ca is not None
        cert, key = issue_certificate(
            *self.ca, party, server_names=["localhost", "127.0.0.1"], client=not server, server=server
        )
        suffix = "server" if server else "client"
        for data, name, mode in ((key, f"{party}.{suffix}.key", 0o600), (cert, f"{party}.{suffix}.crt", 0o644)):
            staged = self.root / "tls" / f".{name}.new"
            _write(staged, data.decode(), mode)
            staged.replace(self.root / "tls" / name)

    def _spawn(
        self, args: Sequence[str], log_name: str, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = (self.root / "logs" / log_name).open("ab")
        module, *rest = args
        process = subprocess.Popen(
            [sys.executable, "-m", module, "--log-format", self.log_format, *rest],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            env={**_child_env(), **(env or {})},
        )
        log.close()
        self.processes.append(process)
        return process

    def start_connectors(
        self,
        only: Sequence[str] | None = None,
        *,
        on_ready: Callable[[str], None] | None = None,
        timeout: float = 120.0,
    ) -> dict[str, subprocess.Popen[bytes]]:
        """Start ``hedui-connector serve`` for every unit (or those in ``only``) at once and return when all of them
        listen. ``on_ready(unit_id)`` is called as each one comes up, in the order they do; ``timeout`` is for all
        of them together (they start in parallel, so one slow start does not add to the others)."""
        started = {}
        for unit_id, config in self.connector_configs.items():
            if only is None or unit_id in only:
                started[unit_id] = self._spawn(["connectors.cli", "serve", "--config", str(config)], f"{unit_id}.log")
        waiting = dict(started)
        deadline = time.monotonic() + timeout
        while waiting:
            for unit_id, process in list(waiting.items()):
                if process.poll() is not None:
                    raise StartError(
                        unit_id, self.root / "logs" / f"{unit_id}.log", f"exited with code {process.returncode}"
                    )
                if _listens(self.connector_ports[unit_id]):
                    del waiting[unit_id]
                    if on_ready is not None:
                        on_ready(unit_id)
            if waiting and time.monotonic() > deadline:
                unit_id = sorted(waiting)[0]
                raise StartError(unit_id, self.root / "logs" / f"{unit_id}.log", f"not listening after {timeout:.0f} s")
            if waiting:
                time.sleep(0.05)
        return started

    def start_gateway(
        self,
        log_name: str = "gateway.log",
        env: Mapping[str, str] | None = None,
        *,
        wait: bool = True,
        timeout: float = 30.0,
    ) -> subprocess.Popen[bytes]:
        """Start ``hedui-gateway serve``; with ``wait``, return once its API port answers (schema migrated)."""
        process = self._spawn(["gateway.cli", "serve", "--config", str(self.gateway_config)], log_name, env)
        if wait:
            wait_for_port(self.gateway_port, timeout, process=process)
        return process

    def stop_all(self, timeout: float = 20.0) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + timeout
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class StartError(RuntimeError):
    """A process of the network did not come up: it exited, or did not listen in time. Its log says why."""

    def __init__(self, party: str, log: Path, what: str) -> None:
        super().__init__(f"{party} {what}; its log is {log}")
        self.party, self.log = party, log


def _listens(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        # A connection to itself (same source and destination port: TCP simultaneous open on loopback) does not
        # mean that anything listens.
        return sock.connect_ex(("127.0.0.1", port)) == 0 and sock.getsockname() != sock.getpeername()


def wait_for_port(port: int, timeout: float = 30.0, process: subprocess.Popen[bytes] | None = None) -> None:
    """Return once something listens on ``port``; with ``process``, fail at once if that process has exited
    (it could not bind the port, or its configuration was refused: its log says which)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"process {process.pid} exited with code {process.returncode} before listening on {port}"
            )
        if _listens(port):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def build_network(
    root: Path,
    units: Mapping[str, str],
    *,
    gateway_party: str = "agency.220100",
    database_url: str | None = None,
    policy: str = "continuous",
    seed: int = 20261127,
    batch_size: int = 500,
    dispatch_interval: float = 0.5,
    poll_interval: float = 0.5,
    answer_interval: float = 0.2,
    base_backoff: float = 0.5,
    max_backoff: float = 5.0,
    lease_seconds: float = 10.0,
    kdf: keystore.KdfParams | None = None,
    clients: Mapping[str, str] | None = None,
    keys: Mapping[str, float] | None = None,
    trust_sync_interval: float | None = None,
    key_check_interval: float = 60.0,
    legacy_staff: bool = False,
) -> Network:
    """Write a network for ``units`` (party id -> unit category name) into ``root``. ``keys`` sets [keys] values of
    every config (rotate_agreement_days, rotate_signing_days, rotation_lead_hours, rotation_overlap_days,
    watch_interval_seconds), ``trust_sync_interval`` the gateway's [trust] sync_interval_seconds.

    The units verify every batch's two exchange approvals against the gateway's signed roster they hold, as in
    production: register the staff on both sides with the roster commands (demo/rosters.py) before approving. Roster
    changes take effect at once (notice 0 working days) so that a run takes minutes, not a working day.
    ``legacy_staff`` writes the migration rule instead (``allow_unverified_approvals = true`` and a ``[[staff]]``
    list of STAFF): for tests and benchmarks that put commissions straight into the gateway's outbox, without
    approvals, because they are about transport, crashes or keys rather than staff."""
    key_lines = "".join(f"{name} = {value!r}\n" for name, value in (keys or {}).items())
    trust_lines = f"\n[trust]\nsync_interval_seconds = {trust_sync_interval}\n" if trust_sync_interval else ""
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("tls", "keys", "logs", "data"):
        (root / sub).mkdir(exist_ok=True)
    now = SystemClock().now_ms()
    ca_cert, ca_key = create_ca("Hedui loopback network CA")
    _write(root / "tls" / "ca.crt", ca_cert.decode())

    def issue(party: str, *, server: bool) -> tuple[Path, Path]:
        cert, key = issue_certificate(
            ca_cert, ca_key, party, server_names=["localhost", "127.0.0.1"], client=not server, server=server
        )
        suffix = "server" if server else "client"
        cert_path, key_path = root / "tls" / f"{party}.{suffix}.crt", root / "tls" / f"{party}.{suffix}.key"
        _write(cert_path, cert.decode())
        _write(key_path, key.decode(), 0o600)
        return cert_path, key_path

    gateway = (PartyKeys.create(gateway_party, now_ms=now), TrustStore())
    sides = {unit: (PartyKeys.create(unit, now_ms=now), TrustStore()) for unit in units}
    gateway_bundle = gateway[0].bundle(now)
    for unit_keys, unit_trust in sides.values():
        bundle = unit_keys.bundle(now)
        gateway[1].import_bundle(bundle, expected_fingerprint=read_bundle(bundle).fingerprint)
        unit_trust.import_bundle(gateway_bundle, expected_fingerprint=read_bundle(gateway_bundle).fingerprint)

    def save(party: PartyKeys, trust: TrustStore) -> tuple[Path, Path]:
        passphrase = secrets.token_urlsafe(24)
        pass_path = root / "keys" / f"{party.party_id}.passphrase"
        _write(pass_path, passphrase + "\n", 0o600)
        store_path = root / "keys" / f"{party.party_id}.keystore.json"
        keystore.save(store_path, party, trust, passphrase, kdf=kdf)
        return store_path, pass_path

    connector_configs, ports, metrics_ports = {}, {}, {}
    gateway_port, gateway_metrics_port, *unit_ports = free_ports(2 + 2 * len(units))
    if legacy_staff:
        approvals = (
            "# The migration rule (deprecated): approvals judged by the [[staff]] ids below, no signature checked.\n"
            "allow_unverified_approvals = true\n"
        )
        staff = "".join(f'\n[[staff]]\ngateway = "{gateway_party}"\nstaff_id = "{s}"\n' for s in STAFF)
    else:
        approvals = (
            "# Every batch's two approvals are verified against the gateway's signed roster (Procedure V.(三)).\n"
            "allow_unverified_approvals = false\n"
        )
        staff = (
            "\n[roster]\n# Procedure V.(三): changes are registered in advance. Production keeps the default, 1\n"
            "# working day; this loopback network takes them at once so that a run takes minutes.\n"
            "notice_working_days = 0\n"
        )
    for unit, category in units.items():
        port = ports[unit] = unit_ports.pop()
        metrics_ports[unit] = unit_ports.pop()
        cert, key = issue(unit, server=True)
        store_path, pass_path = save(*sides[unit])
        config = root / f"{unit}.toml"
        _write(
            config,
            f"""# connector of {unit} (synthetic data)
[unit]
party_id = "{unit}"
category = "{category}"

[server]
listen = "127.0.0.1:{port}"
tls_cert = {_toml_str(str(cert))}
tls_key = {_toml_str(str(key))}
tls_ca = {_toml_str(str(root / "tls" / "ca.crt"))}

[keys]
keystore = {_toml_str(str(store_path))}
passphrase_file = {_toml_str(str(pass_path))}
{key_lines}
[database]
url = {_toml_str("sqlite:///" + str(root / "data" / f"{unit}.db"))}

[adapter]
kind = "synthetic"
seed = {seed}

[exchange]
answer_interval_seconds = {answer_interval}
max_subjects_per_batch = {max(batch_size, 1)}
{approvals}
[metrics]
listen = "127.0.0.1:{metrics_ports[unit]}"
{staff}""",
        )
        connector_configs[unit] = config
    client_cert, client_key = issue(gateway_party, server=False)
    server_cert, server_key = issue(gateway_party + ".api", server=True)
    store_path, pass_path = save(*gateway)
    # Agency API clients (party id -> role), each with a client certificate in tls/<party>.client.crt.
    for party in clients or {}:
        issue(party, server=False)
    unit_lines = "".join(
        f'\n[[clients]]\nparty_id = "{party}"\nrole = "{role}"\n' for party, role in (clients or {}).items()
    ) + "".join(
        f'\n[[units]]\nparty_id = "{unit}"\ncategory = "{category}"\nendpoint = "127.0.0.1:{ports[unit]}"\n'
        for unit, category in units.items()
    )
    staff_lines = (
        ""
        if legacy_staff
        else "\n[staff]\n# Procedure V.(三): production keeps the default notice, 1 working day (see the units').\n"
        "roster_notice_working_days = 0\n"
    )
    gateway_config = root / "gateway.toml"
    _write(
        gateway_config,
        f"""# gateway {gateway_party} on loopback
[agency]
party_id = "{gateway_party}"
region_code = "{gateway_party.rsplit(".", 1)[-1] if gateway_party[-6:].isdigit() else "220100"}"
level = "city"

[server]
listen = "127.0.0.1:{gateway_port}"
tls_cert = {_toml_str(str(server_cert))}
tls_key = {_toml_str(str(server_key))}
tls_ca = {_toml_str(str(root / "tls" / "ca.crt"))}

[client_tls]
cert = {_toml_str(str(client_cert))}
key = {_toml_str(str(client_key))}
ca = {_toml_str(str(root / "tls" / "ca.crt"))}

[keys]
keystore = {_toml_str(str(store_path))}
passphrase_file = {_toml_str(str(pass_path))}
{key_lines}
[database]
url = {_toml_str(database_url or "sqlite:///" + str(root / "data" / "gateway.db"))}
migrate_on_start = true

[exchange]
batch_size = {batch_size}
request_timeout_seconds = 10
base_backoff_seconds = {base_backoff}
max_backoff_seconds = {max_backoff}
poll_interval_seconds = {poll_interval}
fetch_group = 20
lease_seconds = {lease_seconds}

[schedule]
policy = "{policy}"
dispatch_interval_seconds = {dispatch_interval}
sweep_interval_seconds = 5
key_check_interval_seconds = {key_check_interval}

[metrics]
listen = "127.0.0.1:{gateway_metrics_port}"
{staff_lines}{trust_lines}{unit_lines}""",
    )
    return Network(
        root,
        gateway_party,
        gateway_config,
        connector_configs,
        ports,
        gateway_port,
        gateway_metrics_port=gateway_metrics_port,
        connector_metrics_ports=metrics_ports,
        ca=(ca_cert, ca_key),
    )
