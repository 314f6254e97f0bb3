"""The audit log (clause 17): append inside the caller's transaction, a hash chain that shows any changed, removed
or moved entry, a recorded head that shows a cut-off end, no personal data, and concurrent writers on one chain.
Every test runs on a real SQLite file and on the real PostgreSQL when it answers."""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, delete, text, update

from common.db import make_engine
from common.idnumber import check_digit
from gateway.archive.audit import (
    AUDIT_DOMAIN,
    GENESIS_HASH,
    AuditError,
    AuditHead,
    AuditLog,
    check_detail,
    entry_hash,
)
from gateway.cli import main as gateway_main
from gateway.db import schema
from gateway.db.database import open_database

START_MS = 1_767_225_600_000
ID_17 = "22010419900307123"
ID_NUMBER = ID_17 + check_digit(ID_17)


@pytest.fixture
def engine(database_url: str | None, tmp_path: Path) -> Iterator[Engine]:
    engine = open_database(database_url or f"sqlite:///{tmp_path / 'gateway.db'}", migrate=True)
    yield engine
    engine.dispose()


@pytest.fixture
def audit(engine: Engine) -> AuditLog:
    return AuditLog(engine)


def write_config(root: Path, database_url: str | None) -> Path:
    """A minimal gateway config on the test's database; the keystore is not needed by the staff and audit commands."""
    url = database_url or f"sqlite:///{root / 'gateway.db'}"
    config = root / "gateway.toml"
    config.write_text(
        f'[agency]\nparty_id = "agency.220100"\nregion_code = "220100"\nlevel = "city"\n\n'
        f"[keys]\nkeystore = {json.dumps(str(root / 'keystore.json'))}\n"
        f"passphrase_file = {json.dumps(str(root / 'passphrase'))}\n\n"
        f"[database]\nurl = {json.dumps(url)}\n",
        encoding="utf-8",
    )
    return config


@pytest.fixture
def sqlite_audit(tmp_path: Path) -> Iterator[AuditLog]:
    """For the checks made before anything is written: the back end does not matter there."""
    engine = open_database(f"sqlite:///{tmp_path / 'gateway.db'}", migrate=True)
    yield AuditLog(engine)
    engine.dispose()


def fill(audit: AuditLog, count: int, *, start: int = 0) -> None:
    """``count`` entries of varied shape, one transaction each, as state changes make them."""
    for i in range(start, start + count):
        with audit.engine.begin() as conn:
            audit.append(
                conn,
                at_ms=START_MS + i,
                actor=f"S-{i % 3:04d}",
                action="commission.review" if i % 2 else "staff.register",
                commission_id=i if i % 2 else None,
                before="intake" if i % 2 else None,
                after="review" if i % 2 else "active",
                detail=f"households=3;subjects={i}" if i % 3 else None,
            )


def execute(engine: Engine, statement: object) -> None:
    with engine.begin() as conn:
        conn.execute(statement)  # type: ignore[call-overload]


def test_entries_chain_from_zero_hash_and_verify_intact(audit: AuditLog) -> None:
    assert audit.head() == AuditHead(0, GENESIS_HASH)
    assert audit.verify() == []
    fill(audit, 6)
    entries = audit.entries()
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5, 6]
    assert entries[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(entries))
    assert audit.head() == AuditHead(6, entries[-1].hash)
    assert audit.verify() == []
    assert audit.verify(expected_head=audit.head()) == []
    assert [e.seq for e in audit.entries(commission_id=3)] == [4]


