"""hedui-gateway: run the agency's exchange gateway and operate it.

hedui-gateway serve --config gateway.toml      serve until SIGTERM / Ctrl-C
hedui-gateway migrate --config gateway.toml    apply database migrations (alembic upgrade head)
hedui-gateway check-config --config FILE       validate a config, the keystore and the database schema
hedui-gateway config-keys                      every config key with its default and meaning
hedui-gateway status --config FILE             units, their health, and batches by state
hedui-gateway retry --config FILE --unit UNIT | --all   end a unit's backoff: its next cycle calls it at once
hedui-gateway resend --config FILE --unit UNIT [--batch ID ...]   put a unit's failed batches back into the outbox
hedui-gateway staff bootstrap-admin|add|revoke|list --config FILE ...   the staff register (Procedure V)
hedui-gateway roster add|end|revoke|publish|list|show|history|pending --config FILE ...   staff registered with
                                                the units in advance, signed and announced (Procedure V.(三))
hedui-gateway audit verify|head|checkpoint|export-head --config FILE   the audit chain and its signed checkpoints
hedui-gateway archive verify --config FILE      re-check every archived envelope and its place in the chain
hedui-gateway archive steps COMMISSION --config FILE   who signed each step and approval (Procedure V.(一)(二))
hedui-gateway backup --config FILE --out DIR|FILE.tar   database, keystore and audit head, while the gateway runs
hedui-gateway restore --config FILE --from BACKUP [--force]   check a backup whole, then put it in place
hedui-gateway tls install-crl --config FILE CRL   check the CA's revocation list, install it, send it to the units
hedui-gateway tls requests|sign-requests|drop-request|export-requests|import-certificates|renew --config FILE ...
                                                the units' certificate requests signed and sent back, the gateway's
                                                own certificates renewed (docs/operations.md, 'Renewing certificates')
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import and_, func, or_, select

from common.cli import operator, run, service_parser
from common.config import describe
from common.db import make_engine, reading
from common.errors import HeduiError
from common.workdays import CalendarError, WorkdayCalendar
from gateway.archive.audit import AuditHead, AuditLog
from gateway.archive.commands import add_audit_commands
from gateway.certificates import install_crl, publish_crl, revocation_source
from gateway.certificates.commands import add_certificate_commands
from gateway.config import GatewayConfig
from gateway.db import schema
from gateway.db.database import current_revision, head_revision, open_database, upgrade
from gateway.exchange.batches import ResendRefused
from gateway.exchange.store import GatewayStore
from gateway.exchange.units import RetryRefused, UnitRow
from gateway.ops.backup import backup
from gateway.ops.replica import ReplicaLeaseLost, check_replica_id
from gateway.ops.restore import restore
from gateway.procedure.staff import StaffError, StaffMember, StaffRegister
from gateway.server import build
from gateway.trust.commands import add_roster_commands
from gateway.trust.rosters import PeerRosters
from keys import keystore
from keys._files import read_bounded
from keys.announcements import MAX_BUNDLE_BYTES, dearmor, read_bundle
from keys.clock import SystemClock
from keys.crl import MAX_CRL_BYTES, CrlError
from keys.fingerprint import Algorithm
from keys.keyring import Keyring
from keys.party import is_party_id
from keys.tls import check_tls

log = logging.getLogger("hedui.gateway")

#: Dates on the command line are Beijing time (UTC+8, no daylight saving): where the agencies are.
CHINA_TIME = timezone(timedelta(hours=8), "CST")


def _serve(args: argparse.Namespace) -> None:
    config = GatewayConfig.load(Path(args.config))
    # Handlers first: a stop asked for while starting is honoured once started, with a clean shutdown.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    lost = threading.Event()

    def lease_lost() -> None:
        lost.set()
        stop.set()

    running = build(config, on_lease_lost=lease_lost)
    # A log record, not a print: with --log-format json every line a collector reads must be JSON.
    log.info("serving", extra={"party": config.agency.party_id, "port": running.port})
    stop.wait()
    running.stop()
    if lost.is_set():
        raise ReplicaLeaseLost(
            f"another gateway took replica id {config.exchange.replica_id} while this one could not renew its lease; "
            "this one stopped. Give each replica its own exchange.replica_id"
        )


def _migrate(args: argparse.Namespace) -> None:
    config = GatewayConfig.load(Path(args.config))
    engine = make_engine(config.database.url)
    before = current_revision(engine)
    upgrade(engine)
    print(f"database at revision {current_revision(engine)} (was {before or 'empty'})")
    engine.dispose()


def _check(args: argparse.Namespace) -> None:
    config = GatewayConfig.load(Path(args.config))
    # The same check serve runs at start (gateway.server.check_certificates).
    identities = check_tls(config.tls_files())
    passphrase = keystore.read_passphrase_file(config.keys.passphrase_file)
    party, trust = keystore.load(config.keys.keystore, passphrase)
    if party.party_id != config.agency.party_id:
        raise HeduiError(f"keystore belongs to {party.party_id}, config says {config.agency.party_id}")
    missing = [u.party_id for u in config.units if trust.keyring(u.party_id) is None]
    if missing:
        raise HeduiError(f"units not in the trust store: {', '.join(missing)}")
    check_replica_id(config.exchange.replica_id)
    engine = open_database(config.database.url)
    engine.dispose()
    warnings = [w for w in (identity.expiry_warning() for identity in identities) if w]
    revocations = revocation_source(config)  # a list the CA did not sign stops serve too
    if revocations is not None and revocations.overdue_warning():
        warnings.append(str(revocations.overdue_warning()))
    for warning in warnings:
        print(f"hedui-gateway: warning: {warning}", file=sys.stderr)
    noted = f" ({len(warnings)} warning{'s' if len(warnings) > 1 else ''})" if warnings else ""
    print(f"config OK: {party.party_id}, {len(config.units)} units, schema at {head_revision()}{noted}")


def _install_crl(args: argparse.Namespace) -> None:
    config = GatewayConfig.load(Path(args.config))
    try:
        data = read_bounded(args.file, MAX_CRL_BYTES, CrlError, what="certificate revocation list")
    except OSError as exc:
        raise HeduiError(f"cannot read {args.file}: {exc.strerror}") from None
    installed, new = install_crl(config, data)
    if new:
        print(f"installed {installed.summary()} as {config.tls.crl_file}; the running gateway enforces it")
    else:
        print(f"{args.file} is the list in place already ({config.tls.crl_file})")
    der = installed.der
    units = config.synchronised_units()
    engine = open_database(config.database.url)
    try:
        publish_crl(engine, der, SystemClock().now_ms(), units)
    finally:
        engine.dispose()
    print(f"queued for {len(units)} units; each acknowledges it at its next trust synchronisation")


def _backup(args: argparse.Namespace) -> None:
    result = backup(GatewayConfig.load(Path(args.config)), Path(args.out))
    print(f"backup of {result.party_id} written to {result.path} ({result.files} files, schema {result.revision})")
    print(f"audit head {result.head}: record it off the machine (docs/operations.md, 'Back up and restore')")


def _restore(args: argparse.Namespace) -> None:
    expected = AuditHead.parse(args.expected_head) if args.expected_head else None
    config = GatewayConfig.load(Path(args.config))
    result = restore(config, Path(args.source), force=args.force, expected_head=expected)
    migrated = (
        f"{result.from_revision} -> {result.revision}" if result.from_revision != result.revision else result.revision
    )
    print(f"restored {result.party_id}: {result.rows} rows, schema {migrated}, audit head {result.head} (verified)")
    print("start the gateway, then check with 'hedui-gateway status'")


def _keys(args: argparse.Namespace) -> None:
    for key, default, text in describe(GatewayConfig):
        print(f"{key}\n    default: {default}\n    {text}")


def _status(args: argparse.Namespace) -> None:
    config = GatewayConfig.load(Path(args.config))
    store = GatewayStore(open_database(config.database.url))
    with reading(store.engine) as conn:
        rows = conn.execute(
            select(
                schema.batches.c.unit_id, schema.batches.c.state, func.count(), func.sum(schema.batches.c.subject_count)
            ).group_by(schema.batches.c.unit_id, schema.batches.c.state)
        ).all()
    by_unit: dict[str, list[str]] = {}
    for unit_id, state, batches, subjects in rows:
        by_unit.setdefault(unit_id, []).append(f"{state}={batches} batches/{subjects} items")
    now = SystemClock().now_ms()
    print("times are Beijing time")
    today = datetime.fromtimestamp(now / 1000, CHINA_TIME).date()
    try:
        print(_calendar_line(WorkdayCalendar.with_file(config.exchange.holiday_file), today))
    except CalendarError as exc:
        print(f"calendar: {exc}")
    provisional = _provisional_lines(store, today)
    refusals = _refusal_lines(store)
    answer_staff = _answer_staff_lines(store)
    for unit in store.units.all():
        print(f"{unit.unit_id:32} {unit.endpoint:24} {_health(unit, now)}")
        print(f"    {_health_detail(unit, now)}")
        for line in by_unit.get(unit.unit_id, []):
            print(f"    {line}")
        for line in refusals.get(unit.unit_id, []):
            print(f"    {line}")
        for line in answer_staff.get(unit.unit_id, []):
            print(f"    {line}")
        if unit.unit_id in provisional:
            print(f"    {provisional[unit.unit_id]}")
    store.engine.dispose()


def _refusal_lines(store: GatewayStore) -> dict[str, list[str]]:
    """Per unit, its batches refused for good (failed) and those refused for now (approver_unknown, retried), by the
    unit's reason as the batch keeps it (``status: reason``, with the staff id concerned), and whether the unit
    signed its refusal (docs/exchange.md, "Signed refusals"). Codes and staff ids only, never personal data."""
    b = schema.batches.c
    retried = and_(b.state == "ready", b.last_error.like("%approver_unknown%"))
    query = (
        select(
            b.unit_id, b.state, b.last_error, func.count(), func.sum(b.subject_count), func.count(b.refusal_message_id)
        )
        .where(or_(b.state == "failed", retried))
        .group_by(b.unit_id, b.state, b.last_error)
        .order_by(b.unit_id, b.state, b.last_error)
    )
    with reading(store.engine) as conn:
        rows = conn.execute(query).all()
    lines: dict[str, list[str]] = {}
    for unit_id, state, reason, batches, items, signed in rows:
        kind = "refused" if state == "failed" else "refused for now, retried"
        proof = "signed by the unit" if signed == batches else f"{signed} signed by the unit"
        lines.setdefault(unit_id, []).append(
            f"{kind}: {batches} batches/{items} items, {reason or 'no reason kept'} ({proof})"
        )
    return lines


def _answer_staff_lines(store: GatewayStore) -> dict[str, list[str]]:
    """Per unit, the staff its stored answer sets named as responsible (Procedure V.(二)) and the version of the
    unit's roster the gateway checked them against, or that they are unverified (no roster of the unit in force when
    they answered). Staff ids and counts only."""
    a, b = schema.answer_staff.c, schema.batches.c
    query = (
        select(b.unit_id, a.staff_ids, a.roster_version, func.count())
        .join_from(schema.answer_staff, schema.batches, a.batch_id == b.batch_id)
        .group_by(b.unit_id, a.staff_ids, a.roster_version)
        .order_by(b.unit_id, a.roster_version, a.staff_ids)
    )
    with reading(store.engine) as conn:
        rows = conn.execute(query).all()
    lines: dict[str, list[str]] = {}
    for unit_id, staff_ids, version, batches in rows:
        count = f"{batches} batch{'es' if batches != 1 else ''}"
        if version is None:
            text = f"answer staff unverified: {count} (no roster of the unit in force when answered)"
        else:
            text = f"answer staff {staff_ids}: {count}, checked against the unit's roster v{version}"
        lines.setdefault(unit_id, []).append(text)
    return lines


#: ``status`` warns this many days before the calendar runs out, as the HeduiCalendarRunningOut alert does.
CALENDAR_WARNING_DAYS = 60


def _calendar_line(calendar: WorkdayCalendar, today: date) -> str:
    """How far the working-day calendar reaches, and what to do when that is soon (docs/operations.md)."""
    known = calendar.known_until(today)
    line = f"calendar: official holiday schedules known until {known.isoformat()}"
    if (known - today).days < CALENDAR_WARNING_DAYS:
        line += (
            f"; due dates after it are provisional: install the {known.year + 1} schedule in the holiday file "
            "(docs/operations.md, 'Calendar running out')"
        )
    return line


def _provisional_lines(store: GatewayStore, today: date) -> dict[str, str]:
    """Per unit, its receipted batches whose due dates are provisional (counted across a year without an official
    schedule), and how many items are past such a date (provisionally overdue: not marked overdue)."""
    b = schema.batches.c
    with reading(store.engine) as conn:
        rows = conn.execute(
            select(b.unit_id, func.count(), func.sum(b.subject_count), func.max(b.due))
            .where(b.state == "receipted", b.due_provisional.is_(True))
            .group_by(b.unit_id)
        ).all()
    late = store.provisional.provisionally_overdue(today)
    lines = {}
    for unit_id, batches, items, latest in rows:
        line = f"provisional due dates: {batches} batches/{items} items, latest {latest.isoformat()}"
        if late.get(unit_id):
            line += f"; {late[unit_id]} items provisionally overdue (past a provisional date, not marked overdue)"
        lines[unit_id] = line
    return lines


def _health(unit: UnitRow, now_ms: int) -> str:
    if not unit.enabled or unit.exchange_mode == "media":
        state = "disabled" if not unit.enabled else "media only"
        return f"{state} (not called)" if unit.consecutive_failures == 0 else f"{state}, down when last called"
    if unit.consecutive_failures == 0:
        return "ok"
    failures = f"{unit.consecutive_failures} failure{'s' if unit.consecutive_failures > 1 else ''}"
    if unit.next_attempt_ms > now_ms:
        return f"down: {failures}, backing off"
    return f"down: {failures}, tried again at the next cycle"


def _health_detail(unit: UnitRow, now_ms: int) -> str:
    """Last success, and for a unit that is down the last error (status and the unit's reason code: codes only,
    never personal data) and the next attempt."""
    parts = [f"last success {_moment(unit.last_success_ms) if unit.last_success_ms is not None else 'never'}"]
    if unit.consecutive_failures:
        parts.append(f"last error {unit.last_error or 'unknown'}")
        due = "at the next cycle" if unit.next_attempt_ms <= now_ms else _moment(unit.next_attempt_ms)
        parts.append(f"next attempt {due} ('hedui-gateway retry --unit {unit.unit_id}' to try now)")
    return "; ".join(parts)


def _moment(moment_ms: int) -> str:
    return datetime.fromtimestamp(moment_ms / 1000, CHINA_TIME).strftime("%Y-%m-%d %H:%M:%S")


def _resend(args: argparse.Namespace) -> None:
    config = GatewayConfig.load(Path(args.config))
    unit = next((u for u in config.units if u.party_id == args.unit), None)
    if unit is None:
        named = args.unit if is_party_id(args.unit) else "--unit"
        raise ResendRefused(f"{named} is not a unit in [[units]] of {args.config}; nothing was re-queued")
    store = GatewayStore(open_database(config.database.url))
    try:
        audit, now = AuditLog(store.engine), SystemClock().now_ms()
        resent = store.batches.resend_failed(unit.party_id, args.batch or [], audit=audit, actor=operator(), now_ms=now)
    finally:
        store.engine.dispose()
    if not resent:
        print(f"{unit.party_id} has no failed batches; nothing was re-queued")
        return
    for batch in resent:
        print(f"  {batch.batch_id}  {batch.items} items  (was refused: {batch.last_error or 'no reason kept'})")
    items = sum(b.items for b in resent)
    print(f"re-queued {len(resent)} batches ({items} items) for {unit.party_id}: sent again at its next cycle")
    if not unit.enabled or unit.exchange_mode == "media":
        print(f"note: {unit.party_id} is disabled or media-only in the config; the batches wait until that changes")


def _retry(args: argparse.Namespace) -> None:
    config = GatewayConfig.load(Path(args.config))
    configured = [u.party_id for u in config.units]
    if args.all:
        wanted = configured
    elif args.unit in configured:
        wanted = [args.unit]
    else:
        named = args.unit if is_party_id(args.unit) else "--unit"
        raise RetryRefused(f"{named} is not a unit in [[units]] of {args.config}; nothing was changed")
    store = GatewayStore(open_database(config.database.url))
    try:
        audit, now = AuditLog(store.engine), SystemClock().now_ms()
        retried, up = store.units.retry(wanted, audit=audit, actor=operator(), now_ms=now)
    finally:
        store.engine.dispose()
    for unit in retried:
        due = "already due" if unit.was_due_ms <= now else f"was due {_moment(unit.was_due_ms)} Beijing time"
        print(
            f"  {unit.unit_id}  {unit.consecutive_failures} failures, last error {unit.last_error or 'unknown'} ({due})"
        )
    for unit_id in up:
        if not args.all:
            print(f"{unit_id} is not down; nothing to retry")
    if retried:
        print(
            f"backoff ended for {len(retried)} unit{'s' if len(retried) > 1 else ''}: called at the next cycle "
            "(within [schedule] dispatch_interval_seconds); 'hedui-gateway status' shows the outcome"
        )
    elif args.all:
        print("no unit is down; nothing to retry")


def _day_start_ms(text: str, *, days_later: int = 0) -> int:
    try:
        day = date.fromisoformat(text)
    except ValueError as exc:
        raise StaffError(f"dates are YYYY-MM-DD, not {text[:20]!r}") from exc
    moment = datetime(day.year, day.month, day.day, tzinfo=CHINA_TIME) + timedelta(days=days_later)
    return int(moment.timestamp() * 1000)


def _day(moment_ms: int | None) -> str:
    if moment_ms is None:
        return "open"
    return datetime.fromtimestamp(moment_ms / 1000, CHINA_TIME).strftime("%Y-%m-%d %H:%M")


def _window(args: argparse.Namespace, now_ms: int) -> tuple[int, int | None]:
    """--valid-from (start of that day, default now) and --valid-until (through the end of that day), Beijing time."""
    valid_from = _day_start_ms(args.valid_from) if args.valid_from else now_ms
    valid_until = _day_start_ms(args.valid_until, days_later=1) if args.valid_until else None
    return valid_from, valid_until


def _staff_key(args: argparse.Namespace, now_ms: int) -> bytes:
    """The current Ed25519 key of the staff member's public bundle (``hedui-keys export``), after showing it."""
    path = Path(args.public_key_file)
    if path.stat().st_size > 2 * MAX_BUNDLE_BYTES:
        raise StaffError(f"{path} is too large to be a public key bundle")
    bundle = read_bundle(dearmor(path.read_text(encoding="utf-8", errors="replace")))
    if not bundle.party_id.startswith("staff."):
        raise StaffError(
            f"{path} is the bundle of {bundle.party_id}, not of a staff member (their party id starts with 'staff.')"
        )
    record = Keyring(bundle.keys).current(Algorithm.ED25519, now_ms)
    if record is None:
        raise StaffError(f"the bundle of {bundle.party_id} has no signing key valid now")
    if args.fingerprint:
        bundle.require_fingerprint(args.fingerprint)
    print(f"key of {bundle.party_id}")
    print(f"  bundle fingerprint:      {bundle.fingerprint}")
    print(f"  signing key fingerprint: {record.public.fingerprint}")
    if not args.fingerprint:
        print("  compare the bundle fingerprint with the staff member's key letter ('hedui-keys letter')")
    return record.public.raw


