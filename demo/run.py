"""The product's main job on one machine: ``make demo``.

Builds a loopback exchange network in a new folder ``demo-out/run-<date>-<time>/`` (a private CA, keystores,
certificates, 17 sharing units' connectors with synthetic data, the gateway; ``demo-out/latest`` points at it), then
acts as a commissioner and as the agency's staff: submits a commission of a few hundred households, takes it through
intake, review and dual approval, watches the exchange, issues the signed report and verifies it with the commands a
reader of the report would paste. Before any of that, the agency's and the units' admins register their exchange staff
with each other with the roster commands (Procedure V.(三)), and every unit verifies the two approvals of its batches
against the agency's roster it received. Everything stops at the end; nothing is left running.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import grpc
from hedui.v1 import agency_pb2, agency_pb2_grpc, exchange_pb2, records_pb2
from sqlalchemy import select

from common.categories import UNIT_DATA, UNIT_NAMES, data_category_label, unit_category_by_name
from common.db import make_engine, reading
from connectors.synthetic import Population, Relation
from demo.console import Console
from demo.folders import console_script, has_earlier_layout, new_run_folder, point_latest, shell_line, shown
from demo.localnet import STAFF, Network, StartError, build_network
from demo.rosters import (
    CommandFailed,
    StaffKeystore,
    agency_commands,
    connector_command,
    gateway_command,
    run_command,
    run_unit_commands,
    staff_keystore,
    unit_commands,
    wait_for_rosters,
)
from gateway.db import schema
from keys import keystore
from keys.announcements import armor, read_bundle
from keys.statements import approval_message, verify_report
from keys.steps import StepKind, build_step, sign_step

COMMISSIONER = "commissioner.220102.mzj"
BACKOFFICE = "agency.220100.backoffice"
SEED = 20261127
_RELATIONS = {
    Relation.APPLICANT: agency_pb2.RELATION_APPLICANT,
    Relation.SUPPORT_OBLIGOR: agency_pb2.RELATION_SUPPORT_OBLIGOR,
}
#: The demo agency's admin, who keeps its staff register and signs its roster.
ADMIN = "A-0001"
#: Its other staff: the two exchange staff are on the roster the units hold (Procedure V.(二)(三)); intake, review and
#: report are three more people (Procedure V.(一)), registered at the agency only.
STAFF_ROLES = {STAFF[0]: "exchange", STAFF[1]: "exchange", "S-0003": "intake", "S-0004": "review", "S-0005": "report"}
#: Each unit's first admin, also the exchange staff member on duty whom its answer sets name.
UNIT_ADMIN = "U-0001"
#: The unit whose commands and rosters the demo shows; the others do the same.
SHOWN_UNIT = "unit.220100.tax"
#: Seconds the 17 connectors and the gateway may take to come up; on a busy machine, importing Python and opening
#: 18 Argon2id-protected keystores at once takes a while.
START_TIMEOUT = 180.0
#: The 18 keystores of the network are thrown away with it: protect them at the floor the keystore accepts for real
#: use (OWASP's Argon2id minimum) rather than the default, which costs several times more to write and to open.
DEMO_KDF = keystore.KdfParams(memory_kib=keystore.MIN_MEMORY_KIB, iterations=keystore.MIN_ITERATIONS, lanes=1)


def _units() -> dict[str, str]:
    """One connector per sharing-unit category of clause 7."""
    names = {}
    for category in sorted(UNIT_NAMES):
        name = records_pb2.UnitCategory.Name(category).removeprefix("UNIT_CATEGORY_").lower()  # type: ignore[arg-type]
        names[f"unit.220100.{name.replace('_', '-')}"] = name
    return names


def not_asked(requested: Iterable[int]) -> list[str]:
    """One sentence for each unit of the demo network that none of the ``requested`` data categories reaches, and
    why: the gateway routes a data category only to the units clause 7 says hold it."""
    wanted = set(requested)
    sentences = []
    for unit_id, name in _units().items():
        category = unit_category_by_name(name)
        held = UNIT_DATA.get(category, ())
        if wanted & set(held):
            continue
        if not held:
            sentences.append(
                f"{unit_id} ({UNIT_NAMES[category]}) is asked nothing: it stands for clause 7 (十七), 'other "
                "departments' that provide information when needed, and clause 7 assigns them no data category, so "
                "none of the requested ones is routed to it."
            )
        else:
            held_text = ", ".join(data_category_label(c) for c in held)
            sentences.append(
                f"{unit_id} ({UNIT_NAMES[category]}) is asked nothing: the commission requested none of the data it "
                f"holds ({held_text})."
            )
    return sentences


@contextmanager
def _network(root: Path, households: int) -> Iterator[Network]:
    net = build_network(
        root,
        _units(),
        clients={COMMISSIONER: "commissioner", BACKOFFICE: "staff_system"},
        batch_size=max(100, households * 3),
        dispatch_interval=0.3,
        poll_interval=0.3,
        answer_interval=0.2,
        kdf=DEMO_KDF,
        # The gateway calls each unit at once when it has a roster version for it; a unit's own versions come back in
        # the reply, or at the latest at this interval.
        trust_sync_interval=10.0,
    )
    try:
        yield net
    finally:
        net.stop_all()


def _stub(net: Network, party: str) -> agency_pb2_grpc.AgencyServiceStub:
    tls = net.root / "tls"
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(tls / "ca.crt").read_bytes(),
        private_key=(tls / f"{party}.client.key").read_bytes(),
        certificate_chain=(tls / f"{party}.client.crt").read_bytes(),
    )
    return agency_pb2_grpc.AgencyServiceStub(grpc.secure_channel(f"127.0.0.1:{net.gateway_port}", credentials))


def _package(households: int) -> agency_pb2.SubmitCommissionRequest:
    request = agency_pb2.SubmitCommissionRequest(
        letter=agency_pb2.CommissionLetter(
            number="CC-MZJ-2026-0311", date=records_pb2.Date(year=2026, month=11, day=2)
        ),
        programme=exchange_pb2.PROGRAMME_MINIMUM_LIVING_ALLOWANCE,
        income_from=records_pb2.YearMonth(year=2025, month=11),
        income_to=records_pb2.YearMonth(year=2026, month=10),
        assets_as_of=records_pb2.Date(year=2026, month=10, day=31),
        categories=[c for c in records_pb2.DataCategory.values() if c],
        thresholds=[exchange_pb2.ThresholdRequest(category=records_pb2.DATA_CATEGORY_DEPOSITS, limit_fen=5_000_000)],
    )
    for household in Population(SEED).households(households):
        entry = request.households.add(household_ref=f"H{household.index:05d}")
        for member in household.members:
            entry.members.add(
                id_number=member.id_number,
                name=member.name,
                relation=_RELATIONS.get(member.relation, agency_pb2.RELATION_FAMILY_MEMBER),
                authorisation=agency_pb2.PackageAuthorisation(
                    number=f"SQ{household.index:05d}{len(entry.members):02d}",
                    signed=True,
                    fingerprinted=True,
                    scan_sha256=hashlib.sha256(b"authorisation scan " + member.id_number.encode()).digest(),
                ),
                id_copy_sha256=hashlib.sha256(b"id card copy " + member.id_number.encode()).digest(),
            )
    return request


@dataclass
class Staff:
    """The staff keystores of the demo network, as each member's own workstation or USB key holds them."""

    admin: StaffKeystore
    agency: dict[str, StaffKeystore]
    #: Unit -> its first admin.
    units: dict[str, StaffKeystore]


