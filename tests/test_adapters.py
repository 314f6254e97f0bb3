"""The data adapters: the shared row converter, SQL on real SQLite files and the real PostgreSQL, CSV files."""

from __future__ import annotations

import csv
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.descriptor import FieldDescriptor
from hedui.v1 import records_pb2 as r
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from common.categories import RECORD_FIELD
from common.idnumber import make_id_number
from connectors.adapters.base import AdapterError, Finding, LookupContext
from connectors.adapters.csv_files import CsvAdapter
from connectors.adapters.rows import (
    category_columns,
    category_label,
    check_columns,
    field_columns,
    finding_from_row,
    record_to_row,
    required_columns,
    row_to_record,
)
from connectors.adapters.sql import SqlAdapter, server_flavour, session_settings
from tests.conftest_pg import postgres_schema

DEPOSITS = r.DATA_CATEGORY_DEPOSITS
REAL_ESTATE = r.DATA_CATEGORY_REAL_ESTATE
VEHICLES = r.DATA_CATEGORY_VEHICLES
TAX = r.DATA_CATEGORY_TAX
PRODUCED_MS = 1_767_225_600_000
CONTEXT = LookupContext(
    categories=(DEPOSITS, REAL_ESTATE, VEHICLES, TAX),
    income_from=(2025, 1),
    income_to=(2025, 6),
    assets_as_of=date(2025, 6, 30),
    produced_at_ms=PRODUCED_MS,
)
ALICE = make_id_number("220102", date(1980, 3, 14), 122)
BOB = make_id_number("220104", date(1975, 11, 2), 331)
NOBODY = make_id_number("222401", date(1990, 1, 1), 17)
#: Bulk depositors for the chunking test: more than two chunks of 500.
BULK = [make_id_number("220203", date(1960, 1, 1) + timedelta(days=i), 2) for i in range(1250)]


def ctx(*categories: int) -> LookupContext:
    return LookupContext(
        categories=categories,
        income_from=CONTEXT.income_from,
        income_to=CONTEXT.income_to,
        assets_as_of=CONTEXT.assets_as_of,
        produced_at_ms=PRODUCED_MS,
    )


def pb_date(year: int, month: int, day: int) -> r.Date:
    return r.Date(year=year, month=month, day=day)


# --- rows ------------------------------------------------------------------------------------------------------


def sample_value(field: FieldDescriptor, position: int) -> object:
    """A value of the form record_to_row gives back, different for every field."""
    if field.message_type is not None:
        return "2024-11" if field.message_type.name == "YearMonth" else date(2024, 2, 29)
    if field.enum_type is not None:
        prefix = field.enum_type.values[0].name.removesuffix("UNSPECIFIED")
        return field.enum_type.values[-1].name.removeprefix(prefix)
    if field.cpp_type == FieldDescriptor.CPPTYPE_BOOL:
        return True
    if field.cpp_type == FieldDescriptor.CPPTYPE_STRING:
        return f"值{position}"
    return 1000 + position


@pytest.mark.parametrize("category", sorted(RECORD_FIELD), ids=lambda c: RECORD_FIELD[c])
def test_row_round_trip_every_category(category: int) -> None:
    message = r.Record.DESCRIPTOR.fields_by_name[RECORD_FIELD[category]].message_type
    assert message is not None
    fields = {field.name: sample_value(field, i) for i, field in enumerate(message.fields)}
    assert category_columns(category) == ("id_number", "name", *fields)

    record = row_to_record(category, {"id_number": ALICE, "name": "张三", **fields}, PRODUCED_MS)

    assert record.category == category
    assert record.produced_at_ms == PRODUCED_MS
    assert record.WhichOneof("body") == RECORD_FIELD[category]
    assert record_to_row(record) == fields


def test_row_accepts_the_forms_sql_and_csv_deliver() -> None:
    as_text = {"balance_fen": " 123456 ", "as_of": "2025-06-30", "institution": "吉林银行", "account_suffix": "0042"}
    as_values = {"balance_fen": Decimal("123456"), "as_of": date(2025, 6, 30), "institution": "吉林银行"}
    expected = r.Deposit(institution="吉林银行", balance_fen=123456, as_of=pb_date(2025, 6, 30))
    assert row_to_record(DEPOSITS, as_values, 1).deposit == expected
    expected.account_suffix = "0042"
    assert row_to_record(DEPOSITS, as_text, 1).deposit == expected
    assert row_to_record(DEPOSITS, {"balance_fen": 123456.0}, 1).deposit.balance_fen == 123456

    tax = row_to_record(TAX, {"period_from": date(2025, 1, 1), "period_to": "2025-06-01", "tax_paid_fen": ""}, 1).tax
    assert (tax.period_from.year, tax.period_from.month, tax.period_to.month, tax.tax_paid_fen) == (2025, 1, 6, 0)


