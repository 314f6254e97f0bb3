"""Unit health, on SQLite and PostgreSQL, with real connectors over mutual TLS: idle units are probed with the
standard gRPC health check, so a unit nobody calls still shows down; ``hedui-gateway retry`` ends a backoff at once
and ``status`` says why a unit is down and when it is tried next; an error inside a unit's cycle is counted; and a
refusal is classified by the connector's reason code (permanent ones fail the batch, transient ones back off)."""

from __future__ import annotations

import datetime as dt
import logging
import time
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from common.workdays import Deadline
from connectors.errors import Refusal
from connectors.metrics import ConnectorMetrics
from gateway.archive.audit import AuditLog
from gateway.cli import CHINA_TIME
from gateway.cli import main as gateway_main
from gateway.exchange.outbox import SubjectInput
from gateway.exchange.transport import (
    DEFERRED_REASONS,
    PERMANENT_REASONS,
    ClientTls,
    UnitClient,
    is_transient,
    reason_label,
)
from gateway.metrics import GatewayMetrics
from keys.tls import issue_certificate
from tests.exchange_world import GATEWAY, beijing_ms
from tests.gateway_drive import (
    BANK,
    LAND,
    TAX,
    batch_rows,
    bring_up,
    enqueue,
    operator_config,
    replace_client,
    settle,
    unit_row,
)
from tests.gateway_world import UNITS, GatewayWorld, commission_input, gateway_settings, gateway_world, subjects_of

MONDAY = beijing_ms(2026, 3, 2)
PROBE_MS = 300_000
BASE_MS = 1_000


def _up(metrics: GatewayMetrics, unit_id: str) -> float | None:
    return metrics.registry.get_sample_value("hedui_unit_up", {"unit": unit_id})


def _health_checks(metrics: ConnectorMetrics) -> float:
    """Health checks the connector answered."""
    labels = {"service": "grpc.health.v1.Health", "method": "Check", "code": "OK"}
    return metrics.registry.get_sample_value("hedui_grpc_server_requests_total", labels) or 0.0


def _messages(caplog: pytest.LogCaptureFixture, message: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == message]


