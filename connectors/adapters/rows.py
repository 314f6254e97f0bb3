"""One converter from a flat row (column -> value, as SQL or CSV deliver it) to a typed Record, for every category.

A row carries ``id_number`` and ``name`` (the name the unit holds for that ID number) and then columns named exactly
like the fields of the category's message in records.proto: a deposits row has institution, account_suffix,
product, balance_fen and as_of. The proto descriptors drive the conversion, so a field added to the contract is a
column every adapter accepts without code here.

Values are taken as SQL drivers and CSV readers deliver them:

- text fields: text only (numbers are refused: an account suffix "0042" stored as a number has lost its zeros);
- integer fields: int, or integer text; money is integer fen, so a float or decimal with a fraction is refused;
- bool fields: true/false, 1/0, 是/否 (case-insensitive);
- enum fields: the name with or without its prefix (``LEGAL_REPRESENTATIVE``) or the number;
- Date fields: datetime.date (a datetime gives its date) or ISO ``YYYY-MM-DD`` text;
- YearMonth fields: ``YYYY-MM`` text, or a date as above (its day is ignored: SQLite has no date type and many
  units keep months as the first day of the month).

A missing column, NULL, or an empty cell of a non-text column leaves the proto default. A column the category does not
have is an error naming the column and the category. Errors never contain values: rows are personal data.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from datetime import date, datetime
from decimal import Decimal
from functools import cache
from typing import Any

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message
from hedui.v1 import records_pb2

from common.categories import RECORD_FIELD, data_category_label
from common.dates import from_pb
from connectors.adapters.base import AdapterError, Finding, LookupContext

#: A flat row: column name -> value. Keys are typed loosely to take SQLAlchemy's RowMapping as it is.
Row = Mapping[Any, object]

#: Every row names the person: the ID number looked up and the name the unit holds for it.
required_columns: frozenset[str] = frozenset({"id_number", "name"})

_INTEGER = re.compile(r"[+-]?[0-9]+", re.ASCII)
_DATE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})", re.ASCII)
_YEAR_MONTH = re.compile(r"([0-9]{4})-([0-9]{2})", re.ASCII)
#: Column names shown in errors. Anything else may be a data cell read as a header (a CSV without a header row).
_SHOWABLE_COLUMN = re.compile(r"[A-Za-z_][A-Za-z0-9_ ]{0,63}", re.ASCII)
_TRUE = frozenset({"true", "1", "是"})
_FALSE = frozenset({"false", "0", "否"})
_INT_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}

#: Sets one field on the category's message from a raw value; raises _BadValue saying what it expected.
_Setter = Callable[[Message, object], None]


class _BadValue(Exception):
    """A value a column cannot take. Carries what was expected and the value's type, never the value."""

    def __init__(self, expected: str, value: object) -> None:
        super().__init__(f"expects {expected}, got {_kind(value)}")


def _kind(value: object) -> str:
    return "text" if isinstance(value, str) else type(value).__name__


def category_label(category: int) -> str:
    """'deposits (存款)': how errors name a data category. Raises AdapterError for a category without records."""
    if category not in RECORD_FIELD:
        raise AdapterError(f"unknown data category {category}")
    return data_category_label(category)


def column_label(column: object, position: int | None = None) -> str:
    """A column as errors show it: its name if it looks like one, else only its position (the "name" may be a data
    cell of a file without a header row, and data never goes into a message)."""
    if isinstance(column, str) and _SHOWABLE_COLUMN.fullmatch(column):
        return repr(column)
    where = f" {position + 1}" if position is not None else ""
    return f"column{where} (name not shown: not an identifier — is the header row missing?)"


def _blank(value: object) -> bool:
    """NULL, or an empty cell of a non-text column (CSV has no NULL)."""
    return value is None or (isinstance(value, str) and not value.strip())


def _to_int(value: object, low: int, high: int) -> int:
    if isinstance(value, bool):
        raise _BadValue("an integer", value)
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        number = int(value.strip())
    elif (isinstance(value, float) and value.is_integer()) or (
        isinstance(value, Decimal) and value.is_finite() and value == value.to_integral_value()
    ):
        number = int(value)
    else:
        raise _BadValue("an integer (money is integer fen; fractions are refused)", value)
    if not low <= number <= high:
        raise _BadValue(f"an integer between {low} and {high}", value)
    return number


def _to_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return value == 1
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise _BadValue("true/false, 1/0 or 是/否", value)