def test_entry_hash_follows_the_documented_encoding() -> None:
    # Built here byte by byte from the module docstring, so the formula stays implementable from the text alone.
    def integer(value: int) -> bytes:
        return b"\x01" + value.to_bytes(8, "big", signed=True)

    def textual(value: str) -> bytes:
        data = value.encode()
        return b"\x01" + len(data).to_bytes(4, "big") + data

    prev = bytes(range(32))
    body = integer(7) + integer(START_MS) + textual("S-0001") + textual("commission.review") + b"\x00"
    body += textual("intake") + textual("review") + b"\x00"
    expected = hashlib.sha256(b"hedui.v1.audit\x00" + prev + body).digest()
    assert AUDIT_DOMAIN == b"hedui.v1.audit\x00"
    got = entry_hash(
        prev,
        seq=7,
        at_ms=START_MS,
        actor="S-0001",
        action="commission.review",
        commission_id=None,
        before="intake",
        after="review",
        detail=None,
    )
    assert got == expected


def test_encoding_keeps_field_boundaries() -> None:
    common = {"seq": 1, "at_ms": 0, "commission_id": None, "detail": None}
    a = entry_hash(GENESIS_HASH, actor="S-1", action="a.b", before="x", after=None, **common)  # type: ignore[arg-type]
    b = entry_hash(GENESIS_HASH, actor="S-1", action="a.b", before=None, after="x", **common)  # type: ignore[arg-type]
    c = entry_hash(GENESIS_HASH, actor="S-1", action="a.b", before="", after="x", **common)  # type: ignore[arg-type]
    assert len({a, b, c}) == 3


def test_entry_commits_and_rolls_back_with_the_callers_transaction(audit: AuditLog) -> None:
    with pytest.raises(RuntimeError), audit.engine.begin() as conn:
        audit.append(conn, at_ms=START_MS, actor="S-0001", action="staff.register")
        raise RuntimeError("the state change failed after the entry was written")
    assert audit.count() == 0
    fill(audit, 1)
    assert audit.head().seq == 1 and audit.verify() == []


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("at_ms", START_MS + 999),
        ("actor", "S-0666"),
        ("action", "staff.revoke"),
        ("commission_id", 77),
        ("before", "returned"),
        ("after", "terminated"),
        ("detail", "households=4"),
        ("prev_hash", bytes(32)),
        ("hash", bytes(32)),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_a_changed_field_is_found(audit: AuditLog, column: str, value: object) -> None:
    fill(audit, 5)
    execute(audit.engine, update(schema.audit_log).where(schema.audit_log.c.seq == 3).values({column: value}))
    problems = audit.verify()
    assert problems, column
    assert any("entry 3" in p for p in problems), problems
    if column not in ("hash", "prev_hash"):
        assert "entry 3 was changed (hash mismatch)" in problems


def test_a_deleted_entry_is_found(audit: AuditLog) -> None:
    fill(audit, 5)
    execute(audit.engine, delete(schema.audit_log).where(schema.audit_log.c.seq == 3))
    assert audit.verify() == ["entry 3 is missing (the log jumps from 2 to 4)"]
    execute(audit.engine, delete(schema.audit_log).where(schema.audit_log.c.seq == 4))
    assert audit.verify() == ["entries 3-4 are missing (the log jumps from 2 to 5)"]


def test_a_deleted_entry_with_the_rest_renumbered_is_found(audit: AuditLog) -> None:
    fill(audit, 5)
    execute(audit.engine, delete(schema.audit_log).where(schema.audit_log.c.seq == 3))
    for seq in (4, 5):
        execute(audit.engine, update(schema.audit_log).where(schema.audit_log.c.seq == seq).values(seq=seq - 1))
    problems = audit.verify()
    assert "entry 3 does not follow entry 2 (prev_hash mismatch): an entry was removed, inserted or moved" in problems
    assert "entry 3 was changed (hash mismatch)" in problems and "entry 4 was changed (hash mismatch)" in problems


def test_swapped_entries_are_found(audit: AuditLog) -> None:
    fill(audit, 5)
    seq = schema.audit_log.c.seq
    execute(audit.engine, update(schema.audit_log).where(seq == 2).values(seq=-2))
    execute(audit.engine, update(schema.audit_log).where(seq == 4).values(seq=2))
    execute(audit.engine, update(schema.audit_log).where(seq == -2).values(seq=4))
    problems = audit.verify()
    for moved in (2, 4):
        assert f"entry {moved} was changed (hash mismatch)" in problems
    assert any(p.startswith("entry 3 does not follow entry 2") for p in problems), problems


