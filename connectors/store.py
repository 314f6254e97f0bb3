"""The connector's own store: batches received, answers, delay notices, acknowledgements and its audit trail.

A restart loses nothing: a batch is stored in the same transaction that decides its receipt, answers are stored
before anyone can fetch them, and fetching reads the stored bytes, so answers fetched twice are identical.
Personal data (the batch content and the answers) lives only in the ``batch_contents`` and ``batch_answers`` tables,
whose rows are deleted when the retention period after acknowledgement ends; the audit table never holds any.

The two blobs (about 100 bytes a subject for a batch's content, up to several hundred for its answer) are kept out of
the ``batches`` row on purpose: SQLite rewrites a whole record, overflow pages included, whenever an UPDATE changes
its size, so with the blobs inline every state change of a batch (answered, acknowledged, an attempt counted, a
delay notice) rewrote megabytes. Written once and deleted once in their own tables, they are never rewritten.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import date

from google.protobuf.message import DecodeError
from hedui.v1 import exchange_pb2
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    Engine,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    column,
    delete,
    exists,
    false,
    insert,
    inspect,
    or_,
    select,
    table,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from common.db import reading
from common.replaystore import SqlReplayCache, replay_table
from common.trustitems import trust_tables

log = logging.getLogger("hedui.connector.store")

metadata = MetaData()

batches = Table(
    "batches",
    metadata,
    Column("batch_id", String(64), primary_key=True),
    Column("gateway", String(64), nullable=False, index=True),
    Column("message_id", LargeBinary(16), nullable=False),
    Column("envelope_sha256", LargeBinary(32), nullable=False, index=True),
    Column("digest", LargeBinary(32), nullable=False),
    Column("subject_count", Integer, nullable=False),
    Column("received_at_ms", BigInteger, nullable=False),
    Column("original_due", Date, nullable=False),
    Column("due", Date, nullable=False),
    # pending -> answered -> acknowledged -> purged
    Column("state", String(16), nullable=False, index=True),
    Column("answered_at_ms", BigInteger, nullable=True),
    Column("acknowledged_at_ms", BigInteger, nullable=True),
    Column("delay_reason", String(32), nullable=True),
    Column("delay_issued_at_ms", BigInteger, nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    # original_due (and due) counted across a year without an official holiday schedule; fixed by settle_due.
    # Added after the first release: _add_due_provisional adds it to older databases.
    Column("due_provisional", Boolean, nullable=False, default=False, server_default=false()),
)

audit = Table(
    "audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at_ms", BigInteger, nullable=False),
    Column("event", String(32), nullable=False),
    Column("gateway", String(64), nullable=True),
    Column("batch_id", String(64), nullable=True),
    Column("reason", String(64), nullable=True),
)

#: A batch's QueryBatch bytes, from its receipt until it is purged (see the module docstring for why not inline).
batch_contents = Table(
    "batch_contents",
    metadata,
    Column("batch_id", String(64), ForeignKey("batches.batch_id"), primary_key=True),
    Column("content", LargeBinary, nullable=False),
)

#: A batch's BatchAnswer bytes, from the moment it is answered until it is purged.
batch_answers = Table(
    "batch_answers",
    metadata,
    Column("batch_id", String(64), ForeignKey("batches.batch_id"), primary_key=True),
    Column("answer", LargeBinary, nullable=False),
)

#: Which share indices (docs/exchange.md, "Approvals a unit verifies") of which commission each batch with an approval
#: proof carried: the lowest and the highest. Kept after the batch is purged (no personal data: a gateway's reference
#: and two numbers), so that approved subjects are queried once (clause 16), not again under another batch id. The
#: batches of one commission for one unit cover disjoint, ordered index ranges, so an overlap is a repeat.
batch_shares = Table(
    "batch_shares",
    metadata,
    Column("batch_id", String(64), ForeignKey("batches.batch_id"), primary_key=True),
    Column("gateway", String(64), nullable=False),
    Column("commission_ref", String(64), nullable=False),
    Column("first_index", BigInteger, nullable=False),
    Column("last_index", BigInteger, nullable=False),
    Index("batch_shares_by_commission", "gateway", "commission_ref", "first_index"),
)

seen_messages = replay_table(metadata)

#: Trust items this connector publishes for its gateways (its key announcements, later its roster), and each
#: gateway's acknowledgement (common/trustitems.py; docs/exchange.md "Trust synchronisation").
trust_items, trust_deliveries = trust_tables(metadata)

#: Envelopes of the trust synchronisation, as received from a gateway and as sent to it: the signed receipts of what
#: was delivered (clause 17). Codes and signed bytes; a roster inside is readable only by its recipient.
archive = Table(
    "archive",
    metadata,
    Column("message_id", LargeBinary(16), primary_key=True),
    Column("peer", String(64), nullable=False),
    # "in" (from the gateway) or "out" (ours, to it)
    Column("direction", String(3), nullable=False),
    Column("message_type", String(128), nullable=False),
    Column("at_ms", BigInteger, nullable=False, index=True),
    Column("envelope", LargeBinary, nullable=False),
    Column("sha256", LargeBinary(32), nullable=False),
)

#: The blob columns databases made by earlier versions have in ``batches`` (nullable; emptied by the upgrade step,
#: left in place because older SQLite versions cannot drop a column). Not on ``metadata``: nothing creates them.
_old_batches = table(
    "batches", column("batch_id", String(64)), column("content", LargeBinary), column("answer", LargeBinary)
)


@dataclass(frozen=True)
class StoredBatch:
    """A batch row: never its personal data, which lives in ``batch_contents`` and ``batch_answers``."""

    batch_id: str
    gateway: str
    message_id: bytes
    envelope_sha256: bytes
    digest: bytes
    subject_count: int
    received_at_ms: int
    original_due: date
    due: date
    state: str
    answered_at_ms: int | None
    delay_reason: str | None
    delay_issued_at_ms: int | None
    #: The due dates were counted across a year the calendar did not know (common/workdays.py ``Deadline``).
    due_provisional: bool = False


_SUMMARY = [c for c in batches.c if c.name not in {"acknowledged_at_ms", "attempts"}]


class BatchExists(Exception):
    """Insert lost a race against the same batch id; the caller re-reads."""


@dataclass(frozen=True)
class Shares:
    """The share indices a batch carries of its commission: from ``first`` to ``last`` (inclusive)."""

    commission_ref: str
    first: int
    last: int

    @staticmethod
    def of(batch: exchange_pb2.QueryBatch) -> Shares | None:
        """The batch's shares; None for a batch without an approval proof (its share indices mean nothing)."""
        if not batch.HasField("approval") or not batch.subjects:
            return None
        indices = [s.share_index for s in batch.subjects]
        return Shares(batch.commission_ref, min(indices), max(indices))


