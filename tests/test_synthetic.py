"""The synthetic population and the synthetic sharing unit: determinism, valid people, plausible findings."""

from __future__ import annotations

import hashlib
import os
import random
import statistics
import subprocess
import sys
from collections import Counter
from datetime import date, timedelta
from pathlib import Path

import pytest
from hedui.v1 import exchange_pb2
from hedui.v1 import records_pb2 as r

from common.categories import RECORD_FIELD, UNIT_DATA
from common.dates import from_pb
from common.idnumber import make_id_number, parse_id_number
from connectors.adapters.base import AdapterError, Finding, LookupContext
from connectors.adapters.rows import record_to_row, row_to_record
from connectors.answering import answer_subjects
from connectors.synthetic import (
    AGE_RANGES,
    JILIN_REGION_CODES,
    JILIN_REGIONS,
    RATES,
    REFERENCE_DATE,
    Population,
    Relation,
    SyntheticAdapter,
)

SEED = 20170058
AS_OF = date(2025, 6, 30)
PRODUCED_MS = 1_767_225_600_000
UNITS_WITH_DATA = sorted(u for u, data in UNIT_DATA.items() if data)


def context(categories: tuple[int, ...], produced_at_ms: int = PRODUCED_MS) -> LookupContext:
    return LookupContext(categories, income_from=(2024, 7), income_to=(2025, 6), assets_as_of=AS_OF,
                         produced_at_ms=produced_at_ms)  # fmt: skip


@pytest.fixture(scope="module")
def population() -> Population:
    return Population(SEED)


@pytest.fixture(scope="module")
def people(population: Population) -> list[str]:
    """ID numbers of the first 2,000 members of the population."""
    ids = [m.id_number for h in population.households(900) for m in h.members]
    assert len(ids) >= 2000
    return ids[:2000]


