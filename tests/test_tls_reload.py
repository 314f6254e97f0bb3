"""Certificates without restarts, and the CA's revocation list (common/tlsreload.py, keys/crl.py), with the real
services on loopback: a connector started by ``serve`` and a gateway started by ``build`` from their config files,
certificates renewed and revoked with the real ``hedui-keys ca`` commands while calls flow.

The serial a client sees is read with a TLS handshake of its own (gateway/exchange/tls.py
``fetch_server_certificate``); the certificate a gateway presents is told by revoking the old one: calls that pass a
connector enforcing that list are made with the new one.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from hedui.v1 import agency_pb2, agency_pb2_grpc

from common.tlsreload import SETTLE_SECONDS, CertificateSource, RevocationSource
from connectors.cli import main as connector_main
from connectors.config import ConnectorConfig
from connectors.server import RunningConnector, serve
from gateway.cli import main as gateway_main
from gateway.config import GatewayConfig
from gateway.exchange.transport import ClientTls, TransportFailure, UnitClient, fetch_server_certificate
from gateway.server import RunningGateway, build
from keys.cli import main as keys_main
from keys.clock import MINUTE_MS
from keys.crl import CaRevocations, CrlError, build_crl
from keys.tls import TlsFiles, create_ca, issue_certificate, load_certificate
from tests.conftest import write_passphrase
from tests.exchange_world import GATEWAY, UNIT
from tests.test_certificate_check import Site, _site

COMMISSIONER = "commissioner.220102.mzj"
API = GATEWAY + ".api"
NOW = dt.datetime.now(dt.UTC)
CHECK_S = 0.2
WAIT_S = 15.0


@dataclass
class Net:
    """A site whose certificate files are named by party (as 'hedui-keys ca issue' names them), a CA folder the
    ``hedui-keys ca`` commands work on, and a revocation list file for each service."""

    site: Site
    ca_dir: Path
    passphrase: Path

    @property
    def root(self) -> Path:
        return self.site.root

    def keys(self, *argv: str) -> None:
        assert keys_main(["--passphrase-file", str(self.passphrase), *argv]) == 0

    def renew(self, party: str) -> None:
        self.keys("ca", "renew", "--dir", str(self.ca_dir), "--party", party, "--out-dir", str(self.root))

    def serial(self, party: str) -> int:
        return load_certificate((self.root / f"{party}.crt").read_bytes()).serial_number

    def revoke(self, party: str) -> None:
        self.keys("ca", "revoke", "--dir", str(self.ca_dir), "--cert", str(self.root / f"{party}.crt"), "--reason",
                  "key_compromise")  # fmt: skip

    def crl(self, name: str = "crl.der", days: int = 7) -> Path:
        out = self.root / name
        self.keys("ca", "crl", "--dir", str(self.ca_dir), "--out", str(out), "--next-update-days", str(days))
        return out

    def client_tls(self, party: str = GATEWAY) -> ClientTls:
        return ClientTls.from_files(self.root / f"{party}.crt", self.root / f"{party}.key", self.root / "ca.crt")

    def client_source(self) -> CertificateSource:
        files = TlsFiles("client_tls", "client", GATEWAY, *self._files(GATEWAY))
        return CertificateSource(files, interval=CHECK_S)

    def _files(self, party: str) -> tuple[Path, Path, Path]:
        return self.root / f"{party}.crt", self.root / f"{party}.key", self.root / "ca.crt"


@pytest.fixture
def net(tmp_path: Path) -> Net:
    return make_net(tmp_path)


def make_net(tmp_path: Path) -> Net:
    """The site of the ``net`` fixture (tests/test_certificate_requests.py builds its own from it)."""
    site = _site(tmp_path)
    for name, party, server in (("api", API, True), ("gw", GATEWAY, False), ("tax", UNIT, True)):
        site.install(party, party, server=server)
        for config in (site.gateway_config, site.connector_config):
            text = config.read_text(encoding="utf-8").replace(f'"{name}.crt"', f'"{party}.crt"')
            config.write_text(text.replace(f'"{name}.key"', f'"{party}.key"'), encoding="utf-8")
    site.install(COMMISSIONER, COMMISSIONER, server=False)
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    (ca_dir / "ca.crt").write_bytes(site.ca_cert)
    (ca_dir / "ca.key").write_bytes(site.ca_key)
    (ca_dir / "ca.key").chmod(0o600)
    site.edit(site.connector_config, "[keys]", f"[tls]\ncheck_interval_seconds = {CHECK_S}\n\n[keys]")
    site.edit(
        site.gateway_config,
        "[keys]",
        f'[tls]\ncheck_interval_seconds = {CHECK_S}\ncrl_file = "gateway-crl.der"\nserver_check_seconds = 1\n\n'
        f'[[clients]]\nparty_id = "{COMMISSIONER}"\nrole = "commissioner"\n\n[keys]',
    )
    return Net(site, ca_dir, write_passphrase(tmp_path / "ca-passphrase", "any passphrase at all"))


@contextmanager
def connector(net: Net) -> Iterator[RunningConnector]:
    running = serve(ConnectorConfig.load(net.site.connector_config))
    try:
        yield running
    finally:
        running.stop(grace=1.0)


@contextmanager
def gateway(net: Net) -> Iterator[RunningGateway]:
    running = build(GatewayConfig.load(net.site.gateway_config))
    try:
        yield running
    finally:
        running.stop(grace=1.0)


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"not within {WAIT_S} s: {what}"
        time.sleep(0.05)


def served_serial(net: Net, port: int) -> int:
    der = fetch_server_certificate(f"localhost:{port}", net.client_tls(), 5.0)
    return x509.load_der_x509_certificate(der).serial_number


def exchange_call(client: UnitClient) -> str | None:
    """One ExchangeService call that passes the connector's gate (and is then refused as an envelope that does not
    open): the reason code the connector gave."""
    try:
        client.submit(b"not an envelope")
    except TransportFailure as failure:
        return failure.reason
    except Exception as refusal:  # UnitRefusal: the envelope was judged, so the caller was admitted
        return getattr(refusal, "reason", None)
    return None


class Traffic:
    """Threads calling the connector's health service over ``client`` until stopped; every failure is kept."""

    def __init__(self, client: UnitClient, threads: int = 3) -> None:
        self.client = client
        self.calls = 0
        self.failures: list[str] = []
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        deadline = time.monotonic() + 60  # bounded, whatever the test does
        while not self.stopping.is_set() and time.monotonic() < deadline:
            try:
                self.client.check_health()
                reason = exchange_call(self.client)
                if reason not in {"invalid_envelope", None}:
                    raise AssertionError(reason)
            except Exception as exc:
                with self.lock:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
            with self.lock:
                self.calls += 1

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=30)