class SharesQueried(Exception):
    """Some of a batch's subjects were received before in another batch (``batch_id``); nothing was stored."""

    def __init__(self, batch_id: str) -> None:
        super().__init__(batch_id)
        self.batch_id = batch_id


class ConnectorStore:
    """Typed access to the connector's tables."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        shares_new = not inspect(engine).has_table("batch_shares")
        metadata.create_all(engine)
        _move_blobs_out_of_batches(engine)
        _add_due_provisional(engine)
        if shares_new:
            _fill_batch_shares(engine)
        self.replay = SqlReplayCache(engine, seen_messages)

    def get(self, batch_id: str) -> StoredBatch | None:
        with reading(self.engine) as conn:
            row = conn.execute(select(*_SUMMARY).where(batches.c.batch_id == batch_id)).first()
        return StoredBatch(**row._mapping) if row else None

    def by_envelope(self, gateway: str | None, envelope_sha256: bytes) -> StoredBatch | None:
        """The batch first received in exactly these envelope bytes (from ``gateway`` when TLS names one)."""
        query = select(*_SUMMARY).where(batches.c.envelope_sha256 == envelope_sha256)
        if gateway is not None:
            query = query.where(batches.c.gateway == gateway)
        with reading(self.engine) as conn:
            row = conn.execute(query).first()
        return StoredBatch(**row._mapping) if row else None

    def insert(self, batch: StoredBatch, content: bytes, shares: Shares | None = None) -> None:
        """Store a newly accepted batch and its audit entry in one transaction. With ``shares``, refuse it
        (SharesQueried, nothing stored) when another batch of the same gateway and commission carried any share
        index in that range."""
        try:
            with self.engine.begin() as conn:
                # The batches row first: the content row's foreign key refers to it (and on SQLite the write
                # takes the database's write lock before the look-up below, so two batches cannot both pass it).
                conn.execute(insert(batches).values(**batch.__dict__, attempts=0))
                if shares is not None:
                    s = batch_shares.c
                    earlier = conn.execute(
                        select(s.batch_id)
                        .where(
                            s.gateway == batch.gateway,
                            s.commission_ref == shares.commission_ref,
                            s.first_index <= shares.last,
                            s.last_index >= shares.first,
                            s.batch_id != batch.batch_id,
                        )
                        .limit(1)
                    ).scalar()
                    if earlier is not None:
                        raise SharesQueried(earlier)
                    conn.execute(
                        insert(batch_shares).values(
                            batch_id=batch.batch_id, gateway=batch.gateway, commission_ref=shares.commission_ref,
                            first_index=shares.first, last_index=shares.last,
                        )
                    )  # fmt: skip
                conn.execute(insert(batch_contents).values(batch_id=batch.batch_id, content=content))
                conn.execute(
                    insert(audit).values(
                        at_ms=batch.received_at_ms, event="accepted", gateway=batch.gateway, batch_id=batch.batch_id
                    )
                )
        except IntegrityError as exc:
            raise BatchExists(batch.batch_id) from exc

    def record(
        self, at_ms: int, event: str, *, gateway: str | None, batch_id: str | None = None, reason: str = ""
    ) -> None:
        """Append an audit entry (codes and party ids only: never personal data)."""
        with self.engine.begin() as conn:
            conn.execute(
                insert(audit).values(
                    at_ms=at_ms, event=event, gateway=gateway, batch_id=batch_id, reason=reason or None
                )
            )

    def pending(self, limit: int, *, exclude: Collection[str] = ()) -> list[tuple[StoredBatch, bytes]]:
        """Oldest pending batches with their content, leaving out the batch ids in ``exclude``."""
        query = (
            select(*_SUMMARY, batch_contents.c.content)
            .join_from(batches, batch_contents, batch_contents.c.batch_id == batches.c.batch_id)
            .where(batches.c.state == "pending")
            .order_by(batches.c.received_at_ms)
            .limit(limit)
        )
        if exclude:
            query = query.where(batches.c.batch_id.not_in(list(exclude)))
        with reading(self.engine) as conn:
            rows = conn.execute(query).all()
        return [(StoredBatch(**{k: v for k, v in r._mapping.items() if k != "content"}), r.content) for r in rows]

    def store_answer(self, batch_id: str, answer: bytes, at_ms: int) -> bool:
        """Pending -> answered; False if the batch was not pending (already answered by another worker)."""
        with self.engine.begin() as conn:
            done = conn.execute(
                update(batches)
                .where(batches.c.batch_id == batch_id, batches.c.state == "pending")
                .values(state="answered", answered_at_ms=at_ms)
            ).rowcount
            if done:
                conn.execute(insert(batch_answers).values(batch_id=batch_id, answer=answer))
                conn.execute(insert(audit).values(at_ms=at_ms, event="answered", batch_id=batch_id))
        return bool(done)

    def count_attempt(self, batch_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(batches).where(batches.c.batch_id == batch_id).values(attempts=batches.c.attempts + 1))

    def set_delay(self, batch_id: str, new_due: date, reason: str, at_ms: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(batches)
                .where(batches.c.batch_id == batch_id)
                .values(due=new_due, delay_reason=reason, delay_issued_at_ms=at_ms)
            )
            conn.execute(insert(audit).values(at_ms=at_ms, event="delay_notice", batch_id=batch_id, reason=reason))

    def provisional(self) -> list[StoredBatch]:
        """Batches whose due dates are still provisional, oldest first (few: only those received while the
        calendar lacked a year)."""
        with reading(self.engine) as conn:
            rows = conn.execute(
                select(*_SUMMARY).where(batches.c.due_provisional.is_(True)).order_by(batches.c.received_at_ms)
            ).all()
        return [StoredBatch(**r._mapping) for r in rows]

    def settle_due(self, batch_id: str, original_due: date, due: date, at_ms: int) -> bool:
        """A provisional due date becomes final (``original_due``; ``due``, moved by a delay notice if any), with an
        audit entry naming both dates in the same transaction; False if it was no longer provisional."""
        with self.engine.begin() as conn:
            before = conn.execute(
                select(batches.c.original_due).where(
                    batches.c.batch_id == batch_id, batches.c.due_provisional.is_(True)
                )
            ).first()
            if before is None:
                return False
            conn.execute(
                update(batches)
                .where(batches.c.batch_id == batch_id, batches.c.due_provisional.is_(True))
                .values(original_due=original_due, due=due, due_provisional=False)
            )
            conn.execute(
                insert(audit).values(
                    at_ms=at_ms,
                    event="due_date_final",
                    batch_id=batch_id,
                    reason=f"{before.original_due.isoformat()}->{original_due.isoformat()}",
                )
            )
        return True

    def answers_for(self, gateway: str, batch_ids: Sequence[str]) -> dict[str, tuple[StoredBatch, bytes | None]]:
        """The gateway's own batches among ``batch_ids``, with the stored answer bytes where answered."""
        with reading(self.engine) as conn:
            rows = conn.execute(
                select(*_SUMMARY, batch_answers.c.answer)
                .outerjoin_from(batches, batch_answers, batch_answers.c.batch_id == batches.c.batch_id)
                .where(batches.c.gateway == gateway, batches.c.batch_id.in_(list(batch_ids)))
            ).all()
        return {
            r.batch_id: (StoredBatch(**{k: v for k, v in r._mapping.items() if k != "answer"}), r.answer) for r in rows
        }

    def acknowledge(self, gateway: str, batch_ids: Sequence[str], at_ms: int) -> list[str]:
        """Answered (or already acknowledged) batches of this gateway become acknowledged; returns those ids."""
        acknowledged: list[str] = []
        with self.engine.begin() as conn:
            for batch_id in batch_ids:
                row = conn.execute(
                    select(batches.c.state).where(batches.c.batch_id == batch_id, batches.c.gateway == gateway)
                ).first()
                if row is None or row.state not in {"answered", "acknowledged", "purged"}:
                    continue
                if row.state == "answered":
                    conn.execute(
                        update(batches)
                        .where(batches.c.batch_id == batch_id)
                        .values(state="acknowledged", acknowledged_at_ms=at_ms)
                    )
                    conn.execute(
                        insert(audit).values(at_ms=at_ms, event="acknowledged", gateway=gateway, batch_id=batch_id)
                    )
                acknowledged.append(batch_id)
        return acknowledged

    def purge(self, before_ms: int, at_ms: int) -> int:
        """Delete content and answer of batches acknowledged before ``before_ms`` (they become purged); returns how
        many."""
        with self.engine.begin() as conn:
            ids = [
                r.batch_id
                for r in conn.execute(
                    select(batches.c.batch_id).where(
                        batches.c.state == "acknowledged", batches.c.acknowledged_at_ms < before_ms
                    )
                )
            ]
            if ids:
                conn.execute(update(batches).where(batches.c.batch_id.in_(ids)).values(state="purged"))
                conn.execute(delete(batch_contents).where(batch_contents.c.batch_id.in_(ids)))
                conn.execute(delete(batch_answers).where(batch_answers.c.batch_id.in_(ids)))
                conn.execute(insert(audit), [{"at_ms": at_ms, "event": "purged", "batch_id": i} for i in ids])
        return len(ids)

    def keep(
        self, *, message_id: bytes, peer: str, direction: str, message_type: str, envelope: bytes, at_ms: int
    ) -> None:
        """Keep an envelope in the archive as it crossed the wire (idempotent by message id)."""
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(archive).values(
                        message_id=message_id, peer=peer, direction=direction, message_type=message_type,
                        at_ms=at_ms, envelope=envelope, sha256=hashlib.sha256(envelope).digest(),
                    )
                )  # fmt: skip
        except IntegrityError:
            pass  # kept before

    def archived(self, *, peer: str | None = None) -> list[dict[str, object]]:
        """The archive's rows (oldest first), of one peer when given."""
        query = select(archive).order_by(archive.c.at_ms, archive.c.message_id)
        if peer is not None:
            query = query.where(archive.c.peer == peer)
        with reading(self.engine) as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def audit_entries(self) -> Iterator[dict[str, object]]:
        with reading(self.engine) as conn:
            for row in conn.execute(select(audit).order_by(audit.c.id)):
                yield dict(row._mapping)

    def batch_count(self) -> int:
        with reading(self.engine) as conn:
            return len(conn.execute(select(batches.c.batch_id)).all())


