"""Metrics of the gateway and the connectors, read from fresh registries after real exchanges over mutual TLS:
per-unit volumes and latencies, delay notices, overdue items, a unit that is down, envelopes refused by reason,
scheduler jobs, API calls and approval feedback, key expiry; the HTTP endpoint, checked by ``promtool`` when the
machine has it; and the serving processes wired from their config files."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import date
from pathlib import Path

import grpc
import pytest
from hedui.v1 import agency_pb2, exchange_pb2, exchange_pb2_grpc, records_pb2
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, update

from common.db import make_engine
from common.metrics import MetricsSection, MetricsServer, serve_metrics, split_listen
from connectors import store as cstore
from connectors.config import ConnectorConfig, ConnectorMetricsSection
from connectors.metrics import ConnectorMetrics
from connectors.server import serve
from connectors.synthetic import Population
from demo.localnet import STAFF as NET_STAFF
from demo.localnet import build_network, free_port
from gateway.config import GatewayConfig
from gateway.db import schema
from gateway.db.database import open_database
from gateway.exchange.outbox import CommissionInput, SubjectInput
from gateway.exchange.schedule import GatewayScheduler, JobIntervals, SchedulePolicy
from gateway.exchange.store import GatewayStore
from gateway.exchange.transport import KNOWN_REASONS
from gateway.metrics import CSR_REFUSALS, GatewayMetrics
from gateway.procedure.routing import route
from gateway.server import build
from gateway.trust import GatewayKeys, TrustItems
from keys import keystore
from keys.clock import DAY_MS, FixedClock
from keys.errors import ENVELOPE_ERRORS, BadSignature, ReplayedEnvelope
from keys.fingerprint import Algorithm
from keys.identity import PartyKeys
from keys.keystore import FAST_FOR_TESTS
from keys.live import LiveKeystore, RotationPolicy
from keys.truststore import TrustStore
from tests.agency_world import agency_world, whole_procedure
from tests.exchange_world import GATEWAY, beijing_ms, enrol
from tests.gateway_drive import BANK, LAND, TAX, batch_rows, drain, rows, settle, unit_row
from tests.gateway_world import UNITS, GatewayWorld, gateway_world
from tests.test_agency import COMMISSIONER

MONDAY = beijing_ms(2026, 3, 2)
HOUR_MS = 3_600_000


class Metrics:
    """Fresh registries for the gateway and for each unit's connector."""

    def __init__(self) -> None:
        self.gateway = GatewayMetrics(CollectorRegistry())
        self.units = {unit_id: ConnectorMetrics(CollectorRegistry()) for unit_id in UNITS}

    def value(self, name: str, **labels: str) -> float | None:
        return self.gateway.registry.get_sample_value(name, labels)

    def unit_value(self, unit_id: str, name: str, **labels: str) -> float | None:
        return self.units[unit_id].registry.get_sample_value(name, labels)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def world(tmp_path: Path, metrics: Metrics) -> Iterator[GatewayWorld]:
    with gateway_world(tmp_path, now_ms=MONDAY, metrics=metrics.gateway, unit_metrics=metrics.units) as world:
        yield world


def _per_unit(world: GatewayWorld) -> tuple[dict[str, int], dict[str, int]]:
    """unit id -> (subjects in its batches), (number of its batches)."""
    subjects: dict[str, int] = dict.fromkeys(UNITS, 0)
    batches: dict[str, int] = dict.fromkeys(UNITS, 0)
    for batch in batch_rows(world):
        subjects[batch.unit_id] += batch.subject_count
        batches[batch.unit_id] += 1
    return subjects, batches


