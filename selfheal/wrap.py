"""
Wrap: psycopg connections that heal a lagging sequence and retry once.

`HealingConnection` and `AsyncHealingConnection` protect every statement run
through ``execute()``, ``cursor().execute()`` and ``executemany()``, whatever
cursor class or row factory the caller picks. What "protect" costs depends on
the transaction state the statement runs in:

- autocommit, or a statement that opens the transaction: nothing. The error
  is caught; the transaction it opened is rolled back (it held only this
  statement), the sequence healed and the statement retried.
- inside a transaction: a statement that can draw from a sequence (INSERT,
  UPDATE, DELETE, MERGE, WITH, CALL, DO, EXECUTE) runs under a savepoint
  queued with it in one pipeline (one round trip), so earlier work survives
  the failure. Other
  statements run as they are; if one collides, the sequence is healed on a
  side connection and the error re-raised.
- a failed transaction, or an explicit pipeline: nothing is done.

A heal that cannot happen re-raises the caller's original `UniqueViolation`
and leaves the connection usable. The decision logic lives once, in
`heal_flow`; the sync and async classes only drive it.
"""

from __future__ import annotations

import enum
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from typing import Any, TypeVar, cast

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql
from psycopg.abc import Params, Query
from psycopg.pq import PipelineStatus, TransactionStatus
from psycopg.rows import Row

from . import _drive, report
from ._drive import STATEMENT, Operation
from .detect import ConstraintKey, NotHealable, constraint_of, healable
from .discover import TableInfo
from .errors import SelfhealError
from .resync import LOCK_TIMEOUT, STATEMENT_TIMEOUT, ResyncResult, advance, scoped

__all__ = [
    "AsyncHealingConnection",
    "AsyncHealingCursor",
    "HealOptions",
    "HealingConnection",
    "HealingCursor",
]


@dataclass(frozen=True)
class HealOptions:
    """How a healing connection behaves. Set per class or per connection."""

    #: Retry the statement once after a heal. False: heal, then re-raise.
    retry: bool = True
    #: Inside a transaction, protect statements that can draw from a sequence
    #: with a savepoint. False: no savepoints (no subtransactions); a collision
    #: there is healed on a side connection and the error re-raised.
    savepoints: bool = True
    #: Bound, in seconds, on lock waits while healing.
    lock_timeout: float = LOCK_TIMEOUT
    #: Bound, in seconds, on each statement of a heal.
    statement_timeout: float = STATEMENT_TIMEOUT


class Mode(enum.Enum):
    """How a statement is protected, from the transaction state it runs in."""

    PASS = "pass"  # not protected, nothing done on failure
    AUTOCOMMIT = "autocommit"  # retry directly
    OPENED = "opened"  # the statement opens the transaction: roll back, retry
    SAVEPOINT = "savepoint"  # under a savepoint inside the caller's transaction
    HEAL_ONLY = "heal_only"  # heal on a side connection, re-raise


_SAVEPOINT = "SAVEPOINT _selfheal"
_RELEASE = "RELEASE SAVEPOINT _selfheal"
_ROLLBACK_TO = "ROLLBACK TO SAVEPOINT _selfheal; RELEASE SAVEPOINT _selfheal"

# Statements that can draw from a sequence, directly or through triggers.
_DRAWING = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE", "WITH", "CALL", "DO", "EXECUTE"})
_FIRST_WORD = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/|\()*([A-Za-z]+)", re.S)


def may_draw(query: Query) -> bool:
    """Whether `query` can draw from a sequence (when unsure: True)."""
    part: Any = query
    while isinstance(part, sql.Composed):
        part = next(iter(part), None)
    if isinstance(part, sql.SQL):
        text = part.as_string()
    elif isinstance(part, str):
        text = part
    elif isinstance(part, bytes):
        text = part[:256].decode("utf-8", "replace")
    else:
        return True
    m = _FIRST_WORD.match(text)
    return m is None or m.group(1).upper() in _DRAWING


def choose_mode(
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
    query: Query,
    options: HealOptions,
) -> Mode:
    """Pick how to protect `query` from the connection's state (no I/O)."""
    pgconn = conn.pgconn
    if pgconn.pipeline_status != PipelineStatus.OFF:
        return Mode.PASS
    status = pgconn.transaction_status
    if status == TransactionStatus.IDLE:
        return Mode.AUTOCOMMIT if conn.autocommit else Mode.OPENED
    if status == TransactionStatus.INTRANS:
        return Mode.SAVEPOINT if options.savepoints and may_draw(query) else Mode.HEAL_ONLY
    return Mode.PASS


