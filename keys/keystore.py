"""Keystore file: a party's private keys and its trust store, encrypted at rest with a passphrase.

Format (JSON, UTF-8), documented in docs/keys.md::

    {"format": "hedui-keystore", "version": 1, "party_id": "...",
     "kdf": {"name": "argon2id", "salt": b64, "memory_kib": n, "iterations": n, "lanes": n},
     "aead": "xchacha20poly1305", "nonce": b64, "ciphertext": b64}

The key is Argon2id(passphrase, salt, params). The associated data is every field except "ciphertext", encoded as
JSON with sorted keys and no spaces, so changing the party id or weakening the KDF parameters is detected like a
change of the ciphertext. Files are written atomically (temporary file, fsync, rename) with mode 0600, and a file
readable by group or others is refused.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import json
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from keys import _primitives as prim
from keys._files import read_bounded
from keys.announcements import read_announcement
from keys.errors import KeystoreError, TrustError, WrongPassphraseOrCorrupt
from keys.fingerprint import Algorithm
from keys.handles import PrivateKey, PublicKey, RandomSource, _load_private
from keys.identity import PartyKeys
from keys.keyring import KeyRecord, Keyring, KeyState
from keys.truststore import TrustStore

FORMAT = "hedui-keystore"
VERSION = 1
MAX_KEYSTORE_BYTES = 4 * 1024 * 1024
#: Floor for new keystores (OWASP's minimum Argon2id setting is 19 MiB with 2 iterations).
MIN_MEMORY_KIB = 19 * 1024
MIN_ITERATIONS = 2


@dataclass(frozen=True)
class KdfParams:
    """Argon2id cost. The defaults follow RFC 9106's second recommended option (64 MiB, t=3, p=4)."""

    memory_kib: int = 64 * 1024
    iterations: int = 3
    lanes: int = 4
    #: Allow parameters below MIN_MEMORY_KIB / MIN_ITERATIONS. Only the test suite sets it, through
    #: FAST_FOR_TESTS; never written to a file.
    unsafe_allow_weak: bool = field(default=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not (8 * self.lanes <= self.memory_kib <= 4 * 1024 * 1024 and 1 <= self.iterations <= 64):
            raise KeystoreError("argon2id parameters out of range")
        if not 1 <= self.lanes <= 16:
            raise KeystoreError("argon2id lanes out of range")
        weak = self.memory_kib < MIN_MEMORY_KIB or self.iterations < MIN_ITERATIONS
        if weak and not self.unsafe_allow_weak:
            # A passphrase behind cheap parameters can be brute-forced; refuse to create such a keystore.
            raise KeystoreError(
                f"argon2id parameters too weak: at least {MIN_MEMORY_KIB} KiB and {MIN_ITERATIONS} iterations"
            )

    def as_json(self) -> dict[str, int]:
        return {"memory_kib": self.memory_kib, "iterations": self.iterations, "lanes": self.lanes}

    def derive(self, passphrase: bytes, salt: bytes) -> bytes:
        kdf = Argon2id(
            salt=salt,
            length=prim.AEAD_KEY_BYTES,
            iterations=self.iterations,
            lanes=self.lanes,
            memory_cost=self.memory_kib,
        )
        return kdf.derive(passphrase)


#: Cheap parameters for the test suite only; never for a real keystore.
FAST_FOR_TESTS = KdfParams(memory_kib=64, iterations=1, lanes=1, unsafe_allow_weak=True)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise ValueError("expected base64 text")
    data = base64.b64decode(text, validate=True)
    if base64.b64encode(data).decode() != text:
        raise ValueError("base64 text is not in canonical form")
    return data


def _aad(doc: dict[str, Any]) -> bytes:
    return json.dumps(
        {k: v for k, v in doc.items() if k != "ciphertext"}, sort_keys=True, separators=(",", ":")
    ).encode()


def _record_to_json(record: KeyRecord, secret: PrivateKey | None) -> dict[str, Any]:
    return {
        "algorithm": record.algorithm.name,
        "public": record.public.raw.hex(),
        "state": record.state.name,
        "not_before_ms": record.not_before_ms,
        "not_after_ms": record.not_after_ms,
        "revoked_at_ms": record.revoked_at_ms,
        "secret": secret.expose_secret_for_export().hex() if secret is not None else None,
    }


def _record_from_json(item: dict[str, Any]) -> tuple[KeyRecord, PrivateKey | None]:
    algorithm = Algorithm[item["algorithm"]]
    public = PublicKey(algorithm, bytes.fromhex(item["public"]))
    record = KeyRecord(
        public=public,
        state=KeyState[item["state"]],
        not_before_ms=int(item["not_before_ms"]),
        not_after_ms=None if item["not_after_ms"] is None else int(item["not_after_ms"]),
        revoked_at_ms=None if item["revoked_at_ms"] is None else int(item["revoked_at_ms"]),
    )
    secret = None
    if item.get("secret") is not None:
        secret = _load_private(algorithm, bytes.fromhex(item["secret"]))
        if secret.public != public:
            raise ValueError("a private key does not match its public key")
    return record, secret


def save(
    path: Path,
    party: PartyKeys,
    trust: TrustStore,
    passphrase: str,
    *,
    kdf: KdfParams | None = None,
    rng: RandomSource = os.urandom,
) -> None:
    """Encrypt ``party`` and ``trust`` with ``passphrase`` and write them atomically to ``path`` (mode 0600)."""
    plaintext = json.dumps(
        {
            "keys": [_record_to_json(r, party.secret(r.key_id)) for r in party.records()],
            "peers": {pid: [_record_to_json(r, None) for r in ring] for pid, ring in trust},
            # The party's own signed announcements, so that a running service delivers what 'hedui-keys rotate'
            # made while it ran (docs/keys.md, "Keys over the wire").
            "announcements": [_b64(a) for a in party.announcements()],
        },
        sort_keys=True,
    ).encode()
    sealed = seal_document(FORMAT, {"party_id": party.party_id}, plaintext, passphrase, kdf=kdf, rng=rng)
    write_private_file(path, sealed)


def seal_document(
    fmt: str,
    fields: dict[str, Any],
    plaintext: bytes,
    passphrase: str,
    *,
    kdf: KdfParams | None = None,
    rng: RandomSource = os.urandom,
) -> bytes:
    """The JSON container of this module's format (see its docstring) holding ``plaintext``, with ``fmt`` as its
    "format" and ``fields`` beside it, all of them authenticated. Keystores and the private CA's key use it."""
    params = kdf or KdfParams()
    salt, nonce = rng(16), rng(prim.XNONCE_BYTES)
    doc: dict[str, Any] = {
        "format": fmt,
        "version": VERSION,
        **fields,
        "kdf": {"name": "argon2id", "salt": _b64(salt), **params.as_json()},
        "aead": "xchacha20poly1305",
        "nonce": _b64(nonce),
    }
    key = params.derive(passphrase.encode(), salt)
    doc["ciphertext"] = _b64(prim.xchacha_encrypt(key, nonce, plaintext, _aad(doc)))
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def open_document(
    raw: bytes, fmt: str, passphrase: str, *, name: str, what: str = "keystore"
) -> tuple[dict[str, Any], bytes]:
    """The fields and the plaintext of a container written by :func:`seal_document` with format ``fmt``; errors name
    the file (``name``, a path) and say ``what`` it should be. Raises WrongPassphraseOrCorrupt or KeystoreError."""
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("format") != fmt:
            raise ValueError(f"not a {what}")
        if doc.get("version") != VERSION or doc.get("aead") != "xchacha20poly1305":
            raise KeystoreError(f"{name} is a {what} of an unsupported version")
        kdf_doc = doc["kdf"]
        if not isinstance(kdf_doc, dict) or kdf_doc.get("name") != "argon2id":
            raise ValueError("unknown kdf")
        # Whatever the file says is authenticated as associated data: weakening it breaks decryption.
        params = KdfParams(
            memory_kib=int(kdf_doc["memory_kib"]),
            iterations=int(kdf_doc["iterations"]),
            lanes=int(kdf_doc["lanes"]),
            unsafe_allow_weak=True,
        )
        salt, nonce, ciphertext = _unb64(kdf_doc["salt"]), _unb64(doc["nonce"]), _unb64(doc["ciphertext"])
        if len(nonce) != prim.XNONCE_BYTES or len(salt) < 16:
            raise ValueError("bad nonce or salt")
    except KeystoreError:
        raise
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError, binascii.Error) as exc:
        # RecursionError: JSON nested deeper than the parser's stack (a damaged or hostile file, not a keystore).
        raise WrongPassphraseOrCorrupt(f"{name} is not a readable Hedui {what}") from exc
    try:
        plaintext = prim.xchacha_decrypt(params.derive(passphrase.encode(), salt), nonce, ciphertext, _aad(doc))
    except prim.PrimitiveFailure as exc:
        raise WrongPassphraseOrCorrupt(f"cannot open {name}: wrong passphrase or damaged file") from exc
    return doc, plaintext


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600: temporary file in the same folder, fsync, rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


