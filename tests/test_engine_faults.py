"""Faults around the exchange engine, on SQLite and PostgreSQL: a unit that is down or hangs, backoff with jitter,
a unit back after a day, a gateway restart, and a unit that refuses a batch for good."""

from __future__ import annotations

import dataclasses
import logging
import socket
from collections.abc import Callable
from concurrent.futures import wait
from contextlib import ExitStack
from pathlib import Path

import pytest
from hedui.v1 import exchange_pb2
from prometheus_client import CollectorRegistry
from sqlalchemy import func, select

from connectors.approvals import ApprovalCheck, NoRosters
from gateway.archive.audit import AuditLog
from gateway.cli import main as gateway_main
from gateway.db import schema
from gateway.exchange.transport import ClientTls, UnitClient
from gateway.metrics import GatewayMetrics
from keys.envelope import message_id_of
from tests.exchange_world import GATEWAY, beijing_ms
from tests.gateway_drive import (
    BANK,
    DAY_MS,
    LAND,
    TAX,
    assert_exactly_one_answer_per_item,
    audit_batches,
    batch_rows,
    bring_up,
    drain,
    enqueue,
    gateway_tls,
    operator_config,
    replace_client,
    rows,
    settle,
    unit_row,
)
from tests.gateway_world import UNITS, GatewayWorld, gateway_settings, gateway_world, subjects_of

MONDAY = beijing_ms(2026, 3, 2)
BASE_MS = 1_000
MAX_MS = 3_600_000


def _delay_bounds(failures: int) -> tuple[int, int]:
    """Backoff after the n-th consecutive failure: base·2^(n-1) capped at max, times a jitter in [0.5, 1.0]."""
    full = min(MAX_MS, BASE_MS * 2 ** (failures - 1))
    return full // 2, full


def _attempts(world: GatewayWorld, unit_id: str) -> int:
    return sum(b.attempts for b in batch_rows(world) if b.unit_id == unit_id)


def _answered_per_unit(world: GatewayWorld) -> dict[str, tuple[int, int]]:
    """unit id -> (items, answers)."""
    joined = schema.items.outerjoin(schema.answers, schema.answers.c.item_id == schema.items.c.id)
    query = (
        select(
            schema.items.c.unit_id,
            func.count(schema.items.c.id).label("n_items"),
            func.count(schema.answers.c.item_id).label("n_answers"),
        )
        .select_from(joined)
        .group_by(schema.items.c.unit_id)
    )
    return {r.unit_id: (r.n_items, r.n_answers) for r in rows(world, query)}


def _fixed(value: float) -> Callable[[], float]:
    return lambda: value


