"""The TLS files a config names, checked before anything serves (keys/tls.py ``check_tls``): ``check-config`` of
the gateway and of a connector, and ``serve`` of both, refuse a certificate that is missing, unreadable, expired, not
yet valid, not the key's, not the CA's, for the wrong use or the wrong party, with one line naming the file; a
certificate that ends within 30 days is a warning; the services export the seconds left
(``hedui_tls_certificate_expiry_seconds``).

Every certificate is a real one from keys/tls.py, issued under a CA dated two years back so that expired and
not-yet-valid certificates can be issued with ``now=``.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from common.metrics import ServiceMetrics
from connectors.cli import main as connector_main
from connectors.config import ConnectorConfig
from connectors.server import serve
from demo.localnet import free_port
from gateway.cli import main as gateway_main
from gateway.config import GatewayConfig
from gateway.server import build
from keys import keystore
from keys.identity import PartyKeys
from keys.tls import LEAF_VALID_DAYS, TlsError, TlsFiles, check_tls, check_tls_files, create_ca, issue_certificate
from keys.truststore import TrustStore
from tests.conftest import write_passphrase
from tests.exchange_world import GATEWAY, UNIT, enrol

API = GATEWAY + ".api"
LAND = "unit.220100.land"
PASSPHRASE = "certificate check passphrase"
DAY = dt.timedelta(days=1)
EXPIRY = "hedui_tls_certificate_expiry_seconds"


@dataclass
class Site:
    """A gateway and a tax-bureau connector as installed: a CA, certificates, keystores and both config files."""

    root: Path
    ca_cert: bytes
    ca_key: bytes
    gateway_config: Path
    connector_config: Path

    def install(
        self,
        name: str,
        party: str,
        *,
        server: bool,
        client: bool | None = None,
        now: dt.datetime | None = None,
        valid_days: int = LEAF_VALID_DAYS,
        ca: tuple[bytes, bytes] | None = None,
    ) -> tuple[Path, Path]:
        """Issue a certificate and write it over ``name``.crt / ``name``.key (the key 0600, as the services want)."""
        ca_cert, ca_key = ca or (self.ca_cert, self.ca_key)
        cert, key = issue_certificate(
            ca_cert,
            ca_key,
            party,
            server_names=["localhost", "127.0.0.1"] if server else [],
            client=not server if client is None else client,
            server=server,
            now=now,
            valid_days=valid_days,
        )
        paths = (self.root / f"{name}.crt", self.root / f"{name}.key")
        paths[0].write_bytes(cert)
        paths[1].write_bytes(key)
        paths[1].chmod(0o600)
        return paths

    def edit(self, config: Path, old: str, new: str) -> None:
        text = config.read_text(encoding="utf-8")
        assert old in text, old
        config.write_text(text.replace(old, new), encoding="utf-8")


def _site(root: Path) -> Site:
    now = int(time.time() * 1000)
    # Dated back, so that certificates can be issued as of any moment of the last two years.
    ca_cert, ca_key = create_ca("Hedui test CA", now=dt.datetime.now(dt.UTC) - 730 * DAY)
    (root / "ca.crt").write_bytes(ca_cert)
    gateway = (PartyKeys.create(GATEWAY, now_ms=now - 1000), TrustStore())
    unit = (PartyKeys.create(UNIT, now_ms=now - 1000), TrustStore())
    enrol(gateway, unit, now)
    keystore.save(root / "gateway.keystore.json", *gateway, PASSPHRASE, kdf=keystore.FAST_FOR_TESTS)
    keystore.save(root / "unit.keystore.json", *unit, PASSPHRASE, kdf=keystore.FAST_FOR_TESTS)
    write_passphrase(root / "passphrase", PASSPHRASE)
    site = Site(root, ca_cert, ca_key, root / "gateway.toml", root / "connector.toml")
    site.gateway_config.write_text(
        f"""
[agency]
party_id = "{GATEWAY}"
region_code = "220100"
level = "city"

[server]
listen = "127.0.0.1:0"
tls_cert = "api.crt"
tls_key = "api.key"
tls_ca = "ca.crt"

[client_tls]
cert = "gw.crt"
key = "gw.key"
ca = "ca.crt"

[keys]
keystore = "gateway.keystore.json"
passphrase_file = "passphrase"

[database]
url = "sqlite:///{root}/gateway.db"
migrate_on_start = true

[metrics]
listen = ""

