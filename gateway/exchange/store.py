"""The gateway's persistent state: one store per concern, all on one database engine.

Every step is a single transaction and idempotent, so a crash between any two steps is repaired by running the step
again; see each part for its rules.
"""

from __future__ import annotations

from sqlalchemy import Engine

from common.replaystore import SqlReplayCache
from gateway.archive.messages import MessageArchive
from gateway.db import schema as s
from gateway.exchange.batches import BatchLedger
from gateway.exchange.jobs import JobLeases
from gateway.exchange.outbox import Outbox
from gateway.exchange.provisional import ProvisionalDueDates
from gateway.exchange.refusals import RefusedBatches
from gateway.exchange.units import UnitStore


class GatewayStore:
    """The gateway's database, by concern: units, outbox, batches, their provisional due dates and the units'
    refusals of them, job leases, archived messages, seen messages."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.is_postgres = engine.dialect.name == "postgresql"
        self.units = UnitStore(engine)
        self.outbox = Outbox(engine)
        self.batches = BatchLedger(engine)
        self.provisional = ProvisionalDueDates(engine)
        self.refusals = RefusedBatches(engine)
        self.jobs = JobLeases(engine)
        self.messages = MessageArchive(engine)
        self.replay = SqlReplayCache(engine, s.seen_messages)
