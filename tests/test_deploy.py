"""deploy/: the files an installation is made of, checked with the tools that will read them.

The example configs load and mention every key; the systemd units carry their sandbox and pass
``systemd-analyze verify``; the alert rules pass ``promtool check rules`` and their own ``promtool test rules``
cases; the dashboard parses and its queries are valid PromQL; every metric named anywhere in deploy/ is one the
gateway or the connector exports. Checks that need systemd-analyze, systemd-sysusers or promtool are skipped, with
the reason, on a machine without them (Debian: ``apt-get install systemd prometheus``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.config import describe
from connectors.config import ConnectorConfig
from gateway.config import GatewayConfig

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SYSTEMD = DEPLOY / "systemd"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "hedui-dashboard.json"
OPERATIONS = ROOT / "docs" / "operations.md"

SERVICES = ("hedui-gateway.service", "hedui-connector.service")
MIGRATE = "hedui-gateway-migrate.service"
UNITS = (*SERVICES, MIGRATE)
#: Where the units expect the virtualenv (docs/operations.md, "Install").
VENV_BIN = "/opt/hedui/venv/bin/"

#: Every metric the gateway and the connector export, as the metrics code names them.
GATEWAY_METRICS = frozenset(
    {
        "hedui_queries_sent_total",
        "hedui_queries_answered_total",
        "hedui_queries_overdue",
        "hedui_batch_round_trip_seconds",
        "hedui_answer_latency_seconds",
        "hedui_receipts_total",
        "hedui_delay_notices_total",
        "hedui_envelope_rejections_total",
        "hedui_unit_retries_total",
        "hedui_unit_cycle_errors_total",
        "hedui_unit_refusals_total",
        "hedui_unit_up",
        "hedui_outbox_depth",
        "hedui_batches_failed",
        "hedui_key_expiry_seconds",
        "hedui_tls_certificate_expiry_seconds",
        "hedui_tls_certificate_reloads_total",
        "hedui_tls_certificate_reload_failing",
        "hedui_tls_crl_next_update_seconds",
        "hedui_tls_crl_age_seconds",
        "hedui_tls_crl_number",
        "hedui_tls_crl_refusals_total",
        "hedui_tls_revoked_peers_total",
        "hedui_scheduler_job_runs_total",
        "hedui_grpc_server_requests_total",
        "hedui_commissions",
        "hedui_approval_feedback_total",
        "hedui_database_up",
        "hedui_database_scrape_age_seconds",
        "hedui_calendar_known_until",
        "hedui_roster_changes_pending",
        "hedui_roster_unacknowledged_seconds",
        "hedui_answers_staff_unverified_total",
        "hedui_answers_staff_refused_total",
        "hedui_key_expiry_days",
        "hedui_key_rotation_due_days",
        "hedui_trust_syncs_total",
        "hedui_trust_items_received_total",
        "hedui_trust_unacknowledged",
        "hedui_trust_unacknowledged_oldest_seconds",
        "hedui_certificate_request_age_seconds",
        "hedui_certificate_requests_refused_total",
    }
)
CONNECTOR_METRICS = frozenset(
    {
        "hedui_connector_batches_received_total",
        "hedui_connector_subjects_answered_total",
        "hedui_connector_refusals_total",
        "hedui_connector_pending_batches",
        "hedui_connector_delay_notices_total",
        "hedui_connector_adapter_failures_total",
        "hedui_envelope_rejections_total",
        "hedui_grpc_server_requests_total",
        "hedui_tls_certificate_expiry_seconds",
        "hedui_tls_certificate_reloads_total",
        "hedui_tls_certificate_reload_failing",
        "hedui_tls_crl_next_update_seconds",
        "hedui_tls_crl_age_seconds",
        "hedui_tls_crl_number",
        "hedui_tls_crl_refusals_total",
        "hedui_tls_revoked_peers_total",
        "hedui_database_up",
        "hedui_database_scrape_age_seconds",
        "hedui_calendar_known_until",
        "hedui_connector_roster_changes_pending",
        "hedui_connector_roster_unacknowledged_seconds",
        "hedui_connector_answer_staff_short",
        "hedui_key_expiry_days",
        "hedui_key_rotation_due_days",
        "hedui_trust_syncs_total",
        "hedui_trust_items_received_total",
        "hedui_trust_unacknowledged",
        "hedui_trust_unacknowledged_oldest_seconds",
        "hedui_connector_certificate_request_pending",
        "hedui_connector_certificate_request_age_seconds",
        "hedui_connector_certificates_refused_total",
    }
)
HISTOGRAMS = ("hedui_batch_round_trip_seconds", "hedui_answer_latency_seconds")
#: The names a query may use: the metrics, and the series a histogram is exported as.
QUERYABLE = GATEWAY_METRICS | CONNECTOR_METRICS | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
METRIC_NAME = re.compile(r"\bhedui_[a-z_]+")

#: The six alert groups the operations issue asks for.
REQUIRED_GROUPS = (
    "hedui-unit-overdue",
    "hedui-unit-unreachable",
    "hedui-envelope-rejections",
    "hedui-key-expiry",
    "hedui-dispatch-stalled",
    "hedui-report-deadline",
    "hedui-calendar",
    "hedui-rosters",
)
ANNOTATIONS = ("summary", "description", "summary_zh", "description_zh", "runbook_url")
CJK = re.compile(r"[\u4e00-\u9fff]")


def run(*command: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=600, check=False)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed on this machine")
    return path


# -- example configs -------------------------------------------------------------------------------------------


def sections(text: str) -> dict[str, list[str]]:
    """TOML lines by the table header above them; every ``[[x]]`` block is filed under ``x[]``."""
    result: dict[str, list[str]] = {"": []}
    current = ""
    for line in text.splitlines():
        header = re.match(r"^\s*(\[\[?)\s*([\w.]+)\s*\]\]?", line)
        if header:
            current = header.group(2) + ("[]" if header.group(1) == "[[" else "")
            result.setdefault(current, [])
            continue
        result[current].append(line)
    return result


def documented(key: str, blocks: dict[str, list[str]]) -> bool:
    """Is ``key`` (as describe() names it) set or shown commented out in its table?"""
    if key.startswith("[["):
        return key.strip("[]") + "[]" in blocks
    table, _, name = key.rpartition(".")
    if f"{table}.{name}" in blocks:  # a key whose value is a table, e.g. [adapter.queries]
        return True
    pattern = re.compile(rf"^\s*#?\s*{re.escape(name)}\s*=")
    return any(pattern.match(line) for line in blocks.get(table, []))


@pytest.mark.parametrize(
    ("example", "config_class"),
    [("gateway.example.toml", GatewayConfig), ("connector.example.toml", ConnectorConfig)],
)
def test_example_config_loads_and_shows_every_key(example: str, config_class: type[Any]) -> None:
    path = DEPLOY / example
    config = config_class.load(path)
    assert config.metrics.listen.startswith("127.0.0.1:")  # metrics stay on loopback unless the operator decides
    blocks = sections(path.read_text(encoding="utf-8"))
    missing = [key for key, _, _ in describe(config_class) if not documented(key, blocks)]
    assert not missing, f"{example} does not show {missing}"


def test_example_paths_lie_where_the_units_let_the_services_write() -> None:
    gateway = GatewayConfig.load(DEPLOY / "gateway.example.toml")
    connector = ConnectorConfig.load(DEPLOY / "connector.example.toml")
    writable = Path("/var/lib/hedui")
    for config in (gateway, connector):
        assert config.keys.keystore.is_relative_to(writable)  # the gateway rewrites it when keys retire
        database = config.database.url.removeprefix("sqlite:///")
        assert Path(database).is_relative_to(writable), config.database.url
        assert config.keys.passphrase_file.is_relative_to(Path("/etc/hedui"))
    assert gateway.database.migrate_on_start is False  # upgrades migrate by hand, after the backup


# -- systemd ---------------------------------------------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file as systemd reads it: sections of (key, value) in order; a key may repeat."""
    result: dict[str, list[tuple[str, str]]] = {}
    section: str | None = None
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"{path.name}:{number}: keep directives on one line"
        header = re.fullmatch(r"\[([A-Za-z]+)\]", line)
        if header:
            section = header.group(1)
            assert section not in result, f"{path.name}:{number}: [{section}] twice"
            result[section] = []
            continue
        key, sep, value = line.partition("=")
        assert sep and section is not None, f"{path.name}:{number}: not a directive: {line!r}"
        assert re.fullmatch(r"[A-Za-z]+", key.strip()), f"{path.name}:{number}: bad key {key!r}"
        result[section].append((key.strip(), value.strip()))
    return result


