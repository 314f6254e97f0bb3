"""The private CA for mutual TLS (keys/tls.py, ``hedui-keys ca``), checked with real gRPC handshakes on loopback.

A connector ("unit.220100.tax") serves the standard health service and a tiny ``Whoami`` method that answers with
the party id ``party_from_auth_context`` reads from the TLS peer; a gateway ("agency.220100") calls it. Handshakes
that must fail (no client certificate, another CA, expired, wrong key usage, wrong host name) fail with UNAVAILABLE.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from keys.cli import main
from keys.errors import KeystoreError
from keys.keystore import FAST_FOR_TESTS, open_document
from keys.tls import (
    PARTY_URI_PREFIX,
    TlsError,
    certificate_summary,
    create_ca,
    issue_certificate,
    load_certificate,
    party_from_auth_context,
    party_from_certificate,
    read_private_key,
)
from tests.conftest import write_passphrase

PASSPHRASE = "correct horse battery staple"
AGENCY = "agency.220100"
UNIT = "unit.220100.tax"
SERVER_NAMES = ["localhost", "127.0.0.1"]
WHOAMI = "/hedui.test.Whoami/Who"
CONTEXT_KEYS = "/hedui.test.Whoami/ContextKeys"
RPC_TIMEOUT_S = 10.0
NOW = dt.datetime.now(dt.UTC)
LONG_AGO = NOW - dt.timedelta(days=1000)


@dataclass(frozen=True)
class Credentials:
    cert: bytes
    key: bytes


@dataclass(frozen=True)
class Pki:
    ca: bytes
    ca_key: bytes
    server: Credentials
    client: Credentials

    def issue(
        self,
        party_id: str,
        *,
        client: bool,
        server: bool,
        server_names: Sequence[str] = (),
        valid_days: int = 397,
        now: dt.datetime | None = None,
    ) -> Credentials:
        cert, key = issue_certificate(
            self.ca,
            self.ca_key,
            party_id,
            server_names=server_names,
            client=client,
            server=server,
            valid_days=valid_days,
            now=now,
            ca_key_passphrase=PASSPHRASE,
        )
        return Credentials(cert, key)


def _make_pki(name: str, *, now: dt.datetime | None = None) -> Pki:
    ca, ca_key = create_ca(name, now=now, passphrase=PASSPHRASE, kdf=FAST_FOR_TESTS)
    server = issue_certificate(
        ca, ca_key, UNIT, server_names=SERVER_NAMES, client=False, server=True, ca_key_passphrase=PASSPHRASE
    )
    client = issue_certificate(ca, ca_key, AGENCY, client=True, server=False, ca_key_passphrase=PASSPHRASE)
    return Pki(ca, ca_key, Credentials(*server), Credentials(*client))


@pytest.fixture(scope="module")
def pki() -> Pki:
    # Created "long ago" so that certificates issued in the past (the expiry tests) still lie within its validity.
    return _make_pki("Hedui test CA", now=LONG_AGO)


@pytest.fixture(scope="module")
def other_pki() -> Pki:
    return _make_pki("Some other CA")


def _whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
    return (party_from_auth_context(context.auth_context()) or "").encode()


def _context_keys(request: bytes, context: grpc.ServicerContext) -> bytes:
    return ",".join(sorted(context.auth_context())).encode()


@contextmanager
def serving(server_creds: Credentials, ca: bytes) -> Iterator[int]:
    """A connector on a free loopback port that requires a client certificate issued by ``ca``."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    handlers = {
        "Who": grpc.unary_unary_rpc_method_handler(_whoami, request_deserializer=None, response_serializer=None),
        "ContextKeys": grpc.unary_unary_rpc_method_handler(_context_keys),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("hedui.test.Whoami", handlers)])
    credentials = grpc.ssl_server_credentials(
        [(server_creds.key, server_creds.cert)], root_certificates=ca, require_client_auth=True
    )
    port = server.add_secure_port("localhost:0", credentials)
    assert port > 0
    server.start()
    try:
        yield port
    finally:
        server.stop(None)


