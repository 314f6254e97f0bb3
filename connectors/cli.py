"""hedui-connector: run a sharing unit's exchange server and operate it.

hedui-connector serve --config connector.toml      serve until SIGTERM / Ctrl-C
hedui-connector check-config --config FILE         validate a config without starting anything
hedui-connector config-keys                        every config key with its default and meaning
hedui-connector delay --config FILE BATCH --until YYYY-MM-DD --reason technical
                                                   written delay notice (clause 12: at most 5 working days)
hedui-connector test-query --config FILE --category tax [--from YYYY-MM --to YYYY-MM] < ids.txt
                                                   what the unit would answer for these people (before going live)
hedui-connector tls install-crl --config FILE CRL  install the CA's revocation list by hand (the gateway sends it too)
hedui-connector tls request-renewal --config FILE  renew the server certificate now: a new key made here, a request
                                                   sent to the gateways (done by itself before the certificate ends)
hedui-connector tls renewal-status --config FILE   the certificate in use, the outstanding request, the last ones
hedui-connector roster init-admin|add|end|revoke|list|history|pending|on-duty|migrate-check --config FILE ...
                                                   the unit's exchange staff, registered with the gateways in
                                                   advance (Procedure V.(三)), and the gateways' rosters
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from datetime import UTC, date, datetime
from pathlib import Path

from google.protobuf import text_format

from common.categories import UNIT_DATA, data_category_by_name, data_category_name
from common.cli import run, service_parser
from common.config import ConfigError, describe
from common.db import make_engine
from common.idnumber import InvalidIdNumber, parse_id_number
from connectors.adapters.base import LookupContext
from connectors.config import ConnectorConfig
from connectors.server import build_adapter, build_connector, gateways_of, revocation_source, serve
from connectors.store import ConnectorStore
from connectors.trust.commands import add_roster_commands
from connectors.trust.renewal import CertificateRenewal
from keys import keystore
from keys._files import read_bounded
from keys.crl import MAX_CRL_BYTES, CrlError
from keys.tls import check_tls, load_certificate

log = logging.getLogger("hedui.connector")


def _serve(args: argparse.Namespace) -> None:
    config = ConnectorConfig.load(Path(args.config))
    # Handlers first: a stop asked for while starting is honoured once started, with a clean shutdown.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    running = serve(config)
    # A log record, not a print: with --log-format json every line a collector reads must be JSON.
    log.info("serving", extra={"party": config.unit.party_id, "listen": config.server.listen, "port": running.port})
    stop.wait()
    running.stop(grace=5.0)


def _check(args: argparse.Namespace) -> None:
    config = ConnectorConfig.load(Path(args.config))
    # The same check serve runs at start (connectors.server.check_certificates).
    identities = check_tls(config.tls_files())
    connector = build_connector(config)
    connector.adapter.close()
    # Doubtful but not wrong: a record field no query returns, a query without the income period.
    adapter_warnings: list[str] = list(getattr(connector.adapter, "warnings", ()))
    # Procedure V.(三): staff are registered per gateway; a gateway we cannot open envelopes from is a typo or a
    # gateway whose bundle was never imported, and its staff would never be matched.
    unknown = sorted(
        {entry.gateway for entry in config.staff if connector.courier.trust.keyring(entry.gateway) is None}
    )
    if unknown:
        raise ConfigError(
            f"[[staff]] gateway {', '.join(unknown)} is not a party in the keystore's trust store: correct the party "
            "id, or import that gateway's bundle first ('hedui-keys import BUNDLE --fingerprint ...')"
        )
    warnings = [w for w in (identity.expiry_warning() for identity in identities) if w] + adapter_warnings
    if identities:  # a list the CA did not sign stops serve too
        overdue = revocation_source(config, lambda: identities[0].ca_pem).overdue_warning()
        warnings += [overdue] if overdue else []
    for warning in warnings:
        print(f"hedui-connector: warning: {warning}", file=sys.stderr)
    noted = f" ({len(warnings)} warning{'s' if len(warnings) > 1 else ''})" if warnings else ""
    print(f"config OK: {config.unit.party_id} ({config.unit.category}), adapter {config.adapter.kind}{noted}")


def _install_crl(args: argparse.Namespace) -> None:
    config = ConnectorConfig.load(Path(args.config))
    identities = check_tls(config.tls_files())
    if not identities:
        raise ConfigError("insecure_plaintext: without TLS there are no certificates to revoke")
    try:
        data = read_bounded(args.file, MAX_CRL_BYTES, CrlError, what="certificate revocation list")
    except OSError as exc:
        raise ConfigError(f"cannot read {args.file}: {exc.strerror}") from None
    installed = revocation_source(config, lambda: identities[0].ca_pem).put(data)
    if installed is None:
        print(f"{args.file} is the list in place already ({config.crl_path})")
    else:
        print(f"installed {installed.summary()} as {config.crl_path}; the running connector enforces it")


def _renewal(config: ConnectorConfig) -> CertificateRenewal:
    """The renewal of the config's server certificate, with the store and the gateways of its keystore."""
    if not config.tls_files():
        raise ConfigError("insecure_plaintext: without TLS there is no certificate to renew")
    pending = config.renewal_key_path
    assert pending is not None
    gateways: list[str] = list(config.tls.renewal_gateways)
    if not gateways:
        _, trust = keystore.load(config.keys.keystore, keystore.read_passphrase_file(config.keys.passphrase_file))
        gateways = gateways_of(trust)
    return CertificateRenewal(
        ConnectorStore(make_engine(config.database.url)).engine,  # its tables (trust items among them) made if new
        config.tls_files()[0],
        pending_key=pending,
        gateways=lambda: gateways,
        renew_before_days=config.tls.renew_before_days,
        timeout_days=config.tls.renewal_timeout_days,
    )


