"""Trust that travels between the unit and the gateways it serves (issue 11): staff rosters registered with each
other in advance (Procedure V.(三), :mod:`connectors.trust.rosters`), who is on duty to answer
(:mod:`connectors.trust.duty`), and the trust items that carry rosters over SyncTrust
(:mod:`connectors.trust.items`)."""

from connectors.trust.duty import OnDuty, Responsible
from connectors.trust.items import TrustItems
from connectors.trust.rosters import PeerRosters, RosterChangeRefused, RosterHandler, UnitRoster

__all__ = ["OnDuty", "PeerRosters", "Responsible", "RosterChangeRefused", "RosterHandler", "TrustItems", "UnitRoster"]