@contextmanager
def _audit_log(config_path: str) -> Iterator[AuditLog]:
    config = GatewayConfig.load(Path(config_path))
    engine = open_database(config.database.url)
    try:
        yield AuditLog(engine)
    finally:
        engine.dispose()


@contextmanager
def _staff_register(config_path: str) -> Iterator[StaffRegister]:
    with _audit_log(config_path) as audit:
        yield StaffRegister(audit.engine, audit)


def _staff_line(member: StaffMember, now_ms: int) -> str:
    if member.revoked_at_ms is not None and member.revoked_at_ms <= now_ms:
        state = "revoked"
    elif member.active_at(now_ms):
        state = "active"
    else:
        state = "expired" if member.valid_until_ms is not None and now_ms >= member.valid_until_ms else "pending"
    window = f"{_day(member.valid_from_ms)} .. {_day(member.valid_until_ms)}"
    return (
        f"{member.staff_id:12} {state:8} {member.roles_text:32} {window}\n"
        f"             {member.name}; key {member.public_key.fingerprint}; registered by {member.registered_by}"
    )


def _staff_bootstrap(args: argparse.Namespace) -> None:
    now = SystemClock().now_ms()
    valid_from, valid_until = _window(args, now)
    public_key = _staff_key(args, now)
    with _staff_register(args.config) as register:
        member = register.bootstrap_admin(
            args.staff_id,
            name=args.name,
            public_key=public_key,
            valid_from_ms=valid_from,
            valid_until_ms=valid_until,
            now_ms=now,
            roles=args.roles,
        )
    print(f"registered the first admin {member.staff_id} ({member.roles_text})")


