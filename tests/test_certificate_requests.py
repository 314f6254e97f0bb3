"""Certificates renewed without carrying a private key: the unit makes its key and a request, the gateway keeps the
request, the agency's CA signs it, and the unit installs the certificate it is sent, while serving.

Real parts: the connector serving on loopback with its dynamic TLS credentials, the gateway built from its config
with its SQLite database, both command-line tools, and new TLS handshakes to see which certificate is served.
The first test lets SyncTrust carry both items between the running gateway and connector; the others take an item
from the sender's outgoing queue (its TrustItems table) and hand it to the receiver's registered handler, as the
syncer does, to look at each step and each refusal on its own.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hedui.v1 import trust_pb2
from sqlalchemy import func, select

from connectors.cli import main as connector_main
from connectors.server import RunningConnector
from connectors.trust.items import TrustItems as UnitItems
from connectors.trust.renewal import CertificateRenewal, certificate_requests
from gateway.archive.audit import AuditLog
from gateway.certificates.requests import CertificateRequests, IssueRefused, unit_policies
from gateway.cli import main as gateway_main
from gateway.db import schema
from gateway.db.database import open_database
from gateway.exchange.transport import fetch_server_certificate
from gateway.server import RunningGateway
from gateway.trust.items import TrustItems as GatewayItems
from keys.cli import main as keys_main
from keys.clock import SystemClock
from keys.csr import CertificateProfile, issue_for_request, make_request, parse_request
from keys.tls import PARTY_URI_PREFIX, TlsFiles, check_tls_files, create_ca
from tests.exchange_world import GATEWAY, UNIT
from tests.test_tls_reload import COMMISSIONER, Net, connector, gateway, make_net, served_serial, wait_for

REQUEST = trust_pb2.TRUST_ITEM_KIND_CERTIFICATE_REQUEST
CERTIFICATE = trust_pb2.TRUST_ITEM_KIND_CERTIFICATE
LAND = "unit.220100.land"


@pytest.fixture
def net(tmp_path: Path) -> Net:
    return make_net(tmp_path)


def now_ms() -> int:
    return SystemClock().now_ms()


def _listen_where_the_gateway_dials(net: Net) -> None:
    """The connector listens on the endpoint the gateway's [[units]] names (the gateway looks at its certificate)."""
    text = net.site.gateway_config.read_text(encoding="utf-8")
    match = re.search(r'endpoint = "127\.0\.0\.1:(\d+)"', text)
    assert match is not None
    net.site.edit(net.site.connector_config, 'listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{match.group(1)}"')


def _on_demand(net: Net) -> None:
    net.site.edit(net.site.connector_config, "[tls]\n", "[tls]\nrenew_before_days = 0\n")


@contextmanager
def unit_and_gateway(net: Net) -> Iterator[tuple[RunningConnector, RunningGateway]]:
    _listen_where_the_gateway_dials(net)
    _on_demand(net)
    with connector(net) as unit, gateway(net) as gw:
        yield unit, gw


def _request_renewal(net: Net, capsys: pytest.CaptureFixture[str]) -> str:
    assert connector_main(["tls", "request-renewal", "--config", str(net.site.connector_config)]) == 0
    return capsys.readouterr().out


def _sent(engine: object, peer: str, kind: int) -> list[bytes]:
    items = UnitItems(engine) if kind == REQUEST else GatewayItems(engine)  # type: ignore[arg-type]
    return [item.payload for item in items.pending(peer) if item.kind == kind]


def _gateway(net: Net, *argv: str) -> int:
    return gateway_main(["tls", argv[0], "--config", str(net.site.gateway_config), *argv[1:]])


def _ca_args(net: Net) -> list[str]:
    return ["--ca-dir", str(net.ca_dir), "--passphrase-file", str(net.passphrase)]


def _files_state(net: Net) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in net.root.iterdir() if p.suffix in {".crt", ".key", ".pending"}}