def test_an_exchange_is_counted_per_unit(world: GatewayWorld, metrics: Metrics) -> None:
    world.commission("WT-1", households=40)
    queued = world.store.outbox.item_count() // len(UNITS)
    for unit_id in UNITS:
        assert metrics.value("hedui_outbox_depth", unit=unit_id) == queued
        assert metrics.value("hedui_queries_sent_total", unit=unit_id) == 0  # present before the first event
        assert metrics.value("hedui_unit_up", unit=unit_id) == 1
        assert metrics.value("hedui_batches_failed", unit=unit_id) == 0
    assert metrics.value("hedui_commissions", state="exchanging") == 1
    assert metrics.value("hedui_commissions", state="received") == 0

    world.workers.run_once(dispatch=True)  # every batch sent and receipted; nothing answered yet
    subjects, batches = _per_unit(world)
    world.clock.advance(2 * HOUR_MS)  # the units answer two hours after receiving
    drain(world)
    settle(world)

    assert world.store.batches.answer_count() == world.store.outbox.item_count()
    for unit_id in UNITS:
        assert subjects[unit_id] == queued and batches[unit_id] > 1
        assert metrics.value("hedui_queries_sent_total", unit=unit_id) == queued
        assert metrics.value("hedui_queries_answered_total", unit=unit_id) == queued
        assert metrics.value("hedui_receipts_total", unit=unit_id) == batches[unit_id]
        assert metrics.value("hedui_batch_round_trip_seconds_count", unit=unit_id) == batches[unit_id]
        assert metrics.value("hedui_answer_latency_seconds_count", unit=unit_id) == batches[unit_id]
        assert metrics.value("hedui_answer_latency_seconds_sum", unit=unit_id) == 2 * 3600 * batches[unit_id]
        assert metrics.value("hedui_answer_latency_seconds_bucket", unit=unit_id, le="3600.0") == 0
        assert metrics.value("hedui_answer_latency_seconds_bucket", unit=unit_id, le="14400.0") == batches[unit_id]
        assert metrics.value("hedui_outbox_depth", unit=unit_id) == 0
        assert metrics.value("hedui_queries_overdue", unit=unit_id) == 0
        assert metrics.value("hedui_unit_up", unit=unit_id) == 1
        assert metrics.value("hedui_unit_retries_total", unit=unit_id) == 0

        # The unit's side of the same exchange.
        assert metrics.unit_value(unit_id, "hedui_connector_batches_received_total") == batches[unit_id]
        statuses = {s: metrics.unit_value(unit_id, "hedui_connector_subjects_answered_total", status=s) for s in (
            "found", "no_record", "name_mismatch", "invalid_id", "not_authorised")}  # fmt: skip
        assert sum(v or 0 for v in statuses.values()) == queued
        assert None not in statuses.values()
        assert metrics.unit_value(unit_id, "hedui_connector_pending_batches") == 0
        requests = {
            method: metrics.unit_value(
                unit_id,
                "hedui_grpc_server_requests_total",
                service="hedui.v1.ExchangeService",
                method=method,
                code="OK",
            )
            for method in ("SubmitBatch", "FetchAnswers", "AcknowledgeAnswers")
        }
        assert requests["SubmitBatch"] == batches[unit_id]
        assert (requests["FetchAnswers"] or 0) >= 1 and (requests["AcknowledgeAnswers"] or 0) >= 1
    for error in ENVELOPE_ERRORS:  # every reason exported, none happened
        assert metrics.value("hedui_envelope_rejections_total", reason=error.code) == 0
        assert metrics.unit_value(TAX, "hedui_envelope_rejections_total", reason=error.code) == 0


def _fake_notice(world: GatewayWorld, unit_id: str, batch_id: str, new_due: date) -> None:
    """A delay notice the connector's own code would refuse (beyond clause 12), written into its database."""
    connector = world.connectors[unit_id].connector
    with connector.store.engine.begin() as conn:
        conn.execute(
            update(cstore.batches)
            .where(cstore.batches.c.batch_id == batch_id)
            .values(due=new_due, delay_reason="volume", delay_issued_at_ms=connector.courier.clock.now_ms())
        )


