"""The product's main job on one machine: ``make demo``.

Builds a loopback exchange network in demo-out/ (a private CA, keystores, certificates, 17 sharing units' connectors
with synthetic data, the gateway), then acts as a commissioner and as the agency's staff: submits a commission of a
few hundred households, takes it through intake, review and dual approval, watches the exchange, issues the signed
report and verifies it. Everything stops at the end; nothing is left running.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
from hedui.v1 import agency_pb2, agency_pb2_grpc, exchange_pb2, records_pb2

from common.categories import UNIT_NAMES
from common.db import make_engine
from connectors.synthetic import Population, Relation
from demo.localnet import STAFF, Network, build_network
from gateway.archive.audit import AuditLog
from gateway.procedure.staff import StaffRegister
from keys import keystore
from keys.announcements import armor, read_bundle
from keys.identity import PartyKeys
from keys.statements import approval_message, verify_report

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


def _units() -> dict[str, str]:
    """One connector per sharing-unit category of clause 7."""
    names = {}
    for category in sorted(UNIT_NAMES):
        name = records_pb2.UnitCategory.Name(category).removeprefix("UNIT_CATEGORY_").lower()  # type: ignore[arg-type]
        names[f"unit.220100.{name.replace('_', '-')}"] = name
    return names


def _say(text: str) -> None:
    print(f"\033[1m== {text}\033[0m", flush=True)


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


def _unfinished(progress: agency_pb2.Progress, subjects: int) -> list[str]:
    """One line per unit that has not answered every subject: where its queries stand."""
    lines = []
    for unit in progress.units:
        if unit.answered < subjects:
            counts = ("queued", "sent", "receipted", "answered", "overdue", "delayed", "failed")
            lines.append(f"   {unit.unit_id}: " + ", ".join(f"{name} {getattr(unit, name)}" for name in counts))
    return lines


def _show(program: str, command: list[str]) -> bool:
    """Run one of our own commands as an operator would, and print what it says."""
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    print(f"   $ {program} " + " ".join(command[3:]))
    for line in (result.stdout + result.stderr).strip().splitlines():
        print(f"     {line}")
    return result.returncode == 0


def _now() -> int:
    return int(time.time() * 1000)


def _through_approval(net: Network, households: int) -> tuple[agency_pb2.Commission, agency_pb2_grpc.AgencyServiceStub]:
    """Submit as the commissioner, then intake, review and two exchange approvals as the agency's staff."""
    staff_keys = _register_staff(net, _now())
    commissioner, office = _stub(net, COMMISSIONER), _stub(net, BACKOFFICE)
    _say(f"Commissioner {COMMISSIONER} submits a data package of {households} households")
    commission = commissioner.SubmitCommission(_package(households))
    cid = commission.commission_id
    print(f"   commission {cid}: {commission.households} households, {commission.subjects} subjects, state received")
    _say("Intake review by S-0003, second review by S-0004 (Procedure V.(一): different staff)")
    office.RecordIntake(agency_pb2.StaffDecision(commission_id=cid, staff_id="S-0003", passed=True))
    reviewed = office.RecordReview(agency_pb2.StaffDecision(commission_id=cid, staff_id="S-0004", passed=True))
    _say(f"Exchange approved by {STAFF[0]} and {STAFF[1]}, each signing the exchange digest (Procedure V.(二))")
    print(f"   exchange digest {reviewed.exchange_digest.hex()}")
    for staff_id in STAFF:
        signature = staff_keys[staff_id].signing_key(_now()).sign(approval_message(reviewed.exchange_digest))
        commission = office.ApproveExchange(
            agency_pb2.ExchangeApproval(commission_id=cid, staff_id=staff_id, signature=signature)
        )
    state = agency_pb2.CommissionState.Name(commission.state).removeprefix("COMMISSION_STATE_").lower()
    print(f"   state: {state}")
    return commission, commissioner