def test_a_unit_renews_its_certificate_through_trust_synchronisation(
    net: Net, capsys: pytest.CaptureFixture[str]
) -> None:
    """The whole flow over SyncTrust between the running gateway and connector: the request goes up with the unit's
    reply, the certificate comes down in the gateway's next call, each acknowledged as applied; new handshakes show
    the new serial, nothing restarted."""
    with unit_and_gateway(net) as (unit, gw):
        assert gw.trust is not None and gw.certificate_requests is not None
        old_serial = served_serial(net, unit.port)
        _request_renewal(net, capsys)
        # The gateway's own schedule may synchronise first (it runs in the background): either way, after a
        # synchronisation the request is held and acknowledged.
        for _ in range(20):
            report = gw.trust.syncer.sync(UNIT, trigger="test")
            if gw.certificate_requests.pending():
                break
            time.sleep(0.1)
        assert report.outcome == "ok", report
        [pending] = gw.certificate_requests.pending()
        assert pending.party_id == UNIT
        assert not _sent(unit.connector.store.engine, GATEWAY, REQUEST)  # acknowledged as applied: not re-sent
        assert gw.metrics is not None
        age = gw.metrics.registry.get_sample_value("hedui_certificate_request_age_seconds", {"unit": UNIT})
        assert age is not None and 0 <= age < 60
        assert _gateway(net, "sign-requests", *_ca_args(net)) == 0
        assert gw.metrics.registry.get_sample_value("hedui_certificate_request_age_seconds", {"unit": UNIT}) is None
        capsys.readouterr()
        [cert_der] = _sent(gw.store.engine, UNIT, CERTIFICATE)
        new_serial = x509.load_der_x509_certificate(cert_der).serial_number
        report = gw.trust.syncer.sync(UNIT, trigger="test")
        assert report.outcome == "ok", report
        wait_for(lambda: served_serial(net, unit.port) == new_serial, "new handshakes showing the new serial")
        assert new_serial != old_serial and net.serial(UNIT) == new_serial
        assert not _sent(gw.store.engine, UNIT, CERTIFICATE)  # the unit acknowledged it
        with gw.store.engine.connect() as conn:
            applied = conn.execute(
                select(schema.trust_deliveries.c.applied, schema.trust_deliveries.c.reason)
                .join(schema.trust_items, schema.trust_items.c.id == schema.trust_deliveries.c.item_id)
                .where(schema.trust_items.c.kind == CERTIFICATE)
            ).one()
        assert applied.applied and applied.reason is None
        # The next synchronisations still work: under the new certificate.
        assert gw.trust.syncer.sync(UNIT, trigger="test").outcome == "ok"


def test_a_unit_renews_its_certificate_over_the_wire_without_restart(
    net: Net, capsys: pytest.CaptureFixture[str]
) -> None:
    with unit_and_gateway(net) as (unit, gw):
        old_serial = served_serial(net, unit.port)
        out = _request_renewal(net, capsys)
        assert f"requested a certificate for {UNIT} (localhost, 127.0.0.1; serverAuth)" in out
        pending = net.root / f"{UNIT}.key.pending"
        assert stat.S_IMODE(pending.stat().st_mode) == 0o600
        [csr] = _sent(unit.connector.store.engine, GATEWAY, REQUEST)
        # Idempotent: while the request waits, asking again makes nothing new.
        assert "a request is outstanding" in _request_renewal(net, capsys)
        assert _sent(unit.connector.store.engine, GATEWAY, REQUEST) == [csr]
        assert unit.renewal is not None and gw.certificate_requests is not None

        # SyncTrust hands the item to the gateway's CERTIFICATE_REQUEST handler.
        assert gw.certificate_requests.handler()(UNIT, csr, now_ms()) is None
        assert gw.certificate_requests.handler()(UNIT, csr, now_ms()) is None  # the same again: held
        key = parse_request(csr).key_fingerprint
        assert _gateway(net, "requests") == 0
        listing = capsys.readouterr().out
        assert UNIT in listing and key in listing and "localhost, 127.0.0.1" in listing

        assert _gateway(net, "sign-requests", *_ca_args(net)) == 0
        assert f"{UNIT}: serial" in capsys.readouterr().out
        [cert_der] = _sent(gw.store.engine, UNIT, CERTIFICATE)
        new_serial = x509.load_der_x509_certificate(cert_der).serial_number
        assert _gateway(net, "requests") == 0 and "no certificate request is waiting" in capsys.readouterr().out

        # SyncTrust hands the certificate to the unit's CERTIFICATE handler: installed, served without a restart.
        assert unit.renewal.handler()(GATEWAY, cert_der, now_ms()) is None
        assert net.serial(UNIT) == new_serial != old_serial
        wait_for(lambda: served_serial(net, unit.port) == new_serial, "new handshakes showing the new serial")
        assert not pending.exists()
        assert stat.S_IMODE((net.root / f"{UNIT}.key").stat().st_mode) == 0o600
        assert unit.renewal.handler()(GATEWAY, cert_der, now_ms()) is None  # re-sent before its receipt: held
        assert unit.renewal.outstanding() is None
        assert connector_main(["tls", "renewal-status", "--config", str(net.site.connector_config)]) == 0
        status = capsys.readouterr().out
        assert f"serial {new_serial:x}" in status and "installed" in status and "no request outstanding" in status

        # What was audited on each side.
        with gw.store.engine.connect() as conn:
            actions = [r.action for r in conn.execute(select(schema.audit_log.c.action)).all()]
        assert "certificate.requested" in actions and "certificate.issued" in actions
        metrics = unit.connector.metrics
        assert metrics is not None
        assert metrics.registry.get_sample_value("hedui_connector_certificate_request_pending") == 0
        assert (
            metrics.registry.get_sample_value(
                "hedui_tls_certificate_reloads_total", {"role": "server", "outcome": "installed"}
            )
            == 1
        )

        _private_key_never_travelled(net, unit, gw)


