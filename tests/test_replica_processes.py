"""Two hedui-gateway processes, one PostgreSQL database, real connectors: every batch is sent and answered exactly
once, whichever replica takes it (issue: several replicas)."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import func, select

from common.db import make_engine
from connectors.store import ConnectorStore
from demo.localnet import build_network, free_port, wait_for_port
from gateway.db import schema
from gateway.exchange.store import GatewayStore
from tests.conftest_pg import postgres_schema
from tests.test_gateway_process import UNITS, enqueue, wait_until


@pytest.mark.postgres
@pytest.mark.slow
def test_two_gateway_processes_share_one_database_without_sending_a_batch_twice(tmp_path: Path) -> None:
    with postgres_schema() as url:
        net = build_network(tmp_path / "net", UNITS, database_url=url, batch_size=20, legacy_staff=True)
        try:
            net.start_connectors()
            net.start_gateway("replica-1.log", {"HEDUI_GATEWAY_REPLICA_ID": "replica-1"})
            second = free_port()
            net.start_gateway(
                "replica-2.log",
                {
                    "HEDUI_GATEWAY_REPLICA_ID": "replica-2",
                    "HEDUI_GATEWAY_LISTEN": f"127.0.0.1:{second}",
                    "HEDUI_GATEWAY_METRICS_LISTEN": "",
                },
                wait=False,
            )
            wait_for_port(second)
            store = GatewayStore(make_engine(url))
            items = enqueue(store, "WT-R-1", 120, seed=20261127)
            assert wait_until(lambda: store.batches.answer_count() == items, 90), (store.batches.answer_count(), items)
            time.sleep(1.5)  # let the acknowledgements go out
            with store.engine.connect() as conn:
                attempts = dict(conn.execute(select(schema.batches.c.batch_id, schema.batches.c.attempts)).all())
                jobs = dict(conn.execute(select(schema.jobs.c.name, schema.jobs.c.runs)).all())
                batches_per_item = conn.execute(
                    select(func.count()).select_from(schema.items).where(schema.items.c.batch_id.is_(None))
                ).scalar_one()
            assert batches_per_item == 0
            assert set(attempts.values()) == {1}, "a batch was sent more than once"
            accepted: Counter[str] = Counter()
            for unit in UNITS:
                connector = ConnectorStore(make_engine(f"sqlite:///{net.root / 'data' / (unit + '.db')}"))
                accepted.update(str(e["batch_id"]) for e in connector.audit_entries() if e["event"] == "accepted")
                connector.engine.dispose()
            assert set(accepted) == set(attempts) and set(accepted.values()) == {1}
            assert jobs.get("dispatch", 0) > 1 and jobs.get("poll", 0) > 1
            store.engine.dispose()
        finally:
            net.stop_all()
        logs = [(net.root / "logs" / f"replica-{n}.log").read_text(errors="replace") for n in (1, 2)]
        assert all("serving" in log for log in logs)
