"""hedui-gateway: run the agency's exchange gateway and operate it.

hedui-gateway serve --config gateway.toml      serve until SIGTERM / Ctrl-C
hedui-gateway migrate --config gateway.toml    apply database migrations (alembic upgrade head)
hedui-gateway check-config --config FILE       validate a config, the keystore and the database schema
hedui-gateway config-keys                      every config key with its default and meaning
hedui-gateway status --config FILE             units, their health, and batches by state
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import func, select

from common.config import describe
from common.db import make_engine
from common.errors import HeduiError
from gateway import schema
from gateway.config import GatewayConfig
from gateway.database import current_revision, head_revision, open_database, upgrade
from gateway.server import build
from gateway.store import GatewayStore
from keys import keystore


def _serve(args: argparse.Namespace) -> None:
    config = GatewayConfig.load(Path(args.config))
    running = build(config)
    print(f"hedui-gateway {config.agency.party_id} serving on port {running.port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    running.stop()


def _migrate(args: argparse.Namespace) -> None:
    config = GatewayConfig.load(Path(args.config))
    engine = make_engine(config.database.url)
    before = current_revision(engine)
    upgrade(engine)
    print(f"database at revision {current_revision(engine)} (was {before or 'empty'})")
    engine.dispose()


def _check(args: argparse.Namespace) -> None:
    config = GatewayConfig.load(Path(args.config))
    passphrase = config.keys.passphrase_file.read_text(encoding="utf-8").rstrip("\r\n")
    party, trust = keystore.load(config.keys.keystore, passphrase)
    missing = [u.party_id for u in config.units if trust.keyring(u.party_id) is None]
    if missing:
        raise HeduiError(f"units not in the trust store: {', '.join(missing)}")
    engine = open_database(config.database.url)
    engine.dispose()
    print(f"config OK: {party.party_id}, {len(config.units)} units, schema at {head_revision()}")


def _keys(args: argparse.Namespace) -> None:
    for key, default, text in describe(GatewayConfig):
        print(f"{key}\n    default: {default}\n    {text}")


def _status(args: argparse.Namespace) -> None:
    config = GatewayConfig.load(Path(args.config))
    store = GatewayStore(open_database(config.database.url))
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(
                schema.batches.c.unit_id, schema.batches.c.state, func.count(), func.sum(schema.batches.c.subject_count)
            ).group_by(schema.batches.c.unit_id, schema.batches.c.state)
        ).all()
    by_unit: dict[str, list[str]] = {}
    for unit_id, state, batches, subjects in rows:
        by_unit.setdefault(unit_id, []).append(f"{state}={batches} batches/{subjects} items")
    for unit in store.units():
        health = "ok" if unit.consecutive_failures == 0 else f"{unit.consecutive_failures} failures, backing off"
        print(f"{unit.unit_id:32} {unit.endpoint:24} {health}")
        for line in by_unit.get(unit.unit_id, []):
            print(f"    {line}")
    store.engine.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the hedui-gateway console script."""
    parser = argparse.ArgumentParser(prog="hedui-gateway", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, func_, text in (
        ("serve", _serve, "run the gateway"),
        ("migrate", _migrate, "apply database migrations"),
        ("check-config", _check, "validate config, keystore and schema"),
        ("status", _status, "units and batches"),
    ):
        command = sub.add_parser(name, help=text)
        command.add_argument("--config", required=True)
        command.set_defaults(func=func_)
    sub.add_parser("config-keys", help="list every config key").set_defaults(func=_keys)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        args.func(args)
    except (HeduiError, ValueError, OSError) as exc:
        message = exc.diagnostics() if isinstance(exc, HeduiError) else str(exc)
        print(f"hedui-gateway: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