def _private_key_never_travelled(net: Net, unit: RunningConnector, gw: RunningGateway) -> None:
    """The unit's new private key is in its key file and nowhere else: not in any trust item either side queued,
    not in any row or page of either database."""
    key = serialization.load_pem_private_key((net.root / f"{UNIT}.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    secrets = [
        key.private_numbers().private_value.to_bytes(32, "big"),
        key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    ]
    for engine in (unit.connector.store.engine, gw.store.engine):
        with engine.connect() as conn:
            payloads = [bytes(r[0]) for r in conn.execute(select(schema.trust_items.c.payload)).all()]
        assert payloads
        for payload in payloads:
            assert not any(secret in payload for secret in secrets)
    for path in net.root.iterdir():
        if ".db" in path.name:
            data = path.read_bytes()
            assert not any(secret in data for secret in secrets), path.name


def _unit_request(unit: RunningConnector) -> bytes:
    with unit.connector.store.engine.connect() as conn:
        return bytes(conn.execute(select(certificate_requests.c.csr)).scalar_one())


def _other_ca() -> tuple[bytes, bytes]:
    return create_ca("Not the network CA", now=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))


@pytest.mark.parametrize("case", ["other_key", "other_ca", "other_gateway", "other_names", "no_request"])
def test_a_certificate_the_unit_did_not_ask_for_changes_nothing(
    net: Net, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    _on_demand(net)
    with connector(net) as unit:
        assert unit.renewal is not None
        serial = served_serial(net, unit.port)
        sender = GATEWAY
        if case != "no_request":
            _request_renewal(net, capsys)
        request = (
            parse_request(_unit_request(unit))
            if case != "no_request"
            else make_request(CertificateProfile.of_certificate((net.root / f"{UNIT}.crt").read_bytes()))[0]
        )
        ca = (net.site.ca_cert, net.site.ca_key)
        if case == "other_key":
            request = make_request(request.profile)[0]
        elif case == "other_ca":
            ca = _other_ca()
        elif case == "other_gateway":
            sender = "agency.220000"
        elif case == "other_names":
            wider = CertificateProfile(UNIT, (*request.profile.names, "evil.example"), client=False, server=True)
            forged = make_request(wider)[0]
            request = type(request)(forged.der, wider, request.key_sha256, request.public_key)
        cert = issue_for_request(*ca, request).public_bytes(serialization.Encoding.DER)
        before = _files_state(net)
        with unit.connector.store.engine.connect() as conn:
            rows = conn.execute(select(certificate_requests)).all()
        reason = unit.renewal.handler()(sender, cert, now_ms())
        expected = {
            "other_key": "certificate_not_requested",
            "other_ca": "certificate_wrong_ca",
            "other_gateway": "certificate_not_requested",
            "other_names": "certificate_wrong_names",
            "no_request": "certificate_not_requested",
        }[case]
        assert reason == expected
        assert _files_state(net) == before
        with unit.connector.store.engine.connect() as conn:
            assert conn.execute(select(certificate_requests)).all() == rows
        assert served_serial(net, unit.port) == serial
        metrics = unit.connector.metrics
        assert metrics is not None
        assert (
            metrics.registry.get_sample_value("hedui_connector_certificates_refused_total", {"reason": expected}) == 1
        )


# -- the gateway's checks ------------------------------------------------------------------------------------------


@pytest.fixture
def requests_db(net: Net) -> Iterator[CertificateRequests]:
    engine = open_database(f"sqlite:///{net.root / 'requests.db'}", migrate=True)
    requests = CertificateRequests(engine)
    current = (net.root / f"{UNIT}.crt").read_bytes()
    requests.policy = unit_policies(
        [(UNIT, "127.0.0.1:50061", ("tax-gw.internal",))], requests, lambda party: current if party == UNIT else None
    )
    yield requests
    engine.dispose()


def _csr_with(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, party: str, names: list[x509.GeneralName]) -> bytes:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, party)]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(PARTY_URI_PREFIX + party), *names]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )


def _names(*hosts: str) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


@pytest.mark.parametrize(
    ("case", "sender", "reason"),
    [
        ("another_party", UNIT, "csr_wrong_party"),
        ("not_a_unit", LAND, "csr_wrong_party"),
        ("rsa_key", UNIT, "csr_wrong_key_type"),
        ("other_names", UNIT, "csr_names_changed"),
        ("current_key", UNIT, "csr_key_reused"),
        ("client_usage", UNIT, "csr_usage_changed"),
        ("garbage", UNIT, "csr_unreadable"),
    ],
)
def test_the_gateway_refuses_a_request_and_keeps_nothing(
    net: Net, requests_db: CertificateRequests, case: str, sender: str, reason: str
) -> None:
    p256 = ec.generate_private_key(ec.SECP256R1())
    same = _names("localhost", "127.0.0.1")
    if case == "another_party" or case == "not_a_unit":
        payload = _csr_with(p256, LAND, same)
    elif case == "rsa_key":
        payload = _csr_with(rsa.generate_private_key(65537, 2048), UNIT, same)
    elif case == "other_names":
        payload = _csr_with(p256, UNIT, _names("127.0.0.1", "evil.example"))
    elif case == "current_key":
        current_key = serialization.load_pem_private_key((net.root / f"{UNIT}.key").read_bytes(), None)
        assert isinstance(current_key, ec.EllipticCurvePrivateKey)
        payload = _csr_with(current_key, UNIT, same)
    elif case == "client_usage":
        profile = CertificateProfile(UNIT, ("localhost", "127.0.0.1"), client=True, server=True)
        payload = make_request(profile)[0].der
    else:
        payload = b"\x30\x03\x02\x01\x00"
    engine = requests_db.engine
    audit_before = AuditLog(engine).head()
    assert requests_db.handler()(sender, payload, now_ms()) == reason
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(schema.certificate_requests)).scalar_one() == 0
        assert conn.execute(select(func.count()).select_from(schema.trust_items)).scalar_one() == 0
    assert AuditLog(engine).head() == audit_before


def test_the_gateway_accepts_configured_names_and_a_newer_request_supersedes(requests_db: CertificateRequests) -> None:
    wider = make_request(CertificateProfile(UNIT, ("127.0.0.1", "tax-gw.internal"), client=False, server=True))[0]
    assert requests_db.handler()(UNIT, wider.der, now_ms()) is None
    newer = make_request(CertificateProfile(UNIT, ("localhost", "127.0.0.1"), client=False, server=True))[0]
    assert requests_db.handler()(UNIT, newer.der, now_ms()) is None
    [pending] = requests_db.pending()
    assert pending.key_sha256 == newer.key_sha256
    outside = make_request(CertificateProfile(UNIT, ("127.0.0.1", "other.internal"), client=False, server=True))[0]
    assert requests_db.handler()(UNIT, outside.der, now_ms()) == "csr_names_changed"


