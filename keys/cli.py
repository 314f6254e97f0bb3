"""hedui-keys: a party's keystore, peers' keys, key letters, rotation, revocation, sealed files and TLS certificates.

Run ``hedui-keys --help`` or ``hedui-keys COMMAND --help``. The keystore path comes from ``--keystore`` or
HEDUI_KEYSTORE, the passphrase from ``--passphrase-file``, HEDUI_KEYS_PASSPHRASE or a prompt; the replay store that
lets a sealed file open only once from ``--replay-store``, HEDUI_REPLAY_STORE, or beside the keystore. Errors print one
line (and a hint) to stderr and exit with status 1; nothing is changed by a command that fails. The ``ca`` commands
(the private CA for mutual TLS, keys/tls.py) need no keystore; their passphrase protects the CA key. A staff
member's own keystore (party id ``staff.REGION.ID``) signs exchange approvals with ``sign-approval`` and procedure
steps (intake, review, report issue) with ``sign-step``. Anyone holding an agency's keys checks its signed
verification reports with ``verify-report``; with the staff members' keys (``--staff-keys``) also who signed each step.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import hashlib
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hedui.v1 import agency_pb2

from common.cli import add_version
from keys import crl, csr, keystore, tls
from keys._files import read_bounded
from keys.announcements import ANNOUNCEMENT_LABEL, armor, dearmor, read_bundle
from keys.clock import DAY_MS, SystemClock, from_ms, iso
from keys.crl import write_atomically
from keys.envelope import Courier
from keys.errors import EnvelopeError, KeysError
from keys.fingerprint import Algorithm
from keys.identity import PartyKeys
from keys.keyring import KeyRecord, Keyring
from keys.party import check_party_id
from keys.replay import FileReplayCache, MemoryReplayCache, default_replay_store_path
from keys.sealedfile import MAX_CONTENT_BYTES, MAX_SEALED_FILE_BYTES, open_sealed_file, seal_file
from keys.statements import (
    EXCHANGE_DIGEST_BYTES,
    MAX_SIGNED_REPORT_BYTES,
    approval_message,
    read_signed_report,
    report_agency,
    verify_report_by,
)
from keys.steps import (
    MAX_STAFF_KEYS_BYTES,
    STEP_KINDS,
    ReportSigners,
    build_step,
    check_report_signers,
    read_staff_keys,
    sign_step,
)
from keys.truststore import TrustStore

MIN_PASSPHRASE_LENGTH = 12
_ALGORITHMS = {"signing": Algorithm.ED25519, "agreement": Algorithm.X25519}
CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
MAX_PEM_BYTES = 1024 * 1024
_BEIJING = timezone(timedelta(hours=8), "CST")


class CliError(KeysError):
    """A command cannot run as asked (bad argument, missing file, refusal to overwrite)."""

    code = "cli"


class _Session:
    """What one command works on: the keystore path, passphrase, clock, and (once loaded) keys and peers."""

    def __init__(self, args: argparse.Namespace) -> None:
        self._path: str | None = args.keystore or os.environ.get("HEDUI_KEYSTORE")
        self._replay_path: str | None = args.replay_store or os.environ.get("HEDUI_REPLAY_STORE")
        self.passphrase_file: str | None = args.passphrase_file
        self.clock = SystemClock()
        #: The keystore's lock, held from load() until the command ends (keystore.locked): a running gateway or
        #: connector that changes the same keystore meanwhile waits, instead of one of the two changes being lost.
        self.held = contextlib.ExitStack()

    @property
    def path(self) -> Path:
        if not self._path:
            raise CliError("no keystore given: use --keystore PATH or set HEDUI_KEYSTORE")
        return Path(self._path)

    @property
    def replay_path(self) -> Path:
        """The keystore's replay store: --replay-store, HEDUI_REPLAY_STORE, else ``<keystore>.replay`` beside it."""
        return Path(self._replay_path) if self._replay_path else default_replay_store_path(self.path)

    def passphrase(self, *, confirm: bool = False, what: str | None = None) -> str:
        """The passphrase from the file, the environment or a prompt naming ``what`` (default: the keystore)."""
        if self.passphrase_file:
            return keystore.read_passphrase_file(Path(self.passphrase_file))
        env = os.environ.get("HEDUI_KEYS_PASSPHRASE")
        if env:
            return env
        if not sys.stdin.isatty():
            raise CliError("no passphrase: use --passphrase-file, HEDUI_KEYS_PASSPHRASE or run in a terminal")
        first = getpass.getpass(f"Passphrase for {what or self.path}: ")
        if confirm and getpass.getpass("Repeat passphrase: ") != first:
            raise CliError("the two passphrases differ")
        return first

    def load(self) -> tuple[PartyKeys, TrustStore]:
        passphrase = self.passphrase()  # before the lock: a prompt must not hold up a running service
        self.held.enter_context(keystore.locked(self.path, required=False))
        party, trust = keystore.load(self.path, passphrase)
        now = self.clock.now_ms()
        if party.advance(now):
            self.save(party, trust)
        trust.advance(now)
        return party, trust

    def save(self, party: PartyKeys, trust: TrustStore, passphrase: str | None = None) -> None:
        keystore.save(self.path, party, trust, passphrase or self.passphrase())