def values(unit: dict[str, list[tuple[str, str]]], key: str, section: str = "Service") -> list[str]:
    return [value for name, value in unit.get(section, []) if name == key]


#: The sandbox every unit carries: directive -> the value it must have.
HARDENING = {
    "User": "hedui",
    "Group": "hedui",
    "UMask": "0077",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "LockPersonality": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "RestrictNamespaces": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "StateDirectory": "hedui",
    "ReadWritePaths": "/var/lib/hedui",
}


@pytest.mark.parametrize("name", UNITS)
def test_unit_runs_as_hedui_in_a_sandbox(name: str) -> None:
    unit = parse_unit(SYSTEMD / name)
    for key, expected in HARDENING.items():
        assert values(unit, key) == [expected], f"{name}: {key}"
    filters = values(unit, "SystemCallFilter")
    assert filters[0] == "@system-service" and all(f.startswith("~") for f in filters[1:]), filters
    # Nothing else writable, and no way around the sandbox.
    for key in ("ReadWriteDirectories", "PermissionsStartOnly", "DynamicUser", "AmbientCapabilities"):
        assert values(unit, key) in ([], [""]), f"{name}: {key}"
    assert all(not v.startswith(("+", "!", "-")) for v in values(unit, "ExecStart")), "ExecStart must stay sandboxed"