[[units]]
party_id = "{UNIT}"
category = "tax"
endpoint = "127.0.0.1:{free_port()}"
""",
        encoding="utf-8",
    )
    site.connector_config.write_text(
        f"""
[unit]
party_id = "{UNIT}"
category = "tax"

[server]
listen = "127.0.0.1:0"
tls_cert = "tax.crt"
tls_key = "tax.key"
tls_ca = "ca.crt"

[keys]
keystore = "unit.keystore.json"
passphrase_file = "passphrase"

[database]
url = "sqlite:///{root}/connector.db"

[adapter]
kind = "synthetic"

[metrics]
listen = ""

[[staff]]
gateway = "{GATEWAY}"
staff_id = "S-1"
""",
        encoding="utf-8",
    )
    site.install("api", API, server=True)
    site.install("gw", GATEWAY, server=False)
    site.install("tax", UNIT, server=True)
    return site


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return _site(tmp_path)


def _check(main: Callable[[list[str]], int], config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["check-config", "--config", str(config)])
    out, err = capsys.readouterr()
    return code, out, err


def _refused(code: int, out: str, err: str) -> None:
    """Refused the way an operator can act on: exit status 1, no "config OK", no traceback or bare errno."""
    assert code == 1, (out, err)
    assert "config OK" not in out
    assert "Traceback" not in err and "Errno" not in err, err


def _other_key(site: Site) -> None:
    _, key = site.install("other", UNIT, server=True)
    shutil.copyfile(key, site.root / "tax.key")


def _other_ca(site: Site) -> None:
    site.install("tax", UNIT, server=True, ca=create_ca("Some other CA"))


#: How a connector's server certificate goes wrong -> what check-config says (after "[server] ").
CONNECTOR_BREAKAGES: dict[str, tuple[Callable[[Site], object], str]] = {
    "certificate missing": (
        lambda s: (s.root / "tax.crt").unlink(),
        "server certificate {root}/tax.crt does not exist",
    ),
    "key missing": (lambda s: (s.root / "tax.key").unlink(), "no TLS private key at {root}/tax.key"),
    "CA missing": (lambda s: (s.root / "ca.crt").unlink(), "CA certificate {root}/ca.crt does not exist"),
    "key readable by others": (
        lambda s: (s.root / "tax.key").chmod(0o644),
        "{root}/tax.key is readable or writable by other users (mode 644)",
    ),
    "not a certificate": (
        lambda s: (s.root / "tax.crt").write_text("tax bureau\n"),
        "server certificate {root}/tax.crt is not a PEM certificate",
    ),
    "garbled certificate": (
        lambda s: (s.root / "tax.crt").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
        "server certificate {root}/tax.crt is not a readable X.509 certificate",
    ),
    "key of another certificate": (
        _other_key,
        "private key {root}/tax.key does not belong to the certificate {root}/tax.crt",
    ),
    "signed by another CA": (_other_ca, "server certificate {root}/tax.crt is not signed by the CA in {root}/ca.crt"),
    "CA file is a leaf certificate": (
        lambda s: shutil.copyfile(s.root / "tax.crt", s.root / "ca.crt"),
        "CA certificate {root}/ca.crt is not a CA certificate",
    ),
    "expired": (
        lambda s: s.install("tax", UNIT, server=True, now=dt.datetime.now(dt.UTC) - 400 * DAY, valid_days=30),
        "server certificate {root}/tax.crt expired on ",
    ),
    "not yet valid": (
        lambda s: s.install("tax", UNIT, server=True, now=dt.datetime.now(dt.UTC) + 2 * DAY),
        "server certificate {root}/tax.crt is not yet valid: valid from ",
    ),
    "client usage only": (
        lambda s: s.install("tax", UNIT, server=False),
        "server certificate {root}/tax.crt is not for a server (extended key usage clientAuth, serverAuth needed)",
    ),
    "another unit's certificate": (
        lambda s: s.install("tax", LAND, server=True),
        f"server certificate {{root}}/tax.crt names party {LAND}, but must name {UNIT}",
    ),
}


def _breaking_refuses(
    program: Callable[[list[str]], int],
    config: Path,
    breakage: tuple[Callable[[Site], object], str],
    site: Site,
    capsys: pytest.CaptureFixture[str],
    prefix: str,
) -> None:
    """check-config passes, the breakage is applied, and check-config refuses with the breakage's one line."""
    assert _check(program, config, capsys)[0] == 0
    breaks, message = breakage
    breaks(site)
    code, out, err = _check(program, config, capsys)
    _refused(code, out, err)
    assert f"{prefix}{message.format(root=site.root)}" in err, err