def _write_new(path: Path, data: bytes | str, *, force: bool = False, private: bool = False) -> None:
    """Write a file that must not exist yet (unless ``force``); ``private`` files get mode 0600."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600 if private else 0o644)
    except FileExistsError as exc:
        raise CliError(f"{path} exists; choose another name or remove it first") from exc
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _write_new_private(path: Path, data: bytes) -> None:
    """Write a private file that must not exist yet, atomically with mode 0600."""
    if path.exists() or path.is_symlink():
        raise CliError(f"{path} exists; choose another name or remove it first")
    try:
        keystore.write_private_file(path, data)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror}") from exc


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot create the folder {path}: {exc.strerror}") from exc


def _read(path: str, limit: int = MAX_SEALED_FILE_BYTES, *, what: str = "sealed file") -> bytes:
    """The bytes of an input file: refused (CliError) unless it is a regular file of at most ``limit`` bytes."""
    try:
        return read_bounded(path, limit, CliError, what=what)
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from exc


def _describe(record: KeyRecord) -> str:
    use = "signing  " if record.algorithm is Algorithm.ED25519 else "agreement"
    window = f"{iso(record.not_before_ms)} .. {iso(record.not_after_ms)}"
    state = record.state.name.lower()
    return f"  {use} {record.key_id.hex()}  {state:8}  {window}\n      fingerprint {record.public.fingerprint}"


def cmd_init(session: _Session, args: argparse.Namespace) -> None:
    """Create a new keystore for a party."""
    party_id = check_party_id(args.party_id)
    if session.path.exists():
        raise CliError(f"{session.path} exists; a keystore is never overwritten")
    passphrase = session.passphrase(confirm=True)
    if len(passphrase) < MIN_PASSPHRASE_LENGTH:
        raise CliError(f"passphrase must be at least {MIN_PASSPHRASE_LENGTH} characters")
    party = PartyKeys.create(party_id, now_ms=session.clock.now_ms())
    session.save(party, TrustStore(), passphrase)
    bundle = read_bundle(party.bundle(session.clock.now_ms()))
    print(f"created keystore {session.path} for {party_id}")
    print(f"bundle fingerprint: {bundle.fingerprint}")


def cmd_list(session: _Session, args: argparse.Namespace) -> None:
    """List own keys and peers' keys with states, windows and fingerprints."""
    party, trust = session.load()
    print(f"party {party.party_id}")
    for record in party.records():
        print(_describe(record))
    for peer, keyring in trust:
        print(f"peer {peer}")
        for record in keyring:
            print(_describe(record))


def cmd_letter(session: _Session, args: argparse.Namespace) -> None:
    """Print a key letter: what the other side compares before importing our bundle."""
    party, _ = session.load()
    now = session.clock.now_ms()
    bundle = read_bundle(party.bundle(now))
    lines = [
        "核对系统 数据交换 公钥确认函 / Hedui key letter",
        "=" * 60,
        f"参与方 Party:            {party.party_id}",
        f"日期 Date (UTC):         {iso(now)}",
        "公钥包指纹 Bundle fingerprint:",
        f"    {bundle.fingerprint}",
        "",
        "密钥 Keys:",
        *(_describe(r) for r in bundle.keys),
        "",
        "接收方导入前须通过电话或当面逐组核对指纹，一致后方可导入：",
        "Before importing, read the bundle fingerprint aloud with the sender, group by group:",
        f"    hedui-keys import BUNDLE --fingerprint '{bundle.fingerprint}'",
        "",
        "经办人 Prepared by: ____________    复核人 Checked by: ____________    (盖章 seal)",
    ]
    text = "\n".join(lines) + "\n"
    if args.out:
        _write_new(Path(args.out), text)
        print(f"wrote {args.out}")
    else:
        print(text, end="")


def cmd_export(session: _Session, args: argparse.Namespace) -> None:
    """Write our public bundle (armored text) for peers."""
    party, _ = session.load()
    data = party.bundle(session.clock.now_ms())
    _write_new(Path(args.out), armor(data), force=args.force)
    print(f"wrote {args.out}; fingerprint {read_bundle(data).fingerprint}")


def cmd_inspect(session: _Session, args: argparse.Namespace) -> None:
    """Show a bundle's party, keys and fingerprint without importing it (no keystore needed)."""
    bundle = read_bundle(dearmor(_read(args.bundle, what="bundle").decode("utf-8", "replace")))
    print(f"party {bundle.party_id}, issued {iso(bundle.issued_at_ms)}")
    for record in bundle.keys:
        print(_describe(record))
    print(f"bundle fingerprint: {bundle.fingerprint}")


def cmd_import(session: _Session, args: argparse.Namespace) -> None:
    """Trust a peer's bundle, only when --fingerprint matches it."""
    party, trust = session.load()
    data = dearmor(_read(args.bundle, what="bundle").decode("utf-8", "replace"))
    bundle = trust.import_bundle(
        data, expected_fingerprint=args.fingerprint, own_party_id=party.party_id, now_ms=session.clock.now_ms()
    )
    session.save(party, trust)
    print(f"imported {len(bundle.keys)} keys of {bundle.party_id}")


_DELIVERY = (
    "a gateway or connector serving with this keystore notices the change within [keys] watch_interval_seconds "
    '(5 s) and delivers the announcement to every peer at its next trust synchronisation (docs/keys.md, "Keys '
    'over the wire")'
)


def _announcement_out(args: argparse.Namespace) -> Path | None:
    """The --out file for an announcement, refused before anything changes if it exists."""
    if not args.out:
        return None
    out = Path(args.out)
    if out.exists():
        raise CliError(f"{out} exists; choose another name for the announcement")
    return out


def cmd_rotate(session: _Session, args: argparse.Namespace) -> None:
    """Replace our current signing or agreement key; a running service delivers the announcement to every peer."""
    party, trust = session.load()
    out = _announcement_out(args)
    algorithm = _ALGORITHMS[args.which]
    now = session.clock.now_ms()
    takeover = now + int(args.activate_in_days * DAY_MS)
    announcement = party.rotate(
        algorithm, now_ms=now, overlap_ms=int(args.overlap_days * DAY_MS), activate_at_ms=takeover
    )
    session.save(party, trust)
    if out is not None:
        _write_new(out, armor(announcement, ANNOUNCEMENT_LABEL))
    if takeover > now:
        print(
            f"rotated the {args.which} key: the new key takes over at {iso(takeover)}, the old one is used until "
            f"then and retires {args.overlap_days:g} days later"
        )
    else:
        print(f"rotated the {args.which} key; old key retires in {args.overlap_days:g} days")
    print(f"{_DELIVERY}" + (f"; {out} is for a peer reached otherwise ('hedui-keys apply {out.name}')" if out else ""))


