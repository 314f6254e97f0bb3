"""Party ids: who is who on the exchange network.

A party is one end of an exchange: an agency's gateway (``agency.220000``), a sharing unit's connector
(``unit.220100.tax``) or a staff member (``staff.220000.0007``). Ids are lower-case ASCII so that they are safe in
file names, logs and metric labels; they name organisations and roles, never a person's name or ID number.
"""

from __future__ import annotations

import re

MAX_PARTY_ID_LENGTH = 64
_PARTY_ID_RE = re.compile(r"[a-z][a-z0-9]*(?:[.\-_][a-z0-9]+)*")


def is_party_id(value: str) -> bool:
    """True if ``value`` is a well-formed party id."""
    return 0 < len(value) <= MAX_PARTY_ID_LENGTH and _PARTY_ID_RE.fullmatch(value) is not None


def check_party_id(value: str) -> str:
    """Return ``value`` if it is a well-formed party id, else raise ValueError saying what is allowed."""
    if not is_party_id(value):
        raise ValueError(
            f"party id must be 1-{MAX_PARTY_ID_LENGTH} characters of a-z, 0-9 and single '.', '-' or '_' "
            "separators, starting with a letter (e.g. agency.220000 or unit.220100.tax)"
        )
    return value
