"""A small private certificate authority for mutual TLS between an agency's gateway and the sharing units' connectors.

The private network has no public CA, so each deployment runs its own: ``create_ca`` makes a self-signed CA
certificate, ``issue_certificate`` signs one leaf certificate per party, and both ends of a gRPC channel trust only
that CA (``root_certificates``) and require the other's certificate (``require_client_auth=True``).

Design:

- Keys are ECDSA P-256 with SHA-256 signatures. Ed25519 certificates do not work: grpcio 1.85 (BoringSSL) fails the
  handshake with NO_COMMON_SIGNATURE_ALGORITHMS because it does not offer Ed25519 signatures. P-256 is what every TLS
  1.2 and 1.3 stack (BoringSSL, OpenSSL, Java, Go) accepts for both client and server certificates, so a sharing unit
  may write its connector in any language.
- The CA certificate has BasicConstraints(ca=True, path_length=0) and KeyUsage(keyCertSign, cRLSign), both critical,
  and a SubjectKeyIdentifier: it signs leaf certificates and nothing else, never an intermediate CA.
- A leaf certificate names its party twice: the subject common name is the party id (``unit.220100.tax``) and a
  subjectAltName URI ``hedui://party/<party id>`` carries it again. The URI is the authoritative one: gRPC hands the
  peer's PEM certificate to the servicer (``auth_context()["x509_pem_cert"]``) and ``party_from_auth_context`` reads
  the URI from it, so the gateway and the connectors can require that the TLS peer is the party that signed the
  envelope. The common name is only a fallback for a peer whose certificate carries no such URI.
  The other subjectAltNames are the DNS names and IP addresses a client dials (hostname verification). The extended
  key usage is serverAuth and/or clientAuth as asked, BasicConstraints(ca=False), KeyUsage(digitalSignature), with a
  random 159-bit serial number and an AuthorityKeyIdentifier pointing at the CA key.
- Validity: the CA ten years, a leaf 397 days (the longest the public web still accepts), never beyond the CA's own
  end. ``not_before`` lies five minutes before the issuing time so that a peer whose clock runs slightly behind
  accepts a certificate issued a moment ago.
- At rest the CA key is sealed like a keystore (keys/keystore.py: Argon2id from the passphrase, XChaCha20-Poly1305;
  format "hedui-ca-key", the PKCS#8 PEM inside). PKCS#8's own encryption was not strong enough: cryptography
  writes it with PBKDF2-HMAC-SHA256 at 2,048 iterations, which a graphics card tries millions of passphrases against
  per second; a CA key written that way by an earlier version is still read. The key is needed only to issue
  certificates and should live on the offline machine that keeps the keystores. A leaf key is unencrypted PKCS#8
  PEM: grpcio takes the private key as bytes in memory and has no way to ask for a passphrase, so the service
  reading it at start could only keep the passphrase next to the key. Its protection is the file mode (0600,
  written by ``keys.keystore.write_private_file``) and the short lifetime of the certificate.

- Checking what is installed: ``check_tls`` takes the (certificate, key, CA) files a service's config names and
  verifies them as the service will use them: readable, the key belongs to the certificate, the certificate is
  signed by the CA, valid now, has the extended key usage of its role and names the configured party. Both
  services' ``check-config`` and ``serve`` run it, so a certificate that would fail the TLS handshakes (and leave
  every peer "unreachable") is refused at once with the file named; a certificate ending within
  ``EXPIRY_WARNING`` gets a warning. A running service checks its files again every few seconds
  (common/tlsreload.py): renewed files that pass the same checks are used for new handshakes without a restart.
- Renewal: a party makes its new key itself and only a certificate request travels (keys/csr.py; ``sign_leaf`` signs
  it with the issuing code here). ``renew_certificate`` issues a new key and certificate naming the same party,
  server names and extended key usages as the current certificate where the CA is (``hedui-keys ca renew``, the
  fallback whose key must then be carried).

Every failure raises :class:`TlsError` with a message fit for an operator; none carries key material.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keys._files import read_bounded
from keys.errors import KeysError, KeystoreError
from keys.keystore import KdfParams, open_document, read_secret_file, seal_document
from keys.party import check_party_id, is_party_id

#: The subjectAltName URI that carries a party id: ``hedui://party/unit.220100.tax``.
PARTY_URI_PREFIX = "hedui://party/"
CA_VALID_DAYS = 3650
LEAF_VALID_DAYS = 397
#: How far ``not_before`` lies before the issuing time, for peers whose clocks run a little behind.
CLOCK_SKEW = dt.timedelta(minutes=5)
#: X.520 upper bound of a common name.
MAX_COMMON_NAME_LENGTH = 64
DEFAULT_CA_NAME = "Hedui private CA"
#: The "format" of the sealed CA key file (keys/keystore.py container).
CA_KEY_FORMAT = "hedui-ca-key"

_CURVE = ec.SECP256R1
_HASH = hashes.SHA256
_DNS_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_MAX_DNS_NAME_LENGTH = 253
#: A PEM private key of a leaf certificate is a few hundred bytes.
MAX_PRIVATE_KEY_FILE_BYTES = 64 * 1024

_USAGE_NAMES = {ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth", ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth"}


class TlsError(KeysError):
    """A TLS certificate or key cannot be created, read or used as asked."""

    code = "tls"


def _now(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.UTC)
    if now.tzinfo is None or now.utcoffset() is None:
        raise TlsError("'now' must be a timezone-aware datetime (e.g. datetime.now(UTC))")
    return now.astimezone(dt.UTC)


def _check_days(valid_days: int) -> dt.timedelta:
    if isinstance(valid_days, bool) or not isinstance(valid_days, int) or valid_days < 1:
        raise TlsError(f"validity must be a whole number of days, at least 1 (got {valid_days!r})")
    return dt.timedelta(days=valid_days)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    pem: bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem


def _sealed_ca_key(key: ec.EllipticCurvePrivateKey, passphrase: str | None, kdf: KdfParams | None) -> bytes:
    if passphrase is None:
        return _key_pem(key)
    if not passphrase:
        raise TlsError("the passphrase for the CA key is empty")
    return seal_document(CA_KEY_FORMAT, {}, _key_pem(key), passphrase, kdf=kdf)


def _ski(key: ec.EllipticCurvePrivateKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key())


def create_ca(
    name: str = DEFAULT_CA_NAME,
    *,
    valid_days: int = CA_VALID_DAYS,
    now: dt.datetime | None = None,
    passphrase: str | None = None,
    kdf: KdfParams | None = None,
) -> tuple[bytes, bytes]:
    """Make a self-signed CA; return (certificate PEM, private key file).

    With ``passphrase`` (as ``hedui-keys ca init`` always gives) the key file is sealed with it (``kdf``: the
    Argon2id cost, the keystore default when None); without, it is a plain PKCS#8 PEM (loopback test networks).
    """
    if not name or not name.strip() or len(name) > MAX_COMMON_NAME_LENGTH or not name.isprintable():
        raise TlsError(f"the CA name must be 1-{MAX_COMMON_NAME_LENGTH} printable characters")
    start = _now(now)
    lifetime = _check_days(valid_days)
    key = ec.generate_private_key(_CURVE())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    key_usage = x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - CLOCK_SKEW)
        .not_valid_after(start + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage, critical=True)
        .add_extension(_ski(key), critical=False)
        .sign(key, _HASH())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _sealed_ca_key(key, passphrase, kdf)


def load_certificate(data: bytes) -> x509.Certificate:
    """Parse one certificate, PEM (the first one in the text) or DER; raise TlsError if it is neither."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise TlsError("not an X.509 certificate (expected PEM '-----BEGIN CERTIFICATE-----' or DER)") from exc


