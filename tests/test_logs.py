"""Structured logs: JSON lines that parse, with the fields the code passes, a request id on every line written
while a request is handled (whichever module writes it), public commission ids for tracing, and no personal data
after a whole real procedure: agency API, gateway engine and connectors over mutual TLS."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hedui.v1 import agency_pb2, exchange_pb2, exchange_pb2_grpc

from common.logs import REDACTED, configure_logging, current_context, log_context, public_commission_ref
from gateway.cli import main as gateway_main
from tests.agency_world import agency_world, whole_procedure
from tests.exchange_world import GATEWAY
from tests.gateway_drive import TAX

REQUEST_ID = re.compile(r"[0-9a-f]{8}")


class Captured:
    """Everything logged while the test runs, as the process's log would have it."""

    def __init__(self, stream: io.StringIO) -> None:
        self.stream = stream

    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text().splitlines()]


def _capture(json_lines: bool) -> Iterator[Captured]:
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    configure_logging("INFO", json_lines=json_lines, stream=stream)
    try:
        yield Captured(stream)
    finally:
        for handler in [h for h in root.handlers if h.get_name() == "hedui"]:
            root.removeHandler(handler)
        root.setLevel(level)


@pytest.fixture
def json_log() -> Iterator[Captured]:
    yield from _capture(json_lines=True)


@pytest.fixture
def text_log() -> Iterator[Captured]:
    yield from _capture(json_lines=False)


def test_json_lines_carry_fields_and_context(json_log: Captured) -> None:
    log = logging.getLogger("hedui.test")
    with log_context(request_id="0a1b2c3d", commission_id=public_commission_ref("C0123456789abcdef")):
        log.warning("unit unreachable; backing off", extra={"unit": "unit.220100.tax", "failures": 3})
        with log_context(commission_id=None):  # None adds nothing, the outer value stays
            assert current_context() == {"request_id": "0a1b2c3d", "commission_id": "C0123456789abcdef"}
    log.info("outside", extra={"batch_id": None})
    first, second = json_log.lines()
    assert first["level"] == "WARNING" and first["logger"] == "hedui.test"
    assert first["message"] == "unit unreachable; backing off"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert first["unit"] == "unit.220100.tax" and first["failures"] == 3
    assert first["request_id"] == "0a1b2c3d" and first["commission_id"] == "C0123456789abcdef"
    assert "request_id" not in second and "batch_id" not in second


def test_id_numbers_are_redacted_even_when_passed_by_mistake(json_log: Captured) -> None:
    log = logging.getLogger("hedui.test")
    number = "22010419900101123X"
    log.error("lookup failed for %s", number, extra={"detail": f"id={number}"})
    try:
        raise ValueError(f"no record for {number}")
    except ValueError:
        log.exception("adapter failed")
    assert number not in json_log.text()
    first, second = json_log.lines()
    assert first["message"] == f"lookup failed for {REDACTED}" and first["detail"] == f"id={REDACTED}"
    assert REDACTED in second["exception"] and "ValueError" in second["exception"]
    # Not a commission id of the workflow's form: never logged as one.
    assert public_commission_ref(number) is None and public_commission_ref("C0123") is None


def test_library_chatter_is_kept_out_of_the_log_but_not_what_matters(text_log: Captured) -> None:
    migration = logging.getLogger("alembic.runtime.migration")
    migration.info("Context impl SQLiteImpl.")
    migration.info("Will assume non-transactional DDL.")
    migration.info("Running upgrade 0005 -> 0006, index items by commission")
    logging.getLogger("apscheduler.scheduler").info("Running job dispatch")
    logging.getLogger("apscheduler.scheduler").warning("something the operator must see")
    assert "Context impl" not in text_log.text() and "Will assume" not in text_log.text()
    assert "Running job" not in text_log.text()
    assert "Running upgrade 0005 -> 0006" in text_log.text()
    assert "something the operator must see" in text_log.text()


def test_text_lines_show_the_fields(text_log: Captured) -> None:
    with log_context(request_id="0a1b2c3d"):
        logging.getLogger("hedui.test").info("batch accepted", extra={"batch_id": "B01", "subjects": 5})
    line = text_log.text().strip()
    assert line.endswith('hedui.test batch accepted batch_id="B01" subjects=5 request_id="0a1b2c3d"'), line


def test_log_format_option(json_log: Captured, capsys: pytest.CaptureFixture[str]) -> None:
    assert gateway_main(["--log-format", "json", "config-keys"]) == 0
    assert "metrics.listen" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        gateway_main(["--log-format", "xml", "config-keys"])


def test_a_whole_procedure_logs_request_and_commission_ids_and_no_personal_data(
    tmp_path: Path, json_log: Captured
) -> None:
    with agency_world(tmp_path) as agency:
        with pytest.raises(grpc.RpcError):  # refused by the interceptor
            agency.stub("agency.999999").ListCommissions(agency_pb2.ListCommissionsRequest())
        cid = whole_procedure(agency, households=6)
        # A forged envelope at a connector: the trust core's line and the connector's share the request id.
        batch = exchange_pb2.QueryBatch(batch_id="B-forged", commission_ref=cid)
        sealed = agency.world.engine.courier.seal(batch, TAX)
        stub = exchange_pb2_grpc.ExchangeServiceStub(
            agency.world.pki.channel(GATEWAY, agency.world.connectors[TAX].port)
        )
        with pytest.raises(grpc.RpcError):
            stub.SubmitBatch(exchange_pb2.SealedMessage(envelope=sealed[:-1] + bytes([sealed[-1] ^ 1])))
        people = [m for h in agency.world.population.households(6) for m in h.members]
        staff_names = [f"工作人员{staff_id[-1]}" for staff_id in agency.staff_keys] + ["管理员"]

    text = json_log.text()
    lines = json_log.lines()
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    for person in people:
        assert person.id_number not in text and person.name not in text
    assert not any(name in text for name in staff_names)
    assert REDACTED not in text  # nothing even needed redacting

    api = [line for line in lines if line["logger"] == "hedui.gateway.api.agency"]
    done = [line for line in api if line["message"] == "request done"]
    assert len(done) == 9  # every successful call of the procedure
    assert all(REQUEST_ID.fullmatch(line["request_id"]) for line in api)
    assert len({line["request_id"] for line in done}) == len(done)  # one id per request
    assert all(line["commission_id"] == cid for line in done)
    assert {line["method"] for line in done} >= {"SubmitCommission", "ApproveExchange", "SubmitApprovalFeedback"}
    assert any(line["message"].startswith("caller refused") and "request_id" in line for line in api)

    accepted = [line for line in lines if line["message"] == "batch accepted"]
    assert accepted and all(line["commission_id"] == cid and "request_id" in line for line in accepted)
    receipted = [line for line in lines if line["message"] == "batch receipted"]
    assert {line["unit"] for line in receipted} == set(agency.world.connectors)
    assert all(line["commission_id"] == cid and "request_id" not in line for line in receipted)  # engine thread

    refused = [line for line in lines if line["message"] in {"envelope refused", "request refused"}]
    assert {line["logger"] for line in refused} == {"hedui.keys.envelope", "hedui.connector"}
    assert {line["reason"] for line in refused} == {"bad_signature", "envelope_bad_signature"}
    assert len({line["request_id"] for line in refused}) == 1