def cmd_revoke(session: _Session, args: argparse.Namespace) -> None:
    """Revoke one of our keys now; a running service delivers the announcement to every peer."""
    party, trust = session.load()
    out = _announcement_out(args)
    try:
        key_id = bytes.fromhex(args.key_id)
    except ValueError as exc:
        raise CliError("key id must be 32 hexadecimal characters (see 'hedui-keys list')") from exc
    announcement = party.revoke(key_id, now_ms=session.clock.now_ms(), reason=args.reason)
    session.save(party, trust)
    if out is not None:
        _write_new(out, armor(announcement, ANNOUNCEMENT_LABEL))
    print(f"revoked {args.key_id}; {_DELIVERY}" + (f"; {out} is for a peer reached otherwise" if out else ""))


def cmd_apply(session: _Session, args: argparse.Namespace) -> None:
    """Apply a peer's signed rotation or revocation announcement."""
    party, trust = session.load()
    data = dearmor(_read(args.announcement, what="announcement").decode("utf-8", "replace"), ANNOUNCEMENT_LABEL)
    record = trust.apply_announcement(data, now_ms=session.clock.now_ms())
    session.save(party, trust)
    print(f"applied: key {record.key_id.hex()} is now {record.state.name.lower()}")


def cmd_seal(session: _Session, args: argparse.Namespace) -> None:
    """Seal a file for a peer (signed by us, readable only by the peer)."""
    party, trust = session.load()
    source = Path(args.file)
    content = _read(args.file, MAX_CONTENT_BYTES, what="file to seal")
    courier = Courier(party, trust, replay=MemoryReplayCache(), clock=session.clock)
    envelope = seal_file(
        courier, source.name, content, args.to, ttl_ms=int(args.ttl_days * DAY_MS), media_type=args.media_type or ""
    )
    out = Path(args.out or f"{source.name}.{args.to}.hsf")
    _write_new(out, envelope, private=True)
    print(f"sealed {source.name} ({len(content)} bytes) for {args.to} -> {out}")


def cmd_open(session: _Session, args: argparse.Namespace) -> None:
    """Open a sealed file sent to us, once: writes the original file into --out-dir and remembers it in the replay
    store, so that the same sealed file is refused ever after (docs/envelope.md section 11)."""
    party, trust = session.load()
    data = _read(args.file)
    out_dir = Path(args.out_dir)
    refusal: EnvelopeError | None = None
    with FileReplayCache(session.replay_path, party_id=party.party_id) as replay, replay.transaction():
        # One transaction: the file counts as opened only once its content is written, and a second process
        # opening the same file waits here and then finds it remembered.
        courier = Courier(party, trust, replay=replay, clock=session.clock, on_reject=lambda e: None)
        try:
            opened = open_sealed_file(courier, data)
        except EnvelopeError as exc:
            refusal = exc  # leave the block normally: what a refused envelope left in the store is kept (section 10)
        else:
            _mkdir(out_dir)
            _write_new(out_dir / opened.file_name, opened.content, private=True)
    if refusal is not None:
        # Our own operator may see the precise reason; a remote party would only get "invalid envelope".
        hint = ""
        if refusal.code == "replay":
            hint = f". This sealed file was opened before with this keystore (replay store {session.replay_path})"
        raise CliError(f"refused {args.file}: {refusal.public_message} ({refusal.code}: {refusal}){hint}") from refusal
    header = opened.header
    print(f"opened {args.file}: from {header.sender} (key {header.sender_key_id.hex()})")
    print(f"created {iso(header.created_at_ms)}, expires {iso(header.expires_at_ms)}")
    print(f"wrote {out_dir / opened.file_name} ({len(opened.content)} bytes)")


def cmd_sign_approval(session: _Session, args: argparse.Namespace) -> None:
    """Approve an exchange (Procedure V.(二)): sign the commission's exchange digest with our signing key."""
    try:
        digest = bytes.fromhex(args.digest)
    except ValueError:
        digest = b""
    if len(digest) != EXCHANGE_DIGEST_BYTES:
        raise CliError(f"--digest must be the commission's exchange digest: {2 * EXCHANGE_DIGEST_BYTES} hex digits")
    party, _ = session.load()
    key = party.signing_key(session.clock.now_ms())
    # stdout carries the signature alone, so that it can be piped into the agency's back office as it is.
    print(key.sign(approval_message(digest)).hex())
    print(f"signed by {party.party_id}, key {key.key_id.hex()}", file=sys.stderr)


def cmd_sign_step(session: _Session, args: argparse.Namespace) -> None:
    """Sign a procedure step (Procedure V.(一): intake, review, report issue) with our signing key, for the back
    office to send with RecordIntake, RecordReview or IssueReport (docs/agency-api.md, "Signed procedure steps")."""
    try:
        digest = bytes.fromhex(args.digest)
    except ValueError:
        digest = b""
    if len(digest) != EXCHANGE_DIGEST_BYTES:
        raise CliError(f"--digest must be the commission's exchange digest: {2 * EXCHANGE_DIGEST_BYTES} hex digits")
    kind = STEP_KINDS[args.step]
    if args.step == "report":
        if args.passed or args.failed or args.reason:
            raise CliError("a report step has no --passed, --failed or --reason (only --partial)")
        passed = True
    else:
        if args.partial:
            raise CliError("--partial goes with --step report only")
        if args.passed == args.failed:
            raise CliError(f"say how the {args.step} step ends: --passed, or --failed with --reason")
        passed = args.passed
        if passed and args.reason:
            raise CliError("--reason goes with --failed: a passing step is signed (and sent) without a reason")
        if not passed and not args.reason:
            raise CliError("a return or termination (--failed) needs --reason, exactly as the back office sends it")
    step = build_step(
        agency=args.agency,
        commission_id=args.commission,
        kind=kind,
        staff_id=args.staff_id,
        exchange_digest=digest,
        passed=passed,
        reason=args.reason or "",
        partial=args.partial,
    )
    party, _ = session.load()
    key = party.signing_key(session.clock.now_ms())
    # stdout carries the signature alone, so that it can be piped into the agency's back office as it is.
    print(sign_step(step, key).hex())
    signer = f"{party.party_id}, key {key.key_id.hex()}"
    print(f"signed the {args.step} step of {args.commission} as {args.staff_id}: {signer}", file=sys.stderr)