def test_a_cut_off_end_is_found_only_with_the_recorded_head(audit: AuditLog) -> None:
    fill(audit, 5)
    recorded = audit.head()
    execute(audit.engine, delete(schema.audit_log).where(schema.audit_log.c.seq >= 4))
    assert audit.verify() == []  # a chain alone cannot tell
    assert audit.verify(expected_head=recorded) == [
        "the log ends at entry 3, before the recorded head 5: entries were cut off its end"
    ]


def test_a_log_rewritten_whole_is_found_with_the_recorded_head(audit: AuditLog) -> None:
    fill(audit, 4)
    recorded = audit.head()
    execute(audit.engine, delete(schema.audit_log))
    fill(audit, 4, start=100)  # a consistent chain, other contents
    assert audit.verify() == []
    assert audit.verify(expected_head=recorded) == [
        "entry 4 differs from the recorded head: the log was rewritten up to there"
    ]


def test_a_recorded_head_stays_valid_while_the_log_grows(audit: AuditLog) -> None:
    fill(audit, 3)
    recorded = audit.head()
    fill(audit, 4, start=3)
    assert audit.head().seq == 7
    assert audit.verify(expected_head=recorded) == []
    assert audit.verify(expected_head=AuditHead(0, GENESIS_HASH)) == []


def test_head_text_round_trip_and_refusals() -> None:
    head = AuditHead(12, bytes(range(32)))
    assert AuditHead.parse(str(head)) == head
    assert AuditHead.parse(f"  {head}\n") == head
    for bad in ("", "12", "12:", "x:" + "00" * 32, "12:" + "00" * 31, "-1:" + "00" * 32, "0:" + "11" * 32):
        with pytest.raises(AuditError, match="SEQ:HEX"):
            AuditHead.parse(bad)


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("detail", f"subject={ID_NUMBER}", "ID number"),
        ("detail", f"id {ID_NUMBER[:17]}x", "ID number"),
        ("detail", f"id={ID_17}0", "ID number"),  # wrong check digit: still an ID number
        ("detail", "old=220104900307123", "ID number"),  # the 15-digit form
        ("detail", "name=张三", "CJK"),
        ("detail", "name=ＺＨＡＮＧ", "CJK"),  # full-width forms
        ("actor", "王五", "CJK"),
        ("before", ID_NUMBER, "ID number"),
        ("after", "intake\n", "printable ASCII"),
        ("detail", "é", "printable ASCII"),
        ("detail", "x" * 256, "1-255"),
        ("detail", "", "1-255"),
        ("action", "Staff Register", "lower-case dotted"),
        ("actor", "a" * 65, "1-64"),
    ],
)
def test_personal_data_and_malformed_fields_are_refused_and_nothing_is_written(
    sqlite_audit: AuditLog, field: str, value: str, reason: str
) -> None:
    audit = sqlite_audit
    fields: dict[str, str] = {"actor": "S-0001", "action": "staff.register", field: value}
    with pytest.raises(AuditError, match=reason) as caught, audit.engine.begin() as conn:
        audit.append(conn, at_ms=START_MS, **fields)  # type: ignore[arg-type]
    assert value not in str(caught.value) or not value.strip()
    assert audit.count() == 0


@pytest.mark.parametrize(
    "detail",
    [
        "batch=B" + "1" * 32,  # long digit runs that are no ID number (no calendar date inside)
        "batch=B123456789012345678",
        "batch=B" + hashlib.sha256(b"x").hexdigest()[:32],
        f"at={START_MS};subjects=2000;households=700",
        "reason=incomplete-authorisation;code=missing_member",
    ],
)
def test_codes_counts_and_ids_pass(detail: str) -> None:
    assert check_detail(detail) == detail


