"""The house rules of STYLE.md, checked: the gateway and the connector meet only on the wire.

The gateway is installed by a verification agency, the connector by a sharing unit; each may depend on the shared
trust core (``keys``), ``common`` and the generated wire code (``hedui``), never on the other. ``keys`` depends on
neither side. The demo network is not part of either appliance, so neither may import it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: package -> top-level packages it must never import.
FORBIDDEN = {
    "gateway": {"connectors", "demo", "tests", "bench"},
    "connectors": {"gateway", "demo", "tests", "bench"},
    "keys": {"gateway", "connectors", "demo", "tests", "bench"},
    "common": {"gateway", "connectors", "demo", "tests", "bench"},
}


def imported_roots(path: Path) -> set[str]:
    """The top-level package of every absolute import in one module."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_what_it_may(package: str) -> None:
    offences = []
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = imported_roots(path) & FORBIDDEN[package]
        if bad:
            offences.append(f"{path.relative_to(ROOT)} imports {', '.join(sorted(bad))}")
    assert not offences, "\n".join(offences)


def test_gateway_top_level_holds_only_the_assembly() -> None:
    """Each concern lives in a wing; the top of gateway/ only assembles them (config, server, metrics, cli)."""
    modules = {p.stem for p in (ROOT / "gateway").glob("*.py")}
    assert modules == {"__init__", "cli", "config", "server", "metrics"}