def _print_signers(found: ReportSigners, keys_given: bool) -> None:
    def checked(verified: bool | None) -> str:
        if verified is None:
            return "signature not checked (no key given)"
        return "signature verifies" if verified else "SIGNATURE DOES NOT VERIFY"

    for signer in (*found.steps, *found.approvals):
        at = from_ms(signer.at_ms).astimezone(_BEIJING).strftime("%Y-%m-%d %H:%M:%S")
        decision = "" if signer.label in {"report", "approval"} else (" passed" if signer.passed else " not passed")
        print(f"  {signer.label:9}  {signer.staff_id:12} {at} Beijing time{decision}; {checked(signer.verified)}")
    if not found.steps and not found.approvals:
        print("  signers:     none recorded (a report issued before signed procedure steps)")
    approvers = "yes" if found.two_distinct_approvers else "no"
    others = [s.staff_id for s in found.steps if s.kind != agency_pb2.STEP_KIND_INTAKE]
    if found.step(agency_pb2.STEP_KIND_INTAKE) is None and len(others) == len(set(others)) == 2:
        # Procedure III.(二)2: a lower-level agency's commission enters at review; its intake was not taken here.
        print("  Procedure V.(一) no intake step (a lower-level agency's commission enters at review, or one recorded")
        print("  before signed steps); review and report by two different staff ids: yes")
    else:
        people = "yes" if found.three_different_people else "no"
        print(f"  Procedure V.(一) intake, review and report by three different staff ids: {people}")
    print(f"  Procedure V.(二) exchange approved by two distinct staff ids: {approvers}")
    if not keys_given:
        print("  the staff signatures were not checked: give --staff-keys to check them (the report's own signature")
        print("  shows only that the agency recorded these signers)")
    for problem in found.problems:
        print(f"PROBLEM: {problem}")


def cmd_verify_report(session: _Session, args: argparse.Namespace) -> None:
    """Verify a signed verification report (核对报告) with the issuing agency's keys from the trust store, or
    with --bundle and --fingerprint (no keystore needed)."""
    signed = read_signed_report(_read(args.file, MAX_SIGNED_REPORT_BYTES, what="signed report"))
    keyring: Keyring | None
    if args.bundle:
        if not args.fingerprint:
            raise CliError("--bundle needs --fingerprint: the fingerprint from the agency's key letter")
        bundle = read_bundle(dearmor(_read(args.bundle, what="bundle").decode("utf-8", "replace")))
        bundle.require_fingerprint(args.fingerprint)
        party_id, keyring = bundle.party_id, Keyring(bundle.keys)
    elif args.fingerprint:
        raise CliError("--fingerprint goes with --bundle; without them the keystore's trust store is used")
    else:
        _, trust = session.load()
        party_id = report_agency(signed)
        keyring = trust.keyring(party_id)
    report = verify_report_by(signed, keyring, party_id)
    issued = from_ms(report.issued_at_ms).astimezone(_BEIJING).strftime("%Y-%m-%d %H:%M:%S")
    print(f"OK: the report is signed by {party_id}, key {signed.signer_key_id.hex()}")
    print(f"  commission:  {report.commission_id} (letter {report.letter_number or '-'})")
    print(f"  agency:      {report.agency}")
    print(f"  issued:      {issued} Beijing time ({iso(report.issued_at_ms)}) by {report.issued_by}")
    if report.partial:
        print(f"  partial:     yes, units not answered: {', '.join(report.units_not_answered)}")
    else:
        print("  partial:     no")
    print(f"  report sha256: {hashlib.sha256(signed.report).hexdigest()} (compare with the printout)")
    staff_keys = None
    if args.staff_keys:
        text = _read(args.staff_keys, MAX_STAFF_KEYS_BYTES, what="staff keys file")
        staff_keys = read_staff_keys(text.decode("utf-8", "replace"))
    found = check_report_signers(report, staff_keys)
    if staff_keys is not None:
        for signer in (*found.steps, *found.approvals):
            if signer.verified is None:
                found.problems.append(f"no key given for {signer.staff_id} in {args.staff_keys}")
    _print_signers(found, staff_keys is not None)
    if found.problems:
        raise CliError(f"the report's staff signatures failed the check ({len(found.problems)} problem(s))")


def cmd_ca_init(session: _Session, args: argparse.Namespace) -> None:
    """Create a private CA for mutual TLS: DIR/ca.crt and DIR/ca.key, the key encrypted with the passphrase."""
    ca_dir = Path(args.dir)
    cert_path, key_path = ca_dir / CA_CERT_FILE, ca_dir / CA_KEY_FILE
    for path in (cert_path, key_path):
        if path.exists() or path.is_symlink():
            raise CliError(f"{path} exists; a CA is never overwritten")
    passphrase = session.passphrase(confirm=True, what=str(key_path))
    if len(passphrase) < MIN_PASSPHRASE_LENGTH:
        raise CliError(f"passphrase must be at least {MIN_PASSPHRASE_LENGTH} characters")
    cert_pem, key_pem = tls.create_ca(args.name, valid_days=args.valid_days, passphrase=passphrase)
    _mkdir(ca_dir)
    _write_new_private(key_path, key_pem)
    try:
        _write_new(cert_path, cert_pem)
    except CliError:
        key_path.unlink(missing_ok=True)
        raise
    print(f"created CA {args.name!r}: {cert_path} (certificate for every party) and {key_path} (keep it offline)")
    print(tls.certificate_summary(cert_pem), end="")