# -- renewal under traffic -----------------------------------------------------------------------------------------


def test_renewed_certificates_are_used_without_restart_and_no_call_fails(net: Net) -> None:
    """The connector's server certificate and the gateway's client certificate are renewed with 'hedui-keys ca
    renew' while calls flow: no call fails, new handshakes show the connector's new serial, and the gateway's calls
    pass a connector that by then refuses the gateway's old certificate."""
    with connector(net) as running:
        port = running.port
        client = UnitClient(f"localhost:{port}", net.client_source(), 10.0)
        old_server = served_serial(net, port)
        assert old_server == net.serial(UNIT)
        with Traffic(client) as traffic:
            wait_for(lambda: traffic.calls >= 5, "calls flowing")
            net.renew(UNIT)
            assert net.serial(UNIT) != old_server
            wait_for(lambda: served_serial(net, port) == net.serial(UNIT), "the connector serving its new certificate")
            before = traffic.calls
            old_client, old_tls = net.serial(GATEWAY), net.client_tls()
            net.renew(GATEWAY)
            wait_for(lambda: client._generation == 2, "the gateway's client channel rebuilt")
            wait_for(lambda: traffic.calls >= before + 10, "calls after both renewals")
            # The gateway's old client certificate is revoked at the connector: the calls still pass.
            net.keys("ca", "revoke", "--dir", str(net.ca_dir), "--serial", f"{old_client:x}", "--reason", "superseded")
            crl = net.crl()
            assert connector_main(["tls", "install-crl", "--config", str(net.site.connector_config), str(crl)]) == 0
            revocations = running.revocations
            assert revocations is not None
            wait_for(lambda: revocations.held is not None, "the list held")
            assert exchange_call(client) == "invalid_envelope"  # admitted: the new certificate was presented
            settled = traffic.calls
            wait_for(lambda: traffic.calls >= settled + 10, "calls under the list")
        assert not traffic.failures, traffic.failures[:5]
        assert traffic.calls > 30
        metrics = running.connector.metrics
        assert metrics is not None
        value = metrics.registry.get_sample_value
        assert value("hedui_tls_certificate_reloads_total", {"role": "server", "outcome": "installed"}) == 1
        assert value("hedui_tls_certificate_reload_failing", {"role": "server"}) == 0
        assert value("hedui_tls_crl_number") == 1
        assert value("hedui_tls_revoked_peers_total", {"side": "client"}) == 0
        # A client still holding the old certificate is refused, with the reason, before its request is decoded.
        stale = UnitClient(f"localhost:{port}", old_tls, 5.0)
        assert exchange_call(stale) == "certificate_revoked"
        assert value("hedui_tls_revoked_peers_total", {"side": "client"}) == 1
        stale.check_health()  # health checking stays open to every TLS peer, as before
        client.close()
        stale.close()