@pytest.fixture(scope="module")
def port(pki: Pki) -> Iterator[int]:
    with serving(pki.server, pki.ca) as bound:
        yield bound


def _call(port: int, ca: bytes, client: Credentials | None, method: str = WHOAMI) -> str:
    credentials = (
        grpc.ssl_channel_credentials(ca)
        if client is None
        else grpc.ssl_channel_credentials(ca, private_key=client.key, certificate_chain=client.cert)
    )
    with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
        reply = channel.unary_unary(method, None, None)(b"", timeout=RPC_TIMEOUT_S)
    assert isinstance(reply, bytes)
    return reply.decode()


def _refused(port: int, ca: bytes, client: Credentials | None) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _call(port, ca, client)
    assert isinstance(caught.value, grpc.Call)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


# --- mutual TLS over gRPC ---------------------------------------------------------------------------------------------


def test_mutual_tls_binds_the_peer_to_its_party_id(pki: Pki, port: int) -> None:
    assert _call(port, pki.ca, pki.client) == AGENCY


def test_health_service_answers_over_mutual_tls(pki: Pki, port: int) -> None:
    credentials = grpc.ssl_channel_credentials(pki.ca, private_key=pki.client.key, certificate_chain=pki.client.cert)
    with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_S)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_auth_context_carries_the_peer_certificate(pki: Pki, port: int) -> None:
    # What party_from_auth_context relies on; grpcio 1.85 also gives x509_subject, peer_uri, ssl_tls_version...
    keys = set(_call(port, pki.ca, pki.client, CONTEXT_KEYS).split(","))
    assert {"transport_security_type", "x509_pem_cert", "x509_common_name", "x509_subject_alternative_name"} <= keys


def test_client_without_certificate_is_refused(pki: Pki, port: int) -> None:
    _refused(port, pki.ca, None)


def test_client_certificate_from_another_ca_is_refused(pki: Pki, other_pki: Pki, port: int) -> None:
    _refused(port, pki.ca, other_pki.client)


def test_server_certificate_from_another_ca_is_refused(pki: Pki, other_pki: Pki) -> None:
    with serving(other_pki.server, pki.ca) as bound:
        _refused(bound, pki.ca, pki.client)


def test_expired_client_certificate_is_refused(pki: Pki, port: int) -> None:
    expired = pki.issue(AGENCY, client=True, server=False, valid_days=30, now=NOW - dt.timedelta(days=60))
    assert load_certificate(expired.cert).not_valid_after_utc < NOW
    _refused(port, pki.ca, expired)


def test_expired_server_certificate_is_refused(pki: Pki) -> None:
    expired = pki.issue(UNIT, server_names=SERVER_NAMES, client=False, server=True, valid_days=1, now=LONG_AGO)
    with serving(expired, pki.ca) as bound:
        _refused(bound, pki.ca, pki.client)


def test_server_only_certificate_cannot_authenticate_a_client(pki: Pki, port: int) -> None:
    _refused(port, pki.ca, pki.issue(AGENCY, server_names=["localhost"], client=False, server=True))


def test_server_certificate_must_name_the_host_the_client_dials(pki: Pki) -> None:
    elsewhere = pki.issue(UNIT, server_names=["tax.example.internal"], client=False, server=True)
    with serving(elsewhere, pki.ca) as bound:
        _refused(bound, pki.ca, pki.client)


# --- certificates -----------------------------------------------------------------------------------------------------


def test_party_from_certificate_reads_pem_and_der(pki: Pki) -> None:
    assert party_from_certificate(pki.client.cert) == AGENCY
    assert party_from_certificate(load_certificate(pki.server.cert).public_bytes(serialization.Encoding.DER)) == UNIT
    assert party_from_certificate(pki.ca) is None
    with pytest.raises(TlsError):
        party_from_certificate(b"not a certificate")


def test_leaf_certificate_contents(pki: Pki) -> None:
    cert = load_certificate(pki.server.cert)
    ca = load_certificate(pki.ca)
    cert.verify_directly_issued_by(ca)
    assert cert.subject.rfc4514_string() == f"CN={UNIT}"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [PARTY_URI_PREFIX + UNIT]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    ca_constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert ca_constraints.ca and ca_constraints.path_length == 0
    ca_usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ca_usage.key_cert_sign and ca_usage.crl_sign and not ca_usage.digital_signature


