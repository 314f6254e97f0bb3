"""``hedui-gateway backup`` / ``restore`` as an operator runs them (issue 10, item 9): a gateway that has done a real
exchange is backed up while it serves, restored into a fresh folder with a fresh config, and serves from there the
same commissions with an intact audit chain; a backup whose parts disagree is refused with nothing changed."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from hedui.v1 import agency_pb2, agency_pb2_grpc, exchange_pb2, records_pb2
from sqlalchemy import func, select

from common.db import make_engine
from connectors.synthetic import Population
from demo.localnet import Network, build_network, free_ports, wait_for_port
from gateway.db import schema
from gateway.db.database import head_revision, upgrade
from gateway.exchange.store import GatewayStore
from gateway.ops.backup import sha256_file
from keys import keystore
from keys.identity import PartyKeys
from keys.truststore import TrustStore
from tests.conftest_pg import postgres_schema
from tests.test_gateway_process import UNITS, enqueue, wait_until
from tests.test_startup import run_cli

COMMISSIONER = "commissioner.220102.mzj"


def api(net: Network, port: int) -> agency_pb2_grpc.AgencyServiceStub:
    tls = net.root / "tls"
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(tls / "ca.crt").read_bytes(),
        private_key=(tls / f"{COMMISSIONER}.client.key").read_bytes(),
        certificate_chain=(tls / f"{COMMISSIONER}.client.crt").read_bytes(),
    )
    return agency_pb2_grpc.AgencyServiceStub(grpc.secure_channel(f"localhost:{port}", credentials))


def commissions(net: Network, port: int) -> set[str]:
    listed = api(net, port).ListCommissions(agency_pb2.ListCommissionsRequest(limit=100), timeout=20)
    return {c.commission_id for c in listed.commissions}


def submit(net: Network, port: int, letter: str) -> str:
    """A commission through the API, as the commissioner's back office sends it (synthetic people)."""
    request = agency_pb2.SubmitCommissionRequest(
        letter=agency_pb2.CommissionLetter(number=letter, date=records_pb2.Date(year=2026, month=11, day=2)),
        programme=exchange_pb2.PROGRAMME_MINIMUM_LIVING_ALLOWANCE,
        income_from=records_pb2.YearMonth(year=2026, month=1),
        income_to=records_pb2.YearMonth(year=2026, month=10),
        assets_as_of=records_pb2.Date(year=2026, month=10, day=31),
        categories=[records_pb2.DATA_CATEGORY_TAX],
    )
    for household in Population(20261202).households(2):
        h = request.households.add(household_ref=f"H{household.index:05d}")
        for index, member in enumerate(household.members):
            h.members.add(
                id_number=member.id_number,
                name=member.name,
                relation=agency_pb2.RELATION_APPLICANT if index == 0 else agency_pb2.RELATION_FAMILY_MEMBER,
                authorisation=agency_pb2.PackageAuthorisation(
                    number=f"SQ-{index}", signed=True, fingerprinted=True,
                    scan_sha256=hashlib.sha256(b"scan" + member.id_number.encode()).digest(),
                ),
                id_copy_sha256=hashlib.sha256(b"id" + member.id_number.encode()).digest(),
            )  # fmt: skip
    return str(api(net, port).SubmitCommission(request, timeout=20).commission_id)


@dataclass
class Taken:
    """A backup of a gateway that did a real exchange, and what that gateway showed when it was taken."""

    net: Network
    backup: Path
    commissions: set[str]
    answers: int
    head: str


def take(root: Path, database_url: str | None = None) -> Taken:
    net = build_network(
        root / "net", UNITS, database_url=database_url, clients={COMMISSIONER: "commissioner"}, legacy_staff=True
    )
    try:
        net.start_connectors()
        net.start_gateway()
        url = database_url or f"sqlite:///{net.root / 'data' / 'gateway.db'}"
        store = GatewayStore(make_engine(url))
        submitted = submit(net, net.gateway_port, "WT-BACKUP-1")
        items = enqueue(store, "WT-B-1", 20, seed=20261202)
        assert wait_until(lambda: store.batches.answer_count() == items, 90), "the exchange did not finish"
        store.engine.dispose()
        shown = commissions(net, net.gateway_port)
        assert submitted in shown
        # As the daily job does: the head first (recorded off the machine), then the backup.
        status, head = run_cli("gateway.cli", ["audit", "head", "--config", str(net.gateway_config)])
        assert status == 0, head
        backup = root / "backup"
        status, output = run_cli("gateway.cli", ["backup", "--config", str(net.gateway_config), "--out", str(backup)])
        assert status == 0, output
    finally:
        net.stop_all()
    return Taken(net, backup, shown, items, head.strip().split()[-1])