def heal_flow(
    ex: pgerrors.UniqueViolation,
    mode: Mode,
    database: str,
    options: HealOptions,
    not_healable: NotHealable,
) -> Operation[Any]:
    """After `ex` escaped the caller's statement: restore, heal, retry once.

    Runs on the caller's connection for every mode but HEAL_ONLY, which runs
    on an autocommit connection (the caller's if it is one and idle, else a
    side connection). Raises `ex` itself whenever it does not retry.
    """
    in_savepoint = mode is Mode.SAVEPOINT
    if in_savepoint or mode is Mode.OPENED:
        try:
            yield _drive.Query(_ROLLBACK_TO if in_savepoint else "ROLLBACK")
        except psycopg.Error:
            raise ex from None
    key = constraint_of(ex)
    if key is None or key in not_healable:
        raise ex
    started = time.perf_counter()
    status = TransactionStatus.INTRANS if in_savepoint else TransactionStatus.IDLE
    autocommit = mode is Mode.AUTOCOMMIT or mode is Mode.HEAL_ONLY
    # The lookup and the heal share one scope: a single transaction or savepoint.
    found: list[TableInfo] = []
    body = _lookup_and_advance(key, not_healable, options, mode is not Mode.HEAL_ONLY, found)
    try:
        result = yield from scoped(status, autocommit, body)
    except SelfhealError as err:
        if not found:
            raise ex  # noqa: B904 - nothing was healed, nothing to report
        info = found[0]
        report.resync_failed(
            report.HealFailure(
                database=database,
                schema=info.schema,
                table=info.table,
                column=info.column,
                constraint=key[2],
                sequence=info.sequence,
                error=err,
                duration_ms=_ms(started),
                original=ex,
            )
        )
        raise ex  # noqa: B904 - its __context__ tells why the heal failed
    if result is None:
        raise ex
    heal = _heal(result, database, key[2], started)
    if not options.retry or mode is Mode.HEAL_ONLY:
        report.resynced(replace(heal, retry="not_attempted"))
        raise ex
    try:
        value = yield STATEMENT
    except psycopg.Error:
        report.resynced(replace(heal, retry="failed"))
        raise
    report.resynced(replace(heal, retry="succeeded"))
    return value


def _lookup_and_advance(
    key: ConstraintKey,
    not_healable: NotHealable,
    options: HealOptions,
    drain_cache: bool,
    found: list[TableInfo],
) -> Operation[ResyncResult | None]:
    info = yield from healable(key, not_healable)
    if info is None:
        return None
    found.append(info)
    return (yield from advance(info, options.lock_timeout, options.statement_timeout,
                               drain_cache=drain_cache))


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def _heal(result: ResyncResult, database: str, constraint: str, started: float) -> report.Heal:
    return report.Heal(
        database=database,
        schema=result.schema,
        table=result.table,
        column=result.column,
        constraint=constraint,
        sequence=result.sequence,
        before=result.before,
        after=result.after,
        method=result.method,
        duration_ms=_ms(started),
        retry="not_attempted",
    )


def _worth_a_side_connection(ex: pgerrors.UniqueViolation, not_healable: NotHealable) -> bool:
    key = constraint_of(ex)
    return key is not None and key not in not_healable


# -- sync -----------------------------------------------------------------------

_C = TypeVar("_C", bound=type)
_healing_classes: dict[type, type] = {}


def _healing_subclass(base: _C, mixin: type) -> _C:
    """`base` with `mixin`'s protection in front, made once per cursor class."""
    if issubclass(base, mixin):
        return base
    key = (base, mixin)
    cls = _healing_classes.get(key)  # type: ignore[call-overload]
    if cls is None:
        cls = type(f"Healing{base.__name__}", (mixin, base), {"__slots__": ()})
        _healing_classes[key] = cls  # type: ignore[index]
    return cast(_C, cls)


