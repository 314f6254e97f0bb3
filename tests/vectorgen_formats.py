"""Deterministic test vectors of the formats around the envelope (docs/envelope.md sections 4.1, 10, 14-16):
fingerprints, armour, the parser's strictness, the payload limit and sealed files.

:func:`build_vectors` returns the document that ``scripts/make_vectors.py`` writes to
``tests/vectors/formats_v1.json``; ``tests/test_vectors.py`` builds it again, compares the two byte for byte and
checks every vector against the reference implementation. tests/vectors/envelope_v1.json is not touched: these
vectors came later (issue 10) and live beside it. Envelope vectors here have exactly the shape of that file's
negative vectors, so a harness written for it reads them as they are.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from hedui.v1 import envelope_pb2, media_pb2

from keys import _canonical, envelope
from keys.announcements import ANNOUNCEMENT_LABEL, BUNDLE_LABEL, armor, read_bundle, sign_bundle
from keys.errors import KeysError, MalformedEnvelope, SealedFileError, TrustError
from keys.fingerprint import Algorithm, key_fingerprint, key_id
from keys.handles import PrivateKey, _load_private
from keys.keyring import KeyRecord, KeyState
from tests import vectorgen as base
from tests.vectorgen import Draws, Json

FORMAT = "hedui-formats-v1-test-vectors"
KEY_SEED_DOMAIN = b"hedui.v1.test-vector-key\x00"


def key_seed(label: str) -> bytes:
    """SHAKE-256("hedui.v1.test-vector-key" || 0x00 || label), 32 bytes: the seed of a vector's extra key."""
    return hashlib.shake_256(KEY_SEED_DOMAIN + label.encode()).digest(32)


# --- fingerprints ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BundleCase:
    name: str
    description: str
    party_id: str
    #: (algorithm, seed, state, not_before, not_after, revoked_at) of each key, in the order the bundle lists them.
    keys: tuple[tuple[Algorithm, bytes, KeyState, int, int | None, int | None], ...]
    #: Index in ``keys`` of the signing key that signs the bundle.
    signer: int


NB = base.KEYS_NOT_BEFORE_MS
BUNDLES = (
    BundleCase(
        "bundle-new-party",
        "A party's first bundle, as `hedui-keys init` makes it: one active signing key, one active agreement key.",
        base.SENDER,
        (
            (Algorithm.ED25519, base.SENDER_SIGNING_SEED, KeyState.ACTIVE, NB, None, None),
            (Algorithm.X25519, key_seed("bundle-new-party/agreement"), KeyState.ACTIVE, NB, None, None),
        ),
        0,
    ),
    BundleCase(
        "bundle-after-rotation",
        "Four keys in four states; the fingerprint covers the party id and the public keys in key-id order, not "
        "the states, windows or the order the bundle lists them in.",
        base.RECIPIENT,
        (
            (Algorithm.ED25519, key_seed("bundle-after-rotation/old-signing"), KeyState.RETIRING, NB, NB + 10**9, None),
            (Algorithm.ED25519, key_seed("bundle-after-rotation/signing"), KeyState.ACTIVE, NB + 10**8, None, None),
            (Algorithm.X25519, base.RECIPIENT_AGREEMENT_SEED, KeyState.ACTIVE, NB, None, None),
            (Algorithm.X25519, key_seed("bundle-after-rotation/revoked"), KeyState.REVOKED, NB, None, NB + 5),
        ),
        1,
    ),
)