def _staff_keystores(net: Network, now_ms: int) -> Staff:
    """Every staff member's keystore and exported bundle ('hedui-keys init' and 'export' on their workstation)."""
    made = {s: staff_keystore(net, net.gateway_party, s, now_ms=now_ms, kdf=DEMO_KDF) for s in (ADMIN, *STAFF_ROLES)}
    units = {u: staff_keystore(net, u, UNIT_ADMIN, now_ms=now_ms, kdf=DEMO_KDF) for u in net.connector_configs}
    return Staff(made.pop(ADMIN), made, units)


def _unit_admin_name(unit_id: str) -> str:
    return f"{UNIT_NAMES[unit_category_by_name(_units()[unit_id])]}交换管理员"


def _register(console: Console, net: Network, staff: Staff) -> bool:
    """Both sides register their exchange staff with the roster commands; wait until the trust synchronisation has
    carried each side's roster to the other and it was acknowledged. False (and why, on stderr) if it was not."""
    console.step(
        3,
        "Register the exchange staff with each other in advance (Procedure V.(三)): each side's admin signs its roster "
        "with their own staff key and the party's key; the gateway's trust synchronisation carries each roster to the "
        "other side, which checks it and acknowledges it with a signed receipt",
    )
    console.detail(
        "Changes take effect at once on this network ([staff] roster_notice_working_days = 0 in gateway.toml, [roster] "
        "notice_working_days = 0 in each unit's config); production keeps the default notice, 1 working day."
    )
    units = list(net.connector_configs)
    commands = {u: unit_commands(net, u, staff.units[u], _unit_admin_name(u)) for u in units}
    ready: list[str] = []

    def signed(unit: str) -> None:
        ready.append(unit)
        if console.live:
            console.progress(f"{len(ready):>2}/{len(units)} units: roster version 1 signed, {UNIT_ADMIN} on duty")

    try:
        # The shown unit's admin runs the two commands as programs; the 16 others run the same commands' code in this
        # process, which spares 32 program start-ups (half a minute on a small machine).
        others = [u for u in units if u != SHOWN_UNIT]
        printed = run_unit_commands(commands, in_process=others, on_done=signed)
        console.end_progress()
        console.detail(
            f"At each unit, its admin {UNIT_ADMIN} signs version 1 of the unit's roster and goes on duty, so that "
            f"every answer set names them as responsible; at {SHOWN_UNIT}:"
        )
        for command, output in zip(commands[SHOWN_UNIT], printed[SHOWN_UNIT], strict=True):
            console.detail("  " + command.line())
            console.detail("    " + output.strip().splitlines()[0])
        console.detail(
            f"{len(ready)}/{len(units)} units: roster version 1 signed, {UNIT_ADMIN} on duty (the other units' admins "
            "ran the same two commands)"
        )
        console.detail(
            f"At the agency, its admin {ADMIN} is registered first; then each staff member from their public key "
            "bundle and the fingerprint of their key letter. Each exchange member makes a new version of the "
            "agency's roster, published to every unit:"
        )
        members = [(staff.agency[s], f"核对员{s[-1]}", roles) for s, roles in STAFF_ROLES.items()]
        for number, command in enumerate(agency_commands(net, staff.admin, "系统管理员", members)):
            # The first of each command runs as a program and is shown in full; the others run the same code here.
            output = run_command(command, in_process=number >= 2)
            outcome = "; ".join(line for line in output.splitlines() if line.startswith("registered"))
            if number < 2:
                console.detail("  " + command.line())
                console.detail(f"    {outcome}")
            else:
                console.detail(f"  roster add … --staff-id {members[number - 1][0].staff_id} …: {outcome}")
        state = wait_for_rosters(net, units, timeout=120)
    except (CommandFailed, subprocess.TimeoutExpired, TimeoutError) as exc:
        console.end_progress()
        print(f"demo: the staff could not be registered: {exc}", file=sys.stderr)
        return False
    console.detail(
        f"Trust synchronisation: {len(state.applied(units))}/{len(units)} units applied the agency's roster version "
        f"{state.gateway_version} and acknowledged it ('hedui-gateway roster history' lists each receipt); the "
        f"gateway holds {len([u for u in units if state.held.get(u)])}/{len(units)} units' rosters, in force"
    )
    gateway_party = net.gateway_party
    at_unit = connector_command(net, SHOWN_UNIT, "roster", "list", "--party", gateway_party)
    at_gateway = gateway_command(net, "roster", "list", "--party", SHOWN_UNIT)
    return _show(console, at_unit.argv) and _show(console, at_gateway.argv)


