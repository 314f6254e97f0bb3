""" "Refresh keys": what the exchange does when the gateway and a unit hold different views of each other's keys.

A unit refuses an envelope signed with a key it does not hold as usable, or sealed for one of its keys it does not
hold, with UNAUTHENTICATED and the reason code ``refresh_keys`` (and its own key announcements in the trailing
metadata); a unit's reply may fail to open here for the same reason the other way round. Either way the gateway
synchronises trust with the unit at once (gateway/trust/sync.py ``TrustSyncer.refresh``) and sends again, sealed
afresh: a rotation one side missed is caught up without an operator, and the batch is not failed. At most once per
unit cycle, so that keys that stay out of step end as an ordinary transient failure with backoff.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from gateway.exchange.failures import TransportFailure
from keys.errors import EnvelopeError, RevokedKey
from keys.trustsync import REFRESH_KEYS

#: (unit id, announcements the unit sent beside its refusal) -> True when trust was synchronised.
Refresher = Callable[[str, Sequence[bytes]], bool]


class _Cycle(Protocol):
    refreshed: bool


class KeyRefresh:
    """Decides whether a failed call or an unreadable reply is cured by refreshing keys, and does it."""

    def __init__(self, refresher: Refresher | None = None) -> None:
        #: Set by the gateway's wiring once the trust syncer exists; None: never refresh (plain retries).
        self.refresher = refresher

    def _run(self, unit_id: str, cycle: _Cycle, announcements: Sequence[bytes] = ()) -> bool:
        if self.refresher is None or cycle.refreshed:
            return False
        cycle.refreshed = True
        return self.refresher(unit_id, announcements)

    def after_refusal(self, failure: TransportFailure, unit_id: str, cycle: _Cycle) -> bool:
        """The call was refused with ``refresh_keys`` and trust is now synchronised: seal and send again."""
        return failure.reason == REFRESH_KEYS and self._run(unit_id, cycle, failure.announcements)

    def after_reply(self, error: Exception, unit_id: str, cycle: _Cycle) -> bool:
        """The unit's reply did not open for a key we do not hold (unknown, or retired here; a revoked key is
        refused for good) and trust is now synchronised: ask again."""
        refreshable = isinstance(error, EnvelopeError) and error.refresh_keys and not isinstance(error, RevokedKey)
        return refreshable and self._run(unit_id, cycle)