def test_a_ca_the_units_do_not_trust_signs_nothing(net: Net, requests_db: CertificateRequests) -> None:
    request = make_request(CertificateProfile.of_certificate((net.root / f"{UNIT}.crt").read_bytes()))[0]
    assert requests_db.handler()(UNIT, request.der, now_ms()) is None
    other_cert, other_key = _other_ca()
    with pytest.raises(IssueRefused, match="not the CA the units"):
        requests_db.sign(
            other_cert, other_key, passphrase=None, units_ca_pem=net.site.ca_cert, now_ms=now_ms(), operator="t"
        )
    assert len(requests_db.pending()) == 1
    with requests_db.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(schema.trust_items)).scalar_one() == 0


# -- a CA kept offline, and the gateway's own certificates ---------------------------------------------------------


def test_an_offline_ca_signs_exported_requests(net: Net, capsys: pytest.CaptureFixture[str]) -> None:
    with unit_and_gateway(net) as (unit, gw):
        assert unit.renewal is not None and gw.certificate_requests is not None
        _request_renewal(net, capsys)
        [csr] = _sent(unit.connector.store.engine, GATEWAY, REQUEST)
        assert gw.certificate_requests.handler()(UNIT, csr, now_ms()) is None
        carried = net.root / "carried"
        carried.mkdir()
        assert _gateway(net, "export-requests", str(carried)) == 0
        capsys.readouterr()
        [exported] = list(carried.iterdir())
        assert exported.suffix == ".csr" and b"PRIVATE" not in exported.read_bytes()
        # On the CA's machine: only public files came, only public files go back.
        net.keys("ca", "sign-requests", "--dir", str(net.ca_dir), "--in", str(carried))
        assert f"{UNIT}" in capsys.readouterr().out
        assert sorted(p.suffix for p in carried.iterdir()) == [".crt", ".csr"]
        (carried / "stray.crt").write_bytes(net.site.ca_cert)  # answers no request: left alone
        assert _gateway(net, "import-certificates", str(carried)) == 0
        out, err = capsys.readouterr()
        assert "took 1 certificate" in out and "stray.crt" in err
        [cert_der] = _sent(gw.store.engine, UNIT, CERTIFICATE)
        assert unit.renewal.handler()(GATEWAY, cert_der, now_ms()) is None
        new_serial = x509.load_der_x509_certificate(cert_der).serial_number
        wait_for(lambda: served_serial(net, unit.port) == new_serial, "the unit serving the certificate")
        assert _gateway(net, "import-certificates", str(carried)) == 0  # again: nothing pending, nothing taken
        assert "took 0 certificate" in capsys.readouterr().out


def _api_serial(net: Net, port: int) -> int:
    der = fetch_server_certificate(f"localhost:{port}", net.client_tls(COMMISSIONER), 5.0)
    return x509.load_der_x509_certificate(der).serial_number


def test_the_gateway_renews_its_own_certificates_in_place(net: Net, capsys: pytest.CaptureFixture[str]) -> None:
    with gateway(net) as gw:
        api = GATEWAY + ".api"
        old_api, old_client_key = _api_serial(net, gw.port), (net.root / f"{GATEWAY}.key").read_bytes()
        assert _gateway(net, "renew", *_ca_args(net)) == 0
        assert "renewed" in capsys.readouterr().out
        assert net.serial(api) != old_api
        assert (net.root / f"{GATEWAY}.key").read_bytes() != old_client_key
        wait_for(lambda: _api_serial(net, gw.port) == net.serial(api), "the API serving its renewed certificate")
        # A CA kept offline: requests out, certificates in; the new keys wait on this host meanwhile.
        carried = net.root / "carried"
        carried.mkdir()
        assert _gateway(net, "renew", "--export", str(carried), "--role", "server") == 0
        capsys.readouterr()
        pending = net.root / f"{api}.key.pending"
        assert stat.S_IMODE(pending.stat().st_mode) == 0o600
        assert all(b"PRIVATE" not in p.read_bytes() for p in carried.iterdir())
        net.keys("ca", "sign-requests", "--dir", str(net.ca_dir), "--in", str(carried))
        before = net.serial(api)
        assert _gateway(net, "import-certificates", str(carried)) == 0
        assert "installed 1 certificate(s) of the gateway's own" in capsys.readouterr().out
        assert net.serial(api) != before and not pending.exists()
        wait_for(lambda: _api_serial(net, gw.port) == net.serial(api), "the API serving the imported certificate")


