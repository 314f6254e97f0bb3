"""A party's own keys: the private handles, their lifecycle, and the statements it signs about them."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NoReturn

from hedui.v1 import keys_pb2

from keys.announcements import read_announcement, sign_announcement, sign_bundle
from keys.errors import KeyStateError
from keys.fingerprint import Algorithm
from keys.handles import AgreementKey, PrivateKey, RandomSource, SigningKey
from keys.keyring import KeyRecord, Keyring, KeyState
from keys.party import check_party_id

#: Longest overlap a rotation may ask for; peers refuse longer ones (a forgotten old key is a liability).
MAX_OVERLAP_MS = 90 * 24 * 3600 * 1000
#: How far ahead a rotation may schedule the new key's takeover (time for peers to apply the announcement).
MAX_LEAD_MS = 30 * 24 * 3600 * 1000


#: How long a party keeps its own announcements (the longest lead plus the longest overlap): peers that missed one
#: get it again beside every trust synchronisation (docs/exchange.md, "Keys over the wire").
ANNOUNCEMENT_KEEP_MS = MAX_LEAD_MS + MAX_OVERLAP_MS
#: At most this many own announcements are kept, newest first.
MAX_KEPT_ANNOUNCEMENTS = 64


@dataclass(frozen=True)
class _State:
    """One consistent view of a party's keys. Never changed once published: a change makes a new one."""

    keyring: Keyring
    secrets: Mapping[bytes, PrivateKey]
    #: The party's own SignedKeyAnnouncements, oldest first.
    announcements: tuple[bytes, ...] = ()