def _bundle_case(case: BundleCase) -> tuple[Json, bytes, str]:
    secrets: list[PrivateKey] = [_load_private(algorithm, seed) for algorithm, seed, *_ in case.keys]
    records = [
        KeyRecord(secret.public, state, not_before, not_after, revoked_at)
        for secret, (_, _, state, not_before, not_after, revoked_at) in zip(secrets, case.keys, strict=True)
    ]
    signer = secrets[case.signer]
    assert signer.algorithm is Algorithm.ED25519
    signed = sign_bundle(case.party_id, records, signer, base.CREATED_AT_MS)  # type: ignore[arg-type]
    fingerprint = read_bundle(signed).fingerprint  # the reference reader checks what was written
    doc = {
        "name": case.name,
        "description": case.description,
        "party_id": case.party_id,
        "issued_at_ms": base.CREATED_AT_MS,
        "keys": [
            {
                "algorithm": record.algorithm.name,
                "seed": secret.expose_secret_for_export().hex(),
                "public": record.public.raw.hex(),
                "key_id": key_id(record.algorithm, record.public.raw).hex(),
                "key_fingerprint": key_fingerprint(record.algorithm, record.public.raw),
                "state": record.state.name,
                "not_before_ms": record.not_before_ms,
                "not_after_ms": record.not_after_ms,
                "revoked_at_ms": record.revoked_at_ms,
            }
            for record, secret in zip(records, secrets, strict=True)
        ],
        "signer_key_id": signer.key_id.hex(),
        "key_id_order": sorted(key_id(r.algorithm, r.public.raw).hex() for r in records),
        "signed_bundle": signed.hex(),
        "fingerprint": fingerprint,
    }
    return doc, signed, fingerprint


def _fingerprints() -> tuple[list[Json], list[Json]]:
    cases = [_bundle_case(case) for case in BUNDLES]
    first = cases[0][2]
    digits = first.replace(" ", "")
    wrong_digit = first[:-1] + str((int(first[-1]) + 1) % 10)
    typed = [
        ("typed-as-printed", "The key letter's form: eight groups of five digits.", first, None),
        ("typed-without-spaces", "Forty digits without separators.", digits, None),
        (
            "typed-with-dashes",
            "Groups separated by dashes and extra spaces.",
            " " + first.replace(" ", " - ") + " ",
            None,
        ),
        (
            "typed-full-width",
            "Full-width digits and the ideographic space (U+3000), as a Chinese input method types them: NFKC makes "
            "them ASCII.",
            "".join(chr(0xFF10 + int(c)) if c.isdigit() else "\u3000" for c in first),
            None,
        ),
        ("wrong-digit", "The last digit changed: another bundle's fingerprint.", wrong_digit, TrustError),
        ("thirty-nine-digits", "One digit missing.", first[:-1], TrustError),
        (
            "letters",
            "A letter O for a zero.",
            first.replace("0", "O", 1) if "0" in first else "O" + first[1:],
            TrustError,
        ),
    ]
    checks = [
        {
            "name": name,
            "bundle": BUNDLES[0].name,
            "description": description,
            "typed": text,
            "accepted": error is None,
            **({"error": error.__name__, "code": error.code} if error else {}),
        }
        for name, description, text, error in typed
    ]
    return [doc for doc, _, _ in cases], checks


# --- armour ----------------------------------------------------------------------------------------------------


