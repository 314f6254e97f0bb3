"""Benchmark of the exchange engine end to end: N subjects x K units through real connectors on loopback.

Not a test: it measures and prints. Run it from the repository root in the project's virtualenv::

    python bench/bench_exchange.py                              # 10k, 100k, 1M subject-queries, SQLite and PostgreSQL
    python bench/bench_exchange.py --quick                      # smoke run of about a minute; numbers indicative
    python bench/bench_exchange.py --db sqlite --sizes 100000   # one database, one size
    python bench/bench_exchange.py --write docs/performance.md  # also refresh the results block of that file

Every run builds a fresh loopback network with demo.localnet.build_network (private CA, keystores, mutual-TLS
certificates, connectors answering from the synthetic population) and starts ``hedui-connector serve`` for each of
K units and ``hedui-gateway serve`` as separate processes, exactly as an operator would. The gateway's database is
a fresh SQLite file or a fresh PostgreSQL database (created for the run and dropped after it). Then:

1. enqueue: one commission with N = size / K synthetic people, asking every data category of the K units, is
   stored with GatewayStore.enqueue (one transaction: N subjects, their approval trees and N x K items) — the agency
   API's part of a cycle, timed on its own;
2. exchange: the gateway (policy continuous, short intervals) forms batches, seals and sends them over gRPC, the
   connectors answer from the synthetic adapter, the gateway fetches, verifies and stores every answer and
   acknowledges it. The clock stops when every item has an answer (and, reported separately, every batch is
   acknowledged).

A subject-query is one subject asked of one unit (one item, one stored answer). Reported per run: subject-queries
per second overall and per phase, when batches were all formed, all receipted, all answered, peak RSS (the
kernel's VmHWM) of the gateway and of every connector, CPU-seconds of each process and of the rest of the machine
(PostgreSQL, this driver), and database size. Sizes that do not fit the time budget are skipped and, if at all,
only extrapolated (and labelled so). With py-spy installed, one extra run is sampled by py-spy (gateway and
connectors) and the heaviest functions are listed.

Targets (issue 4): with SQLite at least 35,000 subject-queries per second (a 20-million subject-query monthly
cycle in at most 10 minutes), and gateway peak memory under 512 MiB and flat (bounded by batch size, not by the
number of subjects). A full run that misses a target exits with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from importlib import metadata
from pathlib import Path

import psycopg
from hedui.v1 import exchange_pb2
from psycopg import sql
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.engine import make_url

from common.categories import UNIT_DATA, unit_category_by_name
from common.db import make_engine
from connectors.synthetic import Member, Population
from demo.localnet import STAFF, Network, build_network
from gateway.db import schema
from gateway.exchange.outbox import CommissionInput, SubjectInput
from gateway.exchange.store import GatewayStore
from gateway.procedure.routing import route
from keys import keystore
from results import ResultsBlock, revision  # bench/results.py, beside this script

MIB = 1024 * 1024
KIB = 1024

RESULTS = ResultsBlock("bench_exchange")
# The code whose speed this measures: uncommitted changes there are noted with the results.
MEASURED_CODE = ("gateway", "connectors", "common", "keys", "bench")

SEED = 20261127  # population and synthetic units share it, so queried names are the names the units hold
GATEWAY_PARTY = "agency.220100"

#: Target rate with SQLite: 1.2 million people x 17 units in 10 minutes, rounded up (issue 4).
TARGET_RATE = 35_000
JILIN_CYCLE = 20_000_000
TARGET_CYCLE_S = 600.0
TARGET_RSS = 512 * MIB
#: "Flat": the gateway's peak RSS at the largest size is at most this much above the next smaller size's. (Not
#: the smallest: a run smaller than one batch per unit does not reach the steady state in which memory is bounded
#: by batch size.)
FLAT_SLACK = 32 * MIB
FLAT_RATIO = 1.25

#: Sharing units in the order the benchmark adds them (--units K takes the first K): the first five mix categories
#: most people have a record in (household register 98 %, health-free: social insurance 85 %) with rare ones
#: (loans, securities, vehicles), so answers have a realistic mix of FOUND and NO_RECORD and of record sizes.
UNIT_CATALOGUE: tuple[tuple[str, str], ...] = (
    ("tax", "tax"),
    ("land", "land"),
    ("bank", "financial_institution"),
    ("hrss", "human_resources"),
    ("police", "public_security"),
    ("civil", "civil_affairs"),
    ("housing", "housing"),
    ("health", "health"),
    ("market", "market_regulation"),
    ("agri", "agriculture"),
    ("cdpf", "disabled_federation"),
    ("edu", "education"),
    ("finance", "finance"),
    ("transport", "transport"),
    ("forestry", "forestry"),
    ("staffing", "establishment"),
)
DEFAULT_UNITS = 5
DEFAULT_BATCH = 5000
DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (10_000, 50_000)
DEFAULT_BUDGET_S = 840.0
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

#: Time for building a network, starting the processes and tearing them down (seconds, for the budget).
SETUP_S = 8.0
#: Assumed rate before anything was measured (subject-queries per second, for the budget).
FIRST_GUESS_RATE = 5_000.0
POLL_S = 0.25
RSS_SAMPLE_S = 0.1
ACK_WAIT_S = 30.0


# --- processes: memory and CPU from /proc ------------------------------------------------------------------------


def proc_status_kib(pid: int, key: str) -> int:
    """A ``Vm*`` line of /proc/<pid>/status in KiB (0 once the process is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def proc_cpu_s(pid: int) -> float:
    """User + system CPU-seconds of a process (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def machine_cpu_s() -> tuple[float, float]:
    """Busy and stolen CPU-seconds of the whole machine since boot."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    busy = (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / tick  # user nice system irq softirq
    return busy, (fields[7] / tick if len(fields) > 7 else 0.0)


def own_cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


class Watch:
    """Samples RSS of the network's processes in a thread; CPU-seconds are read at marks."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)
        self.sampled_peak = dict.fromkeys(self.pids, 0)
        self.baseline = {name: proc_status_kib(pid, "VmRSS") for name, pid in self.pids.items()}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.wait(RSS_SAMPLE_S):
            for name, pid in self.pids.items():
                self.sampled_peak[name] = max(self.sampled_peak[name], proc_status_kib(pid, "VmRSS"))

    def cpu(self) -> dict[str, float]:
        return {name: proc_cpu_s(pid) for name, pid in self.pids.items()}

    def hwm(self) -> dict[str, int]:
        """Peak RSS in KiB: the kernel's high-water mark, or the sampled peak if that is higher (never is)."""
        return {name: max(proc_status_kib(pid, "VmHWM"), self.sampled_peak[name]) for name, pid in self.pids.items()}

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()


# --- databases ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def gateway_database(kind: str, net_root: Path, pg_base: str, tag: str) -> Iterator[str]:
    """The URL of a fresh gateway database: a file in the network's folder, or a PostgreSQL database made for
    this run and dropped after it."""
    if kind == "sqlite":
        yield f"sqlite:///{net_root / 'data' / 'gateway.db'}"
        return
    base = make_url(pg_base)
    name = sql.Identifier(f"hedui_bench_{os.getpid()}_{tag}")
    admin = base.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(name))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(name))
    try:
        yield base.set(database=f"hedui_bench_{os.getpid()}_{tag}").render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))