def _signed_step(net: Network, member: StaffKeystore, commission: agency_pb2.Commission, kind: StepKind) -> bytes:
    """The staff member's signature over a passing step, as `hedui-keys sign-step` makes it in their keystore."""
    step = build_step(
        agency=net.gateway_party, commission_id=commission.commission_id, kind=kind, staff_id=member.staff_id,
        exchange_digest=commission.exchange_digest,
    )  # fmt: skip
    return sign_step(step, member.signing_key(_now()))


def _unfinished(progress: agency_pb2.Progress, subjects: int) -> list[str]:
    """One line per unit that has not answered every subject: where its queries stand."""
    lines = []
    for unit in progress.units:
        if unit.answered < subjects:
            counts = ("queued", "sent", "receipted", "answered", "overdue", "delayed", "failed")
            lines.append(f"{unit.unit_id}: " + ", ".join(f"{name} {getattr(unit, name)}" for name in counts))
    return lines


def _show(console: Console, command: list[str]) -> bool:
    """Run a command exactly as printed (a person can paste the printed line from the same folder) and show what
    it says."""
    console.detail("$ " + shell_line(command))
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in (result.stdout + result.stderr).strip().splitlines():
        console.detail(f"  {line}")
    return result.returncode == 0


def _now() -> int:
    return int(time.time() * 1000)