@pytest.mark.parametrize("breakage", sorted(CONNECTOR_BREAKAGES))
def test_connector_check_config_refuses_a_bad_server_certificate(
    breakage: str, site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    _breaking_refuses(
        connector_main,
        site.connector_config,
        CONNECTOR_BREAKAGES[breakage],
        site,
        capsys,
        "hedui-connector: error: [server] ",
    )


def test_agency_client_certificate_installed_as_the_connector_server_certificate_is_refused(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    """The tax bureau's report: the agency's client certificate as the connector's server certificate passed."""
    for suffix in ("crt", "key"):
        shutil.copyfile(site.root / f"gw.{suffix}", site.root / f"tax.{suffix}")
    code, out, err = _check(connector_main, site.connector_config, capsys)
    _refused(code, out, err)
    assert "hedui-connector: error: 2 TLS problems:\n" in err
    lines = err.splitlines()[1:]
    assert lines == [
        f"  [server] server certificate {site.root}/tax.crt is not for a server (extended key usage clientAuth, "
        "serverAuth needed): issue one with 'hedui-keys ca issue --server'",
        f"  [server] server certificate {site.root}/tax.crt names party {GATEWAY}, but must name {UNIT}",
    ]


def test_connector_check_config_refuses_staff_of_a_gateway_not_in_the_trust_store(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    site.edit(site.connector_config, f'gateway = "{GATEWAY}"', 'gateway = "agency.220200"')
    code, out, err = _check(connector_main, site.connector_config, capsys)
    _refused(code, out, err)
    assert "[[staff]] gateway agency.220200 is not a party in the keystore's trust store" in err


def test_a_certificate_ending_within_30_days_is_a_warning(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    site.install("tax", UNIT, server=True, valid_days=10)
    code, out, err = _check(connector_main, site.connector_config, capsys)
    assert code == 0, err
    assert "config OK" in out and "(1 warning)" in out
    assert f"hedui-connector: warning: [server] server certificate {site.root}/tax.crt expires in 10.0 days" in err
    assert "tls renewal-status" in err and "ca renew" in err and "picks it up" in err

    site.install("gw", GATEWAY, server=False, valid_days=29)
    assert gateway_main(["migrate", "--config", str(site.gateway_config)]) == 0
    capsys.readouterr()
    code, out, err = _check(gateway_main, site.gateway_config, capsys)
    assert code == 0, err
    assert "config OK" in out and "(1 warning)" in out
    assert f"hedui-gateway: warning: [client_tls] client certificate {site.root}/gw.crt expires in 29.0 days" in err


def _expired_client(site: Site) -> None:
    site.install("gw", GATEWAY, server=False, now=dt.datetime.now(dt.UTC) - 400 * DAY, valid_days=30)


#: How the gateway's certificates go wrong -> what check-config says.
GATEWAY_BREAKAGES: dict[str, tuple[Callable[[Site], object], str]] = {
    "client certificate expired": (_expired_client, "[client_tls] client certificate {root}/gw.crt expired on "),
    "client certificate missing": (
        lambda s: (s.root / "gw.crt").unlink(),
        "[client_tls] client certificate {root}/gw.crt does not exist",
    ),
    "server certificate for clients only": (
        lambda s: s.install("gw", GATEWAY, server=True),
        "[client_tls] client certificate {root}/gw.crt is not for a client (extended key usage serverAuth, "
        "clientAuth needed)",
    ),
    "API certificate naming the agency": (
        lambda s: s.install("api", GATEWAY, server=True),
        f"[server] server certificate {{root}}/api.crt names party {GATEWAY}, but must name {API}",
    ),
    "API key of the client certificate": (
        lambda s: shutil.copyfile(s.root / "gw.key", s.root / "api.key"),
        "[server] private key {root}/api.key does not belong to the certificate {root}/api.crt",
    ),
}


@pytest.mark.parametrize("breakage", sorted(GATEWAY_BREAKAGES))
def test_gateway_check_config_refuses_a_bad_certificate(
    breakage: str, site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    assert gateway_main(["migrate", "--config", str(site.gateway_config)]) == 0
    _breaking_refuses(
        gateway_main, site.gateway_config, GATEWAY_BREAKAGES[breakage], site, capsys, "hedui-gateway: error: "
    )


def test_check_config_lists_every_bad_certificate(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    _expired_client(site)
    (site.root / "api.crt").unlink()
    code, out, err = _check(gateway_main, site.gateway_config, capsys)
    _refused(code, out, err)
    assert err.splitlines()[0] == "hedui-gateway: error: 2 TLS problems:"
    assert f"  [server] server certificate {site.root}/api.crt does not exist" in err
    assert f"  [client_tls] client certificate {site.root}/gw.crt expired on " in err


def test_insecure_plaintext_skips_the_certificates(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("api", "gw", "tax"):
        (site.root / f"{name}.crt").unlink()
    site.edit(site.gateway_config, 'tls_ca = "ca.crt"', 'tls_ca = "ca.crt"\ninsecure_plaintext = true')
    site.edit(site.gateway_config, 'ca = "ca.crt"\n\n[keys]', 'ca = "ca.crt"\ninsecure_plaintext = true\n\n[keys]')
    site.edit(site.connector_config, 'tls_ca = "ca.crt"', 'tls_ca = "ca.crt"\ninsecure_plaintext = true')
    assert gateway_main(["migrate", "--config", str(site.gateway_config)]) == 0
    assert _check(gateway_main, site.gateway_config, capsys)[0] == 0
    assert _check(connector_main, site.connector_config, capsys)[0] == 0


@pytest.mark.parametrize("endpoint", ["127.0.0.1;34985", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536", ":50061"])
def test_gateway_check_config_refuses_a_unit_endpoint_that_is_not_host_port(
    endpoint: str, site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    text = site.gateway_config.read_text(encoding="utf-8")
    site.gateway_config.write_text(text.rsplit("endpoint = ", 1)[0] + f'endpoint = "{endpoint}"\n', encoding="utf-8")
    code, out, err = _check(gateway_main, site.gateway_config, capsys)
    _refused(code, out, err)
    assert (
        f"units[0]: units.endpoint must be host:port with a port 1-65535 (e.g. 10.20.1.11:50061), not '{endpoint}'"
        in err
    )


def test_unit_endpoints_that_are_host_port_are_accepted(site: Site) -> None:
    text = site.gateway_config.read_text(encoding="utf-8")
    for endpoint in ("tax-gw.internal:50061", "10.20.1.11:1", "[fd00::11]:65535", "localhost:50061"):
        site.gateway_config.write_text(text.rsplit("endpoint = ", 1)[0] + f'endpoint = "{endpoint}"\n')
        assert GatewayConfig.load(site.gateway_config).units[0].endpoint == endpoint


# -- serve -------------------------------------------------------------------------------------------------------


def test_connector_serve_refuses_to_start_with_a_missing_certificate(site: Site) -> None:
    """Was: "[Errno 2] No such file or directory" and nothing else."""
    (site.root / "tax.crt").unlink()
    exe = shutil.which("hedui-connector", path=os.path.dirname(sys.executable))
    assert exe is not None
    result = subprocess.run(
        [exe, "serve", "--config", str(site.connector_config)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr == f"hedui-connector: error: [server] server certificate {site.root}/tax.crt does not exist\n"
    assert "serving" not in result.stdout


@pytest.mark.parametrize("breakage", ["expired", "client usage only", "another unit's certificate"])
def test_connector_serve_refuses_what_check_config_refuses(
    breakage: str, site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    CONNECTOR_BREAKAGES[breakage][0](site)
    _, _, checked = _check(connector_main, site.connector_config, capsys)
    assert connector_main(["serve", "--config", str(site.connector_config)]) == 1
    out, err = capsys.readouterr()
    assert err == checked and "serving" not in out


def test_gateway_serve_refuses_an_expired_client_certificate(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    """The on-call report: an expired client certificate made every unit "unreachable" instead of stopping."""
    _expired_client(site)
    _, _, checked = _check(gateway_main, site.gateway_config, capsys)
    assert gateway_main(["serve", "--config", str(site.gateway_config)]) == 1
    out, err = capsys.readouterr()
    assert err == checked and "serving" not in out
    assert "[client_tls] client certificate" in err and "expired on" in err
    assert not (site.root / "gateway.db").exists()  # refused before anything was opened


# -- metrics -----------------------------------------------------------------------------------------------------


def _days(seconds: float | None) -> float:
    assert seconds is not None
    return seconds / 86_400


def test_serving_connector_exports_the_days_its_certificate_has_left(site: Site) -> None:
    site.install("tax", UNIT, server=True, valid_days=90)
    running = serve(ConnectorConfig.load(site.connector_config))
    try:
        assert running.connector.metrics is not None
        registry = running.connector.metrics.registry
        assert 89.99 < _days(registry.get_sample_value(EXPIRY, {"role": "server"})) <= 90
        assert registry.get_sample_value(EXPIRY, {"role": "client"}) is None
    finally:
        running.stop(grace=1.0)


def test_serving_gateway_exports_the_days_its_certificates_have_left(site: Site) -> None:
    site.install("gw", GATEWAY, server=False, valid_days=20)
    running = build(GatewayConfig.load(site.gateway_config))
    try:
        assert running.metrics is not None
        value = running.metrics.registry.get_sample_value
        assert 19.99 < _days(value(EXPIRY, {"role": "client"})) <= 20
        assert LEAF_VALID_DAYS - 0.01 < _days(value(EXPIRY, {"role": "server"})) <= LEAF_VALID_DAYS
    finally:
        running.stop(grace=1.0)


def test_the_expiry_gauge_counts_down_at_scrape_time() -> None:
    metrics = ServiceMetrics(CollectorRegistry(), ())
    clock = [1_000.0]
    metrics.watch_certificates({"server": 87_400.0, "client": 500.0}, clock=lambda: clock[0])
    assert metrics.registry.get_sample_value(EXPIRY, {"role": "server"}) == 86_400
    clock[0] = 2_000.0
    assert metrics.registry.get_sample_value(EXPIRY, {"role": "server"}) == 85_400
    assert metrics.registry.get_sample_value(EXPIRY, {"role": "client"}) == -1_500  # ended: the alert is critical


# -- the check itself --------------------------------------------------------------------------------------------


def test_check_tls_files_returns_what_grpc_is_given(site: Site) -> None:
    files = TlsFiles("server", "server", UNIT, site.root / "tax.crt", site.root / "tax.key", site.root / "ca.crt")
    identity = check_tls_files(files)
    assert identity.cert_pem == (site.root / "tax.crt").read_bytes()
    assert identity.key_pem == (site.root / "tax.key").read_bytes()
    assert identity.ca_pem == site.ca_cert
    assert 396.99 < identity.days_left() <= LEAF_VALID_DAYS
    assert identity.expiry_warning() is None
    assert identity.expiry_warning(now=identity.not_after - 3 * DAY) is not None
    assert "PRIVATE" not in repr(identity)
    # Checked as of a moment: the same files, a year and a half on, are expired.
    with pytest.raises(TlsError, match="expired on"):
        check_tls_files(files, now=dt.datetime.now(dt.UTC) + 540 * DAY)
    # A clock a little behind the CA's machine still accepts a certificate issued a moment ago (CLOCK_SKEW).
    site.install("tax", UNIT, server=True, now=dt.datetime.now(dt.UTC) + dt.timedelta(minutes=8))
    assert check_tls([files])[0].role == "server"
    with pytest.raises(ValueError, match="role"):
        TlsFiles("server", "peer", UNIT, files.cert, files.key, files.ca)


@pytest.mark.parametrize("which", ["cert", "key", "ca"])
def test_a_tls_file_that_is_a_fifo_is_refused_at_once_not_waited_on(site: Site, tmp_path: Path, which: str) -> None:
    """A FIFO in place of a certificate or key blocked the service's start on open() for ever (the reader waits for
    a writer); it is refused as not a regular file."""
    names = {"cert": site.root / "tax.crt", "key": site.root / "tax.key", "ca": site.root / "ca.crt"}
    fifo = tmp_path / f"{which}.fifo"
    os.mkfifo(fifo, 0o600)
    names[which] = fifo
    files = TlsFiles("server", "server", UNIT, names["cert"], names["key"], names["ca"])
    outcome: list[BaseException | None] = []

    def check() -> None:
        try:
            check_tls_files(files)
            outcome.append(None)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    worker = threading.Thread(target=check, daemon=True)
    worker.start()
    worker.join(timeout=20)
    if worker.is_alive():  # release the blocked reader before failing, so that no thread is left behind
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(timeout=5)
        pytest.fail(f"check_tls_files blocked on the FIFO in place of the {which}")
    assert isinstance(outcome[0], TlsError) and "is not a regular file" in str(outcome[0]), outcome