def load_ca_key(ca_key_pem: bytes, passphrase: str | None) -> ec.EllipticCurvePrivateKey:
    """The CA's private key from its file (sealed by ``ca init``, or a PEM); TlsError if it cannot be opened."""
    if ca_key_pem.lstrip().startswith(b"{"):
        if not passphrase:
            raise TlsError("the CA key is encrypted: a passphrase is needed")
        try:
            _, ca_key_pem = open_document(ca_key_pem, CA_KEY_FORMAT, passphrase, name="the CA key file", what="CA key")
        except KeystoreError as exc:
            raise TlsError(str(exc)) from None
    encrypted = b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in ca_key_pem or b"Proc-Type: 4,ENCRYPTED" in ca_key_pem
    if encrypted and not passphrase:
        raise TlsError("the CA key is encrypted: a passphrase is needed")
    # An unencrypted CA key is read as it is, though 'hedui-keys ca init' never writes one.
    password = passphrase.encode("utf-8") if encrypted and passphrase else None
    try:
        key = serialization.load_pem_private_key(ca_key_pem, password)
    except (ValueError, TypeError) as exc:
        raise TlsError("cannot read the CA key: wrong passphrase, or not a PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TlsError("the CA key is not an ECDSA key; create the CA with 'hedui-keys ca init'")
    return key


def server_name(name: str) -> x509.GeneralName:
    """A DNS name or an IP address for the subjectAltName; raise TlsError for anything else."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    host = name.lower()
    labels = host.split(".")
    if not host or len(host) > _MAX_DNS_NAME_LENGTH or not all(_DNS_LABEL.match(label) for label in labels):
        raise TlsError(
            f"server name {name!r} is neither an IP address nor a DNS name (letters, digits, '-' and '.'; "
            "no wildcards, no trailing dot)"
        )
    return x509.DNSName(host)


def issue_certificate(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    party_id: str,
    *,
    server_names: Iterable[str] = (),
    client: bool,
    server: bool,
    valid_days: int = LEAF_VALID_DAYS,
    now: dt.datetime | None = None,
    ca_key_passphrase: str | None = None,
) -> tuple[bytes, bytes]:
    """Sign a leaf certificate for ``party_id``; return (certificate PEM, unencrypted private key PEM).

    ``server_names`` are the DNS names and IP addresses clients dial ("localhost", "127.0.0.1"); a server
    certificate needs at least one. ``client`` and ``server`` choose the extended key usages (at least one).
    """
    key = ec.generate_private_key(_CURVE())
    cert = sign_leaf(
        ca_cert_pem,
        ca_key_pem,
        party_id,
        key.public_key(),
        server_names=server_names,
        client=client,
        server=server,
        valid_days=valid_days,
        now=now,
        ca_key_passphrase=ca_key_passphrase,
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def sign_leaf(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    party_id: str,
    public_key: ec.EllipticCurvePublicKey,
    *,
    server_names: Iterable[str] = (),
    client: bool,
    server: bool,
    valid_days: int = LEAF_VALID_DAYS,
    now: dt.datetime | None = None,
    ca_key_passphrase: str | None = None,
) -> x509.Certificate:
    """Sign the leaf certificate of ``issue_certificate`` for a public key made elsewhere (a P-256 key; a
    certificate request's, keys/csr.py): the same names, usages, extensions and lifetime rules."""
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, _CURVE):
        raise TlsError("a leaf certificate's key must be an ECDSA P-256 key")
    try:
        check_party_id(party_id)
    except ValueError as exc:
        raise TlsError(str(exc)) from exc
    if not (client or server):
        raise TlsError("a certificate must be for a client, a server or both")
    if isinstance(server_names, str):
        raise TlsError("server_names must be a list of names, not one string")
    names: list[x509.GeneralName] = []
    for name in server_names:
        general = server_name(name)
        if general not in names:
            names.append(general)
    if server and not names:
        raise TlsError("a server certificate needs at least one server name (DNS name or IP address clients dial)")
    start = _now(now)
    lifetime = _check_days(valid_days)
    ca_cert = load_certificate(ca_cert_pem)
    ca_key = load_ca_key(ca_key_pem, ca_key_passphrase)
    if ca_key.public_key().public_numbers() != _public_numbers(ca_cert):
        raise TlsError("the CA key does not belong to the CA certificate")
    try:
        constraints = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise TlsError("the CA certificate is not a CA (BasicConstraints ca=True missing)")
    if not ca_cert.not_valid_before_utc <= start <= ca_cert.not_valid_after_utc:
        raise TlsError(
            f"the CA certificate is not valid at {start:%Y-%m-%dT%H:%M:%SZ} (valid "
            f"{ca_cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} .. {ca_cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})"
        )
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    usages = [
        oid
        for oid, wanted in ((ExtendedKeyUsageOID.SERVER_AUTH, server), (ExtendedKeyUsageOID.CLIENT_AUTH, client))
        if wanted
    ]
    key_usage = x509.KeyUsage(
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
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(PARTY_URI_PREFIX + party_id), *names])
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, party_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - CLOCK_SKEW)
        .not_valid_after(min(start + lifetime, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(san, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(aki, critical=False)
        .sign(ca_key, _HASH())
    )
    return cert


def renewal_parameters(cert_pem: bytes) -> tuple[str, list[str], bool, bool]:
    """(party, server names, client, server) of a current certificate, to issue its successor with; TlsError when
    it names no party."""
    cert = load_certificate(cert_pem)
    party = party_from_certificate(cert_pem)
    if party is None:
        raise TlsError("the certificate names no party (no hedui://party/ URI): issue a new one with 'ca issue'")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = x509.SubjectAlternativeName([])
    names = [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]
    usages = _usages(cert)
    client = usages is None or ExtendedKeyUsageOID.CLIENT_AUTH in usages
    server = usages is None or ExtendedKeyUsageOID.SERVER_AUTH in usages
    return party, names, client, server and bool(names)


def renew_certificate(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    current_cert_pem: bytes,
    *,
    valid_days: int = LEAF_VALID_DAYS,
    now: dt.datetime | None = None,
    ca_key_passphrase: str | None = None,
) -> tuple[bytes, bytes]:
    """A new key and certificate with the party, server names and usages of ``current_cert_pem`` (which must be
    signed by this CA); return (certificate PEM, private key PEM)."""
    current = load_certificate(current_cert_pem)
    if not _issued_by(current, load_certificate(ca_cert_pem)):
        raise TlsError("the current certificate is not signed by this CA: issue a new one with 'ca issue'")
    party, names, client, server = renewal_parameters(current_cert_pem)
    return issue_certificate(
        ca_cert_pem,
        ca_key_pem,
        party,
        server_names=names,
        client=client,
        server=server,
        valid_days=valid_days,
        now=now,
        ca_key_passphrase=ca_key_passphrase,
    )


def _public_numbers(cert: x509.Certificate) -> ec.EllipticCurvePublicNumbers | None:
    public = cert.public_key()
    return public.public_numbers() if isinstance(public, ec.EllipticCurvePublicKey) else None


def _party_uris(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {
        uri.removeprefix(PARTY_URI_PREFIX)
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier)
        if uri.startswith(PARTY_URI_PREFIX)
    }


def _common_names(cert: x509.Certificate) -> list[str]:
    return [str(attr.value) for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def party_from_certificate(cert_pem_or_der: bytes) -> str | None:
    """The party id a certificate names, or None when it names none or is ambiguous.

    The ``hedui://party/`` subjectAltName URI decides; without one, a common name that is a well-formed party id.
    Two different party URIs, a malformed one, or a common name that contradicts the URI give None (fail closed).
    Raises TlsError only when the bytes are not a certificate.
    """
    cert = load_certificate(cert_pem_or_der)
    uris = _party_uris(cert)
    names = _common_names(cert)
    if uris:
        if len(uris) != 1:
            return None
        (party,) = uris
        if not is_party_id(party) or any(name != party for name in names):
            return None
        return party
    if len(names) == 1 and is_party_id(names[0]):
        return names[0]
    return None


def _values(auth_context: Mapping[str, Iterable[bytes] | bytes], key: str) -> list[bytes]:
    value = auth_context.get(key)
    if value is None:
        return []
    if isinstance(value, bytes | bytearray):
        return [bytes(value)]
    return [bytes(item) for item in value]


def party_from_auth_context(auth_context: Mapping[str, Iterable[bytes] | bytes]) -> str | None:
    """The party id of a gRPC peer, from ``ServicerContext.auth_context()``; None if it cannot be told.

    grpcio maps property names to lists of bytes; on a mutual-TLS channel "x509_pem_cert" holds the peer's leaf
    certificate, which decides (see ``party_from_certificate``). Only when it is absent does a single
    "x509_common_name" that is a well-formed party id count. A bare ``bytes`` value (as grpc-stubs types it) is read
    as one value. Without TLS client authentication the context holds neither, and the answer is None.
    """
    pems = _values(auth_context, "x509_pem_cert")
    if pems:
        if len(pems) != 1:
            return None
        try:
            return party_from_certificate(pems[0])
        except TlsError:
            return None
    names = _values(auth_context, "x509_common_name")
    if len(names) == 1:
        name = names[0].decode("utf-8", "replace")
        return name if is_party_id(name) else None
    return None


def _general_name(name: x509.GeneralName) -> str:
    if isinstance(name, x509.DNSName):
        return f"DNS:{name.value}"
    if isinstance(name, x509.IPAddress):
        return f"IP:{name.value}"
    if isinstance(name, x509.UniformResourceIdentifier):
        return f"URI:{name.value}"
    return str(name)


def _utc(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def certificate_summary(pem: bytes, *, now: dt.datetime | None = None) -> str:
    """Several lines for a human: subject, issuer, party, SANs, usages, validity and SHA-256 fingerprint of the DER."""
    cert = load_certificate(pem)
    moment = _now(now)
    extensions = cert.extensions
    try:
        sans = ", ".join(
            _general_name(n) for n in extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        )
    except x509.ExtensionNotFound:
        sans = "none"
    try:
        constraints = extensions.get_extension_for_class(x509.BasicConstraints).value
        kind = f"CA (path length {constraints.path_length})" if constraints.ca else "leaf"
    except x509.ExtensionNotFound:
        kind = "leaf (no basic constraints)"
    try:
        eku = extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        usage = ", ".join(_USAGE_NAMES.get(oid, oid.dotted_string) for oid in eku)
    except x509.ExtensionNotFound:
        usage = "not restricted"
    if moment < cert.not_valid_before_utc:
        state = "NOT YET VALID"
    elif moment > cert.not_valid_after_utc:
        state = "EXPIRED"
    else:
        state = f"valid, {(cert.not_valid_after_utc - moment).days} days left"
    digest = cert.fingerprint(hashes.SHA256()).hex().upper()
    lines = [
        f"subject     {cert.subject.rfc4514_string()}",
        f"issuer      {cert.issuer.rfc4514_string()}",
        f"party       {party_from_certificate(pem) or 'none'}",
        f"kind        {kind}",
        f"usage       {usage}",
        f"names       {sans}",
        f"not before  {_utc(cert.not_valid_before_utc)}",
        f"not after   {_utc(cert.not_valid_after_utc)}  ({state})",
        f"serial      {cert.serial_number:x}",
        f"SHA-256     {':'.join(digest[i : i + 2] for i in range(0, len(digest), 2))}",
    ]
    return "\n".join(lines) + "\n"


def read_private_key(path: Path) -> bytes:
    """The PEM private key of a TLS certificate, refused (KeystoreError) unless only its owner can read it."""
    return read_secret_file(path, what="TLS private key", limit=MAX_PRIVATE_KEY_FILE_BYTES)


#: ``check-config`` warns when a certificate stops being valid within this long (the alert fires at 21 days).
EXPIRY_WARNING = dt.timedelta(days=30)
#: How a service uses a certificate, and the extended key usage that use needs.
ROLE_USAGES = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}
#: A PEM certificate or CA file is a few kilobytes; anything far larger is not one.
MAX_CERTIFICATE_FILE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class TlsFiles:
    """One TLS identity as a config names it, to be checked by ``check_tls``.

    ``cert`` is the certificate the service presents, ``key`` its private key, ``ca`` the CA certificate(s) the
    peers' certificates chain to (one private CA signs both sides, so ours must chain to it too). ``role`` is
    "server" or "client", ``party`` the party id the certificate must name, ``section`` the config section the
    three keys are in (for messages).
    """

    section: str
    role: str
    party: str
    cert: Path
    key: Path
    ca: Path

    def __post_init__(self) -> None:
        if self.role not in ROLE_USAGES:
            raise ValueError(f"a TLS role is one of {', '.join(ROLE_USAGES)}, not {self.role!r}")

    def where(self, what: str, path: Path) -> str:
        """The start of a message about one of the files: ``[server] certificate /etc/hedui/tls/x.crt``."""
        return f"[{self.section}] {what} {path}"


@dataclass(frozen=True, repr=False)
class TlsIdentity:
    """A checked TLS identity: the PEM bytes to hand to grpc, and when the certificate stops being valid."""

    files: TlsFiles
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes
    not_after: dt.datetime
    #: The certificate's serial number (what a CRL lists, what ``hedui-keys ca show`` prints in hex).
    serial: int = 0

    def __repr__(self) -> str:  # never the key
        return f"TlsIdentity({self.files.section}, {self.files.role} certificate of {self.files.party})"

    @property
    def role(self) -> str:
        return self.files.role

    def days_left(self, now: dt.datetime | None = None) -> float:
        """Days until the certificate stops being valid (negative once it has)."""
        return (self.not_after - _now(now)).total_seconds() / 86_400

    def expiry_warning(self, now: dt.datetime | None = None) -> str | None:
        """A line for the operator when the certificate stops being valid within ``EXPIRY_WARNING``, else None."""
        days = self.days_left(now)
        if days >= EXPIRY_WARNING.total_seconds() / 86_400:
            return None
        return (
            f"{self.files.where(f'{self.role} certificate', self.files.cert)} expires in {days:.1f} days "
            f"({_utc(self.not_after)}): renew it (a connector asks its gateway by itself, 'hedui-connector tls "
            "renewal-status'; the gateway's: 'hedui-gateway tls renew'; else 'hedui-keys ca renew'); the running "
            "service picks it up"
        )


def _read_pem(files: TlsFiles, what: str, path: Path) -> bytes:
    where = files.where(what, path)
    try:
        data = read_bounded(path, MAX_CERTIFICATE_FILE_BYTES, TlsError, what="PEM certificate", name=where)
    except FileNotFoundError:
        raise TlsError(f"{where} does not exist") from None
    except OSError as exc:
        raise TlsError(f"{where} cannot be read: {exc.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise TlsError(f"{where} is not a PEM certificate (no '-----BEGIN CERTIFICATE-----'; gRPC reads PEM only)")
    return data


def read_ca_bundle(path: Path) -> bytes:
    """The PEM CA certificate(s) in ``path``; TlsError when it is missing, unreadable or holds no certificate."""
    try:
        data = read_bounded(path, MAX_CERTIFICATE_FILE_BYTES, TlsError, what="PEM certificate")
    except OSError as exc:
        raise TlsError(f"CA certificate {path} cannot be read: {exc.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise TlsError(f"CA certificate {path} is not a PEM certificate")
    return data


def _parse_certificates(files: TlsFiles, what: str, path: Path, data: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TlsError(f"{files.where(what, path)} is not a readable X.509 certificate") from None


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _usages(cert: x509.Certificate) -> list[x509.ObjectIdentifier] | None:
    """The extended key usages, or None when the certificate does not restrict them."""
    try:
        return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return None


def check_tls_files(files: TlsFiles, *, now: dt.datetime | None = None) -> TlsIdentity:
    """Check one configured TLS identity as its service will use it; raise TlsError listing what is wrong.

    Checked: the three files exist and are readable (the key only by its owner, ``read_private_key``) and hold PEM;
    the key belongs to the certificate; a certificate of the CA file is a CA, valid now, and signed the certificate;
    the certificate is valid now (a ``not_before`` up to ``CLOCK_SKEW`` ahead is accepted, an ended one is not: the
    peers refuse it); a certificate that restricts its extended key usage allows the role's (serverAuth or
    clientAuth); and ``party_from_certificate`` names ``files.party``. Each problem is one line naming the file.
    """
    cert_pem = _read_pem(files, f"{files.role} certificate", files.cert)
    try:
        key_pem = read_private_key(files.key)
    except KeystoreError as exc:
        raise TlsError(f"[{files.section}] {exc}") from None
    ca_pem = _read_pem(files, "CA certificate", files.ca)
    return check_tls_material(files, cert_pem, key_pem, ca_pem, now=now)


def check_tls_material(
    files: TlsFiles, cert_pem: bytes, key_pem: bytes, ca_pem: bytes, *, now: dt.datetime | None = None
) -> TlsIdentity:
    """The checks of ``check_tls_files`` on bytes read already (a service reloading renewed files reads each once,
    then checks and installs exactly those bytes); ``files`` names them in messages."""
    moment = _now(now)
    cert_what = f"{files.role} certificate"
    if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
        raise TlsError(f"{files.where(cert_what, files.cert)} is not a PEM certificate")
    cert = _parse_certificates(files, cert_what, files.cert, cert_pem)[0]
    cas = _parse_certificates(files, "CA certificate", files.ca, ca_pem)
    problems: list[str] = []
    where_cert = files.where(cert_what, files.cert)
    where_key = files.where("private key", files.key)
    where_ca = files.where("CA certificate", files.ca)
    try:
        key = serialization.load_pem_private_key(key_pem, None)
    except TypeError:
        problems.append(f"{where_key} is encrypted: gRPC cannot ask for a passphrase; install the unencrypted key")
    except (ValueError, UnsupportedAlgorithm):
        problems.append(f"{where_key} is not a PEM private key")
    else:
        if _spki(key.public_key()) != _spki(cert.public_key()):
            problems.append(f"{where_key} does not belong to the certificate {files.cert} (a key of another one)")
    authorities = [ca for ca in cas if _is_ca(ca)]
    issuers = [ca for ca in authorities if _issued_by(cert, ca)]
    if not authorities:
        problems.append(f"{where_ca} is not a CA certificate (BasicConstraints ca=True missing): the wrong file?")
    elif not issuers:
        problems.append(
            f"{where_cert} is not signed by the CA in {files.ca} (issued by {cert.issuer.rfc4514_string()})"
        )
    elif all(moment > ca.not_valid_after_utc for ca in issuers):
        problems.append(f"{where_ca} expired on {_utc(max(ca.not_valid_after_utc for ca in issuers))}")
    if moment + CLOCK_SKEW < cert.not_valid_before_utc:
        problems.append(
            f"{where_cert} is not yet valid: valid from {_utc(cert.not_valid_before_utc)} "
            f"(now {_utc(moment)}; check the system clock)"
        )
    elif moment > cert.not_valid_after_utc:
        problems.append(f"{where_cert} expired on {_utc(cert.not_valid_after_utc)}")
    needed = ROLE_USAGES[files.role]
    usages = _usages(cert)
    if usages is not None and needed not in usages and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in usages:
        allowed = ", ".join(_USAGE_NAMES.get(oid, oid.dotted_string) for oid in usages) or "none"
        problems.append(
            f"{where_cert} is not for a {files.role} (extended key usage {allowed}, {_USAGE_NAMES[needed]} needed): "
            f"issue one with 'hedui-keys ca issue --{files.role}'"
        )
    party = party_from_certificate(cert_pem)
    if party != files.party:
        named = f"party {party}" if party else "no party (no hedui://party/ URI)"
        problems.append(f"{where_cert} names {named}, but must name {files.party}")
    if problems:
        raise TlsError("\n".join(problems))
    return TlsIdentity(files, cert_pem, key_pem, ca_pem, cert.not_valid_after_utc, cert.serial_number)


def check_tls(files: Iterable[TlsFiles], *, now: dt.datetime | None = None) -> list[TlsIdentity]:
    """``check_tls_files`` for every identity; one TlsError with every problem of all of them (one per line)."""
    identities: list[TlsIdentity] = []
    problems: list[str] = []
    for one in files:
        try:
            identities.append(check_tls_files(one, now=now))
        except TlsError as exc:
            problems.extend(str(exc).splitlines())
    if len(problems) == 1:
        raise TlsError(problems[0])
    if problems:
        raise TlsError(f"{len(problems)} TLS problems:\n" + "\n".join(f"  {p}" for p in problems))
    return identities
