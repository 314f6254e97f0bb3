"""A running service's keystore: the keys in use, reloaded when the file changes, changed and saved safely, rotated
on schedule, and the party's own announcements handed on for delivery to its peers.

A gateway or connector loads its keystore once at start and shares the :class:`~keys.identity.PartyKeys` and
:class:`~keys.truststore.TrustStore` objects with every thread that seals or opens an envelope. Those objects never
change in place: :class:`LiveKeystore` swaps a complete new state into them (``adopt``), so a thread in the middle
of an envelope sees the keys before or after a change, never half of one.

Changes come from three places, and all of them go through the keystore's lock file (``keystore.locked``), so that
none of them loses another's:

* ``hedui-keys`` run by an operator while the service runs (rotate, revoke, import, apply): the service notices the
  file changed (size, modification time, inode; then SHA-256 of the bytes) and reloads it (:meth:`refresh`);
* the service itself: an announcement received from a peer, keys retired by time, a scheduled rotation
  (:meth:`change`): the change is made on copies, the copies are saved, and only then adopted;
* another gateway replica sharing the keystore folder, which rotated on schedule: a reload like the first case.

Whatever the source, the party's own announcements found in the keystore that this process has not handed on yet are
passed to the listeners (:meth:`on_announcements`), which publish them as trust items for every peer (docs/keys.md,
"Keys over the wire").
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from keys import keystore
from keys.announcements import read_announcement
from keys.clock import DAY_MS, HOUR_MS, Clock, SystemClock
from keys.errors import KeyStateError, KeystoreError
from keys.fingerprint import Algorithm
from keys.identity import MAX_LEAD_MS, MAX_OVERLAP_MS, PartyKeys
from keys.keyring import Keyring, KeyState
from keys.truststore import TrustStore

log = logging.getLogger("hedui.keys.live")

#: Own announcements sent beside every trust synchronisation: those of the last 45 days, at most 16 (the newest).
ATTACHMENT_WINDOW_MS = 45 * DAY_MS
MAX_ATTACHMENTS = 16


@dataclass(frozen=True)
class RotationPolicy:
    """Scheduled automatic rotation ([keys] rotate_agreement_days, rotate_signing_days, rotation_lead_hours,
    rotation_overlap_days of both services).

    A key is due for rotation ``period - lead`` after it took over: then a successor is made that takes over ``lead``
    later (time for every peer to apply the announcement), and the old key stays valid ``overlap`` after that.
    A period of 0 turns automatic rotation of that key off.
    """

    agreement_ms: int = 30 * DAY_MS
    signing_ms: int = 180 * DAY_MS
    lead_ms: int = 24 * HOUR_MS
    overlap_ms: int = 14 * DAY_MS

    def __post_init__(self) -> None:
        if self.agreement_ms < 0 or self.signing_ms < 0:
            raise ValueError("rotation periods must not be negative (0 turns automatic rotation off)")
        if not 0 < self.lead_ms <= MAX_LEAD_MS:
            raise ValueError("the rotation lead must be longer than zero and at most 30 days")
        if not 0 < self.overlap_ms <= MAX_OVERLAP_MS:
            raise ValueError("the rotation overlap must be longer than zero and at most 90 days")
        for period in (self.agreement_ms, self.signing_ms):
            if period and period <= self.lead_ms:
                raise ValueError("a rotation period must be longer than the rotation lead")

    @classmethod
    def from_config(
        cls, *, agreement_days: float, signing_days: float, lead_hours: float, overlap_days: float
    ) -> RotationPolicy | None:
        """The policy a [keys] section describes; None when both periods are 0 (no automatic rotation). Raises
        ValueError, in the config's terms, for values that do not fit together."""
        if agreement_days < 0 or signing_days < 0:
            raise ValueError("keys.rotate_agreement_days and keys.rotate_signing_days must be 0 (off) or more")
        if not 0 < lead_hours <= MAX_LEAD_MS / HOUR_MS:
            raise ValueError("keys.rotation_lead_hours must be more than 0 and at most 720 (30 days)")
        if not 0 < overlap_days <= MAX_OVERLAP_MS / DAY_MS:
            raise ValueError("keys.rotation_overlap_days must be more than 0 and at most 90")
        lead_ms = int(lead_hours * HOUR_MS)
        periods = (int(agreement_days * DAY_MS), int(signing_days * DAY_MS))
        if any(0 < period <= lead_ms for period in periods):
            raise ValueError("a rotation period (keys.rotate_*_days) must be longer than keys.rotation_lead_hours")
        if not any(periods):
            return None
        return cls(periods[0], periods[1], lead_ms, int(overlap_days * DAY_MS))

    def period_ms(self, algorithm: Algorithm) -> int:
        return self.signing_ms if algorithm is Algorithm.ED25519 else self.agreement_ms

    @staticmethod
    def _successor_waiting(party: PartyKeys, algorithm: Algorithm, now_ms: int) -> bool:
        return any(
            r.algorithm is algorithm and r.state is KeyState.PENDING and r.not_before_ms > now_ms
            for r in party.records()
        )

    def due_at(self, party: PartyKeys, algorithm: Algorithm, now_ms: int) -> int | None:
        """When the key of ``algorithm`` in use now is due for rotation (ms), or None: rotation of it is off, a
        successor is already waiting to take over, or the party has no usable key of it (an operator must act)."""
        period = self.period_ms(algorithm)
        current = party.current(algorithm, now_ms)
        if not period or current is None or self._successor_waiting(party, algorithm, now_ms):
            return None
        return current.not_before_ms + period - self.lead_ms

    def rotate_due(self, party: PartyKeys, now_ms: int) -> list[bytes]:
        """Let time move ``party``'s key states on, then rotate the keys that are due; returns the announcements.

        The key-agreement key goes first, and waits while a signing-key successor is pending: its announcement is
        then signed by a signing key that peers still hold as current, whenever they apply it (a retiring key whose
        successor has taken over may not speak for the party, docs/keys.md "Lifecycle").
        """
        party.advance(now_ms)  # a successor whose takeover has come is the key to rotate next
        made = []
        for algorithm in (Algorithm.X25519, Algorithm.ED25519):
            due = self.due_at(party, algorithm, now_ms)
            if due is None or now_ms < due:
                continue
            if algorithm is Algorithm.X25519 and self._successor_waiting(party, Algorithm.ED25519, now_ms):
                continue
            made.append(
                party.rotate(algorithm, now_ms=now_ms, overlap_ms=self.overlap_ms, activate_at_ms=now_ms + self.lead_ms)
            )
        return made


