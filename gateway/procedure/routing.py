"""Which sharing units a commission's requested data categories go to."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from common.categories import UNIT_DATA, data_category_label
from gateway.exchange.units import UnitRow


def route(categories: Iterable[int], units: Sequence[UnitRow]) -> list[str]:
    """Every enabled unit holding at least one of ``categories``, in unit-id order."""
    wanted = set(categories)
    return [u.unit_id for u in units if u.enabled and wanted & set(UNIT_DATA.get(u.category, ()))]


def unserved(categories: Iterable[int], units: Sequence[UnitRow]) -> list[int]:
    """The requested categories no enabled unit holds: nobody would be asked them, and a report would show them
    as nothing found. Clause 7 lists which unit holds what; a unit the gateway has not registered is not asked."""
    served = {c for u in units if u.enabled for c in UNIT_DATA.get(u.category, ())}
    return sorted({c for c in categories if c not in served})


def category_names(categories: Iterable[int]) -> str:
    """'deposits (存款), vehicles (车辆)': how messages name data categories."""
    return ", ".join(data_category_label(c) for c in categories)