def test_delay_notices_count_once_and_overdue_items_show(world: GatewayWorld, metrics: Metrics) -> None:
    world.commission("WT-1", households=10)
    world.workers.run_once(dispatch=True)
    ids = {b.unit_id: b.batch_id for b in batch_rows(world)}
    counts = {b.unit_id: b.subject_count for b in batch_rows(world)}
    assert metrics.unit_value(TAX, "hedui_connector_pending_batches") == 1
    world.clock.set(beijing_ms(2026, 3, 9))
    world.connectors[TAX].connector.issue_delay(ids[TAX], date(2026, 3, 16), "volume")
    _fake_notice(world, LAND, ids[LAND], date(2026, 3, 19))  # one working day more than clause 12 allows
    world.workers.run_once(dispatch=True)
    world.workers.run_once(dispatch=True)  # the units repeat their notices on every poll
    assert metrics.value("hedui_delay_notices_total", unit=TAX, accepted="true") == 1
    assert metrics.value("hedui_delay_notices_total", unit=TAX, accepted="false") == 0
    assert metrics.value("hedui_delay_notices_total", unit=LAND, accepted="false") == 1
    assert metrics.value("hedui_delay_notices_total", unit=BANK, accepted="true") == 0
    assert metrics.unit_value(TAX, "hedui_connector_delay_notices_total") == 1
    assert metrics.unit_value(LAND, "hedui_connector_delay_notices_total") == 0

    world.clock.set(beijing_ms(2026, 3, 12))  # past the original due date; the tax office's extension runs on
    world.engine.sweep_deadlines()
    assert metrics.value("hedui_queries_overdue", unit=TAX) == 0
    assert metrics.value("hedui_queries_overdue", unit=LAND) == counts[LAND]
    assert metrics.value("hedui_queries_overdue", unit=BANK) == counts[BANK]
    settle(world)
    assert {metrics.value("hedui_queries_overdue", unit=u) for u in UNITS} == {0}


def test_a_down_unit_shows_down_and_its_retries(tmp_path: Path, metrics: Metrics) -> None:
    with gateway_world(
        tmp_path, now_ms=MONDAY, metrics=metrics.gateway, down=frozenset({BANK}), unit_metrics=metrics.units
    ) as world:
        world.commission("WT-1", households=30)
        settle(world)
        per_unit = world.store.outbox.item_count() // len(UNITS)
        assert metrics.value("hedui_unit_up", unit=BANK) == 0
        assert metrics.value("hedui_unit_up", unit=TAX) == 1
        assert metrics.value("hedui_unit_retries_total", unit=BANK) == 1
        assert metrics.value("hedui_outbox_depth", unit=BANK) == per_unit  # formed and ready, not sent
        assert metrics.value("hedui_outbox_depth", unit=TAX) == 0
        for attempt in (2, 3):
            world.clock.set(unit_row(world, BANK).next_attempt_ms)
            world.workers.run_once(dispatch=True)
            assert metrics.value("hedui_unit_retries_total", unit=BANK) == attempt
        assert metrics.value("hedui_unit_retries_total", unit=TAX) == 0
        assert metrics.value("hedui_receipts_total", unit=BANK) == 0


