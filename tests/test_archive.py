"""The archive of clause 17 made whole (issue 10 item 2): exchange events are audit chain entries written with their
state change, outgoing query envelopes are kept as sent next to the received ones, a report issue signs a
checkpoint, and ``archive verify`` re-checks every archived envelope and its place in the chain. Real loopback
exchanges with real connectors, real SQLite files."""

from __future__ import annotations

import collections
from datetime import date
from pathlib import Path

import pytest
from sqlalchemy import delete, select, update

from common.idnumber import check_digit
from gateway.archive.audit import AuditLog
from gateway.archive.checkpoints import Checkpoint, examine
from gateway.archive.verify import verify_archive
from gateway.db import schema
from gateway.exchange.outbox import BATCH_ID_RE
from keys.envelope import message_id_of
from keys.keyring import Keyring
from tests.agency_world import agency_world, whole_procedure
from tests.exchange_world import beijing_ms
from tests.gateway_drive import BANK, LAND, TAX, batch_rows, execute, rows, settle
from tests.gateway_world import GatewayWorld, gateway_world

MONDAY = beijing_ms(2026, 3, 2)


def archive_report(world: GatewayWorld) -> list[str]:
    courier = world.engine.courier
    return verify_archive(world.store.engine, party=courier.me, trust=courier.trust).problems


def chain(world: GatewayWorld) -> AuditLog:
    return AuditLog(world.store.engine)


def test_exchange_events_are_chain_entries_and_a_report_issue_signs_a_checkpoint(tmp_path: Path) -> None:
    with agency_world(tmp_path) as agency:
        world = agency.world
        whole_procedure(agency, households=8)
        entries = chain(world).entries(limit=100_000)
        batches = batch_rows(world)
        by_action = collections.Counter(e.action for e in entries)
        # One entry per batch event, never per subject.
        assert by_action["batch.sent"] == by_action["batch.receipted"] == by_action["batch.answered"] == len(batches)
        answered = {e.detail.split(";")[0]: e for e in entries if e.action == "batch.answered" and e.detail}
        assert set(answered) == {f"batch={b.batch_id}" for b in batches}
        for batch in batches:
            entry = answered[f"batch={batch.batch_id}"]
            assert (entry.actor, entry.before, entry.after, entry.commission_id) == (
                batch.unit_id, "receipted", "answered", batch.commission_id
            )  # fmt: skip
            assert f"answers={batch.subject_count};env={bytes(batch.answer_message_id).hex()};sha256=" in (
                entry.detail or ""
            )
        # No personal data: no ID number or name of any subject is in any entry.
        people = [(s.id_number, s.name) for s in rows(world, select(schema.subjects))]
        text = repr(entries)
        assert people and not any(i in text or n in text for i, n in people)

        # The report issue signed the head, its own entry included (Procedure V.(一), clause 17).
        report_at = next(i for i, e in enumerate(entries) if e.action == "commission.report")
        signed = entries[report_at + 1]
        assert signed.action == "audit.checkpoint" and Checkpoint.from_entry(signed).reason == "report"
        me = world.engine.courier.me
        report = examine(world.store.engine, keys=Keyring(me.records()), party_id=me.party_id)
        assert report.problems == [] and [c.seq for c in report.checkpoints] == [signed.seq]
        assert report.unattested == (len(entries) - signed.seq, signed.seq + 1, len(entries))

        # Every query batch envelope was kept as sent, next to the receipts and answer sets received.
        kept = rows(world, select(schema.archive))
        out = [k for k in kept if k.direction == "out"]
        assert len(out) == len(batches) and {k.sender for k in out} == {me.party_id}
        assert {k.message_type for k in out} == {"hedui.v1.QueryBatch"}
        assert {message_id_of(bytes(k.envelope)) for k in out} == {bytes(k.message_id) for k in out}
        assert all(k.audit_seq is not None for k in kept)
        full = verify_archive(world.store.engine, party=me, trust=world.engine.courier.trust)
        assert full.problems == [] and full.outgoing == len(batches) and full.unchained == 0
        assert full.references == sum(by_action[a] for a in ("batch.sent", "batch.receipted", "batch.answered"))


def test_an_outgoing_envelope_is_archived_even_when_the_unit_cannot_be_reached(tmp_path: Path) -> None:
    with gateway_world(tmp_path, now_ms=MONDAY, down=frozenset({BANK})) as world:
        world.commission("WT-1", households=10)
        world.workers.run_once(dispatch=True)
        bank = next(b for b in batch_rows(world) if b.unit_id == BANK)
        assert bank.state == "ready" and bank.attempts == 1
        out = rows(world, select(schema.archive).where(schema.archive.c.direction == "out"))
        sent = [
            e
            for e in chain(world).entries()
            if e.action == "batch.sent" and f"batch={bank.batch_id}" in (e.detail or "")
        ]
        assert len(sent) == 1 and f"unit={BANK}" in (sent[0].detail or "")
        assert any(k.audit_seq == sent[0].seq for k in out)
        assert archive_report(world) == []