def _no_roster_yet(register: StaffRegister, command: str) -> None:
    """Once the gateway has a roster, members change only with it: a change the units were not told of would make
    the gateway accept what they refuse (Procedure V.(三))."""
    if PeerRosters(register.engine).own() is not None:
        raise StaffError(
            f"the staff register is announced to the units as a signed roster: use 'hedui-gateway roster {command}' "
            "with the admin's staff keystore instead (docs/operations.md, 'Registering exchange staff with each "
            "other')"
        )


def _staff_add(args: argparse.Namespace) -> None:
    now = SystemClock().now_ms()
    valid_from, valid_until = _window(args, now)
    public_key = _staff_key(args, now)
    with _staff_register(args.config) as register:
        _no_roster_yet(register, "add")
        member = register.register(
            args.admin,
            args.staff_id,
            name=args.name,
            roles=args.roles,
            public_key=public_key,
            valid_from_ms=valid_from,
            valid_until_ms=valid_until,
            now_ms=now,
        )
    print(f"registered {member.staff_id} ({member.roles_text}) by {member.registered_by}")


def _staff_revoke(args: argparse.Namespace) -> None:
    with _staff_register(args.config) as register:
        _no_roster_yet(register, "revoke")
        member = register.revoke(args.admin, args.staff_id, now_ms=SystemClock().now_ms(), reason=args.reason)
    print(f"revoked {member.staff_id} ({args.reason}); their approvals are refused from now on")