def test_a_down_unit_backs_off_and_loses_nothing_over_a_day(tmp_path: Path, database_url: str | None) -> None:
    settings = gateway_settings(base_backoff_ms=BASE_MS, max_backoff_ms=MAX_MS)
    with ExitStack() as stack:
        world = stack.enter_context(
            gateway_world(tmp_path, now_ms=MONDAY, database_url=database_url, settings=settings, down=frozenset({BANK}))
        )
        commission_id = world.commission("WT-1", households=40)
        settle(world)
        # The other two units are fully answered; the bank's batches wait, formed and ready, one attempt counted.
        progress = world.store.outbox.progress(commission_id)
        per_unit = {b.unit_id: 0 for b in batch_rows(world)}
        for b in batch_rows(world):
            per_unit[b.unit_id] += b.subject_count
        assert progress[TAX] == {"answered": per_unit[TAX]} and progress[LAND] == {"answered": per_unit[LAND]}
        bank = [b for b in batch_rows(world) if b.unit_id == BANK]
        # The batch tried once and not receipted is sent (being retried); the others, formed and not tried, queued.
        tried = sum(b.subject_count for b in bank if b.attempts)
        assert progress[BANK] == {"sent": tried, "queued": per_unit[BANK] - tried}
        assert len(bank) > 1 and {b.state for b in bank} == {"ready"}
        assert _attempts(world, BANK) == 1
        assert {b.last_error for b in bank if b.attempts} == {"transport"}
        assert {unit_row(world, u).consecutive_failures for u in (TAX, LAND)} == {0}

        # Exponential backoff with jitter: nothing is tried before next_attempt_ms, exactly one try at it.
        delays = []
        for failures in range(1, 9):
            unit = unit_row(world, BANK)
            assert unit.consecutive_failures == failures
            assert unit.last_error == "unavailable"
            delay = unit.next_attempt_ms - world.clock.now_ms()
            low, high = _delay_bounds(failures)
            assert low <= delay <= high, (failures, delay)
            delays.append(delay)
            world.clock.set(unit.next_attempt_ms - 1)
            world.workers.run_once(dispatch=True)
            assert unit_row(world, BANK).consecutive_failures == failures
            assert _attempts(world, BANK) == failures
            world.clock.set(unit.next_attempt_ms)
            world.workers.run_once(dispatch=True)
            assert _attempts(world, BANK) == failures + 1
        assert delays[-1] > delays[0] * 16  # 2^7 = 128 times the base, halved at worst by the jitter

        # A whole day down: retries keep coming, at most MAX_MS apart; the rest of the gateway goes on working.
        down_since = world.clock.now_ms()
        second = world.commission("WT-2", households=20, start=40)
        tries = 0
        while world.clock.now_ms() < down_since + DAY_MS:
            unit = unit_row(world, BANK)
            assert unit.next_attempt_ms - world.clock.now_ms() <= MAX_MS
            world.clock.set(unit.next_attempt_ms)
            settle(world)
            tries += 1
        assert tries >= DAY_MS // MAX_MS
        assert unit_row(world, BANK).consecutive_failures == 9 + tries
        assert world.store.outbox.progress(second)[TAX].keys() == {"answered"}
        assert world.store.batches.answer_count() < world.store.outbox.item_count()

        # The unit comes back: nothing is sent before its backoff ends, then everything goes and is answered.
        running = bring_up(world, BANK, stack)
        back_at = unit_row(world, BANK).next_attempt_ms
        world.clock.set(back_at - 1)
        world.workers.run_once(dispatch=True)
        assert running.connector.store.batch_count() == 0
        world.clock.set(back_at)
        settle(world)
        assert world.store.batches.answer_count() == world.store.outbox.item_count()
        assert_exactly_one_answer_per_item(world)
        for commission in (commission_id, second):
            assert {k for stages in world.store.outbox.progress(commission).values() for k in stages} == {"answered"}
        bank = [b for b in batch_rows(world) if b.unit_id == BANK]
        assert {b.state for b in bank} == {"acknowledged"}
        assert {b.received_at_ms for b in bank} == {back_at}  # the clause-12 clock starts when the unit receives
        assert audit_batches(world, BANK, "accepted") == {b.batch_id: 1 for b in bank}
        unit = unit_row(world, BANK)
        assert (unit.consecutive_failures, unit.next_attempt_ms, unit.last_error) == (0, 0, None)
        assert unit.last_success_ms == back_at


def test_jitter_spans_half_to_full_delay(tmp_path: Path, database_url: str | None) -> None:
    settings = gateway_settings(base_backoff_ms=BASE_MS, max_backoff_ms=4 * BASE_MS)
    with gateway_world(
        tmp_path, now_ms=MONDAY, database_url=database_url, settings=settings, down=frozenset({BANK})
    ) as world:
        world.commission("WT-1", households=5)
        seen = []
        for failures, jitter in enumerate([0.0, 0.999999, 0.0, 0.999999, 0.0, 0.5], start=1):
            world.engine.jitter = _fixed(jitter)
            world.clock.set(max(world.clock.now_ms(), unit_row(world, BANK).next_attempt_ms))
            world.workers.run_once(dispatch=True)
            unit = unit_row(world, BANK)
            assert unit.consecutive_failures == failures
            seen.append(unit.next_attempt_ms - world.clock.now_ms())
        assert seen == [500, 1999, 2000, 3999, 2000, 3000]  # capped at 4 s from the third failure on


