"""Certificate requests: a party renews its TLS certificate with a key made on its own host.

``hedui-keys ca renew`` makes the new key where the CA is, so the key has to be carried to the party. Here the party
makes the key itself and sends only a PKCS#10 certificate signing request (CSR); the CA's operator signs it and only
the certificate travels back. Both travel as trust items over SyncTrust (docs/exchange.md, "Certificate requests"):
CERTIFICATE_REQUEST (DER PKCS#10, unit to gateway) and CERTIFICATE (DER X.509, gateway to unit). The private key
never leaves the host that made it.

- :class:`CertificateProfile`: what a leaf certificate names (party, DNS names and IP addresses, usages), read from a
  current certificate; a renewal asks for the same.
- :func:`make_request`: a new P-256 key and a CSR for a profile, signed by that key: subject ``CN=<party>``,
  extensions requested: subjectAltName ``URI:hedui://party/<party>`` then the names, ExtendedKeyUsage, KeyUsage
  ``digitalSignature``, BasicConstraints ``ca=False``.
- :func:`parse_request`: the checks anyone makes of a CSR before trusting what it says (a DER PKCS#10 of at most
  ``MAX_REQUEST_BYTES``, its self-signature valid, ECDSA P-256 with SHA-256, exactly one common name that is a party
  id and a party URI naming the same, only DNS and IP names besides, serverAuth and/or clientAuth). Whether the
  sender may have those names is the gateway's policy (gateway/certificates/requests.py).
- :func:`issue_for_request`: the CA signs a certificate for the request's key and profile with ``keys.tls.sign_leaf``,
  the code and lifetime rules of ``hedui-keys ca issue``.
- :func:`check_issued`: what the requesting party checks before it installs a certificate it is sent: signed by its
  CA, for the key it holds pending, naming exactly what it asked for, a leaf, valid now.

Every refusal is a :class:`CertificateRequestError` with a stable reason code (a-z 0-9 _, the trust item's refusal
reason) and a message without key material.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keys.party import is_party_id
from keys.tls import (
    CLOCK_SKEW,
    LEAF_VALID_DAYS,
    PARTY_URI_PREFIX,
    TlsError,
    load_certificate,
    renewal_parameters,
    server_name,
    sign_leaf,
)

__all__ = [
    "MAX_CERTIFICATE_BYTES",
    "MAX_REQUEST_BYTES",
    "CertificateProfile",
    "CertificateRequest",
    "CertificateRequestError",
    "check_issued",
    "issue_for_request",
    "key_sha256",
    "make_request",
    "parse_request",
]

#: A CSR for a P-256 key and a few names is a few hundred bytes.
MAX_REQUEST_BYTES = 16 * 1024
#: An issued leaf certificate likewise.
MAX_CERTIFICATE_BYTES = 16 * 1024
#: More names than this in one request is not a connector's server certificate.
MAX_NAMES = 16

#: What cryptography raises for bytes that are not a well-formed request or certificate.
_UNREADABLE = (
    ValueError,
    UnsupportedAlgorithm,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)
_USAGES = {ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth", ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth"}


class CertificateRequestError(TlsError):
    """A certificate request or an issued certificate is refused; ``code`` is the reason (stable, for trust item
    receipts, logs and metrics)."""

    code = "csr_invalid"

    def __init__(self, message: str, code: str = "csr_invalid") -> None:
        super().__init__(message)
        self.code = code


def key_sha256(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """SHA-256 of a public key's DER SubjectPublicKeyInfo: how a request, its pending key and its certificate are
    matched (and the key fingerprint ``tls requests`` shows)."""
    return hashlib.sha256(
        public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    ).digest()


def _canonical_name(name: str) -> str:
    """A DNS name lower-cased, an IP address in its compressed form (how x509 compares them)."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name.lower()


@dataclass(frozen=True)
class CertificateProfile:
    """What a leaf certificate names: the party, the DNS names and IP addresses clients dial (in order), and the
    extended key usages (serverAuth for a connector's server certificate, clientAuth for a gateway's client one)."""

    party: str
    names: tuple[str, ...]
    client: bool
    server: bool

    @classmethod
    def of_certificate(cls, cert_pem_or_der: bytes) -> CertificateProfile:
        """The profile of a current certificate (TlsError when it names no party)."""
        party, names, client, server = renewal_parameters(cert_pem_or_der)
        return cls(party, tuple(_canonical_name(n) for n in names), client, server)

    @property
    def usages(self) -> str:
        """``serverAuth``, ``clientAuth`` or ``clientAuth,serverAuth`` (stored and shown like this)."""
        return ",".join(u for u, wanted in (("clientAuth", self.client), ("serverAuth", self.server)) if wanted)

    def same_names(self, other: CertificateProfile) -> bool:
        """Whether both name the same party, set of names and usages (the order of names does not matter)."""
        return (
            self.party == other.party
            and set(self.names) == set(other.names)
            and (self.client, self.server) == (other.client, other.server)
        )


