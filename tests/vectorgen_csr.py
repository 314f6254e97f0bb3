"""Deterministic test vectors of certificate requests and the certificates that answer them (docs/exchange.md,
"Certificate requests (trust item kinds 4 and 5)").

:func:`build_vectors` returns the document that ``scripts/make_vectors.py`` writes to
``tests/vectors/certificate_requests_v1.json``; ``tests/test_csr_vectors.py`` builds it again, compares the two byte
for byte, and replays every vector against keys/csr.py and the gateway's policy. Everything here is built from the
specification with cryptography's X.509 builders, not with keys/csr.py: keys are derived from fixed seeds, ECDSA
signatures are deterministic (RFC 6979), serial numbers and times are fixed, so the bytes never change.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.vectorgen import Json
from tests.vectorgen_formats import key_seed

FORMAT = "hedui-certificate-request-v1-test-vectors"
UNIT = "unit.220100.tax"
LAND = "unit.220100.land"
GATEWAY = "agency.220100"
NAMES = ("tax-gw.internal", "10.20.1.11")
#: Monday 21 September 2026, 22:13:20 Beijing time (envelope_v1.json's created_at).
NOW = dt.datetime.fromtimestamp(1_790_000_000, dt.UTC)
#: When a receiver checks the vectors.
CHECK_AT_MS = 1_790_000_000_000 + 3_600_000


def p256(label: str) -> ec.EllipticCurvePrivateKey:
    """A P-256 key whose scalar is SHA-256(key_seed(label)) mod n (never 0 for these labels)."""
    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    scalar = int.from_bytes(hashlib.sha256(key_seed(label)).digest(), "big") % order
    return ec.derive_private_key(scalar, ec.SECP256R1())


def _general(names: tuple[str, ...]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def _key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(True, False, False, False, False, False, False, False, False)


def request(
    key: ec.EllipticCurvePrivateKey, party: str, names: tuple[str, ...], *, uri_party: str | None = None
) -> bytes:
    """A request as docs/exchange.md specifies it: subject CN=party; extensions subjectAltName (the party URI, then
    the names), ExtendedKeyUsage serverAuth, KeyUsage digitalSignature (critical), BasicConstraints ca=False
    (critical); ECDSA-SHA256 by the requested key."""
    san = x509.SubjectAlternativeName(
        [x509.UniformResourceIdentifier(f"hedui://party/{uri_party or party}"), *_general(names)]
    )
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, party)]))
        .add_extension(san, critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_key_usage(), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256(), ecdsa_deterministic=True)
    )
    return csr.public_bytes(serialization.Encoding.DER)


def ca(label: str, name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = p256(label)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(hashlib.sha256(label.encode()).digest()[:19], "big"))
        .not_valid_before(NOW - dt.timedelta(days=365))
        .not_valid_after(NOW + dt.timedelta(days=3285))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256(), ecdsa_deterministic=True)
    )
    return key, cert


def leaf(
    issuer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    public_key: ec.EllipticCurvePublicKey,
    party: str,
    names: tuple[str, ...],
    serial: int,
    *,
    start: dt.datetime = NOW,
) -> bytes:
    """The certificate the CA issues for a request (docs/keys.md, "TLS certificates"), in DER."""
    ca_key, ca_cert = issuer
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"hedui://party/{party}"), *_general(names)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, party)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(start - dt.timedelta(minutes=5))
        .not_valid_after(start + dt.timedelta(days=397))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(san, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256(), ecdsa_deterministic=True)
    )
    return cert.public_bytes(serialization.Encoding.DER)


def _spki_sha256(key: ec.EllipticCurvePublicKey) -> str:
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def build_vectors() -> Json:
    network = ca("csr-vector-ca", "Hedui vector CA")
    other = ca("csr-vector-other-ca", "Not the network CA")
    current_key, new_key, stranger = p256("csr-vector-current"), p256("csr-vector-new"), p256("csr-vector-stranger")
    current = leaf(network, current_key.public_key(), UNIT, NAMES, 0x1001, start=NOW - dt.timedelta(days=380))
    good_request = request(new_key, UNIT, NAMES)
    issued = leaf(network, new_key.public_key(), UNIT, NAMES, 0x1002)
    forged = bytearray(good_request)
    forged[-3] ^= 0x01  # inside the signature's s: still DER, no longer the key's signature
    pem = serialization.Encoding.PEM
    return {
        "format": FORMAT,
        "description": "Certificate requests (TrustItemKind 4, unit to gateway) and the certificates that answer "
        "them (TrustItemKind 5, gateway to unit): DER PKCS#10 and DER X.509 with P-256 keys. Keys are P-256 with "
        "the scalar SHA-256(SHAKE-256('hedui.v1.test-vector-key' || 0x00 || label)) mod n; signatures are "
        "deterministic ECDSA-SHA256 (RFC 6979). key_sha256 is SHA-256 of the key's DER SubjectPublicKeyInfo.",
        "check_at_ms": CHECK_AT_MS,
        "ca_certificate_pem": network[1].public_bytes(pem).decode(),
        "unit": UNIT,
        "gateway_policy": {
            "current_certificate_der": current.hex(),
            "endpoint": "10.20.1.11:50061",
            "server_names": [],
        },
        "request": {
            "der": good_request.hex(),
            "party": UNIT,
            "names": list(NAMES),
            "usages": "serverAuth",
            "key_sha256": _spki_sha256(new_key.public_key()),
        },
        "certificate": {"der": issued.hex(), "serial": "1002"},
        "refused_requests": [
            {
                "name": "signature_forged",
                "sender": UNIT,
                "der": bytes(forged).hex(),
                "code": "csr_bad_signature",
            },
            {
                "name": "another_party_in_the_uri",
                "sender": UNIT,
                "der": request(stranger, UNIT, NAMES, uri_party=LAND).hex(),
                "code": "csr_wrong_party",
            },
            {
                "name": "sent_by_another_unit",
                "sender": LAND,
                "der": request(stranger, UNIT, NAMES).hex(),
                "code": "csr_wrong_party",
            },
            {
                "name": "other_host_names",
                "sender": UNIT,
                "der": request(stranger, UNIT, ("tax-gw.internal", "evil.example")).hex(),
                "code": "csr_names_changed",
            },
            {
                "name": "the_current_key_again",
                "sender": UNIT,
                "der": request(current_key, UNIT, NAMES).hex(),
                "code": "csr_key_reused",
            },
        ],
        "refused_certificates": [
            {
                "name": "another_ca",
                "der": leaf(other, new_key.public_key(), UNIT, NAMES, 0x2001).hex(),
                "code": "certificate_wrong_ca",
            },
            {
                "name": "another_key",
                "der": leaf(network, stranger.public_key(), UNIT, NAMES, 0x2002).hex(),
                "code": "certificate_not_requested",
            },
            {
                "name": "other_names",
                "der": leaf(network, new_key.public_key(), UNIT, ("evil.example",), 0x2003).hex(),
                "code": "certificate_wrong_names",
            },
            {
                "name": "expired",
                "der": leaf(
                    network, new_key.public_key(), UNIT, NAMES, 0x2004, start=NOW - dt.timedelta(days=400)
                ).hex(),
                "code": "certificate_not_valid",
            },
        ],
    }


def render(vectors: Json) -> str:
    """The exact text of the vector file."""
    return json.dumps(vectors, indent=2, ensure_ascii=False) + "\n"