def test_refused_envelopes_are_counted_by_reason(world: GatewayWorld, metrics: Metrics) -> None:
    world.commission("WT-1", households=10)
    settle(world)
    courier = world.engine.courier
    (receipt,) = rows(world, select(schema.batches.c.receipt_envelope).where(schema.batches.c.unit_id == TAX))
    with pytest.raises(ReplayedEnvelope):  # the gateway opened this receipt once already
        courier.open(receipt.receipt_envelope)
    forged = receipt.receipt_envelope[:-1] + bytes([receipt.receipt_envelope[-1] ^ 1])
    with pytest.raises(BadSignature):
        courier.open(forged)
    assert metrics.value("hedui_envelope_rejections_total", reason="replay") == 1
    assert metrics.value("hedui_envelope_rejections_total", reason="bad_signature") == 1
    assert metrics.value("hedui_envelope_rejections_total", reason="expired") == 0

    # At the unit: a forged batch is refused and counted as an envelope rejection; the approved subjects of a stored
    # batch sent under another batch id are refused as a replay of the approvals (a refusal, not a rejection).
    of_tax = select(schema.batch_contents.c.content).join(schema.batches).where(schema.batches.c.unit_id == TAX)
    (content,) = rows(world, of_tax.limit(1))
    batch = exchange_pb2.QueryBatch.FromString(content.content)
    batch.batch_id = "B-metrics-1"
    stub = exchange_pb2_grpc.ExchangeServiceStub(world.pki.channel(GATEWAY, world.connectors[TAX].port))
    sealed = courier.seal(batch, TAX)
    # The same approved subjects under another batch id: a replay of the approvals, refused and counted.
    with pytest.raises(grpc.RpcError) as replayed:
        stub.SubmitBatch(exchange_pb2.SealedMessage(envelope=sealed))
    assert replayed.value.code() == grpc.StatusCode.PERMISSION_DENIED
    bad = courier.seal(batch, TAX)
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.SubmitBatch(exchange_pb2.SealedMessage(envelope=bad[:-1] + bytes([bad[-1] ^ 1])))
    assert excinfo.value.code() == grpc.StatusCode.UNAUTHENTICATED
    unit = metrics.units[TAX].registry
    assert unit.get_sample_value("hedui_envelope_rejections_total", {"reason": "bad_signature"}) == 1
    assert unit.get_sample_value("hedui_envelope_rejections_total", {"reason": "replay"}) == 0
    assert unit.get_sample_value("hedui_connector_refusals_total", {"reason": "envelope_bad_signature"}) == 1
    submit = {"service": "hedui.v1.ExchangeService", "method": "SubmitBatch"}
    assert unit.get_sample_value("hedui_grpc_server_requests_total", {**submit, "code": "UNAUTHENTICATED"}) == 1
    _, batches = _per_unit(world)
    assert unit.get_sample_value("hedui_grpc_server_requests_total", {**submit, "code": "OK"}) == batches[TAX]
    assert unit.get_sample_value("hedui_grpc_server_requests_total", {**submit, "code": "PERMISSION_DENIED"}) == 1
    assert unit.get_sample_value("hedui_connector_refusals_total", {"reason": "subject_already_queried"}) == 1
    assert unit.get_sample_value("hedui_connector_batches_received_total") == batches[TAX]


def test_scheduler_jobs_count_runs_failures_and_skips(world: GatewayWorld, metrics: Metrics) -> None:
    def broken() -> None:
        raise RuntimeError("the job failed")

    scheduler = GatewayScheduler(
        store=world.store,
        engine=world.engine,
        workers=world.workers,
        policy=SchedulePolicy("continuous"),
        intervals=JobIntervals(),
        clock=world.clock,
        replica="test-1",
        lease_ms=60_000,
        key_check=broken,
        metrics=metrics.gateway,
    )
    assert scheduler.run_job("deadline-sweep", scheduler.sweep)
    assert scheduler.run_job("key-expiry", lambda: None)
    assert scheduler.run_job("key-expiry", broken)
    assert world.store.jobs.acquire("dispatch", "gateway-2", world.clock.now_ms(), 60_000)
    assert not scheduler.run_job("dispatch", scheduler.dispatch)  # another replica holds the lease
    jobs = "hedui_scheduler_job_runs_total"
    assert metrics.value(jobs, task="deadline-sweep", outcome="ok") == 1
    assert metrics.value(jobs, task="key-expiry", outcome="ok") == 1
    assert metrics.value(jobs, task="key-expiry", outcome="failed") == 1
    assert metrics.value(jobs, task="dispatch", outcome="skipped") == 1
    assert metrics.value(jobs, task="dispatch", outcome="ok") == 0
    assert metrics.value(jobs, task="poll", outcome="failed") == 0


