"""``hedui-gateway tls``: certificates renewed without carrying a private key (docs/operations.md, "Renewing
certificates").

  tls requests            the units' certificate requests waiting to be signed (party, names, key, age)
  tls sign-requests       sign them with the CA (``--ca-dir`` where the agency keeps it), queue each for its unit
  tls drop-request        never sign a unit's pending request (a request the operator does not trust)
  tls export-requests     write the pending requests to a folder, for a CA kept on an offline machine
  tls import-certificates take the certificates that machine signed (``hedui-keys ca sign-requests``), and the
                          gateway's own renewed certificates (``tls renew --export``)
  tls renew               renew the gateway's own certificates: new keys made on this host; the running gateway
                          reloads them

Requests and certificates are public. The CA key stays where it is kept; the units' and the gateway's private keys
never leave the host that made them.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.errors import HeduiError
from gateway.certificates.requests import (
    CERTIFICATE_SUFFIX,
    REQUEST_SUFFIX,
    CertificateRequests,
    Issued,
)
from gateway.config import GatewayConfig
from gateway.db.database import open_database
from keys import keystore
from keys.clock import SystemClock
from keys.crl import write_atomically
from keys.csr import CertificateProfile, issue_for_request, key_sha256, make_request
from keys.errors import KeystoreError
from keys.tls import (
    LEAF_VALID_DAYS,
    TlsError,
    TlsFiles,
    check_tls_material,
    load_ca_key,
    load_certificate,
    read_ca_bundle,
    read_private_key,
)

CA_CERT_FILE, CA_KEY_FILE = "ca.crt", "ca.key"
MAX_CA_KEY_BYTES = 1024 * 1024
#: Beside each of the gateway's own keys, the new key of ``tls renew --export`` waits for its certificate.
PENDING_SUFFIX = ".pending"


class CertificateCommandError(HeduiError):
    """A ``hedui-gateway tls`` command cannot do what was asked; nothing was changed."""

    code = "tls_command"


def _now_ms() -> int:
    return SystemClock().now_ms()


def _operator() -> str:
    try:
        return f"operator:{getpass.getuser()}"[:64]
    except (KeyError, OSError):
        return f"operator:uid{os.getuid()}"


@contextmanager
def _requests(config: GatewayConfig) -> Iterator[CertificateRequests]:
    engine = open_database(config.database.url)
    try:
        yield CertificateRequests(engine)
    finally:
        engine.dispose()


def _units_ca(config: GatewayConfig) -> bytes:
    """The CA bundle the units' server certificates chain to (what the units check their certificates against)."""
    if config.client_tls.ca is None:
        raise CertificateCommandError("client_tls.ca is not set: the CA of the units' certificates is not known")
    return read_ca_bundle(config.client_tls.ca)


def _passphrase(args: argparse.Namespace, what: str) -> str:
    """The CA key's passphrase: --passphrase-file, HEDUI_KEYS_PASSPHRASE or a prompt (as ``hedui-keys ca issue``)."""
    if args.passphrase_file:
        return keystore.read_passphrase_file(Path(args.passphrase_file))
    env = os.environ.get("HEDUI_KEYS_PASSPHRASE")
    if env:
        return env
    if not sys.stdin.isatty():
        raise CertificateCommandError(
            "no passphrase: use --passphrase-file, HEDUI_KEYS_PASSPHRASE or run in a terminal"
        )
    return getpass.getpass(f"Passphrase for {what}: ")


def _ca(args: argparse.Namespace) -> tuple[bytes, bytes, str]:
    """(CA certificate, CA key file, passphrase) from ``--ca-dir``; the key refused while others may read it."""
    ca_dir = Path(args.ca_dir)
    cert = read_ca_bundle(ca_dir / CA_CERT_FILE)
    try:
        key = keystore.read_secret_file(ca_dir / CA_KEY_FILE, what="CA key", limit=MAX_CA_KEY_BYTES)
    except KeystoreError as exc:
        raise CertificateCommandError(str(exc)) from None
    return cert, key, _passphrase(args, str(ca_dir / CA_KEY_FILE))


def _age(ms: int) -> str:
    hours = ms / 3_600_000
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def _issued_line(issued: Issued) -> str:
    state = "queued for the unit" if issued.new else "issued meanwhile by another command"
    return f"  {issued.party_id}: serial {issued.serial}, until {issued.not_after:%Y-%m-%d}; {state}"


def _list(args: argparse.Namespace) -> None:
    config = GatewayConfig.load(Path(args.config))
    now = _now_ms()
    with _requests(config) as requests:
        pending = requests.pending(args.party)
    for request in pending:
        names = ", ".join(request.profile.names) or "none"
        print(f"{request.party_id}  waiting {_age(now - request.received_at_ms)}")
        print(f"    names {names}; usage {request.profile.usages}; key {request.key_fingerprint}")
    if not pending:
        print("no certificate request is waiting")
    else:
        print(f"{len(pending)} waiting: compare each key with the unit's 'hedui-connector tls renewal-status', then")
        print("  hedui-gateway tls sign-requests --config FILE --ca-dir CA_DIR")