def test_leaf_never_outlives_its_ca() -> None:
    ca, ca_key = create_ca("Short CA", valid_days=30)
    cert, _ = issue_certificate(ca, ca_key, AGENCY, client=True, server=False, valid_days=397)
    assert load_certificate(cert).not_valid_after_utc == load_certificate(ca).not_valid_after_utc


def test_ca_key_is_sealed_like_a_keystore_and_leaf_key_is_not(pki: Pki) -> None:
    """Argon2id and XChaCha20-Poly1305 (keys/keystore.py), not PKCS#8's 2,048 PBKDF2 rounds; no PEM inside shows."""
    sealed = json.loads(pki.ca_key)
    assert sealed["format"] == "hedui-ca-key"
    assert (sealed["kdf"]["name"], sealed["aead"]) == ("argon2id", "xchacha20poly1305")
    assert b"PRIVATE KEY" not in pki.ca_key
    with pytest.raises(TlsError, match="wrong passphrase or damaged file"):
        issue_certificate(pki.ca, pki.ca_key, AGENCY, client=True, server=False, ca_key_passphrase="wrong")
    with pytest.raises(TlsError, match="a passphrase is needed"):
        issue_certificate(pki.ca, pki.ca_key, AGENCY, client=True, server=False)
    assert isinstance(serialization.load_pem_private_key(pki.client.key, None), ec.EllipticCurvePrivateKey)


def test_a_ca_key_in_encrypted_pkcs8_from_an_earlier_version_still_issues(pki: Pki) -> None:
    sealed = json.loads(pki.ca_key)
    key = serialization.load_pem_private_key(
        open_document(pki.ca_key, sealed["format"], PASSPHRASE, name="ca.key")[1], None
    )
    legacy = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(PASSPHRASE.encode()),
    )
    cert, _ = issue_certificate(pki.ca, legacy, AGENCY, client=True, server=False, ca_key_passphrase=PASSPHRASE)
    assert party_from_certificate(cert) == AGENCY


@pytest.mark.parametrize(
    ("party_id", "kwargs", "message"),
    [
        ("Agency.220100", {"client": True, "server": False}, "party id"),
        (AGENCY, {"client": False, "server": False}, "client, a server or both"),
        (UNIT, {"client": False, "server": True}, "at least one server name"),
        (UNIT, {"client": False, "server": True, "server_names": ["*.example"]}, "neither an IP address"),
        (AGENCY, {"client": True, "server": False, "valid_days": 0}, "at least 1"),
        (AGENCY, {"client": True, "server": False, "now": dt.datetime(2026, 1, 1)}, "timezone-aware"),
        (AGENCY, {"client": True, "server": False, "now": LONG_AGO - dt.timedelta(days=1)}, "not valid at"),
    ],
)
def test_issue_refuses_bad_requests(pki: Pki, party_id: str, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(TlsError, match=message):
        issue_certificate(pki.ca, pki.ca_key, party_id, ca_key_passphrase=PASSPHRASE, **kwargs)


def test_issue_needs_the_right_ca_passphrase(pki: Pki) -> None:
    with pytest.raises(TlsError, match="passphrase is needed"):
        issue_certificate(pki.ca, pki.ca_key, AGENCY, client=True, server=False)
    with pytest.raises(TlsError, match="wrong passphrase"):
        issue_certificate(pki.ca, pki.ca_key, AGENCY, client=True, server=False, ca_key_passphrase="wrong one!!!!")


def test_issue_refuses_a_key_of_another_ca(pki: Pki, other_pki: Pki) -> None:
    with pytest.raises(TlsError, match="does not belong"):
        issue_certificate(pki.ca, other_pki.ca_key, AGENCY, client=True, server=False, ca_key_passphrase=PASSPHRASE)


def _self_signed(common_name: str, uris: list[str]) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW)
        .not_valid_after(NOW + dt.timedelta(days=1))
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=False
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_party_from_certificate_fails_closed_on_ambiguity() -> None:
    assert party_from_certificate(_self_signed(AGENCY, [])) == AGENCY  # common name alone, as a fallback
    assert party_from_certificate(_self_signed("Some Person", [])) is None
    assert party_from_certificate(_self_signed(UNIT, [PARTY_URI_PREFIX + AGENCY])) is None
    both = [PARTY_URI_PREFIX + AGENCY, PARTY_URI_PREFIX + UNIT]
    assert party_from_certificate(_self_signed(AGENCY, both)) is None
    assert party_from_certificate(_self_signed("x", [PARTY_URI_PREFIX + "Not/A/Party"])) is None


