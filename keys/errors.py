"""Errors of the trust core: envelopes, keys, keystores and trust decisions.

Envelope failures form one hierarchy under :class:`EnvelopeError`, one class per reason, each with a stable
``code`` for logs and metrics. Callers outside the trust boundary should see only :attr:`EnvelopeError.public_message`
("invalid envelope"), the way Fernet reports every failure as one ``InvalidToken``: the precise reason is for the
audit log, not for a party that might be probing. No message here ever carries payload bytes or personal data.
"""

from __future__ import annotations

from common.errors import HeduiError


class KeysError(HeduiError):
    """Base of every error raised by the ``keys`` package."""

    code = "keys"


class EnvelopeError(KeysError):
    """An envelope was refused. Subclasses name the reason; the order of checks is in docs/envelope.md."""

    code = "invalid"
    #: What a caller outside the trust boundary may be told, whatever the reason.
    public_message = "invalid envelope"
    #: The envelope names a key of a known party that the receiver does not hold as usable (unknown, retired or
    #: revoked, the signer's or the recipient's): the two sides' views of the keys differ, and a trust
    #: synchronisation may cure it ("refresh keys", docs/exchange.md).
    refresh_keys = False


class MalformedEnvelope(EnvelopeError):
    """The bytes are not a canonical v1 envelope (parse failure, wrong field length, over a size limit...)."""

    code = "malformed"


class UnsupportedEnvelope(EnvelopeError):
    """The header names a format version or cipher suite this build does not implement."""

    code = "unsupported"


class WrongRecipient(EnvelopeError):
    """The envelope is addressed to another party, or to a key-agreement key we do not hold (any more)."""

    code = "wrong_recipient"


class UnknownRecipientKey(WrongRecipient):
    """Addressed to us, but sealed for a key-agreement key we do not hold (never known, or retired and erased)."""

    refresh_keys = True


class UnknownKey(EnvelopeError):
    """The sender's signing key id is not in the trust store for that sender."""

    code = "unknown_key"
    refresh_keys = True


class RevokedKey(EnvelopeError):
    """The signing key (or our key-agreement key it was sealed for) has been revoked."""

    code = "revoked_key"
    refresh_keys = True


class KeyNotValidThen(EnvelopeError):
    """The sender's key exists but its validity window does not contain the envelope's created-at time."""

    code = "key_not_valid"
    refresh_keys = True


class BadSignature(EnvelopeError):
    """The Ed25519 signature does not verify over the header and ciphertext."""

    code = "bad_signature"


class ExpiredEnvelope(EnvelopeError):
    """Now is past expires-at (plus the allowed clock skew)."""

    code = "expired"


class NotYetValidEnvelope(EnvelopeError):
    """Created-at lies further in the future than the allowed clock skew."""

    code = "not_yet_valid"


class ReplayedEnvelope(EnvelopeError):
    """This sender's message id was seen before."""

    code = "replay"


class UndecryptableEnvelope(EnvelopeError):
    """Signed correctly, but the payload does not decrypt with our key (the sender sealed it wrongly)."""

    code = "undecryptable"


class TypeMismatch(EnvelopeError):
    """The decrypted inner message is not of the type the signed header announced, or not one the caller accepts."""

    code = "type_mismatch"


#: Every envelope failure class, roughly in the order the checks run on open (docs/envelope.md has the exact order).
ENVELOPE_ERRORS: tuple[type[EnvelopeError], ...] = (
    MalformedEnvelope,
    UnsupportedEnvelope,
    WrongRecipient,
    UnknownKey,
    RevokedKey,
    KeyNotValidThen,
    BadSignature,
    ExpiredEnvelope,
    NotYetValidEnvelope,
    ReplayedEnvelope,
    UndecryptableEnvelope,
    TypeMismatch,
)


class KeyStateError(KeysError):
    """A key lifecycle transition that the state machine does not allow, or a missing key of a required kind."""

    code = "key_state"


class KeystoreError(KeysError):
    """A keystore file cannot be read or written."""

    code = "keystore"


class WrongPassphraseOrCorrupt(KeystoreError):
    """The keystore did not decrypt: the passphrase is wrong or the file was changed.

    Authenticated encryption cannot tell these two apart, and saying which would help an attacker guess.
    """

    code = "keystore_unreadable"

    def diagnostics(self) -> str:
        return (
            f"{self}. Check the passphrase (HEDUI_KEYS_PASSPHRASE or --passphrase-file). If it is right, the file "
            "was modified or damaged: restore it from the last backup; do not try to repair it by hand."
        )


class ReplayStoreError(KeysError):
    """The persistent replay store of a keystore (keys/replay.py) cannot be read or written, or is not one.

    A sealed file is never opened while this is so: without its replay store a keystore cannot tell a second
    opening of a file from the first.
    """

    code = "replay_store"


class SealedFileError(KeysError):
    """A sealed file (.hsf) opened correctly but what it carries cannot be written out (an unsafe file name)."""

    code = "sealed_file"


class TrustError(KeysError):
    """A bundle, announcement or fingerprint failed a trust check; nothing was imported or changed.

    ``reason`` is a short code (``a-z 0-9 _``) naming the check that failed, for acknowledgements, metrics and audit
    entries (docs/exchange.md, "Trust synchronisation"); the message says it in words.
    """

    code = "trust"

    def __init__(self, message: str, *, reason: str = "not_trusted") -> None:
        super().__init__(message)
        self.reason = reason
