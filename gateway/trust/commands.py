"""``hedui-gateway roster``: register the agency's exchange staff with the units in advance (Procedure V.(三)).

Every change is made by an admin with their own staff key and the gateway's key, stored as the next signed roster
version and published to every unit in [[units]] (delivered by the running gateway's trust synchronisation):

  roster add      register a member; they take effect after the notice ([staff] roster_notice_working_days)
  roster end      end a member's validity, by default when the notice ends
  roster revoke   revoke a member: at the end of the notice, or with --urgent at once (a lost or stolen key)
  roster publish  sign the register as it is (the first version of a gateway that had staff before rosters)
  roster list     members of a roster, with names: on this terminal only, never in a log
  roster show     one version in full
  roster history  every version held, and for our own which units have acknowledged it
  roster pending  versions not yet in force, ours and the units'
  roster resend   offer a unit again the versions it refused, once the cause is fixed
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine

from common.cli import operator
from common.dates import beijing_moment_ms, beijing_text
from common.errors import HeduiError
from common.workdays import WorkdayCalendar
from gateway.archive.audit import AuditLog
from gateway.archive.audit import lock as audit_lock
from gateway.config import GatewayConfig
from gateway.db.database import open_database
from gateway.procedure.staff import StaffRegister
from gateway.trust.items import TrustItems
from gateway.trust.rosters import ROSTER_ITEM, OwnRoster, PeerRosters
from keys import keystore
from keys.clock import SystemClock
from keys.handles import SigningKey
from keys.roster import Notice, Roster, RosterHistory, RosterMember
from keys.staffkeys import load_staff_signing_key, read_staff_bundle


class RosterCommandError(HeduiError):
    """A roster command cannot run as asked (an unknown party or version, a date that is not one)."""

    code = "roster_command"


@dataclass
class _Context:
    config: GatewayConfig
    engine: Engine

    def notice(self) -> Notice:
        calendar = WorkdayCalendar.with_file(self.config.exchange.holiday_file)
        return Notice(calendar, self.config.staff.roster_notice_working_days)

    def own(self) -> OwnRoster:
        passphrase = keystore.read_passphrase_file(self.config.keys.passphrase_file)
        party, _ = keystore.load(self.config.keys.keystore, passphrase)
        if party.party_id != self.config.agency.party_id:
            raise RosterCommandError(f"keystore belongs to {party.party_id}, config says {self.config.agency.party_id}")
        register = StaffRegister(self.engine, AuditLog(self.engine))
        return OwnRoster(register, party, notice=self.notice(), units=self.config.synchronised_units())


@contextmanager
def _context(args: argparse.Namespace) -> Iterator[_Context]:
    config = GatewayConfig.load(Path(args.config))
    engine = open_database(config.database.url)
    try:
        yield _Context(config, engine)
    finally:
        engine.dispose()


def _moment(text: str) -> int:
    try:
        return beijing_moment_ms(text)
    except ValueError as exc:
        raise RosterCommandError(str(exc)) from None


def _day_end(text: str) -> int:
    """--valid-until YYYY-MM-DD: through the end of that day."""
    try:
        return beijing_moment_ms(text, end_of_day=True)
    except ValueError as exc:
        raise RosterCommandError(str(exc)) from None


_show = beijing_text


def _admin_key(args: argparse.Namespace, now_ms: int) -> SigningKey:
    _, key = load_staff_signing_key(Path(args.admin_keystore), passphrase_file=args.passphrase_file, now_ms=now_ms)
    return key


def _made(roster: Roster | None, units: int, what: str) -> None:
    if roster is None:
        print(f"{what}; the member holds no exchange or admin role, so the roster the units hold is unchanged")
        return
    print(f"{what}: roster version {roster.version}, in force from {_show(roster.effective_at_ms)} Beijing time")
    print(f"published to {units} units; the running gateway delivers it ('hedui-gateway roster history' shows acks)")


def _add(args: argparse.Namespace) -> None:
    now = SystemClock().now_ms()
    bundle, record = read_staff_bundle(Path(args.public_key_file), fingerprint=args.fingerprint, now_ms=now)
    print(f"key of {bundle.party_id}")
    print(f"  bundle fingerprint:      {bundle.fingerprint}")
    print(f"  signing key fingerprint: {record.public.fingerprint}")
    print("  the bundle fingerprint matches the staff member's key letter")
    with _context(args) as ctx:
        own = ctx.own()
        roster = own.add(
            args.admin, _admin_key(args, now), args.staff_id, name=args.name, roles=args.roles,
            public_key=record.public.raw, now_ms=now,
            valid_from_ms=_moment(args.valid_from) if args.valid_from else None,
            valid_until_ms=_day_end(args.valid_until) if args.valid_until else None,
        )  # fmt: skip
        _made(roster, len(own.units), f"registered {args.staff_id}")


def _end(args: argparse.Namespace) -> None:
    now = SystemClock().now_ms()
    with _context(args) as ctx:
        own = ctx.own()
        at = _moment(args.at) if args.at else None
        roster = own.end(args.admin, _admin_key(args, now), args.staff_id, now_ms=now, at_ms=at)
        _made(roster, len(own.units), f"{args.staff_id} ends at {_show(at or own.earliest_effective(now))}")


def _revoke(args: argparse.Namespace) -> None:
    now = SystemClock().now_ms()
    with _context(args) as ctx:
        own = ctx.own()
        roster = own.revoke(
            args.admin, _admin_key(args, now), args.staff_id, now_ms=now, reason=args.reason, urgent=args.urgent
        )
        when = "now" if args.urgent else f"at {_show(own.earliest_effective(now))}"
        _made(roster, len(own.units), f"{args.staff_id} revoked {when} ({args.reason})")


def _publish(args: argparse.Namespace) -> None:
    now = SystemClock().now_ms()
    with _context(args) as ctx:
        own = ctx.own()
        changes = own.unsigned_changes()
        print("the next version signs the register as it is; against the latest signed version it differs in:")
        for staff_id, what in changes:
            print(f"  {staff_id}: {what}")
        if not changes:
            print("  nothing")
        _made(own.publish(args.admin, _admin_key(args, now), now_ms=now), len(own.units), "roster signed")


def _history_of(ctx: _Context, party: str | None) -> tuple[str, RosterHistory]:
    party_id = party or ctx.config.agency.party_id
    history = PeerRosters(ctx.engine).history(party_id)
    if history is None:
        whose = "our own roster has no version yet: 'hedui-gateway roster publish'" if party is None else party_id
        raise RosterCommandError(f"no roster held: {whose}")
    return party_id, history


def _member_line(member: RosterMember, history: RosterHistory, now_ms: int) -> str:
    state = history.status(member.staff_id, now_ms)
    window = f"{_show(member.valid_from_ms)} .. {_show(member.valid_until_ms)}"
    revoked = f"; revoked {_show(member.revoked_at_ms)}" if member.revoked_at_ms else ""
    return (
        f"{member.staff_id:12} {state:8} {','.join(member.roles):24} {window}{revoked}\n"
        f"             {member.name}; key {member.public_key.fingerprint}"
    )


def _list(args: argparse.Namespace) -> None:
    # The names go to this terminal only: never into a log line (staff names are personal data).
    now = SystemClock().now_ms()
    with _context(args) as ctx:
        party, history = _history_of(ctx, args.party)
    latest = history.latest
    assert latest is not None
    in_force = history.in_force(now)
    print(f"roster of {party}: version {latest.roster.version} held, {in_force.version if in_force else 'none'} "
          "in force now (times Beijing)")  # fmt: skip
    for member in latest.roster.members:
        print(_member_line(member, history, now))


def _show_version(args: argparse.Namespace) -> None:
    with _context(args) as ctx:
        party, history = _history_of(ctx, args.party)
    number = args.version or history.held_version
    if not 1 <= number <= history.held_version:
        raise RosterCommandError(f"version {number} of {party} is not held (1 to {history.held_version})")
    signed = history.versions[number - 1]
    roster = signed.roster
    print(f"roster of {party}, version {roster.version}")
    print(f"  issued     {_show(roster.issued_at_ms)} by admin {roster.admin_staff_id}")
    print(f"  effective  {_show(roster.effective_at_ms)}")
    print(f"  digest     {signed.digest.hex()}")
    print(f"  previous   {roster.previous_digest.hex() or '-'}")
    print(f"  signed by  key {signed.signer_key_id.hex()}")
    for member in roster.members:
        revoked = f", revoked {_show(member.revoked_at_ms)}" if member.revoked_at_ms else ""
        print(f"  {member.staff_id:12} {','.join(member.roles):24} {_show(member.valid_from_ms)} .. "
              f"{_show(member.valid_until_ms)}{revoked}  {member.name}")  # fmt: skip


def _history(args: argparse.Namespace) -> None:
    with _context(args) as ctx:
        party, history = _history_of(ctx, args.party)
        acks = TrustItems(ctx.engine).receipts() if party == ctx.config.agency.party_id else {}
    for signed in history.versions:
        roster = signed.roster
        times = f"issued {_show(roster.issued_at_ms)}  effective {_show(roster.effective_at_ms)}"
        print(f"v{roster.version:<4} {times}  admin {roster.admin_staff_id:10} {len(roster.members)} members  "
              f"{signed.digest.hex()[:16]}")  # fmt: skip
        for peer, state in sorted(acks.get(signed.item_sha256, {}).items()):
            print(f"      {peer:32} {state}")


def _resend(args: argparse.Namespace) -> None:
    now = SystemClock().now_ms()
    with _context(args) as ctx:
        if args.unit not in {u.party_id for u in ctx.config.units}:
            raise RosterCommandError(f"{args.unit[:64]} is not a unit in [[units]]")
        with ctx.engine.begin() as conn:
            audit_lock(conn)
            again = TrustItems(ctx.engine).resend(conn, args.unit, ROSTER_ITEM)
            if again:
                AuditLog(ctx.engine).append(
                    conn, at_ms=now, actor=operator(), action="roster.resend", after=args.unit,
                    detail=f"items={len(again)}",
                )  # fmt: skip
        ours = PeerRosters(ctx.engine).own()
    if not again:
        print(f"{args.unit} refused no version of our roster: nothing to send again")
        return
    versions = [s.roster.version for s in (ours.versions if ours else []) if s.item_sha256 in set(again)]
    shown = f" ({', '.join(f'v{v}' for v in versions)})" if versions else ""
    print(f"{len(again)} refused version(s){shown} offered to {args.unit} again; the running gateway "
          "sends them at its next trust synchronisation with the unit ('hedui-gateway roster history' shows the "
          "receipts)")  # fmt: skip


def _pending(args: argparse.Namespace) -> None:
    now = SystemClock().now_ms()
    shown = 0
    with _context(args) as ctx:
        peers = PeerRosters(ctx.engine)
        for party in peers.parties():
            history = peers.history(party)
            for roster in history.pending(now) if history else []:
                shown += 1
                print(f"{party:32} v{roster.version:<4} in force from {_show(roster.effective_at_ms)} Beijing time")
    if not shown:
        print("no roster change is waiting to take effect")


def add_roster_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``roster`` and its sub-commands to the hedui-gateway parser."""
    roster = sub.add_parser("roster", help="register exchange staff with the units in advance (Procedure V.(三))")
    commands = roster.add_subparsers(dest="roster_command", required=True, metavar="ROSTER_COMMAND")

    def signed(name: str, text: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=text)
        command.add_argument("--admin", required=True, help="staff id of the admin making the change")
        command.add_argument("--admin-keystore", required=True, help="the admin's own staff keystore")
        command.add_argument("--passphrase-file", help="the admin keystore's passphrase (else HEDUI_KEYS_PASSPHRASE)")
        return command

    add = signed("add", "register a member; in force after the notice")
    add.add_argument("--staff-id", required=True, help="e.g. S-0001 (1-32 of A-Z, a-z, 0-9, '-'; never reused)")
    add.add_argument("--name", required=True, help="the member's name (shown to the units' operators, never logged)")
    add.add_argument("--roles", required=True, help="comma-separated: intake, review, exchange, report, admin")
    add.add_argument("--public-key-file", required=True, help="the member's public bundle from 'hedui-keys export'")
    add.add_argument(
        "--fingerprint",
        required=True,
        help="the bundle fingerprint from the member's key letter (required: a bundle is taken only when it matches)",
    )
    add.add_argument("--valid-from", help="YYYY-MM-DD[THH:MM], Beijing time (default and earliest: the notice's end)")
    add.add_argument("--valid-until", help="YYYY-MM-DD, last day of validity (default: open)")
    add.set_defaults(func=_add)
    end = signed("end", "end a member's validity (default: when the notice ends)")
    end.add_argument("--staff-id", required=True)
    end.add_argument("--at", help="YYYY-MM-DD[THH:MM], Beijing time, now or later")
    end.set_defaults(func=_end)
    revoke = signed("revoke", "revoke a member at the notice's end, or at once with --urgent")
    revoke.add_argument("--staff-id", required=True)
    revoke.add_argument("--reason", required=True, help="short code, e.g. left, key-lost")
    revoke.add_argument("--urgent", action="store_true", help="from now on (a lost or stolen key cannot wait)")
    revoke.set_defaults(func=_revoke)
    signed("publish", "sign the register as it is as the next version").set_defaults(func=_publish)
    resend = commands.add_parser("resend", help="offer a unit again the versions it refused (once the cause is fixed)")
    resend.add_argument("--unit", required=True, help="the unit's party id")
    resend.set_defaults(func=_resend)
    for name, func, text in (
        ("list", _list, "members with state and names (this terminal only)"),
        ("show", _show_version, "one version in full"),
        ("history", _history, "every version held, with the units' receipts of ours"),
        ("pending", _pending, "versions not yet in force"),
    ):
        command = commands.add_parser(name, help=text)
        if name != "pending":
            command.add_argument("--party", help="a unit's party id (default: our own roster)")
        if name == "show":
            command.add_argument("--version", type=int, help="default: the latest")
        command.set_defaults(func=func)
    for command in commands.choices.values():
        command.add_argument("--config", required=True)