def test_concurrent_appends_from_two_replicas_keep_one_chain(
    audit: AuditLog, database_url: str | None, tmp_path: Path
) -> None:
    # Two engines, as two gateway replicas on one database: without the lock they would race for the same number.
    other = open_database(database_url or f"sqlite:///{tmp_path / 'gateway.db'}")
    per_thread = 40
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def work(log: AuditLog, replica: str) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                with log.engine.begin() as conn:
                    log.append(conn, at_ms=START_MS + i, actor=replica, action="batch.send", detail=f"n={i}")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=work, args=(audit, "gateway-1")),
        threading.Thread(target=work, args=(AuditLog(other), "gateway-2")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    other.dispose()
    assert errors == []
    assert audit.count() == 2 * per_thread
    assert audit.head().seq == 2 * per_thread
    assert audit.verify() == []
    actors = [e.actor for e in audit.entries(limit=1000)]
    assert actors.count("gateway-1") == actors.count("gateway-2") == per_thread


def test_cli_audit_head_and_verify(
    audit: AuditLog, database_url: str | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, database_url)
    fill(audit, 5)
    capsys.readouterr()
    assert gateway_main(["audit", "head", "--config", str(config)]) == 0
    recorded = capsys.readouterr().out.strip()
    assert AuditHead.parse(recorded) == audit.head()
    assert gateway_main(["audit", "verify", "--config", str(config), "--expected-head", recorded]) == 0
    assert f"audit log intact: 5 entries; the recorded head {recorded} is in it" in capsys.readouterr().out

    execute(audit.engine, delete(schema.audit_log).where(schema.audit_log.c.seq == 5))
    assert gateway_main(["audit", "verify", "--config", str(config)]) == 0
    assert gateway_main(["audit", "verify", "--config", str(config), "--expected-head", recorded]) == 1
    captured = capsys.readouterr()
    assert "PROBLEM: the log ends at entry 4, before the recorded head 5" in captured.out
    assert "the audit log failed verification (1 problem(s))" in captured.err

    execute(audit.engine, text("UPDATE audit_log SET detail = 'households=9' WHERE seq = 2"))
    assert gateway_main(["audit", "verify", "--config", str(config)]) == 1
    assert "PROBLEM: entry 2 was changed (hash mismatch)" in capsys.readouterr().out
    assert gateway_main(["audit", "verify", "--config", str(config), "--expected-head", "5:zz"]) == 1
    assert "SEQ:HEX" in capsys.readouterr().err


@pytest.mark.parametrize(
    "change, field",
    [
        ("UPDATE audit_log SET actor = CAST(x'ff' AS TEXT) WHERE seq = 2", "actor"),
        ("UPDATE audit_log SET at_ms = 'abc' WHERE seq = 2", "at_ms"),
        ("UPDATE audit_log SET hash = 'abc' WHERE seq = 2", "hash"),
        ("UPDATE audit_log SET detail = x'00ff' WHERE seq = 2", "detail"),
    ],
)
def test_a_value_of_the_wrong_type_is_a_finding_not_a_crash(tmp_path: Path, change: str, field: str) -> None:
    """SQLite keeps whatever a writer stores; a text column holding bytes that are not UTF-8, a number column
    holding text or a hash column holding text used to stop verify with a traceback, hiding every other finding."""
    engine = make_engine(f"sqlite:///{tmp_path / 'audit.db'}")
    schema.metadata.create_all(engine)
    log = AuditLog(engine)
    for n in range(4):
        with engine.begin() as conn:
            log.append(conn, at_ms=1_000 + n, actor="S-0001", action="commission.intake", detail=f"n={n}")
    with engine.begin() as conn:
        conn.exec_driver_sql(change)
        conn.exec_driver_sql("UPDATE audit_log SET action = 'commission.review' WHERE seq = 4")
    problems = log.verify()
    assert any(p.startswith("entry 2 was changed outside the gateway") and field in p for p in problems), problems
    assert "entry 4 was changed (hash mismatch)" in problems  # the rest of the chain is still checked
