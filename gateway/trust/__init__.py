"""Trust that travels between the gateway and its peers (issue 11): staff rosters registered with each other in
advance (Procedure V.(三), :mod:`gateway.trust.rosters`) and the trust items that carry them over SyncTrust
(:mod:`gateway.trust.items`)."""

from gateway.trust.items import TrustItems
from gateway.trust.rosters import OwnRoster, PeerRosters, RosterChangeRefused, RosterHandler

__all__ = ["OwnRoster", "PeerRosters", "RosterChangeRefused", "RosterHandler", "TrustItems"]
