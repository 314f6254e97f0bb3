"""Which sharing units a commission's requested data categories go to."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from common.categories import UNIT_DATA
from gateway.store import UnitRow


def route(categories: Iterable[int], units: Sequence[UnitRow]) -> list[str]:
    """Every enabled unit holding at least one of ``categories``, in unit-id order."""
    wanted = set(categories)
    return [u.unit_id for u in units if u.enabled and wanted & set(UNIT_DATA.get(u.category, ()))]
