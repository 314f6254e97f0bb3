"""Registering exchange staff with each other on a loopback network (Procedure V.(三): both sides register their
exchange staff with each other in advance), with the operators' own commands:

* each staff member's own keystore and exported public bundle, as ``hedui-keys init`` and ``export`` leave them on
  the member's workstation (:func:`staff_keystore`);
* at each unit, its admin signs the unit's roster with ``hedui-connector roster init-admin`` and puts the exchange
  staff who answer on duty with ``roster on-duty`` (:func:`unit_commands`);
* at the agency, its admin is registered with ``hedui-gateway staff bootstrap-admin`` and registers everyone else
  with ``hedui-gateway roster add``, each exchange member a new signed version of the gateway's roster
  (:func:`agency_commands`);
* the running gateway's trust synchronisation (SyncTrust) carries each side's versions to the other, which checks
  them and acknowledges them; :func:`wait_for_rosters` reads the gateway's database until both directions are done.

Nothing here writes a roster itself: the commands do, in their own processes, and the running services deliver.
Used by the demo (demo/run.py) and tests/test_trust_network.py.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import secrets
import subprocess
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select

from common.db import make_engine, reading
from demo.folders import console_script, shell_line, shown
from demo.localnet import Network
from gateway.config import GatewayConfig
from gateway.db import schema as s
from keys import keystore
from keys.announcements import armor, read_bundle
from keys.handles import SigningKey
from keys.identity import PartyKeys
from keys.truststore import TrustStore


class CommandFailed(RuntimeError):
    """An operator's command of the registration failed; the message has what it printed."""


@dataclass(frozen=True)
class StaffKeystore:
    """A staff member's own keystore and public bundle, as ``hedui-keys init`` and ``hedui-keys export`` leave them,
    and the bundle's fingerprint as their key letter states it."""

    staff_id: str
    party_id: str
    keystore: Path
    passphrase_file: Path
    bundle: Path
    fingerprint: str

    def signing_key(self, now_ms: int) -> SigningKey:
        """The member's current signing key (what ``hedui-keys sign-step`` / ``sign-approval`` sign with)."""
        party, _ = keystore.load(self.keystore, keystore.read_passphrase_file(self.passphrase_file))
        return party.signing_key(now_ms)


def staff_party(organisation: str, staff_id: str) -> str:
    """The party id of a staff member's keystore: ``staff.`` + the organisation's party id without its kind +
    the staff id (``staff.220100.s-0001`` at agency.220100, ``staff.220100.tax.u-0001`` at unit.220100.tax)."""
    return f"staff.{organisation.split('.', 1)[1]}.{staff_id.lower()}"


def staff_keystore(
    net: Network, organisation: str, staff_id: str, *, now_ms: int, kdf: keystore.KdfParams | None = None
) -> StaffKeystore:
    """Create a staff member's keystore, passphrase file and exported bundle under ``net.root/staff/ORGANISATION/``
    (standing in for the member's own workstation or USB key)."""
    folder = net.root / "staff" / organisation
    folder.mkdir(parents=True, exist_ok=True)
    party = PartyKeys.create(staff_party(organisation, staff_id), now_ms=now_ms)
    passphrase_file = folder / f"{staff_id}.passphrase"
    passphrase_file.write_text(secrets.token_urlsafe(24) + "\n", encoding="utf-8")
    passphrase_file.chmod(0o600)
    path = folder / f"{staff_id}.keystore.json"
    keystore.save(path, party, TrustStore(), keystore.read_passphrase_file(passphrase_file), kdf=kdf)
    bundle = party.bundle(now_ms)
    bundle_path = folder / f"{staff_id}.bundle"
    bundle_path.write_text(armor(bundle), encoding="utf-8")
    return StaffKeystore(staff_id, party.party_id, path, passphrase_file, bundle_path, read_bundle(bundle).fingerprint)