def _start(console: Console, net: Network) -> None:
    """Start the 17 connectors and the gateway, showing each connector as it comes up."""
    total, ready = len(net.connector_configs), []

    def up(unit_id: str) -> None:
        ready.append(unit_id)
        if console.live:
            console.progress(f"{len(ready):>2}/{total} connectors serving (last: {unit_id})")
        else:
            console.progress(f"{len(ready):>2}/{total} {unit_id} serving on 127.0.0.1:{net.connector_ports[unit_id]}")

    console.progress(f" 0/{total} connectors serving (each opens its keystore and synthetic records)")
    net.start_connectors(on_ready=up, timeout=START_TIMEOUT)
    console.end_progress()
    net.start_gateway(timeout=START_TIMEOUT)
    console.detail(f"gateway {net.gateway_party} serving the agency API on 127.0.0.1:{net.gateway_port}")


def _through_approval(
    console: Console, net: Network, households: int, staff: Staff
) -> tuple[agency_pb2.Commission, agency_pb2_grpc.AgencyServiceStub, list[int]]:
    """Submit as the commissioner, then intake, review and two exchange approvals as the agency's staff."""
    commissioner, office = _stub(net, COMMISSIONER), _stub(net, BACKOFFICE)
    package = _package(households)
    console.step(
        4,
        f"The commissioner ({COMMISSIONER}) submits a data package of {households} households applying for "
        "minimum living allowance, with each member's signed authorisation (Procedure II.(一)3)",
    )
    commission = commissioner.SubmitCommission(package)
    cid = commission.commission_id
    console.detail(
        f"commission {cid}: {commission.households} households, {commission.subjects} people to check, "
        f"{len(package.categories)} data categories requested; state: received"
    )
    console.step(
        5,
        "Intake check by S-0003, second review by S-0004: two different staff (Procedure V.(一)), each signing their "
        "step with their own staff key; the gateway verifies the signature before it records the step",
    )
    intake = _signed_step(net, staff.agency["S-0003"], commission, agency_pb2.STEP_KIND_INTAKE)
    office.RecordIntake(agency_pb2.StaffDecision(commission_id=cid, staff_id="S-0003", passed=True, signature=intake))
    review = _signed_step(net, staff.agency["S-0004"], commission, agency_pb2.STEP_KIND_REVIEW)
    reviewed = office.RecordReview(
        agency_pb2.StaffDecision(commission_id=cid, staff_id="S-0004", passed=True, signature=review)
    )
    console.detail("both passed; the package is complete and every member has an authorisation")
    console.step(
        6,
        f"Dual approval: {STAFF[0]} and {STAFF[1]} each sign the exchange digest; no data leaves the agency without "
        "both (Procedure V.(二)), and each unit checks both signatures against the agency's roster it holds",
    )
    console.detail(
        f"exchange digest {reviewed.exchange_digest.hex()} (SHA-256 of the commission and its whole package)"
    )
    for staff_id in STAFF:
        signature = staff.agency[staff_id].signing_key(_now()).sign(approval_message(reviewed.exchange_digest))
        commission = office.ApproveExchange(
            agency_pb2.ExchangeApproval(commission_id=cid, staff_id=staff_id, signature=signature)
        )
    state = agency_pb2.CommissionState.Name(commission.state).removeprefix("COMMISSION_STATE_").lower()
    console.detail(f"state: {state.replace('_', ' ')}")
    return commission, commissioner, list(package.categories)


