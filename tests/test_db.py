"""common.db: SQLite engines hand the database from one thread's transaction to the next without sleeping."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from common.db import make_engine, reading


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    engine = make_engine(f"sqlite:///{tmp_path / 'turns.db'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE log (who TEXT NOT NULL)"))
    return engine


def _in_other_thread(engine: Engine, entered: threading.Event) -> threading.Thread:
    def work() -> None:
        with engine.begin() as conn:
            entered.set()
            conn.execute(text("INSERT INTO log VALUES ('second')"))

    thread = threading.Thread(target=work)
    thread.start()
    return thread


@pytest.mark.parametrize("ending", ["commit", "rollback", "error"])
def test_a_second_transaction_waits_for_the_first_and_enters_when_it_ends(engine: Engine, ending: str) -> None:
    entered = threading.Event()
    conn = engine.connect()
    transaction = conn.begin()
    conn.execute(text("INSERT INTO log VALUES ('first')"))
    second = _in_other_thread(engine, entered)
    assert not entered.wait(0.3), "another thread's transaction ran while the first was open"
    if ending == "commit":
        transaction.commit()
    elif ending == "rollback":
        transaction.rollback()
    else:
        with pytest.raises(Exception, match="no such table"):
            conn.execute(text("INSERT INTO missing VALUES (1)"))
        transaction.rollback()
    conn.close()
    assert entered.wait(10), "the second transaction did not start after the first ended"
    second.join(10)
    with engine.connect() as check:
        rows = [r.who for r in check.execute(text("SELECT who FROM log ORDER BY rowid"))]
    assert rows == (["first", "second"] if ending == "commit" else ["second"])


def test_a_connection_closed_inside_its_transaction_lets_the_next_one_in(engine: Engine) -> None:
    entered = threading.Event()
    conn = engine.connect()
    conn.begin()
    conn.execute(text("INSERT INTO log VALUES ('lost')"))
    conn.invalidate()  # the DB-API connection is closed without commit, as after a fatal error
    second = _in_other_thread(engine, entered)
    assert entered.wait(10)
    second.join(10)
    with engine.connect() as check:
        assert [r.who for r in check.execute(text("SELECT who FROM log"))] == ["second"]


def test_transactions_of_many_threads_all_commit(engine: Engine) -> None:
    def work(n: int) -> None:
        for i in range(50):
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO log VALUES (:who)"), {"who": f"{n}-{i}"})

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    with engine.connect() as check:
        assert check.execute(text("SELECT count(DISTINCT who) FROM log")).scalar() == 300


def test_a_reader_reads_a_snapshot_while_a_writer_holds_the_database(engine: Engine) -> None:
    """Readers (common.db.reading) do not queue for the write lock: the API's progress queries and the metrics
    go on while the exchange writes, and see what was committed before."""
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO log VALUES ('committed')"))
    writer = engine.connect()
    transaction = writer.begin()
    writer.execute(text("INSERT INTO log VALUES ('not yet')"))
    try:
        result: list[str] = []

        def read() -> None:
            with reading(engine) as conn:
                result.extend(r.who for r in conn.execute(text("SELECT who FROM log")))

        reader = threading.Thread(target=read)
        reader.start()
        reader.join(5)
        assert not reader.is_alive(), "the reader waited for the writer"
        assert result == ["committed"]
    finally:
        transaction.commit()
        writer.close()
    with reading(engine) as conn:
        assert [r.who for r in conn.execute(text("SELECT who FROM log ORDER BY rowid"))] == ["committed", "not yet"]
