"""
Wrap: psycopg connections that heal a lagging sequence and retry once.

`HealingConnection` and `AsyncHealingConnection` protect every statement run
through ``execute()``, ``cursor().execute()`` and ``executemany()``, whatever
cursor class or row factory the caller picks: the cursors stay exactly the
caller's classes, because the protection sits in the connection's ``wait()``,
through which psycopg runs every cursor operation (see `selfheal._attempt`).
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
leaves. The decision logic lives once, in `selfheal.heal`; the sync and async
classes only drive it.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import psycopg
from psycopg import errors as pgerrors
from psycopg.abc import PQGen
from psycopg.connection import _WAIT_INTERVAL
from psycopg.pq import PipelineStatus, TransactionStatus
from psycopg.rows import Row

from . import _attempt, _drive, explicit
from ._sqltext import copy_target, redacted_of
from .detect import NotHealable
from .heal import HealOptions, Mode, after_failure, heal_flow, worth_healing
from .insync import facts_for
from .protect import Planner, Write

__all__ = ["AsyncHealingConnection", "HealOptions", "HealingConnection"]

_OFF = PipelineStatus.OFF
_PASS, _SAVEPOINT = Mode.PASS, Mode.SAVEPOINT
_EXECUTE = _attempt.EXECUTE
_COMMIT, _ROLLBACK = _attempt.COMMIT, _attempt.ROLLBACK
# Whether this libpq has pipelines (a savepoint then travels with the statement;
# without, it would cost round trips of its own: then only executemany() gets one).
_PIPELINES = psycopg.Pipeline.is_supported()
_IDLE = TransactionStatus.IDLE
_INTRANS = TransactionStatus.INTRANS
_RV = Any
_ExplicitOp = tuple[_drive.Operation[list[explicit.Outcome]], str]


class _Shell:
    """What the sync and async connections share: state and decisions, no I/O."""

    selfheal_options: HealOptions
    _selfheal_not_healable: NotHealable
    _selfheal_busy: bool
    _selfheal_pipelines: int
    _selfheal_pending: tuple[_attempt.Call, Mode, psycopg.Error | None] | None
    _selfheal_notices: _attempt.HeldNotices | None
    _selfheal_planner: Planner

    def _selfheal_init(self) -> None:
        self._selfheal_not_healable = NotHealable()
        # Set while selfheal runs the caller's statement or its own: nested
        # waits are served as they are.
        self._selfheal_busy = False
        # The caller's own pipeline() blocks in progress.
        self._selfheal_pipelines = 0
        # An executemany() queued in its own pipeline, healed when psycopg
        # syncs that pipeline: the call, its mode, an error met queueing it.
        self._selfheal_pending: tuple[_attempt.Call, Mode, psycopg.Error | None] | None = None
        # The writes of keys of its own that the pending executemany() makes.
        self._selfheal_pending_writes: tuple[Write, ...] = ()
        # A COPY FROM in progress that writes keys: its writes and statement.
        self._selfheal_copy: tuple[tuple[Write, ...], str] | None = None
        # The caller's notices, held while a statement may be retried.
        self._selfheal_notices: _attempt.HeldNotices | None = None
        pgconn = self.pgconn  # type: ignore[attr-defined]
        info = self.info  # type: ignore[attr-defined]
        self._selfheal_planner = Planner(
            facts_for((info.host, info.port, info.dbname)), info.user,
            functools.partial(pgconn.parameter_status, b"search_path"),
            _attempt.shape,
        )

    def _selfheal_plan_many(self, call: _attempt.Call) -> Mode:
        pgconn = self.pgconn  # type: ignore[attr-defined]
        if pgconn.pipeline_status != _OFF and not (
            call.pipelined and not self._selfheal_pipelines
        ):
            self._selfheal_planner.explicit = ()
            return Mode.PASS  # the caller's pipeline: its errors come later
        status = pgconn.transaction_status
        if not call.pipelined and status == _IDLE and self._autocommit:  # type: ignore[attr-defined]
            # Without pipelines executemany() commits row by row in
            # autocommit: rows before a failure are in, so never run it twice.
            self._selfheal_planner.plan(status, True, call.query, self, self.selfheal_options)
            return Mode.HEAL_ONLY
        return self._selfheal_planner.plan(
            status, self._autocommit, call.query, self,  # type: ignore[attr-defined]
            self.selfheal_options,
            pipeline=True,  # a savepoint around a whole executemany() is worth its trips
        )

    def _selfheal_first(self, call: _attempt.Call, gen: PQGen[None], mode: Mode) -> PQGen[Any]:
        savepoint = mode is Mode.SAVEPOINT
        if call.pipelined:
            return _attempt.queued(self, gen, savepoint)
        if savepoint and call.many:
            return _attempt.savepointed_plain(self, gen)
        if savepoint:
            return _attempt.savepointed(self, gen)
        return gen

    def _selfheal_again(self, call: _attempt.Call) -> PQGen[None]:
        # The retry runs unprotected: a failure leaves what plain would.
        if call.pipelined:
            return _attempt.queued_and_collected(self, call.gen())
        return call.gen()

    def _selfheal_hold_notices(self) -> None:
        # Only where there are handlers: the hot path pays one truth test.
        if self._notice_handlers:  # type: ignore[attr-defined]
            self._selfheal_notices = _attempt.HeldNotices(self)

    def _selfheal_release_notices(self, succeeded: bool) -> None:
        held, self._selfheal_notices = self._selfheal_notices, None
        if held is not None:
            held.release(succeeded)

    def _selfheal_retrying(self) -> None:
        if self._selfheal_notices is not None:
            self._selfheal_notices.retrying()

    def _selfheal_other(self, code: Any, gen: Any) -> bool:
        """Note what another generator (its `code`) means for the savepoints and the facts.

        True: it opens a transaction block, and the facts' check is due first.
        """
        if code is _attempt.TX_ENTER:
            status = self.pgconn.transaction_status  # type: ignore[attr-defined]
            self._selfheal_planner.transaction_block(status)
            return status == _IDLE and self._selfheal_refresh_due(Mode.OPENED)
        if code is _attempt.COPY:
            planner = self._selfheal_planner
            planner.facts.forget_verified()
            self._selfheal_copy = None
            statement = gen.gi_frame.f_locals.get("statement")
            if self.selfheal_options.explicit_ids != "allow" and isinstance(statement, str):
                target = copy_target(statement)
                writes = planner.copy_writes(*target) if target is not None else ()
                if writes:
                    self._selfheal_copy = (writes, statement)
        return False

    def _selfheal_refresh_due(self, mode: Mode) -> bool:
        # The facts' check runs at a moment the connection is idle outside
        # any transaction, before the statement that starts the next one.
        return (
            (mode is Mode.AUTOCOMMIT or mode is Mode.OPENED)
            and self._selfheal_planner.facts.due
            and self.pgconn.pipeline_status == _OFF  # type: ignore[attr-defined]
        )

    def _selfheal_refresh_op(self) -> _drive.Operation[BaseException | None]:
        return self._selfheal_planner.facts.refresh(self.selfheal_options.verified_for)

    def _selfheal_explicit_ops(self, wrote: tuple[Write, ...], query: Any,
                               in_pipeline: bool = False) -> list[_ExplicitOp]:
        """The looks at the keys a statement that succeeded wrote (`selfheal.explicit`)."""
        options = self.selfheal_options
        if options.explicit_ids == "allow":
            return []
        pgconn = self.pgconn  # type: ignore[attr-defined]
        if pgconn.pipeline_status != _OFF and not in_pipeline:
            return []  # the caller's pipeline: its results are not read yet
        status = pgconn.transaction_status
        if status == _INTRANS:
            where = "transaction"
        elif status == _IDLE and self.autocommit:  # type: ignore[attr-defined]
            where = "autocommit"
        else:
            return []
        statement = redacted_of(query, self)
        writes = self._selfheal_planner.writes(wrote, statement)
        return [(explicit.settle(writes, where, options), statement)] if writes else []

    def _selfheal_deferred_ops(self) -> list[_ExplicitOp]:
        """The looks at writes into tables the facts' check has just told about."""
        planner = self._selfheal_planner
        options = self.selfheal_options
        if not planner.deferred or options.explicit_ids == "allow":
            return []
        where = "autocommit" if self.autocommit else "idle"  # type: ignore[attr-defined]
        return [(explicit.settle(writes, where, options), statement)
                for writes, statement in planner.take_deferred()]

    def _selfheal_explicit_report(self, outcomes: list[explicit.Outcome], statement: str
                                  ) -> None:
        if outcomes:
            explicit.report_outcomes(outcomes, self.info.dbname,  # type: ignore[attr-defined]
                                     statement, self.selfheal_options,
                                     self._selfheal_planner.facts)

    def _selfheal_idle(self) -> bool:
        pgconn = self.pgconn  # type: ignore[attr-defined]
        return bool(pgconn.transaction_status == _IDLE and pgconn.pipeline_status == _OFF)

    def _selfheal_side_needed(self) -> bool:
        # A heal on the caller's connection needs it idle, in autocommit and
        # out of any pipeline; otherwise it runs on a side connection.
        pgconn = self.pgconn  # type: ignore[attr-defined]
        return not (
            self.autocommit  # type: ignore[attr-defined]
            and pgconn.transaction_status == _IDLE
            and pgconn.pipeline_status == _OFF
        )


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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._selfheal_init()
        # A heal runs statements while the caller's cursor holds the lock.
        self.lock = threading.RLock()  # type: ignore[assignment]

    @classmethod
    def with_options(cls, **options: Any) -> type[HealingConnection[Row]]:
        """A subclass with these `HealOptions`, e.g. for ``connection_class=``."""
        return type(cls.__name__, (cls,), {"selfheal_options": HealOptions(**options)})

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
            f = gen.gi_frame.f_locals  # type: ignore[attr-defined]
            pgconn = self.pgconn
            mode = self._selfheal_planner.quick(
                pgconn.transaction_status, self._autocommit, f["query"],
                self.selfheal_options) if pgconn.pipeline_status == _OFF else None
            if mode is _PASS:
                try:
                    return super().wait(gen, interval, timeout)
                except pgerrors.UniqueViolation as ex:
                    self._selfheal_heal_only(ex)
                    raise
            if mode is not None and not self._notice_handlers:
                try:
                    return super().wait(gen, interval, timeout)
                except pgerrors.UniqueViolation as ex:
                    return self._selfheal_first_failed(ex, _attempt.execute_call(f), mode)
        elif self._selfheal_busy:
            return super().wait(gen, interval, timeout)
        elif code is _COMMIT or code is _ROLLBACK:
            # The transaction ends: nothing to protect (a deferred key may still collide).
            try:
                value = super().wait(gen, interval, timeout)
            except pgerrors.UniqueViolation as ex:
                self._selfheal_heal_only(ex)
                raise
            if self._selfheal_planner.deferred and self._selfheal_idle():
                self._selfheal_refresh()  # the transaction that wrote them is over
            return value
        return self._selfheal_wait(gen, interval, timeout, code)

    def _selfheal_wait(self, gen: PQGen[_RV], interval: float, timeout: float | None,
                       code: Any) -> _RV:
        call: _attempt.Call | None
        planner = self._selfheal_planner
        wrote: tuple[Write, ...] = ()
        if code is _EXECUTE:
            # The hot path: one execute().
            f = gen.gi_frame.f_locals  # type: ignore[attr-defined]
            pgconn = self.pgconn
            if pgconn.pipeline_status != _OFF:
                mode = _PASS
            else:
                mode = planner.plan(pgconn.transaction_status, self._autocommit, f["query"],
                                    self, self.selfheal_options, _PIPELINES)
                wrote = planner.explicit
            if mode is _PASS:
                call = None
            elif not self._notice_handlers and (mode is _SAVEPOINT or not planner.facts.due):
                # Nothing to add before the first attempt but its savepoint, if any.
                try:
                    value = super().wait(_attempt.savepointed(self, gen) if mode is _SAVEPOINT
                                         else gen, interval, timeout)
                except pgerrors.UniqueViolation as ex:
                    return self._selfheal_first_failed(ex, _attempt.execute_call(f), mode)
                if wrote:
                    self._selfheal_explicit(wrote, f["query"])
                return value
            else:
                call = _attempt.execute_call(f)
        elif code is _attempt.EXIT and self._selfheal_pending is not None:
            return self._selfheal_sync_pending(gen)
        else:
            call = _attempt.call_of(gen, code)
            if call is None:
                if self._selfheal_other(code, gen):
                    lost = self._selfheal_refresh()
                    if lost is not None:
                        return self._selfheal_lost(gen, lost, interval, timeout)
                elif code is _attempt.COPY_END and self._selfheal_copy is not None:
                    # A COPY FROM into a table with a sequence-backed key ends.
                    wrote, copied = self._selfheal_copy
                    self._selfheal_copy = None
                mode = Mode.PASS
            else:
                # call_of() took the parameters out of it.
                gen.close()
                gen = call.gen()
                mode = self._selfheal_plan_many(call)
                wrote = planner.explicit
        if call is None or mode is Mode.PASS:
            try:
                value = super().wait(gen, interval, timeout)
            except pgerrors.UniqueViolation as ex:
                self._selfheal_heal_only(ex)
                raise
            if wrote:
                if call is not None and call.pipelined:
                    # Its results are read when executemany() syncs its pipeline.
                    self._selfheal_pending = (call, _PASS, None)
                    self._selfheal_pending_writes = wrote
                else:
                    self._selfheal_explicit(wrote, call.query if call is not None
                                             else copied if code is _attempt.COPY_END
                                             else f["query"])
            elif planner.deferred and self._selfheal_idle():
                self._selfheal_refresh()  # the transaction that wrote them is over
            return value
        if self._selfheal_refresh_due(mode):
            lost = self._selfheal_refresh()
            if lost is not None:
                return self._selfheal_lost(gen, lost, interval, timeout)
        self._selfheal_busy = True
        self._selfheal_hold_notices()
        succeeded = False
        try:
            if call.pipelined:
                # Queued now, healed when executemany() syncs its pipeline.
                error = super().wait(self._selfheal_first(call, gen, mode))
                self._selfheal_pending = (call, mode, error)
                self._selfheal_pending_writes = wrote
                succeeded = True
                return None
            try:
                value = super().wait(self._selfheal_first(call, gen, mode), interval,
                                        timeout)
            except pgerrors.UniqueViolation as ex:
                value = self._selfheal_heal(ex, call, mode)
            succeeded = True
        finally:
            self._selfheal_busy = False
            if not (call.pipelined and succeeded):
                self._selfheal_release_notices(succeeded)
        if wrote:
            self._selfheal_explicit(wrote, call.query)
        return value

    def _selfheal_first_failed(self, ex: pgerrors.UniqueViolation, call: _attempt.Call,
                               mode: Mode) -> Any:
        self._selfheal_busy = True
        try:
            return self._selfheal_heal(ex, call, mode)
        finally:
            self._selfheal_busy = False

    def _selfheal_refresh(self) -> BaseException | None:
        """Run the facts' check; return the error it met if it lost the connection."""
        busy, self._selfheal_busy = self._selfheal_busy, True
        try:
            err = _drive.run(self, self._selfheal_refresh_op())
        finally:
            self._selfheal_busy = busy
        if err is not None and self.closed:
            return err
        self._selfheal_settle(self._selfheal_deferred_ops())
        return None

    def _selfheal_lost(self, gen: PQGen[_RV], lost: BaseException, interval: float,
                       timeout: float | None) -> _RV:
        """The check before a statement lost the connection, and met the error the
        statement would have met first with plain psycopg: the statement still runs (its
        cursor is reset as plain psycopg resets it) and fails with that error."""
        try:
            return super().wait(gen, interval, timeout)
        except psycopg.OperationalError:
            raise lost from None

    def _selfheal_explicit(self, wrote: tuple[Write, ...], query: Any,
                           in_pipeline: bool = False) -> None:
        self._selfheal_settle(self._selfheal_explicit_ops(wrote, query, in_pipeline))

    def _selfheal_settle(self, ops: list[_ExplicitOp]) -> None:
        for op, statement in ops:
            busy, self._selfheal_busy = self._selfheal_busy, True
            try:
                outcomes = _drive.run(self, op)
            finally:
                self._selfheal_busy = busy
            self._selfheal_explicit_report(outcomes, statement)

    def _selfheal_sync_pending(self, gen: PQGen[None]) -> None:
        assert self._selfheal_pending is not None
        (call, mode, error), self._selfheal_pending = self._selfheal_pending, None
        gen.close()
        self._selfheal_busy = True
        succeeded = False
        try:
            err = super().wait(_attempt.collect(self._pipeline))
            error = error or err
            if error is None:
                succeeded = True
                self._selfheal_busy = False
                self._selfheal_explicit(self._selfheal_pending_writes, call.query, True)
                return None
            if not isinstance(error, pgerrors.UniqueViolation):
                raise error
            if mode is _PASS:
                self._selfheal_heal_only(error, call)
                raise error
            self._selfheal_heal(error, call, mode)
            succeeded = True
            return None
        finally:
            self._selfheal_busy = False
            self._selfheal_release_notices(succeeded)

    def _selfheal_heal(self, ex: pgerrors.UniqueViolation, call: _attempt.Call,
                       mode: Mode) -> Any:
        mode = after_failure(mode, _attempt.shape(call.query, self))
        if mode is Mode.HEAL_ONLY:
            self._selfheal_heal_only(ex, call)
            raise ex
        op = heal_flow(ex, mode, _attempt.shape(call.query, self), self.info.dbname,
                       self.selfheal_options, self._selfheal_not_healable,
                       self._selfheal_planner.facts)

        def again() -> Any:
            self._selfheal_retrying()
            state = call.cursor_state()
            call.uncount()
            try:
                return psycopg.Connection.wait(self, self._selfheal_again(call))
            except psycopg.Error:
                call.restore_cursor(state)
                raise

        return _drive.run(self, op, again)

    def _selfheal_heal_only(self, ex: pgerrors.UniqueViolation,
                            call: _attempt.Call | None = None) -> None:
        if not worth_healing(ex, self._selfheal_not_healable):
            return
        shape = _attempt.shape(call.query, self) if call else _attempt.shape("", self)
        op = heal_flow(ex, Mode.HEAL_ONLY, shape, self.info.dbname, self.selfheal_options,
                       self._selfheal_not_healable, self._selfheal_planner.facts)
        busy, self._selfheal_busy = self._selfheal_busy, True
        try:
            if self._selfheal_side_needed():
                _drive.run_side(self, op)
            else:
                _drive.run(self, op)
        except psycopg.Error:
            return  # the flow re-raises `ex`; the caller raises it itself
        finally:
            self._selfheal_busy = busy


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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._selfheal_init()
        self.lock = _TaskLock()  # type: ignore[assignment]

    @classmethod
    def with_options(cls, **options: Any) -> type[AsyncHealingConnection[Row]]:
        """A subclass with these `HealOptions`, e.g. for ``connection_class=``."""
        return type(cls.__name__, (cls,), {"selfheal_options": HealOptions(**options)})

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
            f = gen.gi_frame.f_locals  # type: ignore[attr-defined]
            pgconn = self.pgconn
            mode = self._selfheal_planner.quick(
                pgconn.transaction_status, self._autocommit, f["query"],
                self.selfheal_options) if pgconn.pipeline_status == _OFF else None
            if mode is _PASS:
                try:
                    return await super().wait(gen, interval, timeout)
                except pgerrors.UniqueViolation as ex:
                    await self._selfheal_heal_only(ex)
                    raise
            if mode is not None and not self._notice_handlers:
                try:
                    return await super().wait(gen, interval, timeout)
                except pgerrors.UniqueViolation as ex:
                    return await self._selfheal_first_failed(
                        ex, _attempt.execute_call(f), mode)
        elif self._selfheal_busy:
            return await super().wait(gen, interval, timeout)
        elif code is _COMMIT or code is _ROLLBACK:
            # The transaction ends: nothing to protect (a deferred key may still collide).
            try:
                value = await super().wait(gen, interval, timeout)
            except pgerrors.UniqueViolation as ex:
                await self._selfheal_heal_only(ex)
                raise
            if self._selfheal_planner.deferred and self._selfheal_idle():
                await self._selfheal_refresh()  # the transaction that wrote them is over
            return value
        return await self._selfheal_wait(gen, interval, timeout, code)

    async def _selfheal_wait(self, gen: PQGen[_RV], interval: float, timeout: float | None,
                             code: Any) -> _RV:
        call: _attempt.Call | None
        planner = self._selfheal_planner
        wrote: tuple[Write, ...] = ()
        if code is _EXECUTE:
            # The hot path: one execute().
            f = gen.gi_frame.f_locals  # type: ignore[attr-defined]
            pgconn = self.pgconn
            if pgconn.pipeline_status != _OFF:
                mode = _PASS
            else:
                mode = planner.plan(pgconn.transaction_status, self._autocommit, f["query"],
                                    self, self.selfheal_options, _PIPELINES)
                wrote = planner.explicit
            if mode is _PASS:
                call = None
            elif not self._notice_handlers and (mode is _SAVEPOINT or not planner.facts.due):
                # Nothing to add before the first attempt but its savepoint, if any.
                try:
                    value = await super().wait(_attempt.savepointed(self, gen)
                                         if mode is _SAVEPOINT else gen, interval, timeout)
                except pgerrors.UniqueViolation as ex:
                    return await self._selfheal_first_failed(ex, _attempt.execute_call(f), mode)
                if wrote:
                    await self._selfheal_explicit(wrote, f["query"])
                return value
            else:
                call = _attempt.execute_call(f)
        elif code is _attempt.EXIT and self._selfheal_pending is not None:
            return await self._selfheal_sync_pending(gen)
        else:
            call = _attempt.call_of(gen, code)
            if call is None:
                if self._selfheal_other(code, gen):
                    lost = await self._selfheal_refresh()
                    if lost is not None:
                        return await self._selfheal_lost(gen, lost, interval, timeout)
                elif code is _attempt.COPY_END and self._selfheal_copy is not None:
                    # A COPY FROM into a table with a sequence-backed key ends.
                    wrote, copied = self._selfheal_copy
                    self._selfheal_copy = None
                mode = Mode.PASS
            else:
                # call_of() took the parameters out of it.
                gen.close()
                gen = call.gen()
                mode = self._selfheal_plan_many(call)
                wrote = planner.explicit
        if call is None or mode is Mode.PASS:
            try:
                value = await super().wait(gen, interval, timeout)
            except pgerrors.UniqueViolation as ex:
                await self._selfheal_heal_only(ex)
                raise
            if wrote:
                if call is not None and call.pipelined:
                    # Its results are read when executemany() syncs its pipeline.
                    self._selfheal_pending = (call, _PASS, None)
                    self._selfheal_pending_writes = wrote
                else:
                    await self._selfheal_explicit(wrote, call.query if call is not None
                                             else copied if code is _attempt.COPY_END
                                             else f["query"])
            elif planner.deferred and self._selfheal_idle():
                await self._selfheal_refresh()  # the transaction that wrote them is over
            return value
        if self._selfheal_refresh_due(mode):
            lost = await self._selfheal_refresh()
            if lost is not None:
                return await self._selfheal_lost(gen, lost, interval, timeout)
        self._selfheal_busy = True
        self._selfheal_hold_notices()
        succeeded = False
        try:
            if call.pipelined:
                # Queued now, healed when executemany() syncs its pipeline.
                error = await super().wait(self._selfheal_first(call, gen, mode))
                self._selfheal_pending = (call, mode, error)
                self._selfheal_pending_writes = wrote
                succeeded = True
                return None
            try:
                value = await super().wait(self._selfheal_first(call, gen, mode), interval,
                                        timeout)
            except pgerrors.UniqueViolation as ex:
                value = await self._selfheal_heal(ex, call, mode)
            succeeded = True
        finally:
            self._selfheal_busy = False
            if not (call.pipelined and succeeded):
                self._selfheal_release_notices(succeeded)
        if wrote:
            await self._selfheal_explicit(wrote, call.query)
        return value

    async def _selfheal_first_failed(self, ex: pgerrors.UniqueViolation,
                                     call: _attempt.Call, mode: Mode) -> Any:
        self._selfheal_busy = True
        try:
            return await self._selfheal_heal(ex, call, mode)
        finally:
            self._selfheal_busy = False

    async def _selfheal_refresh(self) -> BaseException | None:
        busy, self._selfheal_busy = self._selfheal_busy, True
        try:
            err = await _drive.arun(self, self._selfheal_refresh_op())
        finally:
            self._selfheal_busy = busy
        if err is not None and self.closed:
            return err
        await self._selfheal_settle(self._selfheal_deferred_ops())
        return None

    async def _selfheal_lost(self, gen: PQGen[_RV], lost: BaseException, interval: float,
                             timeout: float | None) -> _RV:
        try:
            return await super().wait(gen, interval, timeout)
        except psycopg.OperationalError:
            raise lost from None

    async def _selfheal_explicit(self, wrote: tuple[Write, ...], query: Any,
                                 in_pipeline: bool = False) -> None:
        await self._selfheal_settle(self._selfheal_explicit_ops(wrote, query, in_pipeline))

    async def _selfheal_settle(self, ops: list[_ExplicitOp]) -> None:
        for op, statement in ops:
            busy, self._selfheal_busy = self._selfheal_busy, True
            try:
                outcomes = await _drive.arun(self, op)
            finally:
                self._selfheal_busy = busy
            self._selfheal_explicit_report(outcomes, statement)

    async def _selfheal_sync_pending(self, gen: PQGen[None]) -> None:
        assert self._selfheal_pending is not None
        (call, mode, error), self._selfheal_pending = self._selfheal_pending, None
        gen.close()
        self._selfheal_busy = True
        succeeded = False
        try:
            err = await super().wait(_attempt.collect(self._pipeline))
            error = error or err
            if error is None:
                succeeded = True
                self._selfheal_busy = False
                await self._selfheal_explicit(self._selfheal_pending_writes, call.query, True)
                return None
            if not isinstance(error, pgerrors.UniqueViolation):
                raise error
            if mode is _PASS:
                await self._selfheal_heal_only(error, call)
                raise error
            await self._selfheal_heal(error, call, mode)
            succeeded = True
            return None
        finally:
            self._selfheal_busy = False
            self._selfheal_release_notices(succeeded)

    async def _selfheal_heal(self, ex: pgerrors.UniqueViolation, call: _attempt.Call,
                             mode: Mode) -> Any:
        mode = after_failure(mode, _attempt.shape(call.query, self))
        if mode is Mode.HEAL_ONLY:
            await self._selfheal_heal_only(ex, call)
            raise ex
        op = heal_flow(ex, mode, _attempt.shape(call.query, self), self.info.dbname,
                       self.selfheal_options, self._selfheal_not_healable,
                       self._selfheal_planner.facts)

        async def again() -> Any:
            self._selfheal_retrying()
            state = call.cursor_state()
            call.uncount()
            try:
                return await psycopg.AsyncConnection.wait(self, self._selfheal_again(call))
            except psycopg.Error:
                call.restore_cursor(state)
                raise

        return await _drive.arun(self, op, again)

    async def _selfheal_heal_only(self, ex: pgerrors.UniqueViolation,
                                  call: _attempt.Call | None = None) -> None:
        if not worth_healing(ex, self._selfheal_not_healable):
            return
        shape = _attempt.shape(call.query, self) if call else _attempt.shape("", self)
        op = heal_flow(ex, Mode.HEAL_ONLY, shape, self.info.dbname, self.selfheal_options,
                       self._selfheal_not_healable, self._selfheal_planner.facts)
        busy, self._selfheal_busy = self._selfheal_busy, True
        try:
            if self._selfheal_side_needed():
                await _drive.arun_side(self, op)
            else:
                await _drive.arun(self, op)
        except psycopg.Error:
            return
        finally:
            self._selfheal_busy = busy