@pytest.mark.parametrize(
    ("text", "expected"), [("是", True), ("否", False), ("TRUE", True), ("false", False), ("1", True), (0, False)]
)
def test_row_bool_forms(text: object, expected: bool) -> None:
    assert row_to_record(TAX, {"self_employed": text}, 1).tax.self_employed is expected


@pytest.mark.parametrize("role", ["INVESTOR", "investor", "BUSINESS_ROLE_INVESTOR", 2, "2"])
def test_row_enum_forms(role: object) -> None:
    business = row_to_record(r.DATA_CATEGORY_BUSINESS_REGISTRATION, {"role": role}, 1).business
    assert business.role == r.BUSINESS_ROLE_INVESTOR


def test_row_without_fields_still_has_its_body() -> None:
    record = row_to_record(r.DATA_CATEGORY_DEATH_RECORD, {"id_number": ALICE, "name": "张三"}, 7)
    assert record.WhichOneof("body") == "death"
    assert not record.death.HasField("date_of_death")


def test_finding_from_row_normalises_the_id_number_and_stamps_the_context_time() -> None:
    row = {"id_number": f" {ALICE.lower()} ", "name": " 张三 ", "balance_fen": 5}
    id_number, finding = finding_from_row(DEPOSITS, row, CONTEXT)
    assert id_number == ALICE.upper()
    assert finding.name == "张三"
    assert finding.record.produced_at_ms == PRODUCED_MS


@pytest.mark.parametrize(
    ("category", "column", "value"),
    [
        (DEPOSITS, "balance_fen", "12.50"),
        (DEPOSITS, "balance_fen", 12.5),
        (DEPOSITS, "balance_fen", Decimal("9876.01")),
        (DEPOSITS, "balance_fen", "１２３"),
        (DEPOSITS, "balance_fen", True),
        (DEPOSITS, "as_of", "2025-02-30"),
        (DEPOSITS, "as_of", "30/06/2025"),
        (DEPOSITS, "as_of", 20250630),
        (DEPOSITS, "institution", 4242424242),
        (TAX, "period_from", "2025-13"),
        (TAX, "self_employed", "maybe"),
        (REAL_ESTATE, "co_owner_count", 2**40),
        (r.DATA_CATEGORY_BUSINESS_REGISTRATION, "role", "CHAIRMAN_OF_THE_BOARD"),
        (r.DATA_CATEGORY_BUSINESS_REGISTRATION, "role", 77),
    ],
)
def test_bad_values_are_refused_without_the_values(category: int, column: str, value: object) -> None:
    row = {"id_number": ALICE, "name": "张三", column: value}
    with pytest.raises(AdapterError) as caught:
        row_to_record(category, row, 1)
    message = str(caught.value)
    assert repr(column) in message
    assert category_label(category) in message
    for secret in (str(value), ALICE, "张三"):
        assert secret not in message


def test_unknown_column_names_the_column_and_the_category() -> None:
    with pytest.raises(AdapterError, match=r"'balance_yuan' is not a field of deposits \(存款\)"):
        row_to_record(DEPOSITS, {"balance_yuan": 5}, 1)


def test_a_data_cell_read_as_a_column_name_is_not_shown() -> None:
    with pytest.raises(AdapterError) as caught:
        check_columns(DEPOSITS, [ALICE, "张三", "12345"], where="deposits.csv header")
    assert ALICE not in str(caught.value)
    assert "header row missing" in str(caught.value)


@pytest.mark.parametrize(
    ("columns", "problem"),
    [
        (["id_number", "institution"], "required column name is missing"),
        (["id_number", "name", "product", "product"], "'product' appears twice"),
        (["name", "balance_fen"], "required column id_number is missing"),
    ],
)
def test_check_columns(columns: list[str], problem: str) -> None:
    with pytest.raises(AdapterError, match=problem):
        check_columns(DEPOSITS, columns, where="somewhere")


def test_required_columns() -> None:
    assert required_columns == {"id_number", "name"}
    check_columns(DEPOSITS, ["name", "id_number"], where="only the person")


