"""The connector's keys while it serves: its live keystore (keys/live.py) watched and maintained by one thread, and
its own announcements published as trust items for every gateway it trusts.

Each turn (``[keys] watch_interval_seconds``) the keystore is reloaded if ``hedui-keys`` changed it, keys whose
overlap ended are retired, the keys that are due are rotated (``[keys] rotate_*_days``), and whatever own announcement
is new is published: the gateways collect it at their next trust synchronisation (docs/keys.md, "Keys over the
wire"). Before this, a connector never retired a key while serving.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from hedui.v1 import trust_pb2

from connectors.trust.items import TrustItems
from keys.live import KeyExpiry, LiveKeystore, RotationPolicy

log = logging.getLogger("hedui.connector.keys")


class ConnectorKeys:
    """The connector's live keystore and its key job; see the module docstring."""

    def __init__(self, live: LiveKeystore, items: TrustItems, policy: RotationPolicy | None) -> None:
        self.live = live
        self.items = items
        self.policy = policy
        live.on_announcements(self.publish)

    def publish(self, announcements: Sequence[bytes]) -> None:
        """Publish own announcements not published before, for every gateway in the trust store."""
        gateways = self.live.trust.parties()
        now = self.live.clock.now_ms()
        for announcement in announcements:
            if self.items.publish_new(trust_pb2.TRUST_ITEM_KIND_KEY_ANNOUNCEMENT, announcement, now, gateways):
                log.info("own key announcement published for every gateway", extra={"gateways": len(gateways)})

    def turn(self) -> None:
        """One turn of the key job: reload a changed keystore, retire and rotate what is due (saved), hand on."""
        self.live.refresh()
        self.live.maintain(self.policy)
        self.live.hand_on()

    def expiries(self) -> list[KeyExpiry]:
        return self.live.expiries(self.policy)
