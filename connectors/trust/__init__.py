"""Trust that travels between a connector and its gateways: the SyncTrust handler, the trust items the connector
publishes (its key announcements, later its roster), and its live keys (docs/exchange.md "Trust synchronisation",
docs/keys.md "Keys over the wire")."""

from connectors.trust.items import TrustItems
from connectors.trust.keys import ConnectorKeys
from connectors.trust.sync import TrustDesk, default_handlers

__all__ = ["ConnectorKeys", "TrustDesk", "TrustItems", "default_handlers"]
