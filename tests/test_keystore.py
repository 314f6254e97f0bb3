"""Keystore files: round trip, permissions, atomic writes, and refusal of every kind of damage as a KeystoreError."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path
from typing import Any

import nacl.bindings
import pytest
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from keys import Algorithm, KdfParams, KeyState, KeystoreError, TrustStore, WrongPassphraseOrCorrupt
from keys.clock import DAY_MS, HOUR_MS
from keys.keystore import FAST_FOR_TESTS, load, read_passphrase_file, save
from tests.conftest import Pair, Side

PASSPHRASE = "correct horse battery staple 核对"


def write_keystore_independently(path: Path, doc_fields: dict[str, Any], body: object, passphrase: str) -> None:
    """Write a keystore from the documented format alone (docs/keys.md), without keys.keystore.save."""
    salt, nonce = os.urandom(16), os.urandom(24)
    doc: dict[str, Any] = {
        "format": "hedui-keystore",
        "version": 1,
        "kdf": {"name": "argon2id", "salt": base64.b64encode(salt).decode(), "memory_kib": 64, "iterations": 1},
        "aead": "xchacha20poly1305",
        "nonce": base64.b64encode(nonce).decode(),
        **doc_fields,
    }
    doc["kdf"]["lanes"] = 1
    aad = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    key = Argon2id(salt=salt, length=32, iterations=1, lanes=1, memory_cost=64).derive(passphrase.encode())
    ciphertext = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(json.dumps(body).encode(), aad, nonce, key)
    doc["ciphertext"] = base64.b64encode(ciphertext).decode()
    path.write_text(json.dumps(doc))
    path.chmod(0o600)


def assert_same_party_and_trust(saved: Side, loaded_keys: Any, loaded_trust: TrustStore) -> None:
    assert loaded_keys.party_id == saved.keys.party_id
    assert list(loaded_keys.records()) == list(saved.keys.records())
    for record in saved.keys.records():
        original, again = saved.keys.secret(record.key_id), loaded_keys.secret(record.key_id)
        if original is None:
            assert again is None
        else:
            assert again is not None and again.same_secret(original)
    assert [(party, list(ring)) for party, ring in loaded_trust] == [(party, list(ring)) for party, ring in saved.trust]


@pytest.fixture
def seasoned(pair: Pair) -> Side:
    """The agency after some history: a retiring signing key, a retired and then revoked agreement key."""
    agency, unit, clock = pair.agency, pair.unit, pair.clock
    now = clock.now_ms()
    retired = agency.keys.agreement_public(now).key_id
    unit.trust.apply_announcement(agency.keys.rotate(Algorithm.X25519, now_ms=now, overlap_ms=HOUR_MS), now_ms=now)
    clock.advance(HOUR_MS)
    now = clock.now_ms()
    agency.keys.advance(now)
    agency.keys.revoke(retired, now_ms=now, reason="superseded")
    agency.keys.rotate(Algorithm.ED25519, now_ms=now, overlap_ms=DAY_MS)
    agency.trust.apply_announcement(unit.keys.rotate(Algorithm.X25519, now_ms=now, overlap_ms=DAY_MS), now_ms=now)
    agency.trust.apply_announcement(unit.keys.rotate(Algorithm.ED25519, now_ms=now, overlap_ms=DAY_MS), now_ms=now)
    states = sorted(r.state.name for r in agency.keys.records())
    assert states == ["ACTIVE", "ACTIVE", "RETIRING", "REVOKED"]
    return agency


@pytest.fixture
def stored(tmp_path: Path, seasoned: Side) -> Path:
    path = tmp_path / "agency.keys"
    save(path, seasoned.keys, seasoned.trust, PASSPHRASE, kdf=FAST_FOR_TESTS)
    return path


# --- round trip and file handling --------------------------------------------------------------------------------


def test_save_then_load_gives_back_keys_states_secrets_and_peers(stored: Path, seasoned: Side) -> None:
    keys, trust = load(stored, PASSPHRASE)
    assert_same_party_and_trust(seasoned, keys, trust)
    assert sum(1 for r in keys.records() if keys.secret(r.key_id) is not None) == 3


def test_loaded_keys_work(stored: Path, seasoned: Side, pair: Pair) -> None:
    keys, trust = load(stored, PASSPHRASE)
    now = pair.clock.now_ms()
    assert keys.signing_key(now).same_secret(seasoned.keys.signing_key(now))
    assert trust.agreement_key_for(pair.unit.party_id, now) == seasoned.trust.agreement_key_for(pair.unit.party_id, now)


def test_file_mode_is_0600_even_when_replacing_a_readable_file(tmp_path: Path, seasoned: Side) -> None:
    path = tmp_path / "agency.keys"
    path.write_text("old")
    path.chmod(0o644)
    save(path, seasoned.keys, seasoned.trust, PASSPHRASE, kdf=FAST_FOR_TESTS)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_file_is_json_without_secrets_in_clear(stored: Path, seasoned: Side) -> None:
    text = stored.read_text()
    doc = json.loads(text)
    assert doc["format"] == "hedui-keystore" and doc["version"] == 1 and doc["party_id"] == seasoned.party_id
    assert doc["kdf"] == {
        "name": "argon2id",
        "salt": doc["kdf"]["salt"],
        "memory_kib": FAST_FOR_TESTS.memory_kib,
        "iterations": FAST_FOR_TESTS.iterations,
        "lanes": FAST_FOR_TESTS.lanes,
    }
    for record in seasoned.keys.records():
        secret = seasoned.keys.secret(record.key_id)
        if secret is not None:
            assert secret.expose_secret_for_export().hex() not in text
            assert base64.b64encode(secret.expose_secret_for_export()).decode() not in text
    assert PASSPHRASE not in text


def test_atomic_write_leaves_no_temporary_files(tmp_path: Path, seasoned: Side) -> None:
    path = tmp_path / "agency.keys"
    for _ in range(3):
        save(path, seasoned.keys, seasoned.trust, PASSPHRASE, kdf=FAST_FOR_TESTS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agency.keys"]


def test_failed_write_leaves_no_temporary_files(tmp_path: Path, seasoned: Side) -> None:
    target = tmp_path / "agency.keys"
    target.mkdir()
    (target / "occupied").write_text("x")
    with pytest.raises(OSError):
        save(target, seasoned.keys, seasoned.trust, PASSPHRASE, kdf=FAST_FOR_TESTS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agency.keys"]
    assert sorted(p.name for p in target.iterdir()) == ["occupied"]


def test_wrong_passphrase_is_refused(stored: Path) -> None:
    with pytest.raises(WrongPassphraseOrCorrupt) as caught:
        load(stored, PASSPHRASE + " ")
    assert "passphrase" in caught.value.diagnostics()
    assert PASSPHRASE not in str(caught.value)


def test_missing_file_names_the_init_command(tmp_path: Path) -> None:
    with pytest.raises(KeystoreError) as caught:
        load(tmp_path / "nowhere.keys", PASSPHRASE)
    assert type(caught.value) is KeystoreError
    assert "hedui-keys init" in str(caught.value)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606, 0o620, 0o602, 0o610, 0o601])
def test_file_readable_or_writable_by_others_is_refused(stored: Path, mode: int) -> None:
    stored.chmod(mode)
    with pytest.raises(KeystoreError) as caught:
        load(stored, PASSPHRASE)
    assert not isinstance(caught.value, WrongPassphraseOrCorrupt)
    assert "chmod 600" in str(caught.value)


def test_owner_read_only_file_loads(stored: Path, seasoned: Side) -> None:
    stored.chmod(0o400)
    keys, trust = load(stored, PASSPHRASE)
    assert_same_party_and_trust(seasoned, keys, trust)


def test_directory_instead_of_file_is_a_keystore_error(tmp_path: Path) -> None:
    (tmp_path / "dir.keys").mkdir(mode=0o700)
    with pytest.raises(KeystoreError):
        load(tmp_path / "dir.keys", PASSPHRASE)


# --- KDF parameters ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("memory_kib", "iterations", "lanes"),
    [(7, 1, 1), (31, 1, 4), (64, 0, 1), (64, 65, 1), (64, 1, 0), (1024, 1, 17), (4 * 1024 * 1024 + 1, 1, 1)],
)
def test_out_of_range_kdf_params_are_refused(memory_kib: int, iterations: int, lanes: int) -> None:
    with pytest.raises(KeystoreError, match="argon2id"):
        KdfParams(memory_kib=memory_kib, iterations=iterations, lanes=lanes)


def test_default_kdf_params_follow_rfc_9106() -> None:
    assert KdfParams() == KdfParams(memory_kib=64 * 1024, iterations=3, lanes=4)


@pytest.mark.parametrize(("name", "value"), [("memory_kib", 8), ("iterations", 2), ("lanes", 2)])
def test_weakening_or_changing_kdf_params_in_the_file_is_detected(stored: Path, name: str, value: int) -> None:
    doc = json.loads(stored.read_text())
    doc["kdf"][name] = value
    stored.write_text(json.dumps(doc))
    with pytest.raises(WrongPassphraseOrCorrupt):
        load(stored, PASSPHRASE)


def test_changing_the_party_id_in_the_file_is_detected(stored: Path) -> None:
    doc = json.loads(stored.read_text())
    doc["party_id"] = "agency.220001"
    stored.write_text(json.dumps(doc))
    with pytest.raises(WrongPassphraseOrCorrupt):
        load(stored, PASSPHRASE)


# --- corruption --------------------------------------------------------------------------------------------------


def value_span(text: str, needle: str) -> range:
    """Character positions of the JSON string value that follows ``"needle": "``."""
    start = text.index(f'"{needle}": "') + len(needle) + 5
    return range(start, text.index('"', start))