@dataclass(frozen=True)
class CertificateRequest:
    """A CSR that passed :func:`parse_request`: its DER bytes and what it asks for."""

    der: bytes
    profile: CertificateProfile
    #: SHA-256 of the requested public key's SubjectPublicKeyInfo (:func:`key_sha256`).
    key_sha256: bytes
    public_key: ec.EllipticCurvePublicKey = field(repr=False, compare=False)

    @property
    def sha256(self) -> bytes:
        """SHA-256 of the DER bytes: the trust item's digest its receipt names."""
        return hashlib.sha256(self.der).digest()

    @property
    def key_fingerprint(self) -> str:
        """The first 16 bytes of :attr:`key_sha256` in hex pairs, for operators comparing a request with the unit's
        ``hedui-connector tls status``."""
        digest = self.key_sha256[:16].hex().upper()
        return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))

    def pem(self) -> bytes:
        """The request as PEM (``-----BEGIN CERTIFICATE REQUEST-----``), for files exported to an offline CA."""
        return x509.load_der_x509_csr(self.der).public_bytes(serialization.Encoding.PEM)


def _key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _general_names(names: tuple[str, ...]) -> list[x509.GeneralName]:
    general: list[x509.GeneralName] = []
    for name in names:
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            general.append(x509.DNSName(name))
    return general