def _watch(
    console: Console,
    commissioner: agency_pb2_grpc.AgencyServiceStub,
    commission: agency_pb2.Commission,
    requested: list[int],
    timeout: float,
) -> bool:
    """Print progress until every unit asked has answered every subject, or ``timeout`` seconds pass."""
    units = len(_units())
    console.step(
        7,
        "Exchange: the gateway seals one batch per sharing unit with that unit's share of the approval; each unit "
        "verifies the two approvals against the agency's roster, receipts the batch (its answer is due within 7 "
        "working days, clause 12) and answers, naming its responsible staff member",
    )
    skipped = not_asked(requested)
    console.detail(
        "This network sends at once (schedule.policy = continuous, clause 8); a gateway's default, monthly, sends "
        "only on days 11-20 of the month (Procedure IV)."
    )
    console.detail(f"{units - len(skipped)} of {units} units are asked.")
    for sentence in skipped:
        console.detail(sentence)
    deadline = time.monotonic() + timeout
    ref = agency_pb2.CommissionRef(commission_id=commission.commission_id)
    shown_line = ""
    while time.monotonic() < deadline:
        progress = commissioner.GetProgress(ref)
        answered = sum(u.answered for u in progress.units)
        total = commission.subjects * len(progress.units)
        line = f"{answered:>6} / {total} answers in (one per person per unit asked, {len(progress.units)} units)"
        if line != shown_line:  # into a file, a line per change rather than one per second
            console.progress(line)
            shown_line = line
        if total and answered >= total:
            console.end_progress()
            return True
        time.sleep(1.0)
    console.end_progress()
    console.detail("units that have not answered every person:")
    for unit_line in _unfinished(commissioner.GetProgress(ref), commission.subjects):
        console.detail(f"  {unit_line}")
    return False


def _answer_staff(console: Console, net: Network, commission: agency_pb2.Commission) -> None:
    """Who the units' answer sets named as responsible, and whether the gateway verified them against each unit's
    roster (what 'hedui-gateway status' shows per unit)."""
    a, b = schema.answer_staff.c, schema.batches.c
    engine = make_engine("sqlite:///" + str(net.root / "data" / "gateway.db"))
    try:
        with reading(engine) as conn:
            rows = conn.execute(
                select(b.unit_id, a.staff_ids, a.roster_version)
                .join_from(schema.answer_staff, schema.batches, a.batch_id == b.batch_id)
                .join(schema.commissions, schema.commissions.c.id == b.commission_id)
                .where(schema.commissions.c.ref == commission.commission_id)
            ).all()
    finally:
        engine.dispose()
    units = {r.unit_id for r in rows}
    verified = {r.unit_id for r in rows if r.roster_version is not None} - {
        r.unit_id for r in rows if r.roster_version is None
    }
    named = sorted({s for r in rows for s in r.staff_ids.split(",") if s})
    console.detail(
        f"every answer set names the unit's responsible staff ({', '.join(named) or 'nobody'}); the gateway checked "
        f"them against the unit's roster for {len(verified)} of {len(units)} units ('hedui-gateway status' per unit)"
    )