def _sign(args: argparse.Namespace) -> None:
    config = GatewayConfig.load(Path(args.config))
    units_ca = _units_ca(config)
    with _requests(config) as requests:
        if not requests.pending(args.party):
            print("no certificate request is waiting" + (f" from {args.party}" if args.party else ""))
            return
        ca_cert, ca_key, passphrase = _ca(args)
        issued = requests.sign(
            ca_cert,
            ca_key,
            passphrase=passphrase,
            units_ca_pem=units_ca,
            now_ms=_now_ms(),
            operator=_operator(),
            party=args.party,
            valid_days=args.valid_days,
        )
    print(f"issued {len(issued)} certificate(s); each unit installs its own at the next trust synchronisation:")
    for one in issued:
        print(_issued_line(one))


def _drop(args: argparse.Namespace) -> None:
    config = GatewayConfig.load(Path(args.config))
    with _requests(config) as requests:
        dropped = requests.drop(args.party, _now_ms(), _operator())
    print(f"dropped {dropped} pending request(s) of {args.party}" if dropped else f"{args.party} has none pending")


def _export(args: argparse.Namespace) -> None:
    config = GatewayConfig.load(Path(args.config))
    folder = Path(args.dir)
    if not folder.is_dir():
        raise CertificateCommandError(f"{folder} is not a folder")
    with _requests(config) as requests:
        written = requests.export(folder, args.party)
    for path in written:
        print(f"  {path}")
    print(
        f"wrote {len(written)} request(s). They are public: carry the folder to the CA's machine (the agency's own), "
        "sign them there with 'hedui-keys ca sign-requests', and bring the .crt files back to "
        "'hedui-gateway tls import-certificates'"
    )


def _own_files(config: GatewayConfig, role: str | None) -> list[TlsFiles]:
    files = [f for f in config.tls_files() if role in (None, f.role)]
    if not files:
        raise CertificateCommandError("the config names no TLS certificate of the gateway's own to renew")
    return files


def _pending_path(files: TlsFiles) -> Path:
    return files.key.with_name(files.key.name + PENDING_SUFFIX)


def _install_own(files: TlsFiles, cert_pem: bytes, key_pem: bytes) -> None:
    """Check the new pair as the running gateway will, then write key and certificate over the old ones, each by
    rename (key first): the running gateway reloads them (common/tlsreload.py)."""
    ca_pem = read_ca_bundle(files.ca)
    identity = check_tls_material(files, cert_pem, key_pem, ca_pem)
    try:
        mode = files.cert.stat().st_mode & 0o644 or 0o644
    except OSError:
        mode = 0o644
    try:
        old_key = read_private_key(files.key)
    except (KeystoreError, OSError):
        old_key = None
    try:
        write_atomically(files.key, key_pem, mode=0o600)
        try:
            write_atomically(files.cert, cert_pem, mode=mode)
        except OSError:
            if old_key is not None:
                write_atomically(files.key, old_key, mode=0o600)
            raise
    except OSError as exc:
        raise CertificateCommandError(f"cannot write {files.cert} and {files.key}: {exc.strerror}") from None
    print(f"  [{files.section}] {files.cert}: serial {identity.serial:x}, until {identity.not_after:%Y-%m-%d}")


def _renew(args: argparse.Namespace) -> None:
    config = GatewayConfig.load(Path(args.config))
    own = _own_files(config, args.role)
    if args.export:
        folder = Path(args.export)
        if not folder.is_dir():
            raise CertificateCommandError(f"{folder} is not a folder")
        for files in own:
            profile = CertificateProfile.of_certificate(read_ca_bundle(files.cert))
            request, key_pem = make_request(profile)
            write_atomically(_pending_path(files), key_pem, mode=0o600)
            path = folder / f"{profile.party}-{request.key_sha256[:4].hex()}{REQUEST_SUFFIX}"
            write_atomically(path, request.pem(), mode=0o644)
            print(f"  [{files.section}] request {path} (key {request.key_fingerprint}, kept in {_pending_path(files)})")
        print("sign them on the CA's machine ('hedui-keys ca sign-requests') and bring the .crt files back to")
        print("  hedui-gateway tls import-certificates --config FILE DIR")
        return
    if not args.ca_dir:
        raise CertificateCommandError("give --ca-dir (the CA on this host) or --export DIR (a CA kept offline)")
    ca_cert, ca_key_file, passphrase = _ca(args)
    ca_key = load_ca_key(ca_key_file, passphrase)
    plain = ca_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    print("renewed; the running gateway uses the new certificates for new connections within seconds:")
    for files in own:
        profile = CertificateProfile.of_certificate(read_ca_bundle(files.cert))
        request, key_pem = make_request(profile)  # the new key is made here, on the gateway's host
        cert = issue_for_request(ca_cert, plain, request, valid_days=args.valid_days)
        _install_own(files, cert.public_bytes(serialization.Encoding.PEM), key_pem)


