"""A staff member's own keys as the roster commands use them (``hedui-gateway roster``, ``hedui-connector roster``).

A roster change is signed by an admin's staff key (keys/roster.py): the admin runs the command with their own
keystore (``hedui-keys init --party staff....``), whose passphrase comes from ``--passphrase-file``,
``HEDUI_KEYS_PASSPHRASE`` or a prompt, as for every ``hedui-keys`` command. A new member's key comes from the public
bundle they exported (``hedui-keys export``), checked against the fingerprint of their key letter: the fingerprint is
required, since a bundle file alone may have been swapped on its way to the admin (security review, finding 9).
"""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path

from keys import keystore
from keys.announcements import MAX_BUNDLE_BYTES, Bundle, dearmor, read_bundle
from keys.errors import KeyStateError, KeystoreError, TrustError
from keys.fingerprint import Algorithm
from keys.handles import SigningKey
from keys.keyring import KeyRecord, Keyring

STAFF_PARTY_PREFIX = "staff."


def staff_passphrase(passphrase_file: str | None, what: Path) -> str:
    """The passphrase of a staff keystore: the file, else HEDUI_KEYS_PASSPHRASE, else a prompt on a terminal."""
    if passphrase_file:
        return keystore.read_passphrase_file(Path(passphrase_file))
    env = os.environ.get("HEDUI_KEYS_PASSPHRASE")
    if env:
        return env
    if not sys.stdin.isatty():
        raise KeystoreError("no passphrase: use --passphrase-file, HEDUI_KEYS_PASSPHRASE or run in a terminal")
    return getpass.getpass(f"Passphrase for {what}: ")


def load_staff_signing_key(path: Path, *, passphrase_file: str | None, now_ms: int) -> tuple[str, SigningKey]:
    """The party id and current signing key of the staff keystore at ``path``; KeystoreError for a keystore that is
    not a staff member's or holds no usable signing key."""
    party, _ = keystore.load(path, staff_passphrase(passphrase_file, path))
    if not party.party_id.startswith(STAFF_PARTY_PREFIX):
        raise KeystoreError(
            f"{path} is the keystore of {party.party_id}, not of a staff member (their party id starts with 'staff.')"
        )
    try:
        return party.party_id, party.signing_key(now_ms)
    except KeyStateError as exc:
        raise KeystoreError(f"{path} holds no signing key usable now: {exc}") from exc


def read_staff_bundle(path: Path, *, fingerprint: str | None, now_ms: int) -> tuple[Bundle, KeyRecord]:
    """A staff member's public bundle (``hedui-keys export``) and its signing key valid now, the bundle fingerprint
    checked against ``fingerprint`` (from the member's key letter; required). TrustError for anything else, a
    missing fingerprint included."""
    if not fingerprint or not fingerprint.strip():
        raise TrustError(
            "the bundle fingerprint from the staff member's key letter is required (--fingerprint): a bundle file "
            "alone is never taken as the member's key"
        )
    if path.stat().st_size > 2 * MAX_BUNDLE_BYTES:
        raise TrustError(f"{path} is too large to be a public key bundle")
    bundle = read_bundle(dearmor(path.read_text(encoding="utf-8", errors="replace")))
    if not bundle.party_id.startswith(STAFF_PARTY_PREFIX):
        raise TrustError(
            f"{path} is the bundle of {bundle.party_id}, not of a staff member (their party id starts with 'staff.')"
        )
    record = Keyring(bundle.keys).current(Algorithm.ED25519, now_ms)
    if record is None:
        raise TrustError(f"the bundle of {bundle.party_id} has no signing key valid now")
    bundle.require_fingerprint(fingerprint)
    return bundle, record
