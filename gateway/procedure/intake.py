"""Validation of a commission's data package (Procedure II), once, at the edge.

Every problem is reported, each located by household reference, member position and field, and none repeats an ID
number or a name: the report of an invalid package goes back to the commissioner and into logs. A package with any
problem creates nothing.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from datetime import date

from hedui.v1 import agency_pb2, exchange_pb2, records_pb2

from common.dates import from_pb, year_month
from common.errors import HeduiError
from common.idnumber import InvalidIdNumber, parse_id_number

MAX_HOUSEHOLDS = 5000
MAX_MEMBERS = 30
MAX_SUBJECTS = 50_000
MAX_PERIOD_MONTHS = 36
MAX_PROBLEMS_REPORTED = 50
DIGEST_BYTES = 32
_REF_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}")
#: The longest letter or authorisation number, in characters (as sent, surrounding whitespace removed; and as
#: normalised by :func:`letter_key`).
MAX_NUMBER_CHARS = 64
#: Unicode categories a document number may use: letters (CJK included), digits and numerals (full-width digits,
#: 〇), punctuation (〔〕 [] () 【】 - / . :); 第 and 号 are letters. Everything else is refused: controls and
#: format characters (line breaks, bidi overrides, zero-width joiners), unassigned and private-use code points,
#: combining marks and symbols.
_NUMBER_CATEGORIES = frozenset(
    {"Lu", "Ll", "Lt", "Lm", "Lo", "Nd", "Nl", "No", "Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po"}
)
#: The spaces a document number may hold inside it (not at its ends): the ASCII and the ideographic space.
_NUMBER_SPACES = frozenset({" ", "\u3000"})
#: The brackets official numbers put the year in, as people type them: GB/T 9704 prescribes 〔〕; [] () 【】 〖〗 〘〙
#: (and their full-width forms, which NFKC folds to ASCII) are taken for the same letter.
_BRACKETS = str.maketrans(dict.fromkeys("[(【〖〘", "〔") | dict.fromkeys("])】〗〙", "〕"))
#: Every space character (Unicode category Zs): what :func:`trim` removes around a field.
SPACES = " \u00a0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u202f\u205f\u3000"
#: The longest reason of a return or termination, in characters.
MAX_REASON_CHARS = 255


def trim(text: str) -> str:
    """``text`` without the spaces around it (:data:`SPACES`). Only spaces: ``str.strip()`` would also remove the
    control characters Python counts as whitespace (U+001C-001F, U+0085, U+2028, tabs, line breaks), so that
    ``"\\x1fA1"`` would pass as ``A1``; those stay and are refused by each field's character rule."""
    return text.strip(SPACES)


def is_plain_text(text: str) -> bool:
    """Whether ``text`` is one line of printable characters (letters, digits, punctuation, symbols, spaces U+0020 and
    U+3000): no control or format characters (NUL, escape sequences, line breaks, tabs, bidi overrides, zero-width
    characters), no line or paragraph separators, no private-use or unassigned code points."""
    return all(char.isprintable() or char == "\u3000" for char in text)


def number_problem(number: str) -> str | None:
    """What is wrong with ``number`` as an official document number (a commission letter's or an authorisation's),
    or None. Allowed: 1-64 characters, after removing surrounding spaces (:func:`trim`), of letters (CJK included),
    digits (full-width too) and punctuation, with spaces inside; at least one letter or digit."""
    text = trim(number)
    if not 1 <= len(text) <= MAX_NUMBER_CHARS:
        return f"1-{MAX_NUMBER_CHARS} characters"
    for position, char in enumerate(text, start=1):
        if char not in _NUMBER_SPACES and unicodedata.category(char) not in _NUMBER_CATEGORIES:
            # The code point only: the character itself may be invisible, or turn the message around.
            return (
                f"character {position} (U+{ord(char):04X}) is not allowed: letters, digits and punctuation only, "
                "no control, format or unassigned characters"
            )
    if not any(unicodedata.category(c)[0] in "LN" for c in text):
        return "needs at least one letter or digit"
    if len(letter_key(text)) > MAX_NUMBER_CHARS:
        return f"longer than {MAX_NUMBER_CHARS} characters once normalised (NFKC)"
    return None