def test_party_from_auth_context(pki: Pki) -> None:
    pem = pki.client.cert
    assert party_from_auth_context({"x509_pem_cert": [pem], "x509_common_name": [b"someone.else"]}) == AGENCY
    assert party_from_auth_context({"x509_pem_cert": pem}) == AGENCY  # a bare bytes value, as grpc-stubs types it
    assert party_from_auth_context({"x509_common_name": [AGENCY.encode()]}) == AGENCY
    assert party_from_auth_context({"x509_common_name": [b"Not A Party"]}) is None
    assert party_from_auth_context({"x509_pem_cert": [b"garbage"], "x509_common_name": [AGENCY.encode()]}) is None
    assert party_from_auth_context({"x509_pem_cert": [pem, pki.server.cert]}) is None
    assert party_from_auth_context({}) is None
    assert party_from_auth_context({"transport_security_type": [b"insecure"]}) is None


def test_certificate_summary(pki: Pki) -> None:
    # Regression: NOW is taken at import, which in a long suite can be more than the certificate's 5-minute
    # back-dating before the fixture issued it; the summary is read at the present moment.
    now = dt.datetime.now(dt.UTC)
    text = certificate_summary(pki.server.cert, now=now)
    der = load_certificate(pki.server.cert).public_bytes(serialization.Encoding.DER)
    digest = hashlib.sha256(der).hexdigest().upper()
    assert f"party       {UNIT}" in text
    assert f"URI:{PARTY_URI_PREFIX}{UNIT}, DNS:localhost, IP:127.0.0.1" in text
    assert "serverAuth" in text and "valid, " in text
    assert ":".join(digest[i : i + 2] for i in range(0, 64, 2)) in text
    assert "EXPIRED" in certificate_summary(pki.server.cert, now=now + dt.timedelta(days=400))


