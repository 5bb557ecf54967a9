"""
Wrap: psycopg connections that heal a lagging sequence and retry once.

`HealingConnection` and `AsyncHealingConnection` protect every statement run
through ``execute()``, ``cursor().execute()`` and ``executemany()``, whatever
cursor class or row factory the caller picks: the cursors stay exactly the
caller's classes, because the protection sits in the connection's ``wait()``,
through which psycopg runs every cursor operation (see `selfheal._attempt`).
``wait()`` reads the statement from psycopg's generator, except after the
connection's own ``execute()``, which hands it over (cheaper than reading a
generator's frame, and only to the same thread's or task's next ``wait()``).
What "protect" costs depends on the transaction state the statement runs in:

- autocommit, or a statement that opens the transaction: nothing. The error
  is caught; the transaction it opened is rolled back (it held only this
  statement), the sequence healed and the statement retried. A statement
  that may have committed part of its work first (CALL, DO, a string of
  several statements) is healed and re-raised, never run twice.
- inside a transaction: a single statement that may collide where a retry
  can follow (`selfheal.protect` decides: say a default-key INSERT into a
  table not verified in sync) runs under a savepoint sent with it in one
  pipeline (one round trip), so earlier work survives the failure; never more
  than 64 savepoints a transaction. Other statements run as they are; if one
  collides, the sequence is healed on a side connection and the error
  re-raised.
- a failed transaction, or the caller's own pipeline: the statement runs as
  it is; a collision heals on a side connection and re-raises.

Whenever a statement fails and is not retried successfully, the caller gets
the original `UniqueViolation` and the transaction state plain psycopg
leaves. The decisions live once, in `selfheal.protect` and `selfheal.heal`,
and each step off the hot path once, as a flow in `selfheal._shell`: the sync
and async classes here only serve its requests.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pgerrors
from psycopg.abc import Params, PQGen
from psycopg.connection import _WAIT_INTERVAL
from psycopg.pq import Format, PipelineStatus
from psycopg.rows import Row

from . import _attempt, _drive
from ._shell import _PIPELINES, Drive, Flow, _Shell
from .heal import HealOptions, Mode

__all__ = ["AsyncHealingConnection", "HealOptions", "HealingConnection"]

_OFF = PipelineStatus.OFF
_PASS, _SAVEPOINT = Mode.PASS, Mode.SAVEPOINT
_EXECUTE = _attempt.EXECUTE
_COMMIT, _ROLLBACK = _attempt.COMMIT, _attempt.ROLLBACK
_CURSORS = _attempt.CURSORS
_NO_TRACEBACK = pgerrors._NO_TRACEBACK
_BINARY = Format.BINARY
_RV = Any
T = TypeVar("T")


# -- sync -----------------------------------------------------------------------


class HealingConnection(_Shell, psycopg.Connection[Row]):
    """A `psycopg.Connection` that heals lagging sequences behind primary keys.

    Use it wherever a connection class is accepted::

        conn = HealingConnection.connect(dsn)
        pool = ConnectionPool(dsn, connection_class=HealingConnection)

    Options: `selfheal_options` on the instance, or a configured subclass from
    `with_options()` for pools.
    """

    #: How connections of this class heal; see `HealOptions`.
    selfheal_options: HealOptions = HealOptions()
    #: `execute` tells `wait` its statement: psycopg's ``execute()`` is the next one
    #: (no class mixed in after this one has its own).
    _selfheal_own_execute = True
    #: Who runs a statement: the thread (`execute` tells `wait`).
    _selfheal_whose = staticmethod(threading.get_ident)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._selfheal_init()
        # A heal runs statements while the caller's cursor holds the lock.
        self.lock = threading.RLock()  # type: ignore[assignment]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._selfheal_own_execute = _attempt.runs_psycopgs_execute(
            cls, HealingConnection, psycopg.Connection)

    @classmethod
    def with_options(cls, **options: Any) -> type[HealingConnection[Row]]:
        """A subclass with these `HealOptions`, e.g. for ``connection_class=``."""
        return type(cls.__name__, (cls,), {"selfheal_options": HealOptions(**options)})

    def execute(self, query: Any, params: Params | None = None, *,
                prepare: bool | None = None, binary: bool = False) -> psycopg.Cursor[Row]:
        """As `psycopg.Connection.execute`; `wait()` learns the statement from here."""
        if type(query) is not str or not self._selfheal_own_execute:
            return super().execute(query, params, prepare=prepare, binary=binary)
        try:
            cur = self.cursor()
            if binary:
                cur.format = _BINARY
            if type(cur) not in _CURSORS:
                return cur.execute(query, params, prepare=prepare)
            self._selfheal_call = (self._selfheal_whose(), cur, query, params, prepare)
            try:
                return cur.execute(query, params, prepare=prepare)
            finally:
                self._selfheal_call = None
        except _NO_TRACEBACK as ex:
            raise ex.with_traceback(None)  # noqa: B904 (as psycopg raises it)

    @contextmanager
    def pipeline(self) -> Iterator[psycopg.Pipeline]:
        """As `psycopg.Connection.pipeline`; statements in it are not protected."""
        self._selfheal_pipelines += 1
        try:
            with super().pipeline() as p:
                yield p
        finally:
            self._selfheal_pipelines -= 1

    def wait(self, gen: PQGen[_RV], interval: float = _WAIT_INTERVAL,
             timeout: float | None = None) -> _RV:
        """As `psycopg.Connection.wait`: where selfheal sees every statement run."""
        code = getattr(gen, "gi_code", None)
        if code is _EXECUTE and not self._selfheal_busy:
            # The hot path: one execute() that `Planner.quick` lets run as it is.
            held = self._selfheal_call
            if held is not None and held[0] == self._selfheal_whose():
                self._selfheal_call = None
                f = None
                query = held[2]
            else:
                f = gen.gi_frame.f_locals  # type: ignore[attr-defined]
                query = f["query"]
            pgconn = self.pgconn
            mode = self._selfheal_planner.quick(
                pgconn.transaction_status, self._autocommit, query,
                self.selfheal_options, _PIPELINES) if pgconn.pipeline_status == _OFF else None
            if mode is _PASS:
                try:
                    return super().wait(gen, interval, timeout)
                except pgerrors.UniqueViolation as ex:
                    self._selfheal_run(self._selfheal_heal_only(ex))
                    raise
            if mode is not None and not self._notice_handlers:
                try:
                    return super().wait(
                        _attempt.savepointed(self, gen) if mode is _SAVEPOINT else gen,
                        interval, timeout)
                except pgerrors.UniqueViolation as ex:
                    return self._selfheal_run(self._selfheal_first_failed(
                        ex, _attempt.execute_call(f or _attempt.execute_locals(held)), mode))
            f = f or _attempt.execute_locals(held)
            return self._selfheal_run(self._selfheal_flow(gen, code, f), interval, timeout)
        if self._selfheal_busy:
            return super().wait(gen, interval, timeout)
        if code is _COMMIT or code is _ROLLBACK:
            # The transaction ends: nothing to protect (a deferred key may still collide).
            try:
                value = super().wait(gen, interval, timeout)
            except pgerrors.UniqueViolation as ex:
                self._selfheal_run(self._selfheal_heal_only(ex))
                raise
            if self._selfheal_planner.deferred and self._selfheal_idle():
                # The transaction that wrote them is over.
                self._selfheal_run(self._selfheal_refresh())
            return value
        return self._selfheal_run(self._selfheal_flow(gen, code), interval, timeout)

    def _selfheal_run(self, flow: Flow[T], interval: float = _WAIT_INTERVAL,
                      timeout: float | None = None) -> T:
        """Run what `flow` (`selfheal._shell`) asks for, and return its value."""
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                req = flow.send(value) if error is None else flow.throw(error)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            value = error = None
            try:
                if not isinstance(req, Drive):
                    value = super().wait(req, interval, timeout)
                elif req.side:
                    value = _drive.run_side(self, req.op)
                elif req.again is None:
                    value = _drive.run(self, req.op)
                else:
                    again = req.again  # called within this round only
                    value = _drive.run(self, req.op,
                                       lambda: self._selfheal_run(again()))  # noqa: B023
            except BaseException as ex:
                error = ex


# -- async ----------------------------------------------------------------------


class _TaskLock:
    """An asyncio lock that the task holding it may take again.

    psycopg's connection lock, made re-entrant so that a heal can run
    statements while the caller's cursor holds it.
    """

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._owner: asyncio.Task[Any] | None = None
        self._depth = 0

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        if self._owner is not None and self._owner is task:
            self._depth += 1
            return
        await self._lock.acquire()
        self._owner, self._depth = task, 1

    async def __aexit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
            self._lock.release()

    def locked(self) -> bool:
        """Whether any task holds the lock."""
        return self._lock.locked()


class AsyncHealingConnection(_Shell, psycopg.AsyncConnection[Row]):
    """The async twin of `HealingConnection`, for asyncio and `AsyncConnectionPool`."""

    selfheal_options: HealOptions = HealOptions()
    #: `execute` tells `wait` its statement: psycopg's ``execute()`` is the next one
    #: (no class mixed in after this one has its own).
    _selfheal_own_execute = True
    #: Who runs a statement: the task (`execute` tells `wait`).
    _selfheal_whose = staticmethod(asyncio.current_task)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._selfheal_init()
        self.lock = _TaskLock()  # type: ignore[assignment]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._selfheal_own_execute = _attempt.runs_psycopgs_execute(
            cls, AsyncHealingConnection, psycopg.AsyncConnection)

    @classmethod
    def with_options(cls, **options: Any) -> type[AsyncHealingConnection[Row]]:
        """A subclass with these `HealOptions`, e.g. for ``connection_class=``."""
        return type(cls.__name__, (cls,), {"selfheal_options": HealOptions(**options)})

    async def execute(self, query: Any, params: Params | None = None, *,
                      prepare: bool | None = None, binary: bool = False
                      ) -> psycopg.AsyncCursor[Row]:
        """As `psycopg.AsyncConnection.execute`; `wait()` learns the statement from here."""
        if type(query) is not str or not self._selfheal_own_execute:
            return await super().execute(query, params, prepare=prepare, binary=binary)
        try:
            cur = self.cursor()
            if binary:
                cur.format = _BINARY
            if type(cur) not in _CURSORS:
                return await cur.execute(query, params, prepare=prepare)
            self._selfheal_call = (self._selfheal_whose(), cur, query, params, prepare)
            try:
                return await cur.execute(query, params, prepare=prepare)
            finally:
                self._selfheal_call = None
        except _NO_TRACEBACK as ex:
            raise ex.with_traceback(None)  # noqa: B904 (as psycopg raises it)

    @asynccontextmanager
    async def pipeline(self) -> AsyncIterator[psycopg.AsyncPipeline]:
        """As `psycopg.AsyncConnection.pipeline`; statements in it are not protected."""
        self._selfheal_pipelines += 1
        try:
            async with super().pipeline() as p:
                yield p
        finally:
            self._selfheal_pipelines -= 1

    async def wait(self, gen: PQGen[_RV], interval: float = _WAIT_INTERVAL,
                   timeout: float | None = None) -> _RV:
        """As `psycopg.AsyncConnection.wait`: where selfheal sees every statement run."""
        code = getattr(gen, "gi_code", None)
        if code is _EXECUTE and not self._selfheal_busy:
            # The hot path: one execute() that `Planner.quick` lets run as it is.
            held = self._selfheal_call
            if held is not None and held[0] == self._selfheal_whose():
                self._selfheal_call = None
                f = None
                query = held[2]
            else:
                f = gen.gi_frame.f_locals  # type: ignore[attr-defined]
                query = f["query"]
            pgconn = self.pgconn
            mode = self._selfheal_planner.quick(
                pgconn.transaction_status, self._autocommit, query,
                self.selfheal_options, _PIPELINES) if pgconn.pipeline_status == _OFF else None
            if mode is _PASS:
                try:
                    return await super().wait(gen, interval, timeout)
                except pgerrors.UniqueViolation as ex:
                    await self._selfheal_run(self._selfheal_heal_only(ex))
                    raise
            if mode is not None and not self._notice_handlers:
                try:
                    return await super().wait(
                        _attempt.savepointed(self, gen) if mode is _SAVEPOINT else gen,
                        interval, timeout)
                except pgerrors.UniqueViolation as ex:
                    return await self._selfheal_run(self._selfheal_first_failed(
                        ex, _attempt.execute_call(f or _attempt.execute_locals(held)), mode))
            f = f or _attempt.execute_locals(held)
            return await self._selfheal_run(self._selfheal_flow(gen, code, f), interval,
                                            timeout)
        if self._selfheal_busy:
            return await super().wait(gen, interval, timeout)
        if code is _COMMIT or code is _ROLLBACK:
            # The transaction ends: nothing to protect (a deferred key may still collide).
            try:
                value = await super().wait(gen, interval, timeout)
            except pgerrors.UniqueViolation as ex:
                await self._selfheal_run(self._selfheal_heal_only(ex))
                raise
            if self._selfheal_planner.deferred and self._selfheal_idle():
                # The transaction that wrote them is over.
                await self._selfheal_run(self._selfheal_refresh())
            return value
        return await self._selfheal_run(self._selfheal_flow(gen, code), interval, timeout)

    async def _selfheal_run(self, flow: Flow[T], interval: float = _WAIT_INTERVAL,
                            timeout: float | None = None) -> T:
        """Run what `flow` (`selfheal._shell`) asks for, and return its value."""
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                req = flow.send(value) if error is None else flow.throw(error)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            value = error = None
            try:
                if not isinstance(req, Drive):
                    value = await super().wait(req, interval, timeout)
                elif req.side:
                    value = await _drive.arun_side(self, req.op)
                elif req.again is None:
                    value = await _drive.arun(self, req.op)
                else:
                    again = req.again  # called within this round only
                    value = await _drive.arun(
                        self, req.op, lambda: self._selfheal_run(again()))  # noqa: B023
            except BaseException as ex:
                error = ex
