"""
The requests selfheal's operations make, and the loop that serves them.

Every database operation (resync, check, the healing flow, the facts' check)
is written once as a generator that yields requests and receives their
results. Nothing here knows a driver: each driver shell serves the requests
with its own API (`selfheal._drive` for psycopg, `selfheal.psycopg2`) and
registers its error class, so that a database error raised while serving a
request can be thrown back into the generator, which may clean up (yield more
requests) before it re-raises. SQL is composed with `psycopg.sql`; the shells
render it for their driver.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypeVar

from psycopg import sql

__all__ = [
    "ERRORS",
    "STATEMENT",
    "Batch",
    "Command",
    "FreshQuery",
    "Operation",
    "Query",
    "Request",
    "Statement",
    "adrive",
    "diag_of",
    "drive",
    "libpq_options",
    "register",
    "sqlstate_of",
]

T = TypeVar("T")


@dataclass(frozen=True)
class Query:
    """Run one statement on the connection; the result is its rows (or [])."""

    query: sql.SQL | sql.Composed | str
    #: Parameters for the ``%s`` placeholders of `query`.
    params: Sequence[Any] | dict[str, Any] | None = None


@dataclass(frozen=True)
class Command:
    """Run one statement that returns no rows and takes no parameters (result: []).

    Sent as the driver sends its own BEGIN and COMMIT: unseen by the caller's
    cursors and prepared-statement cache. A shell serves transaction control
    (BEGIN, COMMIT, ROLLBACK) the way its driver keeps track of transactions.
    """

    command: str


@dataclass(frozen=True)
class Batch:
    """Run several statements in one round trip where the driver can; the
    result is a list of Rows."""

    queries: Sequence[Query | Command]


@dataclass(frozen=True)
class FreshQuery:
    """Run one statement on a new short-lived connection to the same database.

    Used when the caller's transaction cannot see what the statement must see,
    e.g. rows committed after a REPEATABLE READ snapshot was taken.
    """

    query: Query
    settings: dict[str, str] = field(default_factory=dict)


class Statement:
    """Run the caller's own statement again; the result is what it returns."""


#: The one `Statement` request.
STATEMENT = Statement()

Request: TypeAlias = Query | Command | Batch | FreshQuery | Statement
Operation: TypeAlias = Generator[Request, Any, T]

#: The database error classes of the drivers whose shells are loaded. An
#: error of one of them, raised while serving a request, is the operation's
#: to handle; anything else propagates.
ERRORS: tuple[type[Exception], ...] = ()


def register(error: type[Exception]) -> None:
    """Make `error` (a driver's base error class) one the operations handle."""
    global ERRORS
    if error not in ERRORS:
        ERRORS = (*ERRORS, error)


def sqlstate_of(err: BaseException) -> str | None:
    """The SQLSTATE of a driver's database error (None: raised client-side)."""
    state = getattr(err, "sqlstate", None) or getattr(err, "pgcode", None)
    return state if isinstance(state, str) else None


def diag_of(err: BaseException) -> tuple[str | None, str | None, str | None]:
    """(schema, table, constraint) from a driver's error, as the server reported them."""
    diag = getattr(err, "diag", err)  # psycopg and psycopg2 keep them in .diag
    return (getattr(diag, "schema_name", None), getattr(diag, "table_name", None),
            getattr(diag, "constraint_name", None))


def libpq_options(settings: dict[str, str]) -> str:
    """`settings` as libpq's ``options`` (``-c name=value``, spaces in a value escaped)."""
    return " ".join(f"-c {k}={v.replace(' ', chr(92) + ' ')}" for k, v in settings.items())


def drive(op: Operation[T], serve: Callable[[Request], Any]) -> T:
    """Run `op` to completion, each request served by `serve`; return its value."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            req = op.throw(error) if error is not None else op.send(value)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        error = None
        try:
            value = serve(req)
        except ERRORS as ex:
            error = ex


async def adrive(op: Operation[T], serve: Callable[[Request], Awaitable[Any]]) -> T:
    """The async twin of `drive`."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            req = op.throw(error) if error is not None else op.send(value)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        error = None
        try:
            value = await serve(req)
        except ERRORS as ex:
            error = ex