@pytest.mark.parametrize(
    ("name", "program", "config"),
    [(SERVICES[0], "hedui-gateway", "gateway.toml"), (SERVICES[1], "hedui-connector", "connector.toml")],
)
def test_service_starts_serve_and_restarts_on_failure(name: str, program: str, config: str) -> None:
    unit = parse_unit(SYSTEMD / name)
    assert values(unit, "ExecStart") == [f"{VENV_BIN}{program} serve --config /etc/hedui/{config}"]
    assert values(unit, "Restart") == ["on-failure"]
    assert values(unit, "LimitNOFILE")
    assert values(unit, "WantedBy", "Install") == ["multi-user.target"]
    assert "network-online.target" in values(unit, "After", "Unit")


def test_migrate_unit_is_a_oneshot_with_the_gateways_sandbox() -> None:
    migrate, gateway = parse_unit(SYSTEMD / MIGRATE), parse_unit(SYSTEMD / SERVICES[0])
    assert values(migrate, "Type") == ["oneshot"]
    assert values(migrate, "ExecStart") == [f"{VENV_BIN}hedui-gateway migrate --config /etc/hedui/gateway.toml"]
    assert "Install" not in migrate  # started by hand during an upgrade, never at boot
    assert values(migrate, "Conflicts", "Unit") == ["hedui-gateway.service"]
    run_keys = {"Type", "ExecStart", "Restart", "RestartSec", "TimeoutStopSec", "TimeoutStartSec", "LimitNOFILE"}
    sandbox = [(k, v) for k, v in gateway["Service"] if k not in run_keys]
    assert [(k, v) for k, v in migrate["Service"] if k not in run_keys] == sandbox


