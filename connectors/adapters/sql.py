"""Answering from the unit's own SQL database: one parameterised SELECT per data category.

Each query selects ``id_number``, ``name`` and columns named like the fields of the category's record
(connectors/adapters/rows.py), for the people in ``:id_numbers``. It may also use ``:income_from`` and
``:income_to`` (the first days of the income period's first and last months) and ``:as_of`` (the date assets are
reported for). For example, for deposits::

    SELECT cert_no AS id_number, holder AS name, bank AS institution, substr(acct, -4) AS account_suffix,
           kind AS product, balance_fen, :as_of AS as_of
      FROM deposit_accounts WHERE cert_no IN :id_numbers

Values only ever travel as bound parameters, never as SQL text. Every query is run once at construction with an
empty ID list, so a query that does not parse, misses a column or names an unknown one fails at startup, not at the
first batch.

The adapter protects the unit's database as far as the dialect allows, on every connection it opens: the session is
read-only (PostgreSQL ``default_transaction_read_only``, MySQL/MariaDB ``SESSION TRANSACTION READ ONLY``, SQLite
``PRAGMA query_only``), so a query that would change data fails instead of running; statements are cut off after
``statement_timeout_seconds`` (PostgreSQL ``statement_timeout``, MySQL ``max_execution_time``, MariaDB
``max_statement_time``); and PostgreSQL sees the connections as ``application_name = hedui-connector``. It never
commits. A read-only database account remains the first line: these settings are the second.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import date
from typing import Any

from sqlalchemy import Date, Engine, String, TextClause, bindparam, create_engine, event, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.types import TypeEngine

from connectors.adapters.base import AdapterError, Finding, LookupContext
from connectors.adapters.rows import (
    category_label,
    check_columns,
    field_columns,
    fields_warning,
    finding_from_row,
)

#: The parameters a query may use, with their SQL types. ``id_numbers`` is required and expands to a list.
PARAMETERS: Mapping[str, TypeEngine[Any]] = {
    "id_numbers": String(),
    "income_from": Date(),
    "income_to": Date(),
    "as_of": Date(),
}
#: ID numbers per statement: far below any driver's parameter limit (SQLite's was 999 before 3.32).
DEFAULT_CHUNK_SIZE = 500
#: Any valid dates for the startup check; the empty ID list means no row is read.
_CHECK_PARAMETERS = {
    "id_numbers": [],
    "income_from": date(2000, 1, 1),
    "income_to": date(2000, 1, 1),
    "as_of": date(2000, 1, 1),
}
_MAX_REASON = 300
#: How long one statement may run on the unit's database before it is cancelled.
DEFAULT_STATEMENT_TIMEOUT_SECONDS = 30
#: How the connector's sessions are named where the database shows them (pg_stat_activity).
APPLICATION_NAME = "hedui-connector"


def session_settings(dialect: str, timeout_seconds: int) -> list[str]:
    """Statements that make a new session read-only and bound its statements' time, for ``dialect``."""
    if dialect == "postgresql":
        return [
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
            f"SET statement_timeout = {int(timeout_seconds) * 1000}",
        ]
    if dialect == "mysql":
        return ["SET SESSION TRANSACTION READ ONLY", f"SET SESSION max_execution_time = {int(timeout_seconds) * 1000}"]
    if dialect == "mariadb":
        return ["SET SESSION TRANSACTION READ ONLY", f"SET SESSION max_statement_time = {int(timeout_seconds)}"]
    if dialect == "sqlite":
        return ["PRAGMA query_only = ON"]
    return []


def server_flavour(dialect: str, version: str) -> str:
    """The dialect whose session settings apply: a ``mysql+…`` URL may reach a MariaDB server, which SQLAlchemy
    only learns after connecting, and MariaDB has ``max_statement_time`` where MySQL has ``max_execution_time``."""
    if dialect == "mysql" and "mariadb" in version.lower():
        return "mariadb"
    return dialect