def cmd_ca_issue(session: _Session, args: argparse.Namespace) -> None:
    """Issue a TLS certificate for a party, signed by the CA in --dir; writes PARTY.crt, PARTY.key and ca.crt."""
    party_id = check_party_id(args.party)
    if not (args.client or args.server):
        raise CliError("say what the certificate is for: --client (a gateway), --server (a connector) or both")
    ca_dir, out_dir = Path(args.dir), Path(args.out_dir)
    key_path = ca_dir / CA_KEY_FILE
    ca_cert = _read(str(ca_dir / CA_CERT_FILE), MAX_PEM_BYTES, what="CA certificate")
    ca_key = _ca_key(ca_dir)
    cert_path, leaf_key_path, ca_copy = out_dir / f"{party_id}.crt", out_dir / f"{party_id}.key", out_dir / CA_CERT_FILE
    for path in (cert_path, leaf_key_path):
        if path.exists() or path.is_symlink():
            raise CliError(f"{path} exists; remove it first to issue a new certificate for {party_id}")
    copy_ca = not ca_copy.exists()
    if not copy_ca and _read(str(ca_copy), MAX_PEM_BYTES, what="CA certificate") != ca_cert:
        raise CliError(f"{ca_copy} holds another CA certificate; use another --out-dir")
    passphrase = session.passphrase(what=str(key_path))
    cert_pem, key_pem = tls.issue_certificate(
        ca_cert,
        ca_key,
        party_id,
        server_names=args.server_name or [],
        client=args.client,
        server=args.server,
        valid_days=args.valid_days,
        ca_key_passphrase=passphrase,
    )
    _mkdir(out_dir)
    written: list[Path] = []
    try:
        _write_new_private(leaf_key_path, key_pem)
        written.append(leaf_key_path)
        _write_new(cert_path, cert_pem)
        written.append(cert_path)
        if copy_ca:
            _write_new(ca_copy, ca_cert)
    except CliError:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    print(f"issued {cert_path} and {leaf_key_path} (mode 0600) for {party_id}; trust anchor {ca_copy}")
    print(tls.certificate_summary(cert_pem), end="")


def _ca_key(ca_dir: Path) -> bytes:
    """The CA key file, refused when others may read it."""
    key_path = ca_dir / CA_KEY_FILE
    try:
        mode = key_path.stat().st_mode & 0o777
    except OSError as exc:
        raise CliError(f"cannot read {key_path}: {exc.strerror}") from exc
    if mode & 0o077:
        raise CliError(
            f"{key_path} is readable or writable by other users (mode {mode:o}); "
            f"run chmod 600 {key_path} after checking who could have read it"
        )
    return _read(str(key_path), MAX_PEM_BYTES, what="CA key")


def _replace_keeping_owner(path: Path, data: bytes, *, private: bool) -> None:
    """Write ``data`` over ``path`` by rename (a reader sees the old file or the new one), with the old file's
    owner and group where this user may set them (a service reads its files as its own user)."""
    try:
        old = path.stat()
    except OSError:
        old = None
    try:
        write_atomically(path, data, mode=0o600 if private else 0o644)
        if old is not None and (old.st_uid, old.st_gid) != (os.getuid(), os.getgid()):
            try:
                os.chown(path, old.st_uid, old.st_gid)
            except PermissionError:
                print(f"note: could not give {path} its previous owner back; check its owner", file=sys.stderr)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror}") from exc


def cmd_ca_renew(session: _Session, args: argparse.Namespace) -> None:
    """Renew a party's TLS certificate: a new key and certificate with the names and usages of OUT_DIR/PARTY.crt,
    written over PARTY.key and then PARTY.crt, each by rename; a service using them picks them up."""
    party_id = check_party_id(args.party)
    ca_dir, out_dir = Path(args.dir), Path(args.out_dir)
    ca_cert = _read(str(ca_dir / CA_CERT_FILE), MAX_PEM_BYTES, what="CA certificate")
    ca_key = _ca_key(ca_dir)
    cert_path, key_path = out_dir / f"{party_id}.crt", out_dir / f"{party_id}.key"
    current = _read(str(cert_path), MAX_PEM_BYTES, what="PEM certificate")
    if tls.party_from_certificate(current) != party_id:
        raise CliError(f"{cert_path} does not name {party_id}")
    passphrase = session.passphrase(what=str(ca_dir / CA_KEY_FILE))
    cert_pem, key_pem = tls.renew_certificate(
        ca_cert, ca_key, current, valid_days=args.valid_days, ca_key_passphrase=passphrase
    )
    # The key first, then the certificate: a service that looks between the two renames finds a key of another
    # certificate, keeps the pair it has and looks again a few seconds later (common/tlsreload.py).
    _replace_keeping_owner(key_path, key_pem, private=True)
    _replace_keeping_owner(cert_path, cert_pem, private=False)
    old_serial = tls.load_certificate(current).serial_number
    print(f"renewed {cert_path} and {key_path} (mode 0600) for {party_id}; the old serial was {old_serial:x}")
    print(tls.certificate_summary(cert_pem), end="")