def test_a_hanging_unit_does_not_slow_the_others(tmp_path: Path, database_url: str | None) -> None:
    """While a call to the bank hangs (its listener never accepts: the TLS handshake never finishes), the other
    units go through whole exchanges, cycle after cycle; the bank's cycle ends when its listener goes away."""
    timeout = 60.0  # never reached: the test ends the hang itself, however slow the machine is
    with ExitStack() as stack:
        world = stack.enter_context(
            gateway_world(tmp_path, now_ms=MONDAY, database_url=database_url, down=frozenset({BANK}))
        )
        hole = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)
        endpoint = f"localhost:{hole.getsockname()[1]}"
        replace_client(world, BANK, UnitClient(endpoint, gateway_tls(world), timeout), stack)
        world.commission("WT-1", households=40)
        first = dict(zip([u.unit_id for u in world.store.units.all()], world.workers.tick(dispatch=True), strict=True))
        stuck = first[BANK]
        others = [first[TAX], first[LAND]]
        rounds = 0
        while any(answers < items for u, (items, answers) in _answered_per_unit(world).items() if u != BANK) or any(
            b.state != "acknowledged" for b in batch_rows(world) if b.unit_id != BANK
        ):
            wait(others, timeout=timeout)
            drain(world)
            others = world.workers.tick(dispatch=True)
            assert len(others) == 2  # the bank is still in its first cycle and is not started again
            rounds += 1
            assert rounds < 20
        wait(others, timeout=timeout)
        assert rounds >= 2 and not stuck.done(), "the other units had to wait for the hanging one"
        bank = [b for b in batch_rows(world) if b.unit_id == BANK]
        assert [b.claimed_by for b in bank].count("test-1") == 1  # the batch in flight
        hole.close()
        report = stuck.result(timeout=timeout)
        assert report.error is not None and report.sent == 0
        assert unit_row(world, BANK).consecutive_failures == 1
        assert {(b.state, b.claimed_by) for b in batch_rows(world) if b.unit_id == BANK} == {("ready", None)}
        counts = _answered_per_unit(world)
        assert {u: answers for u, (_, answers) in counts.items()} == {
            BANK: 0,
            TAX: counts[TAX][0],
            LAND: counts[LAND][0],
        }


def test_gateway_restart_resumes_where_it_stopped(tmp_path: Path, database_url: str | None) -> None:
    """The gateway stops with the bank's batches unsent and the others' answers unfetched; a new gateway process
    (new courier keys, re-enrolled connectors) on the same database and the same connector databases finishes
    everything without sending anything twice."""
    url = database_url or f"sqlite:///{tmp_path / 'gateway.db'}"
    with gateway_world(tmp_path, now_ms=MONDAY, database_url=url, down=frozenset({BANK})) as world:
        commission_id = world.commission("WT-1", households=40)
        staff = world.staff
        world.workers.run_once(dispatch=True)  # tax and land receipted; nobody answered yet
        drain(world)  # the connectors answer, the gateway is gone before it fetches
        before = {b.batch_id: (b.unit_id, b.state, b.attempts) for b in batch_rows(world)}
    assert {s for _, s, _ in before.values()} == {"receipted", "ready"}
    later = MONDAY + 2 * 3_600_000
    with gateway_world(tmp_path, now_ms=later, database_url=url, staff=staff) as world:
        assert unit_row(world, BANK).consecutive_failures == 1  # health kept: the bank is tried after backoff
        assert unit_row(world, BANK).next_attempt_ms < later  # its backoff ended while the gateway was down
        settle(world)
        batches = batch_rows(world)
        assert {b.batch_id for b in batches} == set(before)
        assert {b.state for b in batches} == {"acknowledged"}
        for b in batches:
            unit_id, state, attempts = before[b.batch_id]
            assert b.attempts == attempts + (1 if state == "ready" else 0)
        for unit_id in UNITS:
            assert set(audit_batches(world, unit_id, "accepted").values()) == {1}
        assert_exactly_one_answer_per_item(world)
        assert {k for stages in world.store.outbox.progress(commission_id).values() for k in stages} == {"answered"}