class PartyKeys:
    """The signing and key-agreement keyrings of one party, with the private keys it holds.

    Made by :meth:`create` or loaded from a keystore. Secrets of retired and revoked keys are erased from the
    handle set as soon as the state changes, so nothing can be signed or decrypted with them any more.

    Safe to share between threads: readers take one immutable snapshot of the keys per call, and every change
    (advance, rotate, revoke, :meth:`adopt`) builds a new snapshot under a lock and swaps it in whole, so a thread
    sealing or opening an envelope never sees half a rotation.
    """

    def __init__(
        self,
        party_id: str,
        keyring: Keyring,
        secrets: Mapping[bytes, PrivateKey],
        announcements: Iterable[bytes] = (),
    ) -> None:
        self.party_id = check_party_id(party_id)
        self._write = threading.Lock()
        self._state = self._snapshot(keyring, secrets, tuple(announcements))

    @classmethod
    def _snapshot(
        cls, keyring: Keyring, secrets: Mapping[bytes, PrivateKey], announcements: tuple[bytes, ...]
    ) -> _State:
        kept = {kid: key for kid, key in secrets.items() if cls._holds_secret(keyring.get(kid))}
        return _State(keyring, MappingProxyType(kept), announcements)

    def __reduce__(self) -> NoReturn:
        raise TypeError("PartyKeys cannot be pickled (it holds private key handles); export it through a keystore")

    @staticmethod
    def _holds_secret(record: KeyRecord | None) -> bool:
        return record is not None and record.state not in (KeyState.RETIRED, KeyState.REVOKED)

    @classmethod
    def create(cls, party_id: str, *, now_ms: int, rng: RandomSource = os.urandom) -> PartyKeys:
        """A new party with one active signing key and one active key-agreement key."""
        signing, agreement = SigningKey.generate(rng), AgreementKey.generate(rng)
        keyring = Keyring(KeyRecord(k.public, KeyState.ACTIVE, now_ms) for k in (signing, agreement))
        return cls(party_id, keyring, {signing.key_id: signing, agreement.key_id: agreement})

    def copy(self) -> PartyKeys:
        """An independent PartyKeys with the same keys now (changing one leaves the other as it is)."""
        state = self._state
        return PartyKeys(self.party_id, state.keyring, state.secrets, state.announcements)

    def adopt(self, other: PartyKeys) -> None:
        """Take over ``other``'s keys at once, as one step (a keystore reloaded or changed and saved)."""
        if other.party_id != self.party_id:
            raise KeyStateError(f"keys of {other.party_id} cannot replace those of {self.party_id}")
        with self._write:
            self._state = other._state

    def same_as(self, other: PartyKeys) -> bool:
        """True if ``other`` holds exactly this object's keys now (one was copied from the other and neither changed
        since)."""
        return self._state is other._state

    def records(self) -> Iterator[KeyRecord]:
        """Every key record, both algorithms."""
        return iter(self._state.keyring)

    def record(self, key_id: bytes) -> KeyRecord | None:
        return self._state.keyring.get(key_id)

    def current(self, algorithm: Algorithm, now_ms: int) -> KeyRecord | None:
        """The key of ``algorithm`` in use now (see Keyring.current), or None."""
        return self._state.keyring.current(algorithm, now_ms)

    def secret(self, key_id: bytes) -> PrivateKey | None:
        """The private handle for ``key_id`` while the key is neither retired nor revoked."""
        return self._state.secrets.get(key_id)

    def signing_key(self, now_ms: int) -> SigningKey:
        """The signing key to use now; KeyStateError if the party has none (all revoked or retired)."""
        state = self._state
        record = state.keyring.current(Algorithm.ED25519, now_ms)
        key = state.secrets.get(record.key_id) if record else None
        if not isinstance(key, SigningKey):
            raise KeyStateError(f"party {self.party_id} has no usable signing key: rotate or create one")
        return key

    def agreement_public(self, now_ms: int) -> KeyRecord:
        """The key-agreement key that peers should seal for now."""
        record = self._state.keyring.current(Algorithm.X25519, now_ms)
        if record is None:
            raise KeyStateError(f"party {self.party_id} has no usable key-agreement key: rotate or create one")
        return record

    def agreement_secret(self, key_id: bytes) -> AgreementKey | None:
        key = self._state.secrets.get(key_id)
        return key if isinstance(key, AgreementKey) else None

    def announcements(self, *, since_ms: int = 0, limit: int | None = None) -> list[bytes]:
        """The party's own SignedKeyAnnouncements issued at or after ``since_ms``, oldest first; with ``limit``, the
        newest ``limit`` of them (still oldest first)."""
        chosen = [a for a in self._state.announcements if read_announcement(a).message.issued_at_ms >= since_ms]
        return chosen[-limit:] if limit is not None and limit < len(chosen) else chosen

    def advance(self, now_ms: int) -> list[KeyRecord]:
        """Let time move states on (pending -> active, retiring -> retired) and erase secrets that retired."""
        with self._write:
            state = self._state
            keyring = state.keyring.copy()
            changed = keyring.advance(now_ms)
            if changed:
                self._state = self._snapshot(keyring, state.secrets, state.announcements)
            return changed

    def _publish(self, keyring: Keyring, secrets: Mapping[bytes, PrivateKey], announcement: bytes, now_ms: int) -> None:
        """Swap in the state a rotation or revocation made, with its announcement kept (called under the lock)."""
        kept = [
            a
            for a in (*self._state.announcements, announcement)
            if read_announcement(a).message.issued_at_ms >= now_ms - ANNOUNCEMENT_KEEP_MS
        ]
        self._state = self._snapshot(keyring, secrets, tuple(kept[-MAX_KEPT_ANNOUNCEMENTS:]))

    def rotate(
        self,
        algorithm: Algorithm,
        *,
        now_ms: int,
        overlap_ms: int,
        activate_at_ms: int | None = None,
        rng: RandomSource = os.urandom,
    ) -> bytes:
        """Replace the current key of ``algorithm`` with a new one; returns the SignedKeyAnnouncement for peers.

        The new key takes over at ``activate_at_ms`` (now when None): until then it is pending and the old key goes
        on being used, so peers have that long to apply the announcement before anything is signed with, or sealed
        for, the new key. The old key is retiring from now and retired ``overlap_ms`` after the new key took
        over. The announcement is signed by the current signing key and, for a signing-key rotation, also by the
        new key (proof of possession).
        """
        activate = now_ms if activate_at_ms is None else activate_at_ms
        if not 0 < overlap_ms <= MAX_OVERLAP_MS:
            raise KeyStateError("overlap must be longer than zero and at most 90 days")
        if not now_ms <= activate <= now_ms + MAX_LEAD_MS:
            raise KeyStateError("the new key must take over between now and 30 days from now")
        with self._write:
            return self._rotate(algorithm, now_ms, overlap_ms, activate, rng)

    def _rotate(self, algorithm: Algorithm, now_ms: int, overlap_ms: int, activate: int, rng: RandomSource) -> bytes:
        state = self._state
        old = state.keyring.current(algorithm, now_ms)
        if old is None or old.state is not KeyState.ACTIVE:
            raise KeyStateError(f"no active {algorithm.name} key to rotate")
        signer = self.signing_key(now_ms)
        new: PrivateKey = SigningKey.generate(rng) if algorithm is Algorithm.ED25519 else AgreementKey.generate(rng)
        new_record = KeyRecord(new.public, KeyState.PENDING if activate > now_ms else KeyState.ACTIVE, activate)
        message = keys_pb2.KeyAnnouncement(
            party_id=self.party_id,
            kind=keys_pb2.ANNOUNCEMENT_KIND_ROTATION,
            old_key_id=old.key_id,
            new_key=new_record.to_proto(),
            overlap_until_ms=activate + overlap_ms,
            issued_at_ms=now_ms,
        )
        signed = sign_announcement(message, signer, new if isinstance(new, SigningKey) else None)
        keyring = state.keyring.copy()
        keyring.transition(old.key_id, KeyState.RETIRING, not_after_ms=activate + overlap_ms)
        keyring.put(new_record)
        self._publish(keyring, {**state.secrets, new.key_id: new}, signed, now_ms)
        return signed

    def revoke(self, key_id: bytes, *, now_ms: int, reason: str) -> bytes:
        """Revoke a key now; returns the SignedKeyAnnouncement for peers.

        Signed by another usable signing key if there is one, otherwise by the revoked key itself (a key can
        always disown itself). Its secret is erased.
        """
        if not reason.isascii() or not 0 < len(reason) <= 64:
            raise KeyStateError("revocation reason must be a short ASCII code such as 'compromised'")
        with self._write:
            state = self._state
            target = state.keyring.require(key_id)
            self_signer = state.secrets.get(key_id)
            keyring = state.keyring.copy()
            keyring.transition(key_id, KeyState.REVOKED, revoked_at_ms=now_ms)
            # Signed by another key usable now, if there is one (nothing was revoked until _publish below).
            record = keyring.current(Algorithm.ED25519, now_ms)
            other = state.secrets.get(record.key_id) if record else None
            signer = other if isinstance(other, SigningKey) else self_signer
            if not isinstance(signer, SigningKey):
                raise KeyStateError(f"party {self.party_id} has no usable signing key: rotate or create one")
            return self._revoke(target, keyring, signer, now_ms, reason)

    def _revoke(self, target: KeyRecord, keyring: Keyring, signer: SigningKey, now_ms: int, reason: str) -> bytes:
        message = keys_pb2.KeyAnnouncement(
            party_id=self.party_id,
            kind=keys_pb2.ANNOUNCEMENT_KIND_REVOCATION,
            old_key_id=target.key_id,
            issued_at_ms=now_ms,
            reason=reason,
        )
        signed = sign_announcement(message, signer)
        self._publish(keyring, self._state.secrets, signed, now_ms)
        return signed

    def bundle(self, now_ms: int) -> bytes:
        """SignedKeyBundle of every key that is not retired (revoked keys included, so peers learn of them)."""
        records = [r for r in self._state.keyring if r.state is not KeyState.RETIRED]
        return sign_bundle(self.party_id, records, self.signing_key(now_ms), now_ms)