def _to_date(value: object) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, str) and (match := _DATE.fullmatch(value.strip())):
        try:
            return date(int(match[1]), int(match[2]), int(match[3]))
        except ValueError:
            pass
    raise _BadValue("a date (YYYY-MM-DD)", value)


def _to_year_month(value: object) -> tuple[int, int]:
    if isinstance(value, str) and (match := _YEAR_MONTH.fullmatch(value.strip())):
        if 1 <= int(match[2]) <= 12:
            return int(match[1]), int(match[2])
        raise _BadValue("a year-month (YYYY-MM)", value)
    try:
        day = _to_date(value)
    except _BadValue:
        raise _BadValue("a year-month (YYYY-MM)", value) from None
    return day.year, day.month


def _setter(field: FieldDescriptor) -> _Setter:
    """How one proto field takes its value from a cell."""
    name = field.name
    if field.is_repeated:
        raise NotImplementedError(f"repeated field {field.full_name} has no flat-row form")
    if field.cpp_type == FieldDescriptor.CPPTYPE_STRING and field.type == FieldDescriptor.TYPE_STRING:

        def set_text(body: Message, value: object) -> None:
            if value is None:
                return
            if not isinstance(value, str):
                raise _BadValue("text", value)
            try:
                setattr(body, name, value)
            except ValueError:  # lone surrogates: not encodable as UTF-8
                raise _BadValue("valid Unicode text", value) from None

        return set_text
    if field.cpp_type in _INT_RANGES:
        low, high = _INT_RANGES[field.cpp_type]

        def set_int(body: Message, value: object) -> None:
            if not _blank(value):
                setattr(body, name, _to_int(value, low, high))

        return set_int
    if field.cpp_type == FieldDescriptor.CPPTYPE_BOOL:

        def set_bool(body: Message, value: object) -> None:
            if not _blank(value):
                setattr(body, name, _to_bool(value))

        return set_bool
    if field.enum_type is not None:
        return _enum_setter(name, field.enum_type)
    if field.message_type is not None and field.message_type.full_name == "hedui.v1.Date":

        def set_date(body: Message, value: object) -> None:
            if not _blank(value):
                day = _to_date(value)
                target = getattr(body, name)
                target.year, target.month, target.day = day.year, day.month, day.day

        return set_date
    if field.message_type is not None and field.message_type.full_name == "hedui.v1.YearMonth":

        def set_year_month(body: Message, value: object) -> None:
            if not _blank(value):
                target = getattr(body, name)
                target.year, target.month = _to_year_month(value)

        return set_year_month
    raise NotImplementedError(f"field {field.full_name} has a type rows cannot carry yet")


def _enum_prefix(enum: EnumDescriptor) -> str:
    """The prefix of the value names, e.g. "BUSINESS_ROLE_" (the proto style guide prefixes every value)."""
    return next((v.name for v in enum.values if v.name.endswith("_UNSPECIFIED")), "").removesuffix("UNSPECIFIED")


def _enum_setter(name: str, enum: EnumDescriptor) -> _Setter:
    prefix = _enum_prefix(enum)
    numbers = {v.name: v.number for v in enum.values} | {v.name.removeprefix(prefix): v.number for v in enum.values}
    expected = "one of " + ", ".join(v.name.removeprefix(prefix) for v in enum.values) + " (or its number)"

    def set_enum(body: Message, value: object) -> None:
        if _blank(value):
            return
        if isinstance(value, str) and value.strip().upper() in numbers:
            setattr(body, name, numbers[value.strip().upper()])
            return
        try:
            number = _to_int(value, -(2**31), 2**31 - 1)
        except _BadValue:
            raise _BadValue(expected, value) from None
        if number not in enum.values_by_number:
            raise _BadValue(expected, value)
        setattr(body, name, number)

    return set_enum


def _body(category: int) -> Descriptor:
    category_label(category)  # refuses unknown categories
    message = records_pb2.Record.DESCRIPTOR.fields_by_name[RECORD_FIELD[category]].message_type
    assert message is not None
    return message


@cache
def _setters(category: int) -> dict[str, _Setter]:
    return {field.name: _setter(field) for field in _body(category).fields}


def field_columns(category: int) -> tuple[str, ...]:
    """The columns a row of ``category`` may carry besides id_number and name, in the order of the proto fields."""
    return tuple(_setters(category))


def category_columns(category: int) -> tuple[str, ...]:
    """Every column of ``category``: id_number, name, then the fields (a CSV header in its natural order)."""
    return ("id_number", "name", *field_columns(category))


