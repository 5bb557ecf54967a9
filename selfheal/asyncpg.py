"""
asyncpg's shell: connections that heal a lagging sequence and retry once.

    conn = await asyncpg.connect(dsn, connection_class=selfheal.asyncpg.HealingConnection)
    pool = await asyncpg.create_pool(dsn, connection_class=selfheal.asyncpg.HealingConnection)

The decisions are the core's (`selfheal.protect` chooses how a statement is
protected, `selfheal.heal.heal_flow` heals after a collision); this module
only runs the caller's statements and serves the core's requests with
asyncpg's API:

- Every statement passes through one of three methods: ``execute()`` without
  arguments (the simple protocol), ``_execute`` (``execute`` with arguments,
  ``fetch``, ``fetchrow``, ``fetchval``) and ``_executemany``
  (``executemany``, ``fetchmany``). Prepared statements (``prepare()``, and
  SQLAlchemy's asyncpg dialect, which prepares everything) are a subclass
  whose one execution funnel comes back here. ``copy_*_to_table`` heal and
  re-raise, as a COPY is never run twice. Cursors run as they are.
- asyncpg opens no transaction by itself: outside ``transaction()`` every
  call is one, so a collision there is retried directly.
- asyncpg cannot tell a healthy transaction from an aborted one, so the
  shell keeps track of the errors it saw; when it guesses wrong, the
  savepoint it sends fails as the statement would, and the statement then
  runs as it is.
- asyncpg has no pipeline: a statement protected inside a transaction rides
  behind ``SAVEPOINT _selfheal;`` in one simple-protocol string when it takes
  no arguments, and is preceded by the SAVEPOINT (one round trip more) when it
  does. The savepoint is not released after a success (a RELEASE would cost
  another round trip): it ends with the transaction, and selfheal's bound of
  64 savepoints a transaction counts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import asyncpg
import asyncpg.exceptions as pgexc
from asyncpg.prepared_stmt import PreparedStatement
from psycopg.pq import TransactionStatus
from psycopg.sql import Composable

from . import _ops, explicit
from ._ops import STATEMENT, Batch, Command, FreshQuery, Operation, Query, Request, Statement
from ._sqltext import redacted_of, shape
from .detect import NotHealable
from .heal import HealOptions, Mode, after_failure, heal_flow, worth_healing
from .insync import facts_for
from .protect import Planner, Write

__all__ = ["HealOptions", "HealingConnection", "HealingPreparedStatement"]

_ops.register(asyncpg.PostgresError)
# Raised client-side, e.g. "connection is closed": psycopg and psycopg2 raise
# their own base error class there, which the operations handle alike.
_ops.register(asyncpg.InterfaceError)

_IDLE = TransactionStatus.IDLE
_INTRANS = TransactionStatus.INTRANS
_INERROR = TransactionStatus.INERROR
_PASS, _HEAL_ONLY, _SAVEPOINT_MODE = Mode.PASS, Mode.HEAL_ONLY, Mode.SAVEPOINT
_SAVEPOINT = "SAVEPOINT _selfheal"
_PREFIX = "SAVEPOINT _selfheal; "
_Unique = pgexc.UniqueViolationError
_Error = asyncpg.PostgresError

_base_execute = asyncpg.Connection.execute
_base_execute_args = asyncpg.Connection._execute
_base_do_execute = PreparedStatement._PreparedStatement__do_execute


class HealingConnection(asyncpg.Connection):  # type: ignore[misc]
    """An asyncpg connection that heals lagging sequences behind primary keys.

    Use it as ``connection_class=`` of `asyncpg.connect` and
    `asyncpg.create_pool`, or in SQLAlchemy's connect arguments. Options:
    `selfheal_options` on the instance, or a configured subclass from
    `with_options()`.
    """

    #: How connections of this class heal; see `HealOptions`.
    selfheal_options: HealOptions = HealOptions()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Set while selfheal runs statements of its own.
        self._selfheal_busy = False
        # An error was seen inside the open transaction: it is aborted.
        self._selfheal_failed = False
        # Notices held back while a statement may still run again.
        self._selfheal_held: list[Any] | None = None
        self._selfheal_not_healable = NotHealable()
        params = self._params
        self._selfheal_database: str = params.database
        settings = self._protocol.get_settings()
        self._selfheal_planner = Planner(
            facts_for((_address(self._addr), params.database)), params.user,
            # Reported by PostgreSQL 18 and later; None before (see `Planner`).
            lambda: getattr(settings, "search_path", None), shape, multi_savepoints=True)

    @classmethod
    def with_options(cls, **options: Any) -> type[HealingConnection]:
        """A subclass with these `HealOptions`, e.g. for ``connection_class=``."""
        return type(cls.__name__, (cls,), {"selfheal_options": HealOptions(**options)})

    # -- the caller's statements --------------------------------------------------

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        if args:
            # As asyncpg's own execute() with arguments, one call less.
            self._check_open()
            _, status, _ = await self._execute(query, args, 0, timeout, return_status=True)
            return status.decode()  # type: ignore[no-any-return]
        if self._selfheal_busy:
            return await _base_execute(self, query, timeout=timeout)  # type: ignore[no-any-return]

        async def run() -> Any:
            return await _base_execute(self, query, timeout=timeout)

        async def prefixed() -> Any:
            return await _base_execute(self, _PREFIX + query, timeout=timeout)

        return await self._selfheal_run(query, run, prefixed)  # type: ignore[no-any-return]

    async def _execute(self, query: str, args: Any, limit: int, timeout: float | None,
                       **kwargs: Any) -> Any:
        if self._selfheal_busy:
            return await _base_execute_args(self, query, args, limit, timeout, **kwargs)
        mode = None
        planner = self._selfheal_planner
        if not self._selfheal_failed and self._protocol.is_in_transaction():
            options = self.selfheal_options
            mode = planner.quick(_INTRANS, True, query, options)
            if mode is None:
                mode = planner.plan(_INTRANS, True, query, self, options)
        if mode is _PASS:
            # The hot path: inside a transaction, nothing to protect.
            try:
                value = await _base_execute_args(self, query, args, limit, timeout, **kwargs)
            except _Unique as ex:
                self._selfheal_failure()
                await self._selfheal_heal_only(ex, query)
                raise
            except _Error:
                self._selfheal_failure()
                raise
            if planner.explicit:
                await self._selfheal_explicit(planner.explicit, query)
            return value
        return await self._selfheal_run(query, lambda: _base_execute_args(
            self, query, args, limit, timeout, **kwargs), mode=mode)

    async def _executemany(self, query: str, args: Iterable[Any], timeout: float | None,
                           **kwargs: Any) -> Any:
        base = super()._executemany
        if self._selfheal_busy:
            return await base(query, args, timeout, **kwargs)
        rows = list(args)  # a retry needs the rows again
        return await self._selfheal_run(query, lambda: base(query, rows, timeout, **kwargs))

    async def _prepare(self, query: str, **kwargs: Any) -> Any:
        ps = await super()._prepare(query, **kwargs)
        ps.__class__ = HealingPreparedStatement
        return ps

    async def copy_to_table(self, table_name: str, **kwargs: Any) -> Any:
        return await self._selfheal_copy(super().copy_to_table(table_name, **kwargs),
                                         table_name, kwargs)

    async def copy_records_to_table(self, table_name: str, **kwargs: Any) -> Any:
        return await self._selfheal_copy(super().copy_records_to_table(table_name, **kwargs),
                                         table_name, kwargs)

    async def reset(self, *, timeout: float | None = None) -> None:
        # The pool's reset between clients (ROLLBACK, RESET ALL and the like)
        # is not the caller's: it says nothing about the tables.
        busy, self._selfheal_busy = self._selfheal_busy, True
        try:
            await super().reset(timeout=timeout)
        finally:
            self._selfheal_busy = busy

    async def _reset(self) -> None:
        busy, self._selfheal_busy = self._selfheal_busy, True
        try:
            await super()._reset()
        finally:
            self._selfheal_busy = busy

    # -- running them ---------------------------------------------------------------

    def _selfheal_status(self) -> TransactionStatus:
        if not self._protocol.is_in_transaction():
            self._selfheal_failed = False
            return _IDLE
        return _INERROR if self._selfheal_failed else _INTRANS

    def _selfheal_failure(self) -> None:
        # A server error inside a transaction aborts it.
        self._selfheal_failed = self._protocol.is_in_transaction()

    async def _selfheal_run(self, query: str, run: Callable[[], Awaitable[Any]],
                            prefixed: Callable[[], Awaitable[Any]] | None = None,
                            mode: Mode | None = None) -> Any:
        """Run the caller's statement `query` (`run`), protected as `selfheal.protect`
        decides (`mode`, when decided already); heal and retry it once if it collides.

        `prefixed` runs it behind selfheal's savepoint in one string, when it can."""
        planner = self._selfheal_planner
        if mode is None:
            status = self._selfheal_status()
            options = self.selfheal_options
            mode = planner.quick(status, True, query, options)
            if mode is None:
                mode = planner.plan(status, True, query, self, options)
            if status is _IDLE and planner.facts.due:
                # What the statement asked to know (or earlier ones) is read first.
                lost = await self._selfheal_refresh()
                if lost is not None:
                    # The statement would have met that error first, with plain asyncpg.
                    raise lost
                mode = planner.plan(status, True, query, self, self.selfheal_options)
        wrote = planner.explicit
        if mode is _PASS or mode is _HEAL_ONLY:
            try:
                value = await run()
            except _Unique as ex:
                self._selfheal_failure()
                await self._selfheal_heal_only(ex, query)
                raise
            except _Error:
                self._selfheal_failure()
                raise
            self._selfheal_failed = False
        else:
            value = await self._selfheal_protected(query, run, prefixed, mode)
        if wrote:
            await self._selfheal_explicit(wrote, query)
        elif planner.deferred and not self._protocol.is_in_transaction():
            await self._selfheal_refresh()  # the transaction that wrote them is over
        return value

    async def _selfheal_protected(self, query: str, run: Callable[[], Awaitable[Any]],
                                  prefixed: Callable[[], Awaitable[Any]] | None,
                                  mode: Mode) -> Any:
        # The statement may run twice: the caller sees the notices of the
        # attempt that counts only.
        held: list[Any] | None = [] if self._log_listeners else None
        self._selfheal_held = held
        try:
            if mode is _SAVEPOINT_MODE:
                if prefixed is not None:
                    return await self._selfheal_prefixed(query, run, prefixed, held)
                try:
                    await self._selfheal_private(_SAVEPOINT)
                except _Error:
                    # The transaction was aborted after all: run it as it is.
                    self._selfheal_failed = True
                    await self._selfheal_release(held)
                    return await self._selfheal_run(query, run)
            try:
                value = await run()
            except _Unique as ex:
                return await self._selfheal_heal(ex, run, query, mode, held)
            except _Error:
                self._selfheal_failure()
                raise
            self._selfheal_failed = False
            return value
        finally:
            await self._selfheal_release(held)

    async def _selfheal_prefixed(self, query: str, run: Callable[[], Awaitable[Any]],
                                 prefixed: Callable[[], Awaitable[Any]],
                                 held: list[Any] | None) -> Any:
        """Run `query` as one string behind ``SAVEPOINT _selfheal;``: one round trip.

        asyncpg returns the status of the string's last statement, the
        caller's. An error whose message points into the text (a position:
        parsing and analysis, before anything ran) is raised by the statement
        run again without the prefix, after rolling back to the savepoint, so
        that it reads as plain asyncpg's; so is one that the savepoint itself
        raised (an aborted transaction).
        """
        try:
            value = await prefixed()
        except _Unique as ex:
            return await self._selfheal_heal(ex, run, query, _SAVEPOINT_MODE, held)
        except _Error as ex:
            if isinstance(ex, pgexc.InFailedSQLTransactionError):
                self._selfheal_failed = True
            elif getattr(ex, "position", None) is None:
                self._selfheal_failure()
                raise
            else:
                try:
                    await self._selfheal_private("ROLLBACK TO SAVEPOINT _selfheal")
                except _Error:
                    self._selfheal_failure()
                    raise ex from None
            if held is not None:
                held.clear()  # the statement runs again: its notices are the second run's
            try:
                value = await run()
            except _Error:
                self._selfheal_failure()
                raise
        self._selfheal_failed = False
        return value

    async def _selfheal_heal(self, ex: Exception, run: Callable[[], Awaitable[Any]],
                             query: str, mode: Mode, held: list[Any] | None) -> Any:
        first = list(held) if held is not None else []
        s = shape(query, self)
        mode = after_failure(mode, s)
        if mode is _HEAL_ONLY:
            self._selfheal_failure()
            await self._selfheal_heal_only(ex, query)
            raise ex
        op = heal_flow(ex, mode, s, self._selfheal_database, self.selfheal_options,
                       self._selfheal_not_healable, self._selfheal_planner.facts)

        async def again() -> Any:
            if held is not None:
                held.clear()  # the first attempt's, and the heal's own
            return await run()

        try:
            value = await self._selfheal_drive(op, again)
        except _Error:
            self._selfheal_failure()
            if held is not None:
                held[:] = first  # the caller sees the failed attempt, as plain
            raise
        self._selfheal_failed = False
        return value

    def _process_log_message(self, fields: Any, last_query: Any) -> None:
        held = self._selfheal_held
        if held is not None:
            held.append((fields, last_query))
        else:
            super()._process_log_message(fields, last_query)

    async def _selfheal_release(self, held: list[Any] | None) -> None:
        """Deliver the notices held back, before the caller resumes, as plain asyncpg does."""
        if self._selfheal_held is held:
            self._selfheal_held = None
        if held:
            for fields, last_query in held:
                super()._process_log_message(fields, last_query)
            held.clear()
            await asyncio.sleep(0)  # the listeners run, then the caller

    async def _selfheal_heal_only(self, ex: Exception, query: str) -> None:
        if not worth_healing(ex, self._selfheal_not_healable):
            return
        op = heal_flow(ex, _HEAL_ONLY, shape(query, self), self._selfheal_database,
                       self.selfheal_options, self._selfheal_not_healable,
                       self._selfheal_planner.facts)
        try:
            if not self._protocol.is_in_transaction():
                await self._selfheal_drive(op)
            else:
                side = await _side(self)
                try:
                    await side._selfheal_drive(op)
                finally:
                    await side.close()
        except (_Error, OSError, asyncpg.InterfaceError):
            return  # the flow re-raises `ex`; the caller raises it itself

    async def _selfheal_copy(self, copy: Awaitable[Any], table: str,
                             kwargs: dict[str, Any]) -> Any:
        if self._selfheal_busy:
            return await copy
        self._selfheal_status()
        columns = kwargs.get("columns")
        schema = kwargs.get("schema_name")
        writes = self._selfheal_planner.copy_writes(
            (schema, table) if schema else (table,),
            None if columns is None else frozenset(columns))
        try:
            value = await copy
        except _Unique as ex:
            self._selfheal_failure()
            await self._selfheal_heal_only(ex, "COPY")
            raise
        except _Error:
            self._selfheal_failure()
            raise
        self._selfheal_failed = False
        if writes:
            # What asyncpg sends, without the table's quoting: for the events only.
            listed = f" ({', '.join(columns)})" if columns else ""
            await self._selfheal_explicit(
                writes, f"COPY {schema + '.' if schema else ''}{table}{listed} FROM STDIN")
        return value

    async def _selfheal_refresh(self) -> BaseException | None:
        """Run the facts' check; return the error it met if it lost the connection."""
        planner = self._selfheal_planner
        err: BaseException | None = await self._selfheal_drive(
            planner.facts.refresh(self.selfheal_options.verified_for))
        if err is not None and self.is_closed():
            return err
        op = explicit.after_check(planner, "autocommit", self.selfheal_options,
                                  self._selfheal_database)
        if op is not None:
            await self._selfheal_drive(op)
        return None

    async def _selfheal_explicit(self, wrote: tuple[Write, ...], query: str) -> None:
        """After a statement that wrote keys of its own: look, advance (`selfheal.explicit`)."""
        options = self.selfheal_options
        if options.explicit_ids == "allow":
            return
        status = self._selfheal_status()
        if status is _INERROR:
            return
        op = explicit.after_statement(
            self._selfheal_planner, wrote, redacted_of(query, self),
            "transaction" if status is _INTRANS else "autocommit", options,
            self._selfheal_database)
        if op is not None:
            await self._selfheal_drive(op)

    # -- serving the core's requests ----------------------------------------------

    async def _selfheal_drive(self, op: Operation[Any],
                              statement: Callable[[], Awaitable[Any]] | None = None) -> Any:
        async def serve(req: Request) -> Any:
            if req is STATEMENT and statement is not None:
                return await statement()
            return await self._selfheal_serve(req)

        busy, self._selfheal_busy = self._selfheal_busy, True
        opened = self._protocol.is_in_transaction()
        try:
            return await _ops.adrive(op, serve)
        except BaseException:
            # Cancelled (a task's timeout) inside a scope the operation opened:
            # close it, or the caller's next statements would run in it.
            if not opened and not self.is_closed() and self._protocol.is_in_transaction():
                with contextlib.suppress(BaseException):
                    await _base_execute(self, "ROLLBACK")
            raise
        finally:
            self._selfheal_busy = busy

    async def _selfheal_serve(self, req: Request) -> Any:
        if isinstance(req, Query):
            text, args = placeholders(req.query, req.params)
            busy, self._selfheal_busy = self._selfheal_busy, True
            try:
                rows = await asyncpg.Connection.fetch(self, text, *args)
            finally:
                self._selfheal_busy = busy
            return [tuple(r) for r in rows]
        if isinstance(req, Command):
            await self._selfheal_private(req.command)
            return []
        if isinstance(req, Batch):
            if all(isinstance(q, Command) for q in req.queries):
                # One string, one round trip.
                await self._selfheal_private("; ".join(
                    q.command for q in req.queries))  # type: ignore[union-attr]
                return [[] for _ in req.queries]
            return [await self._selfheal_serve(q) for q in req.queries]
        if isinstance(req, FreshQuery):
            side = await _side(self, req.settings)
            try:
                return await side._selfheal_serve(req.query)
            finally:
                await side.close()
        if isinstance(req, Statement):
            raise TypeError("this operation needs a statement to re-run")
        raise TypeError(f"unknown request {req!r}")

    async def _selfheal_private(self, command: str) -> None:
        await _base_execute(self, command)