class RotationSettings:
    """What the [keys] sections of the gateway's and the connector's configs share: the checks of their rotation
    and watch settings, and the policy they describe. Each section declares the fields, with its own wording."""

    rotate_agreement_days: float
    rotate_signing_days: float
    rotation_lead_hours: float
    rotation_overlap_days: float
    watch_interval_seconds: float

    def __post_init__(self) -> None:
        self.rotation_policy()
        if not 0 < self.watch_interval_seconds <= 3600:
            raise ValueError("keys.watch_interval_seconds must be more than 0 and at most 3600")

    def rotation_policy(self) -> RotationPolicy | None:
        """Automatic rotation as configured (None: off)."""
        return RotationPolicy.from_config(
            agreement_days=self.rotate_agreement_days,
            signing_days=self.rotate_signing_days,
            lead_hours=self.rotation_lead_hours,
            overlap_days=self.rotation_overlap_days,
        )


@dataclass(frozen=True)
class _FileMark:
    """What the keystore file looked like when this process last read or wrote it."""

    stat: tuple[int, int, int]
    sha256: bytes


def _stat(path: Path) -> tuple[int, int, int]:
    info = os.stat(path)
    return (info.st_mtime_ns, info.st_size, info.st_ino)


def _mark(path: Path) -> _FileMark:
    stat = _stat(path)
    return _FileMark(stat, hashlib.sha256(path.read_bytes()).digest())


#: Receives own announcements the service has not handed on yet; raising keeps them for the next try.
AnnouncementListener = Callable[[Sequence[bytes]], None]


