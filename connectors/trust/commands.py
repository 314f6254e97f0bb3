"""``hedui-connector roster``: register the unit's exchange staff with the gateways in advance (Procedure V.(三)).

Every change is the next roster version, signed by the unit's key (from the config's keystore) and by an admin's own
staff key, stored and published to every gateway in the unit's trust store (delivered by the running connector's
trust synchronisation):

  roster init-admin     version 1: the first admin (their staff keystore signs it); in force after the notice
  roster add            a member (exchange staff or admin); in force after the notice ([roster] notice_working_days)
  roster end            end a member's validity, by default when the notice ends
  roster revoke         revoke a member at the notice's end, or with --urgent at once (a lost or stolen key)
  roster list           members of a roster, with names: on this terminal only, never in a log
  roster history        every version held, and for the unit's own each gateway's receipt
  roster pending        versions not yet in force, the unit's own and the gateways'
  roster on-duty        show or set the exchange staff on duty, whom every answer set names
  roster migrate-check  what the deprecated [[staff]] ids still do, and which ids the gateways' rosters lack
  roster resend         offer a gateway again the versions it refused, once the cause is fixed
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from common.config import ConfigError
from common.dates import beijing_moment_ms, beijing_text
from common.db import make_engine
from common.rosterstore import ROSTER_ITEM
from common.workdays import WorkdayCalendar
from connectors.config import ConnectorConfig
from connectors.store import ConnectorStore
from connectors.trust.duty import OnDuty
from connectors.trust.items import TrustItems
from connectors.trust.rosters import PeerRosters, UnitRoster, record_event
from keys import keystore
from keys.clock import SystemClock
from keys.handles import SigningKey
from keys.identity import PartyKeys
from keys.roster import Notice, RosterHistory
from keys.staffkeys import STAFF_PARTY_PREFIX, load_staff_signing_key, read_staff_bundle
from keys.truststore import TrustStore


@dataclass
class _Context:
    config: ConnectorConfig
    store: ConnectorStore
    party: PartyKeys
    trust: TrustStore

    def own(self) -> UnitRoster:
        calendar = WorkdayCalendar.with_file(self.config.exchange.holiday_file)
        notice = Notice(calendar, self.config.roster.notice_working_days)
        return UnitRoster(self.store.engine, self.party, notice=notice, gateways=self.gateways())

    def gateways(self) -> list[str]:
        """The gateways the unit serves: the parties in its trust store (staff keys excepted)."""
        return [p for p in self.trust.parties() if not p.startswith(STAFF_PARTY_PREFIX)]

    def legacy(self) -> dict[str, frozenset[str]]:
        staff: dict[str, set[str]] = {}
        for entry in self.config.staff:
            staff.setdefault(entry.gateway, set()).add(entry.staff_id)
        return {gateway: frozenset(ids) for gateway, ids in staff.items()}


@contextmanager
def _context(args: argparse.Namespace) -> Iterator[_Context]:
    config = ConnectorConfig.load(Path(args.config))
    party, trust = keystore.load(config.keys.keystore, keystore.read_passphrase_file(config.keys.passphrase_file))
    if party.party_id != config.unit.party_id:
        raise ConfigError(f"keystore belongs to {party.party_id}, config says {config.unit.party_id}")
    store = ConnectorStore(make_engine(config.database.url))
    try:
        yield _Context(config, store, party, trust)
    finally:
        store.engine.dispose()


def _admin_key(args: argparse.Namespace, now_ms: int) -> SigningKey:
    _, key = load_staff_signing_key(Path(args.admin_keystore), passphrase_file=args.passphrase_file, now_ms=now_ms)
    return key


def _moment(text: str | None, *, end_of_day: bool = False) -> int | None:
    if text is None:
        return None
    try:
        return beijing_moment_ms(text, end_of_day=end_of_day)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _made(version: int, effective_ms: int, gateways: int, what: str) -> None:
    print(f"{what}: roster version {version}, in force from {beijing_text(effective_ms)} Beijing time")
    print(f"published to {gateways} gateways; the running connector delivers it ('roster history' shows it)")


def _init_admin(args: argparse.Namespace) -> None:
    now = SystemClock().now_ms()
    with _context(args) as ctx:
        own = ctx.own()
        roster = own.init_admin(args.staff_id, _admin_key(args, now), name=args.name, now_ms=now, roles=args.roles)
        _made(roster.version, roster.effective_at_ms, len(own.gateways), f"first admin {args.staff_id}")


def _add(args: argparse.Namespace) -> None:
    now = SystemClock().now_ms()
    bundle, record = read_staff_bundle(Path(args.public_key_file), fingerprint=args.fingerprint, now_ms=now)
    print(f"key of {bundle.party_id}: bundle fingerprint {bundle.fingerprint} (matches the key letter)")
    with _context(args) as ctx:
        own = ctx.own()
        roster = own.add(
            args.admin, _admin_key(args, now), args.staff_id, name=args.name, roles=args.roles,
            public_key=record.public.raw, now_ms=now, valid_from_ms=_moment(args.valid_from),
            valid_until_ms=_moment(args.valid_until, end_of_day=True),
        )  # fmt: skip
        _made(roster.version, roster.effective_at_ms, len(own.gateways), f"registered {args.staff_id}")


def _end(args: argparse.Namespace) -> None:
    now = SystemClock().now_ms()
    with _context(args) as ctx:
        own = ctx.own()
        at = _moment(args.at)
        roster = own.end(args.admin, _admin_key(args, now), args.staff_id, now_ms=now, at_ms=at)
        when = beijing_text(at if at is not None else own.earliest_effective(now))
        _made(roster.version, roster.effective_at_ms, len(own.gateways), f"{args.staff_id} ends at {when}")


def _revoke(args: argparse.Namespace) -> None:
    now = SystemClock().now_ms()
    with _context(args) as ctx:
        own = ctx.own()
        roster = own.revoke(args.admin, _admin_key(args, now), args.staff_id, now_ms=now, urgent=args.urgent)
        when = "now" if args.urgent else f"at {beijing_text(own.earliest_effective(now))}"
        _made(roster.version, roster.effective_at_ms, len(own.gateways), f"{args.staff_id} revoked {when}")


def _history_of(ctx: _Context, party: str | None) -> tuple[str, RosterHistory]:
    party_id = party or ctx.party.party_id
    history = PeerRosters(ctx.store.engine).history(party_id)
    if history is None:
        hint = "the unit has none yet: 'hedui-connector roster init-admin'" if party is None else party_id
        raise ConfigError(f"no roster held: {hint}")
    return party_id, history


def _list(args: argparse.Namespace) -> None:
    # Names go to this terminal only: never into a log line (staff names are personal data).
    now = SystemClock().now_ms()
    with _context(args) as ctx:
        party, history = _history_of(ctx, args.party)
    latest = history.latest
    assert latest is not None
    in_force = history.in_force(now)
    print(f"roster of {party}: version {latest.roster.version} held, {in_force.version if in_force else 'none'} "
          "in force now (times Beijing)")  # fmt: skip
    for member in latest.roster.members:
        revoked = f"; revoked {beijing_text(member.revoked_at_ms)}" if member.revoked_at_ms else ""
        print(f"{member.staff_id:12} {history.status(member.staff_id, now):8} {','.join(member.roles):16} "
              f"{beijing_text(member.valid_from_ms)} .. {beijing_text(member.valid_until_ms)}{revoked}\n"
              f"             {member.name}; key {member.public_key.fingerprint}")  # fmt: skip


def _history(args: argparse.Namespace) -> None:
    with _context(args) as ctx:
        party, history = _history_of(ctx, args.party)
        # For the unit's own roster, each gateway's receipt of each version (from its trust synchronisations).
        acks = TrustItems(ctx.store.engine).receipts() if party == ctx.party.party_id else {}
    for signed in history.versions:
        roster = signed.roster
        print(f"v{roster.version:<4} issued {beijing_text(roster.issued_at_ms)}  effective "
              f"{beijing_text(roster.effective_at_ms)}  admin {roster.admin_staff_id:10} {len(roster.members)} "
              f"members  {signed.digest.hex()[:16]}")  # fmt: skip
        for peer, state in sorted(acks.get(signed.item_sha256, {}).items()):
            print(f"      {peer:32} {state}")


def _pending(args: argparse.Namespace) -> None:
    now = SystemClock().now_ms()
    shown = 0
    with _context(args) as ctx:
        peers = PeerRosters(ctx.store.engine)
        for party in peers.parties():
            history = peers.history(party)
            for roster in history.pending(now) if history else []:
                shown += 1
                print(f"{party:32} v{roster.version:<4} in force from {beijing_text(roster.effective_at_ms)} Beijing")
    if not shown:
        print("no roster change is waiting to take effect")


def _resend(args: argparse.Namespace) -> None:
    now = SystemClock().now_ms()
    with _context(args) as ctx:
        if args.gateway not in ctx.gateways():
            raise ConfigError(f"{args.gateway[:64]} is not a gateway in the keystore's trust store")
        engine = ctx.store.engine
        with engine.begin() as conn:
            again = TrustItems(engine).resend(conn, args.gateway, ROSTER_ITEM)
            if again:
                record_event(conn, now, "roster_resend", args.gateway, f"items={len(again)}")
        own = PeerRosters(engine).history(ctx.party.party_id)
    if not again:
        print(f"{args.gateway} refused no version of the unit's roster: nothing to send again")
        return
    versions = [s.roster.version for s in (own.versions if own else []) if s.item_sha256 in set(again)]
    shown = f" ({', '.join(f'v{v}' for v in versions)})" if versions else ""
    print(f"{len(again)} refused version(s){shown} offered to {args.gateway} again; the gateway takes them "
          "at its next trust synchronisation with this unit ('roster history' shows the receipts)")  # fmt: skip


def _on_duty(args: argparse.Namespace) -> None:
    now = SystemClock().now_ms()
    with _context(args) as ctx:
        duty = OnDuty(ctx.store.engine)
        if args.set is not None or args.clear:
            wanted = [] if args.clear else [s.strip() for s in args.set.split(",") if s.strip()]
            duty.set(wanted, PeerRosters(ctx.store.engine).history(ctx.party.party_id), now_ms=now)
        staff = duty.staff()
        required = ctx.config.exchange.answer_staff
        history = PeerRosters(ctx.store.engine).history(ctx.party.party_id)
        responsible = duty.responsible(history, now, required)
    print(f"on duty: {', '.join(staff) or 'nobody'}")
    if responsible.legacy:
        print("the unit's roster is not in force yet: answers name no responsible staff until it is")
    elif responsible.reason is not None:
        print(f"answers are held back: {len(responsible.staff_ids)} registered exchange staff on duty, "
              f"[exchange] answer_staff asks for {required}")  # fmt: skip
    else:
        print(f"answers name {', '.join(responsible.staff_ids)}")


def _migrate_check(args: argparse.Namespace) -> None:
    now = SystemClock().now_ms()
    with _context(args) as ctx:
        peers = PeerRosters(ctx.store.engine)
        legacy = ctx.legacy()
        for gateway in sorted(set(legacy) | set(ctx.gateways())):
            history = peers.history(gateway)
            ids = ", ".join(sorted(legacy.get(gateway, ()))) or "none"
            if history is None:
                state = "no roster received: the [[staff]] ids decide"
            elif history.in_force(now) is None:
                state = f"roster version {history.held_version} held, not in force yet: the [[staff]] ids decide"
            else:
                state = "the signed roster decides; the [[staff]] ids are ignored and can be removed"
            print(f"{gateway}: {state} ([[staff]]: {ids})")
        for gateway, missing in peers.missing_from_roster(legacy).items():
            print(f"{gateway}: its roster lacks [[staff]] ids {', '.join(missing)}")


def add_roster_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``roster`` and its sub-commands to the hedui-connector parser."""
    roster = sub.add_parser("roster", help="register the unit's exchange staff with the gateways (Procedure V.(三))")
    commands = roster.add_subparsers(dest="roster_command", required=True, metavar="ROSTER_COMMAND")

    def signed(name: str, text: str, *, admin: bool = True) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=text)
        if admin:
            command.add_argument("--admin", required=True, help="staff id of the admin making the change")
        command.add_argument("--admin-keystore", required=True, help="the admin's own staff keystore")
        command.add_argument("--passphrase-file", help="the admin keystore's passphrase (else HEDUI_KEYS_PASSPHRASE)")
        return command

    init = signed("init-admin", "version 1: the first admin, signed with their own keystore", admin=False)
    init.add_argument("--staff-id", required=True, help="the admin's staff id, e.g. U-0001")
    init.add_argument("--name", required=True, help="the admin's name (shown to the gateways' operators)")
    init.add_argument("--roles", default="admin,exchange", help="admin, or admin,exchange (default)")
    init.set_defaults(func=_init_admin)
    add = signed("add", "register a member; in force after the notice")
    add.add_argument("--staff-id", required=True, help="1-32 of A-Z, a-z, 0-9, '-'; never reused")
    add.add_argument("--name", required=True, help="the member's name (shown to the gateways' operators)")
    add.add_argument("--roles", required=True, help="exchange, admin or both (comma-separated)")
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
    revoke.add_argument("--urgent", action="store_true", help="from now on (a lost or stolen key cannot wait)")
    revoke.set_defaults(func=_revoke)
    for name, func, text in (
        ("list", _list, "members with state and names (this terminal only)"),
        ("history", _history, "every version held, with the gateways' receipts of the unit's own"),
        ("pending", _pending, "versions not yet in force"),
        ("migrate-check", _migrate_check, "what the deprecated [[staff]] ids still do"),
    ):
        command = commands.add_parser(name, help=text)
        if name in ("list", "history"):
            command.add_argument("--party", help="a gateway's party id (default: the unit's own roster)")
        command.set_defaults(func=func)
    resend = commands.add_parser("resend", help="offer a gateway again the versions it refused (cause fixed)")
    resend.add_argument("--gateway", required=True, help="the gateway's party id")
    resend.set_defaults(func=_resend)
    duty = commands.add_parser("on-duty", help="show or set the exchange staff on duty (named on every answer set)")
    which = duty.add_mutually_exclusive_group()
    which.add_argument("--set", help="comma-separated staff ids of the unit's roster (replaces the list)")
    which.add_argument("--clear", action="store_true", help="nobody on duty (answers are held back)")
    duty.set_defaults(func=_on_duty)
    for command in commands.choices.values():
        command.add_argument("--config", required=True)