def _watch(commissioner: agency_pb2_grpc.AgencyServiceStub, commission: agency_pb2.Commission, timeout: float) -> bool:
    """Print progress until every unit has answered every subject, or ``timeout`` seconds pass."""
    _say("Exchange: batches sealed for each unit, receipts (due in 7 working days), answers")
    deadline = time.monotonic() + timeout
    ref = agency_pb2.CommissionRef(commission_id=commission.commission_id)
    while time.monotonic() < deadline:
        progress = commissioner.GetProgress(ref)
        answered = sum(u.answered for u in progress.units)
        total = commission.subjects * len(progress.units)
        print(f"   {answered:>6} / {total} subject-queries answered across {len(progress.units)} units", flush=True)
        if total and answered >= total:
            return True
        time.sleep(1.0)
    unfinished = _unfinished(commissioner.GetProgress(ref), commission.subjects)
    print("units that have not answered every subject:", *unfinished, sep="\n")
    return False


def _report(net: Network, root: Path, cid: str) -> tuple[Path, Path] | None:
    """Issue the report as a third staff member, save it, and verify it as its reader would."""
    _say("Report issued by S-0005 (a third staff member), signed by the gateway key")
    signed = _stub(net, BACKOFFICE).IssueReport(agency_pb2.IssueReportRequest(commission_id=cid, staff_id="S-0005"))
    passphrase = (net.root / "keys" / f"{net.gateway_party}.passphrase").read_text().strip()
    gateway_keys, _ = keystore.load(net.root / "keys" / f"{net.gateway_party}.keystore.json", passphrase)
    report = verify_report(signed, gateway_keys.signing_key(_now()).public)
    html_path, signed_path, bundle_path = (
        root / f"report-{cid}.html",
        root / f"report-{cid}.hsr",
        root / "agency.bundle",
    )
    html_path.write_text(signed.html, encoding="utf-8")
    signed_path.write_bytes(signed.SerializeToString())
    bundle = gateway_keys.bundle(_now())
    bundle_path.write_text(armor(bundle), encoding="utf-8")
    missing = len(report.units_not_answered)
    print(f"   {len(report.households)} households, signature verified; units not answered: {missing}")
    verify = [sys.executable, "-m", "keys.cli", "verify-report", str(signed_path), "--bundle", str(bundle_path),
              "--fingerprint", read_bundle(bundle).fingerprint]  # fmt: skip
    audit = [sys.executable, "-m", "gateway.cli", "--log-level", "WARNING", "audit", "verify",
             "--config", str(net.gateway_config)]  # fmt: skip
    if not (_show("hedui-keys", verify) and _show("hedui-gateway", audit)):
        return None
    return html_path, signed_path


def _metrics(net: Network) -> None:
    """Show what the network administrator's Prometheus sees on the gateway's metrics port."""
    url = f"http://127.0.0.1:{net.gateway_metrics_port}/metrics"
    _say(f"Metrics, as Prometheus scrapes them from {url}")
    with urllib.request.urlopen(url, timeout=10) as response:  # loopback, our own endpoint
        text = response.read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in {"hedui_queries_sent_total", "hedui_queries_answered_total", "hedui_receipts_total",
                    "hedui_envelope_rejections_total", "hedui_unit_up", "hedui_commissions"}:  # fmt: skip
            totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    for name, value in totals.items():
        print(f"   {name:36} {value:>10.0f}   (summed over its labels)")


def run(root: Path, households: int, timeout: float) -> int:
    started = time.monotonic()
    shutil.rmtree(root / "net", ignore_errors=True)  # a fresh network every time: new keys, empty databases
    _say(f"Building a loopback exchange network in {root / 'net'}: CA, keystores, certificates, 17 units, a gateway")
    with _network(root / "net", households) as net:
        _say("Starting 17 connectors (synthetic data for every clause-7 category) and the gateway")
        net.start_connectors()
        net.start_gateway()
        commission, commissioner = _through_approval(net, households)
        if not _watch(commissioner, commission, timeout):
            print("the exchange did not finish in time; see the logs in", net.root / "logs", file=sys.stderr)
            return 1
        saved = _report(net, root, commission.commission_id)
        if saved is None:
            return 1
        _metrics(net)
    _say(f"Done in {time.monotonic() - started:.0f} s; everything has stopped")
    print(f"   printable report:  {saved[0]}")
    print(f"   signed report:     {saved[1]}")
    print(f"   agency key bundle: {root / 'agency.bundle'} (its fingerprint is in the command above)")
    print(f"   audit chain:       hedui-gateway audit verify --config {net.gateway_config}")
    print(f"   logs:              {net.root / 'logs'}/")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--households", type=int, default=300)
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for every unit to answer")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    return run(args.out.resolve(), args.households, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