def _armor() -> tuple[list[Json], list[Json]]:
    bundle = _bundle_case(BUNDLES[0])[1]
    good = armor(bundle)
    lines = good.splitlines()
    positive = [
        {"name": "armor-bundle", "description": "A signed bundle as `hedui-keys export` writes it.",
         "label": BUNDLE_LABEL, "data": bundle.hex(), "text": good},
        {"name": "armor-one-byte", "description": "One byte: two '=' of padding.",
         "label": ANNOUNCEMENT_LABEL, "data": "01", "text": armor(b"\x01", ANNOUNCEMENT_LABEL)},
        {"name": "armor-two-bytes", "description": "Two bytes: one '=' of padding.",
         "label": BUNDLE_LABEL, "data": "0102", "text": armor(b"\x01\x02")},
        {"name": "armor-in-a-letter", "description": "Pasted into a letter with CRLF line ends, indented, with text "
         "before BEGIN and after END (ignored).", "label": BUNDLE_LABEL, "data": bundle.hex(),
         "text": "Dear colleague,\r\n\r\n" + "\r\n".join("  " + line + " \t" for line in lines) + "\r\nRegards\r\n"},
    ]  # fmt: skip
    body = "\n".join(lines[1:-1])

    def wrap(inner: str, label: str = BUNDLE_LABEL) -> str:
        return f"-----BEGIN {label}-----\n{inner}\n-----END {label}-----\n"

    negative = [
        ("armor-non-ascii", "An 'é' in place of one base64 character.", wrap("é" + body[1:])),
        ("armor-non-ascii-space", "A no-break space (U+00A0) between two lines: only ASCII whitespace is dropped.",
         wrap(body.replace("\n", "\u00a0", 1))),
        ("armor-url-alphabet", "A '-' (the URL-safe alphabet's 62) in place of a character.", wrap("-" + body[1:])),
        ("armor-missing-padding", "Two bytes without their '=' padding.", wrap("AQI")),
        ("armor-padding-bits", "'AQJ=' decodes to 01 02 like 'AQI=', but its two unused bits are 01, not 00.",
         wrap("AQJ=")),
        ("armor-padding-inside", "'=' before the end of the body.", wrap("AQ==AQ==")),
        ("armor-empty", "Nothing between the markers.", wrap("")),
        ("armor-no-end", "The END line is missing.", good.replace(lines[-1], "")),
        ("armor-other-label", "A bundle read where an announcement is expected.", good),
        ("armor-two-blocks", "Two bundles in one text.", good + good),
    ]  # fmt: skip
    return positive, [
        {
            "name": name,
            "description": description,
            "label": ANNOUNCEMENT_LABEL if name == "armor-other-label" else BUNDLE_LABEL,
            "text": text,
            "error": TrustError.__name__,
            "code": TrustError.code,
        }
        for name, description, text in negative
    ]


# --- envelopes: the parser's strictness and the payload limit ----------------------------------------------------


def _negative(name: str, error: type[KeysError], description: str, data: bytes, context: Json | None = None) -> Json:
    return {
        "name": name,
        "error": error.__name__,
        "code": error.code,
        "description": description,
        "envelope": data.hex(),
        "receiver": base.receiver() if context is None else context,
    }


def _signed_header(label: str, header: bytes) -> bytes:
    """An envelope around the negative vectors' small message, encrypted and signed correctly under ``header``."""
    return base._sign(header, base._encrypt(Draws.for_label(label), header, base._inner()))


def _envelope_negatives() -> list[Json]:
    outer = base._seal("negative-base")
    parts = _canonical.parse_canonical(envelope_pb2.Envelope, outer)
    lengthed = base._length_delimited
    vectors = [
        _negative(
            "malformed-envelope-repeated-field",
            MalformedEnvelope,
            "The negative-base envelope with its ciphertext field written twice (step 2a).",
            lengthed(1, parts.header) + lengthed(2, parts.ciphertext) * 2 + lengthed(3, parts.signature),
        ),
        _negative(
            "malformed-envelope-wrong-wire-type",
            MalformedEnvelope,
            "The negative-base envelope with the signature's key written as 1d (field 3, wire type 5) followed by "
            "4 of its bytes (step 2a).",
            lengthed(1, parts.header) + lengthed(2, parts.ciphertext) + b"\x1d" + parts.signature[:4],
        ),
        _negative(
            "malformed-envelope-group",
            MalformedEnvelope,
            "The negative-base envelope followed by an empty group of field 4 (23 24) (step 2a).",
            outer + b"\x23\x24",
        ),
    ]
    header = _canonical.encode(base._header(Draws.for_label("malformed-header-repeated-field")))
    vectors.append(
        _negative(
            "malformed-header-repeated-field",
            MalformedEnvelope,
            "Header starting 08 01 08 01: version written twice (the last value, 1, is read at step 3b); not "
            "canonical (step 3d). Encrypted and signed correctly.",
            _signed_header("malformed-header-repeated-field", b"\x08\x01" + header),
        )
    )
    header = _canonical.encode(base._header(Draws.for_label("malformed-header-wrong-wire-type")))
    vectors.append(
        _negative(
            "malformed-header-wrong-wire-type",
            MalformedEnvelope,
            "Header starting 0a 01 01: version (field 1) written with wire type 2 as one byte 01 (step 3a). A "
            "lenient protobuf parser keeps it as an unknown field and reads version 0, which is not unsupported "
            "but malformed. Encrypted and signed correctly.",
            _signed_header("malformed-header-wrong-wire-type", b"\x0a\x01\x01" + header[2:]),
        )
    )
    header = _canonical.encode(base._header(Draws.for_label("malformed-header-unknown-group")))
    vectors.append(
        _negative(
            "malformed-header-unknown-group",
            MalformedEnvelope,
            "Header followed by a group of field 14 holding field 1 = 1 (73 08 01 74) (step 3a). Encrypted and "
            "signed correctly.",
            _signed_header("malformed-header-unknown-group", header + b"\x73\x08\x01\x74"),
        )
    )
    return vectors


