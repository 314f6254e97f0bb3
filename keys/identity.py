"""A party's own keys: the private handles, their lifecycle, and the statements it signs about them."""

from __future__ import annotations

import os
from collections.abc import Iterator

from hedui.v1 import keys_pb2

from keys.announcements import sign_announcement, sign_bundle
from keys.errors import KeyStateError
from keys.fingerprint import Algorithm
from keys.handles import AgreementKey, PrivateKey, RandomSource, SigningKey
from keys.keyring import KeyRecord, Keyring, KeyState
from keys.party import check_party_id

#: Longest overlap a rotation may ask for; peers refuse longer ones (a forgotten old key is a liability).
MAX_OVERLAP_MS = 90 * 24 * 3600 * 1000
#: How far ahead a rotation may schedule the new key's takeover (time for peers to apply the announcement).
MAX_LEAD_MS = 30 * 24 * 3600 * 1000


class PartyKeys:
    """The signing and key-agreement keyrings of one party, with the private keys it holds.

    Made by :meth:`create` or loaded from a keystore. Secrets of retired and revoked keys are erased from the
    handle set as soon as the state changes, so nothing can be signed or decrypted with them any more.
    """

    def __init__(self, party_id: str, keyring: Keyring, secrets: dict[bytes, PrivateKey]) -> None:
        self.party_id = check_party_id(party_id)
        self._keyring = keyring
        self._secrets = {kid: key for kid, key in secrets.items() if self._holds_secret(keyring.get(kid))}

    @staticmethod
    def _holds_secret(record: KeyRecord | None) -> bool:
        return record is not None and record.state not in (KeyState.RETIRED, KeyState.REVOKED)

    @classmethod
    def create(cls, party_id: str, *, now_ms: int, rng: RandomSource = os.urandom) -> PartyKeys:
        """A new party with one active signing key and one active key-agreement key."""
        signing, agreement = SigningKey.generate(rng), AgreementKey.generate(rng)
        keyring = Keyring(KeyRecord(k.public, KeyState.ACTIVE, now_ms) for k in (signing, agreement))
        return cls(party_id, keyring, {signing.key_id: signing, agreement.key_id: agreement})

    def records(self) -> Iterator[KeyRecord]:
        """Every key record, both algorithms."""
        return iter(self._keyring)

    def record(self, key_id: bytes) -> KeyRecord | None:
        return self._keyring.get(key_id)

    def secret(self, key_id: bytes) -> PrivateKey | None:
        """The private handle for ``key_id`` while the key is neither retired nor revoked."""
        return self._secrets.get(key_id)

    def signing_key(self, now_ms: int) -> SigningKey:
        """The signing key to use now; KeyStateError if the party has none (all revoked or retired)."""
        record = self._keyring.current(Algorithm.ED25519, now_ms)
        key = self._secrets.get(record.key_id) if record else None
        if not isinstance(key, SigningKey):
            raise KeyStateError(f"party {self.party_id} has no usable signing key: rotate or create one")
        return key

    def agreement_public(self, now_ms: int) -> KeyRecord:
        """The key-agreement key that peers should seal for now."""
        record = self._keyring.current(Algorithm.X25519, now_ms)
        if record is None:
            raise KeyStateError(f"party {self.party_id} has no usable key-agreement key: rotate or create one")
        return record

    def agreement_secret(self, key_id: bytes) -> AgreementKey | None:
        key = self._secrets.get(key_id)
        return key if isinstance(key, AgreementKey) else None

    def advance(self, now_ms: int) -> list[KeyRecord]:
        """Let time move states on (pending -> active, retiring -> retired) and erase secrets that retired."""
        changed = self._keyring.advance(now_ms)
        self._forget_unusable()
        return changed

    def _forget_unusable(self) -> None:
        for kid in [kid for kid in self._secrets if not self._holds_secret(self._keyring.get(kid))]:
            del self._secrets[kid]

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
        old = self._keyring.current(algorithm, now_ms)
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
        self._keyring.transition(old.key_id, KeyState.RETIRING, not_after_ms=activate + overlap_ms)
        self._keyring.put(new_record)
        self._secrets[new.key_id] = new
        return signed

    def revoke(self, key_id: bytes, *, now_ms: int, reason: str) -> bytes:
        """Revoke a key now; returns the SignedKeyAnnouncement for peers.

        Signed by another usable signing key if there is one, otherwise by the revoked key itself (a key can
        always disown itself). Its secret is erased.
        """
        if not reason.isascii() or not 0 < len(reason) <= 64:
            raise KeyStateError("revocation reason must be a short ASCII code such as 'compromised'")
        target = self._keyring.require(key_id)
        self_signer = self._secrets.get(key_id)
        self._keyring.transition(key_id, KeyState.REVOKED, revoked_at_ms=now_ms)
        try:
            signer = self.signing_key(now_ms)
        except KeyStateError:
            if not isinstance(self_signer, SigningKey):
                self._keyring.put(target)  # nothing was revoked: no key could sign the announcement
                raise
            signer = self_signer
        message = keys_pb2.KeyAnnouncement(
            party_id=self.party_id,
            kind=keys_pb2.ANNOUNCEMENT_KIND_REVOCATION,
            old_key_id=target.key_id,
            issued_at_ms=now_ms,
            reason=reason,
        )
        signed = sign_announcement(message, signer)
        self._forget_unusable()
        return signed

    def bundle(self, now_ms: int) -> bytes:
        """SignedKeyBundle of every key that is not retired (revoked keys included, so peers learn of them)."""
        records = [r for r in self._keyring if r.state is not KeyState.RETIRED]
        return sign_bundle(self.party_id, records, self.signing_key(now_ms), now_ms)
