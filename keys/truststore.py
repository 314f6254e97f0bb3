"""The trust store: peers' public keys by party id, and the rules for changing them.

Keys enter only two ways: a bundle imported after a person compared its fingerprint out of band (first
enrolment), or an announcement signed by a key the store already trusts (rotation, revocation). Nothing else
changes what the store trusts; every refusal leaves the store as it was.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable, Iterator, Mapping

from hedui.v1 import keys_pb2

from keys.announcements import ANNOUNCEMENT_DOMAIN, Announcement, Bundle, read_announcement, read_bundle
from keys.clock import SystemClock
from keys.errors import KeyStateError, TrustError
from keys.fingerprint import Algorithm
from keys.identity import MAX_LEAD_MS, MAX_OVERLAP_MS
from keys.keyring import KeyRecord, Keyring, KeyState

#: How far in the future an announcement's issued-at may lie (clock differences between parties).
ANNOUNCEMENT_SKEW_MS = 5 * 60 * 1000


class TrustStore:
    """Public keys of every peer this party exchanges with.

    Safe to share between threads: the keyrings it hands out are never changed afterwards. Every change builds new
    keyrings under a lock and swaps the whole peer table in one step, so a thread opening an envelope sees the
    store before or after an announcement, never half of one. Callers must not change a keyring they are given.
    """

    def __init__(self) -> None:
        self._peers: Mapping[str, Keyring] = {}
        self._write = threading.Lock()

    def parties(self) -> list[str]:
        return sorted(self._peers)

    def keyring(self, party_id: str) -> Keyring | None:
        return self._peers.get(party_id)

    def __iter__(self) -> Iterator[tuple[str, Keyring]]:
        return iter(sorted(self._peers.items()))

    def copy(self) -> TrustStore:
        """An independent trust store holding the same keys now."""
        other = TrustStore()
        other._peers = dict(self._peers)
        return other

    def adopt(self, other: TrustStore) -> None:
        """Take over ``other``'s keys at once, as one step (a keystore reloaded, or changed and saved)."""
        with self._write:
            self._peers = dict(other._peers)

    def same_as(self, other: TrustStore) -> bool:
        """True if ``other`` holds the very keyrings this store holds (one was copied from the other and neither
        changed since)."""
        mine, theirs = self._peers, other._peers
        return mine.keys() == theirs.keys() and all(mine[p] is theirs[p] for p in mine)

    def set_keyring(self, party_id: str, keyring: Keyring) -> None:
        """Install a peer's keyring as loaded from our own keystore (already trusted)."""
        with self._write:
            self._peers = {**self._peers, party_id: keyring}

    def signing_record(self, party_id: str, key_id: bytes) -> KeyRecord | None:
        """The record of ``party_id``'s signing key ``key_id``, or None if the store does not know it."""
        keyring = self._peers.get(party_id)
        record = keyring.get(key_id) if keyring else None
        return record if record is not None and record.algorithm is Algorithm.ED25519 else None

    def agreement_key_for(self, party_id: str, now_ms: int) -> KeyRecord:
        """The key-agreement key to seal for ``party_id`` now."""
        keyring = self._peers.get(party_id)
        if keyring is None:
            raise TrustError(f"party {party_id} is not in the trust store: import its bundle first")
        record = keyring.current(Algorithm.X25519, now_ms)
        if record is None:
            raise TrustError(f"party {party_id} has no usable key-agreement key in the trust store")
        return record

    def advance(self, now_ms: int) -> None:
        with self._write:
            peers = dict(self._peers)
            changed = False
            for party_id, keyring in peers.items():
                moved = keyring.copy()
                if moved.advance(now_ms):
                    peers[party_id], changed = moved, True
            if changed:
                self._peers = peers

    def import_bundle(
        self,
        data: bytes,
        *,
        expected_fingerprint: str,
        own_party_id: str | None = None,
        now_ms: int | None = None,
    ) -> Bundle:
        """Trust the keys in a signed bundle, only if its fingerprint equals the one read out of band.

        The fingerprint covers the party id and the public keys, not their states or validity windows, which the
        bundle's signer writes. So for a party the store already holds:

        * a bundle that brings no key the store does not know (the same key letter as before) proves nothing the
          store did not know, and is accepted only from a signer that may speak for the party, by the rule that
          governs announcements (:meth:`_trusted_signer`): an old bundle, or one re-signed with a leaked superseded
          key, is refused;
        * a bundle with new keys is a re-enrolment the person comparing the new key letter has vouched for;
        * either way no known key moves backwards in its lifecycle or gets a wider window than the store gave it,
          and keys the store has revoked stay revoked (kept even when the bundle leaves them out).

        Raises TrustError (and changes nothing) on any mismatch.
        """
        bundle = read_bundle(data)
        bundle.require_fingerprint(expected_fingerprint)
        if bundle.party_id == own_party_id:
            raise TrustError("this bundle is our own party's; a party does not import itself")
        with self._write:
            return self._import(bundle, now_ms)

    def _import(self, bundle: Bundle, now_ms: int | None) -> Bundle:
        held = self._peers.get(bundle.party_id)
        if held is not None and all(held.get(record.key_id) is not None for record in bundle.keys):
            # Nothing new to vouch for: the bundle is the party speaking about its keys, like an announcement.
            now = SystemClock().now_ms() if now_ms is None else now_ms
            signer = held.require(bundle.signer_key_id)
            if not self._trusted_signer(held, signer, bundle.issued_at_ms, now):
                raise TrustError(
                    f"this bundle of {bundle.party_id} brings no key the trust store does not already hold and is "
                    "not signed by the party's current signing key: it can only repeat or roll back what the trust "
                    "store knows. Nothing was imported; apply the party's announcements instead."
                )
        self._peers = {**self._peers, bundle.party_id: _merged(held, bundle.keys)}
        return bundle

    def apply_announcement(self, data: bytes, *, now_ms: int) -> KeyRecord:
        """Apply a peer's signed rotation or revocation. Idempotent; returns the record it changed or added.

        Raises TrustError, with a ``reason`` code naming the check, and changes nothing when it refuses.
        """
        ann = read_announcement(data)
        with self._write:
            return self._apply(ann, now_ms)

    def _apply(self, ann: Announcement, now_ms: int) -> KeyRecord:
        msg = ann.message
        keyring = self._peers.get(msg.party_id)
        if keyring is None:
            raise TrustError(
                f"announcement from party {msg.party_id}, which is not in the trust store", reason="unknown_party"
            )
        if msg.issued_at_ms > now_ms + ANNOUNCEMENT_SKEW_MS:
            raise TrustError("announcement is dated in the future", reason="announcement_in_future")
        target = keyring.get(msg.old_key_id)
        if target is None:
            raise TrustError("announcement names a key the trust store does not hold", reason="unknown_key")
        signer = keyring.get(ann.signer_key_id)
        if signer is None or signer.algorithm is not Algorithm.ED25519:
            raise TrustError("announcement is not signed by a known signing key of that party", reason="unknown_signer")
        if not signer.public.verify(ann.signature, ANNOUNCEMENT_DOMAIN + ann.body):
            raise TrustError("announcement signature does not verify", reason="bad_signature")
        work = keyring.copy()  # changed below, swapped in only if the announcement passes every check
        if msg.kind == keys_pb2.ANNOUNCEMENT_KIND_REVOCATION:
            record = self._revoke(work, target, signer, msg, now_ms)
        elif msg.kind == keys_pb2.ANNOUNCEMENT_KIND_ROTATION:
            record = self._rotate(work, target, signer, ann, now_ms)
        else:
            raise TrustError("announcement kind is not known", reason="unknown_kind")
        if list(work) != list(keyring):
            self._peers = {**self._peers, msg.party_id: work}
        return record

    @staticmethod
    def _trusted_signer(keyring: Keyring, signer: KeyRecord, issued_at_ms: int, now_ms: int) -> bool:
        """May ``signer`` speak for its party about other keys (rotate a key, revoke another one)?

        It must have been valid when the announcement says it was made AND be valid now: issued_at is chosen by
        the signer, so checking it alone lets a retired (erased, possibly leaked) key sign backdated announcements.
        And it must be the party's signing key now: an active key, or a retiring one only while no successor has
        taken over (a staged rotation's lead time). Once the successor is in charge, the old key may still verify
        what it signed before and revoke itself, but not revoke its successor or install keys of its own choosing.
        """
        if not (signer.valid_at(issued_at_ms) and signer.valid_at(now_ms)):
            return False
        if signer.state in (KeyState.ACTIVE, KeyState.PENDING):
            return True
        current = keyring.current(Algorithm.ED25519, now_ms)
        return signer.state is KeyState.RETIRING and current is not None and current.key_id == signer.key_id

    @classmethod
    def _revoke(
        cls, keyring: Keyring, target: KeyRecord, signer: KeyRecord, msg: keys_pb2.KeyAnnouncement, now_ms: int
    ) -> KeyRecord:
        if target.state is KeyState.REVOKED:
            return target
        # A key may always disown itself; otherwise the signer must be a key trusted then and now.
        if signer.key_id != target.key_id and not cls._trusted_signer(keyring, signer, msg.issued_at_ms, now_ms):
            raise TrustError(
                "revocation of another key is not signed by the party's current signing key, valid now and "
                "when it was issued",
                reason="signer_not_current",
            )
        return keyring.transition(target.key_id, KeyState.REVOKED, revoked_at_ms=msg.issued_at_ms)

    @classmethod
    def _rotate(cls, keyring: Keyring, old: KeyRecord, signer: KeyRecord, ann: Announcement, now_ms: int) -> KeyRecord:
        msg, new_key = ann.message, ann.new_key
        if new_key is None or new_key.algorithm is not old.algorithm:
            raise TrustError(
                "rotation must carry a new key of the same algorithm as the old one", reason="bad_rotation"
            )
        known = keyring.get(new_key.key_id)
        if known is not None:
            return known  # already applied
        if not cls._trusted_signer(keyring, signer, msg.issued_at_ms, now_ms):
            raise TrustError(
                "rotation is not signed by the party's current signing key, valid now and when it was issued",
                reason="signer_not_current",
            )
        if old.algorithm is Algorithm.ED25519:
            if signer.key_id != old.key_id:
                raise TrustError("a signing-key rotation must be signed by the key it replaces", reason="bad_rotation")
            if not new_key.public.verify(ann.new_key_signature, ANNOUNCEMENT_DOMAIN + ann.body):
                raise TrustError(
                    "rotation lacks a valid proof of possession by the new key", reason="no_proof_of_possession"
                )
        # The new key takes over at its not_before (a staged rotation) or when the announcement was issued.
        takes_over = max(msg.issued_at_ms, new_key.not_before_ms)
        if takes_over - msg.issued_at_ms > MAX_LEAD_MS:
            raise TrustError("rotation schedules the new key more than 30 days ahead", reason="bad_rotation")
        if not 0 < msg.overlap_until_ms - takes_over <= MAX_OVERLAP_MS:
            raise TrustError("rotation overlap must be longer than zero and at most 90 days", reason="bad_rotation")
        if old.state is KeyState.REVOKED:
            raise TrustError("rotation of a revoked key; enrol the party again with a new bundle", reason="key_revoked")
        if old.state is not KeyState.ACTIVE:
            raise TrustError(
                f"only an active key can be rotated; this one is {old.state.name.lower()}", reason="key_not_active"
            )
        try:
            keyring.transition(old.key_id, KeyState.RETIRING, not_after_ms=msg.overlap_until_ms)
        except KeyStateError as exc:
            raise TrustError(str(exc), reason="key_not_active") from exc
        record = KeyRecord(new_key.public, KeyState.PENDING if takes_over > now_ms else KeyState.ACTIVE, takes_over)
        keyring.put(record)
        return record


def _merged(held: Keyring | None, incoming: Iterable[KeyRecord]) -> Keyring:
    """The keyring a re-imported bundle leaves: its keys, none of them earlier in the lifecycle or valid for longer
    than the store already knew them, plus every key the store has revoked."""
    if held is None:
        return Keyring(incoming)
    merged = Keyring(record for record in held if record.state is KeyState.REVOKED)
    for record in incoming:
        known = held.get(record.key_id)
        merged.put(record if known is None else _narrower(known, record))
    return merged


def _narrower(known: KeyRecord, claimed: KeyRecord) -> KeyRecord:
    """Of two records of one key, the later state, and the window both allow."""
    later = claimed if claimed.state > known.state else known
    ends = [end for end in (known.not_after_ms, claimed.not_after_ms) if end is not None]
    return dataclasses.replace(
        later,
        not_before_ms=max(known.not_before_ms, claimed.not_before_ms),
        not_after_ms=min(ends) if ends else None,
    )