#: A passphrase file holds one line; anything this long is not one.
MAX_PASSPHRASE_FILE_BYTES = 4096


def _read_private_file(path: Path, *, what: str, limit: int) -> bytes:
    """The bytes of a regular file that holds a secret, at most ``limit`` of them; KeystoreError if it is not a
    regular file, is larger, or group or others may read or write it (checked on the opened file)."""

    def owner_only(info: os.stat_result) -> None:
        if stat.S_IMODE(info.st_mode) & 0o077:
            raise KeystoreError(
                f"{path} is readable or writable by other users (mode {stat.S_IMODE(info.st_mode):o}); "
                f"run chmod 600 {path} after checking who could have read it"
            )

    return read_bounded(path, limit, KeystoreError, what=what, check=owner_only)


def read_secret_file(path: Path, *, what: str, limit: int) -> bytes:
    """The bytes of a file holding a secret (a passphrase, a TLS private key), refused unless only its owner can
    read and write it. KeystoreError names the file and ``what`` it should be, never its content."""
    path = Path(path)
    try:
        return _read_private_file(path, what=what, limit=limit)
    except FileNotFoundError as exc:
        raise KeystoreError(f"no {what} at {path}") from exc
    except OSError as exc:
        raise KeystoreError(f"cannot read {what} {path}: {exc.strerror}") from exc