def database_bytes(engine: Engine, net_root: Path) -> int:
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one())
    return sum(p.stat().st_size for p in (net_root / "data").glob("gateway.db*"))


# --- one run -----------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One size on one database: what was asked and what was measured."""

    db: str
    size: int  # subject-queries asked for
    units: int
    batch_size: int
    subjects: int = 0
    items: int = 0
    enqueue_s: float = 0.0
    exchange_s: float = 0.0  # end of enqueue until every item has an answer
    acked_s: float | None = None  # end of enqueue until every batch is acknowledged
    formed_s: float | None = None
    receipted_s: float | None = None
    first_answer_s: float | None = None
    answered: int = 0
    complete: bool = False
    error: str | None = None
    rss_start: dict[str, int] = field(default_factory=dict)  # KiB, after start-up
    rss_peak: dict[str, int] = field(default_factory=dict)  # KiB, VmHWM
    cpu: dict[str, float] = field(default_factory=dict)  # CPU-seconds during enqueue + exchange
    driver_cpu_s: float = 0.0  # this process: the enqueue, progress queries, RSS sampling
    enqueue_cpu_s: float = 0.0  # of which the enqueue
    other_cpu_s: float = 0.0  # the rest of the machine: the PostgreSQL server, anything else
    steal_s: float = 0.0
    db_bytes: int = 0
    log_counts: dict[str, int] = field(default_factory=dict)
    profile: dict[str, Counter[str]] | None = None
    profile_samples: dict[str, int] = field(default_factory=dict)

    @property
    def total_s(self) -> float:
        return self.enqueue_s + self.exchange_s

    @property
    def rate(self) -> float:
        """Subject-queries per second for the whole cycle (enqueue and exchange)."""
        return self.answered / self.total_s if self.total_s else 0.0

    @property
    def exchange_rate(self) -> float:
        return self.answered / self.exchange_s if self.exchange_s else 0.0

    @property
    def enqueue_rate(self) -> float:
        return self.items / self.enqueue_s if self.enqueue_s else 0.0

    @property
    def cpu_per_query_us(self) -> float:
        """CPU time of the gateway, the connectors and the enqueue per subject-query (what the rate costs, however
        busy the machine was with other work)."""
        ours = sum(self.cpu.values()) + self.enqueue_cpu_s
        return ours / self.answered * 1e6 if self.answered else 0.0

    @property
    def gateway_peak(self) -> int:
        return self.rss_peak.get("gateway", 0) * KIB

    @property
    def connector_peak(self) -> int:
        return max((v for k, v in self.rss_peak.items() if k != "gateway"), default=0) * KIB