def _report(
    console: Console, net: Network, run: Path, commission: agency_pb2.Commission, staff: Staff
) -> tuple[Path, Path] | None:
    """Issue the report as a third staff member, save it, and verify it as its reader would."""
    console.step(
        8,
        "S-0005, a third staff member (Procedure V.(一)), signs the report step and issues the report; the gateway "
        "signs it, with who signed each step and approval inside, so that anyone with the agency's public key can "
        "check it was not altered",
    )
    cid = commission.commission_id
    signature = _signed_step(net, staff.agency["S-0005"], commission, agency_pb2.STEP_KIND_REPORT)
    signed = _stub(net, BACKOFFICE).IssueReport(
        agency_pb2.IssueReportRequest(commission_id=cid, staff_id="S-0005", signature=signature)
    )
    passphrase = (net.root / "keys" / f"{net.gateway_party}.passphrase").read_text().strip()
    gateway_keys, _ = keystore.load(net.root / "keys" / f"{net.gateway_party}.keystore.json", passphrase)
    report = verify_report(signed, gateway_keys.signing_key(_now()).public)
    html_path, signed_path, bundle_path = run / f"report-{cid}.html", run / f"report-{cid}.hsr", run / "agency.bundle"
    html_path.write_text(signed.html, encoding="utf-8")
    signed_path.write_bytes(signed.SerializeToString())
    bundle = gateway_keys.bundle(_now())
    bundle_path.write_text(armor(bundle), encoding="utf-8")
    missing = len(report.units_not_answered)
    console.detail(f"{len(report.households)} households in the report; units that did not answer: {missing}")
    console.detail(f"printable report (HTML, not itself signed): {shown(html_path)}")
    console.detail(f"signed report (what the signature covers):  {shown(signed_path)}")
    console.detail(f"the agency's public key bundle:             {shown(bundle_path)}")
    console.step(
        9,
        "The commissioner checks the signed report with the agency's key bundle and the fingerprint from its key "
        "letter (no keystore needed)",
    )
    fingerprint = read_bundle(bundle).fingerprint
    verify = [*console_script("hedui-keys", "keys.cli"), "verify-report", shown(signed_path),
              "--bundle", shown(bundle_path), "--fingerprint", fingerprint]  # fmt: skip
    if not _show(console, verify):
        return None
    console.step(
        10,
        "The agency's administrator checks the audit chain (every step above is a hash-linked entry), then proves "
        "from the archive alone who signed each step: three different people, two approvers (Procedure V.(一)(二))",
    )
    gateway = [*console_script("hedui-gateway", "gateway.cli"), "--log-level", "WARNING"]
    audit = [*gateway, "audit", "verify", "--config", shown(net.gateway_config)]
    if not _show(console, audit):
        return None
    if not _show(console, [*gateway, "archive", "steps", cid, "--config", shown(net.gateway_config)]):
        return None
    return html_path, signed_path


def _metrics(console: Console, net: Network) -> None:
    """Show what the network administrator's Prometheus sees on the gateway's metrics port."""
    url = f"http://127.0.0.1:{net.gateway_metrics_port}/metrics"
    console.step(11, f"What the network's Prometheus scrapes from the gateway ({url}), summed over labels")
    with urllib.request.urlopen(url, timeout=10) as response:  # loopback, our own endpoint
        text = response.read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in {"hedui_queries_sent_total", "hedui_queries_answered_total", "hedui_receipts_total",
                    "hedui_envelope_rejections_total", "hedui_unit_up", "hedui_commissions"}:  # fmt: skip
            totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    for name, value in totals.items():
        console.detail(f"{name:36} {value:>10.0f}")