# -- what is not installed -----------------------------------------------------------------------------------------


class Wall:
    """A wall clock the test moves (for SETTLE_SECONDS)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("damage", ["key of another certificate", "certificate cut short", "another CA"])
def test_a_half_written_or_mismatched_pair_is_never_installed(net: Net, damage: str) -> None:
    """Renewed files that fail a check are not installed: the running connector keeps presenting its certificate,
    the refusal counts only once the files have been still for SETTLE_SECONDS (a renewal between its two renames is
    just looked at again), and the gauge stays up until good files replace them."""
    with connector(net) as running:
        source = running.certificates
        assert source is not None and running.connector.metrics is not None
        wall = Wall()
        source.wall = wall
        serial = served_serial(net, running.port)
        cert, key = net.root / f"{UNIT}.crt", net.root / f"{UNIT}.key"
        if damage == "key of another certificate":
            other = issue_certificate(net.site.ca_cert, net.site.ca_key, UNIT, server_names=["localhost"], client=False,
                                      server=True)  # fmt: skip
            key.write_bytes(other[1])
        elif damage == "certificate cut short":
            cert.write_bytes(cert.read_bytes()[:300])
        else:
            ca, ca_key = create_ca("Another CA")
            other = issue_certificate(ca, ca_key, UNIT, server_names=["localhost"], client=False, server=True)
            cert.write_bytes(other[0])
            key.write_bytes(other[1])
        assert source.refresh(force=True) is False  # just written: looked at again later, nothing counted yet
        assert not source.failing
        wall.now += SETTLE_SECONDS + 1
        assert source.refresh(force=True) is False
        assert source.failing and source.identity.serial == serial
        value = running.connector.metrics.registry.get_sample_value
        assert value("hedui_tls_certificate_reload_failing", {"role": "server"}) == 1
        assert value("hedui_tls_certificate_reloads_total", {"role": "server", "outcome": "refused"}) == 1
        assert served_serial(net, running.port) == serial  # new handshakes still get the certificate in use
        net.site.install(UNIT, UNIT, server=True)  # good files
        wall.now += SETTLE_SECONDS + 1
        assert source.refresh(force=True) is True
        assert value("hedui_tls_certificate_reload_failing", {"role": "server"}) == 0
        assert served_serial(net, running.port) == net.serial(UNIT) != serial


# -- revocation ----------------------------------------------------------------------------------------------------


def _agency_call(net: Net, port: int, party: str) -> tuple[grpc.StatusCode, str]:
    credentials = grpc.ssl_channel_credentials(
        net.site.ca_cert, (net.root / f"{party}.key").read_bytes(), (net.root / f"{party}.crt").read_bytes()
    )
    with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
        stub = agency_pb2_grpc.AgencyServiceStub(channel)
        try:
            stub.GetCommission(agency_pb2.CommissionRef(commission_id="C-NONE"), timeout=10)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def test_the_agency_api_refuses_a_revoked_client_certificate(net: Net, capsys: pytest.CaptureFixture[str]) -> None:
    with gateway(net) as running:
        assert _agency_call(net, running.port, COMMISSIONER)[0] is not grpc.StatusCode.UNAUTHENTICATED
        net.revoke(COMMISSIONER)
        assert gateway_main(["tls", "install-crl", "--config", str(net.site.gateway_config), str(net.crl())]) == 0
        out = capsys.readouterr().out
        assert "installed CRL number 1" in out and "queued for 1 units" in out
        wait_for(lambda: _agency_call(net, running.port, COMMISSIONER)[0] is grpc.StatusCode.UNAUTHENTICATED, "refusal")
        assert _agency_call(net, running.port, COMMISSIONER)[1] == "client certificate is revoked"
        assert running.metrics is not None
        value = running.metrics.registry.get_sample_value
        assert (value("hedui_tls_revoked_peers_total", {"side": "client"}) or 0) >= 1
        assert value("hedui_tls_crl_number") == 1
        # Renewed, the commissioner is let in again.
        net.renew(COMMISSIONER)
        assert _agency_call(net, running.port, COMMISSIONER)[0] is not grpc.StatusCode.UNAUTHENTICATED


def test_a_revoked_connector_certificate_makes_the_unit_unreachable(net: Net) -> None:
    """The gateway checks the server certificate a unit presents against the list: revoked, every call fails with
    reason certificate_revoked without reaching the unit (not a silent success); renewed, the unit is back."""
    with connector(net) as running:
        crl_path = net.root / "gateway-crl.der"
        revocations = RevocationSource(crl_path, lambda: net.site.ca_cert, interval=CHECK_S)
        revoked: list[int] = []
        client = UnitClient(
            f"localhost:{running.port}",
            net.client_source(),
            5.0,
            revocations=revocations,
            on_revoked=lambda: revoked.append(1),
            recheck_seconds=0.5,
        )
        client.check_health()  # no list yet: nothing to check
        net.revoke(UNIT)
        assert revocations.install(net.crl().read_bytes()) is None
        for call in (client.check_health, lambda: client.submit(b"x")):
            with pytest.raises(TransportFailure) as failure:
                call()
            assert failure.value.reason == "certificate_revoked" and failure.value.status == "unavailable"
        assert revoked == [1]  # checked once, then believed until the recheck
        assert client.server_check is not None and client.server_check.serial == net.serial(UNIT)
        net.renew(UNIT)
        wait_for(lambda: served_serial(net, running.port) == net.serial(UNIT), "the renewed certificate served")
        time.sleep(0.6)
        client.check_health()
        assert exchange_call(client) == "invalid_envelope"
        client.close()


def test_the_engine_records_the_unit_unreachable_for_a_revoked_certificate(net: Net) -> None:
    """Through the gateway's own wiring ([tls] crl_file): the unit's cycle fails with the reason, and it is kept."""
    with connector(net) as unit:
        net.site.edit(net.site.gateway_config, 'endpoint = "127.0.0.1:', f'endpoint = "127.0.0.1:{unit.port}" #')
        net.revoke(UNIT)
        net.crl().rename(net.root / "gateway-crl.der")
        with gateway(net) as running:
            (row,) = running.store.units.all()
            report = running.engine.unit_cycle(row, dispatch=False)
            assert report.error == "unavailable"
            assert running.store.units.all()[0].last_error == "unavailable: certificate_revoked"
            assert running.metrics is not None
            assert running.metrics.registry.get_sample_value("hedui_tls_revoked_peers_total", {"side": "server"}) == 1


def test_both_services_cap_the_age_of_envelopes_at_their_lifetime(net: Net) -> None:
    """Security review 5, through the services' own wiring: their couriers take no envelope created longer ago than
    ``envelope_ttl_minutes`` plus the skew, whatever lifetime it claims (a retired key's backdated envelope; the
    refusal itself: test_envelope.py, test_a_retired_key_cannot_backdate_an_online_envelope_weeks_after_retirement).
    """
    with connector(net) as unit:
        net.site.edit(net.site.gateway_config, 'endpoint = "127.0.0.1:', f'endpoint = "127.0.0.1:{unit.port}" #')
        with gateway(net) as running:
            for courier, ttl in (
                (unit.connector.courier, ConnectorConfig.load(net.site.connector_config).exchange.envelope_ttl_minutes),
                (running.engine.courier, GatewayConfig.load(net.site.gateway_config).exchange.envelope_ttl_minutes),
            ):
                assert courier.policy.max_age_ms == ttl * MINUTE_MS


def _list(net: Net, *, number: int, revoked: CaRevocations | None = None, days_ago: int = 0, days: int = 7) -> bytes:
    return build_crl(
        net.site.ca_cert,
        net.site.ca_key,
        revoked or CaRevocations(),
        number=number,
        now=dt.datetime.now(dt.UTC) - dt.timedelta(days=days_ago),
        next_update_days=days,
    )


def test_an_older_list_does_not_replace_a_newer_one(net: Net, capsys: pytest.CaptureFixture[str]) -> None:
    path = net.root / "crl.der"
    source = RevocationSource(path, lambda: net.site.ca_cert, interval=0)
    refused: list[str] = []
    source.on_refused = refused.append
    handler = source.trust_item_handler()
    revoked = CaRevocations().revoke(net.serial(GATEWAY), "key_compromise", NOW)
    newer, older = _list(net, number=5, revoked=revoked), _list(net, number=4)
    assert handler(GATEWAY, newer, 0) is None
    assert handler(GATEWAY, newer, 0) is None  # held already: applied, nothing written again
    assert handler(GATEWAY, older, 0) == "crl_rollback"
    assert handler(GATEWAY, _list(net, number=5), 0) == "crl_number_reused"
    assert path.read_bytes() == newer and source.held is not None and source.held.number == 5
    assert source.revokes_pem((net.root / f"{GATEWAY}.crt").read_bytes())
    assert refused == ["crl_rollback", "crl_number_reused"]
    # Copied over the file by hand, the older list is refused by the running service too, and the newer one stays.
    path.write_bytes(older)
    source.refresh(force=True)
    assert source.held is not None and source.held.number == 5 and refused[-1] == "crl_rollback"
    # ... and by the gateway's install command, which changes nothing.
    net.site.edit(net.site.gateway_config, 'crl_file = "gateway-crl.der"', f'crl_file = "{path}"')
    path.write_bytes(newer)
    assert gateway_main(["tls", "install-crl", "--config", str(net.site.gateway_config), str(_write(net, older))]) == 1
    assert "older than the held number 5" in capsys.readouterr().err
    assert path.read_bytes() == newer


def _write(net: Net, data: bytes, name: str = "given.crl") -> Path:
    (net.root / name).write_bytes(data)
    return net.root / name


def test_a_list_not_signed_by_the_ca_is_refused(net: Net, capsys: pytest.CaptureFixture[str]) -> None:
    path = net.root / "crl.der"
    source = RevocationSource(path, lambda: net.site.ca_cert, interval=0)
    handler = source.trust_item_handler()
    impostor_cert, impostor_key = create_ca("Hedui test CA")  # the same name, another key
    stranger_cert, stranger_key = create_ca("Some other CA")
    for cert, key, code in ((impostor_cert, impostor_key, "crl_bad_signature"), (stranger_cert, stranger_key,
                                                                                "crl_wrong_issuer")):  # fmt: skip
        forged = build_crl(cert, key, CaRevocations(), number=99, now=dt.datetime.now(dt.UTC))
        assert handler(GATEWAY, forged, 0) == code
    assert handler(GATEWAY, b"\x30\x03\x02\x01\x00", 0) == "crl_unreadable"
    assert not path.exists() and source.held is None
    # A service whose file holds a forged list does not start (like a wrong certificate).
    net.site.edit(net.site.connector_config, "[tls]", f'[tls]\ncrl_file = "{path}"')
    path.write_bytes(build_crl(impostor_cert, impostor_key, CaRevocations(), number=1, now=dt.datetime.now(dt.UTC)))
    assert connector_main(["check-config", "--config", str(net.site.connector_config)]) == 1
    assert "signature does not verify" in capsys.readouterr().err


def test_an_overdue_list_stays_in_force_and_is_reported(net: Net, capsys: pytest.CaptureFixture[str]) -> None:
    revoked = CaRevocations().revoke(net.serial(GATEWAY), "key_compromise", NOW)
    net.site.edit(net.site.connector_config, "[tls]", '[tls]\ncrl_file = "unit-crl.der"')
    (net.root / "unit-crl.der").write_bytes(_list(net, number=1, revoked=revoked, days_ago=10, days=7))
    assert connector_main(["check-config", "--config", str(net.site.connector_config)]) == 0
    assert "past its next update" in capsys.readouterr().err
    with connector(net) as running:
        client = UnitClient(f"localhost:{running.port}", net.client_tls(), 5.0)
        assert exchange_call(client) == "certificate_revoked"  # still enforced
        assert running.connector.metrics is not None
        value = running.connector.metrics.registry.get_sample_value
        next_update = value("hedui_tls_crl_next_update_seconds")
        assert next_update is not None and -3.01 * 86_400 < next_update < -2.99 * 86_400
        age = value("hedui_tls_crl_age_seconds")
        assert age is not None and 9.99 * 86_400 < age < 10.01 * 86_400
        client.close()


def test_ca_revoke_and_crl_commands(net: Net, capsys: pytest.CaptureFixture[str]) -> None:
    net.revoke(UNIT)
    first = net.crl()
    assert keys_main(["--passphrase-file", str(net.passphrase), "ca", "revoke", "--dir", str(net.ca_dir), "--cert",
                      str(net.root / f"{UNIT}.crt"), "--reason", "superseded"]) == 1  # fmt: skip
    assert "revoked already" in capsys.readouterr().err
    other, other_key = create_ca("Some other CA")
    foreign = issue_certificate(other, other_key, UNIT, client=True, server=False)[0]
    assert keys_main(["ca", "revoke", "--dir", str(net.ca_dir), "--cert", str(_write(net, foreign, "f.crt")),
                      "--reason", "superseded"]) == 1  # fmt: skip
    assert "not issued by this CA" in capsys.readouterr().err
    second = net.crl("second.der")
    lists = [RevocationSource(p, lambda: net.site.ca_cert).held for p in (first, second)]
    assert [x.number if x else None for x in lists] == [1, 2]
    assert all(x is not None and x.serials == {net.serial(UNIT)} for x in lists)
    assert keys_main(["ca", "show", str(second)]) == 0
    assert f"revoked {net.serial(UNIT):x}" in capsys.readouterr().out


# -- security review 8: one list per CA, numbers remembered, fail closed ---------------------------------------------


@dataclass
class TwoCas:
    ca1: bytes
    key1: bytes
    ca2: bytes
    key2: bytes
    cert: bytes  # issued by CA 1
    serial: int


@pytest.fixture
def two_cas() -> TwoCas:
    now = dt.datetime.now(dt.UTC)
    ca1, key1 = create_ca("Hedui CA 2026", now=now - dt.timedelta(days=1))
    ca2, key2 = create_ca("Hedui CA 2027", now=now - dt.timedelta(days=1))
    cert, _ = issue_certificate(ca1, key1, GATEWAY, client=True, server=False, now=now - dt.timedelta(hours=1))
    return TwoCas(ca1, key1, ca2, key2, cert, x509.load_pem_x509_certificate(cert).serial_number)


def _ca_list(ca: bytes, key: bytes, number: int, revoked: CaRevocations | None = None, days_ago: int = 0) -> bytes:
    now = dt.datetime.now(dt.UTC) - dt.timedelta(days=days_ago)
    return build_crl(ca, key, revoked or CaRevocations(), number=number, now=now)


def test_each_ca_keeps_its_own_list(tmp_path: Path, two_cas: TwoCas) -> None:
    """With two CAs in the bundle (a CA renewal), CA 2's list does not displace CA 1's, and CA 1's older list is
    still a rollback."""
    c = two_cas
    path = tmp_path / "crl.der"
    source = RevocationSource(path, lambda: c.ca1 + c.ca2, interval=0)
    revoked = CaRevocations().revoke(c.serial, "key_compromise", dt.datetime.now(dt.UTC))
    assert source.install(_ca_list(c.ca1, c.key1, 2, revoked)) is None
    assert source.revokes_pem(c.cert)
    assert source.install(_ca_list(c.ca2, c.key2, 1)) is None
    assert source.revokes_pem(c.cert) and len(source.lists) == 2
    assert source.install(_ca_list(c.ca1, c.key1, 1, days_ago=3)) == "crl_rollback"
    assert source.revokes_pem(c.cert)
    # The file holds both lists; a restart enforces both.
    again = RevocationSource(path, lambda: c.ca1 + c.ca2, interval=0)
    assert again.revokes_pem(c.cert) and sorted(crl.number for crl in again.lists) == [1, 2]


def test_a_restart_neither_rolls_back_nor_forgets_the_list(tmp_path: Path, two_cas: TwoCas) -> None:
    """The highest number of each CA is remembered beside the file: an older list put in the file while the service
    was down is refused at start, and so is a missing file once a list was held (fail closed)."""
    c = two_cas
    path = tmp_path / "crl.der"
    revoked = CaRevocations().revoke(c.serial, "key_compromise", dt.datetime.now(dt.UTC))
    source = RevocationSource(path, lambda: c.ca1, interval=0)
    assert source.install(_ca_list(c.ca1, c.key1, 2, revoked)) is None
    newer = path.read_bytes()
    path.write_bytes(_ca_list(c.ca1, c.key1, 1, days_ago=3))
    with pytest.raises(CrlError) as excinfo:
        RevocationSource(path, lambda: c.ca1, interval=0)
    assert excinfo.value.code == "crl_rollback"
    path.unlink()
    with pytest.raises(CrlError) as excinfo:
        RevocationSource(path, lambda: c.ca1, interval=0)
    assert excinfo.value.code == "crl_missing"
    # A running service whose file disappears keeps enforcing the list it holds, and says so.
    path.write_bytes(newer)
    running = RevocationSource(path, lambda: c.ca1, interval=0)
    refused: list[str] = []
    running.on_refused = refused.append
    path.unlink()
    running.refresh(force=True)
    assert running.revokes_pem(c.cert) and refused == ["crl_missing"]
