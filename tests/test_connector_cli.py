"""hedui-connector as an operator runs it: a config file, a keystore, certificates, `serve`, SIGTERM."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hedui.v1 import exchange_pb2, exchange_pb2_grpc, records_pb2

from connectors.cli import main
from connectors.synthetic import Population
from demo.localnet import free_port
from keys import keystore
from keys.envelope import Courier
from keys.identity import PartyKeys
from keys.replay import MemoryReplayCache
from keys.truststore import TrustStore
from tests.conftest import write_passphrase
from tests.exchange_world import GATEWAY, UNIT, Pki, enrol

PASSPHRASE = "connector test passphrase"


def _setup(tmp_path: Path, port: int) -> tuple[Path, Pki, Courier]:
    now = int(time.time() * 1000)
    pki = Pki(tmp_path)
    pki.issue(UNIT, server=True)
    pki.issue(GATEWAY)
    gateway, unit = (
        (PartyKeys.create(GATEWAY, now_ms=now - 1000), TrustStore()),
        (
            PartyKeys.create(UNIT, now_ms=now - 1000),
            TrustStore(),
        ),
    )
    enrol(gateway, unit, now)
    keystore.save(tmp_path / "keystore.json", unit[0], unit[1], PASSPHRASE, kdf=keystore.FAST_FOR_TESTS)
    write_passphrase(tmp_path / "passphrase", PASSPHRASE)
    config = tmp_path / "connector.toml"
    config.write_text(
        f"""
[unit]
party_id = "{UNIT}"
category = "tax"

[server]
listen = "127.0.0.1:{port}"
tls_cert = "{UNIT}.crt"
tls_key = "{UNIT}.key"
tls_ca = "ca.crt"

[keys]
keystore = "keystore.json"
passphrase_file = "passphrase"

[database]
url = "sqlite:///{tmp_path}/connector.db"

[adapter]
kind = "synthetic"
seed = 7

[exchange]
answer_interval_seconds = 0.2
# The process holds no roster of the gateway: its approvals are judged by [[staff]] ids (migration rule).
allow_unverified_approvals = true

[metrics]
listen = ""

[[staff]]
gateway = "{GATEWAY}"
staff_id = "S-1"

