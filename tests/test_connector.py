"""The sharing unit's connector over real mutual TLS on loopback, with real envelopes and a real SQLite store."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from datetime import date
from pathlib import Path

import grpc
import pytest
from hedui.v1 import exchange_pb2, exchange_pb2_grpc, records_pb2
from prometheus_client import CollectorRegistry

from common.rpc import REFUSAL_REASON_KEY
from connectors.adapters.base import AdapterError, Finding, LookupContext
from connectors.connector import ANSWER_RETRY_BASE_MS
from connectors.errors import DelayRefused
from connectors.metrics import ConnectorMetrics
from connectors.synthetic import Population, SyntheticAdapter
from keys.announcements import read_bundle
from keys.envelope import Courier
from keys.identity import PartyKeys
from keys.keyring import KeyState
from keys.replay import MemoryReplayCache
from keys.truststore import TrustStore
from tests.exchange_world import GATEWAY, SEED, UNIT, World, beijing_ms, enrol, exchange_world

MONDAY = beijing_ms(2026, 3, 2)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with exchange_world(tmp_path, now_ms=MONDAY) as w:
        yield w


def _date(d: records_pb2.Date) -> date:
    return date(d.year, d.month, d.day)


def _code(excinfo: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return excinfo.value.code()


def _sent_reason(excinfo: pytest.ExceptionInfo[grpc.RpcError]) -> list[str | bytes]:
    """The reason codes the connector sent with the status (trailing metadata, docs/exchange.md "Refusals")."""
    return [m.value for m in excinfo.value.trailing_metadata() or () if m.key == REFUSAL_REASON_KEY]


# -- receipts and deadlines ----------------------------------------------------------------------------------------


def test_receipt_is_signed_and_due_in_seven_working_days(world: World) -> None:
    batch = world.batch("B-1", world.subjects(5))
    receipt = world.submit(batch)
    assert receipt.batch_id == "B-1"
    assert receipt.subject_count == 5
    assert receipt.received_at_ms == MONDAY
    assert receipt.batch_digest == hashlib.sha256(batch.SerializeToString(deterministic=True)).digest()
    # Monday 2 March 2026 + 7 working days = Wednesday 11 March.
    assert _date(receipt.due_date) == date(2026, 3, 11)


def test_due_date_across_spring_festival_counts_adjusted_working_saturday(tmp_path: Path) -> None:
    # Received Thursday 12 Feb 2026: Fri 13, Sat 14 (调休 working day), then the holiday 15-23 Feb, then
    # Tue 24 .. Fri 27 and Sat 28 (调休) make seven working days.
    with exchange_world(tmp_path, now_ms=beijing_ms(2026, 2, 12)) as world:
        receipt = world.submit(world.batch("B-SF", world.subjects(2)))
        assert _date(receipt.due_date) == date(2026, 2, 28)


def test_batch_whose_deadline_falls_in_an_unknown_year_is_receipted_with_a_provisional_date(tmp_path: Path) -> None:
    # Issue 10 item 10: this was refused (calendar_year_unknown) until a 2027 holiday file was installed. Monday
    # 28 Dec 2026: 29, 30, 31 Dec, then 2027 counted Monday to Friday (Fri 1 Jan, Mon 4 .. Wed 6 Jan).
    with exchange_world(tmp_path, now_ms=beijing_ms(2026, 12, 28)) as world:
        receipt = world.submit(world.batch("B-NY", world.subjects(2)))
        assert _date(receipt.due_date) == date(2027, 1, 6)
        assert receipt.due_date_provisional
        assert world.connector.store.batch_count() == 1
        assert world.connector.answer_pending() == 1
        status = world.fetch("B-NY").batches[0]
        assert status.state == exchange_pb2.BATCH_STATE_ANSWERED and status.due_date_provisional


# -- idempotency ---------------------------------------------------------------------------------------------------


class CountingAdapter(SyntheticAdapter):
    """The synthetic unit, counting how often it is asked."""

    def __init__(self, population: Population, unit_category: int) -> None:
        super().__init__(population, unit_category)
        self.calls = 0

    def fetch(self, id_numbers: Sequence[str], context: LookupContext) -> dict[str, list[Finding]]:
        self.calls += 1
        return super().fetch(id_numbers, context)


class OutageAdapter(CountingAdapter):
    """The synthetic unit behind a database that is down until ``up`` is set."""

    def __init__(self, population: Population, unit_category: int) -> None:
        super().__init__(population, unit_category)
        self.up = False

    def fetch(self, id_numbers: Sequence[str], context: LookupContext) -> dict[str, list[Finding]]:
        self.calls += 1
        if not self.up:
            raise AdapterError("cannot connect to the unit's postgresql database: the server is not accepting logins")
        return SyntheticAdapter.fetch(self, id_numbers, context)


def test_a_database_outage_is_retried_with_growing_pauses_and_logged_with_its_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    adapter = OutageAdapter(Population(SEED), records_pb2.UNIT_CATEGORY_TAX)
    with exchange_world(tmp_path, now_ms=MONDAY, adapter=adapter) as world:
        world.submit(world.batch("B-OUT", world.subjects(3)))
        with caplog.at_level(logging.ERROR, logger="hedui.connector"):
            assert world.connector.answer_pending() == 0
        (record,) = [r for r in caplog.records if r.getMessage() == "adapter failed; batch stays pending"]
        assert record.__dict__["detail"].endswith("not accepting logins")
        assert (record.__dict__["failures"], record.__dict__["retry_in_s"]) == (1, ANSWER_RETRY_BASE_MS // 1000)
        tries = [adapter.calls]
        for pause_ms in (0, ANSWER_RETRY_BASE_MS - 1, 1, 2 * ANSWER_RETRY_BASE_MS):
            world.clock.advance(pause_ms)
            world.connector.answer_pending()
            tries.append(adapter.calls)
        # Not again at once, nor a millisecond early; at the end of the first pause; the second pause is twice as long.
        assert tries == [1, 1, 1, 2, 3]
        # A batch that arrives meanwhile is not held up behind the one that is waiting, and the outage ends.
        adapter.up = True
        world.submit(world.batch("B-NEW", world.subjects(2)))
        assert world.connector.answer_pending() == 1
        assert world.fetch("B-OUT").batches[0].state == exchange_pb2.BATCH_STATE_PENDING
        world.clock.advance(4 * ANSWER_RETRY_BASE_MS)
        assert world.connector.answer_pending() == 1
        assert world.fetch("B-OUT").batches[0].state == exchange_pb2.BATCH_STATE_ANSWERED


def test_resubmission_returns_the_same_receipt_and_never_looks_up_twice(tmp_path: Path) -> None:
    adapter = CountingAdapter(Population(SEED), records_pb2.UNIT_CATEGORY_TAX)
    with exchange_world(tmp_path, now_ms=MONDAY, adapter=adapter) as world:
        batch = world.batch("B-2", world.subjects(3))
        envelope = world.seal(batch)
        first = world.open(world.stub.SubmitBatch(exchange_pb2.SealedMessage(envelope=envelope)))
        world.clock.advance(60_000)
        # The very same bytes again (a retry after a lost reply) ...
        again = world.open(world.stub.SubmitBatch(exchange_pb2.SealedMessage(envelope=envelope)))
        # ... and the same batch sealed anew.
        resealed = world.submit(batch)
        assert first.message == again.message == resealed
        assert again.header.correlation_id == first.header.correlation_id
        assert world.connector.answer_pending() == 1
        assert world.connector.answer_pending() == 0
        world.submit(batch)
        assert world.connector.answer_pending() == 0
        assert adapter.calls == 1
        assert world.connector.store.batch_count() == 1


def test_batch_id_reused_for_different_content_is_refused(world: World) -> None:
    world.submit(world.batch("B-3", world.subjects(3)))
    with pytest.raises(grpc.RpcError) as excinfo:
        world.submit(world.batch("B-3", world.subjects(4)))
    assert _code(excinfo) == grpc.StatusCode.ALREADY_EXISTS


# -- answers -------------------------------------------------------------------------------------------------------


def test_pending_then_answered_and_fetching_twice_gives_identical_answers(world: World) -> None:
    world.submit(world.batch("B-4", world.subjects(20)))
    pending = world.fetch("B-4", "NOPE")
    assert [s.state for s in pending.batches] == [exchange_pb2.BATCH_STATE_PENDING, exchange_pb2.BATCH_STATE_UNKNOWN]
    assert _date(pending.batches[0].due_date) == date(2026, 3, 11)
    assert world.connector.answer_pending() == 1
    first, second = world.fetch("B-4"), world.fetch("B-4")
    assert first.batches[0].state == exchange_pb2.BATCH_STATE_ANSWERED
    answer = first.batches[0].answer
    assert first == second
    assert [s.subject_ref for s in answer.subjects] == [f"P{i:06d}" for i in range(20)]
    found = [s for s in answer.subjects if s.status == exchange_pb2.SUBJECT_STATUS_FOUND]
    assert found, "the synthetic tax bureau should know some of 20 people"
    for subject in found:
        for record in subject.records:
            assert record.category == records_pb2.DATA_CATEGORY_TAX
            assert record.WhichOneof("body") == "tax"
            assert record.produced_at_ms == MONDAY


def _known_to_unit(world: World, pool: list[exchange_pb2.QuerySubject]) -> list[exchange_pb2.QuerySubject]:
    context = LookupContext(
        categories=(records_pb2.DATA_CATEGORY_TAX,),
        income_from=(2025, 9),
        income_to=(2026, 2),
        assets_as_of=date(2026, 2, 28),
        produced_at_ms=MONDAY,
    )
    held = world.connector.adapter.fetch([s.id_number for s in pool], context)
    return [s for s in pool if held.get(s.id_number)]


def test_subject_statuses_name_mismatch_invalid_id_not_authorised(world: World) -> None:
    pool = world.subjects(80)
    known = _known_to_unit(world, pool)
    unknown = [s for s in pool if s not in known]
    assert len(known) >= 2 and unknown
    subjects = [known[0], known[1], unknown[0], pool[-1], pool[-2]]
    subjects[0].name = subjects[0].name + "某"  # the unit holds this ID number under another name
    subjects[1].name = " ".join(subjects[1].name)  # spaces inside a name still match
    subjects[3].id_number = subjects[3].id_number[:17] + ("0" if subjects[3].id_number[17] != "0" else "1")
    subjects[4].ClearField("authorisation")
    world.submit(world.batch("B-5", subjects))
    world.connector.answer_pending()
    answers = world.fetch("B-5").batches[0].answer.subjects
    assert [a.status for a in answers] == [
        exchange_pb2.SUBJECT_STATUS_NAME_MISMATCH,
        exchange_pb2.SUBJECT_STATUS_FOUND,
        exchange_pb2.SUBJECT_STATUS_NO_RECORD,
        exchange_pb2.SUBJECT_STATUS_INVALID_ID,
        exchange_pb2.SUBJECT_STATUS_NOT_AUTHORISED,
    ]
    assert not answers[0].records and answers[1].records


def test_deposits_answered_as_threshold_flags_never_reveal_amounts(tmp_path: Path) -> None:
    with exchange_world(
        tmp_path,
        now_ms=MONDAY,
        unit_category=records_pb2.UNIT_CATEGORY_FINANCIAL_INSTITUTION,
        threshold_categories=frozenset({records_pb2.DATA_CATEGORY_DEPOSITS}),
    ) as world:
        batch = world.batch(
            "B-6",
            world.subjects(40),
            categories=[records_pb2.DATA_CATEGORY_DEPOSITS, records_pb2.DATA_CATEGORY_LOANS],
            thresholds=[
                exchange_pb2.ThresholdRequest(category=records_pb2.DATA_CATEGORY_DEPOSITS, limit_fen=2_000_000)
            ],
        )
        world.submit(batch)
        world.connector.answer_pending()
        answer = world.fetch("B-6").batches[0].answer
        bodies = [r.WhichOneof("body") for s in answer.subjects for r in s.records]
        assert "deposit" not in bodies
        assert "deposit_threshold" in bodies
        without_limit = world.batch("B-7", world.subjects(2), categories=[records_pb2.DATA_CATEGORY_DEPOSITS])
        with pytest.raises(grpc.RpcError) as excinfo:
            world.submit(without_limit)
        assert _code(excinfo) == grpc.StatusCode.INVALID_ARGUMENT


# -- delay notices -------------------------------------------------------------------------------------------------


def test_delay_notice_at_most_five_working_days_and_signed_to_the_gateway(world: World) -> None:
    world.submit(world.batch("B-8", world.subjects(2)))
    with pytest.raises(DelayRefused):
        world.connector.issue_delay("B-8", date(2026, 3, 19), "volume")  # 6 working days after 11 March
    with pytest.raises(DelayRefused):
        world.connector.issue_delay("B-8", date(2026, 3, 10), "volume")  # earlier than due
    world.connector.issue_delay("B-8", date(2026, 3, 18), "volume")  # exactly 5 working days
    status = world.fetch("B-8").batches[0]
    assert status.state == exchange_pb2.BATCH_STATE_PENDING
    assert _date(status.due_date) == date(2026, 3, 18)
    assert _date(status.delay.original_due_date) == date(2026, 3, 11)
    assert status.delay.reason == "volume"
    world.connector.answer_pending()
    with pytest.raises(DelayRefused):
        world.connector.issue_delay("B-8", date(2026, 3, 18), "volume")  # already answered


# -- refusals ------------------------------------------------------------------------------------------------------


def _refused(world: World, batch: exchange_pb2.QueryBatch, code: grpc.StatusCode, reason: str) -> None:
    before = world.connector.store.batch_count()
    with pytest.raises(grpc.RpcError) as excinfo:
        world.submit(batch)
    assert _code(excinfo) == code
    assert _sent_reason(excinfo) == [reason]  # the gateway keeps and logs it with the failed batch
    assert world.connector.store.batch_count() == before
    last = list(world.connector.store.audit_entries())[-1]
    assert (last["event"], last["reason"]) == ("refused", reason)


def test_oversized_batch_is_refused(world: World) -> None:
    _refused(world, world.batch("B-9", world.subjects(501)), grpc.StatusCode.RESOURCE_EXHAUSTED, "batch_too_large")


def test_batch_without_any_authorisation_is_refused(world: World) -> None:
    subjects = world.subjects(3)
    for s in subjects:
        s.ClearField("authorisation")
    _refused(world, world.batch("B-10", subjects), grpc.StatusCode.FAILED_PRECONDITION, "no_authorisation")


def test_unregistered_or_single_approver_is_refused(world: World) -> None:
    _refused(
        world,
        world.batch("B-11", world.subjects(2), staff_ids=["S-0001", "S-9999"]),
        grpc.StatusCode.PERMISSION_DENIED,
        "approver_unknown",
    )
    _refused(
        world,
        world.batch("B-12", world.subjects(2), staff_ids=["S-0001"]),
        grpc.StatusCode.PERMISSION_DENIED,
        "approvals_too_few",
    )


def test_category_the_unit_does_not_hold_is_refused(world: World) -> None:
    batch = world.batch("B-13", world.subjects(2), categories=[records_pb2.DATA_CATEGORY_VEHICLES])
    _refused(world, batch, grpc.StatusCode.INVALID_ARGUMENT, "category_not_served")


def test_bad_income_period_is_refused(world: World) -> None:
    batch = world.batch("B-14", world.subjects(2), income_to=records_pb2.YearMonth(year=2024, month=1))
    _refused(world, batch, grpc.StatusCode.INVALID_ARGUMENT, "bad_period")


def test_envelope_from_an_unknown_gateway_is_refused_opaquely(world: World) -> None:
    stranger = PartyKeys.create(GATEWAY, now_ms=MONDAY - 1)  # right name, keys the unit never enrolled
    trust = TrustStore()
    unit_bundle = world.connector.courier.me.bundle(MONDAY)
    trust.import_bundle(unit_bundle, expected_fingerprint=read_bundle(unit_bundle).fingerprint)
    courier = Courier(stranger, trust, replay=MemoryReplayCache(), clock=world.clock)
    envelope = courier.seal(world.batch("B-15", world.subjects(2)), UNIT)
    with pytest.raises(grpc.RpcError) as excinfo:
        world.stub.SubmitBatch(exchange_pb2.SealedMessage(envelope=envelope))
    assert _code(excinfo) == grpc.StatusCode.UNAUTHENTICATED
    assert excinfo.value.details() == "invalid envelope"
    # A known party with a key the unit does not hold: the gateway is asked to refresh keys (its trust sync brings
    # a rotation the unit missed); the precise reason stays here.
    assert _sent_reason(excinfo) == ["refresh_keys"]
    assert list(world.connector.store.audit_entries())[-1]["reason"] == "envelope_unknown_key"
    assert world.connector.store.batch_count() == 0


def test_replayed_fetch_is_refused(world: World) -> None:
    world.submit(world.batch("B-16", world.subjects(2)))
    envelope = world.seal(exchange_pb2.FetchAnswers(batch_ids=["B-16"]))
    world.stub.FetchAnswers(exchange_pb2.SealedMessage(envelope=envelope))
    with pytest.raises(grpc.RpcError) as excinfo:
        world.stub.FetchAnswers(exchange_pb2.SealedMessage(envelope=envelope))
    assert _code(excinfo) == grpc.StatusCode.ALREADY_EXISTS


def test_tls_identity_must_match_the_envelope_sender(world: World) -> None:
    # Another agency the unit trusts too, with its valid client certificate, carrying our gateway's envelope.
    other = PartyKeys.create("agency.220000", now_ms=MONDAY - 1)
    enrol((other, TrustStore()), (world.connector.courier.me, world.connector.courier.trust), MONDAY)
    channel = world.pki.channel("agency.220000", world.running.port)
    try:
        stub = exchange_pb2_grpc.ExchangeServiceStub(channel)
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.SubmitBatch(exchange_pb2.SealedMessage(envelope=world.seal(world.batch("B-17", world.subjects(2)))))
        assert _code(excinfo) == grpc.StatusCode.PERMISSION_DENIED
    finally:
        channel.close()
    assert world.connector.store.batch_count() == 0


def test_garbage_instead_of_an_envelope_is_refused(world: World) -> None:
    with pytest.raises(grpc.RpcError) as excinfo:
        world.stub.SubmitBatch(exchange_pb2.SealedMessage(envelope=b"\x0a\x03abc"))
    assert _code(excinfo) == grpc.StatusCode.INVALID_ARGUMENT


def test_other_gateways_batches_are_unknown_to_fetch(world: World) -> None:
    world.submit(world.batch("B-18", world.subjects(2)))
    world.connector.answer_pending()
    assert world.connector.store.answers_for("agency.220000", ["B-18"]) == {}


# -- acknowledgement, purge, restart -------------------------------------------------------------------------------


def test_acknowledge_then_purge_forgets_content_but_keeps_the_audit_trail(world: World) -> None:
    world.submit(world.batch("B-19", world.subjects(3)))
    assert world.acknowledge("B-19").batch_ids == []  # nothing answered yet
    world.connector.answer_pending()
    assert list(world.acknowledge("B-19").batch_ids) == ["B-19"]
    world.clock.advance(31 * 86_400_000)
    assert world.connector.purge(retention_days=30) == 1
    assert world.fetch("B-19").batches[0].state == exchange_pb2.BATCH_STATE_UNKNOWN
    events = [e["event"] for e in world.connector.store.audit_entries()]
    assert events[-4:] == ["accepted", "answered", "acknowledged", "purged"]


def test_restart_loses_nothing(tmp_path: Path) -> None:
    unit = (PartyKeys.create(UNIT, now_ms=MONDAY - 1), TrustStore())
    with exchange_world(tmp_path / "a", now_ms=MONDAY, unit_keys=unit, database_url=f"sqlite:///{tmp_path}/c.db") as w:
        w.submit(w.batch("B-20", w.subjects(10)))
        w.connector.answer_pending()
        before = w.fetch("B-20")
    with exchange_world(tmp_path / "b", now_ms=MONDAY, unit_keys=(unit[0], TrustStore()),
                        database_url=f"sqlite:///{tmp_path}/c.db") as w2:  # fmt: skip
        # A different gateway key pair now: the stored batch belongs to the same gateway party id.
        after = w2.fetch("B-20")
    assert after.batches[0].answer == before.batches[0].answer


def test_no_id_number_or_name_in_logs(world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    subjects = world.subjects(8)
    world.submit(world.batch("B-21", subjects))
    world.connector.answer_pending()
    world.fetch("B-21")
    with pytest.raises(grpc.RpcError):
        world.submit(world.batch("B-21", subjects[:3]))
    text = caplog.text + " ".join(str(r.__dict__) for r in caplog.records)
    for s in subjects:
        assert s.id_number not in text
        assert s.name not in text


def test_unit_keys_states_are_untouched_by_the_exchange(world: World) -> None:
    assert all(r.state is KeyState.ACTIVE for r in world.connector.courier.me.records())


def test_a_failed_store_under_a_call_is_unavailable_counted_and_logged_once_a_minute(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """The on-call drill: the unit's own database became read-only while batches arrived. Each call ended as grpc's
    UNKNOWN with a 75-line ERROR traceback every few seconds, and hedui_database_up stayed 1. Now the gateway gets
    UNAVAILABLE (transient: it backs off and tries again) with the reason database_unavailable, the store counts as
    down, and the log has one line a minute without the database's message."""
    metrics = ConnectorMetrics(CollectorRegistry())
    world.connector.metrics = metrics
    with world.connector.store.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE batches RENAME TO batches_away")
    try:
        with caplog.at_level(logging.INFO):
            for n in range(3):
                with pytest.raises(grpc.RpcError) as excinfo:
                    world.submit(world.batch(f"B-DB-{n}", world.subjects(2)))
                assert _code(excinfo) == grpc.StatusCode.UNAVAILABLE
                assert _sent_reason(excinfo) == ["database_unavailable"]
                assert "batches" not in (excinfo.value.details() or "")
    finally:
        with world.connector.store.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE batches_away RENAME TO batches")
    assert not metrics.service.database.up
    lines = [r for r in caplog.records if r.getMessage() == "request failed on the store"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING and not lines[0].exc_info
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert world.submit(world.batch("B-DB-3", world.subjects(2))).batch_id == "B-DB-3"  # back by itself