def test_a_refused_batch_fails_visibly_and_alone(
    tmp_path: Path, database_url: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    """An approver the units' roster lists without the exchange role (Procedure V.(三)): every unit refuses that
    commission's batches for good, each with a signed refusal naming the approver; they are failed with the reason,
    shown as failed, never retried, and nothing else is affected."""
    with gateway_world(tmp_path, now_ms=MONDAY, database_url=database_url) as world:
        world.staff.enrol("S-0003", ("review",))
        good = enqueue(world, "WT-OK", households=20)
        bad = enqueue(world, "WT-BAD", households=20, start=20, staff=("S-0001", "S-0003"))
        settle(world)
        world.clock.advance(DAY_MS)
        settle(world)
        failed = batch_rows(world, bad)
        assert failed and {(b.state, b.last_error, b.attempts) for b in failed} == {
            ("failed", "permission_denied: approver_not_exchange_staff (S-0003)", 1)
        }
        assert all(b.received_at_ms is None and b.claimed_by is None for b in failed)
        # Each batch names the unit's signed refusal, kept in the archive (clause 17).
        archived = {
            r.message_id: r
            for r in rows(
                world, select(schema.archive.c.message_id, schema.archive.c.sender, schema.archive.c.message_type)
            )
        }
        for b in failed:
            kept = archived[b.refusal_message_id]
            assert (kept.sender, kept.message_type) == (b.unit_id, "hedui.v1.Refusal")
        counts: dict[str, int] = {}
        for b in failed:
            counts[b.unit_id] = counts.get(b.unit_id, 0) + b.subject_count
        assert world.store.outbox.progress(bad) == {u: {"failed": n} for u, n in counts.items()}
        assert set(counts) == set(UNITS)
        assert {k for stages in world.store.outbox.progress(good).values() for k in stages} == {"answered"}
        assert {(b.state, b.attempts) for b in batch_rows(world, good)} == {("acknowledged", 1)}
        for unit_id in UNITS:
            assert unit_row(world, unit_id).consecutive_failures == 0
            refused = [e for e in world.connectors[unit_id].connector.store.audit_entries() if e["event"] == "refused"]
            assert {(e["batch_id"], e["reason"]) for e in refused} == {
                (b.batch_id, "approver_not_exchange_staff") for b in failed if b.unit_id == unit_id
            }
        assert world.store.batches.answer_count() == sum(b.subject_count for b in batch_rows(world, good))
        capsys.readouterr()
        assert gateway_main(["status", "--config", str(operator_config(tmp_path, world, database_url))]) == 0
        out = capsys.readouterr().out
        for unit_id in UNITS:
            mine = [b for b in failed if b.unit_id == unit_id]
            n, items = len(mine), sum(b.subject_count for b in mine)
            assert (
                f"refused: {n} batches/{items} items, permission_denied: approver_not_exchange_staff (S-0003) (signed"
                in out
            )


def test_an_approver_the_units_do_not_know_yet_is_tried_again_until_the_roster_names_them(
    tmp_path: Path, database_url: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    """approver_unknown: the units do not hold a roster naming S-0003 yet (rosters travel by SyncTrust). The
    commission's batches stay ready and are sent again after their own backoff, once recorded in the chain with the
    unit's signed refusal; the units are not backed off and the other commission is answered meanwhile. Once the
    roster naming S-0003 (effective before the approval) has reached the units, the batches go through."""
    metrics = GatewayMetrics(CollectorRegistry())
    with gateway_world(tmp_path, now_ms=MONDAY, database_url=database_url, metrics=metrics) as world:
        good = enqueue(world, "WT-OK", households=10)
        waiting = enqueue(world, "WT-WAIT", households=10, start=10, staff=("S-0001", "S-0003"))
        settle(world)
        held = batch_rows(world, waiting)
        assert held and {(b.state, b.last_error, b.attempts) for b in held} == {
            ("ready", "permission_denied: approver_unknown (S-0003)", 1)
        }
        assert all(b.next_attempt_ms > world.clock.now_ms() for b in held)
        assert {k for stages in world.store.outbox.progress(good).values() for k in stages} == {"answered"}
        for unit_id in UNITS:
            assert unit_row(world, unit_id).consecutive_failures == 0
            assert metrics.registry.get_sample_value(
                "hedui_unit_refusals_total", {"unit": unit_id, "reason": "approver_unknown"}
            ) == len([b for b in held if b.unit_id == unit_id])
        world.clock.advance(60_000)
        settle(world)  # refused again: counted, but no second chain entry
        assert {(b.state, b.attempts) for b in batch_rows(world, waiting)} == {("ready", 2)}
        deferred = [e for e in AuditLog(world.store.engine).entries() if e.action == "batch.deferred"]
        assert sorted((e.detail or "").split(";")[0] for e in deferred) == sorted(f"batch={b.batch_id}" for b in held)
        assert all(";env=" in (e.detail or "") and e.before == e.after == "ready" for e in deferred)

        # hedui-gateway status shows them per unit, with the unit's signed reason.
        capsys.readouterr()
        assert gateway_main(["status", "--config", str(operator_config(tmp_path, world, database_url))]) == 0
        out = capsys.readouterr().out
        for unit_id in UNITS:
            n = len([b for b in held if b.unit_id == unit_id])
            items = sum(b.subject_count for b in held if b.unit_id == unit_id)
            assert (
                f"refused for now, retried: {n} batches/{items} items, permission_denied: approver_unknown (S-0003) "
                "(signed by the unit)"
            ) in out

        world.staff.enrol("S-0003")  # the roster that names S-0003 has reached the units
        world.clock.advance(3_600_000)
        settle(world)
        assert {(b.state, b.attempts, b.last_error) for b in batch_rows(world, waiting)} == {("acknowledged", 3, None)}
        assert_exactly_one_answer_per_item(world)
        assert AuditLog(world.store.engine).verify() == []


def test_refused_batches_show_and_are_sent_again_once_the_unit_registers_the_staff(
    tmp_path: Path, database_url: str | None, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """The on-call report: a unit that judges approvals by the migration rule (no roster of ours yet, unverified
    approvals allowed) and whose [[staff]] lacks one of ours refuses a commission's batches for good. The refusal's
    reason is kept and logged, hedui_batches_failed shows it while the unit stays up, and after the unit fixes its
    list ``hedui-gateway resend`` puts the batches back: everything is answered exactly once."""
    metrics = GatewayMetrics(CollectorRegistry())
    with gateway_world(tmp_path, now_ms=MONDAY, database_url=database_url, metrics=metrics) as world:
        for running in world.connectors.values():
            running.connector.approvals = ApprovalCheck(
                NoRosters(), legacy_staff={GATEWAY: frozenset({"S-0001", "S-0002"})}, allow_unverified=True
            )
        good = enqueue(world, "WT-OK", households=10)
        bad = enqueue(world, "WT-TYPO", households=30, start=10, staff=("S-0001", "S-0003"))
        with caplog.at_level(logging.INFO, logger="hedui"):
            settle(world)
        failed = batch_rows(world, bad)
        per_unit = {u: len([b for b in failed if b.unit_id == u]) for u in UNITS}
        assert failed and {(b.state, b.last_error) for b in failed} == {
            ("failed", "permission_denied: staff_not_registered")
        }
        refused = [r for r in caplog.records if r.getMessage() == "unit refused a batch"]
        assert {(r.__dict__["batch_id"], r.__dict__["reason"]) for r in refused} == {
            (b.batch_id, "staff_not_registered") for b in failed
        }
        assert {r.__dict__["status"] for r in refused} == {"permission_denied"}
        assert all("registered with this unit" in r.__dict__["detail"] for r in refused)
        id_numbers = [s.id_number for s in subjects_of(world.population, "WT-TYPO", 30, 10)]
        assert not any(n in caplog.text for n in id_numbers)
        for unit_id in UNITS:
            assert per_unit[unit_id] >= 2  # one is sent again by id, the rest by unit
            assert metrics.registry.get_sample_value("hedui_batches_failed", {"unit": unit_id}) == per_unit[unit_id]
            assert metrics.registry.get_sample_value("hedui_unit_up", {"unit": unit_id}) == 1
            assert metrics.registry.get_sample_value("hedui_outbox_depth", {"unit": unit_id}) == 0

        config = operator_config(tmp_path, world, database_url)
        audit = AuditLog(world.store.engine)
        # Each refusal is in the audit chain (clause 17), with the unit's status and reason code.
        exchanged = audit.entries()
        # The units signed their refusals: each entry names the signed refusal kept in the archive.
        refusals = [(e.actor, (e.detail or "").split(";env=")[0]) for e in exchanged if e.action == "batch.refused"]
        assert sorted(refusals) == sorted(
            (b.unit_id, f"batch={b.batch_id};items={b.subject_count};status=permission_denied;"
             "reason=staff_not_registered") for b in failed
        )  # fmt: skip

        def resend(*args: str) -> int:
            return gateway_main(["resend", "--config", str(config), *args])

        def unchanged() -> None:
            assert [(b.batch_id, b.state) for b in batch_rows(world)] == before and audit.count() == len(exchanged)

        # Refusals change nothing: a unit not in the config, a malformed id (not repeated), another unit's batch,
        # a batch that is not failed, an unknown batch.
        before = [(b.batch_id, b.state) for b in batch_rows(world)]
        tax_failed = [b.batch_id for b in failed if b.unit_id == TAX]
        capsys.readouterr()
        assert resend("--unit", "unit.220100.housing") == 1
        assert "unit.220100.housing is not a unit in [[units]]" in capsys.readouterr().err
        assert resend("--unit", TAX, "--batch", id_numbers[0]) == 1
        assert id_numbers[0] not in (err := capsys.readouterr().err) and "B and 32 hex digits" in err
        land_batch = next(b.batch_id for b in failed if b.unit_id == LAND)
        good_batch = next(b.batch_id for b in batch_rows(world, good) if b.unit_id == TAX)
        unknown = "B" + "0" * 32
        assert resend("--unit", TAX, "--batch", tax_failed[0], "--batch", land_batch, "--batch", good_batch) == 1
        err = capsys.readouterr().err
        assert f"{land_batch}: a batch of {LAND}" in err and f"{good_batch}: acknowledged, not failed" in err
        assert resend("--unit", TAX, "--batch", unknown) == 1
        assert f"{unknown}: no such batch" in capsys.readouterr().err
        unchanged()

        # The units fix their [[staff]] (and restart); the operator sends the batches again: one by id, the rest
        # per unit. The units' health and backoff are not touched.
        for running in world.connectors.values():
            running.connector.approvals = dataclasses.replace(
                running.connector.approvals, legacy_staff={GATEWAY: frozenset({"S-0001", "S-0002", "S-0003"})}
            )
        health = [(u.unit_id, u.consecutive_failures, u.next_attempt_ms) for u in world.store.units.all()]
        assert resend("--unit", TAX, "--batch", tax_failed[0]) == 0
        assert "re-queued 1 batches" in capsys.readouterr().out
        for unit_id in UNITS:
            assert resend("--unit", unit_id) == 0
            out = capsys.readouterr().out
            count = per_unit[unit_id] - (1 if unit_id == TAX else 0)
            assert f"re-queued {count} batches" in out and "permission_denied: staff_not_registered" in out
        assert resend("--unit", TAX) == 0
        assert f"{TAX} has no failed batches; nothing was re-queued" in capsys.readouterr().out
        assert [(u.unit_id, u.consecutive_failures, u.next_attempt_ms) for u in world.store.units.all()] == health
        assert {(b.state, b.attempts) for b in batch_rows(world, bad)} == {("ready", 1)}
        entries = [e for e in audit.entries(after_seq=len(exchanged)) if not e.action.startswith("batch.sent")]
        assert sorted(e.detail.split(";")[1] for e in entries if e.detail) == sorted(
            f"batch={b.batch_id}" for b in failed
        )
        assert {(e.action, e.before, e.after, e.commission_id) for e in entries} == {
            ("batch.resend", "failed", "ready", bad)
        }
        assert all(e.actor.startswith("operator") for e in entries) and audit.verify() == []
        for unit_id in UNITS:
            assert metrics.registry.get_sample_value("hedui_batches_failed", {"unit": unit_id}) == 0

        settle(world)
        assert {(b.state, b.attempts, b.last_error) for b in batch_rows(world, bad)} == {("acknowledged", 2, None)}
        assert {k for stages in world.store.outbox.progress(bad).values() for k in stages} == {"answered"}
        assert world.store.batches.answer_count() == world.store.outbox.item_count()
        assert_exactly_one_answer_per_item(world)
        for unit_id in UNITS:
            accepted = audit_batches(world, unit_id, "accepted")
            assert set(accepted.values()) == {1}
            assert {b.batch_id for b in failed if b.unit_id == unit_id} <= set(accepted)


class ForeignReplies(UnitClient):
    """A misrouting relay in front of a unit: submits pass, but every fetch is answered with a genuine, correctly
    signed answer set of ``source``'s to a request the relay sealed itself, not to the gateway's own request."""

    def __init__(self, endpoint: str, tls: ClientTls, *, source: UnitClient, seal: Callable[[], bytes]) -> None:
        super().__init__(endpoint, tls, timeout_seconds=5)
        self.source, self.seal = source, seal
        self.replies: list[bytes] = []

    def fetch(self, envelope: bytes) -> bytes:
        reply = self.source.fetch(self.seal())
        self.replies.append(reply)
        return reply


@pytest.mark.parametrize("source", ["another unit", "the same unit"])
def test_a_reply_to_another_request_is_not_believed(
    tmp_path: Path, database_url: str | None, caplog: pytest.LogCaptureFixture, source: str
) -> None:
    """The envelope must prove by itself what it answers (TLS is not trusted for that, docs/envelope.md): an answer
    set from another unit, or from the bank but to another request, is refused, not archived, and the bank's
    batches are simply fetched again once the relay is gone."""
    with gateway_world(tmp_path, now_ms=MONDAY, database_url=database_url) as world, ExitStack() as stack:
        enqueue(world, "WT-RELAY", households=20)
        courier, tls = world.engine.courier, gateway_tls(world)
        signer = TAX if source == "another unit" else BANK

        def batch_ids(unit_id: str) -> list[str]:
            return [b.batch_id for b in batch_rows(world) if b.unit_id == unit_id][:100]

        endpoint = f"localhost:{world.connectors[BANK].port}"
        relay = ForeignReplies(
            endpoint,
            tls,
            source=UnitClient(f"localhost:{world.connectors[signer].port}", tls, timeout_seconds=5),
            seal=lambda: courier.seal(exchange_pb2.FetchAnswers(batch_ids=batch_ids(signer)), signer),
        )
        stack.callback(relay.source.close)
        replace_client(world, BANK, relay, stack)
        with caplog.at_level(logging.ERROR, logger="hedui"):
            settle(world)
        assert relay.replies
        rejected = [r for r in caplog.records if r.getMessage() == "answer set rejected"]
        assert rejected and {(r.__dict__["unit"], r.__dict__["reason"]) for r in rejected} == {(BANK, "AnswerMismatch")}
        archived = {bytes(r.message_id) for r in rows(world, select(schema.archive.c.message_id))}
        assert not archived & {message_id_of(reply) for reply in relay.replies}
        assert {b.state for b in batch_rows(world) if b.unit_id == BANK} == {"receipted"}

        replace_client(world, BANK, UnitClient(endpoint, tls, timeout_seconds=5), stack)
        world.clock.advance(3_600_000)
        settle(world)
        assert {b.state for b in batch_rows(world)} == {"acknowledged"}
        assert_exactly_one_answer_per_item(world)