[[staff]]
gateway = "{GATEWAY}"
staff_id = "S-2"
""",
        encoding="utf-8",
    )
    return config, pki, Courier(gateway[0], gateway[1], replay=MemoryReplayCache())


def test_check_config_and_config_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, _, _ = _setup(tmp_path, free_port())
    assert main(["check-config", "--config", str(config)]) == 0
    assert "config OK" in capsys.readouterr().out
    assert main(["config-keys"]) == 0
    assert "exchange.threshold_categories" in capsys.readouterr().out


def test_bad_config_is_refused_with_the_key_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, _, _ = _setup(tmp_path, free_port())
    config.write_text(config.read_text().replace("[exchange]", "[exchange]\nanswer_speed = 3"))
    assert main(["check-config", "--config", str(config)]) == 1
    assert "unknown key(s) in exchange: answer_speed" in capsys.readouterr().err
    config.write_text(config.read_text().replace('category = "tax"', 'category = "taxes"'))
    assert main(["check-config", "--config", str(config)]) == 1
    assert "unknown unit category" in capsys.readouterr().err


def _submit_and_collect(stub: exchange_pb2_grpc.ExchangeServiceStub, courier: Courier) -> None:
    """A valid batch is receipted at once and answered by the worker within seconds."""
    people = [m for h in Population(7).households(5) for m in h.members]
    batch = exchange_pb2.QueryBatch(
        batch_id="CLI-2",
        commission_ref="WT-1",
        purpose=exchange_pb2.PROGRAMME_MEDICAL_AID,
        categories=[records_pb2.DATA_CATEGORY_TAX],
        income_from=records_pb2.YearMonth(year=2026, month=1),
        income_to=records_pb2.YearMonth(year=2026, month=6),
        assets_as_of=records_pb2.Date(year=2026, month=6, day=30),
        staff_ids=["S-1", "S-2"],
        subjects=[
            exchange_pb2.QuerySubject(
                subject_ref=f"R{i}",
                id_number=m.id_number,
                name=m.name,
                authorisation=exchange_pb2.Authorisation(number=f"A{i}", scan_sha256=bytes(32)),
            )
            for i, m in enumerate(people)
        ],
    )
    reply = stub.SubmitBatch(exchange_pb2.SealedMessage(envelope=courier.seal(batch, UNIT)))
    receipt = courier.open(reply.envelope, expect={"hedui.v1.BatchReceipt": exchange_pb2.BatchReceipt}).message
    assert isinstance(receipt, exchange_pb2.BatchReceipt) and receipt.subject_count == len(people)
    expect = {"hedui.v1.AnswerSet": exchange_pb2.AnswerSet}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        request = courier.seal(exchange_pb2.FetchAnswers(batch_ids=["CLI-2"]), UNIT)
        answers = courier.open(stub.FetchAnswers(exchange_pb2.SealedMessage(envelope=request)).envelope, expect=expect)
        assert isinstance(answers.message, exchange_pb2.AnswerSet)
        status = answers.message.batches[0]
        if status.state == exchange_pb2.BATCH_STATE_ANSWERED:
            assert len(status.answer.subjects) == len(people)
            return
        time.sleep(0.2)
    raise AssertionError("the connector did not answer within 20 s")


def _connector_exe() -> str:
    exe = shutil.which("hedui-connector", path=os.path.dirname(sys.executable))
    assert exe is not None
    return exe


_SERVING = re.compile(r'"message": ?"serving"|hedui\.connector serving ')


@contextmanager
def _serving(config: Path, *options: str, lines: list[str] | None = None) -> Iterator[subprocess.Popen[str]]:
    """``hedui-connector serve`` running until the block ends; then SIGTERM, which must stop it cleanly. Its output
    (standard output and error together) is appended to ``lines``."""
    command = [_connector_exe(), *options, "serve", "--config", str(config)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = lines if lines is not None else []
    try:
        assert process.stdout is not None
        # Up to the command's own "serving" record, the last line of a start: a line left unread here would sit in
        # this file object's buffer, where communicate() below, which reads the pipe itself, never looks.
        while not any(_SERVING.search(line) for line in seen):
            line = process.stdout.readline()
            assert line, "".join(seen)
            seen.append(line)
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        seen.extend(output.splitlines(keepends=True))
    assert process.returncode == 0, output


def test_serve_with_json_logs_writes_nothing_but_json(tmp_path: Path) -> None:
    # A log collector reads the journal line by line: a banner in plain text there would be a parse error.
    config, _, _ = _setup(tmp_path, free_port())
    lines: list[str] = []
    with _serving(config, "--log-format", "json", lines=lines):
        pass
    records = [json.loads(line) for line in lines if line.strip()]
    serving = [r for r in records if r["message"] == "serving"]
    assert len(serving) == 1 and serving[0]["party"] == UNIT and serving[0]["port"] > 0


def test_serve_answers_over_mutual_tls_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    config, pki, courier = _setup(tmp_path, port)
    with _serving(config):
        channel = pki.channel(GATEWAY, port)
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
        stub = exchange_pb2_grpc.ExchangeServiceStub(channel)
        world_batch = exchange_pb2.QueryBatch(batch_id="CLI-1", commission_ref="WT-1")
        # A refused batch proves the whole path (TLS, envelope, validation) without needing data.
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.SubmitBatch(exchange_pb2.SealedMessage(envelope=courier.seal(world_batch, UNIT)))
        assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        _submit_and_collect(stub, courier)
        channel.close()


def test_a_second_server_on_a_taken_port_is_refused_and_takes_no_traffic(tmp_path: Path) -> None:
    """grpcio would share the port (SO_REUSEPORT) and hand the newcomer some of the connections; Hedui refuses."""
    port = free_port()
    config, pki, courier = _setup(tmp_path, port)
    with _serving(config):
        second = subprocess.run(
            [_connector_exe(), "serve", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode == 1
        assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in second.stderr
        # Every new connection still reaches the first connector.
        for _ in range(5):
            with pki.channel(GATEWAY, port) as channel:
                _submit_and_collect(exchange_pb2_grpc.ExchangeServiceStub(channel), courier)


def _sql_unit(tmp_path: Path, config: Path, query: str) -> str:
    """Point the connector at a SQLite tax database holding one taxpayer; returns the taxpayer's ID number."""
    person = next(iter(Population(7).households(1))).members[0]
    database = tmp_path / "tax.db"
    with sqlite3.connect(database) as connection:
        connection.execute(
            "CREATE TABLE payments (taxpayer TEXT, holder TEXT, month_from TEXT, month_to TEXT, kind TEXT,"
            " income INTEGER, paid INTEGER)"
        )
        connection.execute(
            "INSERT INTO payments VALUES (?, ?, '2026-01', '2026-03', '个人所得税', 3000000, 45000)",
            (person.id_number, person.name),
        )
    adapter = f'[adapter]\nkind = "sql"\nurl = "sqlite:///{database}"\n\n[adapter.queries]\ntax = """{query}"""\n'
    text = config.read_text(encoding="utf-8")
    config.write_text(text.replace('[adapter]\nkind = "synthetic"\nseed = 7\n', adapter), encoding="utf-8")
    return person.id_number