def regions(text: str) -> dict[str, list[int]]:
    base64_values = {name: value_span(text, name) for name in ("ciphertext", "nonce", "salt")}
    in_base64 = set().union(*base64_values.values())
    kdf_start = text.index('"kdf"')
    kdf_end = text.index("}", kdf_start) + 1
    ciphertext = list(base64_values["ciphertext"])
    return {
        "json structure and plain fields": [i for i in range(len(text)) if i not in in_base64],
        "kdf params": [i for i in range(kdf_start, kdf_end) if i not in in_base64],
        "kdf salt": list(base64_values["salt"]),
        "nonce": list(base64_values["nonce"]),
        "ciphertext": ciphertext[:96] + ciphertext[96:-96:37] + ciphertext[-96:],
    }


def test_every_single_bit_flip_in_every_region_is_a_keystore_error(stored: Path) -> None:
    original = stored.read_bytes()
    assert original.isascii()
    problems: list[str] = []
    tried = 0
    for region, positions in regions(original.decode()).items():
        assert positions, region
        for position in positions:
            for bit in range(8):
                damaged = bytearray(original)
                damaged[position] ^= 1 << bit
                stored.write_bytes(bytes(damaged))
                tried += 1
                try:
                    load(stored, PASSPHRASE)
                except KeystoreError:
                    continue
                except Exception as exc:
                    problems.append(f"{region} byte {position} bit {bit}: {type(exc).__name__}: {exc}")
                else:
                    problems.append(f"{region} byte {position} bit {bit}: loaded")
    assert tried > 4000
    assert problems == []