@dataclass(frozen=True)
class Command:
    """An operator's command: the program as a person runs it (``console_script``), its module, its arguments."""

    program: tuple[str, ...]
    module: str
    args: tuple[str, ...]

    @property
    def argv(self) -> list[str]:
        return [*self.program, *self.args]

    def line(self) -> str:
        """The command as one line a shell splits back into ``argv``."""
        return shell_line(self.argv)


def gateway_command(net: Network, *args: str) -> Command:
    """``hedui-gateway ARGS --config gateway.toml``, as an operator types it (warnings only on the terminal)."""
    program = tuple(console_script("hedui-gateway", "gateway.cli"))
    return Command(program, "gateway.cli", ("--log-level", "WARNING", *args, "--config", shown(net.gateway_config)))


def connector_command(net: Network, unit: str, *args: str) -> Command:
    """``hedui-connector ARGS --config UNIT.toml``, as the unit's operator types it."""
    program = tuple(console_script("hedui-connector", "connectors.cli"))
    config = shown(net.connector_configs[unit])
    return Command(program, "connectors.cli", ("--log-level", "WARNING", *args, "--config", config))


def run_command(command: Command, *, in_process: bool = False, timeout: float = 120.0) -> str:
    """Run an operator's command and return what it printed; CommandFailed with what it said if it failed.

    ``in_process``: call the program's ``main`` with the same arguments in this process instead of starting it (the
    same code from the argument parser on, without the second or so a Python program takes to start); one at a
    time, since standard output is captured for the whole process."""
    if in_process:
        out, err = io.StringIO(), io.StringIO()
        main: Callable[[list[str]], int] = importlib.import_module(command.module).main
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(command.args))
        printed, said = out.getvalue(), err.getvalue()
    else:
        result = subprocess.run(command.argv, capture_output=True, text=True, timeout=timeout, check=False)
        code, printed, said = result.returncode, result.stdout, result.stderr
    if code != 0:
        raise CommandFailed(f"{shell_line(command.argv[:4])} … exited with {code}: {said.strip()}")
    return printed


def _admin(staff: StaffKeystore) -> list[str]:
    return ["--admin-keystore", shown(staff.keystore), "--passphrase-file", shown(staff.passphrase_file)]


def unit_commands(net: Network, unit: str, admin: StaffKeystore, name: str) -> list[Command]:
    """The unit admin's two commands: sign version 1 of the unit's roster (the admin, also an exchange member), and
    put the admin on duty, so that every answer set names them as the unit's responsible staff member."""
    return [
        connector_command(net, unit, "roster", "init-admin", "--staff-id", admin.staff_id, "--name", name,
                          *_admin(admin)),
        connector_command(net, unit, "roster", "on-duty", "--set", admin.staff_id),
    ]  # fmt: skip


def agency_commands(
    net: Network,
    admin: StaffKeystore,
    admin_name: str,
    staff: Sequence[tuple[StaffKeystore, str, str]],
    *,
    admin_roles: str = "admin",
) -> list[Command]:
    """The agency admin's commands: their own registration into the empty staff register (with ``admin_roles``),
    then ``roster add`` for each of ``staff`` (keystore, name, comma-separated roles). A member with the exchange or
    admin role makes a new signed version of the gateway's roster, published to every unit; the others are
    registered only."""

    def key(member: StaffKeystore) -> list[str]:
        return ["--public-key-file", shown(member.bundle), "--fingerprint", member.fingerprint]

    commands = [
        gateway_command(net, "staff", "bootstrap-admin", "--staff-id", admin.staff_id, "--name", admin_name,
                        "--roles", admin_roles, *key(admin))
    ]  # fmt: skip
    for member, name, roles in staff:
        commands.append(
            gateway_command(net, "roster", "add", "--admin", admin.staff_id, *_admin(admin),
                            "--staff-id", member.staff_id, "--name", name, "--roles", roles, *key(member))
        )  # fmt: skip
    return commands


