"""Trust that travels between the unit and the gateways it serves (issue 11): the SyncTrust handler and the trust
items the connector publishes (:mod:`connectors.trust.sync`, :mod:`connectors.trust.items`), its live keys
(:mod:`connectors.trust.keys`), staff rosters registered with each other in advance (Procedure V.(三),
:mod:`connectors.trust.rosters`) and who is on duty to answer (:mod:`connectors.trust.duty`). See docs/exchange.md
"Trust synchronisation" and "Rosters", docs/keys.md "Keys over the wire"."""

from connectors.trust.duty import OnDuty, Responsible
from connectors.trust.items import TrustItems
from connectors.trust.keys import ConnectorKeys
from connectors.trust.rosters import PeerRosters, RosterChangeRefused, RosterHandler, UnitRoster
from connectors.trust.sync import TrustDesk, default_handlers

__all__ = [
    "ConnectorKeys",
    "OnDuty",
    "PeerRosters",
    "Responsible",
    "RosterChangeRefused",
    "RosterHandler",
    "TrustDesk",
    "TrustItems",
    "UnitRoster",
    "default_handlers",
]
