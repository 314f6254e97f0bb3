"""Regression tests for issue 10 item 7: ListCommissions could not page (at most 1000, the newest) nor filter by
anything but one state. It now pages by key with a signed, opaque token, filters by state, commissioner and
creation days, and keeps one order (created time, then id, newest first), also while commissions are added."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hedui.v1 import agency_pb2, records_pb2

from keys.clock import DAY_MS
from tests.agency_world import agency_world
from tests.test_agency import BACKOFFICE, COMMISSIONER, NOW, OTHER_COMMISSIONER, Agency


@pytest.fixture
def agency(tmp_path: Path) -> Iterator[Agency]:
    with agency_world(tmp_path) as world:
        yield world


def _submit(agency: Agency, start: int, party: str = COMMISSIONER) -> str:
    return agency.stub(party).SubmitCommission(agency.package(1, start=start)).commission_id


def _pages(agency: Agency, party: str, request: agency_pb2.ListCommissionsRequest) -> list[list[str]]:
    stub, pages = agency.stub(party), []
    while True:
        response = stub.ListCommissions(request)
        pages.append([c.commission_id for c in response.commissions])
        if not response.next_page_token:
            return pages
        request.page_token = response.next_page_token


def _refused(agency: Agency, party: str, request: agency_pb2.ListCommissionsRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as excinfo:
        agency.stub(party).ListCommissions(request)
    return excinfo.value


def _day(day: int) -> records_pb2.Date:
    return records_pb2.Date(year=2026, month=3, day=day)


def test_listing_pages_through_every_commission_once_newest_first(agency: Agency) -> None:
    made = []
    for i in range(7):
        made.append(_submit(agency, 10 * i))
        if i % 2:  # pairs created in the same millisecond: the id orders them
            agency.world.clock.advance(1000)
    pages = _pages(agency, COMMISSIONER, agency_pb2.ListCommissionsRequest(limit=3))
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [cid for page in pages for cid in page] == list(reversed(made))
    # The first page is what a client that knows nothing of paging gets, as before.
    first = agency.stub(COMMISSIONER).ListCommissions(agency_pb2.ListCommissionsRequest(limit=3))
    assert [c.commission_id for c in first.commissions] == pages[0]


def test_paging_is_stable_while_commissions_are_added(agency: Agency) -> None:
    older = [_submit(agency, 10 * i) for i in range(4)]
    stub = agency.stub(COMMISSIONER)
    first = stub.ListCommissions(agency_pb2.ListCommissionsRequest(limit=2))
    agency.world.clock.advance(1000)
    newer = [_submit(agency, 100 + 10 * i) for i in range(3)]  # an offset would now repeat two of page one
    rest = _pages(agency, COMMISSIONER, agency_pb2.ListCommissionsRequest(limit=2, page_token=first.next_page_token))
    listed = [c.commission_id for c in first.commissions] + [cid for page in rest for cid in page]
    assert listed == list(reversed(older))
    assert not set(newer) & set(listed)


def test_a_forged_or_altered_page_token_is_invalid_argument(agency: Agency) -> None:
    for i in range(3):
        _submit(agency, 10 * i)
        _submit(agency, 10 * i, party=OTHER_COMMISSIONER)
    token = agency.stub(COMMISSIONER).ListCommissions(agency_pb2.ListCommissionsRequest(limit=1)).next_page_token
    assert token
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    forged = []
    for position in (0, 5, 20, 30, 40, len(raw) - 1):  # version, scope, created time, row id, key id, signature
        changed = bytearray(raw)
        changed[position] ^= 0x01
        forged.append(base64.urlsafe_b64encode(bytes(changed)).rstrip(b"=").decode())
    forged += ["", "!!!", "AAAA", token[:-4], token + "AAAA", "A" * 5000]
    for bad in forged[:-6] + forged[-5:]:  # not "": that is the first page
        error = _refused(agency, COMMISSIONER, agency_pb2.ListCommissionsRequest(limit=1, page_token=bad))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert "page_token" in (error.details() or "")
    # A real token, but another caller's, or with other filters.
    for party, request in (
        (OTHER_COMMISSIONER, agency_pb2.ListCommissionsRequest(limit=1, page_token=token)),
        (BACKOFFICE, agency_pb2.ListCommissionsRequest(limit=1, page_token=token)),
        (COMMISSIONER, agency_pb2.ListCommissionsRequest(limit=1, page_token=token, created_from=_day(1))),
        (
            COMMISSIONER,
            agency_pb2.ListCommissionsRequest(limit=1, page_token=token, state=agency_pb2.COMMISSION_STATE_RECEIVED),
        ),
    ):
        error = _refused(agency, party, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "another caller or other filters" in (error.details() or "")
    # The limit may change from page to page.
    assert agency.stub(COMMISSIONER).ListCommissions(agency_pb2.ListCommissionsRequest(limit=5, page_token=token))


_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def test_a_page_token_with_inserted_whitespace_padding_or_other_alphabet_is_invalid_argument(agency: Agency) -> None:
    """Python's base64 decoder is lax: it read a token with spaces or a line break inserted, ``==`` appended, ``+/``
    for ``-_``, or other unused bits in its last character as the genuine one, so an altered token was taken."""
    for i in range(3):
        _submit(agency, 10 * i)
    token = agency.stub(COMMISSIONER).ListCommissions(agency_pb2.ListCommissionsRequest(limit=1)).next_page_token
    assert len(token) == 151
    # 113 bytes: the last character carries 4 bits of the last byte and 2 unused bits.
    last = _ALPHABET.index(token[-1])
    assert last & 0b11 == 0
    altered = [
        token[:70] + " " + token[70:],
        token[:70] + "\n" + token[70:],
        token + "\n",
        " " + token,
        token + "==",
        token + "=",
        token[:-1] + _ALPHABET[last | 0b01],
        token[:-1] + _ALPHABET[last | 0b10],
    ]
    if "-" in token or "_" in token:  # nearly always (a token without either has odds of about 1 in 120)
        altered.append(token.replace("-", "+").replace("_", "/"))
    for bad in altered:
        error = _refused(agency, COMMISSIONER, agency_pb2.ListCommissionsRequest(limit=1, page_token=bad))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, repr(bad)
        assert "page_token" in (error.details() or "")
    # The genuine token still pages on.
    assert agency.stub(COMMISSIONER).ListCommissions(agency_pb2.ListCommissionsRequest(limit=1, page_token=token))


def test_filters_by_state_commissioner_and_creation_days(agency: Agency) -> None:
    assert agency.world.clock.now_ms() == NOW  # 2 March 2026, 10:00 Beijing time
    mine_2nd = _submit(agency, 0)
    other_2nd = _submit(agency, 0, party=OTHER_COMMISSIONER)
    agency.world.clock.advance(DAY_MS)
    mine_3rd = _submit(agency, 10)
    agency.world.clock.advance(DAY_MS)
    mine_4th = _submit(agency, 20)
    agency.stub(BACKOFFICE).RecordIntake(agency.intake(mine_3rd, "S-0001"))

    def listed(party: str, **filters: object) -> list[str]:
        request = agency_pb2.ListCommissionsRequest(limit=2, **filters)  # type: ignore[arg-type]
        return [cid for page in _pages(agency, party, request) for cid in page]

    assert listed(BACKOFFICE) == [mine_4th, mine_3rd, other_2nd, mine_2nd]
    assert listed(BACKOFFICE, commissioner=OTHER_COMMISSIONER) == [other_2nd]
    assert listed(COMMISSIONER, commissioner=OTHER_COMMISSIONER) == []  # filters only narrow what one may see
    assert listed(BACKOFFICE, state=agency_pb2.COMMISSION_STATE_INTAKE_PASSED) == [mine_3rd]
    assert listed(COMMISSIONER, created_from=_day(3)) == [mine_4th, mine_3rd]
    assert listed(COMMISSIONER, created_until=_day(3)) == [mine_3rd, mine_2nd]
    assert listed(BACKOFFICE, created_from=_day(2), created_until=_day(2)) == [other_2nd, mine_2nd]
    assert listed(BACKOFFICE, created_from=_day(5)) == []

    for request in (
        agency_pb2.ListCommissionsRequest(created_from=_day(4), created_until=_day(3)),
        agency_pb2.ListCommissionsRequest(created_from=records_pb2.Date(year=2026, month=13, day=1)),
        agency_pb2.ListCommissionsRequest(created_until=records_pb2.Date()),
        agency_pb2.ListCommissionsRequest(commissioner="c" * 65),
    ):
        assert _refused(agency, BACKOFFICE, request).code() == grpc.StatusCode.INVALID_ARGUMENT