def letter_key(number: str) -> str:
    """The form under which two letter numbers count as the same letter (one letter, one commission): Unicode NFKC
    (full-width digits and letters become ASCII), case folded, whitespace removed, and every bracket pair of
    :data:`_BRACKETS` as 〔〕. ``长南民核委〔2026〕12号``, ``长南民核委[2026]１２号`` and
    ``长南民核委 (2026) 12号`` are one letter."""
    folded = unicodedata.normalize("NFKC", number).casefold()
    return "".join(folded.split()).translate(_BRACKETS)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a package: where (household, member, field) and what."""

    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


class InvalidPackage(HeduiError):
    """The data package has problems; nothing was created."""

    code = "invalid_package"

    def __init__(self, problems: list[Problem]) -> None:
        shown = "; ".join(str(p) for p in problems[:MAX_PROBLEMS_REPORTED])
        more = len(problems) - MAX_PROBLEMS_REPORTED
        super().__init__(f"{len(problems)} problem(s): {shown}" + (f"; and {more} more" if more > 0 else ""))
        self.problems = problems


def _months(start: tuple[int, int], end: tuple[int, int]) -> int:
    return (end[0] - start[0]) * 12 + end[1] - start[1] + 1


def _check_header(request: agency_pb2.SubmitCommissionRequest, today: date, problems: list[Problem]) -> None:
    letter = request.letter
    problem = number_problem(letter.number)
    if problem is not None:
        problems.append(Problem("letter.number", problem))
    try:
        if from_pb(letter.date) > today:
            problems.append(Problem("letter.date", "lies in the future"))
    except ValueError:
        problems.append(Problem("letter.date", "missing or not a calendar date"))
    if request.programme not in exchange_pb2.Programme.values() or request.programme == 0:
        problems.append(Problem("programme", "missing or unknown assistance programme"))
    try:
        start, end = year_month(request.income_from), year_month(request.income_to)
        if not 1 <= _months(start, end) <= MAX_PERIOD_MONTHS:
            problems.append(Problem("income period", f"must run forward and span at most {MAX_PERIOD_MONTHS} months"))
    except ValueError:
        problems.append(Problem("income period", "income_from and income_to must be year and month"))
    try:
        if from_pb(request.assets_as_of) > today:
            problems.append(Problem("assets_as_of", "lies in the future"))
    except ValueError:
        problems.append(Problem("assets_as_of", "missing or not a calendar date"))
    categories = list(request.categories)
    known = set(records_pb2.DataCategory.values()) - {0}
    if not categories or len(set(categories)) != len(categories) or not set(categories) <= known:
        problems.append(Problem("categories", "list each known data category once, at least one"))
    for i, threshold in enumerate(request.thresholds):
        if threshold.limit_fen <= 0 or threshold.category not in categories:
            problems.append(Problem(f"thresholds[{i}]", "a positive limit for one of the requested categories"))


def _check_member(where: str, member: agency_pb2.Member, today: date, problems: list[Problem]) -> str | None:
    number: str | None = None
    try:
        number = parse_id_number(member.id_number, today=today).value
    except InvalidIdNumber as exc:
        problems.append(Problem(f"{where}.id_number", str(exc)))
    name = trim(member.name)
    if not 1 <= len(name) <= 64 or not name.isprintable():
        problems.append(Problem(f"{where}.name", "1-64 printable characters"))
    if member.relation not in agency_pb2.Relation.values() or member.relation == 0:
        problems.append(Problem(f"{where}.relation", "applicant, family member or support obligor"))
    auth = member.authorisation
    if not trim(auth.number):
        problems.append(Problem(f"{where}.authorisation.number", "missing (nobody may be queried without one)"))
    elif (problem := number_problem(auth.number)) is not None:
        problems.append(Problem(f"{where}.authorisation.number", problem))
    if not (auth.signed and auth.fingerprinted):
        problems.append(Problem(f"{where}.authorisation", "must be signed and fingerprinted by the subject"))
    if len(auth.scan_sha256) != DIGEST_BYTES:
        problems.append(Problem(f"{where}.authorisation.scan_sha256", "SHA-256 of the scan (32 bytes) missing"))
    if len(member.id_copy_sha256) != DIGEST_BYTES:
        problems.append(Problem(f"{where}.id_copy_sha256", "SHA-256 of the ID-card copy (32 bytes) missing"))
    return number


def validate_package(request: agency_pb2.SubmitCommissionRequest, *, today: date) -> None:
    """Raise InvalidPackage listing every problem; return quietly when the package is complete and consistent."""
    problems: list[Problem] = []
    _check_header(request, today, problems)
    households = list(request.households)
    if not 1 <= len(households) <= MAX_HOUSEHOLDS:
        problems.append(Problem("households", f"1 to {MAX_HOUSEHOLDS} households"))
    if sum(len(h.members) for h in households) > MAX_SUBJECTS:
        problems.append(Problem("households", f"at most {MAX_SUBJECTS} members in one package"))
    refs: set[str] = set()
    seen: dict[str, str] = {}
    for h_index, household in enumerate(households):
        ref = household.household_ref
        where_h = f"household '{ref}'" if _REF_RE.fullmatch(ref) else f"household #{h_index + 1}"
        if not _REF_RE.fullmatch(ref):
            problems.append(Problem(where_h, "household_ref must be 1-64 characters of letters, digits and . _ : / -"))
        elif ref in refs:
            problems.append(Problem(where_h, "household_ref used twice"))
        refs.add(ref)
        members = list(household.members)
        if not 1 <= len(members) <= MAX_MEMBERS:
            problems.append(Problem(where_h, f"1 to {MAX_MEMBERS} members"))
        applicants = sum(m.relation == agency_pb2.RELATION_APPLICANT for m in members)
        if applicants != 1:
            problems.append(Problem(where_h, f"exactly one applicant (found {applicants})"))
        for m_index, member in enumerate(members):
            where = f"{where_h} member {m_index + 1}"
            number = _check_member(where, member, today, problems)
            if number is not None:
                if number in seen:
                    problems.append(Problem(where, f"same ID number as {seen[number]}"))
                else:
                    seen[number] = where
    if problems:
        raise InvalidPackage(problems)
