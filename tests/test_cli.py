"""hedui-keys as a new user runs it from the README: two parties, fingerprint-checked enrolment, sealed files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path

import pytest
from hedui.v1 import agency_pb2, media_pb2

from keys import _canonical, keystore
from keys.announcements import armor, dearmor, read_bundle, sign_bundle
from keys.cli import main
from keys.clock import SystemClock, iso
from keys.envelope import Courier
from keys.keyring import KeyState
from keys.replay import MemoryReplayCache
from keys.statements import REPORT_DOMAIN
from tests.conftest import write_passphrase

PASSPHRASE = "correct horse battery staple"


class Party:
    def __init__(self, root: Path, party_id: str) -> None:
        self.party_id = party_id
        self.dir = root / party_id
        self.dir.mkdir()
        self.keystore = self.dir / "keystore.json"
        self.passfile = self.dir / "passphrase"
        write_passphrase(self.passfile, PASSPHRASE)

    def run(self, *args: str) -> int:
        return main(["--keystore", str(self.keystore), "--passphrase-file", str(self.passfile), *args])


def _fingerprint(capsys: pytest.CaptureFixture[str], bundle: Path) -> str:
    capsys.readouterr()
    assert main(["inspect", str(bundle)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("bundle fingerprint: "))
    return line.removeprefix("bundle fingerprint: ")


@pytest.fixture
def enrolled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Party, Party]:
    agency, unit = Party(tmp_path, "agency.220100"), Party(tmp_path, "unit.220100.tax")
    for party in (agency, unit):
        assert party.run("init", party.party_id) == 0
        assert party.run("export", "--out", str(tmp_path / f"{party.party_id}.bundle")) == 0
    assert agency.run("import", str(tmp_path / "unit.220100.tax.bundle"), "--fingerprint",
                      _fingerprint(capsys, tmp_path / "unit.220100.tax.bundle")) == 0  # fmt: skip
    assert unit.run("import", str(tmp_path / "agency.220100.bundle"), "--fingerprint",
                    _fingerprint(capsys, tmp_path / "agency.220100.bundle")) == 0  # fmt: skip
    return agency, unit


def test_readme_round_trip_seal_for_peer_and_open(enrolled: tuple[Party, Party], tmp_path: Path) -> None:
    agency, unit = enrolled
    source = tmp_path / "list.csv"
    source.write_bytes(b"subject_ref,category\nS1,tax\n")
    sealed = tmp_path / "list.hsf"
    assert agency.run("seal", str(source), "--to", unit.party_id, "--out", str(sealed)) == 0
    assert b"S1,tax" not in sealed.read_bytes()
    assert unit.run("open", str(sealed), "--out-dir", str(tmp_path / "inbox")) == 0
    opened = tmp_path / "inbox" / "list.csv"
    assert opened.read_bytes() == source.read_bytes()
    assert opened.stat().st_mode & 0o777 == 0o600


def test_import_with_wrong_fingerprint_is_refused_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    agency, unit = Party(tmp_path, "agency.220100"), Party(tmp_path, "unit.220100.tax")
    assert agency.run("init", agency.party_id) == 0
    assert unit.run("init", unit.party_id) == 0
    bundle = tmp_path / "unit.bundle"
    assert unit.run("export", "--out", str(bundle)) == 0
    before = agency.keystore.read_bytes()
    capsys.readouterr()
    assert agency.run("import", str(bundle), "--fingerprint", "12345 " * 8) == 1
    err = capsys.readouterr().err
    assert "fingerprint mismatch" in err and "Nothing was done" in err
    assert "12345 12345 12345" in err  # what was typed, to spot a slip ...
    assert read_bundle(dearmor(bundle.read_text())).fingerprint not in err  # ... but never the bundle's own
    assert agency.keystore.read_bytes() == before
    assert agency.run("import", str(bundle), "--fingerprint", "123") == 1
    assert "40 digits" in capsys.readouterr().err


def test_only_the_recipient_can_open_and_tampering_is_refused(
    enrolled: tuple[Party, Party], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    agency, unit = enrolled
    (tmp_path / "a.txt").write_text("x")
    sealed = tmp_path / "a.hsf"
    assert agency.run("seal", str(tmp_path / "a.txt"), "--to", unit.party_id, "--out", str(sealed)) == 0
    capsys.readouterr()
    assert agency.run("open", str(sealed), "--out-dir", str(tmp_path / "wrong")) == 1
    assert "wrong_recipient" in capsys.readouterr().err
    data = bytearray(sealed.read_bytes())
    data[-5] ^= 0x80
    sealed.write_bytes(bytes(data))
    assert unit.run("open", str(sealed), "--out-dir", str(tmp_path / "inbox")) == 1
    assert "invalid envelope" in capsys.readouterr().err
    assert not (tmp_path / "inbox" / "a.txt").exists()


def test_rotation_announcement_applied_by_peer_keeps_exchange_working(
    enrolled: tuple[Party, Party], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    agency, unit = enrolled
    assert agency.run("rotate", "signing", "--out", str(tmp_path / "rot.txt")) == 0
    assert agency.run("rotate", "agreement", "--out", str(tmp_path / "rot2.txt")) == 0
    (tmp_path / "b.txt").write_text("y")
    # Before applying the signing rotation, the unit does not know the agency's new key.
    assert agency.run("seal", str(tmp_path / "b.txt"), "--to", unit.party_id, "--out", str(tmp_path / "b.hsf")) == 0
    capsys.readouterr()
    assert unit.run("open", str(tmp_path / "b.hsf"), "--out-dir", str(tmp_path / "in")) == 1
    assert "unknown_key" in capsys.readouterr().err
    assert unit.run("apply", str(tmp_path / "rot.txt")) == 0
    assert unit.run("apply", str(tmp_path / "rot2.txt")) == 0
    assert unit.run("apply", str(tmp_path / "rot.txt")) == 0  # idempotent
    assert unit.run("open", str(tmp_path / "b.hsf"), "--out-dir", str(tmp_path / "in")) == 0
    # The unit now seals for the agency's new agreement key, which the agency holds.
    (tmp_path / "c.txt").write_text("z")
    assert unit.run("seal", str(tmp_path / "c.txt"), "--to", agency.party_id, "--out", str(tmp_path / "c.hsf")) == 0
    assert agency.run("open", str(tmp_path / "c.hsf"), "--out-dir", str(tmp_path / "in2")) == 0
    capsys.readouterr()
    assert unit.run("list") == 0
    listing = capsys.readouterr().out
    assert listing.count("retiring") == 2


def test_staged_rotation_leaves_peers_time_to_apply_it(
    enrolled: tuple[Party, Party], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --activate-in-days the old key goes on signing until the takeover, so a peer that has not applied the
    announcement yet still accepts what it receives; --activate-in-days beyond 30 is refused and changes nothing."""
    agency, unit = enrolled
    assert agency.run("rotate", "signing", "--activate-in-days", "31", "--out", str(tmp_path / "no.txt")) == 1
    assert "between now and 30 days" in capsys.readouterr().err
    assert not (tmp_path / "no.txt").exists()
    assert agency.run("rotate", "signing", "--activate-in-days", "3", "--out", str(tmp_path / "rot.txt")) == 0
    assert "takes over at" in capsys.readouterr().out
    (tmp_path / "b.txt").write_text("y")
    assert agency.run("seal", str(tmp_path / "b.txt"), "--to", unit.party_id, "--out", str(tmp_path / "b.hsf")) == 0
    assert unit.run("open", str(tmp_path / "b.hsf"), "--out-dir", str(tmp_path / "in")) == 0  # not applied yet
    assert unit.run("apply", str(tmp_path / "rot.txt")) == 0
    capsys.readouterr()
    assert unit.run("list") == 0
    listing = capsys.readouterr().out
    assert listing.count("pending") == 1 and listing.count("retiring") == 1