def test_unknown_category_is_an_adapter_error() -> None:
    with pytest.raises(AdapterError, match="unknown data category 999"):
        row_to_record(999, {}, 1)


@given(
    balance=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    institution=st.text(),
    as_of=st.dates() | st.none(),
)
def test_deposit_rows_round_trip(balance: int, institution: str, as_of: date | None) -> None:
    row: dict[str, object] = {
        "institution": institution,
        "account_suffix": "",
        "product": "",
        "balance_fen": balance,
        "as_of": as_of,
    }
    assert record_to_row(row_to_record(DEPOSITS, row, 1)) == row


# --- SQL -------------------------------------------------------------------------------------------------------

metadata = MetaData()
deposit_accounts = Table(
    "deposit_accounts",
    metadata,
    Column("cert_no", String(18), index=True),
    Column("holder", String(50)),
    Column("bank", String(50)),
    Column("acct", String(4)),
    Column("kind", String(10)),
    Column("balance_fen", BigInteger),
    Column("as_of", Date),
)
real_estate = Table(
    "real_estate",
    metadata,
    Column("id_number", String(18)),
    Column("name", String(50)),
    Column("certificate_no", String(60)),
    Column("location", String(200)),
    Column("area_centi_m2", BigInteger),
    Column("use", String(10)),
    Column("co_owner_count", Integer),
    Column("registered_on", Date),
)
vehicles = Table(
    "vehicles",
    metadata,
    Column("id_number", String(18)),
    Column("name", String(50)),
    Column("plate", String(10)),
    Column("model", String(50)),
    Column("first_registration", Date),
)
tax_payments = Table(
    "tax_payments",
    metadata,
    Column("id_number", String(18)),
    Column("name", String(50)),
    Column("period_start", Date),
    Column("period_end", Date),
    Column("tax_type", String(30)),
    Column("taxable_income_fen", BigInteger),
    Column("tax_paid_fen", BigInteger),
    Column("self_employed", Boolean),
)

QUERIES: Mapping[int, str] = {
    DEPOSITS: """
        SELECT cert_no AS id_number, holder AS name, bank AS institution, acct AS account_suffix,
               kind AS product, balance_fen, as_of
          FROM deposit_accounts
         WHERE cert_no IN :id_numbers
         ORDER BY cert_no, acct""",
    REAL_ESTATE: """
        SELECT id_number, name, certificate_no, location, area_centi_m2, use, co_owner_count, registered_on
          FROM real_estate
         WHERE id_number IN :id_numbers AND registered_on <= :as_of
         ORDER BY certificate_no""",
    VEHICLES: """
        SELECT id_number, name, plate, model, first_registration
          FROM vehicles WHERE id_number IN :id_numbers ORDER BY plate""",
    TAX: """
        SELECT id_number, name, period_start AS period_from, period_end AS period_to, tax_type,
               taxable_income_fen, tax_paid_fen, self_employed
          FROM tax_payments
         WHERE id_number IN :id_numbers AND period_end >= :income_from AND period_start <= :income_to
         ORDER BY period_start""",
}


def fill(engine: Engine) -> None:
    metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(
            insert(deposit_accounts),
            [
                {"cert_no": ALICE, "holder": "张三", "bank": "吉林银行", "acct": "0042", "kind": "活期",
                 "balance_fen": 1_234_567, "as_of": date(2025, 6, 30)},
                {"cert_no": ALICE, "holder": "张三", "bank": "中国银行", "acct": "7788", "kind": "定期",
                 "balance_fen": 50_000_000, "as_of": date(2025, 6, 30)},
                *({"cert_no": n, "holder": "某人", "bank": "吉林银行", "acct": "0001", "kind": "活期",
                   "balance_fen": i, "as_of": date(2025, 6, 30)} for i, n in enumerate(BULK)),
            ],
        )  # fmt: skip
        connection.execute(
            insert(real_estate),
            [
                {"id_number": ALICE, "name": "张三", "certificate_no": "吉(2019)长春市不动产权第0012345号",
                 "location": "吉林省长春市南关区人民大街1号", "area_centi_m2": 8735, "use": "住宅",
                 "co_owner_count": 1, "registered_on": date(2019, 5, 6)},
                # Registered after the assets date: the query's :as_of leaves it out.
                {"id_number": ALICE, "name": "张三", "certificate_no": "吉(2025)长春市不动产权第0099999号",
                 "location": "吉林省长春市朝阳区西安大路2号", "area_centi_m2": 6000, "use": "住宅",
                 "co_owner_count": 0, "registered_on": date(2025, 8, 1)},
                {"id_number": BOB, "name": "李四", "certificate_no": "吉(2020)长春市不动产权第0054321号",
                 "location": "吉林省长春市朝阳区西安大路3号", "area_centi_m2": 12000, "use": "商业",
                 "co_owner_count": 0, "registered_on": date(2020, 1, 2)},
            ],
        )  # fmt: skip
        connection.execute(
            insert(vehicles),
            [{"id_number": BOB, "name": "李四", "plate": "吉A12345", "model": "一汽红旗H5",
              "first_registration": date(2021, 9, 9)}],
        )  # fmt: skip
        connection.execute(
            insert(tax_payments),
            [
                {"id_number": ALICE, "name": "张三", "period_start": date(2025, 1, 1), "period_end": date(2025, 3, 1),
                 "tax_type": "个人所得税", "taxable_income_fen": 3_000_000, "tax_paid_fen": 45_000,
                 "self_employed": False},
                # Outside the income period (2025-01 to 2025-06).
                {"id_number": ALICE, "name": "张三", "period_start": date(2024, 1, 1), "period_end": date(2024, 6, 1),
                 "tax_type": "个人所得税", "taxable_income_fen": 1, "tax_paid_fen": 1, "self_employed": False},
            ],
        )  # fmt: skip


