"""hedui-connector: run a sharing unit's exchange server and operate it.

hedui-connector serve --config connector.toml      serve until SIGTERM / Ctrl-C
hedui-connector check-config --config FILE         validate a config without starting anything
hedui-connector config-keys                        every config key with its default and meaning
hedui-connector delay --config FILE BATCH --until YYYY-MM-DD --reason technical
                                                   written delay notice (clause 12: at most 5 working days)
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from datetime import date
from pathlib import Path

from common.cli import run, service_parser
from common.config import describe
from connectors.config import ConnectorConfig
from connectors.server import build_connector, serve


def _serve(args: argparse.Namespace) -> None:
    config = ConnectorConfig.load(Path(args.config))
    running = serve(config)
    print(f"hedui-connector {config.unit.party_id} serving on {config.server.listen} (port {running.port})", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    running.stop(grace=5.0)


def _check(args: argparse.Namespace) -> None:
    config = ConnectorConfig.load(Path(args.config))
    connector = build_connector(config)
    connector.adapter.close()
    print(f"config OK: {config.unit.party_id} ({config.unit.category}), adapter {config.adapter.kind}")


def _keys(args: argparse.Namespace) -> None:
    for key, default, text in describe(ConnectorConfig):
        print(f"{key}\n    default: {default}\n    {text}")


def _delay(args: argparse.Namespace) -> None:
    config = ConnectorConfig.load(Path(args.config))
    connector = build_connector(config)
    try:
        connector.issue_delay(args.batch_id, date.fromisoformat(args.until), args.reason)
    finally:
        connector.adapter.close()
    print(f"delay notice recorded for {args.batch_id}: new due date {args.until}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the hedui-connector console script."""
    parser = service_parser("hedui-connector", __doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve_p = sub.add_parser("serve", help="run the exchange server")
    serve_p.add_argument("--config", required=True)
    serve_p.set_defaults(func=_serve)
    check = sub.add_parser("check-config", help="validate a config file and the keystore it names")
    check.add_argument("--config", required=True)
    check.set_defaults(func=_check)
    sub.add_parser("config-keys", help="list every config key").set_defaults(func=_keys)
    delay = sub.add_parser("delay", help="record a delay notice for a pending batch (clause 12)")
    delay.add_argument("--config", required=True)
    delay.add_argument("batch_id")
    delay.add_argument("--until", required=True, help="new due date, YYYY-MM-DD")
    delay.add_argument("--reason", required=True, help="short code: technical, volume")
    delay.set_defaults(func=_delay)
    args = parser.parse_args(argv)
    return run("hedui-connector", args)


if __name__ == "__main__":
    sys.exit(main())