# --- hedui-keys ca ----------------------------------------------------------------------------------------------------


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A passphrase file; no keystore anywhere (the ca commands must not need one)."""
    monkeypatch.delenv("HEDUI_KEYSTORE", raising=False)
    monkeypatch.delenv("HEDUI_KEYS_PASSPHRASE", raising=False)
    return write_passphrase(tmp_path / "passphrase", PASSPHRASE)


def _ca(passfile: Path, *args: str) -> int:
    return main(["--passphrase-file", str(passfile), "ca", *args])


def test_cli_round_trip_and_real_handshake(cli: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca_dir, unit_dir, agency_dir = tmp_path / "ca", tmp_path / "unit", tmp_path / "agency"
    assert _ca(cli, "init", "--dir", str(ca_dir), "--name", "Jilin Hedui CA") == 0
    assert (ca_dir / "ca.key").stat().st_mode & 0o777 == 0o600
    assert json.loads((ca_dir / "ca.key").read_bytes())["format"] == "hedui-ca-key"
    server_args = ["--server-name", "localhost", "--server-name", "127.0.0.1", "--server"]
    assert _ca(cli, "issue", "--dir", str(ca_dir), "--party", UNIT, *server_args, "--out-dir", str(unit_dir)) == 0
    assert _ca(cli, "issue", "--dir", str(ca_dir), "--party", AGENCY, "--client", "--out-dir", str(agency_dir)) == 0
    for out, party in ((unit_dir, UNIT), (agency_dir, AGENCY)):
        assert sorted(p.name for p in out.iterdir()) == sorted(["ca.crt", f"{party}.crt", f"{party}.key"])
        assert (out / f"{party}.key").stat().st_mode & 0o777 == 0o600
        assert (out / "ca.crt").read_bytes() == (ca_dir / "ca.crt").read_bytes()
        assert party_from_certificate((out / f"{party}.crt").read_bytes()) == party
    capsys.readouterr()
    assert main(["ca", "show", str(agency_dir / f"{AGENCY}.crt")]) == 0
    shown = capsys.readouterr().out
    assert f"party       {AGENCY}" in shown and "clientAuth" in shown and "SHA-256" in shown

    unit = Credentials((unit_dir / f"{UNIT}.crt").read_bytes(), (unit_dir / f"{UNIT}.key").read_bytes())
    agency = Credentials((agency_dir / f"{AGENCY}.crt").read_bytes(), (agency_dir / f"{AGENCY}.key").read_bytes())
    with serving(unit, (unit_dir / "ca.crt").read_bytes()) as bound:
        assert _call(bound, (agency_dir / "ca.crt").read_bytes(), agency) == AGENCY


def test_cli_refuses_to_overwrite_a_ca(cli: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca_dir = tmp_path / "ca"
    assert _ca(cli, "init", "--dir", str(ca_dir)) == 0
    before = {p.name: p.read_bytes() for p in ca_dir.iterdir()}
    capsys.readouterr()
    assert _ca(cli, "init", "--dir", str(ca_dir)) == 1
    err = capsys.readouterr().err
    assert "never overwritten" in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in ca_dir.iterdir()} == before


def test_cli_issue_failures_change_nothing(cli: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca_dir, out = tmp_path / "ca", tmp_path / "out"
    assert _ca(cli, "init", "--dir", str(ca_dir)) == 0
    wrong = write_passphrase(tmp_path / "wrong", "not the passphrase")
    issue = ["issue", "--dir", str(ca_dir), "--party", AGENCY, "--client", "--out-dir", str(out)]
    capsys.readouterr()
    assert _ca(wrong, *issue) == 1
    assert "wrong passphrase" in capsys.readouterr().err
    assert _ca(cli, "issue", "--dir", str(ca_dir), "--party", UNIT, "--server", "--out-dir", str(out)) == 1
    assert "server name" in capsys.readouterr().err
    assert _ca(cli, "issue", "--dir", str(ca_dir), "--party", AGENCY, "--out-dir", str(out)) == 1
    assert "--client" in capsys.readouterr().err
    assert not out.exists()
    assert _ca(cli, *issue) == 0
    first = (out / f"{AGENCY}.crt").read_bytes()
    assert _ca(cli, *issue) == 1
    assert "exists" in capsys.readouterr().err
    assert (out / f"{AGENCY}.crt").read_bytes() == first


def test_cli_refuses_a_ca_key_readable_by_others(cli: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca_dir = tmp_path / "ca"
    assert _ca(cli, "init", "--dir", str(ca_dir)) == 0
    (ca_dir / "ca.key").chmod(0o644)
    capsys.readouterr()
    assert _ca(cli, "issue", "--dir", str(ca_dir), "--party", AGENCY, "--client", "--out-dir", str(tmp_path)) == 1
    assert "chmod 600" in capsys.readouterr().err


def test_cli_show_refuses_a_non_certificate(cli: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.crt"
    junk.write_bytes(b"hello")
    assert main(["ca", "show", str(junk)]) == 1
    assert "not an X.509 certificate" in capsys.readouterr().err


def test_tls_private_key_file_others_can_read_is_refused_before_use(pki: Pki, tmp_path: Path) -> None:
    _, key = issue_certificate(pki.ca, pki.ca_key, AGENCY, client=True, server=False, ca_key_passphrase=PASSPHRASE)
    path = tmp_path / "agency.key"
    path.write_bytes(key)
    path.chmod(0o600)
    assert read_private_key(path) == key
    path.chmod(0o640)
    with pytest.raises(KeystoreError, match="chmod 600") as caught:
        read_private_key(path)
    assert "PRIVATE KEY" not in str(caught.value)
    with pytest.raises(KeystoreError, match="no TLS private key"):
        read_private_key(tmp_path / "absent.key")