def sqlite_unit(path: Path) -> str:
    """Create and fill a SQLite unit database at ``path``; returns its URL."""
    url = f"sqlite:///{path}"
    engine = create_engine(url)
    fill(engine)
    engine.dispose()
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a unit database holding deposits, real estate, vehicles and tax: a SQLite file or a PostgreSQL
    schema of its own."""
    if request.param == "sqlite":
        yield sqlite_unit(tmp_path / "unit.db")
        return
    with postgres_schema() as url:
        engine = create_engine(url)
        fill(engine)
        engine.dispose()
        yield url


@pytest.fixture
def adapter(database: str) -> Iterator[SqlAdapter]:
    sql = SqlAdapter(database, QUERIES)
    yield sql
    sql.close()


def expected_alice() -> list[Finding]:
    def record(**body: Any) -> r.Record:
        return r.Record(produced_at_ms=PRODUCED_MS, **body)

    return [
        Finding("张三", record(category=DEPOSITS, deposit=r.Deposit(
            institution="吉林银行", account_suffix="0042", product="活期", balance_fen=1_234_567,
            as_of=pb_date(2025, 6, 30)))),
        Finding("张三", record(category=DEPOSITS, deposit=r.Deposit(
            institution="中国银行", account_suffix="7788", product="定期", balance_fen=50_000_000,
            as_of=pb_date(2025, 6, 30)))),
        Finding("张三", record(category=REAL_ESTATE, real_estate=r.RealEstate(
            certificate_no="吉(2019)长春市不动产权第0012345号", location="吉林省长春市南关区人民大街1号",
            area_centi_m2=8735, use="住宅", co_owner_count=1, registered_on=pb_date(2019, 5, 6)))),
        Finding("张三", record(category=TAX, tax=r.TaxRecord(
            period_from=r.YearMonth(year=2025, month=1), period_to=r.YearMonth(year=2025, month=3),
            tax_type="个人所得税", taxable_income_fen=3_000_000, tax_paid_fen=45_000))),
    ]  # fmt: skip


def test_sql_finds_rows_and_leaves_unknown_ids_out(adapter: SqlAdapter) -> None:
    found = adapter.fetch([ALICE, BOB, NOBODY], CONTEXT)

    assert set(found) == {ALICE, BOB}
    assert found[ALICE] == expected_alice()
    assert [f.record.WhichOneof("body") for f in found[BOB]] == ["real_estate", "vehicle"]
    assert found[BOB][1].record.vehicle == r.Vehicle(
        plate="吉A12345", model="一汽红旗H5", first_registration=pb_date(2021, 9, 9)
    )
    assert {f.name for f in found[BOB]} == {"李四"}


def test_sql_asks_only_the_requested_categories(adapter: SqlAdapter) -> None:
    found = adapter.fetch([ALICE, BOB], ctx(VEHICLES))
    assert list(found) == [BOB]
    assert adapter.categories == tuple(QUERIES)


def test_sql_keys_results_by_the_id_numbers_as_given(adapter: SqlAdapter) -> None:
    given = f" {ALICE.lower()} "
    assert list(adapter.fetch([given], ctx(DEPOSITS))) == [given]
    assert adapter.fetch([], CONTEXT) == {}


def test_sql_chunks_large_id_lists(database: str) -> None:
    statements: list[int] = []

    def count(conn: Any, cursor: Any, statement: str, parameters: Sequence[Any], context: Any, many: bool) -> None:
        if "deposit_accounts" in statement:
            statements.append(len(parameters))

    sql = SqlAdapter(database, {DEPOSITS: QUERIES[DEPOSITS]}, chunk_size=500)
    event.listen(Engine, "before_cursor_execute", count)
    try:
        found = sql.fetch([*BULK, NOBODY], ctx(DEPOSITS))
    finally:
        event.remove(Engine, "before_cursor_execute", count)
        sql.close()

    assert statements == [500, 500, 251]
    assert len(found) == len(BULK)
    assert [found[n][0].record.deposit.balance_fen for n in BULK] == list(range(len(BULK)))


def test_sql_injection_in_an_id_value_is_harmless(adapter: SqlAdapter, database: str) -> None:
    attacks = ["' OR '1'='1", f"{ALICE}' OR 1=1 --", "x'); DROP TABLE deposit_accounts; --", "%"]
    assert adapter.fetch(attacks, CONTEXT) == {}
    engine = create_engine(database)
    assert "deposit_accounts" in inspect(engine).get_table_names()
    engine.dispose()
    assert len(adapter.fetch([ALICE], ctx(DEPOSITS))[ALICE]) == 2


@pytest.mark.parametrize(
    ("query", "problem"),
    [
        ("SELECT cert_no AS id_number, holder AS name, balance_fen AS balance_yuan FROM deposit_accounts "
         "WHERE cert_no IN :id_numbers", r"'balance_yuan' is not a field of deposits"),
        ("SELECT cert_no AS id_number, balance_fen FROM deposit_accounts WHERE cert_no IN :id_numbers",
         "required column name is missing"),
        ("SELECT cert_no AS id_number, holder AS name FROM deposit_accounts", "must select the people by"),
        ("SELECT cert_no AS id_number, holder AS name FROM deposit_accounts WHERE cert_no IN :id_numbers "
         "AND bank = :bank", r"unknown parameter\(s\) :bank"),
        ("SELECT cert_no AS id_number, holder AS name FROM no_such_table WHERE cert_no IN :id_numbers",
         "query for deposits .* fails on the database: .*no_such_table"),
        ("SELEC id_number FROM deposit_accounts WHERE cert_no IN :id_numbers", "fails on the database"),
        # Refused by the read-only session before its missing rows could tell.
        ("DELETE FROM deposit_accounts WHERE cert_no IN :id_numbers", r"(?i)read-?only"),
    ],
)  # fmt: skip
def test_sql_bad_queries_are_refused_at_construction(database: str, query: str, problem: str) -> None:
    with pytest.raises(AdapterError, match=problem):
        SqlAdapter(database, {REAL_ESTATE: QUERIES[REAL_ESTATE], DEPOSITS: query})


def test_sql_a_query_that_ignores_the_id_list_is_caught(database: str) -> None:
    leaky = "SELECT id_number, name FROM vehicles WHERE id_number IN :id_numbers OR 1 = 1"
    sql = SqlAdapter(database, {VEHICLES: leaky})
    try:
        with pytest.raises(AdapterError, match="not asked for") as caught:
            sql.fetch([ALICE], ctx(VEHICLES))
        assert BOB not in str(caught.value)
    finally:
        sql.close()


def test_sql_category_without_a_query_is_an_error(database: str) -> None:
    sql = SqlAdapter(database, {VEHICLES: QUERIES[VEHICLES]})
    try:
        with pytest.raises(AdapterError, match="no query is configured for deposits"):
            sql.fetch([ALICE], ctx(VEHICLES, DEPOSITS))
    finally:
        sql.close()


def test_sql_failure_while_answering_is_an_adapter_error_without_personal_data(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'unit.db'}"
    engine = create_engine(url)
    fill(engine)
    sql = SqlAdapter(url, QUERIES)
    try:
        vehicles.drop(engine)
        with pytest.raises(AdapterError, match="failed answering vehicles") as caught:
            sql.fetch([ALICE, BOB], CONTEXT)
        assert ALICE not in str(caught.value) and BOB not in str(caught.value)
        assert caught.value.__cause__ is None and caught.value.__suppress_context__
    finally:
        sql.close()
        engine.dispose()


def test_sql_sessions_are_read_only(database: str) -> None:
    sql = SqlAdapter(database, QUERIES)
    try:
        # The adapter's own connections (the ones its queries run on) refuse to write.
        with sql._engine.connect() as connection, pytest.raises(DBAPIError, match=r"(?i)read.?only|query_only"):
            connection.execute(text("DELETE FROM vehicles"))
        assert sql.fetch([BOB], ctx(VEHICLES))[BOB]
    finally:
        sql.close()


@pytest.fixture
def postgres_unit() -> Iterator[tuple[str, Engine]]:
    """A filled unit database on PostgreSQL alone: its URL, and an engine of the schema's owner."""
    with postgres_schema() as url:
        engine = create_engine(url)
        fill(engine)
        try:
            yield url, engine
        finally:
            engine.dispose()


