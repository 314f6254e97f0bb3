"""The README's first command, smaller: the whole procedure on a loopback network, and no personal data from the
synthetic population in any log line the processes wrote."""

from __future__ import annotations

from pathlib import Path

import pytest

from connectors.synthetic import Population
from demo import run as demo


@pytest.mark.slow
def test_demo_runs_the_whole_procedure_and_logs_no_personal_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    households = 12
    assert demo.run(tmp_path, households, timeout=60) == 0
    out = capsys.readouterr().out
    assert "signature verified" in out and "audit log intact" in out
    reports = list(tmp_path.glob("report-*.html"))
    assert len(reports) == 1 and "核对报告" in reports[0].read_text(encoding="utf-8")
    logs = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in (tmp_path / "net" / "logs").glob("*.log"))
    assert "serving" in logs
    people = [m for h in Population(demo.SEED).households(households) for m in h.members]
    for member in people:
        assert member.id_number not in logs and member.id_number not in out
        assert member.name not in logs and member.name not in out