def _guard(engine: Engine, timeout_seconds: int) -> None:
    """Apply :func:`session_settings` to every connection the engine opens, before any query runs on it."""
    dialect = engine.dialect.name

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            flavour = dialect
            if dialect == "mysql":
                cursor.execute("SELECT VERSION()")
                flavour = server_flavour(dialect, str((cursor.fetchone() or ("",))[0]))
            for statement in session_settings(flavour, timeout_seconds):
                cursor.execute(statement)
        finally:
            cursor.close()
        if dialect != "sqlite":
            dbapi_connection.commit()  # the settings are session-wide; end the transaction some drivers opened


def _connect_args(url: str) -> dict[str, Any]:
    if url.startswith(("postgresql", "postgres")):
        return {"application_name": APPLICATION_NAME}
    return {}


def _parameters(clause: TextClause) -> set[str]:
    return set(clause.compile().params)


def _statement(category: int, sql: str) -> TextClause:
    """The query as a statement with typed parameters; refuses unknown parameters and a missing :id_numbers."""
    label = category_label(category)
    clause = text(sql)
    used = _parameters(clause)
    if "id_numbers" not in used:
        raise AdapterError(f"query for {label} must select the people by ':id_numbers' (e.g. id IN :id_numbers)")
    unknown = sorted(used - PARAMETERS.keys())
    if unknown:
        raise AdapterError(
            f"query for {label} uses unknown parameter(s) {', '.join(':' + p for p in unknown)}; "
            f"available: {', '.join(':' + p for p in PARAMETERS)} (a literal colon is written \\:)"
        )
    return clause.bindparams(
        *(
            bindparam(name, type_=kind, expanding=name == "id_numbers")
            for name, kind in PARAMETERS.items()
            if name in used
        )
    )


def _config_reason(exc: SQLAlchemyError) -> str:
    """The database's own explanation, for errors at startup only: no subject is bound and no row is read then,
    so the message holds configuration facts (a missing table, a refused connection), not personal data."""
    reason = str(exc.orig) if isinstance(exc, DBAPIError) else type(exc).__name__
    first = reason.strip().splitlines()[0] if reason.strip() else type(exc).__name__
    return first[:_MAX_REASON]


class _Unreachable(AdapterError):
    """The database did not accept a connection (down, unreachable, login refused)."""