def run_unit_commands(
    commands: Mapping[str, Sequence[Command]],
    *,
    in_process: Collection[str] = (),
    on_done: Callable[[str], None] | None = None,
) -> dict[str, list[str]]:
    """Run each unit's commands in order, unit after unit; per unit, what its commands printed. The units in
    ``in_process`` run them in this process (:func:`run_command`). ``on_done(unit)`` as each unit finishes."""
    printed: dict[str, list[str]] = {}
    for unit, unit_commands_ in commands.items():
        printed[unit] = [run_command(c, in_process=unit in in_process) for c in unit_commands_]
        if on_done is not None:
            on_done(unit)
    return printed


@dataclass(frozen=True)
class RosterState:
    """Where the rosters stand, as the gateway's database says (what ``hedui-gateway roster history`` and
    ``roster list --party UNIT`` show)."""

    #: The latest version of the gateway's own roster (0: none yet).
    gateway_version: int
    #: Unit -> the unit's receipt of that version: "applied", "refused: REASON", or absent (not yet acknowledged).
    receipts: dict[str, str]
    #: Unit -> the latest version of the unit's roster the gateway holds that is in force now.
    held: dict[str, int]

    def applied(self, units: Sequence[str]) -> list[str]:
        return [u for u in units if self.receipts.get(u) == "applied"]

    def complete(self, units: Sequence[str]) -> bool:
        """Every unit applied the gateway's latest version, and the gateway holds every unit's roster in force."""
        return self.gateway_version > 0 and all(self.receipts.get(u) == "applied" and self.held.get(u) for u in units)


def roster_state(net: Network, now_ms: int) -> RosterState:
    """Read :class:`RosterState` from the gateway's database."""
    engine = make_engine(GatewayConfig.load(net.gateway_config).database.url)
    r, i, d = s.rosters.c, s.trust_items.c, s.trust_deliveries.c
    try:
        with reading(engine) as conn:
            own = conn.execute(
                select(r.version, r.sha256).where(r.party_id == net.gateway_party).order_by(r.version.desc()).limit(1)
            ).first()
            receipts: dict[str, str] = {}
            if own is not None:
                rows = conn.execute(
                    select(d.peer, d.acked_at_ms, d.applied, d.reason)
                    .join_from(s.trust_deliveries, s.trust_items, d.item_id == i.id)
                    .where(i.sha256 == own.sha256)
                ).all()
                receipts = {
                    row.peer: "applied" if row.applied else f"refused: {row.reason}"
                    for row in rows
                    if row.acked_at_ms is not None
                }
            held = conn.execute(
                select(r.party_id, func.max(r.version))
                .where(r.party_id != net.gateway_party, r.effective_at_ms <= now_ms)
                .group_by(r.party_id)
            ).all()
    finally:
        engine.dispose()
    return RosterState(own.version if own is not None else 0, receipts, {str(p): int(v) for p, v in held})


def wait_for_rosters(
    net: Network,
    units: Sequence[str],
    timeout: float,
    *,
    on_change: Callable[[RosterState], None] | None = None,
) -> RosterState:
    """Wait until every one of ``units`` applied the gateway's latest roster version and the gateway holds each
    unit's roster in force (the gateway synchronises trust with a unit when it has an item for it, and every
    ``[trust] sync_interval_seconds``); TimeoutError naming what is missing otherwise."""
    deadline = time.monotonic() + timeout
    seen = None
    while True:
        state = roster_state(net, int(time.time() * 1000))
        if on_change is not None and state != seen:
            on_change(state)
        seen = state
        if state.complete(units):
            return state
        if time.monotonic() > deadline:
            missing = [u for u in units if state.receipts.get(u) != "applied" or not state.held.get(u)]
            detail = ", ".join(f"{u} ({state.receipts.get(u, 'no receipt')}, roster held: "
                               f"{'yes' if state.held.get(u) else 'no'})" for u in missing[:5])  # fmt: skip
            raise TimeoutError(f"rosters not exchanged after {timeout:.0f} s with {len(missing)} units: {detail}")
        time.sleep(0.2)
