"""The product's main job on one machine: ``make demo``.

Builds a loopback exchange network in a new folder ``demo-out/run-<date>-<time>/`` (a private CA, keystores,
certificates, 17 sharing units' connectors with synthetic data, the gateway; ``demo-out/latest`` points at it), then
acts as a commissioner and as the agency's staff: submits a commission of a few hundred households, takes it through
intake, review and dual approval, watches the exchange, issues the signed report and verifies it with the commands a
reader of the report would paste. Everything stops at the end; nothing is left running.
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
from datetime import datetime
from pathlib import Path

import grpc
from hedui.v1 import agency_pb2, agency_pb2_grpc, exchange_pb2, records_pb2

from common.categories import UNIT_DATA, UNIT_NAMES, data_category_label, unit_category_by_name
from common.db import make_engine
from connectors.synthetic import Population, Relation
from demo.console import Console
from demo.folders import console_script, has_earlier_layout, new_run_folder, point_latest, shell_line, shown
from demo.localnet import STAFF, Network, StartError, build_network
from gateway.archive.audit import AuditLog
from gateway.procedure.staff import StaffRegister
from keys import keystore
from keys.announcements import armor, read_bundle
from keys.identity import PartyKeys
from keys.statements import approval_message, verify_report
from keys.steps import StepKind, build_step, sign_step

COMMISSIONER = "commissioner.220102.mzj"
BACKOFFICE = "agency.220100.backoffice"
SEED = 20261127
_RELATIONS = {
    Relation.APPLICANT: agency_pb2.RELATION_APPLICANT,
    Relation.SUPPORT_OBLIGOR: agency_pb2.RELATION_SUPPORT_OBLIGOR,
}
#: Staff of the demo agency: the two exchange staff are the ones registered with the units in advance.
STAFF_ROLES = {
    STAFF[0]: ("exchange",),
    STAFF[1]: ("exchange",),
    "S-0003": ("intake",),
    "S-0004": ("review",),
    "S-0005": ("report",),
}
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


def _register_staff(net: Network, now_ms: int) -> dict[str, PartyKeys]:
    """The agency's staff register, as `hedui-gateway staff bootstrap-admin` / `staff add` would fill it."""
    engine = make_engine("sqlite:///" + str(net.root / "data" / "gateway.db"))
    audit = AuditLog(engine)
    register = StaffRegister(engine, audit)
    admin = PartyKeys.create("staff.220100.a-0001", now_ms=now_ms)
    register.bootstrap_admin(
        "A-0001",
        name="系统管理员",
        public_key=admin.signing_key(now_ms).public.raw,
        valid_from_ms=now_ms,
        now_ms=now_ms,
    )
    keys = {}
    for staff_id, roles in STAFF_ROLES.items():
        keys[staff_id] = PartyKeys.create(f"staff.220100.{staff_id.lower()}", now_ms=now_ms)
        register.register(
            "A-0001",
            staff_id,
            name=f"核对员{staff_id[-1]}",
            roles=roles,
            public_key=keys[staff_id].signing_key(now_ms).public.raw,
            valid_from_ms=now_ms,
            now_ms=now_ms,
        )
    engine.dispose()
    return keys


