"""The README's first command, smaller, as a person meets it: the whole procedure on a loopback network, run twice
into the same folder (once in this process, once as ``python -m demo`` writing into a pipe), with no personal data
from the synthetic population in any log line, commands that work when pasted, and every report left verifiable."""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hedui.v1 import records_pb2
from sqlalchemy import select

from common.db import make_engine
from connectors.synthetic import Population
from demo import run as demo
from demo.console import Console
from demo.folders import console_script, point_latest, shown
from gateway.db import schema
from keys.announcements import dearmor, read_bundle
from keys.cli import main as keys_main

ROOT = Path(__file__).resolve().parent.parent
HOUSEHOLDS = (12, 3)


@dataclass
class DemoRuns:
    """Two demo runs into ``cwd/demo-out``: what each printed on stdout."""

    cwd: Path
    out: Path
    printed: tuple[str, str]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRuns]:
    """``make demo`` twice from the same folder: first in this process (stdout not a terminal), then as its own
    process with stdout a pipe and the colour switch left to the demo (NO_COLOR unset)."""
    cwd = tmp_path_factory.mktemp("repo")
    out = cwd / "demo-out"
    before = Path.cwd()
    os.chdir(cwd)
    try:
        first = io.StringIO()
        with contextlib.redirect_stdout(first):
            assert demo.run(out, HOUSEHOLDS[0], timeout=120) == 0
        env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
        second = subprocess.run(
            [sys.executable, "-m", "demo", "--out", "demo-out", "--households", str(HOUSEHOLDS[1])],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert second.returncode == 0, second.stdout + second.stderr
        yield DemoRuns(cwd, out, (first.getvalue(), second.stdout))
    finally:
        os.chdir(before)


def _run_folders(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.name.startswith("run-"))


@pytest.mark.slow
def test_demo_runs_the_whole_procedure_and_logs_no_personal_data(runs: DemoRuns) -> None:
    for printed, folder in zip(runs.printed, _run_folders(runs.out), strict=True):
        assert "OK: the report is signed by agency.220100" in printed and "audit log intact" in printed
        assert "by 3 different people: yes (intake S-0003, review S-0004, report S-0005)" in printed
        reports = list(folder.glob("report-*.html"))
        assert len(reports) == 1 and "核对报告" in reports[0].read_text(encoding="utf-8")
        assert shown(reports[0]) in printed  # the report's path is printed, as the person can open it
        logs = "\n".join(
            p.read_text(encoding="utf-8", errors="replace") for p in (folder / "net" / "logs").glob("*.log")
        )
        assert "serving" in logs
    logs_and_output = "\n".join(
        [*runs.printed, *(p.read_text(errors="replace") for p in runs.out.glob("run-*/net/logs/*.log"))]
    )
    people = [m for h in Population(demo.SEED).households(max(HOUSEHOLDS)) for m in h.members]
    for member in people:
        assert member.id_number not in logs_and_output and member.name not in logs_and_output


@pytest.mark.slow
def test_printed_verify_command_works_when_pasted_into_a_shell(runs: DemoRuns) -> None:
    """The printed commands failed when pasted: `hedui-keys` is not on PATH (it is in .venv/bin) and the fingerprint,
    which contains spaces, was not quoted. Each printed `$` line must work as printed, from the folder the demo ran
    in, with a PATH that does not hold the virtual environment."""
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env = {**os.environ, "PATH": path}
    for printed in runs.printed:
        commands = [line.strip().removeprefix("$ ") for line in printed.splitlines() if line.strip().startswith("$ ")]
        # Each side's view of the other's roster, then the report, the audit chain and the signed steps.
        assert len(commands) == 5 and "roster list --party agency.220100" in commands[0]
        assert "roster list --party unit.220100.tax" in commands[1]
        assert "verify-report" in commands[2] and "audit verify" in commands[3] and "archive steps" in commands[4]
        assert "--fingerprint '" in commands[2]
        for command in commands:
            result = subprocess.run(
                command, shell=True, cwd=runs.cwd, env=env, capture_output=True, text=True, check=False
            )
            assert result.returncode == 0, (command, result.stdout, result.stderr)
        # The second run was started with a relative --out: its paths are printed relative to where it ran.
    assert " demo-out/run-" in runs.printed[1]


@pytest.mark.slow
def test_staff_are_registered_both_ways_and_every_unit_verifies_the_approvals(runs: DemoRuns) -> None:
    """The demo's units were configured with `allow_unverified_approvals = true` and a [[staff]] id list, so none of
    them verified an approval against a roster. Now both sides register their staff with the roster commands, the
    rosters travel by trust synchronisation, the units verify the two approvals against the agency's roster, and
    every answer set names the unit's responsible staff member, checked by the gateway against the unit's roster."""
    for printed, folder in zip(runs.printed, _run_folders(runs.out), strict=True):
        assert "17/17 units applied the agency's roster version 2 and acknowledged it" in printed
        assert "the gateway holds 17/17 units' rosters, in force" in printed
        assert "production keeps the default notice, 1 working day" in printed
        assert "names the unit's responsible staff (U-0001); the gateway checked them against the unit's roster for " \
            "16 of 16 units" in printed  # fmt: skip
        configs = list((folder / "net").glob("unit.*.toml"))
        assert len(configs) == 17
        for config in configs:
            text = config.read_text(encoding="utf-8")
            assert "allow_unverified_approvals = false" in text and "[[staff]]" not in text
            assert "notice_working_days = 0" in text
        engine = make_engine(f"sqlite:///{folder / 'net' / 'data' / 'gateway.db'}")
        try:
            with engine.connect() as conn:
                batches = conn.execute(select(schema.batches.c.batch_id, schema.batches.c.state)).all()
                staff = {r.batch_id: r for r in conn.execute(select(schema.answer_staff))}
        finally:
            engine.dispose()
        assert len(batches) == 16 and {b.state for b in batches} <= {"answered", "acknowledged"}
        assert all(staff[b.batch_id].staff_ids == "U-0001" and staff[b.batch_id].roster_version == 1 for b in batches)


@pytest.mark.slow
def test_rerun_keeps_every_report_next_to_the_bundle_that_verifies_it(runs: DemoRuns) -> None:
    """A second run used to overwrite demo-out/agency.bundle and leave the first report beside a key that no longer
    verified it. Each run now has its own folder, and `latest` points to the newest."""
    folders = _run_folders(runs.out)
    assert len(folders) == 2
    assert (runs.out / "latest").resolve() == folders[1].resolve()
    assert not list(runs.out.glob("report-*")) and not (runs.out / "agency.bundle").exists()
    reports = sorted(runs.out.rglob("report-*.hsr"))
    assert len(reports) == 2
    for report in reports:
        bundle = report.parent / "agency.bundle"
        fingerprint = read_bundle(dearmor(bundle.read_text(encoding="utf-8"))).fingerprint
        assert keys_main(["verify-report", str(report), "--bundle", str(bundle), "--fingerprint", fingerprint]) == 0


@pytest.mark.slow
def test_no_ansi_escapes_when_output_is_not_a_terminal(runs: DemoRuns) -> None:
    for printed in runs.printed:
        assert "\x1b[" not in printed and "\r" not in printed


@pytest.mark.slow
def test_connectors_are_shown_as_they_come_up(runs: DemoRuns) -> None:
    """Starting 17 connectors took 12 s of silence: each one is now reported as it comes up."""
    for printed in runs.printed:
        up = re.findall(r"^ +(\d+)/17 (unit\.220100\.[a-z-]+) serving on 127\.0\.0\.1:\d+$", printed, re.M)
        assert [int(n) for n, _ in up] == list(range(1, 18))
        assert len({unit for _, unit in up}) == 17


@pytest.mark.slow
def test_the_unit_asked_nothing_is_named_with_the_reason(runs: DemoRuns) -> None:
    for printed in runs.printed:
        assert "16 of 17 units are asked." in printed
        assert "unit.220100.other (其他) is asked nothing: it stands for clause 7 (十七)" in printed


def test_not_asked_explains_a_unit_whose_data_was_not_requested() -> None:
    """The 'other' unit holds no data category of clause 7; any other unit is asked nothing only when none of its
    categories is requested."""
    everything = [c for c in records_pb2.DataCategory.values() if c]
    assert [s.split(" ", 1)[0] for s in demo.not_asked(everything)] == ["unit.220100.other"]
    only_tax = demo.not_asked([records_pb2.DATA_CATEGORY_TAX])
    assert len(only_tax) == 16 and not any(s.startswith("unit.220100.tax ") for s in only_tax)
    land = next(s for s in only_tax if s.startswith("unit.220100.land "))
    assert "requested none of the data it holds (real_estate (不动产))" in land


def test_colour_only_for_a_terminal_and_never_with_no_color() -> None:
    """Bold step titles went into files and pipes as escape sequences. A terminal (a real pseudo-terminal here)
    gets them unless NO_COLOR is set to a non-empty value or TERM is dumb; anything else never does."""
    controller, terminal_fd = pty.openpty()
    try:
        with open(terminal_fd, "w", encoding="utf-8", closefd=False) as terminal:
            assert Console(terminal, environ={}).colour
            assert Console(terminal, environ={"NO_COLOR": ""}).colour  # no-color.org: set but empty is not set
            assert not Console(terminal, environ={"NO_COLOR": "1"}).colour
            assert not Console(terminal, environ={"TERM": "dumb"}).colour
        captured = io.StringIO()
        console = Console(captured, environ={})
        console.step(1, "a step")
        console.progress("1/2")
        console.progress("2/2")
        console.detail("a line")
        assert not console.colour and captured.getvalue() == "\n 1. a step\n    1/2\n    2/2\n    a line\n"
    finally:
        os.close(controller)
        os.close(terminal_fd)


def test_progress_rewrites_one_line_in_a_terminal() -> None:
    controller, terminal_fd = pty.openpty()
    try:
        with open(terminal_fd, "w", encoding="utf-8", closefd=False) as terminal:
            console = Console(terminal, environ={"NO_COLOR": "1"})
            console.progress("10/17 connectors")
            console.progress("17/17")
            console.detail("next")
        written = os.read(controller, 4096).decode()
        assert "\x1b" not in written
        assert written.replace("\r\n", "\n") == "\r    10/17 connectors\r    17/17           \n    next\n"
    finally:
        os.close(controller)
        os.close(terminal_fd)


def test_latest_link_never_replaces_what_the_demo_did_not_make(tmp_path: Path) -> None:
    run_a, run_b = tmp_path / "run-a", tmp_path / "run-b"
    run_a.mkdir()
    run_b.mkdir()
    assert point_latest(tmp_path, run_a) == tmp_path / "latest"
    assert point_latest(tmp_path, run_b) == tmp_path / "latest"
    assert os.readlink(tmp_path / "latest") == "run-b"  # relative: the folder can be moved whole
    (tmp_path / "latest").unlink()
    (tmp_path / "latest").mkdir()
    (tmp_path / "latest" / "mine.txt").write_text("a person's file")
    assert point_latest(tmp_path, run_a) is None
    assert (tmp_path / "latest" / "mine.txt").read_text() == "a person's file"


def test_programs_are_named_by_a_path_that_works_without_path(tmp_path: Path) -> None:
    """hedui-keys is not on PATH after `make demo`: the demo names the script beside its own Python."""
    venv_bin = Path(sys.executable).parent
    assert console_script("hedui-keys", "keys.cli", cwd=tmp_path) == [str(venv_bin / "hedui-keys")]
    assert console_script("hedui-keys", "keys.cli", cwd=venv_bin.parent.parent) == [
        str((venv_bin / "hedui-keys").relative_to(venv_bin.parent.parent))
    ]
    assert shown(tmp_path / "demo-out" / "x.hsr", cwd=tmp_path) == "demo-out/x.hsr"
    assert shown(Path("/elsewhere/x.hsr"), cwd=tmp_path) == "/elsewhere/x.hsr"


def test_package_metadata_has_an_spdx_license_and_no_license_deprecation_warning() -> None:
    """`license = { text = ... }` made setuptools warn on every install (deprecated since setuptools 77)."""
    pytest.importorskip("setuptools", minversion="77")
    # Imported by name: setuptools ships no type information, and this is the reading `pip install` does.
    pyproject = importlib.import_module("setuptools.config.pyprojecttoml")
    distribution = importlib.import_module("setuptools.dist").Distribution
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = pyproject.apply_configuration(distribution(), ROOT / "pyproject.toml")
    assert [str(w.message) for w in caught if "license" in str(w.message).lower()] == []
    assert dist.metadata.license_expression == "LicenseRef-Proprietary"
    assert not [c for c in dist.metadata.classifiers or [] if c.startswith("License ::")]


@pytest.mark.slow
def test_interrupted_demo_stops_its_network_without_a_traceback(tmp_path: Path) -> None:
    """Ctrl-C while the connectors start: a one-line message, exit status 130, and none of them left listening."""
    process = subprocess.Popen(
        [sys.executable, "-m", "demo", "--out", str(tmp_path), "--households", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert process.stdout is not None and process.stderr is not None
    seen = []
    for line in process.stdout:
        seen.append(line)
        if re.search(r" 1/17 unit\.", line):
            break
    (config,) = tmp_path.glob("run-*/net/gateway.toml")
    ports = [int(p) for p in re.findall(r'^endpoint = "127\.0\.0\.1:(\d+)"$', config.read_text(), re.M)]
    assert len(ports) == 17
    process.send_signal(signal.SIGINT)
    _, errors = process.communicate(timeout=120)
    assert process.returncode == 130, errors
    assert "Traceback" not in errors and "interrupted; every process of the network has stopped" in errors
    for port in ports:
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0