class HealingPreparedStatement(PreparedStatement):  # type: ignore[misc]
    """A prepared statement of a `HealingConnection`: its executions heal too."""

    __slots__ = ()

    async def fetchmany(self, args: Iterable[Any], *, timeout: float | None = None) -> Any:
        return await super().fetchmany(list(args), timeout=timeout)

    async def executemany(self, args: Iterable[Any], *, timeout: float | None = None) -> Any:
        return await super().executemany(list(args), timeout=timeout)

    async def _PreparedStatement__do_execute(self, executor: Any) -> Any:
        # The one path of fetch(), fetchrow(), fetchval(), fetchmany() and
        # executemany() to the server.
        conn: HealingConnection = self._connection
        if conn._selfheal_busy:
            return await _base_do_execute(self, executor)
        return await conn._selfheal_run(self._query, lambda: _base_do_execute(self, executor))


def placeholders(query: Composable | str, params: Any) -> tuple[str, tuple[Any, ...]]:
    """One of selfheal's queries as asyncpg takes it: ``$n`` placeholders, positional args.

    The query is composed with `psycopg.sql` (rendered with its quoting), its
    ``%s`` and ``%(name)s`` placeholders become ``$1``, ``$2``... and ``%%``
    becomes ``%``.
    """
    text = query if isinstance(query, str) else query.as_string(None)
    if params is None:
        return text.replace("%%", "%"), ()
    out: list[str] = []
    args: list[Any] = []
    names: dict[str, int] = {}
    i = 0
    positional = iter(params) if not isinstance(params, dict) else None
    while True:
        j = text.find("%", i)
        if j < 0:
            out.append(text[i:])
            break
        out.append(text[i:j])
        nxt = text[j + 1:j + 2]
        if nxt == "%":
            out.append("%")
            i = j + 2
        elif nxt == "s" and positional is not None:
            args.append(next(positional))
            out.append(f"${len(args)}")
            i = j + 2
        elif nxt == "(" and isinstance(params, dict):
            end = text.index(")s", j)
            name = text[j + 2:end]
            if name not in names:
                args.append(params[name])
                names[name] = len(args)
            out.append(f"${names[name]}")
            i = end + 2
        else:
            raise ValueError(f"unsupported placeholder in {text!r}")
    return "".join(out), tuple(args)


def _address(addr: Any) -> Any:
    return tuple(addr) if isinstance(addr, (list, tuple)) else addr


async def _side(conn: HealingConnection, settings: dict[str, str] | None = None
                ) -> HealingConnection:
    """A short-lived connection to the caller's database, its statements selfheal's own."""
    params = conn._params
    addr = conn._addr
    if isinstance(addr, str):  # a Unix socket: /dir/.s.PGSQL.port
        host, port = os.path.dirname(addr), int(addr.rsplit(".", 1)[1])
    else:
        host, port = addr[0], addr[1]
    mode = getattr(params.sslmode, "name", "prefer").replace("_", "-")
    ssl = params.ssl if params.ssl is not None and mode.startswith("verify") else mode
    side: HealingConnection = await asyncpg.connect(
        host=host, port=port, user=params.user, password=params.password,
        database=params.database, ssl=ssl, server_settings=settings or None,
        connection_class=HealingConnection, statement_cache_size=0)
    side._selfheal_busy = True
    return side