def run(out: Path, households: int, timeout: float, console: Console | None = None) -> int:
    """Run the walk-through in a new run folder under ``out``; 0 when the report was issued and verified."""
    console = console or Console()
    started = time.monotonic()
    earlier_layout = has_earlier_layout(out)
    run_dir = new_run_folder(out, datetime.now())
    latest = point_latest(out, run_dir)
    console.detail(
        "Hedui demo: one verification commission from the commissioner's letter to the signed report, on this "
        "machine only (loopback network, synthetic people)."
    )
    console.detail(
        f"This run's files: {shown(run_dir)}/" + (f" ({shown(latest)} points to it)" if latest is not None else "")
    )
    console.step(
        1,
        "Build the network: a private CA, keys for the agency's gateway and 17 sharing units, enrolled with each "
        "other, their configs, and a keystore of their own for each staff member",
    )
    with _network(run_dir / "net", households) as net:
        staff = _staff_keystores(net, _now())
        console.detail(f"{shown(net.root)}/: gateway.toml, one unit.*.toml per unit, keys/, tls/, data/, logs/")
        console.detail(
            f"{shown(net.root / 'staff')}/: each staff member's keystore and public key bundle, as 'hedui-keys init' "
            f"and 'export' leave them: the agency's {ADMIN} and {', '.join(STAFF_ROLES)}, each unit's {UNIT_ADMIN}"
        )
        console.step(
            2,
            "Start a connector for each of the 17 sharing-unit categories of clause 7, each with synthetic records, "
            "and the gateway",
        )
        try:
            _start(console, net)
        except (StartError, RuntimeError, TimeoutError) as exc:
            console.end_progress()
            print(f"demo: could not start the network: {exc}", file=sys.stderr)
            return 1
        if not _register(console, net, staff):
            return 1
        commission, commissioner, requested = _through_approval(console, net, households, staff)
        if not _watch(console, commissioner, commission, requested, timeout):
            print(f"demo: the exchange did not finish in {timeout:.0f} s; the logs are in {shown(net.root / 'logs')}/",
                  file=sys.stderr)  # fmt: skip
            return 1
        _answer_staff(console, net, commission)
        saved = _report(console, net, run_dir, commission, staff)
        if saved is None:
            return 1
        _metrics(console, net)
    console.step(12, f"Done in {time.monotonic() - started:.0f} s; every process of the network has stopped")
    console.detail(f"Open the report in a browser: {shown(saved[0])}")
    console.detail("  its last section, 签名与核验, shows the 'report sha256' that step 9 printed")
    console.detail(
        "Paste the command of step 9 to check the signature yourself; change one byte of the .hsr and it fails"
    )
    console.detail(f"How the units were set up: {shown(net.root)}/*.toml; what they logged: {shown(net.root)}/logs/")
    console.detail("Next: the README's 'Using hedui-keys' and 'Running a connector and a gateway', docs/operations.md")
    if earlier_layout:
        console.detail(
            f"Files at the top of {shown(out)}/ are from a demo before runs had folders; they are left as they were"
        )
    console.detail(f"Each run keeps its own folder; 'rm -rf {shown(out)}' removes them all")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m demo``: parse the options and run the walk-through."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="folder for the run folders")
    parser.add_argument("--households", type=int, default=300)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for every unit to answer")
    args = parser.parse_args(argv)
    try:
        return run(args.out.absolute(), args.households, args.timeout)
    except KeyboardInterrupt:
        # The network's processes were stopped on the way out (``_network``); a traceback would only hide that.
        print("\ndemo: interrupted; every process of the network has stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