def test_every_truncation_is_a_keystore_error(stored: Path) -> None:
    original = stored.read_bytes()
    problems = []
    for length in [*range(0, 200), *range(len(original) - 200, len(original) - 1)]:
        stored.write_bytes(original[:length])
        try:
            load(stored, PASSPHRASE)
        except KeystoreError:
            continue
        except Exception as exc:
            problems.append(f"first {length} bytes: {type(exc).__name__}")
        else:
            problems.append(f"first {length} bytes: loaded")
    assert problems == []


def test_noncanonical_base64_ciphertext_is_refused(tmp_path: Path, seasoned: Side) -> None:
    # Regression: base64 decoding ignores the unused low bits of the last character before "=" padding, and the
    # ciphertext text is not part of the associated data, so a changed file loaded as if nothing had happened.
    # The plaintext length is steered with one extra peer until the ciphertext needs padding.
    path = tmp_path / "agency.keys"
    for extra in range(3):
        trust = TrustStore()
        for party, ring in seasoned.trust:
            trust.set_keyring(party, ring)
        trust.set_keyring("unit.x" + "x" * extra, next(ring for _, ring in seasoned.trust))
        save(path, seasoned.keys, trust, PASSPHRASE, kdf=FAST_FOR_TESTS)
        doc = json.loads(path.read_text())
        if doc["ciphertext"].endswith("=="):
            break
    else:
        pytest.fail("could not make a ciphertext with padding")
    load(path, PASSPHRASE)
    text = doc["ciphertext"]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet.index(text[-3])
    doc["ciphertext"] = text[:-3] + alphabet[last ^ 0x01] + "=="  # one of the 4 unused bits
    assert base64.b64decode(doc["ciphertext"]) == base64.b64decode(text)
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    with pytest.raises(KeystoreError):
        load(path, PASSPHRASE)