def _staff_list(args: argparse.Namespace) -> None:
    now = SystemClock().now_ms()
    with _staff_register(args.config) as register:
        members = register.list()
    for member in members:
        print(_staff_line(member, now))
    if not members:
        print("the staff register is empty: start with 'hedui-gateway staff bootstrap-admin'")


def _add_staff_and_audit(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    staff = sub.add_parser("staff", help="the staff register (Procedure V): bootstrap-admin, add, revoke, list")
    staff_sub = staff.add_subparsers(dest="staff_command", required=True, metavar="STAFF_COMMAND")

    def member_arguments(command: argparse.ArgumentParser) -> None:
        command.add_argument("--staff-id", required=True, help="e.g. S-0001 (1-32 of A-Z, a-z, 0-9, '-')")
        command.add_argument("--name", required=True, help="the member's name (shown in the register, never logged)")
        command.add_argument(
            "--public-key-file", required=True, help="the member's public bundle from 'hedui-keys export'"
        )
        command.add_argument("--fingerprint", help="the bundle fingerprint from the member's key letter (checked)")
        command.add_argument("--valid-from", help="YYYY-MM-DD, Beijing time (default: now)")
        command.add_argument("--valid-until", help="YYYY-MM-DD, last day of validity, Beijing time (default: open)")

    boot = staff_sub.add_parser("bootstrap-admin", help="register the first admin into an empty register")
    member_arguments(boot)
    boot.add_argument("--roles", default="admin", help="comma-separated, must include admin (default: admin)")
    boot.set_defaults(func=_staff_bootstrap)
    add = staff_sub.add_parser("add", help="register a staff member (needs an admin)")
    member_arguments(add)
    add.add_argument("--roles", required=True, help="comma-separated: intake, review, exchange, report, admin")
    add.add_argument("--admin", required=True, help="staff id of the admin making the change")
    add.set_defaults(func=_staff_add)
    revoke = staff_sub.add_parser("revoke", help="revoke a staff member from now on (needs an admin)")
    revoke.add_argument("--staff-id", required=True)
    revoke.add_argument("--admin", required=True, help="staff id of the admin making the change")
    revoke.add_argument("--reason", required=True, help="short code, e.g. left, moved, key-lost")
    revoke.set_defaults(func=_staff_revoke)
    staff_sub.add_parser("list", help="every member with state, roles, window and key fingerprint").set_defaults(
        func=_staff_list
    )
    for command in (boot, add, revoke, staff_sub.choices["list"]):
        command.add_argument("--config", required=True)

    add_audit_commands(sub)
    add_roster_commands(sub)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the hedui-gateway console script."""
    parser = service_parser("hedui-gateway", __doc__)
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
    resend = sub.add_parser(
        "resend", help="put a unit's failed (refused) batches back into the outbox, after the cause is fixed"
    )
    resend.add_argument("--config", required=True)
    resend.add_argument("--unit", required=True, help="the unit's party id, e.g. unit.220100.tax")
    resend.add_argument(
        "--batch", action="append", metavar="BATCH_ID", help="only this failed batch (repeatable; default: all)"
    )
    resend.set_defaults(func=_resend)
    retry = sub.add_parser(
        "retry", help="end the backoff of a unit that is down, after the fault is fixed: it is called at once"
    )
    retry.add_argument("--config", required=True)
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("--unit", help="the unit's party id, e.g. unit.220100.tax")
    which.add_argument("--all", action="store_true", help="every unit in [[units]] that is down")
    retry.set_defaults(func=_retry)
    _add_staff_and_audit(sub)
    taken = sub.add_parser("backup", help="back up database, keystore and audit head (consistent while serving)")
    taken.add_argument("--config", required=True)
    taken.add_argument("--out", required=True, help="a new or empty folder, or a new FILE.tar")
    taken.set_defaults(func=_backup)
    back = sub.add_parser("restore", help="check a backup (hashes, keystore, schema, audit chain), then restore it")
    back.add_argument("--config", required=True)
    back.add_argument("--from", dest="source", required=True, help="the backup folder or .tar")
    back.add_argument("--expected-head", help="SEQ:HEX recorded off the machine: the restored chain must hold it")
    back.add_argument("--force", action="store_true", help="replace a database and keystore that are not empty")
    back.set_defaults(func=_restore)
    tls_command = sub.add_parser(
        "tls",
        help="certificates renewed over the wire (requests, sign-requests, renew ...) and the CA's revocation list",
    )
    tls_sub = tls_command.add_subparsers(dest="tls_command", required=True, metavar="TLS_COMMAND")
    install = tls_sub.add_parser(
        "install-crl", help="check a revocation list ('hedui-keys ca crl'), install it over [tls] crl_file, send it on"
    )
    install.add_argument("--config", required=True)
    install.add_argument("file", help="the CRL file (DER or PEM)")
    install.set_defaults(func=_install_crl)
    add_certificate_commands(tls_sub)
    args = parser.parse_args(argv)
    return run("hedui-gateway", args)


if __name__ == "__main__":
    sys.exit(main())