def test_check_config_warns_of_fields_no_query_returns_and_of_a_query_without_the_income_period(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, _, _ = _setup(tmp_path, free_port())
    _sql_unit(
        tmp_path,
        config,
        "SELECT taxpayer AS id_number, holder AS name, month_from AS period_from, month_to AS period_to,"
        " kind AS tax_type, income AS taxable_income_fen, paid AS tax_paid_fen FROM payments"
        " WHERE taxpayer IN :id_numbers",
    )
    capsys.readouterr()
    assert main(["check-config", "--config", str(config)]) == 0
    captured = capsys.readouterr()
    assert "config OK" in captured.out and "(2 warnings)" in captured.out
    assert "does not return self_employed: for every person these fields will be answered empty" in captured.err
    assert "does not use :income_from and :income_to: it will disclose every period on record" in captured.err


def test_test_query_prints_what_the_unit_would_answer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config, _, _ = _setup(tmp_path, free_port())
    id_number = _sql_unit(
        tmp_path,
        config,
        "SELECT taxpayer AS id_number, holder AS name, month_from AS period_from, month_to AS period_to,"
        " kind AS tax_type, income AS taxable_income_fen, paid AS tax_paid_fen, 0 AS self_employed FROM payments"
        " WHERE taxpayer IN :id_numbers AND month_to >= :income_from AND month_from <= :income_to",
    )
    other = list(Population(7).households(2))[1].members[0].id_number
    capsys.readouterr()
    args = ["test-query", "--config", str(config), "--category", "tax"]

    def run(*extra: str, stdin: str = f"{id_number}\n\n{other}\n") -> int:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        return main([*args, *extra])

    assert run("--from", "2026-01", "--to", "2026-06") == 0
    out = capsys.readouterr().out
    assert "tax: income period 2026-01 to 2026-06" in out
    assert f"{id_number}: 1 record" in out and "taxable_income_fen: 3000000" in out and "个人所得税" in out
    assert f"{other}: no records" in out

    assert main([*args[:-1], "deposits"]) == 1
    assert "a tax unit answers" in capsys.readouterr().err
    wrong = id_number[:-1] + ("0" if id_number[-1] != "0" else "1")
    assert run(stdin=f"{id_number}\n{wrong}\n") == 1
    err = capsys.readouterr().err
    assert "ID number 2 on standard input" in err and wrong not in err
    assert run(stdin="\n") == 1
    assert "give 1 to 100 ID numbers" in capsys.readouterr().err
    assert run("--from", "2026-13") == 1
    assert "--from must be a month" in capsys.readouterr().err
