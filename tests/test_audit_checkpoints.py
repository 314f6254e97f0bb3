"""Signed checkpoints of the audit chain (issue 10 item 2): an entry appended by a database writer with a correctly
computed hash is visible as unattested, a checkpoint the gateway did not sign is refused, and a checkpoint kept off
the machine shows a log cut back before it. Real SQLite files and the real PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, delete, insert, select, update

from gateway.archive.audit import AuditLog, entry_hash, head
from gateway.archive.checkpoints import (
    CHECKPOINT_DOMAIN,
    Checkpoint,
    Checkpointer,
    ExportedCheckpoint,
    checkpoint_message,
    examine,
    latest_checkpoint,
    write_checkpoint,
)
from gateway.cli import main as gateway_main
from gateway.db import schema
from gateway.db.database import open_database
from keys import keystore
from keys.clock import DAY_MS, FixedClock
from keys.fingerprint import Algorithm
from keys.identity import PartyKeys
from keys.keyring import Keyring
from keys.truststore import TrustStore
from tests.conftest import write_passphrase
from tests.test_audit import START_MS, execute, fill, write_config

PARTY = "agency.220100"


@pytest.fixture
def engine(database_url: str | None, tmp_path: Path) -> Iterator[Engine]:
    engine = open_database(database_url or f"sqlite:///{tmp_path / 'gateway.db'}", migrate=True)
    yield engine
    engine.dispose()


@pytest.fixture
def audit(engine: Engine) -> AuditLog:
    return AuditLog(engine)


@pytest.fixture
def party() -> PartyKeys:
    return PartyKeys.create(PARTY, now_ms=START_MS - DAY_MS)


def keys_of(party: PartyKeys) -> Keyring:
    return Keyring(party.records())


def checkpoint(audit: AuditLog, party: PartyKeys, at_ms: int, reason: str = "periodic") -> int | None:
    with audit.engine.begin() as conn:
        return write_checkpoint(conn, audit, party, at_ms, reason=reason)


def append_as_database_writer(engine: Engine, *, action: str = "staff.register", detail: str = "roles=admin") -> int:
    """What anyone with write access to the database can do: the next entry, with a correctly computed hash."""
    last = head(engine)
    fields = {
        "seq": last.seq + 1,
        "at_ms": START_MS + 10_000,
        "actor": "S-0009",
        "action": action,
        "commission_id": None,
        "before": None,
        "after": None,
        "detail": detail,
    }
    digest = entry_hash(last.hash, **fields)  # type: ignore[arg-type]
    execute(engine, insert(schema.audit_log).values(**fields, prev_hash=last.hash, hash=digest))
    return last.seq + 1


def test_a_chain_without_checkpoints_verifies_as_before_with_every_entry_unattested(
    audit: AuditLog, party: PartyKeys
) -> None:
    fill(audit, 4)
    report = examine(audit.engine, keys=keys_of(party), party_id=PARTY)
    assert report.problems == [] and report.checkpoints == []
    assert report.unattested == (4, 1, 4)


def test_checkpoint_signs_the_documented_bytes_and_vouches_for_the_entries_before_it(
    audit: AuditLog, party: PartyKeys
) -> None:
    fill(audit, 3)
    before = audit.head()
    assert checkpoint(audit, party, START_MS + 5_000) == 4
    assert checkpoint(audit, party, START_MS + 6_000) is None  # the head is a checkpoint already
    entry = audit.entries()[-1]
    assert (entry.action, entry.actor, entry.prev_hash) == ("audit.checkpoint", PARTY, before.hash)
    fields = dict(part.split("=") for part in (entry.detail or "").split(";"))
    assert fields["reason"] == "periodic"
    key = party.signing_key(START_MS)
    assert fields["key"] == key.key_id.hex()
    # The signed bytes, built here from the specification (docs/operations.md), not by the code under test.
    signed = (
        b"hedui.v1.audit-checkpoint\x00"
        + len(PARTY).to_bytes(4, "big")
        + PARTY.encode()
        + (3).to_bytes(8, "big")
        + before.hash
        + (START_MS + 5_000).to_bytes(8, "big")
    )
    assert CHECKPOINT_DOMAIN + checkpoint_message(PARTY, 3, before.hash, START_MS + 5_000) == signed
    assert key.public.verify(bytes.fromhex(fields["sig"]), signed)
    report = examine(audit.engine, keys=keys_of(party), party_id=PARTY)
    assert report.problems == [] and [c.seq for c in report.checkpoints] == [4]
    assert report.unattested is None


def test_appended_entry_with_a_correct_hash_is_detected_as_unattested(audit: AuditLog, party: PartyKeys) -> None:
    """The bug: 'audit verify' said intact, even with --expected-head, for an entry a database writer appended."""
    fill(audit, 5)
    checkpoint(audit, party, START_MS + 5_000)
    recorded = audit.head()
    appended = append_as_database_writer(audit.engine)
    report = examine(audit.engine, keys=keys_of(party), party_id=PARTY, expected_head=recorded)
    assert report.problems == []  # the chain itself is consistent: that is the attack
    assert report.unattested == (1, appended, appended)
    assert report.attested_through == recorded.seq


def test_a_checkpoint_signed_by_another_key_is_refused(audit: AuditLog, party: PartyKeys) -> None:
    """A database writer who makes a key of their own (even under the gateway's party id) cannot forge one."""
    fill(audit, 3)
    checkpoint(audit, party, START_MS + 5_000)
    append_as_database_writer(audit.engine)
    impostor = PartyKeys.create(PARTY, now_ms=START_MS - DAY_MS)
    checkpoint(audit, impostor, START_MS + 20_000)
    report = examine(audit.engine, keys=keys_of(party), party_id=PARTY)
    assert report.problems == ["checkpoint 6 is signed by a key this gateway never held (forged)"]
    assert report.unattested == (2, 5, 6)


def test_a_checkpoint_with_a_changed_signature_or_a_copied_one_is_refused(audit: AuditLog, party: PartyKeys) -> None:
    fill(audit, 3)
    checkpoint(audit, party, START_MS + 5_000)
    genuine = audit.entries()[-1]
    # Copy the genuine checkpoint's detail onto a checkpoint of a longer chain: its signature covers another head.
    append_as_database_writer(audit.engine)
    append_as_database_writer(audit.engine, action=genuine.action, detail=genuine.detail or "")
    execute(audit.engine, update(schema.audit_log).where(schema.audit_log.c.seq == 6).values(actor=PARTY))
    report = examine(audit.engine, keys=keys_of(party), party_id=PARTY)
    assert "checkpoint 6 has a signature that does not verify (forged)" in report.problems
    assert report.attested_through == 4


def test_checkpoints_signed_by_a_retired_key_still_verify(audit: AuditLog, party: PartyKeys) -> None:
    fill(audit, 2)
    checkpoint(audit, party, START_MS + 1_000)
    party.rotate(Algorithm.ED25519, now_ms=START_MS + 2_000, overlap_ms=DAY_MS)
    fill(audit, 2, start=10)
    checkpoint(audit, party, START_MS + 3_000)
    party.advance(START_MS + 3 * DAY_MS)  # the old key is retired now, its secret gone
    old, new = (Checkpoint.from_entry(e) for e in audit.entries() if e.action == "audit.checkpoint")
    assert old.key_id != new.key_id
    report = examine(audit.engine, keys=keys_of(party), party_id=PARTY)
    assert report.problems == [] and len(report.checkpoints) == 2 and report.unattested is None


def test_an_exported_checkpoint_detects_a_log_cut_back_before_it(audit: AuditLog, party: PartyKeys) -> None:
    fill(audit, 6)
    checkpoint(audit, party, START_MS + 5_000)
    exported = ExportedCheckpoint.loads(latest_checkpoint(audit.engine, keys_of(party), PARTY).export())  # type: ignore[union-attr]
    fill(audit, 2, start=20)
    checkpoint(audit, party, START_MS + 6_000)
    assert examine(audit.engine, keys=keys_of(party), party_id=PARTY, exported=exported).problems == []

    # Cut back to the entry the exported checkpoint attests (checkpoint and all after it gone): without the file
    # the shorter chain is consistent and its last entries simply unattested.
    execute(audit.engine, delete(schema.audit_log).where(schema.audit_log.c.seq >= exported.checkpoint.seq))
    alone = examine(audit.engine, keys=keys_of(party), party_id=PARTY)
    assert alone.problems == [] and alone.unattested == (6, 1, 6)
    cut = examine(audit.engine, keys=keys_of(party), party_id=PARTY, exported=exported)
    assert cut.problems == [f"the log ends at entry 6, before the recorded head {exported.checkpoint.seq}: "
                            "entries were cut off its end"]  # fmt: skip


def test_an_exported_checkpoint_that_was_changed_or_forged_is_refused(party: PartyKeys, audit: AuditLog) -> None:
    fill(audit, 2)
    checkpoint(audit, party, START_MS + 5_000)
    text = latest_checkpoint(audit.engine, keys_of(party), PARTY).export()  # type: ignore[union-attr]
    doc = json.loads(text)
    doc["attested_hash"] = "00" * 32
    with pytest.raises(Exception, match="entry_hash does not match"):
        ExportedCheckpoint.loads(json.dumps(doc))
    impostor = PartyKeys.create(PARTY, now_ms=START_MS - DAY_MS)
    fill(audit, 1, start=5)
    checkpoint(audit, impostor, START_MS + 6_000)
    forged_entry = audit.entries()[-1]
    forged = ExportedCheckpoint(Checkpoint.from_entry(forged_entry))
    with pytest.raises(Exception, match="the exported checkpoint does not verify"):
        examine(audit.engine, keys=keys_of(party), party_id=PARTY, exported=forged)


def test_the_checkpoint_job_signs_only_when_entries_were_added(audit: AuditLog, party: PartyKeys) -> None:
    job = Checkpointer(audit, party, FixedClock(START_MS + 1_000))
    assert job.sign() is None  # an empty log
    fill(audit, 2)
    job()
    job()
    assert [e.action for e in audit.entries()] == ["staff.register", "commission.review", "audit.checkpoint"]


def test_cli_checkpoint_export_head_and_verify(
    audit: AuditLog, party: PartyKeys, database_url: str | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, database_url)
    keystore.save(tmp_path / "keystore.json", party, TrustStore(), "pass", kdf=keystore.FAST_FOR_TESTS)
    write_passphrase(tmp_path / "passphrase", "pass")
    fill(audit, 3)
    verify = ["audit", "verify", "--config", str(config)]
    capsys.readouterr()
    assert gateway_main(verify) == 0
    out = capsys.readouterr().out
    assert "checkpoints: none yet" in out and "UNATTESTED: 3 entries (1-3) after the last checkpoint" in out
    assert gateway_main([*verify, "--require-attested"]) == 1
    capsys.readouterr()

    exported = tmp_path / "head.json"
    assert gateway_main(["audit", "export-head", "--config", str(config), "--out", str(exported)]) == 0
    assert gateway_main([*verify, "--checkpoint", str(exported), "--require-attested"]) == 0
    out = capsys.readouterr().out
    assert "the recorded head 4:" in out and "unattested: none" in out
    assert "reason=operator" in (audit.entries()[-1].detail or "")

    appended = append_as_database_writer(audit.engine)
    assert gateway_main([*verify, "--checkpoint", str(exported)]) == 0
    assert f"UNATTESTED: 1 entries ({appended}-{appended})" in capsys.readouterr().out
    assert gateway_main([*verify, "--checkpoint", str(exported), "--require-attested"]) == 1
    capsys.readouterr()
    assert gateway_main(["audit", "checkpoint", "--config", str(config)]) == 0
    assert f"checkpoint signed as entry {appended + 1}" in capsys.readouterr().out

    execute(audit.engine, delete(schema.audit_log).where(schema.audit_log.c.seq >= 4))
    assert gateway_main([*verify, "--checkpoint", str(exported)]) == 1
    assert "PROBLEM: the log ends at entry 3, before the recorded head 4" in capsys.readouterr().out
    with audit.engine.connect() as conn:
        assert conn.execute(select(schema.audit_log.c.seq)).all()