def unused_fields(category: int, columns: Iterable[object]) -> list[str]:
    """Fields of ``category``'s record that ``columns`` leave out: answered as their empty value (0, false, no
    date) for every person, which a reader of the report cannot tell from a real 0 or "no"."""
    present = set(columns)
    return [column for column in field_columns(category) if column not in present]


def fields_warning(category: int, columns: Iterable[object], *, where: str) -> str | None:
    """The warning check-config prints for :func:`unused_fields`, or None when every field is there."""
    missing = unused_fields(category, columns)
    if not missing:
        return None
    return (
        f"{where} does not return {', '.join(missing)}: for every person these fields will be answered empty "
        "(0, false or no date); return them if the unit holds them"
    )


def check_columns(category: int, columns: Iterable[object], *, where: str) -> None:
    """Refuse a header or result set that lacks id_number or name, repeats a column or has a column the category
    does not have. ``where`` says which query or file this is, for the message."""
    known = _setters(category)
    seen: set[object] = set()
    for position, column in enumerate(columns):
        if column in seen:
            raise AdapterError(f"{where}: {column_label(column, position)} appears twice")
        seen.add(column)
        if column not in known and column not in required_columns:
            raise AdapterError(
                f"{where}: {column_label(column, position)} is not a field of {category_label(category)}; "
                f"columns are {', '.join(category_columns(category))}"
            )
    missing = sorted(required_columns - seen)
    if missing:
        raise AdapterError(f"{where}: the required column {', '.join(missing)} is missing")


def row_to_record(category: int, row: Row, produced_at_ms: int) -> records_pb2.Record:
    """The Record a row describes. id_number and name are not part of it; every other column must be a field."""
    setters = _setters(category)
    record = records_pb2.Record(category=category, produced_at_ms=produced_at_ms)  # type: ignore[arg-type]
    body: Message = getattr(record, RECORD_FIELD[category])
    body.SetInParent()  # a row whose fields are all defaults is still a row the unit holds
    for column, value in row.items():
        setter = setters.get(column)
        if setter is None:
            if column in required_columns:
                continue
            raise AdapterError(f"{column_label(column)} is not a field of {category_label(category)}")
        try:
            setter(body, value)
        except _BadValue as exc:
            raise AdapterError(f"{category_label(category)}: column {column_label(column)} {exc}") from None
    return record


def person_of(category: int, row: Row) -> tuple[str, str]:
    """The ID number (stripped, upper-case X) and the name (stripped) a row is about."""
    id_number, name = row.get("id_number"), row.get("name")
    if not isinstance(id_number, str) or not id_number.strip():
        raise AdapterError(f"{category_label(category)}: column 'id_number' must be non-empty text")
    if name is not None and not isinstance(name, str):
        raise AdapterError(f"{category_label(category)}: column 'name' {_BadValue('text', name)}")
    return id_number.strip().upper(), (name or "").strip()


def finding_from_row(category: int, row: Row, context: LookupContext) -> tuple[str, Finding]:
    """The ID number a row is about and the Finding it makes, stamped with the context's production time."""
    id_number, name = person_of(category, row)
    return id_number, Finding(name, row_to_record(category, row, context.produced_at_ms))


def record_to_row(record: records_pb2.Record) -> dict[str, object]:
    """The inverse of row_to_record for the field columns: text, int and bool as they are, enums by their short
    name, dates as datetime.date, year-months as "YYYY-MM" text; an unset date is None."""
    field = record.WhichOneof("body")
    if field is None:
        raise AdapterError("record has no body")
    body: Message = getattr(record, field)
    message = records_pb2.Record.DESCRIPTOR.fields_by_name[field].message_type
    assert message is not None
    row: dict[str, object] = {}
    for descriptor in message.fields:
        value = getattr(body, descriptor.name)
        if descriptor.enum_type is not None:
            full = descriptor.enum_type.values_by_number[value].name
            row[descriptor.name] = full.removeprefix(_enum_prefix(descriptor.enum_type))
        elif descriptor.message_type is None:
            row[descriptor.name] = value
        elif not body.HasField(descriptor.name):
            row[descriptor.name] = None
        elif descriptor.message_type.full_name == "hedui.v1.YearMonth":
            row[descriptor.name] = f"{value.year:04d}-{value.month:02d}"
        else:
            row[descriptor.name] = from_pb(value)
    return row
