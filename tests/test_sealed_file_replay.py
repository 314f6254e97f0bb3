"""A sealed file (.hsf) opens once per keystore: in one process, across processes and restarts, and when two
processes race (issue 10, item 1). The replay store is the keystore owner's SQLite file (keys/replay.py).

The keystores are written with the test suite's cheap KDF parameters, so the real ``hedui-keys`` program, run as a
subprocess, loads them in milliseconds.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from keys import keystore
from keys.cli import main
from keys.clock import DAY_MS, SystemClock
from keys.envelope import Courier
from keys.errors import ReplayedEnvelope, ReplayStoreError
from keys.identity import PartyKeys
from keys.replay import PRUNE_GRACE_MS, FileReplayCache, MemoryReplayCache, default_replay_store_path
from keys.sealedfile import open_sealed_file, seal_file
from keys.truststore import TrustStore
from tests.conftest import real_fingerprint, write_passphrase

PASSPHRASE = "correct horse battery staple"
AGENCY, UNIT = "agency.220100", "unit.220100.tax"
HEDUI_KEYS = str(Path(sys.executable).parent / "hedui-keys")


class Keystores:
    """An agency and a unit that enrolled each other, as keystore files, and a sealed file for the unit."""

    def __init__(self, root: Path) -> None:
        now = SystemClock().now_ms()
        self.root = root
        self.agency = PartyKeys.create(AGENCY, now_ms=now)
        self.unit = PartyKeys.create(UNIT, now_ms=now)
        self.agency_trust, self.unit_trust = TrustStore(), TrustStore()
        self.agency_trust.import_bundle(self.unit.bundle(now), expected_fingerprint=real_fingerprint(self.unit))
        self.unit_trust.import_bundle(self.agency.bundle(now), expected_fingerprint=real_fingerprint(self.agency))
        self.unit_keystore = root / "unit.json"
        keystore.save(self.unit_keystore, self.unit, self.unit_trust, PASSPHRASE, kdf=keystore.FAST_FOR_TESTS)
        self.passfile = write_passphrase(root / "passphrase", PASSPHRASE)
        self.sealed = root / "list.hsf"
        self.sealed.write_bytes(self.seal(b"subject_ref,category\nS1,tax\n"))

    def seal(self, content: bytes, name: str = "list.csv", ttl_ms: int = 30 * DAY_MS) -> bytes:
        courier = Courier(self.agency, self.agency_trust, replay=MemoryReplayCache())
        return seal_file(courier, name, content, UNIT, ttl_ms=ttl_ms)

    def args(self, out_dir: str, *extra: str) -> list[str]:
        return ["--keystore", str(self.unit_keystore), "--passphrase-file", str(self.passfile), *extra,
                "open", str(self.sealed), "--out-dir", str(self.root / out_dir)]  # fmt: skip


@pytest.fixture
def stores(tmp_path: Path) -> Keystores:
    return Keystores(tmp_path)


def test_sealed_file_opened_twice_in_one_process_is_refused_as_a_replay(
    stores: Keystores, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(stores.args("first")) == 0
    assert (stores.root / "first" / "list.csv").read_bytes().startswith(b"subject_ref")
    capsys.readouterr()
    assert main(stores.args("second")) == 1
    err = capsys.readouterr().err
    assert "invalid envelope (replay:" in err and "opened before with this keystore" in err
    assert "Traceback" not in err
    assert not (stores.root / "second").exists()


def test_sealed_file_opened_twice_by_two_hedui_keys_processes_is_refused(stores: Keystores) -> None:
    first = subprocess.run([HEDUI_KEYS, *stores.args("first")], capture_output=True, text=True, check=False)
    assert first.returncode == 0, first.stderr
    second = subprocess.run([HEDUI_KEYS, *stores.args("second")], capture_output=True, text=True, check=False)
    assert second.returncode == 1
    assert "(replay:" in second.stderr and "Traceback" not in second.stderr
    assert not (stores.root / "second" / "list.csv").exists()
    store = default_replay_store_path(stores.unit_keystore)
    assert store.name == "unit.json.replay" and store.stat().st_mode & 0o777 == 0o600


def test_racing_hedui_keys_processes_open_a_sealed_file_exactly_once(stores: Keystores) -> None:
    runs = [
        subprocess.Popen([HEDUI_KEYS, *stores.args(f"out{i}")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for i in range(4)
    ]
    results = [(run.wait(timeout=120), run.stderr.read().decode() if run.stderr else "") for run in runs]
    assert sorted(code for code, _ in results) == [0, 1, 1, 1], results
    assert all("(replay:" in err for code, err in results if code == 1)
    assert sum((stores.root / f"out{i}" / "list.csv").exists() for i in range(4)) == 1


def _remember_in_child(path: str, start: multiprocessing.synchronize.Barrier, results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    with FileReplayCache(Path(path), party_id=UNIT) as cache:
        start.wait()
        results.put(cache.remember(AGENCY, b"m" * 16, keep_until_ms=2_000_000, now_ms=1_000_000))


def test_racing_processes_remember_one_message_id_exactly_once(tmp_path: Path) -> None:
    """The store itself: eight processes released together, one message id: one of them sees it new."""
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(8), context.Queue()
    path = str(tmp_path / "replay")
    FileReplayCache(Path(path), party_id=UNIT).close()
    children = [context.Process(target=_remember_in_child, args=(path, start, results)) for _ in range(8)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
    assert [child.exitcode for child in children] == [0] * 8
    assert sorted(results.get(timeout=5) for _ in range(8)) == [False] * 7 + [True]


def test_replay_store_survives_a_restart(stores: Keystores) -> None:
    """What one process remembered, a new one (a new connection to the file, as after a reboot) still refuses."""
    path = stores.root / "replay"
    data = stores.sealed.read_bytes()
    with FileReplayCache(path, party_id=UNIT) as cache:
        opened = open_sealed_file(Courier(stores.unit, stores.unit_trust, replay=cache), data)
        assert opened.file_name == "list.csv"
    with FileReplayCache(path, party_id=UNIT) as cache, pytest.raises(ReplayedEnvelope):
        open_sealed_file(Courier(stores.unit, stores.unit_trust, replay=cache), data)


def test_a_keystore_without_a_replay_store_gets_one_on_first_open(stores: Keystores) -> None:
    store = stores.root / "elsewhere" / "seen.db"
    store.parent.mkdir()
    assert main(stores.args("in", "--replay-store", str(store))) == 0
    assert store.exists() and not default_replay_store_path(stores.unit_keystore).exists()
    os.environ["HEDUI_REPLAY_STORE"] = str(store)
    try:
        assert main(stores.args("in2")) == 1  # the environment names the same store
    finally:
        del os.environ["HEDUI_REPLAY_STORE"]


def test_a_file_that_could_not_be_written_is_not_counted_as_opened(stores: Keystores) -> None:
    (stores.root / "in").mkdir()
    (stores.root / "in" / "list.csv").write_bytes(b"already here")
    assert main(stores.args("in")) == 1
    assert (stores.root / "in" / "list.csv").read_bytes() == b"already here"
    assert main(stores.args("in2")) == 0


def test_replay_store_of_another_party_or_shared_or_foreign_is_refused(stores: Keystores, tmp_path: Path) -> None:
    path = tmp_path / "replay"
    FileReplayCache(path, party_id=AGENCY).close()
    with pytest.raises(ReplayStoreError, match="belongs to another keystore"):
        FileReplayCache(path, party_id=UNIT)
    path.chmod(0o644)
    with pytest.raises(ReplayStoreError, match="chmod 600"):
        FileReplayCache(path, party_id=AGENCY)
    foreign = tmp_path / "foreign"
    foreign.write_bytes(b"not a database at all" * 100)
    foreign.chmod(0o600)
    with pytest.raises(ReplayStoreError):
        FileReplayCache(foreign, party_id=UNIT)
    assert main(stores.args("in", "--replay-store", str(foreign))) == 1
    assert not (stores.root / "in" / "list.csv").exists()


def test_entries_are_pruned_only_after_expiry_and_the_grace(tmp_path: Path) -> None:
    with FileReplayCache(tmp_path / "replay", party_id=UNIT) as cache:
        assert cache.remember(AGENCY, b"a" * 16, keep_until_ms=1_000, now_ms=500)
        assert not cache.remember(AGENCY, b"a" * 16, keep_until_ms=1_000, now_ms=1_000 + PRUNE_GRACE_MS)
        assert cache.remember(AGENCY, b"b" * 16, keep_until_ms=9_000_000_000, now_ms=1_001 + PRUNE_GRACE_MS)
        assert len(cache) == 1  # "a" expired more than the grace ago: the time check refuses it on its own


def _limited_memory() -> None:
    """In the child: a reader that never stops (a file that is /dev/zero) dies at 1 GiB instead of filling the
    machine, so that the test fails quickly rather than taking the test host down."""
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def _run_refused(*args: str) -> str:
    """Run the real hedui-keys on a hostile input path; it must refuse quickly with one line on stderr."""
    result = subprocess.run(
        [HEDUI_KEYS, *args], capture_output=True, text=True, check=False, timeout=30, preexec_fn=_limited_memory
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hedui-keys: error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_input_files_that_are_a_fifo_or_dev_zero_are_refused_not_read_forever(
    stores: Keystores, tmp_path: Path, kind: str
) -> None:
    """A symlink to /dev/zero (size 0 to stat(), endless to read) made 'open' grow ~1 GB/s, and a FIFO blocked
    every reader on open(): both are refused as not regular files, for every reader of outside files."""
    hostile = tmp_path / "hostile"
    if kind == "fifo":
        os.mkfifo(hostile, 0o600)
    else:
        hostile.symlink_to("/dev/zero")
    keys = ["--keystore", str(stores.unit_keystore), "--passphrase-file", str(stores.passfile)]
    for command in (
        [*keys, "open", str(hostile), "--out-dir", str(tmp_path / "in")],
        [*keys, "import", str(hostile), "--fingerprint", "x"],
        [*keys, "apply", str(hostile)],
        ["inspect", str(hostile)],
        ["verify-report", str(hostile)],
        ["ca", "show", str(hostile)],
        ["--keystore", str(hostile), "--passphrase-file", str(stores.passfile), "list"],
        ["--keystore", str(stores.unit_keystore), "--passphrase-file", str(hostile), "list"],
    ):
        assert "is not a regular file" in _run_refused(*command), command
    assert not (tmp_path / "in").exists()


def test_a_symlink_to_the_keystore_finds_the_same_replay_store(stores: Keystores, tmp_path: Path) -> None:
    """The default store was derived from the keystore path as given: `ln -s unit.json other/k.json` gave a fresh
    store beside the link, and the sealed file opened a second time."""
    assert main(stores.args("first")) == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "k.json").symlink_to(stores.unit_keystore)
    args = stores.args("second")
    args[args.index(str(stores.unit_keystore))] = str(other / "k.json")
    assert main(args) == 1
    assert not (stores.root / "second" / "list.csv").exists()
    assert not (other / "k.json.replay").exists()


def test_an_emptied_replay_store_is_refused_not_taken_as_new(
    stores: Keystores, capsys: pytest.CaptureFixture[str]
) -> None:
    """`: > unit.json.replay` left an empty file that was silently laid out as a new store: every file opened again."""
    assert main(stores.args("first")) == 0
    store = default_replay_store_path(stores.unit_keystore)
    store.write_bytes(b"")
    capsys.readouterr()
    assert main(stores.args("second")) == 1
    err = capsys.readouterr().err
    assert "is empty: it was truncated or replaced" in err and "Traceback" not in err
    assert not (stores.root / "second" / "list.csv").exists()
    with pytest.raises(ReplayStoreError, match="is empty"):
        FileReplayCache(store, party_id=UNIT)
