"""Resident identity numbers (公民身份号码) as defined by GB 11643-1999.

18 characters: a 6-digit administrative region code (GB/T 2260), an 8-digit birth date, a 3-digit sequence
number (odd for men, even for women) and an ISO 7064 MOD 11-2 check character (0-9 or X).

Errors never repeat the number itself: an ID number is personal data and must not reach logs or messages.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from datetime import date
from operator import mul

from common.errors import HeduiError

_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CHECK_CHARS = "10X98765432"
_ZERO_OFFSET = ord("0") * sum(_WEIGHTS)
_SHAPE = re.compile(r"[0-9]{17}[0-9X]")
#: First two digits of GB/T 2260 codes: provinces, autonomous regions, municipalities, and 71/81/82 (Taiwan,
#: Hong Kong, Macao), plus 83 used on residence permits for residents of Taiwan.
_PROVINCES = frozenset(
    {11, 12, 13, 14, 15, 21, 22, 23, 31, 32, 33, 34, 35, 36, 37, 41, 42, 43, 44, 45, 46, 50, 51, 52, 53, 54}
    | {61, 62, 63, 64, 65, 71, 81, 82, 83}
)
_EARLIEST_BIRTH = date(1890, 1, 1)


class InvalidIdNumber(HeduiError):
    """An ID number that fails GB 11643. The message names the rule broken, never the number."""

    code = "invalid_id_number"


@dataclass(frozen=True, slots=True)
class IdNumber:
    """A checked ID number. ``repr`` hides the digits; use ``.value`` deliberately."""

    value: str
    region_code: str
    birth_date: date
    is_male: bool

    def __repr__(self) -> str:
        return f"IdNumber(region={self.region_code[:2]}****, <hidden>)"

    __str__ = __repr__


def check_digit(first17: str) -> str:
    """The GB 11643 check character for the first 17 digits."""
    if not (len(first17) == len(_WEIGHTS) and first17.isascii() and first17.isdigit()):
        raise ValueError("the check digit is computed over exactly 17 ASCII digits")
    # Weighted sum over the ASCII codes, less the weighted codes of "0": one pass in C, no int() per digit.
    return _CHECK_CHARS[(sum(map(mul, first17.encode("ascii"), _WEIGHTS)) - _ZERO_OFFSET) % 11]


def _problem(value: str, today: date | None) -> tuple[str, date | None]:
    """What is wrong with a normalised number (empty when nothing is) and the birth date when it is a date."""
    if not _SHAPE.fullmatch(value):
        if len(value) == 15 and value.isdigit():
            # GB 11643-1989 numbers (before 1999): six-digit birth date, no check digit.
            return "ID number has the old 15-digit form: give its 18-digit form (GB 11643-1999)", None
        return "ID number must be 17 digits followed by a digit or X", None
    if int(value[:2]) not in _PROVINCES:
        return "ID number region code does not name a province", None
    try:
        born = date(int(value[6:10]), int(value[10:12]), int(value[12:14]))
    except ValueError:
        return "ID number birth date is not a calendar date", None
    if not _EARLIEST_BIRTH <= born <= (today or date.today()):
        return "ID number birth date is implausible (future or before 1890)", born
    if check_digit(value[:17]) != value[17]:
        return "ID number check digit is wrong", born
    return "", born


def _normalise(text: str) -> str:
    # Full-width digits (common with Chinese input methods) fold to ASCII, so one person has one value. NFKC
    # leaves ASCII as it is, so ASCII input skips it; it also makes every other space (U+3000, no-break spaces) an
    # ASCII one. Only spaces are removed around the number: str.strip() would also drop control characters
    # (U+001C-001F, U+0085, U+2028, tabs, line breaks), which must make the number invalid instead.
    return (text if text.isascii() else unicodedata.normalize("NFKC", text)).strip(" ").upper()


def parse_id_number(text: str, *, today: date | None = None) -> IdNumber:
    """Check ``text`` against GB 11643 (shape, region, birth date, check digit); lower-case x is accepted."""
    value = _normalise(text)
    problem, born = _problem(value, today)
    if problem or born is None:
        raise InvalidIdNumber(problem)
    return IdNumber(value=value, region_code=value[:6], birth_date=born, is_male=int(value[16]) % 2 == 1)


def is_valid_id_number(text: str, *, today: date | None = None) -> bool:
    """Whether ``text`` passes GB 11643 (what parse_id_number checks, without building the result)."""
    return not _problem(_normalise(text), today)[0]


def make_id_number(region_code: str, birth: date, sequence: int) -> str:
    """Build a valid number from its parts (synthetic data and tests). ``sequence`` is 0-999."""
    if not (len(region_code) == 6 and region_code.isdigit() and 0 <= sequence <= 999):
        raise ValueError("region code is 6 digits and sequence 0-999")
    first17 = f"{region_code}{birth:%Y%m%d}{sequence:03d}"
    return first17 + check_digit(first17)