def test_revocation_stops_the_peer_accepting_the_key(
    enrolled: tuple[Party, Party], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    agency, unit = enrolled
    assert agency.run("rotate", "signing", "--out", str(tmp_path / "rot.txt")) == 0
    assert unit.run("apply", str(tmp_path / "rot.txt")) == 0
    party, _ = keystore.load(agency.keystore, PASSPHRASE)
    old = next(r for r in party.records() if r.state.name == "RETIRING")
    assert agency.run("revoke", old.key_id.hex(), "--reason", "compromised", "--out", str(tmp_path / "rev.txt")) == 0
    assert unit.run("apply", str(tmp_path / "rev.txt")) == 0
    capsys.readouterr()
    assert unit.run("list") == 0
    assert "revoked" in capsys.readouterr().out
    assert agency.run("revoke", "zz", "--reason", "x", "--out", str(tmp_path / "rev2.txt")) == 1


def test_wrong_passphrase_fails_cleanly(enrolled: tuple[Party, Party], capsys: pytest.CaptureFixture[str]) -> None:
    agency, _ = enrolled
    write_passphrase(agency.passfile, "not the passphrase at all")
    capsys.readouterr()
    assert agency.run("list") == 1
    err = capsys.readouterr().err
    assert "wrong passphrase or damaged file" in err
    assert "Traceback" not in err


def test_init_refuses_existing_keystore_and_short_passphrase(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    party = Party(tmp_path, "agency.220100")
    assert party.run("init", party.party_id) == 0
    before = party.keystore.read_bytes()
    assert party.run("init", party.party_id) == 1
    assert party.keystore.read_bytes() == before
    other = Party(tmp_path, "unit.220100.tax")
    write_passphrase(other.passfile, "short")
    assert other.run("init", other.party_id) == 1
    assert not other.keystore.exists()
    assert other.run("init", "Not A Party") == 1
    assert "party id" in capsys.readouterr().err


def test_open_refuses_a_sealed_file_with_a_path_in_its_name(
    enrolled: tuple[Party, Party], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    agency, unit = enrolled
    party, trust = keystore.load(agency.keystore, PASSPHRASE)
    courier = Courier(party, trust, replay=MemoryReplayCache())
    evil = courier.seal(media_pb2.SealedFile(file_name="../../etc/cron.d/x", content=b"x"), unit.party_id)
    (tmp_path / "evil.hsf").write_bytes(evil)
    capsys.readouterr()
    assert unit.run("open", str(tmp_path / "evil.hsf"), "--out-dir", str(tmp_path / "in")) == 1
    assert "unsafe file name" in capsys.readouterr().err
    assert not (tmp_path / "etc").exists()


@pytest.mark.parametrize(
    ("file_name", "why"),
    [(".bash_login", "starting with '.'"), ("invoice\u202efdp.exe", "unsafe file name"), ("a\u200bb.csv", "unsafe")],
)
def test_open_refuses_a_sealed_file_named_as_a_hidden_file_or_with_a_format_character(
    enrolled: tuple[Party, Party], tmp_path: Path, capsys: pytest.CaptureFixture[str], file_name: str, why: str
) -> None:
    """A dot-file (.bash_login written into a home folder) and U+202E ("invoice<RLO>fdp.exe" shows as
    "invoiceexe.pdf") were accepted as the name inside a .hsf."""
    agency, unit = enrolled
    party, trust = keystore.load(agency.keystore, PASSPHRASE)
    courier = Courier(party, trust, replay=MemoryReplayCache())
    sealed = courier.seal(media_pb2.SealedFile(file_name=file_name, content=b"x"), unit.party_id)
    (tmp_path / "evil.hsf").write_bytes(sealed)
    capsys.readouterr()
    assert unit.run("open", str(tmp_path / "evil.hsf"), "--out-dir", str(tmp_path / "in")) == 1
    assert why in capsys.readouterr().err
    assert not (tmp_path / "in").exists() or not any((tmp_path / "in").iterdir())
    source = tmp_path / file_name
    source.write_bytes(b"x")
    assert agency.run("seal", str(source), "--to", unit.party_id, "--out", str(tmp_path / "out.hsf")) == 1
    assert not (tmp_path / "out.hsf").exists()


def test_console_script_is_installed() -> None:
    exe = shutil.which("hedui-keys", path=os.path.dirname(sys.executable))
    assert exe is not None, "hedui-keys is not installed next to the test interpreter"
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    for command in ("init", "import", "seal", "open", "rotate", "revoke", "letter"):
        assert command in result.stdout


@pytest.mark.parametrize("program", ["hedui-keys", "hedui-gateway", "hedui-connector"])
def test_every_program_tells_its_release(program: str) -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / program), "--version"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{program} {version('hedui')}"


def test_a_reader_that_goes_away_is_no_error(tmp_path: Path) -> None:
    """``hedui-gateway status | head -2`` printed "error: [Errno 32] Broken pipe": the services' command lines now
    stop quietly when their reader has what it wanted."""
    script = (
        "import argparse, sys\n"
        "from common.cli import run\n"
        "def func(args):\n"
        "    for n in range(200_000):\n"
        "        print(f'line {n}')\n"
        "sys.exit(run('hedui-test', argparse.Namespace(func=func, log_level='INFO', log_format='text')))\n"
    )
    result = subprocess.run(
        ["bash", "-c", f'"{sys.executable}" -c "$0" | head -2', script],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent, check=True,
    )  # fmt: skip
    assert result.stdout == "line 0\nline 1\n"
    assert result.stderr == ""


YEAR_3_MILLION_MS = 100_000_000_000_000_000  # about year 3 170 843


def test_bundle_and_report_with_a_time_in_year_3_million_are_refused_as_malformed(
    enrolled: tuple[Party, Party], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A self-signed bundle or a signed report issued in year 3 million made inspect and verify-report print
    "error: year 3170843 is out of range" after the signature verified, and after importing such a bundle
    'hedui-keys list' failed for ever. Times past the year 9999 are now malformed input for the parser (TrustError)."""
    agency, unit = enrolled
    party, _ = keystore.load(agency.keystore, PASSPHRASE)
    signer = party.signing_key(SystemClock().now_ms())
    records = [r for r in party.records() if r.state is not KeyState.RETIRED]
    far = tmp_path / "far.bundle"
    far.write_text(armor(sign_bundle(party.party_id, records, signer, YEAR_3_MILLION_MS)))
    late = replace(records[0], not_after_ms=YEAR_3_MILLION_MS)
    far_key = tmp_path / "far-key.bundle"
    far_key.write_text(armor(sign_bundle(party.party_id, [late, *records[1:]], signer, SystemClock().now_ms())))
    good = tmp_path / "agency.bundle"
    assert agency.run("export", "--out", str(good)) == 0
    body = _canonical.encode(
        agency_pb2.Report(agency=party.party_id, commission_id="c-1", issued_at_ms=YEAR_3_MILLION_MS)
    )
    report = tmp_path / "report.bin"
    report.write_bytes(
        _canonical.encode(
            agency_pb2.SignedReport(
                report=body, signer_key_id=signer.key_id, signature=signer.sign(REPORT_DOMAIN + body)
            )
        )
    )
    fingerprint = _fingerprint(capsys, good)
    for argv in (
        ["inspect", str(far)],
        ["inspect", str(far_key)],
        ["verify-report", str(report), "--bundle", str(good), "--fingerprint", fingerprint],
    ):
        capsys.readouterr()
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert "is not a time between 1970 and the year 9999" in err and "out of range" not in err, err
    for bundle in (far, far_key):
        assert unit.run("import", str(bundle), "--fingerprint", fingerprint) == 1
    capsys.readouterr()
    assert unit.run("list") == 0
    assert iso(YEAR_3_MILLION_MS) == f"{YEAR_3_MILLION_MS} ms after 1970 (out of range)"
