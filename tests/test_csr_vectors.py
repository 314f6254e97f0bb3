"""Certificate request vectors (tests/vectors/certificate_requests_v1.json, docs/exchange.md "Certificate requests
(trust item kinds 4 and 5)"): the committed file is exactly what tests/vectorgen_csr.py builds from the
specification; the request passes keys/csr.py and the gateway's policy, the certificate passes the unit's check, and
every refused vector is refused with exactly its reason code. keys/csr.py's own requests have the vectors' form."""

from __future__ import annotations

import datetime as dt
import functools
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from gateway.certificates.requests import CertificateRequests, unit_policies
from gateway.db.database import open_database
from keys.csr import CertificateProfile, CertificateRequestError, check_issued, make_request, parse_request
from tests import vectorgen_csr

ROOT = Path(__file__).resolve().parent.parent
VECTOR_FILE = ROOT / "tests" / "vectors" / "certificate_requests_v1.json"


@functools.cache
def load() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(VECTOR_FILE.read_text(encoding="utf-8"))
    return document


def _at() -> dt.datetime:
    return dt.datetime.fromtimestamp(load()["check_at_ms"] / 1000, dt.UTC)


def test_the_committed_vectors_are_what_the_generator_builds() -> None:
    expected = vectorgen_csr.render(vectorgen_csr.build_vectors()).encode()
    assert VECTOR_FILE.read_bytes() == expected, (
        "tests/vectors/certificate_requests_v1.json is not what tests/vectorgen_csr.py builds: regenerate with "
        "python scripts/make_vectors.py"
    )


def _expected_profile() -> CertificateProfile:
    request = load()["request"]
    return CertificateProfile(request["party"], tuple(request["names"]), False, request["usages"] == "serverAuth")


def test_the_request_parses_to_its_party_names_usage_and_key() -> None:
    vector = load()["request"]
    parsed = parse_request(bytes.fromhex(vector["der"]))
    assert parsed.profile == _expected_profile()
    assert parsed.key_sha256.hex() == vector["key_sha256"]


@pytest.fixture
def requests(tmp_path: Path) -> Any:
    engine = open_database(f"sqlite:///{tmp_path / 'gateway.db'}", migrate=True)
    held = CertificateRequests(engine)
    policy = load()["gateway_policy"]
    current = bytes.fromhex(policy["current_certificate_der"])
    held.policy = unit_policies(
        [(load()["unit"], policy["endpoint"], tuple(policy["server_names"]))], held, lambda party: current
    )
    yield held
    engine.dispose()


def test_the_gateway_keeps_the_request_and_refuses_each_refused_one(requests: CertificateRequests) -> None:
    at = load()["check_at_ms"]
    for vector in load()["refused_requests"]:
        assert requests.handler()(vector["sender"], bytes.fromhex(vector["der"]), at) == vector["code"], vector["name"]
    assert requests.pending() == []
    assert requests.handler()(load()["unit"], bytes.fromhex(load()["request"]["der"]), at) is None
    [pending] = requests.pending()
    assert pending.key_sha256.hex() == load()["request"]["key_sha256"]


def test_the_certificate_answers_the_request_and_each_refused_one_is_refused() -> None:
    document = load()
    key = bytes.fromhex(document["request"]["key_sha256"])
    ca_pem = document["ca_certificate_pem"].encode()
    cert = check_issued(
        bytes.fromhex(document["certificate"]["der"]),
        ca_pem=ca_pem,
        pending_key_sha256=key,
        expected=_expected_profile(),
        now=_at(),
    )
    assert format(cert.serial_number, "x") == document["certificate"]["serial"]
    for vector in document["refused_certificates"]:
        with pytest.raises(CertificateRequestError) as refused:
            check_issued(
                bytes.fromhex(vector["der"]), ca_pem=ca_pem, pending_key_sha256=key, expected=_expected_profile(),
                now=_at(),
            )  # fmt: skip
        assert refused.value.code == vector["code"], vector["name"]


def _form(der: bytes) -> list[tuple[str, bool]]:
    csr = x509.load_der_x509_csr(der)
    return [(ext.oid.dotted_string, ext.critical) for ext in csr.extensions]


def test_keys_csr_makes_requests_of_the_vectors_form() -> None:
    vector = bytes.fromhex(load()["request"]["der"])
    made, _ = make_request(_expected_profile())
    assert _form(made.der) == _form(vector)
    ours, theirs = x509.load_der_x509_csr(made.der), x509.load_der_x509_csr(vector)
    assert ours.subject == theirs.subject
    for extension in theirs.extensions:
        assert ours.extensions.get_extension_for_oid(extension.oid).value == extension.value