def read_passphrase_file(path: Path) -> str:
    """The passphrase in ``path``: one line (a final line break is allowed), in a file only its owner can read.

    Raises KeystoreError, naming the file but never its content, for a missing, unreadable, shared, empty or
    multi-line file: a second line would otherwise silently become part of the passphrase, or be dropped.
    """
    raw = read_secret_file(path, what="passphrase file", limit=MAX_PASSPHRASE_FILE_BYTES)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KeystoreError(f"passphrase file {path} is not UTF-8 text") from exc
    passphrase = text.removesuffix("\n").removesuffix("\r")
    if not passphrase:
        raise KeystoreError(f"passphrase file {path} is empty")
    if "\n" in passphrase or "\r" in passphrase:
        raise KeystoreError(f"passphrase file {path} has more than one line; it must hold the passphrase alone")
    return passphrase


@dataclass(frozen=True)
class LoadedKeystore:
    """A keystore as read: the keys, the KDF parameters it is sealed with, and the SHA-256 of the file's bytes."""

    party: PartyKeys
    trust: TrustStore
    kdf: KdfParams
    sha256: bytes


def load(path: Path, passphrase: str) -> tuple[PartyKeys, TrustStore]:
    """Read and decrypt a keystore. Raises KeystoreError (or WrongPassphraseOrCorrupt) and nothing else."""
    loaded = read(path, passphrase)
    return loaded.party, loaded.trust


def read(path: Path, passphrase: str) -> LoadedKeystore:
    """Like :func:`load`, also giving the file's KDF parameters (a service saves with the same ones) and SHA-256."""
    path = Path(path)
    try:
        raw = _read_private_file(path, what="keystore", limit=MAX_KEYSTORE_BYTES)
    except FileNotFoundError as exc:
        raise KeystoreError(f"no keystore at {path}: create one with 'hedui-keys init'") from exc
    except OSError as exc:
        raise KeystoreError(f"cannot read {path}: {exc.strerror}") from exc
    doc, plaintext = open_document(raw, FORMAT, passphrase, name=str(path))
    try:
        body = json.loads(plaintext)
        records, secrets = [], {}
        for item in body["keys"]:
            record, secret = _record_from_json(item)
            records.append(record)
            if secret is not None:
                secrets[record.key_id] = secret
        announcements = [_unb64(text) for text in body.get("announcements", [])]
        for announcement in announcements:
            read_announcement(announcement)
        party = PartyKeys(str(doc["party_id"]), Keyring(records), secrets, announcements)
        trust = TrustStore()
        for party_id, items in body["peers"].items():
            trust.set_keyring(party_id, Keyring(_record_from_json(item)[0] for item in items))
        kdf_doc = doc["kdf"]
        kdf = KdfParams(
            memory_kib=int(kdf_doc["memory_kib"]),
            iterations=int(kdf_doc["iterations"]),
            lanes=int(kdf_doc["lanes"]),
            unsafe_allow_weak=True,
        )
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError, TrustError) as exc:
        # Authenticated but inconsistent: written by a broken or foreign program.
        raise KeystoreError(f"{path} decrypted but its content is inconsistent") from exc
    return LoadedKeystore(party, trust, kdf, hashlib.sha256(raw).digest())


def lock_path(path: Path) -> Path:
    """The lock file of a keystore: ``<keystore file>.lock`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


class KeystoreBusy(KeystoreError):
    """Another program holds the keystore's lock (:func:`locked`) longer than the caller would wait."""

    code = "keystore_busy"


@contextlib.contextmanager
def locked(path: Path, *, timeout_s: float = 30.0, required: bool = True) -> Iterator[None]:
    """Hold the keystore's lock file (an exclusive ``flock``) for a read-change-write of the keystore at ``path``.

    Every program that changes a keystore (``hedui-keys``, a running gateway or connector) takes it, so that two of
    them never both read the same version and the second write loses the first one's change. Waits up to
    ``timeout_s`` (0: not at all), then raises KeystoreBusy. The kernel drops the lock when its holder dies.
    ``required=False``: where the lock file cannot be created at all (a keystore on a read-only stick, in a folder
    this user may not write), go on without it: no program can be writing that keystore either.
    """
    target = lock_path(path)
    try:
        fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if not required:
            yield
            return
        raise KeystoreError(f"cannot open the keystore lock {target}: {exc.strerror}") from exc
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise KeystoreBusy(
                        f"the keystore {path} is being changed by another program (lock {target}); try again"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
