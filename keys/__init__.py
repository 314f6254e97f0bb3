"""The trust core: key handles, keyrings, fingerprints, the trust store, keystores and sealed envelopes.

No network and no database here; the gateway and the connectors build on these names.
"""

from keys.announcements import Bundle, armor, dearmor, read_bundle
from keys.clock import Clock, FixedClock, SystemClock
from keys.envelope import Courier, Header, Opened, Policy, open_at, seal_with
from keys.errors import (
    ENVELOPE_ERRORS,
    BadSignature,
    EnvelopeError,
    ExpiredEnvelope,
    KeyNotValidThen,
    KeysError,
    KeyStateError,
    KeystoreError,
    MalformedEnvelope,
    NotYetValidEnvelope,
    ReplayedEnvelope,
    ReplayStoreError,
    RevokedKey,
    SealedFileError,
    TrustError,
    TypeMismatch,
    UndecryptableEnvelope,
    UnknownKey,
    UnsupportedEnvelope,
    WrongPassphraseOrCorrupt,
    WrongRecipient,
)
from keys.fingerprint import Algorithm, bundle_fingerprint, key_fingerprint, key_id
from keys.handles import AgreementKey, PrivateKey, PublicKey, SigningKey
from keys.identity import PartyKeys
from keys.keyring import KeyRecord, Keyring, KeyState
from keys.keystore import KdfParams
from keys.replay import FileReplayCache, MemoryReplayCache, ReplayCache
from keys.roster import RosterError, RosterHistory, RosterMember
from keys.truststore import TrustStore

__all__ = [
    "ENVELOPE_ERRORS",
    "AgreementKey",
    "Algorithm",
    "BadSignature",
    "Bundle",
    "Clock",
    "Courier",
    "EnvelopeError",
    "ExpiredEnvelope",
    "FileReplayCache",
    "FixedClock",
    "Header",
    "KdfParams",
    "KeyNotValidThen",
    "KeyRecord",
    "KeyState",
    "KeyStateError",
    "Keyring",
    "KeysError",
    "KeystoreError",
    "MalformedEnvelope",
    "MemoryReplayCache",
    "NotYetValidEnvelope",
    "Opened",
    "PartyKeys",
    "Policy",
    "PrivateKey",
    "PublicKey",
    "ReplayCache",
    "ReplayStoreError",
    "ReplayedEnvelope",
    "RevokedKey",
    "RosterError",
    "RosterHistory",
    "RosterMember",
    "SealedFileError",
    "SigningKey",
    "SystemClock",
    "TrustError",
    "TrustStore",
    "TypeMismatch",
    "UndecryptableEnvelope",
    "UnknownKey",
    "UnsupportedEnvelope",
    "WrongPassphraseOrCorrupt",
    "WrongRecipient",
    "armor",
    "bundle_fingerprint",
    "dearmor",
    "key_fingerprint",
    "key_id",
    "open_at",
    "read_bundle",
    "seal_with",
]