@pytest.fixture
def runnable_units(tmp_path: Path) -> Iterator[list[Path]]:
    """Copies of the units whose ExecStart names this checkout's programs (systemd-analyze checks they exist)."""
    bin_dir = Path(sys.executable).parent
    if not all((bin_dir / p).exists() for p in ("hedui-gateway", "hedui-connector")):
        pytest.skip(f"hedui-gateway and hedui-connector are not installed in {bin_dir}")
    copies = []
    for name in UNITS:
        text = (SYSTEMD / name).read_text(encoding="utf-8")
        assert VENV_BIN in text
        copy = tmp_path / name
        copy.write_text(text.replace(VENV_BIN, f"{bin_dir}/"), encoding="utf-8")
        copies.append(copy)
    yield copies


def test_systemd_analyze_verify_reports_nothing(runnable_units: list[Path]) -> None:
    analyze = tool("systemd-analyze")
    result = run(analyze, "verify", "--man=no", "--generators=no", *runnable_units)
    # A misspelt or malformed directive is only a warning (exit status 0) naming the file and line: none may appear.
    findings = [line for line in (result.stdout + result.stderr).splitlines() if ".service" in line]
    assert result.returncode == 0 and not findings, result.stdout + result.stderr


def test_systemd_analyze_security_rates_the_services_ok(runnable_units: list[Path]) -> None:
    analyze = tool("systemd-analyze")
    for unit in runnable_units:
        # --threshold counts tenths: 20 is an overall exposure of 2.0 on systemd's 0-10 scale (the units rate 1.2).
        result = run(analyze, "security", "--offline=yes", "--threshold=20", "--no-pager", unit)
        if "--offline" in result.stderr and "unrecognized" in result.stderr:
            pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr


def test_sysusers_and_tmpfiles_create_the_user_and_directories(tmp_path: Path) -> None:
    lines = [
        line.split()
        for line in (SYSTEMD / "tmpfiles.d" / "hedui.conf").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    entries = {path: (mode, user, group) for _, path, mode, user, group, _ in lines}
    assert entries["/var/lib/hedui"] == ("0700", "hedui", "hedui")
    assert entries["/var/lib/hedui/keys"] == ("0700", "hedui", "hedui")
    assert entries["/etc/hedui"] == ("0750", "root", "hedui")  # hedui reads its config, cannot change it
    sysusers = tool("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    result = run(sysusers, f"--root={tmp_path}", SYSTEMD / "sysusers.d" / "hedui.conf")
    assert result.returncode == 0, result.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text(encoding="utf-8")
    user = next(line.split(":") for line in passwd.splitlines() if line.startswith("hedui:"))
    assert user[5:] == ["/var/lib/hedui", "/usr/sbin/nologin"]
    if os.geteuid() != 0:
        return  # creating directories owned by hedui needs root
    result = run(tool("systemd-tmpfiles"), f"--root={tmp_path}", "--create", SYSTEMD / "tmpfiles.d" / "hedui.conf")
    assert result.returncode == 0, result.stderr
    for path, (mode, _, _) in entries.items():
        assert oct((tmp_path / path.lstrip("/")).stat().st_mode & 0o777) == oct(int(mode, 8)), path


# -- MemoryDenyWriteExecute ------------------------------------------------------------------------------------

#: Sets the kernel's memory-deny-write-execute flag (prctl PR_SET_MDWE, Linux 6.3+), then execs its arguments.
#: The flag survives fork and exec, like systemd's MemoryDenyWriteExecute= for the whole service.
MDWE_EXEC = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit("no-mdwe: " + os.strerror(ctypes.get_errno()))
os.execv(sys.argv[1], sys.argv[1:])
"""
MDWE_PROBE = """
import ctypes, mmap
assert ctypes.CDLL(None).prctl(66, 0, 0, 0, 0) == 1  # PR_GET_MDWE
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    print("refused")
"""


@pytest.mark.slow
def test_gateway_and_connectors_run_without_writable_executable_memory(tmp_path: Path) -> None:
    """Pins the unit files' MemoryDenyWriteExecute=yes: the process-level test passes under the kernel's flag."""
    if not sys.platform.startswith("linux"):
        pytest.skip("prctl(PR_SET_MDWE) is Linux-only")
    probe = run(sys.executable, "-c", MDWE_EXEC, sys.executable, "-c", MDWE_PROBE)
    if probe.stderr.startswith("no-mdwe"):
        pytest.skip(f"this kernel has no PR_SET_MDWE (Linux 6.3+): {probe.stderr.strip()}")
    assert probe.stdout.strip() == "refused", probe.stdout + probe.stderr
    nested = ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'run'}"]
    result = run(sys.executable, "-c", MDWE_EXEC, sys.executable, *nested, "tests/test_gateway_process.py", cwd=ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


# -- Prometheus ------------------------------------------------------------------------------------------------


def alert_blocks() -> dict[str, str]:
    """The rule file's alerts by name, each as its block of text (the file keeps one layout throughout)."""
    text = (PROMETHEUS / "hedui-alerts.yml").read_text(encoding="utf-8")
    parts = re.split(r"^\s+- alert: ", text, flags=re.M)[1:]
    blocks = {}
    for part in parts:
        name, _, body = part.partition("\n")
        body = re.split(r"^\s+- name: ", body, flags=re.M)[0]
        assert name not in blocks, f"alert {name} twice"
        blocks[name.strip()] = body
    return blocks


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_alert_groups_and_rules_have_what_the_on_call_needs() -> None:
    text = (PROMETHEUS / "hedui-alerts.yml").read_text(encoding="utf-8")
    groups = re.findall(r"^  - name: (\S+)$", text, flags=re.M)
    assert set(REQUIRED_GROUPS) <= set(groups) and len(groups) == len(set(groups)), groups
    headings = re.findall(r"^#+ (.+)$", OPERATIONS.read_text(encoding="utf-8"), flags=re.M)
    anchors = {github_anchor(h) for h in headings}
    blocks = alert_blocks()
    assert len(blocks) >= len(REQUIRED_GROUPS)
    for name, body in blocks.items():
        assert re.match(r"Hedui[A-Z]\w+$", name), name
        assert re.search(r"^\s+for: \d+[smhd]", body, flags=re.M), f"{name}: no for:"
        severity = re.search(r"^\s+severity: (\w+)$", body, flags=re.M)
        assert severity and severity.group(1) in {"critical", "warning"}, name
        for annotation in ANNOTATIONS:
            assert re.search(rf"^\s+{annotation}: ", body, flags=re.M), f"{name}: no {annotation}"
        zh = body[body.index("summary_zh:") :]
        assert CJK.search(zh), f"{name}: the Chinese annotations are not in Chinese"
        runbook = re.search(r"runbook_url: docs/operations\.md#([\w-]+)$", body, flags=re.M)
        assert runbook and runbook.group(1) in anchors, f"{name}: runbook anchor not a heading of operations.md"


def test_every_alert_fires_in_a_promtool_test_case() -> None:
    tested: set[str] = set()
    for test_file in ("hedui-alerts.test.yml", "hedui-alerts-monthly.test.yml"):
        text = (PROMETHEUS / test_file).read_text(encoding="utf-8")
        assert text.startswith("#") and "rule_files: [hedui-alerts.yml]" in text
        # An alertname followed by exp_alerts (before the next case) is a case in which the alert fires.
        for case in re.split(r"^\s+- eval_time: ", text, flags=re.M)[1:]:
            name = re.search(r"alertname: (\w+)", case)
            if name and "exp_alerts:" in case:
                tested.add(name.group(1))
    assert tested == set(alert_blocks())


def test_promtool_checks_the_rules_and_the_scrape_config(tmp_path: Path) -> None:
    promtool = tool("promtool")
    result = run(promtool, "check", "rules", "hedui-alerts.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    result = run(promtool, "check", "config", "prometheus.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_promtool_rule_tests_pass() -> None:
    promtool = tool("promtool")
    result = run(promtool, "test", "rules", "hedui-alerts.test.yml", "hedui-alerts-monthly.test.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr


def test_scrape_config_has_the_gateway_and_connector_jobs_on_their_metrics_ports() -> None:
    text = (PROMETHEUS / "prometheus.yml").read_text(encoding="utf-8")
    jobs = re.findall(r"^  - job_name: (\S+)$", text, flags=re.M)
    assert jobs == ["hedui-gateway", "hedui-connector"]
    gateway, connector = re.split(r"^  - job_name: hedui-connector$", text, flags=re.M)
    assert '"127.0.0.1:9464"' in gateway and ":9465" in connector
    assert "honor_labels: true" not in re.sub(r"#.*", "", text)  # would clash with the scheduler's job label
    assert re.search(r"^rule_files:\n  - hedui-alerts.yml$", text, flags=re.M)


# -- Grafana ---------------------------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def panel_queries() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


EXPECTED_PANELS = (
    "Unit reachable",
    "Overdue subjects (clause 12)",
    "Outbox depth",
    "Subjects sent per hour",
    "Subjects answered per hour",
    "Batch round trip (SubmitBatch until the receipt is stored)",
    "Answer latency (receipt until the answer is stored), last 24 h",
    "Envelope rejections by reason",
    "Retiring keys: days left",
    "Scheduler job runs by outcome",
    "Unit cycle errors per hour (gateway side)",
    "Agency API calls by status",
    "Commissions by state",
    "Exchange calls by status",
)


def test_dashboard_has_the_expected_panels_laid_out_on_the_grid() -> None:
    board = dashboard()
    assert board["uid"] == "hedui-exchange" and 36 <= board["schemaVersion"] <= 41
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource", "unit"]
    panels = board["panels"]
    titles = [p["title"] for p in panels]
    assert set(EXPECTED_PANELS) <= set(titles), set(EXPECTED_PANELS) - set(titles)
    assert len({p["id"] for p in panels}) == len(panels)
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"] and panel["description"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
    rates = [q for q in panel_queries() if "histogram_quantile" in q]
    assert rates and all("_bucket" in q and "by (le" in q for q in rates)


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = tool("promtool")
    # As recording rules, promtool parses every query; Grafana's variables get values first.
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for number, query in enumerate(panel_queries()):
        expr = query.replace("$__rate_interval", "5m").replace("$unit", ".*")
        lines += [f"      - record: dashboard_query_{number}", f"        expr: {json.dumps(expr)}"]
    rules = tmp_path / "dashboard-rules.yml"
    rules.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = run(promtool, "check", "rules", rules)
    assert result.returncode == 0, result.stdout + result.stderr


# -- metric names ----------------------------------------------------------------------------------------------


def test_deploy_files_name_only_metrics_that_exist() -> None:
    files = [*PROMETHEUS.glob("*.yml"), DASHBOARD, OPERATIONS]
    for path in files:
        unknown = set(METRIC_NAME.findall(path.read_text(encoding="utf-8"))) - QUERYABLE
        assert not unknown, f"{path.relative_to(ROOT)} names metrics nobody exports: {sorted(unknown)}"
    # The dashboard shows every metric.
    shown = set(METRIC_NAME.findall(DASHBOARD.read_text(encoding="utf-8")))
    exported = GATEWAY_METRICS | CONNECTOR_METRICS
    assert shown >= exported, exported - shown


def test_metric_list_matches_the_metrics_code() -> None:
    """The list above is what the exporters define: a renamed metric fails here, not silently in Prometheus."""
    sources = {
        "gateway": [ROOT / "common" / "metrics.py", ROOT / "gateway" / "metrics.py"],
        "connector": [ROOT / "common" / "metrics.py", ROOT / "connectors" / "metrics.py"],
    }
    expected = {"gateway": GATEWAY_METRICS, "connector": CONNECTOR_METRICS}
    for side, paths in sources.items():
        if not all(p.exists() for p in paths):
            pytest.skip(f"the {side} metrics module is not there yet")
        defined = set()
        for path in paths:
            defined |= set(re.findall(r"[\"'](hedui_[a-z_]+)[\"']", path.read_text(encoding="utf-8")))
        assert defined == expected[side], f"{side}: {sorted(defined ^ expected[side])}"