DAMAGED_DOCUMENTS: dict[str, Any] = {
    "kdf is null": ("kdf", None),
    "kdf is a list": ("kdf", []),
    "kdf is a string": ("kdf", "argon2id"),
    "kdf is a number": ("kdf", 1),
    "memory is infinite": ("kdf.memory_kib", float("inf")),
    "memory is minus infinite": ("kdf.memory_kib", float("-inf")),
    "memory is nan": ("kdf.memory_kib", float("nan")),
    "memory is a string": ("kdf.memory_kib", "lots"),
    "memory is huge": ("kdf.memory_kib", 10**30),
    "memory is a float": ("kdf.memory_kib", 64.5),
    "iterations is null": ("kdf.iterations", None),
    "salt is short": ("kdf.salt", base64.b64encode(b"x" * 8).decode()),
    "salt is a number": ("kdf.salt", 5),
    "kdf name": ("kdf.name", "scrypt"),
    "nonce is a list": ("nonce", [1, 2]),
    "nonce is short": ("nonce", base64.b64encode(bytes(12)).decode()),
    "ciphertext is null": ("ciphertext", None),
    "ciphertext is empty": ("ciphertext", ""),
    "ciphertext is not base64": ("ciphertext", "not base64!"),
    "version 2": ("version", 2),
    "version as text": ("version", "1"),
    "other format": ("format", "pgp"),
    "other aead": ("aead", "aes-gcm"),
    "party id is a list": ("party_id", ["agency.220000"]),
}


@pytest.mark.parametrize("case", list(DAMAGED_DOCUMENTS), ids=list(DAMAGED_DOCUMENTS))
def test_structurally_damaged_document_is_a_keystore_error(stored: Path, case: str) -> None:
    # Regression (kdf not an object -> AttributeError; infinite memory -> OverflowError): load() promises
    # KeystoreError and nothing else.
    where, value = DAMAGED_DOCUMENTS[case]
    doc = json.loads(stored.read_text())
    *parents, name = where.split(".")
    target = doc
    for parent in parents:
        target = target[parent]
    target[name] = value
    stored.write_text(json.dumps(doc))
    with pytest.raises(KeystoreError):
        load(stored, PASSPHRASE)


@pytest.mark.parametrize(
    "content",
    [b"", b"\x00" * 64, b"\xff\xfe{", b"[]", b'"hedui-keystore"', b"null", b"{}", b"{" * 10_000],
    ids=["empty", "zeros", "bad-utf8", "list", "string", "null", "empty-object", "deep-nesting"],
)
def test_non_keystore_content_is_a_keystore_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "junk.keys"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeystoreError):
        load(path, PASSPHRASE)


def test_oversized_file_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "huge.keys"
    with path.open("wb") as handle:
        handle.truncate(4 * 1024 * 1024 + 1)
    path.chmod(0o600)
    with pytest.raises(KeystoreError, match="too large"):
        load(path, PASSPHRASE)


# --- the documented format, written independently ----------------------------------------------------------------


def record_json(record: Any, secret: Any) -> dict[str, Any]:
    return {
        "algorithm": record.algorithm.name,
        "public": record.public.raw.hex(),
        "state": record.state.name,
        "not_before_ms": record.not_before_ms,
        "not_after_ms": record.not_after_ms,
        "revoked_at_ms": record.revoked_at_ms,
        "secret": None if secret is None else secret.expose_secret_for_export().hex(),
    }


def test_keystore_written_from_the_documented_format_loads(tmp_path: Path, seasoned: Side) -> None:
    body = {
        "keys": [record_json(r, seasoned.keys.secret(r.key_id)) for r in seasoned.keys.records()],
        "peers": {party: [record_json(r, None) for r in ring] for party, ring in seasoned.trust},
    }
    path = tmp_path / "independent.keys"
    write_keystore_independently(path, {"party_id": seasoned.party_id}, body, PASSPHRASE)
    keys, trust = load(path, PASSPHRASE)
    assert_same_party_and_trust(seasoned, keys, trust)