def cmd_ca_request(session: _Session, args: argparse.Namespace) -> None:
    """Make a key and a certificate request on this host (a unit's first certificate, without carrying a key): writes
    PARTY.key (mode 0600, stays here) and PARTY.csr (public: send it to the CA operator, who signs it with 'ca
    sign-requests'; put the PARTY.crt that comes back beside the key)."""
    party_id = check_party_id(args.party)
    if not (args.client or args.server):
        raise CliError("say what the certificate is for: --client (a gateway), --server (a connector) or both")
    out_dir = Path(args.out_dir)
    key_path, request_path = out_dir / f"{party_id}.key", out_dir / f"{party_id}.csr"
    for path in (key_path, request_path):
        if path.exists() or path.is_symlink():
            raise CliError(f"{path} exists; remove it first to make a new request for {party_id}")
    names = tuple(args.server_name or ())
    for name in names:
        tls.server_name(name)
    if args.server and not names:
        raise CliError("a server certificate needs at least one --server-name (DNS name or IP address clients dial)")
    profile = csr.CertificateProfile(party_id, names, client=args.client, server=args.server)
    request, key_pem = csr.make_request(profile)
    _mkdir(out_dir)
    _write_new_private(key_path, key_pem)
    try:
        _write_new(request_path, request.pem())
    except CliError:
        key_path.unlink(missing_ok=True)
        raise
    print(f"wrote {key_path} (mode 0600; it stays on this host) and {request_path} (public)")
    print(f"key fingerprint {request.key_fingerprint} (read it to the CA operator when they sign the request)")


def cmd_ca_sign_requests(session: _Session, args: argparse.Namespace) -> None:
    """Sign the certificate requests (.csr, PEM or DER) in --in with the CA in --dir, each as ca issue would, and
    write NAME.crt beside each NAME.csr (or into --out-dir): for a CA kept offline, the requests the gateway exported
    ('hedui-gateway tls export-requests'); the gateway checked them against the units' current certificates."""
    ca_dir, in_dir = Path(args.dir), Path(args.in_dir)
    out_dir = Path(args.out_dir) if args.out_dir else in_dir
    if not in_dir.is_dir() or not out_dir.is_dir():
        raise CliError(f"{in_dir if not in_dir.is_dir() else out_dir} is not a folder")
    requests: list[tuple[Path, csr.CertificateRequest]] = []
    for path in sorted(p for p in in_dir.iterdir() if p.suffix == ".csr" and p.is_file()):
        data = _read(str(path), csr.MAX_REQUEST_BYTES * 2, what="certificate request")
        if data.lstrip().startswith(b"-----BEGIN"):
            try:
                data = x509.load_pem_x509_csr(data).public_bytes(serialization.Encoding.DER)
            except ValueError:
                raise CliError(f"{path} is not a certificate request") from None
        try:
            requests.append((path, csr.parse_request(data)))
        except csr.CertificateRequestError as exc:
            raise CliError(f"{path}: {exc} ({exc.code}); nothing was signed") from None
    if not requests:
        print(f"no .csr file in {in_dir}")
        return
    for path, request in requests:
        target = out_dir / (path.stem + ".crt")
        if target.exists():
            raise CliError(f"{target} exists; nothing was signed (remove it, or sign into another --out-dir)")
        profile = request.profile
        print(f"{path.name}: {profile.party}, {', '.join(profile.names) or 'no names'}, {profile.usages}")
        print(f"    key {request.key_fingerprint}")
    ca_cert = _read(str(ca_dir / CA_CERT_FILE), MAX_PEM_BYTES, what="CA certificate")
    ca_key = tls.load_ca_key(_ca_key(ca_dir), session.passphrase(what=str(ca_dir / CA_KEY_FILE)))
    plain = ca_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    for path, request in requests:
        cert = csr.issue_for_request(ca_cert, plain, request, valid_days=args.valid_days)
        target = out_dir / (path.stem + ".crt")
        _write_new(target, cert.public_bytes(serialization.Encoding.PEM))
        print(f"signed {target}: serial {cert.serial_number:x}, until {cert.not_valid_after_utc:%Y-%m-%d}")
    print("bring the .crt files back to the gateway: hedui-gateway tls import-certificates --config FILE DIR")


def cmd_ca_revoke(session: _Session, args: argparse.Namespace) -> None:
    """Record that the CA revokes a certificate (by --serial or --cert); 'ca crl' then signs the list to install."""
    ca_dir = Path(args.dir)
    ca_cert = tls.load_certificate(_read(str(ca_dir / CA_CERT_FILE), MAX_PEM_BYTES, what="CA certificate"))
    if bool(args.serial) == bool(args.cert):
        raise CliError("name the certificate with --serial SERIAL or --cert FILE (one of them)")
    if args.cert:
        cert = tls.load_certificate(_read(args.cert, MAX_PEM_BYTES, what="PEM certificate"))
        if cert.issuer != ca_cert.subject:
            raise CliError(f"{args.cert} is not issued by this CA ({cert.issuer.rfc4514_string()})")
        serial = cert.serial_number
    else:
        serial = crl.parse_serial(args.serial)
    record = crl.CaRevocations.load(ca_dir).revoke(serial, args.reason, datetime.now(UTC))
    record.save(ca_dir)
    print(f"revoked serial {serial:x} ({args.reason}); {len(record.revoked)} revoked in all")
    print(f"now sign and install the list: hedui-keys ca crl --dir {ca_dir} --out crl.der")