#: One byte more than a ciphertext may be: MAX_PAYLOAD_BYTES of payload plus the 16-byte tag, plus one.
OVER_LIMIT_CIPHERTEXT = envelope.MAX_PAYLOAD_BYTES + 16 + 1


def over_limit_envelope() -> tuple[bytes, bytes, bytes]:
    """Prefix, fill byte and suffix of the envelope whose ciphertext is one byte over the limit (signed correctly
    over the whole ciphertext, so that the size is the only fault)."""
    name = "malformed-ciphertext-over-limit"
    header = _canonical.encode(base._header(Draws.for_label(name)))
    fill = b"\x00"
    ciphertext_digest = hashlib.sha256(fill * OVER_LIMIT_CIPHERTEXT).digest()
    signature_input = envelope.SIGNATURE_DOMAIN + len(header).to_bytes(4, "big") + header + ciphertext_digest
    signature = base.signing_key(base.SENDER_SIGNING_SEED).sign(signature_input)
    prefix = base._length_delimited(1, header) + b"\x12" + base._varint(OVER_LIMIT_CIPHERTEXT)
    return prefix, fill, base._length_delimited(3, signature)


def _large_negatives() -> list[Json]:
    prefix, fill, suffix = over_limit_envelope()
    total = len(prefix) + OVER_LIMIT_CIPHERTEXT + len(suffix)
    assert total <= envelope.MAX_ENVELOPE_BYTES
    return [
        {
            "name": "malformed-ciphertext-over-limit",
            "error": MalformedEnvelope.__name__,
            "code": MalformedEnvelope.code,
            "description": f"A ciphertext of MAX_PAYLOAD_BYTES + 17 = {OVER_LIMIT_CIPHERTEXT} zero bytes in an "
            f"envelope of {total} bytes, under MAX_ENVELOPE_BYTES: refused at step 2c, before the header is read. "
            "Signed correctly over that ciphertext.",
            "construction": {
                "prefix": prefix.hex(),
                "fill_byte": fill.hex(),
                "fill_length": OVER_LIMIT_CIPHERTEXT,
                "suffix": suffix.hex(),
                "envelope_length": total,
            },
            "receiver": base.receiver(),
        }
    ]


# --- sealed files ----------------------------------------------------------------------------------------------


def _sealed_file(name: str, file_name: str) -> bytes:
    message = media_pb2.SealedFile(file_name=file_name, content=base.content(16), media_type="text/plain")
    return envelope.seal_with(
        message,
        sender=base.SENDER,
        signing_key=base.signing_key(base.SENDER_SIGNING_SEED),
        recipient=base.RECIPIENT,
        recipient_key=KeyRecord(
            base.agreement_key(base.RECIPIENT_AGREEMENT_SEED).public, KeyState.ACTIVE, base.KEYS_NOT_BEFORE_MS
        ),
        created_at_ms=base.CREATED_AT_MS,
        ttl_ms=base.TTL_MS,
        rng=Draws.for_label(name).rng(),
    )