class SqlAdapter:
    """Findings from a SQL database through SQLAlchemy (SQLite, PostgreSQL, or any dialect with its driver)."""

    def __init__(
        self,
        url: str,
        queries: Mapping[int, str],
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        statement_timeout_seconds: int = DEFAULT_STATEMENT_TIMEOUT_SECONDS,
        require_database: bool = True,
    ) -> None:
        """``queries`` maps data categories to their SELECT. Raises AdapterError when the URL cannot be used, the
        database cannot be reached, or a query fails the startup check.

        With ``require_database=False`` (a service starting) an unreachable database is not an error: the check
        runs again before the first answer, and until it passes every fetch fails with its reason, so the
        connector receipts batches and answers them once the database is back. A query the reachable database
        refuses is still an error at once."""
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        if statement_timeout_seconds < 1:
            raise ValueError("statement_timeout_seconds must be positive")
        if not queries:
            raise AdapterError("the sql adapter needs at least one query")
        self._chunk_size = chunk_size
        self._statements = {category: _statement(category, sql) for category, sql in queries.items()}
        #: What the startup check found doubtful but not wrong; check-config prints it.
        self.warnings: list[str] = [
            f"query for {category_label(category)} does not use :income_from and :income_to: it will disclose "
            "every period on record, not only the income period asked for"
            for category, statement in self._statements.items()
            if "period_from" in field_columns(category) and not {"income_from", "income_to"} <= _parameters(statement)
        ]
        try:
            self._engine: Engine = create_engine(
                url, pool_pre_ping=True, hide_parameters=True, connect_args=_connect_args(url)
            )
        except ImportError as exc:
            raise AdapterError(
                f"the database driver is not installed ({exc.name}); install it in this environment"
            ) from None
        except SQLAlchemyError as exc:
            # The message of a bad URL repeats the URL, password included: say only what kind of error it is.
            raise AdapterError(f"the database URL cannot be used ({type(exc).__name__})") from None
        _guard(self._engine, statement_timeout_seconds)
        #: Why the database could not be reached at construction; None once the startup check has passed.
        self.unreachable: str | None = None
        try:
            self._check_queries()
        except _Unreachable as exc:
            if require_database:
                self._engine.dispose()
                raise AdapterError(str(exc)) from None
            self.unreachable = str(exc)
        except BaseException:
            self._engine.dispose()
            raise

    @property
    def categories(self) -> tuple[int, ...]:
        """The data categories this adapter has a query for."""
        return tuple(self._statements)

    def _connect(self) -> Connection:
        """A connection, or AdapterError (_Unreachable) with the database's own reason: nothing is bound yet, so it
        holds configuration facts (a refused login, an unreachable host), not personal data."""
        try:
            return self._engine.connect()
        except SQLAlchemyError as exc:
            backend = self._engine.dialect.name
            raise _Unreachable(f"cannot connect to the unit's {backend} database: {_config_reason(exc)}") from None

    def _check_queries(self) -> None:
        with self._connect() as connection:
            for category, statement in self._statements.items():
                self._check_query(connection, category, statement)

    def _check_query(self, connection: Connection, category: int, statement: TextClause) -> None:
        where = f"query for {category_label(category)}"
        try:
            result = connection.execute(statement, _CHECK_PARAMETERS)
        except SQLAlchemyError as exc:
            raise AdapterError(f"{where} fails on the database: {_config_reason(exc)}") from None
        with result:
            if not result.returns_rows:
                raise AdapterError(f"{where} returns no rows: it must be a SELECT")
            columns = list(result.keys())
            check_columns(category, columns, where=where)
            warning = fields_warning(category, columns, where=where)
            if warning:
                self.warnings.append(warning)

    def fetch(self, id_numbers: Sequence[str], context: LookupContext) -> dict[str, list[Finding]]:
        """Findings per ID number, in the order of the context's categories and the rows the queries return.

        ID numbers are compared without surrounding spaces and with an upper-case X; results are keyed by the ID
        numbers as given. A row for an ID number that was not asked for means a query ignores ``:id_numbers``:
        that is an error, and its data goes nowhere."""
        if self.unreachable is not None:
            self._check_queries()  # AdapterError until the database answers and every query passes
            self.unreachable = None
        missing = [c for c in context.categories if c not in self._statements]
        if missing:
            raise AdapterError(f"no query is configured for {', '.join(category_label(c) for c in missing)}")
        given = {n.strip().upper(): n for n in id_numbers}
        if not given or not context.categories:
            return {}
        wanted = list(given)
        try:
            parameters: dict[str, object] = {
                "income_from": date(*context.income_from, 1),
                "income_to": date(*context.income_to, 1),
                "as_of": context.assets_as_of,
            }
        except ValueError:
            raise AdapterError("the income period is not a valid pair of months") from None
        found: dict[str, list[Finding]] = {}
        category = context.categories[0]
        connection = self._connect()
        try:
            with connection:
                for category in context.categories:
                    for start in range(0, len(wanted), self._chunk_size):
                        parameters["id_numbers"] = wanted[start : start + self._chunk_size]
                        for row in connection.execute(self._statements[category], parameters).mappings():
                            id_number, finding = finding_from_row(category, row, context)
                            if id_number not in given:
                                raise AdapterError(
                                    f"query for {category_label(category)} returned a row for an ID number that was "
                                    "not asked for: it must filter by :id_numbers"
                                )
                            found.setdefault(given[id_number], []).append(finding)
        except SQLAlchemyError as exc:
            # The driver's message may quote values (ID numbers, names): name the error kinds only, and drop the
            # chain so that no traceback carries the statement's parameters into a log.
            kind = type(exc.orig).__name__ if isinstance(exc, DBAPIError) else "no driver error"
            raise AdapterError(
                f"the unit's database failed answering {category_label(category)} "
                f"({type(exc).__name__}: {kind}); check that it is reachable and the query still fits its schema"
            ) from None
        return found

    def close(self) -> None:
        """Close the database connections."""
        self._engine.dispose()