def test_api_calls_and_approval_feedback_are_counted(tmp_path: Path) -> None:
    """The agency API with metrics: every call by method and status (refused ones too), feedback by decision,
    commissions by state."""
    metrics = GatewayMetrics(CollectorRegistry())
    with agency_world(tmp_path, metrics=metrics) as agency:
        with pytest.raises(grpc.RpcError):
            agency.stub("agency.999999").GetCommission(agency_pb2.CommissionRef(commission_id="C0123456789abcdef"))
        with pytest.raises(grpc.RpcError):
            agency.stub(COMMISSIONER).RecordIntake(agency_pb2.StaffDecision(commission_id="C0", staff_id="S-0001"))
        whole_procedure(agency, households=3)

    def calls(method: str, code: str) -> float | None:
        labels = {"service": "hedui.v1.AgencyService", "method": method, "code": code}
        return metrics.registry.get_sample_value("hedui_grpc_server_requests_total", labels)

    assert calls("GetCommission", "UNAUTHENTICATED") == 1
    assert calls("RecordIntake", "PERMISSION_DENIED") == 1
    assert calls("SubmitCommission", "OK") == 1
    assert calls("ApproveExchange", "OK") == 2
    assert calls("SubmitApprovalFeedback", "OK") == 1
    feedback = "hedui_approval_feedback_total"
    assert metrics.registry.get_sample_value(feedback, {"decision": "approved"}) == 1
    assert metrics.registry.get_sample_value(feedback, {"decision": "refused"}) == 1
    assert metrics.registry.get_sample_value(feedback, {"decision": "withdrawn"}) == 0
    assert metrics.registry.get_sample_value("hedui_commissions", {"state": "report_issued"}) == 1
    assert metrics.registry.get_sample_value("hedui_commissions", {"state": "received"}) == 0


