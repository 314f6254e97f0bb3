"""The agency API's size and character limits (issue 10 item 8): each is written down in docs/agency-api.md as the
code enforces it, and a package of the documented size is not cut off by gRPC's 4 MiB default first."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from gateway.api.agency import MAX_REQUEST_BYTES
from gateway.procedure import intake, queries
from gateway.procedure.paging import MAX_PAGE_TOKEN_CHARS
from tests.agency_world import agency_world
from tests.test_agency import COMMISSIONER, Agency

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "agency-api.md"


@pytest.fixture
def agency(tmp_path: Path) -> Iterator[Agency]:
    with agency_world(tmp_path) as world:
        yield world


def test_a_request_over_grpcs_default_4_mib_reaches_validation(agency: Agency) -> None:
    """A package's members take ~125 bytes each: MAX_SUBJECTS of them are several MiB."""
    commissioner = agency.stub(COMMISSIONER)
    package = agency.package(1)
    package.households[0].household_ref = "H" * (6 * 1024 * 1024)
    with pytest.raises(grpc.RpcError) as excinfo:
        commissioner.SubmitCommission(package)
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # read and validated: the reference is too long
    assert "household_ref" in (excinfo.value.details() or "")
    package.households[0].household_ref = "H" * MAX_REQUEST_BYTES
    with pytest.raises(grpc.RpcError) as excinfo:
        commissioner.SubmitCommission(package)
    assert excinfo.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert agency.commissions() == 0


def _number(value: int) -> str:
    return f"{value:,}" if value >= 10_000 else str(value)


def test_the_api_guide_lists_every_limit_the_code_enforces() -> None:
    section = GUIDE.read_text().split("## Limits", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| ")}

    def says(field: str, *values: int) -> None:
        row = next((line for name, line in rows.items() if field in name), None)
        assert row is not None, f"the Limits table has no row for {field}"
        for value in values:
            assert re.search(rf"(?<![0-9])(?<![0-9],){re.escape(_number(value))}(?![0-9]|,[0-9])", row), (field, value)

    says("households", 1, intake.MAX_HOUSEHOLDS)
    says("members per household", 1, intake.MAX_MEMBERS)
    says("members per package", intake.MAX_SUBJECTS)
    says("income period", intake.MAX_PERIOD_MONTHS)
    says("letter.number", intake.MAX_NUMBER_CHARS)
    says("authorisation.number", intake.MAX_NUMBER_CHARS)
    says("household_ref", 64)
    says("name", 64)
    says("scan_sha256", intake.DIGEST_BYTES)
    says("problems listed", intake.MAX_PROBLEMS_REPORTED)
    says("reason", intake.MAX_REASON_CHARS)
    says("limit", queries.MAX_LIST, 100)
    says("commissioner", queries.MAX_PARTY_CHARS)
    says("page_token", MAX_PAGE_TOKEN_CHARS)
    says("request size", MAX_REQUEST_BYTES // (1024 * 1024))