def fresh_config(taken: Taken, folder: Path, database_url: str | None = None) -> tuple[Path, int]:
    """A new installation's config in ``folder``: the same party, TLS files and passphrase (from the safe), its own
    (not yet existing) keystore and database, its own ports. Returns the config and its API port."""
    folder.mkdir(parents=True)
    (folder / "keys").mkdir()
    passphrase = next((taken.net.root / "keys").glob("agency.*.passphrase"))
    shutil.copy(passphrase, folder / "keys" / "keystore.passphrase")
    (folder / "keys" / "keystore.passphrase").chmod(0o600)
    text = taken.net.gateway_config.read_text(encoding="utf-8")
    old_keystore = next((taken.net.root / "keys").glob("agency.*.keystore.json"))
    old_url = database_url_of(text)
    port, metrics = free_ports(2)
    text = (
        text.replace(str(old_keystore), str(folder / "keys" / "keystore.json"))
        .replace(str(passphrase), str(folder / "keys" / "keystore.passphrase"))
        .replace(old_url, database_url or f"sqlite:///{folder / 'gateway.db'}")
        .replace(f"127.0.0.1:{taken.net.gateway_port}", f"127.0.0.1:{port}")
        .replace(f"127.0.0.1:{taken.net.gateway_metrics_port}", f"127.0.0.1:{metrics}")
    )
    config = folder / "gateway.toml"
    config.write_text(text, encoding="utf-8")
    return config, port


def database_url_of(config_text: str) -> str:
    line = next(line for line in config_text.splitlines() if line.startswith("url = "))
    return str(json.loads(line.removeprefix("url = ")))


def check_restored_serves(taken: Taken, config: Path, port: int, url: str) -> None:
    """The restored gateway, as a process: the same commissions through the API, the same answers, a chain that
    verifies against the head recorded when the backup was taken."""
    status, output = run_cli("gateway.cli", ["audit", "verify", "--config", str(config), "--expected-head", taken.head])
    assert status == 0, output
    engine = make_engine(url)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(schema.answers)).scalar_one() == taken.answers
    engine.dispose()
    served = Network(taken.net.root, taken.net.gateway_party, config, {}, {}, port)
    try:
        process = served.start_gateway(f"restored-{port}.log")
        wait_for_port(port, process=process)
        assert commissions(taken.net, port) == taken.commissions
        # New work gets new ids after the restored ones (on PostgreSQL: the sequences were moved past them).
        added = submit(taken.net, port, "WT-BACKUP-2")
        assert added not in taken.commissions and commissions(taken.net, port) == {*taken.commissions, added}
    finally:
        served.stop_all()


@pytest.fixture(scope="module")
def taken(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Taken]:
    yield take(tmp_path_factory.mktemp("taken"))


def restore_cli(config: Path, source: Path, *extra: str) -> tuple[int, str]:
    return run_cli("gateway.cli", ["restore", "--config", str(config), "--from", str(source), *extra])


@pytest.mark.slow
def test_a_backup_taken_while_serving_restores_into_a_fresh_folder_and_serves_the_same_commissions(
    taken: Taken, tmp_path: Path
) -> None:
    config, port = fresh_config(taken, tmp_path / "fresh")
    status, output = restore_cli(config, taken.backup)
    assert status == 0, output
    head = json.loads((taken.backup / "manifest.json").read_text(encoding="utf-8"))["audit_head"]
    assert f"audit head {head['seq']}:{head['hash']} (verified)" in output
    assert (tmp_path / "fresh" / "keys" / "keystore.json").read_bytes() == (taken.backup / "keystore.json").read_bytes()
    check_restored_serves(taken, config, port, f"sqlite:///{tmp_path / 'fresh' / 'gateway.db'}")
    # Restoring again over what is there now is refused without --force, and changes nothing.
    before = sha256_file(tmp_path / "fresh" / "gateway.db")
    status, output = restore_cli(config, taken.backup)
    assert status == 1 and "not empty" in output and "Traceback" not in output, output
    assert sha256_file(tmp_path / "fresh" / "gateway.db") == before


def test_a_backup_as_one_tar_file_restores_too(taken: Taken, tmp_path: Path) -> None:
    tar = tmp_path / "gateway.tar"
    status, output = run_cli("gateway.cli", ["backup", "--config", str(taken.net.gateway_config), "--out", str(tar)])
    assert status == 0, output
    config, _ = fresh_config(taken, tmp_path / "fresh")
    status, output = restore_cli(config, tar)
    assert status == 0, output


def tampered(taken: Taken, tmp_path: Path) -> tuple[Path, dict[str, object]]:
    copy = tmp_path / "backup"
    shutil.copytree(taken.backup, copy)
    return copy, json.loads((copy / "manifest.json").read_text(encoding="utf-8"))