def test_days_until_retiring_keys_end(tmp_path: Path) -> None:
    clock = FixedClock(MONDAY)
    ours = PartyKeys.create(GATEWAY, now_ms=MONDAY - 1)
    trust = TrustStore()
    unit = (PartyKeys.create(TAX, now_ms=MONDAY - 1), TrustStore())
    enrol((ours, trust), unit, MONDAY)
    passphrase = tmp_path / "passphrase"
    passphrase.write_text("a passphrase of the test\n")
    passphrase.chmod(0o600)
    keystore.save(tmp_path / "keystore.json", ours, trust, "a passphrase of the test", kdf=FAST_FOR_TESTS)
    live = LiveKeystore.open(tmp_path / "keystore.json", passphrase, clock=clock)
    engine = open_database(f"sqlite:///{tmp_path / 'gateway.db'}", migrate=True)
    policy = RotationPolicy(agreement_ms=30 * DAY_MS, signing_ms=180 * DAY_MS, lead_ms=DAY_MS, overlap_ms=14 * DAY_MS)
    keys = GatewayKeys(live, TrustItems(engine), [TAX], policy)
    metrics = GatewayMetrics(CollectorRegistry())
    metrics.watch_keys(keys.retiring)
    metrics.trust.watch_keys(
        lambda: [
            (r.party, r.key_id, r.algorithm.name.lower(), r.owner, r.days_left, r.rotation_due_days)
            for r in keys.expiries()
        ]
    )
    expiry = metrics.registry.get_sample_value
    assert expiry("hedui_key_expiry_seconds", {"party": GATEWAY, "algorithm": "ed25519"}) is None
    own_signing = ours.current(Algorithm.ED25519, MONDAY)
    assert own_signing is not None
    labels = {"party": GATEWAY, "key": own_signing.key_id.hex(), "algorithm": "ed25519", "owner": "own"}
    assert expiry("hedui_key_expiry_days", labels) == float("inf")  # in use, no end yet
    # Due 180 days after it took over, less the lead of a day.
    assert expiry("hedui_key_rotation_due_days", {"party": GATEWAY, "algorithm": "ed25519"}) == pytest.approx(179)

    live.change(lambda party, _: party.rotate(Algorithm.ED25519, now_ms=MONDAY, overlap_ms=14 * DAY_MS))
    live.apply_announcement(unit[0].rotate(Algorithm.X25519, now_ms=MONDAY, overlap_ms=7 * DAY_MS), now_ms=MONDAY)
    clock.advance(DAY_MS // 2)

    def days(party: str, algorithm: str) -> float | None:
        seconds = expiry("hedui_key_expiry_seconds", {"party": party, "algorithm": algorithm})
        return None if seconds is None else seconds / 86_400

    assert days(GATEWAY, "ed25519") == 13.5
    assert days(TAX, "x25519") == 6.5
    assert days(GATEWAY, "x25519") is None and days(TAX, "ed25519") is None  # open-ended active keys
    assert expiry("hedui_key_expiry_days", labels) == 13.5  # the old key, retiring
    old_tax = {"party": TAX, "algorithm": "x25519", "owner": "peer"}
    tax_days = [
        m.value
        for family in metrics.registry.collect()
        if family.name == "hedui_key_expiry_days"
        for m in family.samples
        if all(m.labels[k] == v for k, v in old_tax.items())
    ]
    assert sorted(tax_days) == [6.5, float("inf")]  # the retiring key and its successor
    # Our rotation was saved in the keystore and published for the unit.
    saved, _ = keystore.load(tmp_path / "keystore.json", "a passphrase of the test")
    assert len([r for r in saved.records() if r.algorithm is Algorithm.ED25519]) == 2
    assert [d.peer for d in TrustItems(engine).deliveries()] == [TAX]


def _scrape(port: int) -> tuple[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.headers["Content-Type"], response.read().decode()


def _exposition(tmp_path: Path) -> str:
    """What the gateway serves after an exchange in which one unit was down and one envelope was refused."""
    metrics = Metrics()
    with gateway_world(
        tmp_path, now_ms=MONDAY, metrics=metrics.gateway, unit_metrics=metrics.units, down=frozenset({BANK})
    ) as world:
        world.commission("WT-1", households=20)
        settle(world)
        metrics.gateway.watch_keys(lambda: [(GATEWAY, "ed25519", 13.5)])
        with pytest.raises(ReplayedEnvelope):
            world.engine.courier.open(
                rows(world, select(schema.archive.c.envelope).where(schema.archive.c.direction == "in").limit(1))[
                    0
                ].envelope
            )
        server = serve_metrics(f"127.0.0.1:{free_port()}", metrics.gateway.registry)
        assert server is not None
        try:
            content_type, text = _scrape(server.port)
        finally:
            server.stop()
        assert content_type.startswith("text/plain")
        people = [m for h in world.population.households(20) for m in h.members]
        for person in people:  # no personal data anywhere in the exposition
            assert person.id_number not in text and person.name not in text
        assert not re.search(r"B[0-9a-f]{32}", text)  # nor batch ids
        return text


def test_the_endpoint_serves_every_metric_with_fixed_label_values(tmp_path: Path) -> None:
    text = _exposition(tmp_path)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    expected = {
        "hedui_queries_sent", "hedui_queries_answered", "hedui_queries_overdue", "hedui_batch_round_trip_seconds",
        "hedui_answer_latency_seconds", "hedui_receipts", "hedui_delay_notices", "hedui_envelope_rejections",
        "hedui_unit_retries", "hedui_unit_up", "hedui_outbox_depth", "hedui_key_expiry_seconds",
        "hedui_scheduler_job_runs", "hedui_grpc_server_requests", "hedui_commissions", "hedui_approval_feedback",
        "hedui_batches_failed", "hedui_unit_refusals",
    }  # fmt: skip
    assert expected <= set(families)
    allowed = {
        "unit": set(UNITS),
        # Envelope failures; the units' refusal codes (a fixed list, anything else is "other").
        "reason": {e.code for e in ENVELOPE_ERRORS} | KNOWN_REASONS | {"other", "unspecified"} | set(CSR_REFUSALS),
        "accepted": {"true", "false"},
        "decision": {"approved", "refused", "withdrawn"},
    }
    for family in families.values():
        for sample in family.samples:
            for label, value in sample.labels.items():
                assert value in allowed.get(label, {value}), (sample.name, label, value)
    up = {s.labels["unit"]: s.value for s in families["hedui_unit_up"].samples}
    assert up == {TAX: 1.0, LAND: 1.0, BANK: 0.0}
    assert families["hedui_envelope_rejections"].type == "counter"
    assert families["hedui_answer_latency_seconds"].type == "histogram"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package 'prometheus')")
def test_promtool_accepts_the_exposition(tmp_path: Path) -> None:
    text = _exposition(tmp_path)
    promtool = shutil.which("promtool")
    assert promtool is not None
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False)
    problems = {line.strip() for line in (result.stdout + result.stderr).splitlines() if line.strip()}
    # Key expiry is counted in days on purpose (operators rotate keys by the day; the alert rules and dashboard
    # use this name); promtool's base-unit lint would want seconds. Nothing else may be reported.
    assert not problems, problems
    assert result.returncode == 0 or problems