class LiveKeystore:
    """The keys a running service uses, kept in step with its keystore file (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        passphrase_file: Path,
        loaded: keystore.LoadedKeystore,
        *,
        clock: Clock | None = None,
    ) -> None:
        self.path = Path(path)
        self.passphrase_file = Path(passphrase_file)
        self.party = loaded.party
        self.trust = loaded.trust
        self.clock: Clock = clock or SystemClock()
        self._kdf = loaded.kdf
        self._mark = _mark(self.path)
        self._lock = threading.RLock()
        self._listeners: list[AnnouncementListener] = []
        self._handed_on: set[bytes] = set()
        #: Times the file was reloaded because another program changed it.
        self.reloads = 0

    @classmethod
    def open(cls, path: Path, passphrase_file: Path, *, clock: Clock | None = None) -> LiveKeystore:
        """Load the keystore at ``path`` with the passphrase in ``passphrase_file``."""
        passphrase = keystore.read_passphrase_file(Path(passphrase_file))
        return cls(path, passphrase_file, keystore.read(Path(path), passphrase), clock=clock)

    # -- reading the file ------------------------------------------------------------------------------------------

    def changed_on_disk(self) -> bool:
        """Whether the file's size, modification time or inode differ from what this process last read or wrote
        (a cheap stat; the bytes are compared only when these differ)."""
        try:
            return _stat(self.path) != self._mark.stat
        except OSError:
            return False  # being replaced right now, or gone: keep the keys in use and look again later

    def refresh(self, *, wait_s: float = 0.0) -> bool:
        """Reload the keystore if another program changed it; True when new keys were adopted. With the lock
        held by another program (``hedui-keys`` at work), gives up after ``wait_s`` and returns False: the next
        call tries again. Raises KeystoreError for a file that cannot be read (the keys in use stay)."""
        if not self.changed_on_disk():
            return False
        with self._lock:
            try:
                with keystore.locked(self.path, timeout_s=wait_s):
                    adopted = self._reload()
            except keystore.KeystoreBusy:
                return False
        self.hand_on()
        return adopted

    def _reload(self) -> bool:
        """Under both locks: adopt the file's keys if its bytes differ from what this process knows."""
        mark = _mark(self.path)
        if mark.sha256 == self._mark.sha256:
            self._mark = mark  # touched, not changed
            return False
        loaded = keystore.read(self.path, keystore.read_passphrase_file(self.passphrase_file))
        if loaded.party.party_id != self.party.party_id:
            raise KeystoreError(
                f"{self.path} now holds the keys of {loaded.party.party_id}, not {self.party.party_id}; kept the "
                "keys in use"
            )
        _keep_revocations(self.trust, loaded.trust)
        self.party.adopt(loaded.party)
        self.trust.adopt(loaded.trust)
        self._kdf, self._mark = loaded.kdf, mark
        self.reloads += 1
        log.info("keystore reloaded: it was changed by another program", extra={"party": self.party.party_id})
        return True

    # -- changing the keys -----------------------------------------------------------------------------------------

    def change(self, edit: Callable[[PartyKeys, TrustStore], object], *, wait_s: float = 10.0) -> bool:
        """Apply ``edit`` to copies of the keys; if it changed anything, save the copies to the keystore and adopt
        them, in that order (a failed save changes nothing in use). Returns whether anything changed. Runs under
        the keystore's lock (waiting up to ``wait_s`` for another program: KeystoreError after that) with the file
        reloaded first if another program changed it. Whatever ``edit`` raises propagates, nothing changed."""
        with self._lock, keystore.locked(self.path, timeout_s=wait_s):
            if self.changed_on_disk():
                self._reload()
            party, trust = self.party.copy(), self.trust.copy()
            edit(party, trust)
            if party.same_as(self.party) and trust.same_as(self.trust):
                return False
            passphrase = keystore.read_passphrase_file(self.passphrase_file)
            keystore.save(self.path, party, trust, passphrase, kdf=self._kdf)
            self._mark = _mark(self.path)
            self.party.adopt(party)
            self.trust.adopt(trust)
        self.hand_on()
        return True

    def apply_announcement(self, data: bytes, *, now_ms: int) -> bool:
        """Apply a peer's signed announcement; True if it changed the trust store (then saved). Raises TrustError
        (with its reason code) and changes nothing when the announcement is refused; an announcement already
        applied changes nothing and needs neither the lock nor a save."""
        probe = self.trust.copy()
        probe.apply_announcement(data, now_ms=now_ms)
        if probe.same_as(self.trust):
            return False
        return self.change(lambda _, trust: trust.apply_announcement(data, now_ms=now_ms))

    def maintain(self, policy: RotationPolicy | None, *, now_ms: int | None = None) -> list[bytes]:
        """The key job of the service that owns the keystore: let time retire keys (saved), and with ``policy``
        rotate the keys that are due. Returns the announcements of the rotations made (already handed on)."""
        now = self.clock.now_ms() if now_ms is None else now_ms
        made: list[bytes] = []

        def edit(party: PartyKeys, trust: TrustStore) -> None:
            party.advance(now)
            trust.advance(now)
            if policy is not None:
                made.extend(policy.rotate_due(party, now))

        self.change(edit)
        for announcement in made:
            message = read_announcement(announcement).message
            log.info(
                "key rotated on schedule; announced to every peer",
                extra={"party": self.party.party_id, "key": message.new_key.key_id.hex()},
            )
        return made

    def advance_in_memory(self, now_ms: int | None = None) -> None:
        """Let time move the states of the keys in use without saving (a replica that does not own the key job:
        the one that does saves, and this one reloads)."""
        now = self.clock.now_ms() if now_ms is None else now_ms
        self.party.advance(now)
        self.trust.advance(now)

    # -- own announcements ---------------------------------------------------------------------------------------

    def on_announcements(self, listener: AnnouncementListener) -> None:
        """Call ``listener`` with the own announcements not handed on yet (now, and after every reload or change)."""
        self._listeners.append(listener)
        self.hand_on()

    def hand_on(self) -> None:
        """Give every listener the own announcements this process has not handed on yet. A listener that raises
        gets them again at the next call (the keeper calls this regularly)."""
        with self._lock:
            fresh = [a for a in self.party.announcements() if hashlib.sha256(a).digest() not in self._handed_on]
            if not fresh or not self._listeners:
                return
            try:
                for listener in self._listeners:
                    listener(fresh)
            except Exception as exc:
                log.warning("own announcements not handed on; trying again later", extra={"error": type(exc).__name__})
                return
            self._handed_on.update(hashlib.sha256(a).digest() for a in fresh)

    def attachments(self, now_ms: int | None = None) -> list[bytes]:
        """The own announcements that go beside every trust synchronisation: those of the last 45 days, at most
        the 16 newest, oldest first (the order they were made in, which is the order they apply in)."""
        now = self.clock.now_ms() if now_ms is None else now_ms
        return self.party.announcements(since_ms=now - ATTACHMENT_WINDOW_MS, limit=MAX_ATTACHMENTS)

    # -- for the metrics -----------------------------------------------------------------------------------------

    def expiries(self, policy: RotationPolicy | None, now_ms: int | None = None) -> list[KeyExpiry]:
        """Each key that is not retired or revoked, own and peers', with the days until it stops being valid
        (``inf`` for an open-ended key) and, for own keys in use, the days until their scheduled rotation."""
        now = self.clock.now_ms() if now_ms is None else now_ms
        rows = _expiries(self.party.party_id, "own", Keyring(self.party.records()), now)
        if policy is not None:
            rows = [row.with_rotation(policy.due_at(self.party, row.algorithm, now), now) for row in rows]
        for party_id, keyring in self.trust:
            rows += _expiries(party_id, "peer", keyring, now)
        return rows


