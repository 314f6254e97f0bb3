"""Trust that travels between the gateway and its units (issue 11): trust items (rosters, key announcements,
revocation lists) published for units and delivered by ExchangeService.SyncTrust, the schedule of those
synchronisations, the gateway's live keys, and staff rosters registered with each other in advance (Procedure
V.(三), :mod:`gateway.trust.rosters`). See docs/exchange.md "Trust synchronisation" and "Rosters", docs/keys.md
"Keys over the wire"."""

from gateway.trust.items import TrustItems
from gateway.trust.keys import GatewayKeys
from gateway.trust.rosters import OwnRoster, PeerRosters, RosterChangeRefused, RosterHandler
from gateway.trust.schedule import TrustSchedule
from gateway.trust.sync import SyncBusy, SyncRefused, SyncReport, TrustSyncer, default_handlers

__all__ = [
    "GatewayKeys",
    "OwnRoster",
    "PeerRosters",
    "RosterChangeRefused",
    "RosterHandler",
    "SyncBusy",
    "SyncRefused",
    "SyncReport",
    "TrustItems",
    "TrustSchedule",
    "TrustSyncer",
    "default_handlers",
]