def _signed_step(
    net: Network, keys: PartyKeys, commission: agency_pb2.Commission, staff_id: str, kind: StepKind
) -> bytes:
    """The staff member's signature over a passing step, as `hedui-keys sign-step` makes it in their keystore."""
    step = build_step(
        agency=net.gateway_party, commission_id=commission.commission_id, kind=kind, staff_id=staff_id,
        exchange_digest=commission.exchange_digest,
    )  # fmt: skip
    return sign_step(step, keys.signing_key(_now()))


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
    console: Console, net: Network, households: int
) -> tuple[agency_pb2.Commission, agency_pb2_grpc.AgencyServiceStub, list[int], dict[str, PartyKeys]]:
    """Submit as the commissioner, then intake, review and two exchange approvals as the agency's staff."""
    staff_keys = _register_staff(net, _now())
    commissioner, office = _stub(net, COMMISSIONER), _stub(net, BACKOFFICE)
    package = _package(households)
    console.step(
        3,
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
        4,
        "Intake check by S-0003, second review by S-0004: two different staff (Procedure V.(一)), each signing their "
        "step with their own staff key; the gateway verifies the signature before it records the step",
    )
    intake = _signed_step(net, staff_keys["S-0003"], commission, "S-0003", agency_pb2.STEP_KIND_INTAKE)
    office.RecordIntake(agency_pb2.StaffDecision(commission_id=cid, staff_id="S-0003", passed=True, signature=intake))
    review = _signed_step(net, staff_keys["S-0004"], commission, "S-0004", agency_pb2.STEP_KIND_REVIEW)
    reviewed = office.RecordReview(
        agency_pb2.StaffDecision(commission_id=cid, staff_id="S-0004", passed=True, signature=review)
    )
    console.detail("both passed; the package is complete and every member has an authorisation")
    console.step(
        5,
        f"Dual approval: {STAFF[0]} and {STAFF[1]} each sign the exchange digest; no data leaves the agency without "
        "both (Procedure V.(二))",
    )
    console.detail(
        f"exchange digest {reviewed.exchange_digest.hex()} (SHA-256 of the commission and its whole package)"
    )
    for staff_id in STAFF:
        signature = staff_keys[staff_id].signing_key(_now()).sign(approval_message(reviewed.exchange_digest))
        commission = office.ApproveExchange(
            agency_pb2.ExchangeApproval(commission_id=cid, staff_id=staff_id, signature=signature)
        )
    state = agency_pb2.CommissionState.Name(commission.state).removeprefix("COMMISSION_STATE_").lower()
    console.detail(f"state: {state.replace('_', ' ')}")
    return commission, commissioner, list(package.categories), staff_keys


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
        6,
        "Exchange: the gateway seals one batch per sharing unit, each unit receipts it (its answer is due within 7 "
        "working days, clause 12) and answers",
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


def _report(
    console: Console, net: Network, run: Path, commission: agency_pb2.Commission, staff_keys: dict[str, PartyKeys]
) -> tuple[Path, Path] | None:
    """Issue the report as a third staff member, save it, and verify it as its reader would."""
    console.step(
        7,
        "S-0005, a third staff member (Procedure V.(一)), signs the report step and issues the report; the gateway "
        "signs it, with who signed each step and approval inside, so that anyone with the agency's public key can "
        "check it was not altered",
    )
    cid = commission.commission_id
    signature = _signed_step(net, staff_keys["S-0005"], commission, "S-0005", agency_pb2.STEP_KIND_REPORT)
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
        8,
        "The commissioner checks the signed report with the agency's key bundle and the fingerprint from its key "
        "letter (no keystore needed)",
    )
    fingerprint = read_bundle(bundle).fingerprint
    verify = [*console_script("hedui-keys", "keys.cli"), "verify-report", shown(signed_path),
              "--bundle", shown(bundle_path), "--fingerprint", fingerprint]  # fmt: skip
    if not _show(console, verify):
        return None
    console.step(
        9,
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
    console.step(10, f"What the network's Prometheus scrapes from the gateway ({url}), summed over labels")
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
        "other, and their configs",
    )
    with _network(run_dir / "net", households) as net:
        console.detail(f"{shown(net.root)}/: gateway.toml, one unit.*.toml per unit, keys/, tls/, data/, logs/")
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
        commission, commissioner, requested, staff_keys = _through_approval(console, net, households)
        if not _watch(console, commissioner, commission, requested, timeout):
            print(f"demo: the exchange did not finish in {timeout:.0f} s; the logs are in {shown(net.root / 'logs')}/",
                  file=sys.stderr)  # fmt: skip
            return 1
        saved = _report(console, net, run_dir, commission, staff_keys)
        if saved is None:
            return 1
        _metrics(console, net)
    console.step(11, f"Done in {time.monotonic() - started:.0f} s; every process of the network has stopped")
    console.detail(f"Open the report in a browser: {shown(saved[0])}")
    console.detail("  its last section, 签名与核验, shows the 'report sha256' that step 8 printed")
    console.detail(
        "Paste the command of step 8 to check the signature yourself; change one byte of the .hsr and it fails"
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