def units_for(count: int) -> dict[str, str]:
    if not 1 <= count <= len(UNIT_CATALOGUE):
        raise SystemExit(f"--units must be 1 to {len(UNIT_CATALOGUE)}")
    return {f"unit.220100.{short}": category for short, category in UNIT_CATALOGUE[:count]}


def categories_of(units: Mapping[str, str]) -> tuple[int, ...]:
    """Every data category the units hold: a verification asks each unit for everything it has."""
    wanted: list[int] = []
    for category in units.values():
        wanted += [c for c in UNIT_DATA[unit_category_by_name(category)] if c not in wanted]
    return tuple(wanted)


def make_subjects(count: int) -> list[SubjectInput]:
    """The first ``count`` people of the synthetic population, whole households in order."""
    population, index = Population(SEED), 0
    people: list[Member] = []
    while len(people) < count:
        people.extend(population.household(index).members)
        index += 1
    return [
        SubjectInput(f"BX-{i}", m.id_number, m.name, f"AUTH-{i}", hashlib.sha256(m.id_number.encode()).digest())
        for i, m in enumerate(people[:count])
    ]


def watch_engine(url: str) -> Engine:
    """An engine for watching progress that does not disturb the gateway: on SQLite a plain engine, whose reads
    run in deferred transactions (make_engine's engines begin every transaction with BEGIN IMMEDIATE, so even a
    read would take the write lock the gateway's workers queue for)."""
    return create_engine(url) if make_url(url).get_backend_name() == "sqlite" else make_engine(url)


@dataclass(frozen=True)
class Progress:
    """Batches per state, and whether any item still waits to be put in a batch."""

    batches: dict[str, int]
    queued: bool

    @property
    def answered(self) -> int:
        return self.batches.get("answered", 0) + self.batches.get("acknowledged", 0)

    @property
    def in_flight(self) -> int:
        return self.batches.get("ready", 0) + self.batches.get("receipted", 0)


def progress(engine: Engine) -> Progress:
    """Where the exchange stands, from two queries that indexes answer alone. (Summing subject_count per state
    would read every batch row; on SQLite a column stored after the batch's content blob is reached by walking
    the blob's overflow pages, a fifth of a second per look at 300,000 subject-queries, taken from the CPU the
    run is measuring.)"""
    with engine.connect() as conn:
        # Items first: once none waits, every batch exists, so the states read next are those of all batches
        # (the two reads need not share a snapshot).
        waiting = conn.execute(select(schema.items.c.id).where(schema.items.c.batch_id.is_(None)).limit(1)).first()
        rows = conn.execute(select(schema.batches.c.state, func.count()).group_by(schema.batches.c.state)).all()
    return Progress({state: int(count) for state, count in rows}, waiting is not None)


def count_log_levels(logs: Path) -> dict[str, int]:
    """Warnings and errors the services logged (their own loggers; APScheduler's notes that a job run was skipped
    because the previous one still runs are expected with intervals this short)."""
    counts: dict[str, int] = {}
    for log in logs.glob("*.log"):
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            fields = line.split(maxsplit=4)
            if line.startswith("Traceback"):
                counts["Traceback"] = counts.get("Traceback", 0) + 1
            elif len(fields) > 3 and fields[2] in {"WARNING", "ERROR"} and fields[3].startswith("hedui"):
                counts[fields[2]] = counts.get(fields[2], 0) + 1
    return counts