def ids_aged(low: int, high: int, count: int = 2000) -> list[str]:
    """``count`` well-formed Jilin ID numbers of people aged ``low`` to ``high`` on AS_OF."""
    rng = random.Random(f"{low}-{high}")
    ids = []
    for _ in range(count):
        age = rng.randint(low, min(high, 90))
        birth = AS_OF - timedelta(days=age * 365 + age // 4 + rng.randrange(365))
        ids.append(make_id_number(rng.choice(JILIN_REGION_CODES), birth, rng.randrange(1000)))
    return ids


def fingerprint(found: dict[str, list[Finding]]) -> str:
    digest = hashlib.sha256()
    for id_number in sorted(found):
        for finding in found[id_number]:
            digest.update(id_number.encode() + finding.name.encode() + finding.record.SerializeToString())
    return digest.hexdigest()


# --- population ------------------------------------------------------------------------------------------------


def test_regions_are_real_jilin_county_codes() -> None:
    assert len(JILIN_REGION_CODES) >= 15
    for code in ("220102", "220103", "220104", "220105", "220106", "220112", "220182", "220202", "220203",
                 "220204", "220211", "220281", "220282", "220302", "220402", "220502", "220602", "220702",
                 "220802", "222401", "222403"):  # fmt: skip
        assert code in JILIN_REGIONS
    assert all(code.startswith("22") and len(code) == 6 for code in JILIN_REGION_CODES)


def test_households_are_deterministic_and_index_addressable(population: Population) -> None:
    again = Population(SEED)
    assert [again.household(i) for i in (7, 3, 5)] == [population.household(i) for i in (7, 3, 5)]
    assert list(population.households(4, start=3)) == [population.household(i) for i in range(3, 7)]
    other = Population(SEED + 1)
    assert [h.members for h in other.households(5)] != [h.members for h in population.households(5)]
    assert population.household(10_000_000).index == 10_000_000


def test_households_are_generated_lazily(population: Population) -> None:
    households = population.households(10**12)
    assert next(households).index == 0
    assert next(households).index == 1


def test_members_have_valid_id_numbers_matching_their_details(population: Population) -> None:
    for household in population.households(400):
        ids = [m.id_number for m in household.members]
        assert len(set(ids)) == len(ids)
        assert household.household_id.endswith(f"{household.index:08d}")
        for member in household.members:
            parsed = parse_id_number(member.id_number, today=REFERENCE_DATE)
            assert parsed.birth_date == member.birth_date
            assert parsed.is_male == member.is_male
            assert parsed.region_code in population.regions
            if member.relation is not Relation.SUPPORT_OBLIGOR:
                assert parsed.region_code == household.region_code


def age(born: date) -> int:
    ref = REFERENCE_DATE
    return ref.year - born.year - ((ref.month, ref.day) < (born.month, born.day))


def test_household_structure_is_plausible(population: Population) -> None:
    relations: Counter[Relation] = Counter()
    sizes: Counter[int] = Counter()
    for household in population.households(1000):
        applicant = household.applicant
        assert applicant.relation is Relation.APPLICANT
        assert [m.relation for m in household.members].count(Relation.APPLICANT) == 1
        assert 18 <= age(applicant.birth_date) <= 88
        sizes[len(household.members)] += 1
        for member in household.members[1:]:
            relations[member.relation] += 1
            gap = age(applicant.birth_date) - age(member.birth_date)
            if member.relation is Relation.SPOUSE:
                assert member.is_male != applicant.is_male
                assert age(member.birth_date) >= 20
            elif member.relation in (Relation.CHILD, Relation.SUPPORT_OBLIGOR):
                assert 19 <= gap <= 39
            else:
                assert member.relation is Relation.PARENT
                assert -36 <= gap <= -19
            if member.relation is Relation.SUPPORT_OBLIGOR:
                assert age(member.birth_date) >= 18
    assert all(relations[kind] > 30 for kind in Relation if kind is not Relation.APPLICANT)
    assert sizes[1] > 50 and max(sizes) >= 5


def test_other_regions_and_bad_regions() -> None:
    yanbian = Population(1, regions=["222401", "222403"])
    assert {h.region_code for h in yanbian.households(50)} == {"222401", "222403"}
    with pytest.raises(ValueError):
        Population(1, regions=["22010"])
    with pytest.raises(ValueError):
        Population(1, regions=[])


def test_registered_name_is_the_population_name(population: Population) -> None:
    names = set()
    for household in population.households(300):
        for member in household.members:
            assert population.registered_name(member.id_number) == member.name
            assert Population(SEED).registered_name(member.id_number.lower()) == member.name
            assert 2 <= len(member.name) <= 3
            names.add(member.name)
    assert len(names) > 500
    changed = sum(
        Population(SEED + 1).registered_name(m.id_number) != m.name
        for h in population.households(50)
        for m in h.members
    )
    assert changed > 0.8 * sum(len(h.members) for h in population.households(50))


def test_name_mismatch_through_the_connector(population: Population) -> None:
    """A query with the population's name is a hit; with another name it is NAME_MISMATCH."""
    adapter = SyntheticAdapter(population, r.UNIT_CATEGORY_PUBLIC_SECURITY)
    ctx = context((r.DATA_CATEGORY_HOUSEHOLD_REGISTER,))
    member = next(m for h in population.households(20) for m in h.members if adapter.fetch([m.id_number], ctx))
    auth = exchange_pb2.Authorisation(number="SQ-1", scan_sha256=bytes(32))

    def subject(name: str) -> exchange_pb2.QuerySubject:
        return exchange_pb2.QuerySubject(subject_ref=name, id_number=member.id_number, name=name, authorisation=auth)

    queried = [subject(member.name), subject(member.name + "某")]
    answers = answer_subjects(queried, adapter, ctx, {}, today=AS_OF).subjects
    assert [a.status for a in answers] == [exchange_pb2.SUBJECT_STATUS_FOUND, exchange_pb2.SUBJECT_STATUS_NAME_MISMATCH]
    assert answers[0].records[0].WhichOneof("body") == "household_register"


# --- synthetic unit --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("unit", UNITS_WITH_DATA, ids=r.UnitCategory.Name)
def test_every_unit_category_yields_records_of_its_categories(
    population: Population, people: list[str], unit: int
) -> None:
    adapter = SyntheticAdapter(population, unit)
    categories = UNIT_DATA[unit]
    found = adapter.fetch(people, context(categories))

    seen = Counter(f.record.category for findings in found.values() for f in findings)
    assert set(seen) == set(categories)
    for id_number, findings in found.items():
        assert {f.name for f in findings} == {population.registered_name(id_number)}
        for finding in findings:
            record = finding.record
            assert record.WhichOneof("body") == RECORD_FIELD[record.category]
            assert record.produced_at_ms == PRODUCED_MS
            # Every synthetic record is something the row converter (and so a SQL or CSV unit) can carry.
            assert row_to_record(record.category, record_to_row(record), PRODUCED_MS) == record
    counts = Counter(len([f for f in fs if f.record.category == c]) for fs in found.values() for c in categories)
    assert max(counts) <= 3
    adapter.close()


def test_records_are_deterministic(population: Population, people: list[str]) -> None:
    categories = UNIT_DATA[r.UNIT_CATEGORY_FINANCIAL_INSTITUTION]
    first = SyntheticAdapter(population, r.UNIT_CATEGORY_FINANCIAL_INSTITUTION).fetch(people, context(categories))
    again = SyntheticAdapter(Population(SEED), r.UNIT_CATEGORY_FINANCIAL_INSTITUTION).fetch(
        list(reversed(people)), context(categories)
    )
    assert fingerprint(first) == fingerprint(again)
    later = SyntheticAdapter(population, r.UNIT_CATEGORY_FINANCIAL_INSTITUTION).fetch(
        people, context(categories, PRODUCED_MS + 5)
    )
    assert set(later) == set(first)
    for id_number, findings in first.items():
        for before, after in zip(findings, later[id_number], strict=True):
            after.record.produced_at_ms = PRODUCED_MS
            assert before.record.SerializeToString() == after.record.SerializeToString()
    other_seed = SyntheticAdapter(Population(SEED + 1), r.UNIT_CATEGORY_FINANCIAL_INSTITUTION)
    assert fingerprint(other_seed.fetch(people, context(categories))) != fingerprint(first)


def test_records_do_not_depend_on_the_process(population: Population, people: list[str]) -> None:
    """Same bytes in a fresh interpreter with another hash seed: nothing hangs on hash() or on process state."""
    code = (
        "import sys; sys.path[:0] = ['.']\n"
        "from tests.test_synthetic import *\n"
        "p = Population(SEED)\n"
        "ids = [m.id_number for h in p.households(900) for m in h.members][:2000]\n"
        "cats = UNIT_DATA[r.UNIT_CATEGORY_FINANCIAL_INSTITUTION]\n"
        "print(fingerprint(SyntheticAdapter(p, r.UNIT_CATEGORY_FINANCIAL_INSTITUTION).fetch(ids, context(cats))))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True)
    categories = UNIT_DATA[r.UNIT_CATEGORY_FINANCIAL_INSTITUTION]
    here = SyntheticAdapter(population, r.UNIT_CATEGORY_FINANCIAL_INSTITUTION).fetch(people, context(categories))
    assert out.stdout.strip() == fingerprint(here)


@pytest.mark.parametrize("category", sorted(RATES), ids=lambda c: RECORD_FIELD[c])
def test_rates_are_roughly_as_intended(population: Population, category: int) -> None:
    low, high = AGE_RANGES[category]
    ids = ids_aged(low, high)
    adapter = SyntheticAdapter(population, next(u for u, data in UNIT_DATA.items() if category in data))
    share = len(adapter.fetch(ids, context((category,)))) / len(ids)
    assert abs(share - RATES[category]) < 0.035, (share, RATES[category])


def test_intended_rates() -> None:
    assert RATES[r.DATA_CATEGORY_HOUSEHOLD_REGISTER] > 0.9
    assert RATES[r.DATA_CATEGORY_SOCIAL_INSURANCE] > 0.8
    assert RATES[r.DATA_CATEGORY_DEPOSITS] == 0.40
    assert RATES[r.DATA_CATEGORY_REAL_ESTATE] == 0.25
    assert RATES[r.DATA_CATEGORY_VEHICLES] == 0.15
    assert RATES[r.DATA_CATEGORY_BUSINESS_REGISTRATION] == 0.05
    assert RATES[r.DATA_CATEGORY_DISABILITY] == 0.03
    assert set(RATES) == set(RECORD_FIELD)


def test_children_hold_no_adult_data(population: Population) -> None:
    children = ids_aged(0, 15, 500)
    adapter = SyntheticAdapter(population, r.UNIT_CATEGORY_LAND)
    assert adapter.fetch(children, context((r.DATA_CATEGORY_REAL_ESTATE,))) == {}


def findings_of(population: Population, category: int, ids: list[str]) -> list[Finding]:
    adapter = SyntheticAdapter(population, next(u for u, data in UNIT_DATA.items() if category in data))
    return [f for fs in adapter.fetch(ids, context((category,))).values() for f in fs]


def test_values_are_plausible(population: Population) -> None:
    adults = ids_aged(18, 90)
    deposits = [f.record.deposit for f in findings_of(population, r.DATA_CATEGORY_DEPOSITS, adults)]
    balances = [d.balance_fen for d in deposits]
    assert min(balances) >= 0 and statistics.median(balances) < 50_000_00
    assert max(balances) > 200_000_00  # the long tail
    assert all(len(d.account_suffix) == 4 and from_pb(d.as_of) == AS_OF for d in deposits)

    estates = [f.record.real_estate for f in findings_of(population, r.DATA_CATEGORY_REAL_ESTATE, adults)]
    assert all(e.location.startswith("吉林省") and from_pb(e.registered_on) <= AS_OF for e in estates)
    assert all(12_00 <= e.area_centi_m2 < 301_00 for e in estates)
    assert 60_00 < statistics.median(e.area_centi_m2 for e in estates) < 120_00

    cars = [f.record.vehicle for f in findings_of(population, r.DATA_CATEGORY_VEHICLES, adults)]
    assert all(v.plate.startswith("吉") and v.plate[1] in "ABCDEFGHJ" and len(v.plate) == 7 for v in cars)
    assert all(from_pb(v.first_registration) <= AS_OF for v in cars)

    companies = [f.record.business for f in findings_of(population, r.DATA_CATEGORY_BUSINESS_REGISTRATION, adults)]
    assert all(len(b.credit_code) == 18 and b.role != r.BUSINESS_ROLE_UNSPECIFIED for b in companies)

    for tax in (f.record.tax for f in findings_of(population, r.DATA_CATEGORY_TAX, adults)):
        start, end = (tax.period_from.year, tax.period_from.month), (tax.period_to.year, tax.period_to.month)
        assert (2024, 7) <= start <= end <= (2025, 6)
        assert 0 <= tax.tax_paid_fen < tax.taxable_income_fen


def test_no_date_after_the_assets_date_or_before_birth(population: Population) -> None:
    ids = ids_aged(0, 90, 1500)
    for unit in UNITS_WITH_DATA:
        adapter = SyntheticAdapter(population, unit)
        for id_number, findings in adapter.fetch(ids, context(UNIT_DATA[unit])).items():
            born = parse_id_number(id_number, today=AS_OF).birth_date
            for finding in findings:
                for name, value in record_to_row(finding.record).items():
                    if isinstance(value, date) and name not in ("valid_until", "maturity_date"):
                        assert born <= value <= AS_OF, (RECORD_FIELD[finding.record.category], name)


def test_unknown_categories_and_malformed_ids(population: Population) -> None:
    adapter = SyntheticAdapter(population, r.UNIT_CATEGORY_TAX)
    with pytest.raises(AdapterError, match="not held by this synthetic unit"):
        adapter.fetch(["x"], context((r.DATA_CATEGORY_DEPOSITS,)))
    assert (
        adapter.fetch(["", "220102", "2201021990130112345", "22010220990101123X"], context((r.DATA_CATEGORY_TAX,)))
        == {}
    )
    with pytest.raises(AdapterError, match="unknown unit category"):
        SyntheticAdapter(population, 999)
    assert SyntheticAdapter(population, r.UNIT_CATEGORY_OTHER).categories == ()