def make_request(profile: CertificateProfile) -> tuple[CertificateRequest, bytes]:
    """A new P-256 key and a CSR for ``profile`` signed by it; return (the request, the key as unencrypted PKCS#8
    PEM, to be kept on this host with mode 0600 and never sent)."""
    if not (profile.client or profile.server):
        raise TlsError("a certificate must be for a client, a server or both")
    key = ec.generate_private_key(ec.SECP256R1())
    usages = [
        oid
        for oid, wanted in (
            (ExtendedKeyUsageOID.SERVER_AUTH, profile.server),
            (ExtendedKeyUsageOID.CLIENT_AUTH, profile.client),
        )
        if wanted
    ]
    san = x509.SubjectAlternativeName(
        [x509.UniformResourceIdentifier(PARTY_URI_PREFIX + profile.party), *_general_names(profile.names)]
    )
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, profile.party)]))
        .add_extension(san, critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(_key_usage(), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    request = parse_request(csr.public_bytes(serialization.Encoding.DER))
    return request, key_pem


def _refuse(message: str, code: str) -> CertificateRequestError:
    return CertificateRequestError(message, code)


def _profile_of(
    subject: x509.Name, extensions: x509.Extensions, *, what: str, codes: tuple[str, str, str]
) -> CertificateProfile:
    """Party, names and usages of a CSR's or certificate's subject and extensions, refused unless they are a Hedui
    leaf's; ``codes``: the reasons for a wrong party, wrong names and a wrong usage."""
    party_code, names_code, usage_code = codes
    common = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(common) != 1 or len(subject) != 1 or not is_party_id(str(common[0].value)):
        raise _refuse(f"the {what}'s subject must be exactly CN=<party id>", party_code)
    party = str(common[0].value)
    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise _refuse(f"the {what} has no subjectAltName naming its party", party_code) from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if uris != [PARTY_URI_PREFIX + party]:
        raise _refuse(f"the {what} must name its party once, as URI {PARTY_URI_PREFIX}{party}", party_code)
    names: list[str] = []
    for general in san:
        if isinstance(general, x509.UniformResourceIdentifier):
            continue
        if isinstance(general, x509.IPAddress):
            value = str(general.value)
        elif isinstance(general, x509.DNSName):
            value = general.value
            try:
                server_name(value)
            except TlsError:
                raise _refuse(f"the {what} names a host that is not a DNS name clients dial", names_code) from None
        else:
            raise _refuse(f"the {what} names something else than DNS names and IP addresses", names_code)
        value = _canonical_name(value)
        if value in names:
            raise _refuse(f"the {what} names {value} twice", names_code)
        names.append(value)
    if len(names) > MAX_NAMES:
        raise _refuse(f"the {what} names more than {MAX_NAMES} hosts", names_code)
    try:
        usages = list(extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        raise _refuse(f"the {what} says no extended key usage (serverAuth, clientAuth)", usage_code) from None
    if not usages or any(u not in _USAGES for u in usages) or len(set(usages)) != len(usages):
        raise _refuse(f"the {what}'s extended key usage must be serverAuth and/or clientAuth", usage_code)
    server = ExtendedKeyUsageOID.SERVER_AUTH in usages
    if server and not names:
        raise _refuse(f"a server {what} must name the host clients dial", names_code)
    return CertificateProfile(party, tuple(names), ExtendedKeyUsageOID.CLIENT_AUTH in usages, server)


def _p256(public_key: object) -> ec.EllipticCurvePublicKey | None:
    if isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve, ec.SECP256R1):
        return public_key
    return None


def parse_request(der: bytes) -> CertificateRequest:
    """Check a DER PKCS#10 request as anyone would before believing it; raise CertificateRequestError with
    ``csr_unreadable``, ``csr_bad_signature``, ``csr_wrong_key_type``, ``csr_wrong_party`` (subject and party URI
    missing, several or disagreeing), ``csr_bad_names`` or ``csr_bad_usage``."""
    if not isinstance(der, bytes) or not der or len(der) > MAX_REQUEST_BYTES:
        raise _refuse(f"a certificate request is 1-{MAX_REQUEST_BYTES} bytes of DER", "csr_unreadable")
    try:
        csr = x509.load_der_x509_csr(der)
        if csr.public_bytes(serialization.Encoding.DER) != der:
            raise ValueError("not canonical")
        public_key = csr.public_key()
        extensions = csr.extensions
        signature_hash = csr.signature_hash_algorithm
    except _UNREADABLE:
        raise _refuse("not a DER PKCS#10 certificate request", "csr_unreadable") from None
    key = _p256(public_key)
    if key is None:
        raise _refuse("the requested key is not an ECDSA P-256 key", "csr_wrong_key_type")
    if not isinstance(signature_hash, hashes.SHA256):
        raise _refuse("the request is not signed with ECDSA-SHA256", "csr_wrong_key_type")
    if not csr.is_signature_valid:
        raise _refuse("the request's signature does not verify with its own key", "csr_bad_signature")
    codes = ("csr_wrong_party", "csr_bad_names", "csr_bad_usage")
    profile = _profile_of(csr.subject, extensions, what="request", codes=codes)
    return CertificateRequest(der, profile, key_sha256(key), key)


def issue_for_request(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    request: CertificateRequest,
    *,
    valid_days: int = LEAF_VALID_DAYS,
    now: dt.datetime | None = None,
    ca_key_passphrase: str | None = None,
) -> x509.Certificate:
    """The CA's certificate for ``request``'s key, naming exactly its profile (``keys.tls.sign_leaf``: the
    extensions and lifetime of ``hedui-keys ca issue``)."""
    profile = request.profile
    return sign_leaf(
        ca_cert_pem,
        ca_key_pem,
        profile.party,
        request.public_key,
        server_names=profile.names,
        client=profile.client,
        server=profile.server,
        valid_days=valid_days,
        now=now,
        ca_key_passphrase=ca_key_passphrase,
    )


def _signed_by_any(cert: x509.Certificate, cas: list[x509.Certificate]) -> bool:
    for ca in cas:
        try:
            constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            continue
        if not constraints.ca:
            continue
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):  # not this CA
            continue
        return True
    return False


def check_issued(
    cert_bytes: bytes,
    *,
    ca_pem: bytes,
    pending_key_sha256: bytes,
    expected: CertificateProfile,
    now: dt.datetime,
) -> x509.Certificate:
    """Check a certificate sent in answer to our request before installing it; raise CertificateRequestError with
    ``certificate_unreadable``, ``certificate_wrong_ca`` (not signed by a CA of ``ca_pem``),
    ``certificate_not_requested`` (not for the key held pending), ``certificate_wrong_names`` (party or names other
    than asked), ``certificate_wrong_usage``, ``certificate_is_ca`` or ``certificate_not_valid`` (not yet valid
    beyond the clock skew, or already ended)."""
    if not isinstance(cert_bytes, bytes) or not cert_bytes or len(cert_bytes) > MAX_CERTIFICATE_BYTES:
        raise _refuse(f"a certificate is 1-{MAX_CERTIFICATE_BYTES} bytes", "certificate_unreadable")
    try:
        cert = load_certificate(cert_bytes)
        extensions = cert.extensions
        public_key = cert.public_key()
    except (TlsError, *_UNREADABLE):
        raise _refuse("not an X.509 certificate", "certificate_unreadable") from None
    try:
        cas = x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        raise _refuse("the CA certificate file cannot be read", "certificate_wrong_ca") from None
    if not _signed_by_any(cert, cas):
        raise _refuse("the certificate is not signed by our CA", "certificate_wrong_ca")
    key = _p256(public_key)
    if key is None or key_sha256(key) != pending_key_sha256:
        raise _refuse("the certificate is not for the key this party holds pending", "certificate_not_requested")
    try:
        constraints = extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or constraints.ca:
        raise _refuse("the certificate is not a leaf certificate (BasicConstraints ca=False)", "certificate_is_ca")
    codes = ("certificate_wrong_names", "certificate_wrong_names", "certificate_wrong_usage")
    profile = _profile_of(cert.subject, extensions, what="certificate", codes=codes)
    if profile.party != expected.party or set(profile.names) != set(expected.names):
        raise _refuse("the certificate names other hosts or another party than requested", "certificate_wrong_names")
    if (profile.client, profile.server) != (expected.client, expected.server):
        raise _refuse(
            f"the certificate's usage is {profile.usages}, {expected.usages} was requested", "certificate_wrong_usage"
        )
    moment = now.astimezone(dt.UTC)
    if moment + CLOCK_SKEW < cert.not_valid_before_utc or moment >= cert.not_valid_after_utc:
        raise _refuse("the certificate is not valid now", "certificate_not_valid")
    return cert