def test_delay_and_overdue_are_chain_entries_once(tmp_path: Path) -> None:
    with gateway_world(tmp_path, now_ms=MONDAY) as world:
        world.commission("WT-1", households=10)
        world.workers.run_once(dispatch=True)
        ids = {b.unit_id: b.batch_id for b in batch_rows(world)}
        world.clock.set(beijing_ms(2026, 3, 9))
        world.connectors[TAX].connector.issue_delay(ids[TAX], date(2026, 3, 16), "volume")
        world.workers.run_once(dispatch=True)
        world.workers.run_once(dispatch=True)  # polled again: the same due date, no second entry
        world.clock.set(beijing_ms(2026, 3, 12, 9))
        world.workers.run_once(dispatch=True)
        world.engine.sweep_deadlines()
        world.engine.sweep_deadlines()  # still overdue: no second entry
        entries = chain(world).entries()
        delays = [e for e in entries if e.action == "batch.delay"]
        assert [(e.actor, e.before, e.after) for e in delays] == [(TAX, "2026-03-11", "2026-03-16")]
        assert (delays[0].detail or "").startswith(f"batch={ids[TAX]};reason=volume;env=")
        overdue = sorted((e.detail or "").split(";")[0] for e in entries if e.action == "batch.overdue")
        assert overdue == sorted(f"unit={u}" for u in (LAND, BANK))
        assert archive_report(world) == [] and chain(world).verify() == []


@pytest.mark.parametrize("direction", ["out", "in"])
def test_archive_verify_catches_a_flipped_byte_and_a_deleted_envelope(tmp_path: Path, direction: str) -> None:
    with gateway_world(tmp_path, now_ms=MONDAY) as world:
        world.commission("WT-1", households=10)
        settle(world)
        assert archive_report(world) == []
        a = schema.archive.c
        victim = rows(world, select(schema.archive).where(a.direction == direction).order_by(a.received_at_ms))[0]
        name = bytes(victim.message_id).hex()
        flipped = bytearray(victim.envelope)
        flipped[len(flipped) // 2] ^= 0x01
        execute(world, update(schema.archive).where(a.message_id == victim.message_id).values(envelope=bytes(flipped)))
        problems = archive_report(world)
        assert any(p.startswith(f"envelope {name} ") and "bad_signature" in p for p in problems)
        assert any(p.startswith(f"envelope {name} ") and "recorded SHA-256" in p for p in problems)

        execute(world, update(schema.archive).where(a.message_id == victim.message_id).values(envelope=victim.envelope))
        assert archive_report(world) == []
        if direction == "in":  # an answer set is referred to by its batches: take a receipt
            victim = next(
                k for k in rows(world, select(schema.archive).where(a.direction == "in"))
                if k.message_type == "hedui.v1.BatchReceipt"
            )  # fmt: skip
            name = bytes(victim.message_id).hex()
        execute(world, delete(schema.archive).where(a.message_id == victim.message_id))
        problems = archive_report(world)
        assert problems == [
            f"chain entry {victim.audit_seq} names envelope {name}, which is not in the archive (deleted)"
        ]


def test_archive_verify_reports_an_envelope_stored_as_text_instead_of_crashing(tmp_path: Path) -> None:
    """SQLite keeps text in a byte column, also text that is not UTF-8: each used to end archive verify with a
    traceback, hiding every other finding."""
    with gateway_world(tmp_path, now_ms=MONDAY) as world:
        world.commission("WT-1", households=4)
        settle(world)
        assert archive_report(world) == []
        a = schema.archive.c
        first, second = rows(world, select(schema.archive).order_by(a.received_at_ms, a.message_id))[:2]
        with world.store.engine.begin() as conn:
            conn.exec_driver_sql("UPDATE archive SET envelope = 'hello' WHERE message_id = ?", (first.message_id,))
            conn.exec_driver_sql(
                "UPDATE archive SET envelope = CAST(x'ff00' AS TEXT) WHERE message_id = ?", (second.message_id,)
            )
        problems = archive_report(world)
        for victim in (first, second):
            name = bytes(victim.message_id).hex()
            assert any(p.startswith(f"envelope {name} ") and "fails its check" in p for p in problems), problems


def test_a_batch_id_holding_an_id_number_shaped_digit_run_is_still_resent_and_audited(tmp_path: Path) -> None:
    """Batch ids are random hex: now and then one holds 18 digits that pass GB 11643's check. The audit log's
    personal-data check refused such a detail, so ``hedui-gateway resend`` failed for that batch; the gateway's own
    entries are now written as generated key=value fields."""
    first17 = next(f"2201021980010112{n}" for n in range(10) if check_digit(f"2201021980010112{n}").isdigit())
    crafted = "B" + first17 + check_digit(first17) + "abcdefabcdefab"
    assert BATCH_ID_RE.fullmatch(crafted)
    with gateway_world(tmp_path, now_ms=MONDAY) as world:
        commission_id = world.commission("WT-1", households=1)
        execute(
            world,
            schema.batches.insert().values(
                batch_id=crafted, unit_id=TAX, commission_id=commission_id, digest=bytes(32), subject_count=0,
                created_at_ms=MONDAY, state="failed", attempts=1, next_attempt_ms=0, overdue=False, next_poll_ms=0,
            ),
        )  # fmt: skip
        resent = world.store.batches.resend_failed(
            TAX, [crafted], audit=chain(world), actor="operator:test", now_ms=MONDAY
        )
        assert [r.batch_id for r in resent] == [crafted]
        entry = chain(world).entries()[-1]
        assert (entry.action, entry.detail) == ("batch.resend", f"unit={TAX};batch={crafted};items=0")