class HealingCursor(psycopg.Cursor[Row]):
    """A cursor whose execute() and executemany() heal lagging sequences."""

    __slots__ = ()

    def execute(
        self,
        query: Query,
        params: Params | None = None,
        *,
        prepare: bool | None = None,
        binary: bool | None = None,
    ) -> HealingCursor[Row]:
        conn = cast("HealingConnection[Any]", self._conn)
        mode = choose_mode(conn, query, conn.selfheal_options)
        if mode is Mode.PASS:
            return super().execute(cast(Any, query), params, prepare=prepare, binary=binary)
        run = super().execute

        def again() -> Any:
            return run(cast(Any, query), params, prepare=prepare, binary=binary)

        self._protected(conn, mode, again)
        return self

    def executemany(
        self, query: Query, params_seq: Iterable[Params], *, returning: bool = False
    ) -> None:
        conn = cast("HealingConnection[Any]", self._conn)
        mode = choose_mode(conn, query, conn.selfheal_options)
        if mode is Mode.PASS:
            return super().executemany(query, params_seq, returning=returning)
        rows = list(params_seq)  # a retry needs them again
        run = super().executemany

        def again() -> Any:
            if mode is Mode.AUTOCOMMIT and not psycopg.Pipeline.is_supported():
                # Without a pipeline each row commits on its own; make the
                # batch atomic so that a retry cannot write a row twice.
                with conn.transaction():
                    return run(query, rows, returning=returning)
            return run(query, rows, returning=returning)

        self._protected(conn, mode, again)

    @contextmanager
    def copy(
        self, statement: Query, params: Params | None = None, *, writer: Any = None
    ) -> Iterator[psycopg.Copy]:
        """As `psycopg.Cursor.copy`; a collision heals the sequence, then re-raises."""
        try:
            with super().copy(statement, params, writer=writer) as copy:
                yield copy
        except pgerrors.UniqueViolation as ex:
            conn = cast("HealingConnection[Any]", self._conn)
            conn._selfheal_heal_only(ex)
            raise

    def _protected(self, conn: HealingConnection[Any], mode: Mode, again: Callable[[], Any]) -> Any:
        try:
            if mode is Mode.SAVEPOINT:
                # One round trip, and the caller's statement runs exactly as
                # it would on its own: same cursor, adapters, binding, prepare.
                inner = conn._selfheal_inner_cursor()
                with conn.pipeline():
                    inner.execute(_SAVEPOINT)
                    again()
                    inner.execute(_RELEASE)
                return None
            return again()
        except pgerrors.UniqueViolation as ex:
            if mode is Mode.HEAL_ONLY:
                conn._selfheal_heal_only(ex)
                raise
            op = heal_flow(ex, mode, conn.info.dbname, conn.selfheal_options,
                           conn._selfheal_not_healable)
            return _drive.run(conn, op, again)


class HealingConnection(psycopg.Connection[Row]):
    """A `psycopg.Connection` that heals lagging sequences behind primary keys.

    Use it wherever a connection class is accepted::

        conn = HealingConnection.connect(dsn)
        pool = ConnectionPool(dsn, connection_class=HealingConnection)

    Options: `selfheal_options` on the instance, or a configured subclass from
    `with_options()` for pools.
    """

    #: How connections of this class heal; see `HealOptions`.
    selfheal_options: HealOptions = HealOptions()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._selfheal_not_healable = NotHealable()
        self._selfheal_inner: psycopg.Cursor[Any] | None = None
        super().__init__(*args, **kwargs)

    def _selfheal_inner_cursor(self) -> psycopg.Cursor[Any]:
        # One plain cursor for the savepoint commands, kept: they run often.
        if self._selfheal_inner is None:
            self._selfheal_inner = psycopg.Cursor(self)
        return self._selfheal_inner

    @property
    def cursor_factory(self) -> type[psycopg.Cursor[Row]]:
        """The cursor class: whatever was set, with healing in front."""
        return self._selfheal_cursor_factory

    @cursor_factory.setter
    def cursor_factory(self, cls: type[psycopg.Cursor[Row]]) -> None:
        self._selfheal_cursor_factory = _healing_subclass(cls, HealingCursor)

    @classmethod
    def with_options(cls, **options: Any) -> type[HealingConnection[Row]]:
        """A subclass with these `HealOptions`, e.g. for ``connection_class=``."""
        return type(cls.__name__, (cls,), {"selfheal_options": HealOptions(**options)})

    def _selfheal_heal_only(self, ex: pgerrors.UniqueViolation) -> None:
        if not _worth_a_side_connection(ex, self._selfheal_not_healable):
            return
        op = heal_flow(ex, Mode.HEAL_ONLY, self.info.dbname, self.selfheal_options,
                       self._selfheal_not_healable)
        try:
            if self.autocommit and self.info.transaction_status == TransactionStatus.IDLE:
                _drive.run(self, op)
            else:
                _drive.run_side(self, op)
        except psycopg.Error:
            return  # the flow re-raises `ex`; the caller raises it itself


# -- async ----------------------------------------------------------------------