def _add_due_provisional(engine: Engine) -> None:
    """Upgrade a database made before provisional due dates: add ``batches.due_provisional``, false for every
    existing batch (their dates were all computed from known years: the connector refused the others). A second
    process racing to do the same loses harmlessly."""
    if "due_provisional" in {c["name"] for c in inspect(engine).get_columns("batches")}:
        return
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE batches ADD COLUMN due_provisional BOOLEAN NOT NULL DEFAULT FALSE")
    except (OperationalError, ProgrammingError):
        if "due_provisional" not in {c["name"] for c in inspect(engine).get_columns("batches")}:
            raise
        return
    log.info("connector store upgraded: batches.due_provisional added")


def _move_blobs_out_of_batches(engine: Engine) -> None:
    """Upgrade a database made by an earlier version, whose ``batches`` rows held ``content`` and ``answer``.

    Copies every stored content and answer into its own table (skipping batches already there) and empties the old
    columns, in one transaction, so that each blob lives in one place. Idempotent: once the old columns are empty
    (or on a database that never had them) it changes nothing. Logs counts only.
    """
    old_columns = {c["name"] for c in inspect(engine).get_columns("batches")}
    moves = [
        (side, name) for side, name in ((batch_contents, "content"), (batch_answers, "answer")) if name in old_columns
    ]
    if not moves:
        return
    still_inline = or_(*(_old_batches.c[name].is_not(None) for _, name in moves))
    moved: dict[str, int] = {}
    with engine.begin() as conn:
        for side, name in moves:
            blob = _old_batches.c[name]
            rows = select(_old_batches.c.batch_id, blob).where(
                blob.is_not(None), ~exists().where(side.c.batch_id == _old_batches.c.batch_id)
            )
            moved[f"{name}s_moved"] = conn.execute(insert(side).from_select(["batch_id", name], rows)).rowcount
        # Matches no row once upgraded, so a later start rewrites nothing.
        emptied = conn.execute(update(_old_batches).where(still_inline).values({n: None for _, n in moves})).rowcount
    if emptied:
        log.info("connector store upgraded: batch contents and answers moved to their own tables", extra=moved)


def _fill_batch_shares(engine: Engine) -> None:
    """Upgrade a database made before ``batch_shares``: record the shares of every batch whose content is still held
    (purged ones are gone; their subjects were received long ago). Runs once, when the table was just created; a
    second process racing to do the same loses harmlessly. Logs a count only."""
    with reading(engine) as conn:
        rows = conn.execute(
            select(batches.c.batch_id, batches.c.gateway, batch_contents.c.content).join(
                batch_contents, batch_contents.c.batch_id == batches.c.batch_id
            )
        ).all()
    values = []
    for row in rows:
        batch = exchange_pb2.QueryBatch()
        try:
            batch.ParseFromString(row.content)
        except DecodeError:
            continue  # a content we cannot read has no shares to record
        shares = Shares.of(batch)
        if shares is not None:
            values.append(
                {
                    "batch_id": row.batch_id,
                    "gateway": row.gateway,
                    "commission_ref": shares.commission_ref,
                    "first_index": shares.first,
                    "last_index": shares.last,
                }
            )
    if not values:
        return
    try:
        with engine.begin() as conn:
            conn.execute(insert(batch_shares), values)
    except IntegrityError:
        return  # another process filled it
    log.info("connector store upgraded: batch_shares recorded", extra={"batches": len(values)})