def _request_renewal(args: argparse.Namespace) -> None:
    config = ConnectorConfig.load(Path(args.config))
    renewal = _renewal(config)
    try:
        outcome = renewal.request()
    finally:
        renewal.engine.dispose()
    request = outcome.outstanding
    names = ", ".join(request.profile.names) or "none"
    if not outcome.new:
        print(
            f"a request is outstanding since {_moment(request.requested_at_ms)} (key {request.key_fingerprint}), "
            f"sent to {', '.join(request.gateways)}: waiting for its certificate"
        )
        return
    replaced = f" (the previous one was given up: {outcome.replaced})" if outcome.replaced else ""
    print(f"requested a certificate for {request.profile.party} ({names}; {request.profile.usages}){replaced}")
    print(f"  new key {request.key_fingerprint}, kept in {renewal.pending_key} (mode 0600; it never leaves this host)")
    print(
        f"  sent to {', '.join(request.gateways)} at the next trust synchronisation; the running connector installs "
        "the certificate when it comes ('tls renewal-status')"
    )


def _moment(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _renewal_status(args: argparse.Namespace) -> None:
    config = ConnectorConfig.load(Path(args.config))
    renewal = _renewal(config)
    try:
        now = renewal.clock.now_ms()
        cert = load_certificate(renewal.current_certificate())
        ends = _moment(int(cert.not_valid_after_utc.timestamp() * 1000))
        print(f"certificate {renewal.files.cert}: serial {cert.serial_number:x}, ends {ends}")
        print(f"  {renewal.days_left(now):.1f} days left", end="")
        if renewal.renew_before_days:
            due = " (due now)" if renewal.due(now) else ""
            print(f"; renewed automatically {renewal.renew_before_days} days before it ends{due}")
        else:
            print("; renewed on demand only (tls.renew_before_days = 0)")
        outstanding = renewal.outstanding()
        if outstanding is None:
            print("no request outstanding")
        else:
            hours = (now - outstanding.requested_at_ms) / 3_600_000
            print(f"request outstanding for {hours:.1f} hours: key {outstanding.key_fingerprint}")
            print(f"  sent to {', '.join(outstanding.gateways)}")
        for row in renewal.history():
            line = f"  #{row.request_id} requested {_moment(row.requested_at_ms)}: {row.state}"
            if row.answered_at_ms is not None:
                line += f" {_moment(row.answered_at_ms)}"
            if row.serial:
                line += f", serial {row.serial} from {row.answered_by}"
            if row.detail:
                line += f" ({row.detail})"
            print(line)
    finally:
        renewal.engine.dispose()


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


def _months(text: str, what: str) -> tuple[int, int]:
    try:
        year, month = (int(part) for part in text.split("-"))
        date(year, month, 1)
    except ValueError:
        raise ConfigError(f"{what} must be a month, YYYY-MM") from None
    return year, month


#: test-query is for trying a mapping on a few people, not for exporting the unit's data.
MAX_TEST_QUERY_PEOPLE = 100
MAX_TEST_QUERY_INPUT = 64 * 1024


def _month(index: int) -> tuple[int, int]:
    year, month0 = divmod(index, 12)
    return year, month0 + 1


def _date(text: str, what: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{what} must be a date, YYYY-MM-DD") from None


def _test_query(args: argparse.Namespace) -> None:
    """Run the configured query or file for some people and print what the unit would answer. For the unit's DBA,
    before going live: the output is the unit's own data on its own terminal; nothing is logged, stored or sent."""
    config = ConnectorConfig.load(Path(args.config))
    category = data_category_by_name(args.category)
    if category not in UNIT_DATA[config.unit_category]:
        served = ", ".join(data_category_name(c) for c in UNIT_DATA[config.unit_category])
        raise ConfigError(f"a {config.unit.category} unit answers {served}, not {args.category}")
    # ID numbers come on standard input, never as arguments: a command line is readable by every local user
    # (/proc/PID/cmdline) and sudo writes it to the system log.
    if sys.stdin.isatty():
        print("ID numbers, one per line; end with Ctrl-D:", file=sys.stderr)
    lines = [line.strip() for line in sys.stdin.read(MAX_TEST_QUERY_INPUT).splitlines()]
    id_numbers = []
    for position, text in enumerate((line for line in lines if line), 1):
        try:
            id_numbers.append(parse_id_number(text).value)
        except InvalidIdNumber as exc:
            raise ConfigError(f"ID number {position} on standard input: {exc}") from None
    if not id_numbers or len(id_numbers) > MAX_TEST_QUERY_PEOPLE:
        raise ConfigError(f"give 1 to {MAX_TEST_QUERY_PEOPLE} ID numbers on standard input, one per line")
    today = date.today()
    last_month = today.year * 12 + today.month - 2  # the last full month, counted in months from year 0, January
    context = LookupContext(
        categories=(category,),
        income_from=_months(args.income_from, "--from") if args.income_from else _month(last_month - 5),
        income_to=_months(args.income_to, "--to") if args.income_to else _month(last_month),
        assets_as_of=_date(args.as_of, "--as-of") if args.as_of else today,
        produced_at_ms=int(time.time() * 1000),
    )
    adapter = build_adapter(config)
    try:
        found = adapter.fetch(id_numbers, context)
    finally:
        adapter.close()
    (y0, m0), (y1, m1) = context.income_from, context.income_to
    period = f"{y0}-{m0:02d} to {y1}-{m1:02d}"
    print(f"{data_category_name(category)}: income period {period}, assets as of {context.assets_as_of}")
    for id_number in id_numbers:
        findings = found.get(id_number, [])
        print(f"\n{id_number}: {len(findings) or 'no'} record{'s' if len(findings) != 1 else ''}")
        for finding in findings:
            body = getattr(finding.record, finding.record.WhichOneof("body") or "")
            print(f"  name: {finding.name}")
            for line in text_format.MessageToString(body, as_utf8=True).splitlines():
                print(f"    {line}")


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
    test = sub.add_parser(
        "test-query",
        help="run the query (or file) of one data category for the people whose ID numbers come on standard input "
        "(one per line) and print what would be answered",
    )
    test.add_argument("--config", required=True)
    test.add_argument("--category", required=True, help="data category, e.g. tax, deposits, real_estate")
    test.add_argument("--from", dest="income_from", help="first month of the income period, YYYY-MM")
    test.add_argument("--to", dest="income_to", help="last month of the income period, YYYY-MM (default: last month)")
    test.add_argument("--as-of", help="date assets are reported for, YYYY-MM-DD (default: today)")
    test.set_defaults(func=_test_query)
    tls_command = sub.add_parser(
        "tls", help="the server certificate's renewal and the CA's revocation list (request-renewal, install-crl)"
    )
    tls_sub = tls_command.add_subparsers(dest="tls_command", required=True, metavar="TLS_COMMAND")
    install = tls_sub.add_parser("install-crl", help="check a revocation list and install it (by hand)")
    install.add_argument("--config", required=True)
    install.add_argument("file", help="the CRL file (DER or PEM)")
    install.set_defaults(func=_install_crl)
    request = tls_sub.add_parser(
        "request-renewal",
        help="renew the server certificate now: a new key made here and a certificate request sent to the gateways "
        "(nothing new while a request is outstanding)",
    )
    request.add_argument("--config", required=True)
    request.set_defaults(func=_request_renewal)
    status = tls_sub.add_parser("renewal-status", help="the certificate in use and the renewal requests")
    status.add_argument("--config", required=True)
    status.set_defaults(func=_renewal_status)
    add_roster_commands(sub)
    args = parser.parse_args(argv)
    return run("hedui-connector", args)


if __name__ == "__main__":
    sys.exit(main())