def _import_own(config: GatewayConfig, paths: list[Path]) -> tuple[int, list[Path]]:
    """Install the certificates among ``paths`` that answer the gateway's own pending keys; (installed, the rest)."""
    pending: dict[bytes, tuple[TlsFiles, bytes]] = {}
    for files in config.tls_files():
        try:
            key_pem = read_private_key(_pending_path(files))
        except (KeystoreError, OSError):
            continue
        key = serialization.load_pem_private_key(key_pem, None)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            pending[key_sha256(key.public_key())] = (files, key_pem)
    installed, rest = 0, []
    for path in paths:
        try:
            cert_pem = read_ca_bundle(path)
            public_key = load_certificate(cert_pem).public_key()
        except TlsError:
            rest.append(path)
            continue
        match = pending.get(key_sha256(public_key)) if isinstance(public_key, ec.EllipticCurvePublicKey) else None
        if match is None:
            rest.append(path)
            continue
        files, key_pem = match
        _install_own(files, cert_pem, key_pem)
        _pending_path(files).unlink(missing_ok=True)
        installed += 1
    return installed, rest


def _import(args: argparse.Namespace) -> None:
    config = GatewayConfig.load(Path(args.config))
    folder = Path(args.dir)
    if not folder.is_dir():
        raise CertificateCommandError(f"{folder} is not a folder")
    paths = sorted(p for p in folder.iterdir() if p.suffix == CERTIFICATE_SUFFIX and p.is_file())
    own, rest = _import_own(config, paths)
    if own:
        print(f"installed {own} certificate(s) of the gateway's own; the running gateway reloads them")
    units_ca = _units_ca(config)
    with _requests(config) as requests:
        issued, skipped = requests.import_certificates(
            rest, units_ca_pem=units_ca, now_ms=_now_ms(), operator=_operator()
        )
    print(f"took {len(issued)} certificate(s) for the units' requests:")
    for one in issued:
        print(_issued_line(one))
    for line in skipped:
        print(f"  not taken: {line}", file=sys.stderr)


def add_certificate_commands(tls_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The certificate commands under ``hedui-gateway tls``."""
    listing = tls_sub.add_parser("requests", help="the units' certificate requests waiting to be signed")
    listing.add_argument("--party", help="only this unit's")
    listing.set_defaults(func=_list)
    sign = tls_sub.add_parser(
        "sign-requests", help="sign the waiting requests with the CA in --ca-dir and send each to its unit"
    )
    sign.add_argument("--ca-dir", required=True, help="folder holding the CA's ca.crt and ca.key")
    sign.add_argument("--party", help="only this unit's request")
    sign.add_argument("--valid-days", type=int, default=LEAF_VALID_DAYS, help="lifetime of each certificate")
    drop = tls_sub.add_parser("drop-request", help="never sign a unit's waiting request")
    drop.add_argument("--party", required=True)
    drop.set_defaults(func=_drop)
    sign.set_defaults(func=_sign)
    export = tls_sub.add_parser("export-requests", help="write the waiting requests (public) to DIR for an offline CA")
    export.add_argument("dir")
    export.add_argument("--party", help="only this unit's request")
    export.set_defaults(func=_export)
    take = tls_sub.add_parser(
        "import-certificates", help="take the .crt files an offline CA signed: the units' and the gateway's own"
    )
    take.add_argument("dir")
    take.set_defaults(func=_import)
    renew = tls_sub.add_parser(
        "renew", help="renew the gateway's own certificates: new keys made on this host, reloaded while running"
    )
    renew.add_argument("--ca-dir", help="folder holding the CA's ca.crt and ca.key (the CA on this host)")
    renew.add_argument("--export", metavar="DIR", help="instead: write requests to DIR for a CA kept offline")
    renew.add_argument("--role", choices=("server", "client"), help="only this certificate (default: both)")
    renew.add_argument("--valid-days", type=int, default=LEAF_VALID_DAYS, help="lifetime of each certificate")
    renew.set_defaults(func=_renew)
    for command in (listing, sign, drop, export, take, renew):
        command.add_argument("--config", required=True)
    for command in (sign, renew):
        command.add_argument("--passphrase-file", help="the CA key's passphrase (one line, mode 0600)")


__all__ = ["CertificateCommandError", "add_certificate_commands"]
