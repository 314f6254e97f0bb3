"""keys/csr.py: a party's certificate request (its own P-256 key, its party, names and usages), the checks anyone
makes of one, the CA's certificate for it, and the checks the party makes of that certificate before installing it.
Every refusal is a CertificateRequestError with its reason code; malformed bytes never raise anything else."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keys.csr import (
    CertificateProfile,
    CertificateRequestError,
    check_issued,
    issue_for_request,
    key_sha256,
    make_request,
    parse_request,
)
from keys.tls import PARTY_URI_PREFIX, create_ca, issue_certificate, load_certificate

UNIT = "unit.220100.tax"
LAND = "unit.220100.land"
NOW = dt.datetime.now(dt.UTC)
CA = create_ca("Hedui test CA", now=NOW - dt.timedelta(days=30))
OTHER_CA = create_ca("Another CA", now=NOW - dt.timedelta(days=30))
PROFILE = CertificateProfile(UNIT, ("localhost", "127.0.0.1"), client=False, server=True)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _csr(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    *,
    cn: str = UNIT,
    uris: tuple[str, ...] = (PARTY_URI_PREFIX + UNIT,),
    names: tuple[x509.GeneralName, ...] = (x509.DNSName("localhost"),),
    usages: tuple[x509.ObjectIdentifier, ...] | None = (ExtendedKeyUsageOID.SERVER_AUTH,),
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    builder = builder.add_extension(
        x509.SubjectAlternativeName([*(x509.UniformResourceIdentifier(u) for u in uris), *names]), critical=False
    )
    if usages is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def test_a_request_names_what_the_current_certificate_names_with_a_new_key() -> None:
    current, current_key = issue_certificate(
        *CA, UNIT, server_names=["LocalHost", "127.0.0.1"], client=False, server=True, now=NOW
    )
    profile = CertificateProfile.of_certificate(current)
    assert profile == CertificateProfile(UNIT, ("localhost", "127.0.0.1"), client=False, server=True)
    request, key_pem = make_request(profile)
    assert request.profile == profile
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    assert request.key_sha256 == key_sha256(key.public_key())
    old_key = serialization.load_pem_private_key(current_key, None)
    assert isinstance(old_key, ec.EllipticCurvePrivateKey)
    assert request.key_sha256 != key_sha256(old_key.public_key())
    assert key_pem not in request.der and b"PRIVATE" not in request.der
    assert parse_request(request.der) == request
    assert request.pem().startswith(b"-----BEGIN CERTIFICATE REQUEST-----")


def test_the_ca_issues_for_the_request_and_the_party_accepts_it() -> None:
    request, _ = make_request(PROFILE)
    cert = issue_for_request(*CA, request, now=NOW)
    assert cert.subject.rfc4514_string() == f"CN={UNIT}"
    assert key_sha256(cert.public_key()) == request.key_sha256  # type: ignore[arg-type]
    checked = check_issued(_der(cert), ca_pem=CA[0], pending_key_sha256=request.key_sha256, expected=PROFILE, now=NOW)
    assert checked.serial_number == cert.serial_number
    assert CertificateProfile.of_certificate(_der(cert)) == PROFILE
    # PEM is read too
    pem = cert.public_bytes(serialization.Encoding.PEM)
    check_issued(pem, ca_pem=CA[0], pending_key_sha256=request.key_sha256, expected=PROFILE, now=NOW)


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda: b"", "csr_unreadable"),
        (lambda: b"\x30\x03\x02\x01\x00", "csr_unreadable"),
        (lambda: b"x" * 20_000, "csr_unreadable"),
        (lambda: _csr(rsa.generate_private_key(65537, 2048)), "csr_wrong_key_type"),
        (lambda: _csr(ec.generate_private_key(ec.SECP384R1())), "csr_wrong_key_type"),
        (lambda: _csr(_p256(), cn="unit.220100.land", uris=(PARTY_URI_PREFIX + UNIT,)), "csr_wrong_party"),
        (lambda: _csr(_p256(), uris=()), "csr_wrong_party"),
        (
            lambda: _csr(_p256(), uris=(PARTY_URI_PREFIX + UNIT, PARTY_URI_PREFIX + "unit.220100.land")),
            "csr_wrong_party",
        ),
        (lambda: _csr(_p256(), cn="not a party"), "csr_wrong_party"),
        (lambda: _csr(_p256(), names=(x509.DNSName("*.internal"),)), "csr_bad_names"),
        (lambda: _csr(_p256(), names=(x509.RFC822Name("a@b.c"),)), "csr_bad_names"),
        (lambda: _csr(_p256(), names=()), "csr_bad_names"),
        (lambda: _csr(_p256(), usages=None), "csr_bad_usage"),
        (lambda: _csr(_p256(), usages=(ExtendedKeyUsageOID.CODE_SIGNING,)), "csr_bad_usage"),
    ],
)
def test_bad_requests_are_refused_with_their_reason(make: object, code: str) -> None:
    with pytest.raises(CertificateRequestError) as refused:
        parse_request(make())  # type: ignore[operator]
    assert refused.value.code == code


def test_a_request_whose_signature_does_not_verify_is_refused() -> None:
    request, _ = make_request(PROFILE)
    forged = bytearray(request.der)
    forged[-5] ^= 0x01  # inside the signature's INTEGER: still DER, no longer the key's signature
    with pytest.raises(CertificateRequestError) as refused:
        parse_request(bytes(forged))
    assert refused.value.code in {"csr_bad_signature", "csr_unreadable"}


def test_every_flipped_byte_is_a_refusal_or_the_same_request() -> None:
    request, _ = make_request(PROFILE)
    for position in range(len(request.der)):
        damaged = bytearray(request.der)
        damaged[position] ^= 0x20
        try:
            parsed = parse_request(bytes(damaged))
        except CertificateRequestError:
            continue
        # A flip that still parses and verifies can only be in a part the signature does not cover
        assert parsed.key_sha256 == request.key_sha256 and parsed.profile.party == UNIT


def test_every_flipped_byte_of_a_certificate_is_refused_or_harmless() -> None:
    request, _ = make_request(PROFILE)
    der = _der(issue_for_request(*CA, request, now=NOW))
    for position in range(len(der)):
        damaged = bytearray(der)
        damaged[position] ^= 0x20
        try:
            cert = check_issued(
                bytes(damaged), ca_pem=CA[0], pending_key_sha256=request.key_sha256, expected=PROFILE, now=NOW
            )
        except CertificateRequestError:
            continue
        assert key_sha256(cert.public_key()) == request.key_sha256  # type: ignore[arg-type]


def _issued(profile: CertificateProfile = PROFILE, ca: tuple[bytes, bytes] = CA) -> tuple[bytes, bytes]:
    request, _ = make_request(profile)
    return _der(issue_for_request(*ca, request, now=NOW)), request.key_sha256


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("another_ca", "certificate_wrong_ca"),
        ("another_key", "certificate_not_requested"),
        ("other_names", "certificate_wrong_names"),
        ("other_party", "certificate_wrong_names"),
        ("client_usage", "certificate_wrong_usage"),
        ("the_ca_itself", "certificate_not_requested"),
        ("a_ca_for_our_key", "certificate_is_ca"),
        ("expired", "certificate_not_valid"),
        ("garbage", "certificate_unreadable"),
    ],
)
def test_a_certificate_not_answering_our_request_is_refused(case: str, code: str) -> None:
    der, key = _issued()
    expected = PROFILE
    now = NOW
    if case == "another_ca":
        der, key = _issued(ca=OTHER_CA)
    elif case == "another_key":
        key = _issued()[1]
    elif case == "other_names":
        der, key = _issued(CertificateProfile(UNIT, ("evil.example",), client=False, server=True))
    elif case == "other_party":
        der, key = _issued(CertificateProfile("unit.220100.land", PROFILE.names, client=False, server=True))
    elif case == "client_usage":
        der, key = _issued(CertificateProfile(UNIT, PROFILE.names, client=True, server=True))
    elif case == "the_ca_itself":
        der = _der(load_certificate(CA[0]))
    elif case == "a_ca_for_our_key":
        request, _ = make_request(PROFILE)
        key = request.key_sha256
        ca_cert, ca_key = load_certificate(CA[0]), serialization.load_pem_private_key(CA[1], None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        der = _der(
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, UNIT)]))
            .issuer_name(ca_cert.subject)
            .public_key(request.public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(minutes=1))
            .not_valid_after(NOW + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
    elif case == "expired":
        now = NOW + dt.timedelta(days=400)
    elif case == "garbage":
        der = b"\x30\x82" + b"\x00" * 40
    with pytest.raises(CertificateRequestError) as refused:
        check_issued(der, ca_pem=CA[0], pending_key_sha256=key, expected=expected, now=now)
    assert refused.value.code == code