def test_metrics_listen_is_checked() -> None:
    assert split_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert split_listen("[::1]:9464") == ("::1", 9464)
    assert MetricsSection(listen="").listen == ""
    for wrong in ("9464", "localhost", "127.0.0.1:99999", ":9464"):
        with pytest.raises(ValueError):
            MetricsSection(listen=wrong)
        with pytest.raises(ValueError):
            ConnectorMetricsSection(listen=wrong)
    # The two services' defaults differ, so both fit on one host.
    assert (MetricsSection().listen, ConnectorMetricsSection().listen) == ("127.0.0.1:9464", "127.0.0.1:9465")


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def _sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def test_serving_gateway_and_connectors_export_metrics_on_their_configured_ports(tmp_path: Path) -> None:
    """``build`` and ``serve`` from the files localnet writes: each endpoint on its own port, filled by a real
    exchange between the serving gateway and connectors."""
    units = {TAX: "tax", LAND: "land"}
    net = build_network(tmp_path / "net", units, batch_size=50, kdf=FAST_FOR_TESTS, legacy_staff=True)
    assert len({net.gateway_metrics_port, *net.connector_metrics_ports.values()}) == 3
    with ExitStack() as stack:
        for config in net.connector_configs.values():
            stack.callback(serve(ConnectorConfig.load(config)).stop)
        gateway = build(GatewayConfig.load(net.gateway_config))
        stack.callback(gateway.stop)
        assert isinstance(gateway.metrics_server, MetricsServer)
        store = GatewayStore(make_engine(f"sqlite:///{tmp_path / 'net' / 'data' / 'gateway.db'}"))
        stack.callback(store.engine.dispose)
        people = [m for h in Population(20261127).households(15) for m in h.members]
        subjects = [
            SubjectInput(f"P-{i}", m.id_number, m.name, f"A-{i}", hashlib.sha256(m.id_number.encode()).digest())
            for i, m in enumerate(people)
        ]
        categories = (records_pb2.DATA_CATEGORY_TAX, records_pb2.DATA_CATEGORY_REAL_ESTATE)
        commission = CommissionInput(
            ref="WT-M-1",
            purpose=exchange_pb2.PROGRAMME_MINIMUM_LIVING_ALLOWANCE,
            income_from=(2026, 1),
            income_to=(2026, 6),
            assets_as_of=date(2026, 6, 30),
            staff_ids=NET_STAFF,
            categories=categories,
        )
        now = int(time.time() * 1000)
        store.outbox.enqueue(commission, subjects, route(categories, store.units.all()), now, gateway=net.gateway_party)
        assert _wait(lambda: store.batches.answer_count() == len(subjects) * len(units), 60)

        def answered() -> bool:
            text = _scrape(net.gateway_metrics_port)[1]
            return all(_sample(text, "hedui_queries_answered_total", unit=u) == len(subjects) for u in units)

        assert _wait(answered, 20)
        text = _scrape(net.gateway_metrics_port)[1]
        assert (_sample(text, "hedui_scheduler_job_runs_total", task="dispatch", outcome="ok") or 0) >= 1
        assert _sample(text, "hedui_unit_up", unit=TAX) == 1
        assert _sample(text, "process_cpu_seconds_total") is not None
        for unit_id in units:
            unit_text = _scrape(net.connector_metrics_ports[unit_id])[1]
            ok = _sample(
                unit_text,
                "hedui_grpc_server_requests_total",
                service="hedui.v1.ExchangeService",
                method="SubmitBatch",
                code="OK",
            )
            assert ok is not None and ok >= 1
            assert (_sample(unit_text, "hedui_connector_batches_received_total") or 0) >= 1
            assert _sample(unit_text, "hedui_connector_pending_batches") is not None
    for port in (net.gateway_metrics_port, *net.connector_metrics_ports.values()):  # stopped with the services
        with pytest.raises(OSError):
            _scrape(port)
