"""The connector's store on real SQLite files: the blobs live in side tables, purge deletes them, and a database made
by the previous version (blobs inline in ``batches``) is upgraded in place, once."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from hedui.v1 import exchange_pb2
from sqlalchemy import (
    BigInteger,
    Column,
    Date,
    Engine,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    event,
    func,
    insert,
    inspect,
    select,
)

from common.db import make_engine
from connectors import store as cstore
from connectors.store import BatchExists, ConnectorStore, StoredBatch

GATEWAY = "gateway.220100"
RECEIVED_MS = 1_772_400_000_000
CONTENT = bytes(range(256)) * 2_000  # 512 KB: the size of a 5,000-subject QueryBatch, and not all zeros
ANSWER = bytes(reversed(range(256))) * 6_000


def _batch(batch_id: str, *, received_at_ms: int = RECEIVED_MS) -> StoredBatch:
    return StoredBatch(
        batch_id=batch_id,
        gateway=GATEWAY,
        message_id=batch_id.encode().ljust(16, b"\0"),
        envelope_sha256=batch_id.encode().ljust(32, b"e"),
        digest=batch_id.encode().ljust(32, b"d"),
        subject_count=5_000,
        received_at_ms=received_at_ms,
        original_due=date(2026, 3, 11),
        due=date(2026, 3, 11),
        state="pending",
        answered_at_ms=None,
        delay_reason=None,
        delay_issued_at_ms=None,
    )


def _engine(tmp_path: Path) -> Engine:
    return make_engine(f"sqlite:///{tmp_path / 'connector.db'}")


def _count(engine: Engine, table: Table) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


@contextmanager
def _statements(engine: Engine) -> Iterator[list[tuple[str, int]]]:
    """The SQL statements the engine runs inside the block (upper-cased), each with the rows it changed."""
    seen: list[tuple[str, int]] = []

    def _record(_conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        seen.append((" ".join(statement.split()).upper(), cursor.rowcount))

    event.listen(engine, "after_cursor_execute", _record)
    try:
        yield seen
    finally:
        event.remove(engine, "after_cursor_execute", _record)


# -- the blobs in their own tables ----------------------------------------------------------------------------------


def test_fresh_database_keeps_the_blobs_out_of_the_batches_row(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    store = ConnectorStore(engine)
    columns = {c["name"] for c in inspect(engine).get_columns("batches")}
    assert "content" not in columns and "answer" not in columns
    assert {"batch_contents", "batch_answers"} <= set(inspect(engine).get_table_names())

    store.insert(_batch("B-1"), CONTENT)
    store.insert(_batch("B-2", received_at_ms=RECEIVED_MS + 1), b"")  # empty content is content, not a missing row
    [(first, content), (second, empty)] = store.pending(10)
    assert (first.batch_id, content) == ("B-1", CONTENT)
    assert (second.batch_id, empty) == ("B-2", b"")
    assert first == _batch("B-1")
    assert store.answers_for(GATEWAY, ["B-1"]) == {"B-1": (_batch("B-1"), None)}

    with _statements(engine) as answering:
        assert store.store_answer("B-1", ANSWER, RECEIVED_MS + 10)
    # The answer row is inserted once; nothing updates (and so rewrites) a row holding a blob.
    touching_blobs = [(s.split(" (")[0], n) for s, n in answering if "BATCH_ANSWERS" in s or "BATCH_CONTENTS" in s]
    assert touching_blobs == [("INSERT INTO BATCH_ANSWERS", 1)]

    with _statements(engine) as state_changes:
        store.count_attempt("B-2")
        store.set_delay("B-2", date(2026, 3, 13), "volume", RECEIVED_MS + 20)
        assert store.acknowledge(GATEWAY, ["B-1", "B-2"], RECEIVED_MS + 30) == ["B-1"]
    assert state_changes, "no statements seen"
    assert not [s for s, _ in state_changes if "BATCH_CONTENTS" in s or "BATCH_ANSWERS" in s]

    found = store.answers_for(GATEWAY, ["B-1", "B-2", "B-unknown"])
    assert set(found) == {"B-1", "B-2"}
    assert found["B-1"][1] == ANSWER and found["B-1"][0].state == "acknowledged"
    assert found["B-2"][1] is None and found["B-2"][0].due == date(2026, 3, 13)
    assert store.answers_for("gateway.other", ["B-1"]) == {}
    assert [(b.batch_id, c) for b, c in store.pending(10)] == [("B-2", b"")]


def test_answer_only_for_a_pending_batch_and_duplicates_refused(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    store = ConnectorStore(engine)
    store.insert(_batch("B-1"), CONTENT)
    with pytest.raises(BatchExists):
        store.insert(_batch("B-1"), b"other content")
    assert _count(engine, cstore.batch_contents) == 1
    assert store.pending(1)[0][1] == CONTENT

    assert not store.store_answer("B-unknown", ANSWER, RECEIVED_MS + 10)
    assert store.store_answer("B-1", ANSWER, RECEIVED_MS + 10)
    assert not store.store_answer("B-1", b"a second answer", RECEIVED_MS + 11)
    assert _count(engine, cstore.batch_answers) == 1
    assert store.answers_for(GATEWAY, ["B-1"])["B-1"][1] == ANSWER
    assert [e["event"] for e in store.audit_entries()] == ["accepted", "answered"]


def test_purge_deletes_the_side_rows(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    store = ConnectorStore(engine)
    for n in range(3):
        store.insert(_batch(f"B-{n}", received_at_ms=RECEIVED_MS + n), CONTENT)
    store.store_answer("B-0", ANSWER, RECEIVED_MS + 10)
    store.store_answer("B-1", ANSWER, RECEIVED_MS + 10)
    store.acknowledge(GATEWAY, ["B-0"], RECEIVED_MS + 20)
    store.acknowledge(GATEWAY, ["B-1"], RECEIVED_MS + 40)
    assert (_count(engine, cstore.batch_contents), _count(engine, cstore.batch_answers)) == (3, 2)

    assert store.purge(before_ms=RECEIVED_MS + 30, at_ms=RECEIVED_MS + 50) == 1  # only B-0 is old enough
    assert (_count(engine, cstore.batch_contents), _count(engine, cstore.batch_answers)) == (2, 1)
    with engine.connect() as conn:
        assert set(conn.execute(select(cstore.batch_contents.c.batch_id)).scalars()) == {"B-1", "B-2"}
        assert set(conn.execute(select(cstore.batch_answers.c.batch_id)).scalars()) == {"B-1"}
    purged = store.answers_for(GATEWAY, ["B-0", "B-1"])
    assert purged["B-0"][0].state == "purged" and purged["B-0"][1] is None
    assert purged["B-1"][1] == ANSWER
    assert store.acknowledge(GATEWAY, ["B-0"], RECEIVED_MS + 60) == ["B-0"]  # a late repeat is still confirmed

    assert store.purge(before_ms=RECEIVED_MS + 100, at_ms=RECEIVED_MS + 110) == 1
    assert (_count(engine, cstore.batch_contents), _count(engine, cstore.batch_answers)) == (1, 0)
    assert [(b.batch_id, c) for b, c in store.pending(10)] == [("B-2", CONTENT)]
    assert store.batch_count() == 3
    assert [e["batch_id"] for e in store.audit_entries() if e["event"] == "purged"] == ["B-0", "B-1"]


# -- upgrading a database made by the previous version ----------------------------------------------------------------

_old_metadata = MetaData()

#: ``batches`` as the previous version created it, blobs inline (copied from the previous connectors/store.py).
_old_batches = Table(
    "batches",
    _old_metadata,
    Column("batch_id", String(64), primary_key=True),
    Column("gateway", String(64), nullable=False, index=True),
    Column("message_id", LargeBinary(16), nullable=False),
    Column("envelope_sha256", LargeBinary(32), nullable=False, index=True),
    Column("digest", LargeBinary(32), nullable=False),
    Column("subject_count", Integer, nullable=False),
    Column("received_at_ms", BigInteger, nullable=False),
    Column("original_due", Date, nullable=False),
    Column("due", Date, nullable=False),
    Column("state", String(16), nullable=False, index=True),
    Column("content", LargeBinary, nullable=True),
    Column("answer", LargeBinary, nullable=True),
    Column("answered_at_ms", BigInteger, nullable=True),
    Column("acknowledged_at_ms", BigInteger, nullable=True),
    Column("delay_reason", String(32), nullable=True),
    Column("delay_issued_at_ms", BigInteger, nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
)


def _old_row(batch_id: str, state: str, content: bytes | None, answer: bytes | None, n: int) -> dict[str, object]:
    row: dict[str, object] = {**_batch(batch_id, received_at_ms=RECEIVED_MS + n).__dict__, "state": state}
    row |= {"content": content, "answer": answer, "attempts": 0}
    del row["due_provisional"]  # added after that version
    if answer is not None:
        row["answered_at_ms"] = RECEIVED_MS + 10
    if state in {"acknowledged", "purged"}:
        row["acknowledged_at_ms"] = RECEIVED_MS + 20
    return row


def _dump(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    with engine.connect() as conn:
        return {
            t.name: [tuple(r) for r in conn.execute(select(t).order_by(*t.primary_key))]
            for t in (_old_batches, cstore.batch_contents, cstore.batch_answers, cstore.audit)
        }


def test_upgrade_moves_the_blobs_out_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    engine = _engine(tmp_path)
    _old_metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            insert(_old_batches),
            [
                _old_row("B-pending", "pending", CONTENT, None, 0),
                _old_row("B-answered", "answered", CONTENT[::-1], ANSWER, 1),
                _old_row("B-purged", "purged", None, None, 2),
            ],
        )

    with caplog.at_level(logging.INFO, logger="hedui.connector.store"):
        store = ConnectorStore(engine)
    assert [(b.batch_id, c) for b, c in store.pending(10)] == [("B-pending", CONTENT)]
    found = store.answers_for(GATEWAY, ["B-pending", "B-answered", "B-purged"])
    assert {k: (b.state, a) for k, (b, a) in found.items()} == {
        "B-pending": ("pending", None),
        "B-answered": ("answered", ANSWER),
        "B-purged": ("purged", None),
    }
    with engine.connect() as conn:
        old = conn.execute(select(_old_batches.c.content, _old_batches.c.answer)).all()
        contents = {r.batch_id: r.content for r in conn.execute(select(cstore.batch_contents))}
    assert old == [(None, None)] * 3, "the blobs are still in the old columns too"
    assert contents == {"B-pending": CONTENT, "B-answered": CONTENT[::-1]}
    assert _count(engine, cstore.batch_answers) == 1
    # This old database also lacks due_provisional, which gets its own upgrade line.
    [upgraded] = [r for r in caplog.records if r.name == "hedui.connector.store" and "moved" in r.getMessage()]
    assert (upgraded.contents_moved, upgraded.answers_moved) == (2, 1)  # type: ignore[attr-defined]

    # Opening it again changes nothing (its statements match no rows: nothing to rewrite) and logs nothing.
    caplog.clear()
    before = _dump(engine)
    with _statements(engine) as second_open:
        ConnectorStore(engine)
    assert not [s for s, _ in second_open if s.startswith("CREATE")]
    assert [n for s, n in second_open if s.startswith(("INSERT", "UPDATE", "DELETE"))] == [0, 0, 0]
    assert _dump(engine) == before
    assert not [r for r in caplog.records if r.name == "hedui.connector.store"]

    # due_provisional was added too, false for every batch received before (their due dates were all final).
    assert [store.get(i).due_provisional for i in ("B-pending", "B-answered", "B-purged")] == [False] * 3  # type: ignore[union-attr]

    # The upgraded database works on, old (empty, nullable) columns and all.
    store.insert(_batch("B-new", received_at_ms=RECEIVED_MS + 5), b"new content")
    assert [b.batch_id for b, _ in store.pending(10)] == ["B-pending", "B-new"]
    assert store.store_answer("B-pending", b"late answer", RECEIVED_MS + 30)
    assert store.acknowledge(GATEWAY, ["B-answered", "B-pending"], RECEIVED_MS + 40) == ["B-answered", "B-pending"]
    assert store.purge(before_ms=RECEIVED_MS + 50, at_ms=RECEIVED_MS + 60) == 2
    assert (_count(engine, cstore.batch_contents), _count(engine, cstore.batch_answers)) == (1, 0)
    with engine.connect() as conn:
        assert conn.execute(select(_old_batches.c.content, _old_batches.c.answer)).all() == [(None, None)] * 4


def test_upgrade_keeps_rows_already_moved(tmp_path: Path) -> None:
    """A batch whose content is both inline and in the side table keeps the side row (the copy skips ids already
    there), and the inline copy is emptied all the same."""
    engine = _engine(tmp_path)
    _old_metadata.create_all(engine)
    cstore.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(_old_batches).values(_old_row("B-1", "answered", b"inline content", b"inline answer", 0)))
        conn.execute(insert(cstore.batch_contents).values(batch_id="B-1", content=b"side content"))
    store = ConnectorStore(engine)
    with engine.connect() as conn:
        assert {r.batch_id: r.content for r in conn.execute(select(cstore.batch_contents))} == {"B-1": b"side content"}
        assert conn.execute(select(_old_batches.c.content, _old_batches.c.answer)).all() == [(None, None)]
    assert store.answers_for(GATEWAY, ["B-1"])["B-1"][1] == b"inline answer"


# -- the record of subjects received (security review 6) ------------------------------------------------------------


def _query(ref: str, indices: list[int], *, proof: bool = True) -> bytes:
    batch = exchange_pb2.QueryBatch(commission_ref=ref)
    for i in indices:
        batch.subjects.add(subject_ref=f"P{i}", share_index=i)
    if proof:
        batch.approval.subject_count = 100
    return batch.SerializeToString()


def test_overlapping_shares_of_a_commission_are_refused_and_nothing_is_stored(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    store = ConnectorStore(engine)
    store.insert(_batch("B-1"), CONTENT, cstore.Shares("WT-1", 10, 19))
    with pytest.raises(cstore.SharesQueried) as excinfo:
        store.insert(_batch("B-2"), CONTENT, cstore.Shares("WT-1", 19, 25))
    assert excinfo.value.batch_id == "B-1"
    assert store.batch_count() == 1 and _count(engine, cstore.batch_contents) == 1
    store.insert(_batch("B-3"), CONTENT, cstore.Shares("WT-1", 20, 25))  # the next range
    store.insert(_batch("B-4"), CONTENT, cstore.Shares("WT-2", 10, 19))  # another commission
    store.insert(_batch("B-5"), CONTENT, None)  # no proof: nothing to compare
    assert _count(engine, cstore.batch_shares) == 3


def test_upgrade_records_the_shares_of_batches_still_held(tmp_path: Path) -> None:
    """A database made before the record: the shares of every batch whose content is held are recorded once (the
    table is new); batches without an approval proof have none; the data stays."""
    engine = _engine(tmp_path)
    store = ConnectorStore(engine)
    store.insert(_batch("B-1"), _query("WT-1", [0, 1, 2]))
    store.insert(_batch("B-2"), _query("WT-1", [3, 4]))
    store.insert(_batch("B-3"), _query("WT-2", [0], proof=False))
    store.insert(_batch("B-4"), b"\xff not a message")
    cstore.batch_shares.drop(engine)  # as before the upgrade
    ConnectorStore(engine)
    with engine.connect() as conn:
        rows = conn.execute(
            select(cstore.batch_shares.c.batch_id, cstore.batch_shares.c.first_index, cstore.batch_shares.c.last_index)
        ).all()
    assert sorted(tuple(r) for r in rows) == [("B-1", 0, 2), ("B-2", 3, 4)]
    assert store.batch_count() == 4 and _count(engine, cstore.batch_contents) == 4
    with pytest.raises(cstore.SharesQueried):
        ConnectorStore(engine).insert(_batch("B-9"), CONTENT, cstore.Shares("WT-1", 4, 4))
    ConnectorStore(engine)  # a later start changes nothing
    assert _count(engine, cstore.batch_shares) == 2