def rewrite(backup: Path, manifest: dict[str, object]) -> None:
    (backup / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")


def assert_refused_unchanged(config: Path, backup: Path, *phrases: str) -> None:
    status, output = restore_cli(config, backup)
    assert status == 1, output
    assert "Traceback" not in output, output
    for phrase in phrases:
        assert phrase in output, output
    folder = config.parent
    assert not (folder / "gateway.db").exists(), "a refused restore created the database"
    assert not (folder / "keys" / "keystore.json").exists(), "a refused restore wrote the keystore"


def test_restore_refuses_a_file_whose_hash_is_not_the_manifests(taken: Taken, tmp_path: Path) -> None:
    backup, _ = tampered(taken, tmp_path)
    data = bytearray((backup / "database.sqlite3").read_bytes())
    data[-100] ^= 0x01
    (backup / "database.sqlite3").write_bytes(bytes(data))
    config, _ = fresh_config(taken, tmp_path / "fresh")
    assert_refused_unchanged(config, backup, "database.sqlite3 does not match its SHA-256")


def test_restore_refuses_the_keystore_of_another_party(taken: Taken, tmp_path: Path) -> None:
    backup, manifest = tampered(taken, tmp_path)
    config, _ = fresh_config(taken, tmp_path / "fresh")
    passphrase = keystore.read_passphrase_file(tmp_path / "fresh" / "keys" / "keystore.passphrase")
    other = PartyKeys.create("agency.220200", now_ms=1_800_000_000_000)
    (backup / "keystore.json").unlink()
    keystore.save(backup / "keystore.json", other, TrustStore(), passphrase, kdf=keystore.FAST_FOR_TESTS)
    for entry in manifest["files"]:  # type: ignore[attr-defined]
        if entry["path"] == "keystore.json":  # a consistent manifest: only the party check can catch it
            entry["sha256"] = sha256_file(backup / "keystore.json")
            entry["bytes"] = (backup / "keystore.json").stat().st_size
    rewrite(backup, manifest)
    assert_refused_unchanged(config, backup, "the backup is of agency.220200", "the config is agency.220100")


def test_restore_refuses_a_database_whose_audit_head_is_not_the_manifests(taken: Taken, tmp_path: Path) -> None:
    backup, manifest = tampered(taken, tmp_path)
    head = manifest["audit_head"]
    head["hash"] = "00" * 32  # type: ignore[index]
    rewrite(backup, manifest)
    config, _ = fresh_config(taken, tmp_path / "fresh")
    assert_refused_unchanged(config, backup, "its manifest says", "not of one backup")


def test_restore_refuses_a_head_recorded_off_the_machine_that_the_chain_does_not_hold(
    taken: Taken, tmp_path: Path
) -> None:
    config, _ = fresh_config(taken, tmp_path / "fresh")
    seq, _, _ = taken.head.partition(":")
    recorded = f"{seq}:{'ab' * 32}"
    status, output = restore_cli(config, taken.backup, "--expected-head", recorded)
    assert status == 1 and "audit chain does not verify" in output, output
    assert not (tmp_path / "fresh" / "gateway.db").exists()


@pytest.mark.postgres
@pytest.mark.slow
def test_a_postgresql_backup_restores_into_a_fresh_schema_and_serves(tmp_path: Path) -> None:
    with postgres_schema() as source_url:
        taken = take(tmp_path / "pg", database_url=source_url)
    manifest = json.loads((taken.backup / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["database"]["form"] == "rows-jsonl" and manifest["database"]["tables"]["answers"] == taken.answers
    with postgres_schema() as target_url:
        config, port = fresh_config(taken, tmp_path / "fresh", database_url=target_url)
        status, output = restore_cli(config, taken.backup)
        assert status == 0, output
        check_restored_serves(taken, config, port, target_url)


def test_an_older_backup_is_migrated_on_restore_and_a_newer_one_refused(taken: Taken, tmp_path: Path) -> None:
    old = tmp_path / "old.db"
    engine = make_engine(f"sqlite:///{old}")
    upgrade(engine, "0006")  # a database of an older release
    engine.dispose()
    text = taken.net.gateway_config.read_text(encoding="utf-8")
    old_config = tmp_path / "old.toml"
    old_config.write_text(text.replace(database_url_of(text), f"sqlite:///{old}"), encoding="utf-8")
    status, output = run_cli("gateway.cli", ["backup", "--config", str(old_config), "--out", str(tmp_path / "b")])
    assert status == 0, output
    config, _ = fresh_config(taken, tmp_path / "fresh")
    status, output = restore_cli(config, tmp_path / "b")
    assert status == 0 and f"schema 0006 -> {head_revision()}" in output, output
    (tmp_path / "fresh" / "gateway.db").unlink()
    (tmp_path / "fresh" / "keys" / "keystore.json").unlink()
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text(encoding="utf-8"))
    manifest["schema_revision"] = "9999"
    rewrite(tmp_path / "b", manifest)
    assert_refused_unchanged(config, tmp_path / "b", "schema revision '9999' is unknown to this build")