def test_an_idle_unit_is_probed_and_goes_down_and_up_with_its_connector(
    tmp_path: Path, database_url: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    """No commission at all, so no exchange call: the health probe alone keeps hedui_unit_up true. The bank's
    connector stops; within one probe interval the bank shows down (the others stay up), is not probed again
    before its backoff ends, and shows up again, with a "unit reachable again" line, once its connector is back."""
    metrics = GatewayMetrics(CollectorRegistry())
    unit_metrics = {u: ConnectorMetrics(CollectorRegistry()) for u in UNITS}
    settings = gateway_settings(base_backoff_ms=BASE_MS, probe_interval_ms=PROBE_MS)
    with ExitStack() as stack:
        world = stack.enter_context(
            gateway_world(
                tmp_path,
                now_ms=MONDAY,
                database_url=database_url,
                settings=settings,
                metrics=metrics,
                unit_metrics=unit_metrics,
            )
        )
        # A unit never reached yet is probed in its first cycle; then not again within the interval.
        reports = world.workers.run_once(dispatch=False)
        assert {(r.unit_id, r.probed, r.error) for r in reports} == {(u, True, None) for u in UNITS}
        assert {u: _up(metrics, u) for u in UNITS} == dict.fromkeys(UNITS, 1.0)
        assert {unit_row(world, u).last_success_ms for u in UNITS} == {MONDAY}
        world.clock.advance(PROBE_MS - 1)
        assert not any(r.probed for r in world.workers.run_once(dispatch=True))
        assert {u: _health_checks(m) for u, m in unit_metrics.items()} == dict.fromkeys(UNITS, 1.0)

        world.connectors[BANK].stop(None)
        stopped_at = world.clock.now_ms()
        world.clock.set(MONDAY + PROBE_MS)
        with caplog.at_level(logging.INFO, logger="hedui"):
            reports = world.workers.run_once(dispatch=False)
        assert world.clock.now_ms() - stopped_at <= PROBE_MS
        assert {r.unit_id: r.error for r in reports} == {TAX: None, LAND: None, BANK: "unavailable"}
        assert {u: _up(metrics, u) for u in UNITS} == {TAX: 1.0, LAND: 1.0, BANK: 0.0}
        assert metrics.registry.get_sample_value("hedui_unit_retries_total", {"unit": BANK}) == 1
        bank = unit_row(world, BANK)
        assert (bank.consecutive_failures, bank.last_error, bank.last_success_ms) == (1, "unavailable", MONDAY)
        assert MONDAY + PROBE_MS + BASE_MS // 2 <= bank.next_attempt_ms <= MONDAY + PROBE_MS + BASE_MS
        [line] = _messages(caplog, "unit unreachable; backing off")
        assert (line.__dict__["unit"], line.__dict__["call"], line.__dict__["status"]) == (
            BANK,
            "health_check",
            "unavailable",
        )

        # Backoff is respected: no probe before the next attempt time, one at it.
        world.clock.set(bank.next_attempt_ms - 1)
        assert not any(r.probed for r in world.workers.run_once(dispatch=False))
        assert unit_row(world, BANK).consecutive_failures == 1
        world.clock.set(bank.next_attempt_ms)
        assert [r.error for r in world.workers.run_once(dispatch=False) if r.unit_id == BANK] == ["unavailable"]
        assert unit_row(world, BANK).consecutive_failures == 2

        # The connector is back: the next attempt probes it, and the unit is up again.
        running = bring_up(world, BANK, stack)
        caplog.clear()
        world.clock.set(unit_row(world, BANK).next_attempt_ms)
        with caplog.at_level(logging.INFO, logger="hedui"):
            reports = world.workers.run_once(dispatch=False)
        assert [(r.probed, r.error) for r in reports if r.unit_id == BANK] == [(True, None)]
        assert {u: _up(metrics, u) for u in UNITS} == dict.fromkeys(UNITS, 1.0)
        bank = unit_row(world, BANK)
        assert (bank.consecutive_failures, bank.next_attempt_ms, bank.last_error) == (0, 0, None)
        assert bank.last_success_ms == world.clock.now_ms()
        [again] = _messages(caplog, "unit reachable again")
        assert again.__dict__["unit"] == BANK and again.__dict__["failures"] == 2
        assert again.__dict__["down_seconds"] == round((world.clock.now_ms() - MONDAY) / 1000)
        assert again.__dict__["last_error"] == "unavailable"
        assert running.connector.store.batch_count() == 0  # a probe sends no batch


def _expired_client(world: GatewayWorld) -> ClientTls:
    """The gateway's client certificate as it was in the on-call report: expired (issued 400 days ago for 30)."""
    cert, key = issue_certificate(
        world.pki.ca_cert,
        world.pki.ca_key,
        GATEWAY,
        client=True,
        server=False,
        valid_days=30,
        now=dt.datetime.now(dt.UTC) - dt.timedelta(days=400),
    )
    return ClientTls(cert, key, world.pki.ca_cert)


def test_an_expired_client_certificate_takes_idle_units_down_too_and_retry_brings_them_back(
    tmp_path: Path, database_url: str | None, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """The on-call report: with the gateway's client certificate expired, the units being called went down, the
    idle one stayed "ok", and HeduiAllUnitsUnreachable (every unit_up 0) could not fire. Now the idle units are
    probed over the same mutual TLS and go down as well. After the certificate is fixed, ``hedui-gateway retry
    --all`` ends the (long) backoff at once, and ``status`` shows the reason, the next attempt and the last success
    in Beijing time."""
    metrics = GatewayMetrics(CollectorRegistry())
    settings = gateway_settings(base_backoff_ms=600_000, probe_interval_ms=PROBE_MS)
    with ExitStack() as stack:
        world = stack.enter_context(
            gateway_world(tmp_path, now_ms=MONDAY, database_url=database_url, settings=settings, metrics=metrics)
        )
        commission = enqueue(world, "WT-CERT", households=5)
        settle(world)  # the commission is answered by every unit; then every unit is idle
        good = {u.unit_id: u.endpoint for u in world.store.units.all()}
        expired = _expired_client(world)
        for unit_id, endpoint in good.items():
            replace_client(world, unit_id, UnitClient(endpoint, expired, timeout_seconds=5), stack)
        world.clock.advance(PROBE_MS)
        reports = world.workers.run_once(dispatch=False)
        assert {(r.unit_id, r.probed, r.error) for r in reports} == {(u, True, "unavailable") for u in UNITS}
        assert {u: _up(metrics, u) for u in UNITS} == dict.fromkeys(UNITS, 0.0)
        assert {k for stages in world.store.outbox.progress(commission).values() for k in stages} == {"answered"}

        # status: why, until when, and when the unit last answered (Beijing time).
        config = operator_config(tmp_path, world, database_url)
        later = int(time.time() * 1000) + 3_600_000
        world.store.units.failed(TAX, "unavailable", later)  # a second failure, tried an hour from now
        capsys.readouterr()
        assert gateway_main(["status", "--config", str(config)]) == 0
        out = capsys.readouterr().out
        moment = dt.datetime.fromtimestamp(later / 1000, CHINA_TIME).strftime("%Y-%m-%d %H:%M:%S")
        success = dt.datetime.fromtimestamp(MONDAY / 1000, CHINA_TIME).strftime("%Y-%m-%d %H:%M")
        assert "times are Beijing time" in out
        assert f"{TAX}" in out and "down: 2 failures, backing off" in out
        assert f"last error unavailable; next attempt {moment} ('hedui-gateway retry --unit {TAX}'" in out
        assert f"last success {success}" in out
        assert "down: 1 failure, tried again at the next cycle" in out  # land and bank: their backoff ended
        assert "acknowledged=" in out

        # The certificate is renewed: retry ends every backoff, audited; the next cycle reaches every unit.
        for unit_id, endpoint in good.items():
            replace_client(world, unit_id, UnitClient(endpoint, _renewed(world), timeout_seconds=5), stack)
        for unit_id in UNITS:
            world.store.units.failed(unit_id, "unavailable", later)
        assert not any(r.probed for r in world.workers.run_once(dispatch=False))  # backing off: not called
        health = {u.unit_id: u.consecutive_failures for u in world.store.units.all()}
        assert gateway_main(["retry", "--config", str(config), "--all"]) == 0
        out = capsys.readouterr().out
        assert "backoff ended for 3 units" in out and f"{BANK}  2 failures, last error unavailable" in out
        rows = world.store.units.all()
        assert {u.unit_id: (u.consecutive_failures, u.next_attempt_ms) for u in rows} == {
            u: (health[u], 0) for u in UNITS
        }  # failures kept as history: still down until a call succeeds
        assert {u: _up(metrics, u) for u in UNITS} == dict.fromkeys(UNITS, 0.0)
        # The exchange's own events are chain entries too (batch.*); the operator's are the unit.* ones.
        entries = [e for e in AuditLog(world.store.engine).entries() if e.action.startswith("unit.") and e.detail]
        assert sorted((e.action, e.before, e.after, (e.detail or "").split(";")[0]) for e in entries) == sorted(
            ("unit.retry", "backing_off", "retry_now", f"unit={u}") for u in UNITS
        )
        assert all(e.actor.startswith("operator") for e in entries)
        with caplog.at_level(logging.INFO, logger="hedui"):
            reports = world.workers.run_once(dispatch=False)
        assert {(r.unit_id, r.probed, r.error) for r in reports} == {(u, True, None) for u in UNITS}
        assert {u: _up(metrics, u) for u in UNITS} == dict.fromkeys(UNITS, 1.0)
        assert {r.__dict__["unit"] for r in _messages(caplog, "unit reachable again")} == set(UNITS)

        # Nothing to retry now; unknown or malformed units are refused and change nothing.
        count = AuditLog(world.store.engine).count()
        assert gateway_main(["retry", "--config", str(config), "--unit", TAX]) == 0
        assert f"{TAX} is not down; nothing to retry" in capsys.readouterr().out
        assert gateway_main(["retry", "--config", str(config), "--all"]) == 0
        assert "no unit is down; nothing to retry" in capsys.readouterr().out
        assert gateway_main(["retry", "--config", str(config), "--unit", "unit.220100.housing"]) == 1
        assert "unit.220100.housing is not a unit in [[units]]" in capsys.readouterr().err
        id_number = subjects_of(world.population, "WT-CERT", 1)[0].id_number
        assert gateway_main(["retry", "--config", str(config), "--unit", id_number]) == 1
        assert id_number not in capsys.readouterr().err
        with pytest.raises(SystemExit):
            gateway_main(["retry", "--config", str(config)])  # --unit or --all
        assert AuditLog(world.store.engine).count() == count


def _renewed(world: GatewayWorld) -> ClientTls:
    cert, key = issue_certificate(world.pki.ca_cert, world.pki.ca_key, GATEWAY, client=True, server=False)
    return ClientTls(cert, key, world.pki.ca_cert)


def test_a_unit_cycle_error_is_counted_and_the_unit_tried_again(
    tmp_path: Path, database_url: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected error inside a unit's cycle (here: the unit's category missing from the gateway's routing
    table, a gateway-side fault) is logged as "unit cycle failed" and counted in hedui_unit_cycle_errors_total;
    the other units go on and the unit is tried again at the next cycle."""
    metrics = GatewayMetrics(CollectorRegistry())
    with gateway_world(tmp_path, now_ms=MONDAY, database_url=database_url, metrics=metrics) as world:
        enqueue(world, "WT-BUG", households=5)
        world.store.units.sync(
            (u.unit_id, 0 if u.unit_id == LAND else u.category, u.endpoint, u.exchange_mode, u.enabled)
            for u in world.store.units.all()
        )
        with caplog.at_level(logging.ERROR, logger="hedui"):
            reports = world.workers.run_once(dispatch=True)
            world.workers.run_once(dispatch=True)
        assert {r.unit_id: r.error for r in reports} == {TAX: None, LAND: "internal", BANK: None}
        failed = _messages(caplog, "unit cycle failed")
        # Both failures are counted; the second line is held back (at most one a minute per unit).
        assert [r.__dict__["unit"] for r in failed] == [LAND] and all(r.exc_info for r in failed)
        errors = {u: metrics.registry.get_sample_value("hedui_unit_cycle_errors_total", {"unit": u}) for u in UNITS}
        assert errors == {TAX: 0.0, LAND: 2.0, BANK: 0.0}
        assert _up(metrics, LAND) == 1.0  # not the unit's fault: it is not marked down


def test_reason_codes_decide_over_the_status_and_the_status_decides_without_one() -> None:
    """FAILED_PRECONDITION and RESOURCE_EXHAUSTED carry permanent and transient causes alike."""
    code = grpc.StatusCode
    cases = {
        (code.FAILED_PRECONDITION, "no_authorisation"): False,
        (code.RESOURCE_EXHAUSTED, "batch_too_large"): False,
        (code.FAILED_PRECONDITION, "calendar_year_unknown"): True,
        (code.FAILED_PRECONDITION, "invalid_envelope"): True,  # expired in flight: a fresh envelope will do
        (code.UNAUTHENTICATED, "invalid_envelope"): True,
        (code.FAILED_PRECONDITION, None): True,  # a connector that sends no reason code
        (code.RESOURCE_EXHAUSTED, None): True,
        (code.UNAVAILABLE, None): True,
        (code.PERMISSION_DENIED, "staff_not_registered"): False,
        (code.INVALID_ARGUMENT, "invalid_envelope"): False,
        (code.PERMISSION_DENIED, None): False,
        # The unit's check of our staff's approvals: what does not verify never will (judged at approval time);
        # an approver it does not know yet is tried again per batch (UnitDeferral), never by backing the unit off.
        (code.PERMISSION_DENIED, "approval_signature_invalid"): False,
        (code.INVALID_ARGUMENT, "approval_proof_invalid"): False,
        (code.UNAVAILABLE, "approver_revoked"): False,
        (code.PERMISSION_DENIED, "approver_unknown"): False,
        (code.UNAVAILABLE, "approver_unknown"): False,
    }
    assert {case: is_transient(*case) for case in cases} == cases
    assert set(DEFERRED_REASONS) == {"approver_unknown"} and not DEFERRED_REASONS & PERMANENT_REASONS
    assert {reason_label(r) for r in ("approver_unknown", "something_new", None)} == {
        "approver_unknown",
        "other",
        "unspecified",
    }


def _unauthorised(subjects: list[SubjectInput]) -> list[SubjectInput]:
    return [SubjectInput(s.subject_ref, s.id_number, s.name, "", s.auth_digest) for s in subjects]


def test_permanent_refusals_fail_the_batch_and_the_unit_stays_up(
    tmp_path: Path, database_url: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch in which no subject carries an authorisation (no_authorisation, FAILED_PRECONDITION) and, at the
    bank, batches over its connector's max_subjects_per_batch (batch_too_large, RESOURCE_EXHAUSTED) are refused
    the same way every time: they fail with the reason kept, the unit is neither backed off nor marked down, and
    the other batches go through."""
    limit = 10
    metrics = GatewayMetrics(CollectorRegistry())
    with gateway_world(tmp_path, now_ms=MONDAY, database_url=database_url, metrics=metrics) as world:
        world.connectors[BANK].connector.max_subjects = limit
        unauthorised = _unauthorised(subjects_of(world.population, "WT-NOAUTH", 2)[:3])
        bad = world.enqueue(commission_input("WT-NOAUTH"), unauthorised, list(UNITS))
        large = enqueue(world, "WT-LARGE", households=20, start=2)
        with caplog.at_level(logging.INFO, logger="hedui"):
            settle(world)
        assert {(b.unit_id, b.state, b.last_error, b.attempts) for b in batch_rows(world, bad)} == {
            (u, "failed", "failed_precondition: no_authorisation", 1) for u in UNITS
        }
        large_batches = batch_rows(world, large)
        too_large = [b for b in large_batches if b.unit_id == BANK and b.subject_count > limit]
        assert too_large and {(b.state, b.last_error, b.attempts) for b in too_large} == {
            ("failed", "resource_exhausted: batch_too_large", 1)
        }
        assert {b.state for b in large_batches if b not in too_large} == {"acknowledged"}
        for unit_id in UNITS:
            unit = unit_row(world, unit_id)
            assert (unit.consecutive_failures, unit.next_attempt_ms, unit.last_error) == (0, 0, None)
            assert _up(metrics, unit_id) == 1.0
        refused = [(r.__dict__["unit"], r.__dict__["reason"]) for r in _messages(caplog, "unit refused a batch")]
        assert sorted(refused) == sorted(
            [(u, "no_authorisation") for u in UNITS] + [(BANK, "batch_too_large")] * len(too_large)
        )
        assert not _messages(caplog, "unit unreachable; backing off")
        failed = {u: metrics.registry.get_sample_value("hedui_batches_failed", {"unit": u}) for u in UNITS}
        assert failed == {TAX: 1.0, LAND: 1.0, BANK: 1.0 + len(too_large)}


def test_a_transient_refusal_backs_the_unit_off_with_its_reason(
    tmp_path: Path, database_url: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    """calendar_year_unknown (FAILED_PRECONDITION too), as a connector older than issue 10 sends it, is cured at
    the unit's end without touching the batch: the unit backs off with the reason shown, the batch waits ready,
    and it goes through once the unit has its calendar. (Connectors now receipt such batches with a provisional
    due date: tests/test_calendar_provisional.py.)"""
    settings = gateway_settings(base_backoff_ms=BASE_MS)
    with gateway_world(tmp_path, now_ms=MONDAY, database_url=database_url, settings=settings) as world:
        land_connector = world.connectors[LAND].connector

        def old_connector_due(received_at_ms: int) -> Deadline:
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, "no schedule for 2026", "calendar_year_unknown")

        land_connector._due = old_connector_due  # type: ignore[method-assign]
        enqueue(world, "WT-CAL", households=5)
        with caplog.at_level(logging.INFO, logger="hedui"):
            settle(world)
        land = unit_row(world, LAND)
        assert (land.consecutive_failures, land.last_error) == (1, "failed_precondition: calendar_year_unknown")
        assert {(b.state, b.last_error) for b in batch_rows(world) if b.unit_id == LAND} <= {
            ("ready", "transport"),
            ("ready", None),
        }
        [line] = _messages(caplog, "unit unreachable; backing off")
        assert (line.__dict__["reason"], line.__dict__["call"]) == ("calendar_year_unknown", "exchange")
        assert not _messages(caplog, "unit refused a batch")

        del land_connector._due  # the unit installed its calendar
        world.clock.set(land.next_attempt_ms)
        settle(world)
        assert {b.state for b in batch_rows(world)} == {"acknowledged"}
        assert unit_row(world, LAND).consecutive_failures == 0
