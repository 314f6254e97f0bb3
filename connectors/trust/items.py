"""The connector's trust items: what it publishes for its gateways (its key announcements, later its roster) and their
acknowledgements (common/trustitems.py on the store's ``trust_items`` and ``trust_deliveries`` tables)."""

from __future__ import annotations

from sqlalchemy import Engine

from common.trustitems import Ack, Delivery, PendingItem, TrustItemStore
from connectors import store

__all__ = ["Ack", "Delivery", "PendingItem", "TrustItems", "trust_deliveries", "trust_items"]

#: The tables (defined with the rest of the store, connectors/store.py).
trust_items, trust_deliveries = store.trust_items, store.trust_deliveries


class TrustItems(TrustItemStore):
    """``TrustItems(engine).publish(conn, kind, payload, now_ms, peers)`` and the rest of TrustItemStore, on the
    connector's store; peers are gateway party ids."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine, store.trust_items, store.trust_deliveries)
