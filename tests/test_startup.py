"""A gateway (and a connector) that must not run refuses to start before it changes anything, with one error line and
a non-zero exit: a second gateway with a replica id a live one holds, a port another process holds, a metrics port
another process holds (issue 10, item 9). Real ``hedui-gateway serve`` / ``hedui-connector serve`` processes, from the
files an operator has; the replica lease itself also on PostgreSQL."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, update

from common.db import make_engine
from demo.localnet import Network, build_network, free_port
from gateway.db import schema
from gateway.db.database import upgrade
from gateway.ops.replica import Holder, ReplicaInUse, ReplicaLease
from tests.conftest_pg import postgres_schema

UNITS = {"unit.220100.tax": "tax"}


def run_cli(module: str, args: list[str], env: Mapping[str, str] | None = None, timeout: float = 60) -> tuple[int, str]:
    """Run ``python -m module ARGS`` to its end; returns the exit status and everything it wrote."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


@contextmanager
def listening(port: int) -> Iterator[socket.socket]:
    """Another process's server on ``port`` (a plain listening socket, as any program would hold it)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()
        yield sock


def gateway_db(net: Network) -> Path:
    return net.root / "data" / "gateway.db"


def assert_refused(status: int, output: str, *phrases: str) -> None:
    assert status == 1, output
    assert "Traceback" not in output, output
    for phrase in phrases:
        assert phrase in output, output


# -- ports ------------------------------------------------------------------------------------------------------------


def test_gateway_on_a_port_in_use_exits_before_creating_its_database(tmp_path: Path) -> None:
    net = build_network(tmp_path / "net", UNITS)
    with listening(net.gateway_port):
        status, output = run_cli("gateway.cli", ["serve", "--config", str(net.gateway_config)])
    assert_refused(status, output, f"cannot listen on 127.0.0.1:{net.gateway_port}", "port is in use")
    assert not gateway_db(net).exists(), "the refused gateway created (and migrated) its database"


def test_gateway_with_its_metrics_port_in_use_exits_instead_of_running_without_metrics(tmp_path: Path) -> None:
    net = build_network(tmp_path / "net", UNITS)
    with listening(net.gateway_metrics_port):
        status, output = run_cli("gateway.cli", ["serve", "--config", str(net.gateway_config)], timeout=30)
    assert_refused(status, output, f"cannot serve metrics on 127.0.0.1:{net.gateway_metrics_port}")
    assert not gateway_db(net).exists()


def test_connector_on_a_port_in_use_exits_before_opening_its_store(tmp_path: Path) -> None:
    net = build_network(tmp_path / "net", UNITS)
    (unit, config) = next(iter(net.connector_configs.items()))
    with listening(net.connector_ports[unit]):
        status, output = run_cli("connectors.cli", ["serve", "--config", str(config)])
    assert_refused(status, output, f"cannot listen on 127.0.0.1:{net.connector_ports[unit]}")
    assert not (net.root / "data" / f"{unit}.db").exists(), "the refused connector created its store"


def test_connector_with_its_metrics_port_in_use_exits_instead_of_running_without_metrics(tmp_path: Path) -> None:
    net = build_network(tmp_path / "net", UNITS)
    (unit, config) = next(iter(net.connector_configs.items()))
    with listening(net.connector_metrics_ports[unit]):
        status, output = run_cli("connectors.cli", ["serve", "--config", str(config)], timeout=30)
    assert_refused(status, output, f"cannot serve metrics on 127.0.0.1:{net.connector_metrics_ports[unit]}")
    assert not (net.root / "data" / f"{unit}.db").exists()


# -- the same replica id twice ----------------------------------------------------------------------------------------


def replica_row(engine: Engine, replica: str = "gateway-1") -> Holder:
    fields = [schema.replicas.c[name] for name in Holder.__dataclass_fields__]
    with engine.connect() as conn:
        row = conn.execute(select(*fields).where(schema.replicas.c.replica_id == replica)).one()
    return Holder(**row._asdict())


def other_ports() -> dict[str, str]:
    return {"HEDUI_GATEWAY_LISTEN": f"127.0.0.1:{free_port()}", "HEDUI_GATEWAY_METRICS_LISTEN": ""}


def test_second_gateway_with_the_same_replica_id_on_this_host_refuses_before_touching_the_database(
    tmp_path: Path,
) -> None:
    net = build_network(tmp_path / "net", UNITS)
    try:
        first = net.start_gateway()
        engine = make_engine(f"sqlite:///{gateway_db(net)}")
        held = replica_row(engine)
        assert held.pid == first.pid
        # Same config, other ports (so that only the replica id collides): the lock file next to the keystore.
        status, output = run_cli("gateway.cli", ["serve", "--config", str(net.gateway_config)], other_ports())
        assert_refused(status, output, "replica id gateway-1 is in use by a gateway on this host", f"{first.pid}")
        assert "replica id claimed" not in output and "Running upgrade" not in output
        assert replica_row(engine).instance == held.instance
        assert first.poll() is None, "the first gateway stopped"
        engine.dispose()
    finally:
        net.stop_all()


def test_second_gateway_with_the_same_replica_id_and_other_files_is_refused_by_the_database_lease(
    tmp_path: Path,
) -> None:
    """The files another installation would have (its own keystore folder, so its own lock file), one database: as
    a second machine sharing a PostgreSQL database would be, on one host."""
    net = build_network(tmp_path / "net", UNITS)
    try:
        first = net.start_gateway()
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        text = net.gateway_config.read_text(encoding="utf-8")
        keystore = next(net.root.joinpath("keys").glob("agency.220100.keystore.json"))
        copy = elsewhere / keystore.name
        copy.write_bytes(keystore.read_bytes())
        copy.chmod(0o600)
        config = elsewhere / "gateway.toml"
        config.write_text(text.replace(str(keystore), str(copy)), encoding="utf-8")
        engine = make_engine(f"sqlite:///{gateway_db(net)}")
        held = replica_row(engine)
        status, output = run_cli("gateway.cli", ["serve", "--config", str(config)], other_ports())
        assert_refused(status, output, "replica id gateway-1 is held by a live gateway", f"process {first.pid}")
        assert replica_row(engine).instance == held.instance
        assert first.poll() is None
        engine.dispose()
    finally:
        net.stop_all()


def test_gateway_killed_and_restarted_takes_its_replica_id_back_at_once(tmp_path: Path) -> None:
    net = build_network(tmp_path / "net", UNITS, lease_seconds=600)
    try:
        first = net.start_gateway()
        first.kill()
        first.wait()
        second = net.start_gateway("gateway-2.log")  # within the 600 s lease of the killed one
        engine = make_engine(f"sqlite:///{gateway_db(net)}")
        assert replica_row(engine).pid == second.pid
        engine.dispose()
    finally:
        net.stop_all()


# -- the lease (SQLite and PostgreSQL) --------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def lease_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'gateway.db'}")
        upgrade(engine)
        yield engine
        engine.dispose()
        return
    with postgres_schema() as url:
        engine = make_engine(url)
        upgrade(engine)
        yield engine
        engine.dispose()


def elsewhere(lease: ReplicaLease) -> ReplicaLease:
    """``lease`` as the process on another machine it stands for: another host name, the same everything else."""
    me = lease.me
    lease.me = Holder(**{**me.__dict__, "host": "gateway-b.internal"})
    return lease


def test_a_live_lease_on_another_host_refuses_until_it_runs_out(lease_engine: Engine) -> None:
    now = [1_800_000_000.0]
    first = elsewhere(ReplicaLease(lease_engine, "gateway-1", 120_000, clock=lambda: now[0]))
    first.claim()
    second = ReplicaLease(lease_engine, "gateway-1", 120_000, clock=lambda: now[0])
    with pytest.raises(ReplicaInUse, match=r"held by a live gateway \(host gateway-b\.internal"):
        second.check()
    with pytest.raises(ReplicaInUse):
        second.claim()
    assert replica_row(lease_engine).instance == first.me.instance
    now[0] += 121  # its heartbeat stopped: the lease runs out
    second.check()
    second.claim()
    assert replica_row(lease_engine).instance == second.me.instance
    assert not first.renew(), "the old holder's renewal must see that it lost the id"


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(lease_engine: Engine) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    dead = ReplicaLease(lease_engine, "gateway-1", 600_000)
    dead.me = Holder(**{**dead.me.__dict__, "pid": int(gone.stdout), "process_start": "1"})
    dead.claim()
    alive = ReplicaLease(lease_engine, "gateway-1", 600_000)
    alive.claim()
    assert replica_row(lease_engine).instance == alive.me.instance


def test_the_heartbeat_renews_and_reports_a_lost_lease(lease_engine: Engine) -> None:
    lease = ReplicaLease(lease_engine, "gateway-1", 2_000)
    lease.claim()
    before = replica_row(lease_engine).lease_until_ms
    lost = threading.Event()
    lease.start_heartbeat(lost.set)
    time.sleep(1.2)
    assert replica_row(lease_engine).lease_until_ms > before
    with lease_engine.begin() as conn:  # another process claims the id meanwhile
        conn.execute(update(schema.replicas).values(instance="f" * 32))
    assert lost.wait(5)
    lease.release()
    assert replica_row(lease_engine).instance == "f" * 32, "a lost lease must not be released over its new holder"
