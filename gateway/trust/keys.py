"""The gateway's keys while it runs: its live keystore (keys/live.py), the key job, and its own announcements
published as trust items for every unit it exchanges with online.

Two tasks, on every replica and on one:

* the keystore watch (every replica, every few seconds): reload the keystore when another program changed it —
  ``hedui-keys rotate`` or ``revoke`` run by an operator, or the replica that rotates on schedule — and publish
  the own announcements found in it that are new;
* the key job (the scheduler's ``key-expiry`` job, one replica at a time under its lease): retire keys whose overlap
  ended and rotate the keys that are due ([keys] rotate_*_days), saving the keystore. Replicas that rotate on
  schedule must therefore share the keystore folder (docs/operations.md, "PostgreSQL and two replicas").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from hedui.v1 import trust_pb2

from gateway.trust.items import TrustItems
from keys.keyring import KeyState
from keys.live import KeyExpiry, LiveKeystore, RotationPolicy

log = logging.getLogger("hedui.gateway.keys")

#: Warn this long before a key of ours or a unit's stops being valid.
KEY_WARNING_DAYS = 7


class GatewayKeys:
    """The gateway's live keystore with its watch and its key job; see the module docstring."""

    def __init__(
        self, live: LiveKeystore, items: TrustItems, units: Sequence[str], policy: RotationPolicy | None
    ) -> None:
        self.live = live
        self.items = items
        #: Units reached online: they get our announcements as trust items (media-only units by file).
        self.units = list(units)
        self.policy = policy
        #: Keys already warned about (once each: the key job may run every few seconds).
        self._warned: set[str] = set()
        live.on_announcements(self.publish)

    def publish(self, announcements: Sequence[bytes]) -> None:
        """Publish own announcements not published before, for every unit (a replica that reloads the same
        keystore publishes nothing twice: items are keyed by their SHA-256)."""
        now = self.live.clock.now_ms()
        for announcement in announcements:
            if self.items.publish_new(trust_pb2.TRUST_ITEM_KIND_KEY_ANNOUNCEMENT, announcement, now, self.units):
                log.info("own key announcement published for every unit", extra={"units": len(self.units)})

    def watch(self) -> None:
        """The keystore watch (every replica): reload a changed keystore, let time move key states in memory, and
        hand on own announcements a failed publication left."""
        self.live.refresh()
        self.live.advance_in_memory()
        self.live.hand_on()

    def key_job(self) -> None:
        """The key job (one replica): retire what time retired and rotate what is due, saved; warn of keys that
        end within KEY_WARNING_DAYS without a successor."""
        self.live.refresh(wait_s=5.0)
        self.live.maintain(self.policy)
        for row in self.expiries():
            if row.days_left <= KEY_WARNING_DAYS and row.state is KeyState.RETIRING and row.key_id not in self._warned:
                self._warned.add(row.key_id)
                log.warning(
                    "key retires soon",
                    extra={"key": f"{row.party}/{row.key_id}", "days_left": round(row.days_left, 1)},
                )

    def expiries(self) -> list[KeyExpiry]:
        """Every live key, ours and the units', for the metrics."""
        return self.live.expiries(self.policy)

    def retiring(self) -> list[tuple[str, str, float]]:
        """(party, algorithm, days left) of each retiring key: ``hedui_key_expiry_seconds``."""
        return [
            (row.party, row.algorithm.name.lower(), row.days_left)
            for row in self.expiries()
            if row.state is KeyState.RETIRING
        ]