class AsyncHealingCursor(psycopg.AsyncCursor[Row]):
    """The async twin of `HealingCursor`."""

    __slots__ = ()

    async def execute(
        self,
        query: Query,
        params: Params | None = None,
        *,
        prepare: bool | None = None,
        binary: bool | None = None,
    ) -> AsyncHealingCursor[Row]:
        conn = cast("AsyncHealingConnection[Any]", self._conn)
        mode = choose_mode(conn, query, conn.selfheal_options)
        if mode is Mode.PASS:
            return await super().execute(cast(Any, query), params, prepare=prepare, binary=binary)
        run = super().execute

        async def again() -> Any:
            return await run(cast(Any, query), params, prepare=prepare, binary=binary)

        await self._protected(conn, mode, again)
        return self

    async def executemany(
        self, query: Query, params_seq: Iterable[Params], *, returning: bool = False
    ) -> None:
        conn = cast("AsyncHealingConnection[Any]", self._conn)
        mode = choose_mode(conn, query, conn.selfheal_options)
        if mode is Mode.PASS:
            return await super().executemany(query, params_seq, returning=returning)
        rows = list(params_seq)
        run = super().executemany

        async def again() -> Any:
            if mode is Mode.AUTOCOMMIT and not psycopg.Pipeline.is_supported():
                async with conn.transaction():
                    return await run(query, rows, returning=returning)
            return await run(query, rows, returning=returning)

        await self._protected(conn, mode, again)

    @asynccontextmanager
    async def copy(
        self, statement: Query, params: Params | None = None, *, writer: Any = None
    ) -> AsyncIterator[psycopg.AsyncCopy]:
        """As `psycopg.AsyncCursor.copy`; a collision heals the sequence, then re-raises."""
        try:
            async with super().copy(statement, params, writer=writer) as copy:
                yield copy
        except pgerrors.UniqueViolation as ex:
            conn = cast("AsyncHealingConnection[Any]", self._conn)
            await conn._selfheal_heal_only(ex)
            raise

    async def _protected(
        self, conn: AsyncHealingConnection[Any], mode: Mode, again: Callable[[], Awaitable[Any]]
    ) -> Any:
        try:
            if mode is Mode.SAVEPOINT:
                inner = conn._selfheal_inner_cursor()
                async with conn.pipeline():
                    await inner.execute(_SAVEPOINT)
                    await again()
                    await inner.execute(_RELEASE)
                return None
            return await again()
        except pgerrors.UniqueViolation as ex:
            if mode is Mode.HEAL_ONLY:
                await conn._selfheal_heal_only(ex)
                raise
            op = heal_flow(ex, mode, conn.info.dbname, conn.selfheal_options,
                           conn._selfheal_not_healable)
            return await _drive.arun(conn, op, again)


class AsyncHealingConnection(psycopg.AsyncConnection[Row]):
    """The async twin of `HealingConnection`, for asyncio and `AsyncConnectionPool`."""

    selfheal_options: HealOptions = HealOptions()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._selfheal_not_healable = NotHealable()
        self._selfheal_inner: psycopg.AsyncCursor[Any] | None = None
        super().__init__(*args, **kwargs)

    def _selfheal_inner_cursor(self) -> psycopg.AsyncCursor[Any]:
        if self._selfheal_inner is None:
            self._selfheal_inner = psycopg.AsyncCursor(self)
        return self._selfheal_inner

    @property
    def cursor_factory(self) -> type[psycopg.AsyncCursor[Row]]:
        """The cursor class: whatever was set, with healing in front."""
        return self._selfheal_cursor_factory

    @cursor_factory.setter
    def cursor_factory(self, cls: type[psycopg.AsyncCursor[Row]]) -> None:
        self._selfheal_cursor_factory = _healing_subclass(cls, AsyncHealingCursor)

    @classmethod
    def with_options(cls, **options: Any) -> type[AsyncHealingConnection[Row]]:
        """A subclass with these `HealOptions`, e.g. for ``connection_class=``."""
        return type(cls.__name__, (cls,), {"selfheal_options": HealOptions(**options)})

    async def _selfheal_heal_only(self, ex: pgerrors.UniqueViolation) -> None:
        if not _worth_a_side_connection(ex, self._selfheal_not_healable):
            return
        op = heal_flow(ex, Mode.HEAL_ONLY, self.info.dbname, self.selfheal_options,
                       self._selfheal_not_healable)
        try:
            if self.autocommit and self.info.transaction_status == TransactionStatus.IDLE:
                await _drive.arun(self, op)
            else:
                await _drive.arun_side(self, op)
        except psycopg.Error:
            return
