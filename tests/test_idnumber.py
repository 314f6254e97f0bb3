"""GB 11643 ID numbers: check digit, shape, region, birth date; errors never echo the number."""

from __future__ import annotations

from datetime import date

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.idnumber import InvalidIdNumber, check_digit, is_valid_id_number, make_id_number, parse_id_number

TODAY = date(2026, 11, 27)


def test_known_check_digits() -> None:
    # The worked example of GB 11643-1999 annex: 11010519491231002 -> X.
    assert check_digit("11010519491231002") == "X"
    assert is_valid_id_number("11010519491231002X", today=TODAY)
    assert is_valid_id_number("11010519491231002x", today=TODAY)


@given(
    region=st.sampled_from(["220102", "220104", "222401", "110105"]),
    born=st.dates(min_value=date(1900, 1, 1), max_value=TODAY),
    sequence=st.integers(0, 999),
)
def test_made_numbers_parse_back(region: str, born: date, sequence: int) -> None:
    number = make_id_number(region, born, sequence)
    parsed = parse_id_number(number, today=TODAY)
    assert parsed.region_code == region and parsed.birth_date == born
    assert parsed.is_male == (sequence % 2 == 1)


@pytest.mark.parametrize(
    ("number", "reason"),
    [
        ("22010219800517123", "17 digits"),
        ("2201021980051712345", "17 digits"),
        ("22010219800517123A", "17 digits"),
        ("220102800517123", "old 15-digit form: give its 18-digit form"),
        ("990102198005171236", "province"),
        ("220102198002301236", "calendar date"),
        ("220102203001011236", "implausible"),
        ("220102188001011236", "implausible"),
    ],
)
def test_invalid_numbers_say_why_without_the_number(number: str, reason: str) -> None:
    with pytest.raises(InvalidIdNumber) as excinfo:
        parse_id_number(number, today=TODAY)
    assert reason in str(excinfo.value)
    assert number not in str(excinfo.value)


def test_every_wrong_check_digit_is_refused() -> None:
    good = make_id_number("220102", date(1980, 5, 17), 123)
    for char in "0123456789X":
        if char != good[17]:
            with pytest.raises(InvalidIdNumber, match="check digit"):
                parse_id_number(good[:17] + char, today=TODAY)


def test_full_width_digits_fold_to_one_value() -> None:
    good = make_id_number("220102", date(1980, 5, 17), 123)
    full_width = "".join(chr(ord(c) + 0xFEE0) for c in good)
    assert parse_id_number(full_width, today=TODAY).value == good


def test_repr_hides_the_number() -> None:
    parsed = parse_id_number(make_id_number("220102", date(1980, 5, 17), 123), today=TODAY)
    assert parsed.value not in repr(parsed) and parsed.value not in str(parsed)