class Profiler:
    """py-spy sampling the network's processes (threads it does not find idle) while a run goes on."""

    def __init__(self, pids: Mapping[str, int], folder: Path, rate: int = 49) -> None:
        self.outputs = {name: folder / f"pyspy-{name}.txt" for name in pids}
        self.processes = {
            name: subprocess.Popen(
                [
                    *("py-spy", "record", "--nonblocking", "--threads", "--format", "raw", "--rate", str(rate)),
                    *("--output", str(self.outputs[name]), "--pid", str(pid)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for name, pid in pids.items()
        }

    def stop(self) -> tuple[dict[str, Counter[str]], dict[str, int]]:
        for process in self.processes.values():
            process.send_signal(signal.SIGINT)
        for process in self.processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        stacks = {name: Counter[str]() for name in self.outputs}
        for name, path in self.outputs.items():
            if path.exists():
                for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                    stack, _, count = line.rpartition(" ")
                    if stack and count.isdigit():
                        stacks[name][stack] += int(count)
        return stacks, {name: sum(c.values()) for name, c in stacks.items()}


def measure(
    db: str,
    size: int,
    units: Mapping[str, str],
    batch_size: int,
    people: Sequence[SubjectInput],
    pg_base: str,
    deadline_s: float,
    tag: str,
    *,
    profile: bool = False,
    keep: bool = False,
) -> Run:
    """Build a network, start it, enqueue, wait for every answer (or the deadline), stop, tear down."""
    subjects = people[: max(1, size // len(units))]
    run = Run(db, size, len(units), batch_size, subjects=len(subjects))
    root = Path(tempfile.mkdtemp(prefix=f"hedui-bench-{db}-"))
    try:
        with gateway_database(db, root / "net", pg_base, tag) as url:
            network = build_network(
                root / "net",
                units,
                gateway_party=GATEWAY_PARTY,
                database_url=url,
                seed=SEED,
                batch_size=batch_size,
                dispatch_interval=0.2,
                poll_interval=0.2,
                answer_interval=0.1,
                kdf=keystore.FAST_FOR_TESTS,
            )
            try:
                _drive(run, network, url, subjects, categories_of(units), deadline_s, profile)
            finally:
                network.stop_all()
            run.log_counts = count_log_levels(root / "net" / "logs")
    except Exception as exc:  # report what went wrong with the numbers so far; never hide it
        run.error = f"{type(exc).__name__}: {exc}"
    finally:
        if keep:
            print(f"    kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    return run


def _drive(
    run: Run,
    network: Network,
    url: str,
    subjects: Sequence[SubjectInput],
    categories: tuple[int, ...],
    deadline_s: float,
    profile: bool,
) -> None:
    connectors = network.start_connectors()
    gateway = network.start_gateway()
    store = GatewayStore(make_engine(url))
    watcher = watch_engine(url)
    try:
        units = store.units.all()
        unit_ids = route(categories, units)
        if len(unit_ids) != run.units:
            raise RuntimeError(f"gateway knows {len(unit_ids)} of {run.units} units")
        pids = {"gateway": gateway.pid, **{u.rsplit(".", 1)[-1]: p.pid for u, p in connectors.items()}}
        time.sleep(1.0)  # let start-up settle (first scheduler ticks, gRPC channels)
        watch = Watch(pids)
        profiler = Profiler(pids, network.root) if profile else None
        commission = CommissionInput(
            ref=f"BENCH-{run.db}-{run.size}",
            purpose=exchange_pb2.PROGRAMME_MINIMUM_LIVING_ALLOWANCE,
            income_from=(2026, 1),
            income_to=(2026, 10),
            assets_as_of=date(2026, 10, 31),
            staff_ids=STAFF,
            categories=categories,
        )
        cpu0, (busy0, steal0), own0 = watch.cpu(), machine_cpu_s(), own_cpu_s()
        start = time.perf_counter()
        # With the commission's approval trees (its batches carry their proofs, which the units check); the units
        # judge the approvers by the migration rule (demo/localnet.py), so no approvals are recorded here.
        store.outbox.enqueue(commission, subjects, unit_ids, int(time.time() * 1000), gateway=network.gateway_party)
        enqueued = time.perf_counter()
        run.enqueue_s = enqueued - start
        run.enqueue_cpu_s = own_cpu_s() - own0
        run.items = len(subjects) * len(unit_ids)
        print(f"    enqueued {run.items:,} items in {run.enqueue_s:.1f} s", file=sys.stderr)
        finish_by = start + deadline_s
        last_note = enqueued
        while time.perf_counter() < finish_by:
            state = progress(watcher)
            now = time.perf_counter() - enqueued
            if run.formed_s is None and not state.queued:
                run.formed_s = now
            if run.formed_s is not None and run.receipted_s is None and not state.batches.get("ready"):
                run.receipted_s = now
            if run.first_answer_s is None and state.answered:
                run.first_answer_s = now
            if state.batches.get("failed"):
                raise RuntimeError(f"{state.batches['failed']} batches refused by the units (see the logs)")
            if not state.queued and state.answered and not state.in_flight:
                run.exchange_s = now
                break
            if now - (last_note - enqueued) >= 15:
                last_note = time.perf_counter()
                print(f"    {now:5.0f} s: batches {state.batches}", file=sys.stderr)
            time.sleep(POLL_S)
        else:
            run.exchange_s = time.perf_counter() - enqueued
        cpu1, (busy1, steal1), own1 = watch.cpu(), machine_cpu_s(), own_cpu_s()
        run.rss_peak, run.rss_start = watch.hwm(), watch.baseline
        with watcher.connect() as conn:
            run.answered = int(conn.execute(select(func.count()).select_from(schema.answers)).scalar_one())
        run.complete = run.answered == run.items
        run.cpu = {name: cpu1[name] - cpu0[name] for name in cpu0}
        run.driver_cpu_s = own1 - own0
        run.other_cpu_s = max(0.0, (busy1 - busy0) - sum(run.cpu.values()) - run.driver_cpu_s)
        run.steal_s = steal1 - steal0
        if profiler is not None:
            run.profile, run.profile_samples = profiler.stop()
        if run.complete:  # the rest of the cycle: acknowledgements (not part of the rate)
            ack_by = time.perf_counter() + ACK_WAIT_S
            while time.perf_counter() < ack_by:
                state = progress(watcher)
                if not state.in_flight and state.batches.get("acknowledged", 0) == sum(state.batches.values()):
                    run.acked_s = time.perf_counter() - enqueued
                    break
                time.sleep(POLL_S)
        watch.stop()
        run.rss_peak = watch.hwm() if not run.rss_peak else run.rss_peak
        run.db_bytes = database_bytes(store.engine, network.root)
        if not run.complete:
            run.error = run.error or f"deadline: {run.answered:,} of {run.items:,} answered after {deadline_s:.0f} s"
    finally:
        watcher.dispose()
        store.engine.dispose()


# --- profile summary ---------------------------------------------------------------------------------------------

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
_OURS = ("gateway/", "connectors/", "keys/", "common/")


def frame_name(frame: str) -> str:
    """'unit_cycle (gateway/exchange/engine.py:118)' -> 'gateway/exchange/engine.py:unit_cycle'."""
    match = _FRAME.match(frame)
    if not match:
        return frame
    path = match["file"]
    for marker in _OURS:
        at = path.rfind(marker)
        if at >= 0:
            return f"{path[at:]}:{match['func']}"
    return f"{path.rsplit('/', 1)[-1]}:{match['func']}"


def profile_tables(stacks: Counter[str], top: int) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """Inclusive shares of our own functions and self shares of any function, largest first."""
    total = sum(stacks.values()) or 1
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    for stack, count in stacks.items():
        frames = [frame_name(f) for f in stack.split(";") if not f.startswith(("thread ", "process "))]
        if not frames:
            continue
        for name in set(frames):
            if name.startswith(_OURS):
                inclusive[name] += count
        leaf[frames[-1]] += count
    return (
        [(name, n / total) for name, n in inclusive.most_common(top)],
        [(name, n / total) for name, n in leaf.most_common(top)],
    )


# --- reporting ---------------------------------------------------------------------------------------------------


def mib(kib: int) -> str:
    return f"{kib / 1024:,.0f}"


def seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:,.1f}"


def size_label(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else f"{n:,}"


def machine_lines(pg_base: str, used_pg: bool) -> list[str]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    version = metadata.version
    lines = [
        f"- CPU: {model}, {cores} usable cores (nproc); {memory / 2**30:.0f} GiB RAM",
        f"- OS: {platform.platform()}",
        f"- Python {platform.python_version()}, grpcio {version('grpcio')}, protobuf {version('protobuf')}, "
        f"SQLAlchemy {version('SQLAlchemy')}, SQLite {sqlite_version()}, psycopg {version('psycopg')}",
    ]
    if used_pg:
        lines.append(f"- PostgreSQL {postgres_version(pg_base)} on the same machine (127.0.0.1, default settings)")
    return lines


def sqlite_version() -> str:
    return sqlite3.sqlite_version


def postgres_version(pg_base: str) -> str:
    try:
        engine = make_engine(pg_base)
        with engine.connect() as conn:
            version = str(conn.execute(text("SHOW server_version")).scalar_one())
        engine.dispose()
    except Exception:  # a version string is not worth failing the report for
        return "unknown"
    return version.split(maxsplit=1)[0]


def verdict(ok: bool) -> str:
    return "**PASS**" if ok else "**FAIL**"


def flat(small: int, large: int) -> bool:
    return large <= max(small * FLAT_RATIO, small + FLAT_SLACK)


def report(
    runs: Sequence[Run],
    skipped: Sequence[tuple[str, int, float]],
    command: str,
    quick: bool,
    pg_base: str,
    profiled: Run | None,
    started_at: datetime,
    elapsed_s: float,
) -> tuple[str, bool]:
    """The markdown block for docs/performance.md, and whether every target was met."""
    k, batch = runs[0].units, runs[0].batch_size
    lines = [
        f"Produced by `{command}` on {started_at:%Y-%m-%d %H:%M} UTC, revision {revision(MEASURED_CODE)}"
        + (" — **quick run, numbers indicative only**." if quick else ".")
        + f" The whole benchmark took {elapsed_s / 60:.1f} minutes.",
        "",
        *machine_lines(pg_base, any(r.db == "postgresql" for r in runs)),
        f"- Network: {k} units ({', '.join(c for _, c in UNIT_CATALOGUE[:k])}), each a `hedui-connector serve` "
        "process answering from the synthetic population (SQLite store), and one `hedui-gateway serve` process, "
        f"all on this machine over mutual TLS on loopback; batch size {batch:,}, policy continuous, dispatch and "
        "poll every 0.2 s, connector answer worker every 0.1 s, fetch group 20.",
        "- A subject-query is one subject asked of one unit: one item, one stored answer. Rate = subject-queries "
        "/ (enqueue + exchange). Exchange ends when every item has an answer; acknowledgements finish later "
        "(column Acked).",
        "- Peak RSS is the kernel's high-water mark (VmHWM) of each process over its whole life (start-up "
        "included); Start is its RSS after start-up. CPU is CPU-seconds used during enqueue and exchange; Driver "
        "is this benchmark process (the enqueue and its progress queries), Other the rest of the machine in that "
        "time (the PostgreSQL server, anything else running). CPU per subject-query counts the gateway, the "
        "connectors and the enqueue: unlike the rate, it hardly depends on what else the machine was doing.",
        "",
        "| DB | Subject-queries | Subjects | Enqueue s | Exchange s | Total s | **Subject-queries/s** | Enqueue rows/s "
        "| Exchange sq/s | Gateway peak RSS MiB (start) | Largest connector peak MiB | DB size MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        status = "" if r.complete else f" (incomplete: {r.error})"
        lines.append(
            f"| {r.db} | {r.answered:,}{status} | {r.subjects:,} | {r.enqueue_s:,.1f} | {r.exchange_s:,.1f} "
            f"| {r.total_s:,.1f} | **{r.rate:,.0f}** | {r.enqueue_rate:,.0f} | {r.exchange_rate:,.0f} "
            f"| {mib(r.rss_peak.get('gateway', 0))} ({mib(r.rss_start.get('gateway', 0))}) "
            f"| {mib(r.connector_peak // KIB)} | {r.db_bytes / MIB:,.0f} |"
        )
    for db, size, estimate in skipped:
        lines.append(
            f"| {db} | {size:,} | – | – | – | – | skipped: would need about {estimate / 60:.0f} min "
            "| – | – | – | – | – |"
        )
    lines += [
        "",
        "Phases (seconds after the enqueue committed) and CPU-seconds per process:",
        "",
        "| DB | Subject-queries | First answer | All formed | All receipted | All answered | Acked "
        "| Gateway CPU | Connectors CPU | Driver CPU (enqueue) | Other CPU | Steal | µs CPU per subject-query "
        "| Log warnings / errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        connectors = sum(v for n, v in r.cpu.items() if n != "gateway")
        lines.append(
            f"| {r.db} | {r.answered:,} | {seconds(r.first_answer_s)} | {seconds(r.formed_s)} "
            f"| {seconds(r.receipted_s)} | {seconds(r.exchange_s)} | {seconds(r.acked_s)} "
            f"| {r.cpu.get('gateway', 0):,.1f} | {connectors:,.1f} | {r.driver_cpu_s:,.1f} ({r.enqueue_cpu_s:,.1f}) "
            f"| {r.other_cpu_s:,.1f} | {r.steal_s:,.1f} | {r.cpu_per_query_us:,.0f} "
            f"| {r.log_counts.get('WARNING', 0)} / {r.log_counts.get('ERROR', 0) + r.log_counts.get('Traceback', 0)} |"
        )
    lines += ["", "Peak RSS (VmHWM, MiB) of every process:", ""]
    names = list(runs[0].rss_peak) if runs[0].rss_peak else ["gateway"]
    lines += [
        "| DB | Subject-queries | " + " | ".join(names) + " |",
        "|---|---:|" + "---:|" * len(names),
    ]
    lines += [
        f"| {r.db} | {r.answered:,} | " + " | ".join(mib(r.rss_peak.get(n, 0)) for n in names) + " |" for r in runs
    ]

    passed, verdicts = verdict_lines(runs)
    lines += ["", *verdicts]
    if profiled is not None and profiled.profile:
        lines += ["", *profile_lines(profiled)]
    return "\n".join(lines), passed


def verdict_lines(runs: Sequence[Run]) -> tuple[bool, list[str]]:
    lines: list[str] = []
    ok_all = True
    sqlite_runs = [r for r in runs if r.db == "sqlite" and r.complete]
    if sqlite_runs:
        largest = max(sqlite_runs, key=lambda r: r.answered)
        rate_ok = largest.rate >= TARGET_RATE
        cycle_s = JILIN_CYCLE / largest.rate if largest.rate else float("inf")
        lines.append(
            f"- SQLite ≥ {TARGET_RATE:,} subject-queries/s at the largest size measured ({largest.answered:,}): "
            f"{verdict(rate_ok)} ({largest.rate:,.0f}/s; {JILIN_CYCLE // 1_000_000} million subject-queries "
            f"would take about {cycle_s / 60:.0f} min at this rate, target {TARGET_CYCLE_S / 60:.0f} min — "
            "an extrapolation from this size)."
        )
        ok_all &= rate_ok
    else:
        lines.append("- SQLite rate: **not measured**.")
        ok_all = False
    pg_runs = [r for r in runs if r.db == "postgresql" and r.complete]
    if pg_runs:
        largest = max(pg_runs, key=lambda r: r.answered)
        lines.append(
            f"- PostgreSQL (no target of its own): {largest.rate:,.0f} subject-queries/s at {largest.answered:,}; "
            f"{JILIN_CYCLE // 1_000_000} million would take about {JILIN_CYCLE / largest.rate / 60:.0f} min "
            "(extrapolated)."
        )
    for db in ("sqlite", "postgresql"):
        measured = sorted((r for r in runs if r.db == db and r.rss_peak), key=lambda r: r.answered)
        if not measured:
            continue
        peaks = ", ".join(f"{size_label(r.answered)} {r.gateway_peak / MIB:,.0f}" for r in measured)
        under = all(r.gateway_peak < TARGET_RSS for r in measured)
        is_flat = len(measured) > 1 and flat(measured[-2].gateway_peak, measured[-1].gateway_peak)
        flat_text = verdict(is_flat) if len(measured) > 1 else "not assessed (one size)"
        lines.append(
            f"- {db}: gateway peak RSS under {TARGET_RSS // MIB} MiB at every size: {verdict(under)}; flat "
            f"(at the largest size at most {FLAT_RATIO:g}× or +{FLAT_SLACK // MIB} MiB of the next smaller size's): "
            f"{flat_text} (MiB: {peaks})."
        )
        connectors_under = all(r.connector_peak < TARGET_RSS for r in measured)
        connectors_flat = len(measured) < 2 or flat(measured[-2].connector_peak, measured[-1].connector_peak)
        lines.append(
            f"- {db}: every connector under {TARGET_RSS // MIB} MiB and flat (not a target, for orientation): "
            f"{'yes' if connectors_under and connectors_flat else 'no'} (largest connector, MiB: "
            + ", ".join(f"{size_label(r.answered)} {r.connector_peak / MIB:,.0f}" for r in measured)
            + ")."
        )
        ok_all &= under and (is_flat or len(measured) < 2)
    return ok_all, lines


def profile_lines(run: Run, top: int = 14) -> list[str]:
    assert run.profile is not None
    lines = [
        f"Profile of a separate run ({run.db}, {run.answered:,} subject-queries, {run.rate:,.0f}/s under the "
        "profiler): py-spy sampled the Python stacks of every process (--nonblocking, 49 Hz, all threads) that it "
        "did not find idle; a thread waiting for a lock with a timeout still counts (in the gateway: "
        "`_SqliteConnection.enter`, waiting for the database). Shares are of each process's own samples; "
        "inclusive counts a function with everything it calls.",
    ]
    for name in ("gateway", *(n for n in run.profile if n != "gateway")):
        stacks = run.profile.get(name)
        if not stacks:
            continue
        inclusive, leaf = profile_tables(stacks, top if name == "gateway" else 8)
        samples = run.profile_samples.get(name, 0)
        cpu = run.cpu.get(name, 0.0)
        lines += [
            "",
            f"{name} ({samples:,} samples, {cpu:,.1f} CPU-s in the run):",
            "",
            "| Inclusive | Our function | Self | Any function (leaf) |",
            "|---:|---|---:|---|",
        ]
        for i in range(max(len(inclusive), len(leaf))):
            cells = [
                (f"{pair[1]:.0%}", f"`{pair[0]}`") if i < len(pairs) and (pair := pairs[i]) else ("", "")
                for pairs in (inclusive, leaf)
            ]
            lines.append(f"| {cells[0][0]} | {cells[0][1]} | {cells[1][0]} | {cells[1][1]} |")
        if name != "gateway":
            break  # one connector is representative; they run the same code
    return lines


# --- main --------------------------------------------------------------------------------------------------------


def plan(sizes: Sequence[int], dbs: Sequence[str]) -> list[tuple[str, int]]:
    """Small sizes on every database first, so a budget cut removes only the largest runs."""
    return [(db, size) for size in sorted(sizes) for db in dbs]


def estimate_s(db: str, size: int, runs: Sequence[Run]) -> float:
    """Expected duration of a run from the best-matching finished one (same database, largest size)."""
    same = [r for r in runs if r.db == db and r.complete] or [r for r in runs if r.complete]
    rate = max(same, key=lambda r: r.answered).rate if same else FIRST_GUESS_RATE
    if same and db == "postgresql" and all(r.db != db for r in same):
        rate *= 0.6  # PostgreSQL has not been measured yet: assume it slower than SQLite
    return SETUP_S + size / max(rate, 1.0) * 1.2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", help="subject-queries per run, comma-separated (default 10000,100000,1000000)")
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--units", type=int, default=DEFAULT_UNITS, help=f"sharing units K (default {DEFAULT_UNITS})")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help=f"default {DEFAULT_BATCH}")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole benchmark")
    parser.add_argument("--pg-url", default=DEFAULT_PG, help="PostgreSQL server (a database per run is made there)")
    parser.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=shutil.which("py-spy") is not None,
        help="one extra run under py-spy (default: when py-spy is installed)",
    )
    parser.add_argument("--profile-size", type=int, default=100_000, help="subject-queries of the profiled run")
    parser.add_argument("--keep", action="store_true", help="keep every run's folder (configs, logs, databases)")
    parser.add_argument("--quick", action="store_true", help="smoke run of about a minute; numbers indicative only")
    parser.add_argument("--write", type=Path, metavar="FILE", help="also put the results between the markers in FILE")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "bench/bench_exchange.py", *(sys.argv[1:] if argv is None else argv)])
    if args.write is not None:
        RESULTS.find(args.write)  # fail now rather than after minutes of measuring
    sizes = tuple(int(s) for s in args.sizes.split(",")) if args.sizes else QUICK_SIZES if args.quick else DEFAULT_SIZES
    dbs = ("sqlite", "postgresql") if args.db == "both" else (args.db,)
    units = units_for(args.units)
    if not 1 <= args.batch_size <= 100_000:
        raise SystemExit("--batch-size must be 1 to 100000")
    profile_size = min(args.profile_size, max(sizes)) if not args.quick else min(sizes)

    started_at, started = datetime.now(UTC), time.perf_counter()
    print(f"making {max(sizes) // len(units):,} synthetic subjects ...", file=sys.stderr)
    people = make_subjects(max(*sizes, profile_size) // len(units))
    runs: list[Run] = []
    skipped: list[tuple[str, int, float]] = []
    reserve = estimate_s("sqlite", profile_size, []) if args.profile else 0.0
    for number, (db, size) in enumerate(plan(sizes, dbs)):
        left = args.budget - (time.perf_counter() - started)
        needed = estimate_s(db, size, runs)
        if runs and needed > left - (estimate_s("sqlite", profile_size, runs) if args.profile else reserve):
            print(f"  {db} {size:,}: skipped, about {needed:.0f} s needed, {left:.0f} s left", file=sys.stderr)
            skipped.append((db, size, needed))
            continue
        print(
            f"  {db} {size:,} subject-queries ({size // len(units):,} subjects x {len(units)} units)", file=sys.stderr
        )
        run = measure(
            db, size, units, args.batch_size, people, args.pg_url, max(60.0, left - 30), str(number), keep=args.keep
        )
        runs.append(run)
        print(
            f"    {run.answered:,} answered in {run.total_s:.1f} s: {run.rate:,.0f} subject-queries/s, gateway peak "
            f"{run.gateway_peak / MIB:.0f} MiB" + (f" — {run.error}" if run.error else ""),
            file=sys.stderr,
        )
    profiled = None
    if args.profile and shutil.which("py-spy"):
        left = args.budget - (time.perf_counter() - started)
        if estimate_s("sqlite", profile_size, runs) < left:
            print(f"  profiling sqlite {profile_size:,} under py-spy", file=sys.stderr)
            profiled = measure(
                "sqlite", profile_size, units, args.batch_size, people, args.pg_url, max(60.0, left - 10), "profile",
                profile=True, keep=args.keep,
            )  # fmt: skip
            print(
                f"    {profiled.rate:,.0f} subject-queries/s under the profiler, "
                f"{sum(profiled.profile_samples.values()):,} samples"
                + (f" — {profiled.error}" if profiled.error else ""),
                file=sys.stderr,
            )
        else:
            print("  no time left for the profile run", file=sys.stderr)
    if not runs:
        raise SystemExit("nothing was measured")
    block, passed = report(
        runs, skipped, command, args.quick, args.pg_url, profiled, started_at, time.perf_counter() - started
    )
    RESULTS.publish(block, args.write)
    return 0 if passed or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