def inconsistent_bodies(seasoned: Side) -> dict[str, object]:
    keys = [record_json(r, seasoned.keys.secret(r.key_id)) for r in seasoned.keys.records()]
    peers = {party: [record_json(r, None) for r in ring] for party, ring in seasoned.trust}
    with_secret = next(k for k in keys if k["secret"] is not None)
    mismatched = [dict(k) for k in keys]
    mismatched[keys.index(with_secret)]["secret"] = "00" * 32
    bad_state = [dict(k, state="LOST") for k in keys]
    return {
        "body is a list": [],
        "keys missing": {"peers": peers},
        "secret does not match public key": {"keys": mismatched, "peers": peers},
        "unknown state": {"keys": bad_state, "peers": peers},
        "key item is a string": {"keys": ["key"], "peers": peers},
        "peers is a list": {"keys": keys, "peers": [["unit.220100.tax", []]]},
        "peer ring is a number": {"keys": keys, "peers": {"unit.220100.tax": 5}},
        "not_before is infinite": {"keys": [dict(k, not_before_ms=float("inf")) for k in keys], "peers": peers},
    }


@pytest.mark.parametrize(
    "case",
    [
        "body is a list",
        "keys missing",
        "secret does not match public key",
        "unknown state",
        "key item is a string",
        "peers is a list",
        "peer ring is a number",
        "not_before is infinite",
    ],
)
def test_authenticated_but_inconsistent_content_is_a_keystore_error(tmp_path: Path, seasoned: Side, case: str) -> None:
    # Regression for "peers is a list" (AttributeError) and "not_before is infinite" (OverflowError).
    path = tmp_path / "foreign.keys"
    write_keystore_independently(path, {"party_id": seasoned.party_id}, inconsistent_bodies(seasoned)[case], PASSPHRASE)
    with pytest.raises(KeystoreError) as caught:
        load(path, PASSPHRASE)
    assert not isinstance(caught.value, WrongPassphraseOrCorrupt)


def test_all_seasoned_states_survive(stored: Path) -> None:
    keys, _ = load(stored, PASSPHRASE)
    by_state = {r.state: r for r in keys.records()}
    assert keys.secret(by_state[KeyState.REVOKED].key_id) is None
    assert keys.secret(by_state[KeyState.RETIRING].key_id) is not None
    assert by_state[KeyState.REVOKED].revoked_at_ms is not None


# --- passphrase files ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [PASSPHRASE, PASSPHRASE + "\n", PASSPHRASE + "\r\n"], ids=["bare", "lf", "crlf"])
def test_passphrase_file_gives_its_one_line(tmp_path: Path, content: str) -> None:
    path = tmp_path / "passphrase"
    path.write_bytes(content.encode())
    path.chmod(0o600)
    assert read_passphrase_file(path) == PASSPHRASE


@pytest.mark.parametrize(
    ("content", "mode", "reason"),
    [
        (PASSPHRASE + "\n", 0o644, "readable or writable by other users"),
        (PASSPHRASE + "\n", 0o620, "readable or writable by other users"),
        (PASSPHRASE + "\nsecond line\n", 0o600, "more than one line"),
        (PASSPHRASE + "\n\n", 0o600, "more than one line"),
        ("\n", 0o600, "empty"),
        ("", 0o400, "empty"),
    ],
)
def test_passphrase_file_that_is_shared_empty_or_several_lines_is_refused_without_its_content(
    tmp_path: Path, content: str, mode: int, reason: str
) -> None:
    path = tmp_path / "passphrase"
    path.write_text(content, encoding="utf-8")
    path.chmod(mode)
    with pytest.raises(KeystoreError, match=reason) as caught:
        read_passphrase_file(path)
    assert "correct horse" not in str(caught.value) and "second line" not in str(caught.value)


def test_missing_or_binary_passphrase_file_is_a_keystore_error(tmp_path: Path) -> None:
    with pytest.raises(KeystoreError, match="no passphrase file"):
        read_passphrase_file(tmp_path / "absent")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00")
    binary.chmod(0o600)
    with pytest.raises(KeystoreError, match="not UTF-8"):
        read_passphrase_file(binary)
