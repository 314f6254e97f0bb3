"""The gateway's trust items: what it publishes for units and their acknowledgements (common/trustitems.py on the
gateway's tables ``trust_items`` and ``trust_deliveries``, migration 0011)."""

from __future__ import annotations

from sqlalchemy import Engine

from common.trustitems import Ack, Delivery, PendingItem, TrustItemStore
from gateway.db import schema as s

__all__ = ["Ack", "Delivery", "PendingItem", "TrustItems"]


class TrustItems(TrustItemStore):
    """``TrustItems(engine).publish(conn, kind, payload, now_ms, peers)`` and the rest of TrustItemStore, on the
    gateway's database; peers are unit party ids."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine, s.trust_items, s.trust_deliveries)