def test_renewal_is_requested_by_itself_before_the_certificate_ends(net: Net) -> None:
    """A certificate ending in 20 days, inside the default renew_before_days (30): the running connector's periodic
    check asks for its successor by itself."""
    net.site.install(UNIT, UNIT, server=True, valid_days=20)
    net.site.edit(net.site.connector_config, "[tls]\n", "[tls]\nrenewal_check_seconds = 1\n")
    with connector(net) as unit:
        assert unit.renewal is not None
        wait_for(lambda: unit.renewal is not None and unit.renewal.outstanding() is not None, "a request made")
        assert len(_sent(unit.connector.store.engine, GATEWAY, REQUEST)) == 1
        metrics = unit.connector.metrics
        assert metrics is not None
        assert metrics.registry.get_sample_value("hedui_connector_certificate_request_pending") == 1
        assert unit.renewal.turn() is not None and len(_sent(unit.connector.store.engine, GATEWAY, REQUEST)) == 1
        # A lost pending key: the request can never be installed, so the next check makes a new one.
        (net.root / f"{UNIT}.key.pending").unlink()
        outcome = unit.renewal.turn()
        assert outcome is not None and outcome.new and outcome.replaced == "key_missing"
        assert len(_sent(unit.connector.store.engine, GATEWAY, REQUEST)) == 2


def test_a_request_that_waited_too_long_is_replaced(net: Net) -> None:
    _on_demand(net)
    with connector(net) as unit:
        renewal = unit.renewal
        assert renewal is not None
        first = renewal.request(now_ms())
        assert first.new and not renewal.request(now_ms()).new
        later = now_ms() + 8 * 86_400_000  # past renewal_timeout_days (7)
        second = renewal.request(later)
        assert second.new and second.replaced == "timeout"
        assert second.outstanding.key_sha256 != first.outstanding.key_sha256
        # The first request's certificate, should it come now, is refused: its key is gone.
        cert = issue_for_request(net.site.ca_cert, net.site.ca_key, parse_request(_stored_csr(renewal, 1)))
        assert renewal.handler()(GATEWAY, cert.public_bytes(serialization.Encoding.DER), later) == (
            "certificate_not_requested"
        )


def _stored_csr(renewal: CertificateRenewal, request_id: int) -> bytes:
    with renewal.engine.connect() as conn:
        row = conn.execute(select(certificate_requests.c.csr).where(certificate_requests.c.id == request_id)).one()
    return bytes(row.csr)


def test_a_first_certificate_is_requested_without_carrying_a_key(net: Net, capsys: pytest.CaptureFixture[str]) -> None:
    """Enrolment: the unit makes its key and request ('hedui-keys ca request'), only the request goes to the CA and
    only the certificate comes back; the pair passes the connector's own checks."""
    unit_host, carried = net.root / "unit-host", net.root / "carried"
    carried.mkdir()
    net.keys("ca", "request", "--party", UNIT, "--server", "--server-name", "localhost", "--server-name",
             "127.0.0.1", "--out-dir", str(unit_host))  # fmt: skip
    key = unit_host / f"{UNIT}.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    fingerprint = re.search(r"key fingerprint (\S+)", capsys.readouterr().out)
    assert fingerprint is not None
    (carried / f"{UNIT}.csr").write_bytes((unit_host / f"{UNIT}.csr").read_bytes())
    net.keys("ca", "sign-requests", "--dir", str(net.ca_dir), "--in", str(carried))
    assert fingerprint.group(1) in capsys.readouterr().out  # the CA operator compares it with the one read aloud
    assert sorted(p.name for p in carried.iterdir()) == [f"{UNIT}.crt", f"{UNIT}.csr"]
    identity = check_tls_files(TlsFiles("server", "server", UNIT, carried / f"{UNIT}.crt", key, net.root / "ca.crt"))
    assert CertificateProfile.of_certificate(identity.cert_pem).names == ("localhost", "127.0.0.1")
    # Asked again, the unit's key is never overwritten.
    assert keys_main(["ca", "request", "--party", UNIT, "--server", "--server-name", "localhost", "--out-dir",
                      str(unit_host)]) == 1  # fmt: skip
    assert key.read_bytes() == identity.key_pem
