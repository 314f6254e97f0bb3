"""Answering from CSV exports: one file per data category, read and indexed by ID number at startup.

Files are UTF-8 (a byte-order mark, as spreadsheet programs write it, is accepted) with a header row of column names:
``id_number``, ``name`` and the fields of the category's record (connectors/adapters/rows.py). Every row is checked
when the adapter is built, so a bad export fails at startup with its file and line, never at the first batch. Units
export modest files (one region's registrations, accounts or payments); they are held in memory.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from hedui.v1 import records_pb2

from connectors.adapters.base import AdapterError, Finding, LookupContext
from connectors.adapters.rows import category_label, check_columns, fields_warning, person_of, row_to_record

#: For one category: ID number -> (name, record without its production time) per row, in file order.
_Index = dict[str, list[tuple[str, records_pb2.Record]]]


def _load(directory: Path, category: int, file_name: str) -> tuple[_Index, list[str]]:
    """The file's rows by ID number, and its header."""
    label = category_label(category)
    relative = Path(file_name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise AdapterError(f"the file for {label} must be a file name inside the adapter directory")
    shown = repr(file_name)
    try:
        handle = (directory / relative).open(encoding="utf-8-sig", newline="")
    except FileNotFoundError:
        raise AdapterError(f"the file {shown} for {label} does not exist in the adapter directory") from None
    except OSError as exc:
        raise AdapterError(f"cannot read the file {shown} for {label}: {exc.strerror}") from None
    index: _Index = {}
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
            if header is None:
                raise AdapterError(f"{shown} is empty: a header row of column names is expected")
            header = [column.strip() for column in header]
            check_columns(category, header, where=f"{shown} header")
            for cells in reader:
                if not cells:
                    continue  # a blank line
                where = f"{shown} line {reader.line_num}"
                if len(cells) != len(header):
                    raise AdapterError(f"{where}: {len(cells)} cells where the header has {len(header)} columns")
                row = dict(zip(header, cells, strict=True))
                try:
                    id_number, name = person_of(category, row)
                    record = row_to_record(category, row, 0)
                except AdapterError as exc:
                    raise AdapterError(f"{where}: {exc}") from None
                index.setdefault(id_number, []).append((name, record))
        except UnicodeDecodeError:
            raise AdapterError(f"{shown} is not UTF-8 text (after line {reader.line_num})") from None
        except csv.Error:
            raise AdapterError(f"{shown} line {reader.line_num} is not well-formed CSV") from None
    return index, header


class CsvAdapter:
    """Findings from CSV files in one directory."""

    def __init__(self, directory: str | os.PathLike[str], files: Mapping[int, str]) -> None:
        """``files`` maps data categories to file names inside ``directory``. Raises AdapterError naming the file
        (and line) when a file is missing, unreadable, or has a bad header or value."""
        if not files:
            raise AdapterError("the csv adapter needs at least one file")
        base = Path(directory)
        loaded = {category: _load(base, category, name) for category, name in files.items()}
        self._index = {category: index for category, (index, _) in loaded.items()}
        #: What loading found doubtful but not wrong; check-config prints it.
        self.warnings = [
            warning
            for category, (_, header) in loaded.items()
            if (warning := fields_warning(category, header, where=f"{files[category]!r} header"))
        ]

    @property
    def categories(self) -> tuple[int, ...]:
        """The data categories this adapter has a file for."""
        return tuple(self._index)

    def fetch(self, id_numbers: Sequence[str], context: LookupContext) -> dict[str, list[Finding]]:
        """Findings per ID number, by category in the context's order and then in file order. ID numbers are
        compared without surrounding spaces and with an upper-case X; results are keyed by the numbers as given."""
        missing = [c for c in context.categories if c not in self._index]
        if missing:
            raise AdapterError(f"no file is configured for {', '.join(category_label(c) for c in missing)}")
        found: dict[str, list[Finding]] = {}
        for given in dict.fromkeys(id_numbers):
            key = given.strip().upper()
            for category in context.categories:
                for name, stored in self._index[category].get(key, ()):
                    record = records_pb2.Record()
                    record.CopyFrom(stored)
                    record.produced_at_ms = context.produced_at_ms
                    found.setdefault(given, []).append(Finding(name, record))
        return found

    def close(self) -> None:
        """Drop the loaded rows."""
        self._index = {}
