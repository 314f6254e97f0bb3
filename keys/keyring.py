"""Key lifecycle: states, validity windows and the keyrings that hold them.

Every key moves pending -> active -> retiring -> retired, or to revoked from any state but revoked (a terminal
state). A key is *valid at* a moment when it is not revoked and the moment lies in [not_before, not_after).
Rotation gives the old key a not_after at the end of the overlap window, so a message made with it during the
overlap still opens, and one made after fails; :meth:`Keyring.advance` then moves it to retired.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from hedui.v1 import keys_pb2

from keys.clock import check_time_ms
from keys.errors import KeyStateError
from keys.fingerprint import Algorithm
from keys.handles import PublicKey


class KeyState(enum.IntEnum):
    """Lifecycle states; the values are the ``KeyState`` numbers of protos/hedui/v1/keys.proto."""

    PENDING = 1
    ACTIVE = 2
    RETIRING = 3
    RETIRED = 4
    REVOKED = 5


_ALLOWED: dict[KeyState, frozenset[KeyState]] = {
    KeyState.PENDING: frozenset({KeyState.ACTIVE, KeyState.REVOKED}),
    KeyState.ACTIVE: frozenset({KeyState.RETIRING, KeyState.REVOKED}),
    KeyState.RETIRING: frozenset({KeyState.RETIRED, KeyState.REVOKED}),
    KeyState.RETIRED: frozenset({KeyState.REVOKED}),
    KeyState.REVOKED: frozenset(),
}


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One public key with its lifecycle state and validity window (milliseconds since the epoch)."""

    public: PublicKey
    state: KeyState
    not_before_ms: int
    #: End of validity (exclusive); None while the key is open-ended.
    not_after_ms: int | None = None
    revoked_at_ms: int | None = None

    @property
    def key_id(self) -> bytes:
        return self.public.key_id

    @property
    def algorithm(self) -> Algorithm:
        return self.public.algorithm

    def valid_at(self, moment_ms: int) -> bool:
        """True if the key may be used for something made at ``moment_ms``."""
        if self.state is KeyState.REVOKED:
            return False
        return self.not_before_ms <= moment_ms and (self.not_after_ms is None or moment_ms < self.not_after_ms)

    def moved_to(self, state: KeyState, **changes: int | None) -> KeyRecord:
        """This record in ``state``; raises KeyStateError for a transition the lifecycle does not allow."""
        if state is not self.state and state not in _ALLOWED[self.state]:
            raise KeyStateError(
                f"key {self.key_id.hex()} cannot go from {self.state.name.lower()} to {state.name.lower()}"
            )
        return dataclasses.replace(self, state=state, **changes)  # type: ignore[arg-type]

    def to_proto(self) -> keys_pb2.PublicKey:
        return keys_pb2.PublicKey(
            key_id=self.key_id,
            algorithm=int(self.algorithm),  # type: ignore[arg-type]
            public_key=self.public.raw,
            state=int(self.state),  # type: ignore[arg-type]
            not_before_ms=self.not_before_ms,
            not_after_ms=self.not_after_ms or 0,
            revoked_at_ms=self.revoked_at_ms or 0,
        )

    @classmethod
    def from_proto(cls, msg: keys_pb2.PublicKey) -> KeyRecord:
        """Validate and convert; raises ValueError naming the field that is wrong."""
        try:
            algorithm = Algorithm(msg.algorithm)
            state = KeyState(msg.state)
        except ValueError as exc:
            raise ValueError("unknown key algorithm or state") from exc
        public = PublicKey(algorithm, bytes(msg.public_key))
        if public.key_id != msg.key_id:
            raise ValueError("key id does not match the public key")
        if msg.not_before_ms < 0 or msg.not_after_ms < 0 or (0 < msg.not_after_ms <= msg.not_before_ms):
            raise ValueError("validity window is empty or negative")
        check_time_ms(msg.not_before_ms, "not_before_ms")
        check_time_ms(msg.not_after_ms, "not_after_ms")
        check_time_ms(msg.revoked_at_ms, "revoked_at_ms")
        if (state is KeyState.REVOKED) != (msg.revoked_at_ms > 0):
            raise ValueError("revoked_at is set exactly when the key is revoked")
        return cls(
            public=public,
            state=state,
            not_before_ms=msg.not_before_ms,
            not_after_ms=msg.not_after_ms or None,
            revoked_at_ms=msg.revoked_at_ms or None,
        )


class Keyring:
    """The key records of one party, both algorithms, by key id."""

    def __init__(self, records: Iterable[KeyRecord] = ()) -> None:
        self._records: dict[bytes, KeyRecord] = {}
        for record in records:
            self.put(record)

    def __iter__(self) -> Iterator[KeyRecord]:
        return iter(sorted(self._records.values(), key=lambda r: (r.algorithm, r.not_before_ms, r.key_id)))

    def __len__(self) -> int:
        return len(self._records)

    def copy(self) -> Keyring:
        """A keyring with the same records (records are immutable: changing the copy leaves this one as it is)."""
        return Keyring(self._records.values())

    def get(self, key_id: bytes) -> KeyRecord | None:
        return self._records.get(key_id)

    def put(self, record: KeyRecord) -> None:
        self._records[record.key_id] = record

    def require(self, key_id: bytes) -> KeyRecord:
        record = self._records.get(key_id)
        if record is None:
            raise KeyStateError(f"no key {key_id.hex()} in this keyring")
        return record

    def transition(self, key_id: bytes, state: KeyState, **changes: int | None) -> KeyRecord:
        record = self.require(key_id).moved_to(state, **changes)
        self._records[key_id] = record
        return record

    def current(self, algorithm: Algorithm, now_ms: int) -> KeyRecord | None:
        """The key to use now: the newest active key valid now, else the newest retiring one.

        A pending key whose window has begun counts as active already: time, not a later call of :meth:`advance`,
        decides when a staged rotation takes over, so a process that has not advanced its keyring yet still
        switches at the announced moment.
        """
        usable = [r for r in self._records.values() if r.algorithm is algorithm and r.valid_at(now_ms)]
        for states in ((KeyState.ACTIVE, KeyState.PENDING), (KeyState.RETIRING,)):
            candidates = [r for r in usable if r.state in states]
            if candidates:
                return max(candidates, key=lambda r: (r.not_before_ms, r.key_id))
        return None

    def advance(self, now_ms: int) -> list[KeyRecord]:
        """Apply what time has decided: pending keys whose window began become active, retiring keys whose
        window ended become retired. Returns the records that changed."""
        changed = []
        for record in list(self._records.values()):
            if record.state is KeyState.PENDING and record.not_before_ms <= now_ms:
                changed.append(self.transition(record.key_id, KeyState.ACTIVE))
            elif (
                record.state is KeyState.RETIRING and record.not_after_ms is not None and record.not_after_ms <= now_ms
            ):
                changed.append(self.transition(record.key_id, KeyState.RETIRED))
        return changed