def _sealed_file_negatives() -> list[Json]:
    cases: list[tuple[str, type[KeysError], str, str]] = [
        ("sealed-file-path-name", SealedFileError, "../../etc/cron.d/x", "A file name with a path."),
        ("sealed-file-backslash-name", SealedFileError, "..\\x.csv", "A file name with a Windows path separator."),
        ("sealed-file-control-character", SealedFileError, "a\nb.csv", "A line feed in the file name."),
        ("sealed-file-dot-dot", SealedFileError, "..", "The file name '..'."),
        ("sealed-file-empty-name", SealedFileError, "", "No file name."),
        ("sealed-file-hidden-name", SealedFileError, ".bash_login", "A file name starting with '.' (a hidden file)."),
        (
            "sealed-file-format-character",
            SealedFileError,
            "invoice\u202efdp.exe",
            "A format character (U+202E RIGHT-TO-LEFT OVERRIDE: shows as 'invoiceexe.pdf').",
        ),
    ]
    return [
        _negative(name, error, f"{description} A correct envelope otherwise.", _sealed_file(name, file_name))
        for name, error, file_name, description in cases
    ]


def build_vectors() -> Json:
    """The whole vector document, as written to tests/vectors/formats_v1.json."""
    bundles, typed = _fingerprints()
    armor_positive, armor_negative = _armor()
    return {
        "format": FORMAT,
        "specification": "docs/envelope.md (sections 4.1, 10, 14, 15, 16) and docs/keys.md (fingerprints)",
        "regenerate": "python scripts/make_vectors.py",
        "conventions": [
            "As in envelope_v1.json: byte strings are lower-case hex, texts are JSON strings, times are "
            "milliseconds since the epoch (UTC); keys, party ids, times and random bytes are those of "
            "envelope_v1.json.",
            "Extra keys are made from the seed SHAKE-256('hedui.v1.test-vector-key' || 0x00 || label), 32 bytes; "
            "each key lists its seed.",
            "bundles: 'signed_bundle' is the canonical SignedKeyBundle of 'keys' (in that order) issued at "
            "'issued_at_ms' and signed by 'signer_key_id'; 'fingerprint' is its bundle fingerprint, over the "
            "party id and the public keys in 'key_id_order'.",
            "fingerprint_typed: what a person types for the fingerprint of 'bundle'; accepted or refused with 'error'.",
            "armor: 'text' dearmors to 'data' under 'label' (and armor(data, label) gives 'text' for every "
            "positive vector but 'armor-in-a-letter'); armor_negative: dearmoring 'text' under 'label' fails "
            "with 'error'.",
            "envelope_negative and sealed_file_negative have the shape of envelope_v1.json's negative vectors; "
            "sealed files are opened as docs/envelope.md section 16 says, and fail with 'error'.",
            "envelope_negative_large: the envelope is 'prefix' || 'fill_byte' repeated 'fill_length' times || "
            "'suffix' ('envelope_length' bytes in all), too large to write out.",
        ],
        "constants": {"key_seed_domain": KEY_SEED_DOMAIN.hex(), "armor_line_length": 64},
        "bundles": bundles,
        "fingerprint_typed": typed,
        "armor": armor_positive,
        "armor_negative": armor_negative,
        "envelope_negative": _envelope_negatives(),
        "envelope_negative_large": _large_negatives(),
        "sealed_file_negative": _sealed_file_negatives(),
    }


def render(vectors: Json) -> str:
    """The exact text of the vector file."""
    return json.dumps(vectors, indent=2, ensure_ascii=False) + "\n"