def cmd_ca_crl(session: _Session, args: argparse.Namespace) -> None:
    """Sign the CA's certificate revocation list (DER) with the next CRL number; install it at the gateway with
    'hedui-gateway tls install-crl', which sends it to every unit."""
    ca_dir, out = Path(args.dir), Path(args.out)
    ca_cert = _read(str(ca_dir / CA_CERT_FILE), MAX_PEM_BYTES, what="CA certificate")
    ca_key = _ca_key(ca_dir)
    record = crl.CaRevocations.load(ca_dir)
    passphrase = session.passphrase(what=str(ca_dir / CA_KEY_FILE))
    number = record.crl_number + 1
    der = crl.build_crl(
        ca_cert,
        ca_key,
        record,
        number=number,
        now=datetime.now(UTC),
        next_update_days=args.next_update_days,
        ca_key_passphrase=passphrase,
    )
    try:
        write_atomically(out, der, mode=0o644)
    except OSError as exc:
        raise CliError(f"cannot write {out}: {exc.strerror}") from exc
    crl.CaRevocations(record.revoked, number).save(ca_dir)
    listed = crl.verify_crl(der, [tls.load_certificate(ca_cert)])
    print(f"wrote {out}: {listed.summary()}")
    print(f"install it at the gateway: hedui-gateway tls install-crl {out} --config /etc/hedui/gateway.toml")


def cmd_ca_show(session: _Session, args: argparse.Namespace) -> None:
    """Show a certificate (subject, party id, names, usages, validity, serial, SHA-256 fingerprint) or a revocation
    list (number, dates, revoked serials); no keystore needed."""
    data = _read(args.file, crl.MAX_CRL_BYTES, what="certificate or revocation list")
    try:
        print(tls.certificate_summary(data), end="")
        return
    except tls.TlsError:
        pass
    try:
        parsed = x509.load_der_x509_crl(data) if not data.lstrip().startswith(b"-") else x509.load_pem_x509_crl(data)
    except ValueError:
        raise CliError(f"{args.file} is not an X.509 certificate, nor a revocation list") from None
    try:
        number: int | str = parsed.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = "none"
    print(f"revocation list of {parsed.issuer.rfc4514_string()}, number {number}")
    print(f"this update {parsed.last_update_utc:%Y-%m-%dT%H:%M:%SZ}, next update {parsed.next_update_utc}")
    for entry in parsed:
        print(f"  revoked {entry.serial_number:x} at {entry.revocation_date_utc:%Y-%m-%dT%H:%M:%SZ}")


_Commands = argparse._SubParsersAction  # the type of what add_subparsers returns


def _command(
    group: _Commands[argparse.ArgumentParser], name: str, func: Callable[[_Session, argparse.Namespace], None]
) -> argparse.ArgumentParser:
    command = group.add_parser(name, help=func.__doc__, description=func.__doc__)
    command.set_defaults(func=func)
    return command


def _add_ca_commands(sub: _Commands[argparse.ArgumentParser]) -> None:
    ca_help = "private CA for mutual TLS between gateway and connectors (no keystore needed)"
    ca = sub.add_parser("ca", help=ca_help, description=ca_help)
    ca_sub = ca.add_subparsers(dest="ca_command", required=True, metavar="CA_COMMAND")
    ca_init = _command(ca_sub, "init", cmd_ca_init)
    ca_init.add_argument("--dir", required=True, help="folder for ca.crt and ca.key (created if missing)")
    ca_init.add_argument("--name", default=tls.DEFAULT_CA_NAME, help="the CA's common name")
    ca_init.add_argument("--valid-days", type=int, default=tls.CA_VALID_DAYS, help="lifetime of the CA certificate")
    issue = _command(ca_sub, "issue", cmd_ca_issue)
    issue.add_argument("--dir", required=True, help="folder holding the CA's ca.crt and ca.key")
    issue.add_argument("--party", required=True, help="the party id, e.g. agency.220100 or unit.220100.tax")
    issue.add_argument(
        "--server-name",
        action="append",
        help="DNS name or IP address clients dial (repeat; at least one with --server)",
    )
    issue.add_argument("--client", action="store_true", help="the certificate may authenticate a client (gateway)")
    issue.add_argument("--server", action="store_true", help="the certificate may authenticate a server (connector)")
    issue.add_argument("--valid-days", type=int, default=tls.LEAF_VALID_DAYS, help="lifetime of the certificate")
    issue.add_argument("--out-dir", required=True, help="folder for PARTY.crt, PARTY.key and a copy of ca.crt")
    _command(ca_sub, "show", cmd_ca_show).add_argument("file", help="certificate or revocation list (PEM or DER)")
    renew = _command(ca_sub, "renew", cmd_ca_renew)
    renew.add_argument("--dir", required=True, help="folder holding the CA's ca.crt and ca.key")
    renew.add_argument("--party", required=True, help="the party whose certificate is renewed")
    renew.add_argument("--out-dir", required=True, help="folder holding PARTY.crt and PARTY.key (replaced)")
    renew.add_argument("--valid-days", type=int, default=tls.LEAF_VALID_DAYS, help="lifetime of the new certificate")
    asking = _command(ca_sub, "request", cmd_ca_request)
    asking.add_argument("--party", required=True, help="this host's party id, e.g. unit.220100.tax")
    asking.add_argument("--server-name", action="append", help="DNS name or IP address clients dial (repeat)")
    asking.add_argument("--client", action="store_true", help="for a client (gateway)")
    asking.add_argument("--server", action="store_true", help="for a server (connector)")
    asking.add_argument("--out-dir", required=True, help="folder for PARTY.key and PARTY.csr")
    signing = _command(ca_sub, "sign-requests", cmd_ca_sign_requests)
    signing.add_argument("--dir", required=True, help="folder holding the CA's ca.crt and ca.key")
    signing.add_argument("--in", dest="in_dir", required=True, help="folder of .csr files (tls export-requests)")
    signing.add_argument("--out-dir", help="folder for the .crt files (default: beside the requests)")
    signing.add_argument("--valid-days", type=int, default=tls.LEAF_VALID_DAYS, help="lifetime of each certificate")
    revoke = _command(ca_sub, "revoke", cmd_ca_revoke)
    revoke.add_argument("--dir", required=True, help="folder holding the CA's ca.crt (and its revoked.json)")
    revoke.add_argument("--serial", help="serial number in hex, as 'ca show' prints it")
    revoke.add_argument("--cert", help="the certificate file to revoke")
    revoke.add_argument("--reason", required=True, choices=sorted(crl.REASONS), help="why (RFC 5280 CRLReason)")
    crl_command = _command(ca_sub, "crl", cmd_ca_crl)
    crl_command.add_argument("--dir", required=True, help="folder holding the CA's ca.crt, ca.key and revoked.json")
    crl_command.add_argument("--out", required=True, help="the DER file to write (replaced)")
    crl_command.add_argument(
        "--next-update-days",
        type=int,
        default=crl.DEFAULT_NEXT_UPDATE_DAYS,
        help="days until the next list is promised; services warn after that (default 7)",
    )