@pytest.mark.postgres
def test_sql_a_query_that_writes_is_refused_and_writes_nothing(postgres_unit: tuple[str, Engine]) -> None:
    url, engine = postgres_unit
    writing = QUERIES[VEHICLES].replace("SELECT", "WITH gone AS (DELETE FROM vehicles RETURNING 1) SELECT", 1)
    with pytest.raises(AdapterError, match="read-only transaction"):
        SqlAdapter(url, {VEHICLES: writing})
    with engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(vehicles)).scalar_one() == 1


@pytest.mark.postgres
def test_sql_statements_are_cut_off_and_sessions_are_named(postgres_unit: tuple[str, Engine]) -> None:
    url, _ = postgres_unit
    slow = QUERIES[VEHICLES].replace("FROM vehicles", "FROM vehicles, (SELECT pg_sleep(3)) AS pause", 1)
    sql = SqlAdapter(url, {VEHICLES: slow}, statement_timeout_seconds=1)
    try:
        with pytest.raises(AdapterError, match="QueryCanceled"):
            sql.fetch([BOB], ctx(VEHICLES))
        with sql._engine.connect() as connection:
            names = connection.execute(
                text("SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()")
            ).scalar_one()
        assert names == "hedui-connector"
    finally:
        sql.close()


@pytest.mark.postgres
def test_sql_lost_login_while_answering_says_why(postgres_unit: tuple[str, Engine]) -> None:
    """The account is locked after start-up (a password change, a disabled login): the error names the
    database's reason, as at start-up, because no subject is bound when connecting fails."""
    url, admin = postgres_unit
    role = f"hedui_test_ro_{uuid.uuid4().hex[:8]}"
    with admin.begin() as connection:
        connection.execute(text(f'CREATE ROLE "{role}" LOGIN'))
        schema = str(make_url(url).query["options"]).removeprefix("-csearch_path=")
        connection.execute(text(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"'))
        connection.execute(text(f'GRANT SELECT ON vehicles TO "{role}"'))
    sql = SqlAdapter(
        make_url(url).set(username=role).render_as_string(hide_password=False), {VEHICLES: QUERIES[VEHICLES]}
    )
    try:
        assert sql.fetch([BOB], ctx(VEHICLES))[BOB]
        with admin.begin() as connection:
            connection.execute(text(f'ALTER ROLE "{role}" NOLOGIN'))
            connection.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = :role"), {"role": role}
            )
        with pytest.raises(AdapterError, match="not permitted to log in") as caught:
            sql.fetch([BOB], ctx(VEHICLES))
        assert BOB not in str(caught.value)
    finally:
        sql.close()
        with admin.begin() as connection:
            connection.execute(text(f'DROP OWNED BY "{role}"'))
            connection.execute(text(f'DROP ROLE "{role}"'))


@pytest.mark.parametrize(
    ("dialect", "version", "expected"),
    [
        ("mysql", "8.0.36", "SET SESSION max_execution_time = 30000"),
        ("mysql", "10.11.6-MariaDB-0+deb12u1", "SET SESSION max_statement_time = 30"),
        ("mariadb", "10.11.6-MariaDB", "SET SESSION max_statement_time = 30"),
        ("postgresql", "15.19", "SET statement_timeout = 30000"),
    ],
)
def test_sql_statement_timeout_uses_the_servers_own_setting(dialect: str, version: str, expected: str) -> None:
    # A mysql+pymysql:// URL may reach MariaDB: the setting is chosen by what the server says it is.
    settings = session_settings(server_flavour(dialect, version), 30)
    assert expected in settings
    assert any("READ ONLY" in statement for statement in settings)


def test_sql_database_down_at_start_is_waited_for_by_a_service(tmp_path: Path) -> None:
    """A service starts while the unit's database is down: it is told why, every answer fails with the reason
    until the database is back, then the deferred startup check runs and answers flow."""
    url = f"sqlite:///{tmp_path / 'later' / 'unit.db'}"
    sql = SqlAdapter(url, {VEHICLES: QUERIES[VEHICLES]}, require_database=False)
    try:
        assert sql.unreachable is not None and "cannot connect" in sql.unreachable
        with pytest.raises(AdapterError, match="cannot connect"):
            sql.fetch([BOB], ctx(VEHICLES))
        (tmp_path / "later").mkdir()
        sqlite_unit(tmp_path / "later" / "unit.db")
        assert [f.record.vehicle.plate for f in sql.fetch([BOB], ctx(VEHICLES))[BOB]] == ["吉A12345"]
        assert sql.unreachable is None
    finally:
        sql.close()


def test_sql_database_that_answers_but_refuses_a_query_is_an_error_even_for_a_service(tmp_path: Path) -> None:
    url = sqlite_unit(tmp_path / "unit.db")
    broken = QUERIES[VEHICLES].replace("FROM vehicles", "FROM no_such_table")
    with pytest.raises(AdapterError, match="fails on the database"):
        SqlAdapter(url, {VEHICLES: broken}, require_database=False)


def test_sql_refused_postgresql_connection_fails_at_construction() -> None:
    # Port 9 (discard) has no PostgreSQL on any test machine; without the driver this is the driver error.
    with pytest.raises(AdapterError, match=r"cannot connect|driver is not installed"):
        SqlAdapter("postgresql+psycopg://postgres@127.0.0.1:9/test", {DEPOSITS: QUERIES[DEPOSITS]})


def test_sql_bad_url_does_not_repeat_it() -> None:
    with pytest.raises(AdapterError) as caught:
        SqlAdapter("not a url, password hunter2", {DEPOSITS: QUERIES[DEPOSITS]})
    assert "hunter2" not in str(caught.value)


def test_sql_needs_queries_of_known_categories() -> None:
    with pytest.raises(AdapterError, match="at least one query"):
        SqlAdapter("sqlite://", {})
    with pytest.raises(AdapterError, match="unknown data category 0"):
        SqlAdapter("sqlite://", {0: "SELECT 1 AS id_number, 2 AS name WHERE 1 IN :id_numbers"})


# --- CSV -------------------------------------------------------------------------------------------------------


def write_csv(path: Path, rows: list[list[str]], encoding: str = "utf-8") -> None:
    with path.open("w", encoding=encoding, newline="") as handle:
        csv.writer(handle).writerows(rows)


DEPOSIT_ROWS = [
    ["name", "id_number", "balance_fen", "institution", "as_of", "account_suffix"],
    ["张三", ALICE, "1234567", "吉林银行", "2025-06-30", "0042"],
    [],
    ["李四", BOB.lower(), "0", "中国银行", "", "0001"],
    ["张三", ALICE, "50000000", "中国银行", "2025-06-30", "7788"],
]


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig"], ids=["plain", "bom"])
def test_csv_happy_path(tmp_path: Path, encoding: str) -> None:
    write_csv(tmp_path / "deposits.csv", DEPOSIT_ROWS, encoding)
    write_csv(
        tmp_path / "vehicles.csv",
        [["id_number", "name", "plate", "first_registration"], [BOB, "李四", "吉B54321", "2018-04-01"]],
        encoding,
    )
    adapter = CsvAdapter(tmp_path, {DEPOSITS: "deposits.csv", VEHICLES: "vehicles.csv"})

    found = adapter.fetch([ALICE, BOB, NOBODY], ctx(DEPOSITS, VEHICLES))

    assert set(found) == {ALICE, BOB}
    assert [f.record.deposit.balance_fen for f in found[ALICE]] == [1_234_567, 50_000_000]
    assert found[ALICE][0].record == r.Record(
        category=DEPOSITS,
        produced_at_ms=PRODUCED_MS,
        deposit=r.Deposit(institution="吉林银行", account_suffix="0042", balance_fen=1_234_567,
                          as_of=pb_date(2025, 6, 30)),
    )  # fmt: skip
    assert [f.record.WhichOneof("body") for f in found[BOB]] == ["deposit", "vehicle"]
    assert not found[BOB][0].record.deposit.HasField("as_of")
    assert found[BOB][1].record.vehicle.plate == "吉B54321"
    assert found[BOB][1].name == "李四"
    assert adapter.categories == (DEPOSITS, VEHICLES)
    adapter.close()


def test_csv_file_without_a_field_loads_with_a_warning_naming_it(tmp_path: Path) -> None:
    write_csv(
        tmp_path / "vehicles.csv",
        [["id_number", "name", "plate", "first_registration"], [BOB, "李四", "吉B54321", "2018-04-01"]],
    )
    adapter = CsvAdapter(tmp_path, {VEHICLES: "vehicles.csv"})
    missing = [c for c in field_columns(VEHICLES) if c not in {"plate", "first_registration"}]
    assert missing
    (warning,) = adapter.warnings
    assert warning.startswith(f"'vehicles.csv' header does not return {', '.join(missing)}:")
    assert BOB not in warning and "李四" not in warning
    adapter.close()


def test_csv_records_are_fresh_copies_stamped_per_query(tmp_path: Path) -> None:
    write_csv(tmp_path / "deposits.csv", DEPOSIT_ROWS)
    adapter = CsvAdapter(str(tmp_path), {DEPOSITS: "deposits.csv"})
    first = adapter.fetch([ALICE], ctx(DEPOSITS))[ALICE][0].record
    first.deposit.balance_fen = 1
    later = LookupContext((DEPOSITS,), (2025, 1), (2025, 6), date(2025, 6, 30), PRODUCED_MS + 1)
    second = adapter.fetch([ALICE], later)[ALICE][0].record
    assert (second.deposit.balance_fen, second.produced_at_ms) == (1_234_567, PRODUCED_MS + 1)


@pytest.mark.parametrize(
    ("rows", "problem"),
    [
        ([["id_number", "name", "balance_yuan"]], r"'deposits.csv' header: 'balance_yuan' is not a field of deposits"),
        ([["id_number", "balance_fen"]], "required column name is missing"),
        ([[ALICE, "张三", "1234567"]], "header row missing"),
        ([], "is empty"),
        ([["id_number", "name", "balance_fen"], [ALICE, "张三", "12.34"]], "line 2: deposits .* 'balance_fen'"),
        ([["id_number", "name", "balance_fen"], [ALICE, "张三"]], "line 2: 2 cells where the header has 3"),
        ([["id_number", "name"], ["", "张三"]], "line 2: .*'id_number' must be non-empty"),
    ],
)
def test_csv_bad_files_are_refused_at_construction(tmp_path: Path, rows: list[list[str]], problem: str) -> None:
    write_csv(tmp_path / "deposits.csv", rows)
    with pytest.raises(AdapterError, match=problem) as caught:
        CsvAdapter(tmp_path, {DEPOSITS: "deposits.csv"})
    assert ALICE not in str(caught.value) and "张三" not in str(caught.value) and "12.34" not in str(caught.value)


def test_csv_not_utf8_is_refused(tmp_path: Path) -> None:
    write_csv(tmp_path / "deposits.csv", [["id_number", "name"], [ALICE, "张三"]], encoding="gbk")
    with pytest.raises(AdapterError, match="not UTF-8"):
        CsvAdapter(tmp_path, {DEPOSITS: "deposits.csv"})


@pytest.mark.parametrize(
    ("name", "problem"),
    [("missing.csv", "does not exist"), ("../deposits.csv", "inside the adapter directory"), ("/etc/passwd", "inside")],
)
def test_csv_file_names_stay_inside_the_directory(tmp_path: Path, name: str, problem: str) -> None:
    (tmp_path / "unit").mkdir()
    write_csv(tmp_path / "deposits.csv", DEPOSIT_ROWS)
    with pytest.raises(AdapterError, match=problem):
        CsvAdapter(tmp_path / "unit", {DEPOSITS: name})


def test_csv_unknown_category_is_refused(tmp_path: Path) -> None:
    write_csv(tmp_path / "deposits.csv", DEPOSIT_ROWS)
    with pytest.raises(AdapterError, match="unknown data category 99"):
        CsvAdapter(tmp_path, {99: "deposits.csv"})


def test_csv_category_without_a_file_is_an_error(tmp_path: Path) -> None:
    write_csv(tmp_path / "deposits.csv", DEPOSIT_ROWS)
    adapter = CsvAdapter(tmp_path, {DEPOSITS: "deposits.csv"})
    with pytest.raises(AdapterError, match="no file is configured for vehicles"):
        adapter.fetch([ALICE], ctx(DEPOSITS, VEHICLES))
