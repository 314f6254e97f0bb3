"""docs/threat-model.md names, for each threat, the test that proves its control: every test it names must exist,
and every file it says enforces a control must be there, so the document cannot drift from the code."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "threat-model.md"
TEST_REF = re.compile(r"`(tests/[a-z0-9_]+\.py)::([a-z0-9_]+)`")
CODE_REF = re.compile(r"`((?:keys|common|gateway|connectors)/[a-z0-9_/]+\.py)")


@cache
def _test_names(path: Path) -> frozenset[str]:
    """Names of the test functions of one module, at module level or in classes."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return frozenset(
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_")
    )


def _rows() -> list[str]:
    return [line for line in DOC.read_text(encoding="utf-8").splitlines() if line.startswith("| T")]


def test_every_threat_names_a_control_a_place_and_a_test() -> None:
    rows = _rows()
    assert len(rows) >= 20
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 4, row
        threat, control, place, proof = cells
        assert threat and control and place, row
        assert TEST_REF.search(proof), f"no test named for: {threat}"


@pytest.mark.parametrize("module,name", sorted(set(TEST_REF.findall(DOC.read_text(encoding="utf-8")))))
def test_a_test_the_threat_model_names_exists(module: str, name: str) -> None:
    path = ROOT / module
    assert path.is_file(), f"docs/threat-model.md names {module}, which does not exist"
    assert name in _test_names(path), f"docs/threat-model.md names {module}::{name}, which does not exist"


def test_every_place_of_enforcement_exists() -> None:
    for path in sorted(set(CODE_REF.findall(DOC.read_text(encoding="utf-8")))):
        assert (ROOT / path).is_file(), f"docs/threat-model.md names {path}, which does not exist"