def _add_staff_commands(sub: _Commands[argparse.ArgumentParser]) -> None:
    """A staff member's signatures (sign-approval, sign-step) and a report reader's check (verify-report)."""
    _command(sub, "sign-approval", cmd_sign_approval).add_argument(
        "--digest", required=True, help="the commission's exchange digest (64 hex digits) as the gateway shows it"
    )
    sign = _command(sub, "sign-step", cmd_sign_step)
    sign.add_argument("--agency", required=True, help="the gateway's party id, e.g. agency.220100")
    sign.add_argument("--commission", required=True, help="the commission id, e.g. C0123456789abcdef")
    sign.add_argument("--step", required=True, choices=sorted(STEP_KINDS), help="which step")
    sign.add_argument("--staff-id", required=True, help="our id in the agency's staff register, e.g. S-0001")
    sign.add_argument(
        "--digest", required=True, help="the commission's exchange digest (64 hex digits) as the gateway shows it"
    )
    sign.add_argument("--passed", action="store_true", help="intake or review: the step passes")
    sign.add_argument("--failed", action="store_true", help="intake: returned; review: terminated (needs --reason)")
    sign.add_argument("--reason", help="with --failed: the reason exactly as the back office sends it")
    sign.add_argument("--partial", action="store_true", help="report: issued while units have not answered")
    verify_report = _command(sub, "verify-report", cmd_verify_report)
    verify_report.add_argument("file", help="the signed report file (SignedReport, as the gateway issues it)")
    verify_report.add_argument("--bundle", help="the agency's public bundle file, instead of the trust store")
    verify_report.add_argument("--fingerprint", help="with --bundle: the fingerprint from the agency's key letter")
    verify_report.add_argument(
        "--staff-keys",
        help="the signers' registered keys ('STAFF_ID HEX' lines, from 'hedui-gateway archive steps --export-keys'): "
        "check every step's and approval's signature",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hedui-keys", description=__doc__.splitlines()[0] if __doc__ else None)
    add_version(parser)
    parser.add_argument("--keystore", help="keystore file (default: $HEDUI_KEYSTORE)")
    parser.add_argument("--passphrase-file", help="read the passphrase from this file (one line, mode 0600)")
    parser.add_argument(
        "--replay-store",
        help="the sealed files this keystore has opened (default: $HEDUI_REPLAY_STORE, else KEYSTORE.replay)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[_Session, argparse.Namespace], None]) -> argparse.ArgumentParser:
        return _command(sub, name, func)

    add("init", cmd_init).add_argument("party_id", help="e.g. agency.220000 or unit.220100.tax")
    add("list", cmd_list)
    add("letter", cmd_letter).add_argument("--out", help="write the letter to this file instead of printing it")
    export = add("export", cmd_export)
    export.add_argument("--out", required=True, help="bundle file to write")
    export.add_argument("--force", action="store_true", help="overwrite an existing bundle file")
    add("inspect", cmd_inspect).add_argument("bundle", help="bundle file")
    imp = add("import", cmd_import)
    imp.add_argument("bundle", help="the peer's bundle file")
    imp.add_argument("--fingerprint", required=True, help="the fingerprint read from the peer's key letter")
    rotate = add("rotate", cmd_rotate)
    rotate.add_argument("which", choices=sorted(_ALGORITHMS))
    rotate.add_argument(
        "--overlap-days", type=float, default=14.0, help="how long the old key stays valid after the new one takes over"
    )
    rotate.add_argument(
        "--activate-in-days",
        type=float,
        default=0.0,
        help="when the new key takes over (0: at once; up to 30): time for peers to apply the announcement first",
    )
    rotate.add_argument("--out", help="also write the announcement to this file (for a peer reached by media only)")
    revoke = add("revoke", cmd_revoke)
    revoke.add_argument("key_id", help="key id (hex) as shown by 'list'")
    revoke.add_argument("--reason", required=True, help="short code, e.g. compromised or superseded")
    revoke.add_argument("--out", help="also write the announcement to this file (for a peer reached by media only)")
    add("apply", cmd_apply).add_argument("announcement", help="a peer's announcement file")
    seal = add("seal", cmd_seal)
    seal.add_argument("file")
    seal.add_argument("--to", required=True, help="recipient party id (must be in the trust store)")
    seal.add_argument("--out", help="output file (default FILE.PARTY.hsf)")
    seal.add_argument("--ttl-days", type=float, default=30.0, help="how long the sealed file may be opened")
    seal.add_argument("--media-type", help="e.g. text/csv")
    opn = add("open", cmd_open)
    opn.add_argument("file")
    opn.add_argument("--out-dir", default=".", help="folder to write the opened file into")
    _add_staff_commands(sub)
    _add_ca_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the hedui-keys console script."""
    args = _parser().parse_args(argv)
    session = _Session(args)
    try:
        with session.held:
            args.func(session, args)
    except (KeysError, ValueError) as exc:
        message = exc.diagnostics() if isinstance(exc, KeysError) else str(exc)
        print(f"hedui-keys: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
