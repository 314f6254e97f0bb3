"""Regression tests for issue 10 item 6: real letter numbers were refused. ``长南民核委〔2026〕12号`` got
INVALID_ARGUMENT because only ``[A-Za-z0-9._:/-]`` was allowed. Official document numbers (CJK, 〔〕, full-width
digits) are accepted now, with a length limit, and refused with control, format (bidi), private-use or unassigned
characters; the one-letter-one-commission rule compares numbers normalised, so that a number typed another way
(full-width digits, [] for 〔〕, spaces) is the same letter. Existing rows get their key by migration 0009."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hedui.v1 import agency_pb2
from sqlalchemy import select, text

from common.db import make_engine
from gateway.db import schema
from gateway.db.database import upgrade
from gateway.procedure.intake import MAX_NUMBER_CHARS, SPACES, letter_key, number_problem, trim
from gateway.procedure.submission import package_digest
from tests.agency_world import agency_world
from tests.test_agency import COMMISSIONER, OTHER_COMMISSIONER, Agency

REAL_NUMBERS = [
    "长南民核委〔2026〕12号",
    "吉民发〔2017〕58号",
    "长民核字〔2026〕第0012号",
    "南关区民政局核对委托书（2026）３号",
    "长南民核委【2026】7号",
    "ＣＣＭ-2026/0012",
    "长南民核委 〔2026〕 13号",
    "WT-2026-0001",
]


@pytest.fixture
def agency(tmp_path: Path) -> Iterator[Agency]:
    with agency_world(tmp_path) as world:
        yield world


def _submit(agency: Agency, number: str, *, households: int = 1, start: int = 0, party: str = COMMISSIONER) -> str:
    package = agency.package(households, start=start)
    package.letter.number = number
    return agency.stub(party).SubmitCommission(package).commission_id


def test_real_letter_numbers_are_accepted(agency: Agency) -> None:
    for i, number in enumerate(REAL_NUMBERS):
        cid = _submit(agency, number, start=10 * i)
        commission = agency.stub(COMMISSIONER).GetCommission(agency_pb2.CommissionRef(commission_id=cid))
        assert commission.letter_number == number.strip()
    assert agency.commissions() == len(REAL_NUMBERS)


@pytest.mark.parametrize(
    "number",
    [
        "长南民核委[2026]12号",  # ASCII brackets for 〔〕
        "长南民核委［2026］１２号",  # full-width brackets and digits
        "长南民核委(2026)12号",
        "长南民核委 〔2026〕 12号 ",  # spaces
        "长南民核委〔２０２６〕１２号",
    ],
)
def test_a_near_duplicate_letter_number_is_the_same_letter(agency: Agency, number: str) -> None:
    first = _submit(agency, "长南民核委〔2026〕12号")
    entries = agency.audit.count()
    with pytest.raises(grpc.RpcError) as excinfo:
        _submit(agency, number, households=2)  # another package under the same letter, written another way
    assert excinfo.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert first in (excinfo.value.details() or "")
    assert agency.commissions() == 1 and agency.audit.count() == entries
    # Another commissioner's letter may carry the same number; a different number is another letter.
    _submit(agency, number, party=OTHER_COMMISSIONER)
    _submit(agency, "长南民核委〔2026〕120号", start=50)
    assert agency.commissions() == 3


def test_the_same_package_sent_again_is_answered_with_its_commission(agency: Agency) -> None:
    package = agency.package(1, start=70)
    package.letter.number = "长南民核委〔2026〕15号"
    commissioner = agency.stub(COMMISSIONER)
    first = commissioner.SubmitCommission(package)
    assert commissioner.SubmitCommission(package) == first
    assert agency.commissions() == 1


@pytest.mark.parametrize(
    "number",
    [
        "",
        "   ",
        "长南民核委\u202e〔2026〕12号",  # right-to-left override
        "长南民核委\u200b〔2026〕12号",  # zero-width space
        "长南民核委〔2026〕\n12号",
        "长南民核委〔2026〕\t12号",
        "长南民核委\u0378号",  # unassigned
        "长南民核委\ue000号",  # private use
        "长南民核委〔2026〕12号😀",  # a symbol
        "〔〕-/",  # no letter or digit
        "号" * (MAX_NUMBER_CHARS + 1),
    ],
)
def test_letter_numbers_with_control_format_or_unassigned_characters_are_refused(agency: Agency, number: str) -> None:
    with pytest.raises(grpc.RpcError) as excinfo:
        _submit(agency, number)
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = excinfo.value.details() or ""
    assert "letter.number" in details
    assert "\u202e" not in details and "\n" not in details  # the refusal does not repeat the character
    assert agency.commissions() == 0


def test_the_normalised_key_and_its_limits() -> None:
    assert (
        letter_key("长南民核委〔2026〕12号")
        == letter_key("长南民核委[2026]１２号")
        == letter_key(" 长南民核委 (2026) 12号")
    )
    assert letter_key("WT-2026-0001") == letter_key("wt-2026-0001")
    assert letter_key("长南民核委〔2026〕12号") != letter_key("长南民核委〔2026〕112号")
    assert number_problem("号" * MAX_NUMBER_CHARS) is None
    assert number_problem(" " + "号" * MAX_NUMBER_CHARS + " ") is None  # surrounding whitespace does not count
    assert number_problem("\ufdfa" * 5) is not None  # 5 characters, 90 once NFKC has expanded them


def test_migration_0009_fills_the_key_of_existing_commissions(tmp_path: Path, database_url: str | None) -> None:
    engine = make_engine(database_url or f"sqlite:///{tmp_path / 'gateway.db'}")
    try:
        upgrade(engine, "0006")
        with engine.begin() as conn:
            for ref, number in (("C-1", "WT-2026-0001"), ("C-2", None)):
                conn.execute(
                    text(
                        "INSERT INTO commissions (ref, purpose, income_from, income_to, assets_as_of, staff_ids, "
                        "categories, thresholds, created_at_ms, letter_number, commissioner) VALUES "
                        "(:ref, 1, '2026-01', '2026-10', '2026-10-31', '', '1', '', 1, :number, 'c.1')"
                    ),
                    {"ref": ref, "number": number},
                )
        upgrade(engine, "0009")
        with engine.connect() as conn:
            keys = dict(conn.execute(select(schema.commissions.c.ref, schema.commissions.c.letter_key)).all())
        assert keys == {"C-1": "wt-2026-0001", "C-2": None}
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("first", "again"),
    [
        ("吉民核〔2026〕第9号", "吉民核〔2026〕第9号 "),
        ("吉民核〔2026〕第9号", "吉民核[2026]第９号"),
        ("吉民核〔2026〕第9号", "吉民核【2026】第9号"),
        ("吉民核〔2026〕第9号", "\u3000吉民核（2026）第9号"),
        (" 吉民核〔2026〕第9号\u3000", "吉民核〔2026〕第9号"),
    ],
)
def test_a_retry_under_a_differently_written_letter_number_gets_the_first_commission(
    agency: Agency, first: str, again: str
) -> None:
    """The retry check digested the whole request with the letter number as sent, so the same package sent again
    under the same letter written another way was ALREADY_EXISTS "with another package"."""
    package = agency.package(1, start=80)
    package.letter.number = first
    commissioner = agency.stub(COMMISSIONER)
    made = commissioner.SubmitCommission(package)
    entries = agency.audit.count()
    package.letter.number = again
    assert commissioner.SubmitCommission(package) == made  # the same letter number and exchange digest, too
    assert agency.commissions() == 1 and agency.audit.count() == entries
    # Another package under the same letter, however written, is still refused.
    package.households[0].members[0].name = "另一个人"
    with pytest.raises(grpc.RpcError) as excinfo:
        commissioner.SubmitCommission(package)
    assert excinfo.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_a_commission_whose_digest_covers_the_number_as_sent_is_still_found_by_its_exact_retry(
    agency: Agency,
) -> None:
    """Commissions stored before the fix hold a package digest over the letter number as it was sent (spaces
    around it included); it is kept (it was what staff signed before approval trees), and the package sent exactly
    alike is still a retry."""
    package = agency.package(1, start=90)
    package.letter.number = "吉民核〔2026〕第10号 "
    commissioner = agency.stub(COMMISSIONER)
    made = commissioner.SubmitCommission(package)
    old_digest = package_digest(made.commission_id, package)  # as the gateway computed it before the fix
    with agency.world.store.engine.begin() as conn:
        conn.execute(
            schema.commissions.update()
            .where(schema.commissions.c.ref == made.commission_id)
            .values(package_digest=old_digest)
        )
    again = commissioner.SubmitCommission(package)
    assert again.commission_id == made.commission_id and again.exchange_digest == made.exchange_digest
    assert agency.commissions() == 1


@pytest.mark.parametrize("control", ["\x1c", "\x1d", "\x1e", "\x1f", "\x85", "\u2028", "\u2029", "\t", "\n", "\r"])
def test_control_characters_around_a_field_are_refused_not_stripped(agency: Agency, control: str) -> None:
    """``str.strip()`` removed U+001C-001F, U+0085 and U+2028 around a field, so ``"\\x1fA1"`` was taken as ``A1``
    and ``"\\x1f张三"`` as a name. Only spaces are removed around a field now; a control character is refused."""

    def refused(change: object, field: str) -> None:
        package = agency.package(1, start=100)
        change(package)  # type: ignore[operator]
        with pytest.raises(grpc.RpcError) as excinfo:
            agency.stub(COMMISSIONER).SubmitCommission(package)
        assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in (excinfo.value.details() or ""), (field, excinfo.value.details())

    def number(p: agency_pb2.SubmitCommissionRequest) -> None:
        p.letter.number = control + "A1"

    def number_after(p: agency_pb2.SubmitCommissionRequest) -> None:
        p.letter.number = "A1" + control

    def name(p: agency_pb2.SubmitCommissionRequest) -> None:
        p.households[0].members[0].name = control + "张三"

    def authorisation(p: agency_pb2.SubmitCommissionRequest) -> None:
        member = p.households[0].members[0]
        member.authorisation.number = member.authorisation.number + control

    def id_number(p: agency_pb2.SubmitCommissionRequest) -> None:
        member = p.households[0].members[0]
        member.id_number = control + member.id_number

    refused(number, "letter.number")
    refused(number_after, "letter.number")
    refused(name, ".name")
    refused(authorisation, "authorisation.number")
    refused(id_number, ".id_number")
    assert agency.commissions() == 0


def test_spaces_around_fields_are_removed(agency: Agency) -> None:
    package = agency.package(1, start=110)
    package.letter.number = "\u3000A1\u00a0"
    member = package.households[0].members[0]
    name, id_number = member.name, member.id_number
    member.name = f" {name}\u3000"
    member.id_number = f"\u3000{id_number} "
    cid = agency.stub(COMMISSIONER).SubmitCommission(package).commission_id
    with agency.world.store.engine.connect() as conn:
        assert conn.execute(select(schema.commissions.c.letter_number)).scalar_one() == "A1"
        stored = conn.execute(select(schema.subjects.c.name, schema.subjects.c.id_number)).first()
    assert cid and stored is not None and tuple(stored) == (name, id_number)


def test_trim_removes_every_space_character_and_nothing_else() -> None:
    every = [chr(c) for c in range(0x110000)]
    assert set(SPACES) == {c for c in every if unicodedata.category(c) == "Zs"}
    assert trim("\u3000\u2003A 1\u00a0 ") == "A 1"
    assert trim("\x1f\u3000A1\x85") == "\x1f\u3000A1\x85"  # only spaces, and only at the very ends


def test_a_full_width_id_number_is_stored_as_the_number_validated(agency: Agency) -> None:
    """Validation reads full-width digits (NFKC) and a lower-case x, but the subject was stored with the number as
    sent (only stripped and upper-cased), so full-width digits went to the units as they were typed."""
    package = agency.package(1, start=120)
    member = package.households[0].members[0]
    ascii_number = member.id_number
    member.id_number = ascii_number.translate({c: c + 0xFEE0 for c in range(0x30, 0x3A)}).lower()
    assert member.id_number != ascii_number
    agency.stub(COMMISSIONER).SubmitCommission(package)
    with agency.world.store.engine.connect() as conn:
        stored = conn.execute(select(schema.subjects.c.id_number).order_by(schema.subjects.c.id)).first()
    assert stored is not None and stored.id_number == ascii_number
