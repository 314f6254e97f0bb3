"""Trust that travels between the gateway and its units: trust items (rosters, key announcements, revocation lists)
published for units and delivered by ExchangeService.SyncTrust, the schedule of those synchronisations, and the
gateway's live keys (docs/exchange.md "Trust synchronisation", docs/keys.md "Keys over the wire")."""

from gateway.trust.items import TrustItems
from gateway.trust.keys import GatewayKeys
from gateway.trust.schedule import TrustSchedule
from gateway.trust.sync import SyncBusy, SyncRefused, SyncReport, TrustSyncer, default_handlers

__all__ = [
    "GatewayKeys",
    "SyncBusy",
    "SyncRefused",
    "SyncReport",
    "TrustItems",
    "TrustSchedule",
    "TrustSyncer",
    "default_handlers",
]