@dataclass(frozen=True)
class KeyExpiry:
    """One live key for the metrics: whose, which, and how long it has (no personal data: party and key ids)."""

    party: str
    key_id: str
    algorithm: Algorithm
    owner: str
    state: KeyState
    days_left: float
    #: Own key in use with automatic rotation: days until its rotation is due (negative: overdue); else None.
    rotation_due_days: float | None = None

    def with_rotation(self, due_at_ms: int | None, now_ms: int) -> KeyExpiry:
        if due_at_ms is None or self.days_left != float("inf"):
            return self
        return KeyExpiry(
            self.party, self.key_id, self.algorithm, self.owner, self.state, self.days_left,
            (due_at_ms - now_ms) / DAY_MS,
        )  # fmt: skip


def _expiries(party_id: str, owner: str, keyring: Keyring, now_ms: int) -> list[KeyExpiry]:
    rows = []
    for record in keyring:
        if record.state in (KeyState.RETIRED, KeyState.REVOKED):
            continue
        end = record.not_after_ms
        days = float("inf") if end is None else (end - now_ms) / DAY_MS
        rows.append(KeyExpiry(party_id, record.key_id.hex(), record.algorithm, owner, record.state, days))
    return rows


def _keep_revocations(held: TrustStore, loaded: TrustStore) -> None:
    """A reload never un-revokes: a key this process holds as revoked stays revoked in the keys it adopts (the
    file may predate a revocation this process applied but could not save)."""
    for party_id, keyring in held:
        revoked = [r for r in keyring if r.state is KeyState.REVOKED]
        target = loaded.keyring(party_id)
        if not revoked or target is None:
            continue
        missing = [r for r in revoked if (t := target.get(r.key_id)) is None or t.state is not KeyState.REVOKED]
        if missing:
            merged = target.copy()
            for record in missing:
                merged.put(record)
            loaded.set_keyring(party_id, merged)


class Watcher(threading.Thread):
    """Runs ``body`` every ``interval_s`` seconds until :meth:`stop` (a service's keystore watch and key job).
    A failing run is logged at most once a minute with its error class, and the next run comes as usual."""

    def __init__(self, name: str, body: Callable[[], None], interval_s: float) -> None:
        super().__init__(name=name, daemon=True)
        self.body = body
        self.interval_s = interval_s
        self.stopping = threading.Event()
        self._last_logged: dict[str, float] = {}

    def run(self) -> None:
        while not self.stopping.wait(self.interval_s):
            self.run_once()

    def run_once(self) -> None:
        try:
            self.body()
        except Exception as exc:  # the keys in use stay; the next turn tries again
            error = type(exc).__name__
            now = SystemClock().now_ms()
            if now - self._last_logged.get(error, 0) >= 60_000:
                self._last_logged[error] = now
                detail = str(exc) if isinstance(exc, (KeystoreError, KeyStateError)) else None
                log.error("key watch failed", extra={"task": self.name, "error": error, "detail": detail})

    def stop(self) -> None:
        self.stopping.set()
        if self.is_alive():
            self.join(timeout=10)
