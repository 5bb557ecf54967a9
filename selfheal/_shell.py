"""
What the sync and async psycopg connections share: state, decisions and flows.

Every step of a statement that is not on the hot path (planned in full,
protected, healed, its explicit keys looked at, the facts' check before it)
is a flow here: a generator free of I/O that yields what it needs run, a
psycopg generator (the connection waits on it, as psycopg's own methods do)
or a `Drive` (one of selfheal's operations, `selfheal._ops`), and is sent
back its value or thrown its error. `selfheal.wrap.HealingConnection` serves
them with ``wait()`` and `selfheal._drive.run`, `AsyncHealingConnection`
with their async twins; neither decides anything, so they cannot drift apart.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator
from typing import Any, TypeAlias, TypeVar

import psycopg
from psycopg import errors as pgerrors
from psycopg.abc import PQGen
from psycopg.pq import PipelineStatus, TransactionStatus

from . import _attempt, _drive, explicit
from ._sqltext import copy_target, redacted_of
from .detect import NotHealable
from .heal import HealOptions, Mode, after_failure, heal_flow, worth_healing
from .insync import facts_for
from .protect import Planner, Write

__all__ = ["Drive", "Flow"]

_OFF = PipelineStatus.OFF
_PASS, _SAVEPOINT = Mode.PASS, Mode.SAVEPOINT
_EXECUTE = _attempt.EXECUTE
# Whether this libpq has pipelines (a savepoint then travels with the statement;
# without, it would cost round trips of its own: then only executemany() gets one).
_PIPELINES = psycopg.Pipeline.is_supported()
_IDLE = TransactionStatus.IDLE
_INTRANS = TransactionStatus.INTRANS
T = TypeVar("T")


class Drive:
    """Request: drive selfheal's operation `op` on the connection (or on a side
    connection: `side`) and send back its value; its `STATEMENT` requests re-run
    the caller's statement through flow `again`. An error is thrown into the flow."""

    __slots__ = ("again", "op", "side")

    def __init__(self, op: _drive.Operation[Any],
                 again: Callable[[], Flow[Any]] | None = None, side: bool = False) -> None:
        self.op = op
        self.again = again
        self.side = side


#: A step of a healing connection: yields what it needs run, returns its value.
Flow: TypeAlias = Generator[PQGen[Any] | Drive, Any, T]


class _Shell:
    """What the sync and async connections share: state, decisions and flows, no I/O."""

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
        # What the connection's own execute() is about to run, for wait().
        self._selfheal_call: _attempt.Held | None = None
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

    def _selfheal_explicit_op(self, wrote: tuple[Write, ...], query: Any,
                              in_pipeline: bool = False) -> _drive.Operation[None] | None:
        """The looks at the keys a statement that succeeded wrote (`selfheal.explicit`)."""
        options = self.selfheal_options
        if options.explicit_ids == "allow":
            return None
        pgconn = self.pgconn  # type: ignore[attr-defined]
        if pgconn.pipeline_status != _OFF and not in_pipeline:
            return None  # the caller's pipeline: its results are not read yet
        status = pgconn.transaction_status
        if status == _INTRANS:
            where = "transaction"
        elif status == _IDLE and self.autocommit:  # type: ignore[attr-defined]
            where = "autocommit"
        else:
            return None
        database = self.info.dbname  # type: ignore[attr-defined]
        return explicit.after_statement(self._selfheal_planner, wrote, redacted_of(query, self),
                                        where, options, database)

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

    # -- flows: what the connections' wait() runs off the hot path ------------------

    def _selfheal_flow(self, gen: PQGen[Any], code: Any, f: dict[str, Any] | None = None
                       ) -> Flow[Any]:
        """Psycopg generator `gen` (its code object: `code`) off the hot path, from plan
        to heal: the caller's statement, or another step psycopg runs. `f`: the
        locals of an ``execute()`` generator, when read already."""
        call: _attempt.Call | None
        planner = self._selfheal_planner
        wrote: tuple[Write, ...] = ()
        statement: Any = None  # what the explicit keys' looks name, when not call.query
        if code is _EXECUTE:
            if f is None:
                f = gen.gi_frame.f_locals  # type: ignore[attr-defined]
            statement = f["query"]
            pgconn = self.pgconn  # type: ignore[attr-defined]
            if pgconn.pipeline_status != _OFF:
                mode = _PASS
            else:
                mode = planner.plan(pgconn.transaction_status,
                                    self._autocommit,  # type: ignore[attr-defined]
                                    statement, self, self.selfheal_options, _PIPELINES)
                wrote = planner.explicit
            if mode is _PASS:
                call = None
            elif not self._notice_handlers and (  # type: ignore[attr-defined]
                    mode is _SAVEPOINT or not planner.facts.due):
                # Nothing to add before the first attempt but its savepoint, if any.
                try:
                    value = yield (_attempt.savepointed(self, gen) if mode is _SAVEPOINT
                                   else gen)
                except pgerrors.UniqueViolation as ex:
                    return (yield from self._selfheal_first_failed(
                        ex, _attempt.execute_call(f), mode))
                if wrote:
                    yield from self._selfheal_explicit(wrote, statement)
                return value
            else:
                call = _attempt.execute_call(f)
        elif code is _attempt.EXIT and self._selfheal_pending is not None:
            return (yield from self._selfheal_sync_pending(gen))
        else:
            call = _attempt.call_of(gen, code)
            if call is None:
                if self._selfheal_other(code, gen):
                    lost = yield from self._selfheal_refresh()
                    if lost is not None:
                        return (yield from self._selfheal_lost(gen, lost))
                elif code is _attempt.COPY_END and self._selfheal_copy is not None:
                    # A COPY FROM into a table with a sequence-backed key ends.
                    wrote, statement = self._selfheal_copy
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
                value = yield gen
            except pgerrors.UniqueViolation as ex:
                yield from self._selfheal_heal_only(ex)
                raise
            if wrote:
                if call is not None and call.pipelined:
                    # Its results are read when executemany() syncs its pipeline.
                    self._selfheal_pending = (call, _PASS, None)
                    self._selfheal_pending_writes = wrote
                else:
                    yield from self._selfheal_explicit(
                        wrote, call.query if call is not None else statement)
            elif planner.deferred and self._selfheal_idle():
                yield from self._selfheal_refresh()  # the transaction that wrote them is over
            return value
        if self._selfheal_refresh_due(mode):
            lost = yield from self._selfheal_refresh()
            if lost is not None:
                return (yield from self._selfheal_lost(gen, lost))
        self._selfheal_busy = True
        self._selfheal_hold_notices()
        succeeded = False
        try:
            if call.pipelined:
                # Queued now, healed when executemany() syncs its pipeline.
                error = yield self._selfheal_first(call, gen, mode)
                self._selfheal_pending = (call, mode, error)
                self._selfheal_pending_writes = wrote
                succeeded = True
                return None
            try:
                value = yield self._selfheal_first(call, gen, mode)
            except pgerrors.UniqueViolation as ex:
                value = yield from self._selfheal_heal(ex, call, mode)
            succeeded = True
        finally:
            self._selfheal_busy = False
            if not (call.pipelined and succeeded):
                self._selfheal_release_notices(succeeded)
        if wrote:
            yield from self._selfheal_explicit(wrote, call.query)
        return value

    def _selfheal_first_failed(self, ex: pgerrors.UniqueViolation, call: _attempt.Call,
                               mode: Mode) -> Flow[Any]:
        """The statement's first attempt, unprotected or under its savepoint, collided."""
        self._selfheal_busy = True
        try:
            return (yield from self._selfheal_heal(ex, call, mode))
        finally:
            self._selfheal_busy = False

    def _selfheal_refresh(self) -> Flow[BaseException | None]:
        """Run the facts' check; return the error it met if it lost the connection."""
        busy, self._selfheal_busy = self._selfheal_busy, True
        try:
            err = yield Drive(self._selfheal_planner.facts.refresh(
                self.selfheal_options.verified_for))
        finally:
            self._selfheal_busy = busy
        if err is not None and self.closed:  # type: ignore[attr-defined]
            return err  # type: ignore[no-any-return]
        # Writes into tables the check has just told about.
        where = "autocommit" if self.autocommit else "idle"  # type: ignore[attr-defined]
        database = self.info.dbname  # type: ignore[attr-defined]
        yield from self._selfheal_settle(explicit.after_check(
            self._selfheal_planner, where, self.selfheal_options, database))
        return None

    def _selfheal_lost(self, gen: PQGen[Any], lost: BaseException) -> Flow[Any]:
        """The check before a statement lost the connection, and met the error the
        statement would have met first with plain psycopg: the statement still runs (its
        cursor is reset as plain psycopg resets it) and fails with that error."""
        try:
            return (yield gen)
        except psycopg.OperationalError:
            raise lost from None

    def _selfheal_explicit(self, wrote: tuple[Write, ...], query: Any,
                           in_pipeline: bool = False) -> Flow[None]:
        yield from self._selfheal_settle(self._selfheal_explicit_op(wrote, query, in_pipeline))

    def _selfheal_settle(self, op: _drive.Operation[None] | None) -> Flow[None]:
        if op is not None:
            busy, self._selfheal_busy = self._selfheal_busy, True
            try:
                yield Drive(op)
            finally:
                self._selfheal_busy = busy

    def _selfheal_sync_pending(self, gen: PQGen[None]) -> Flow[None]:
        """executemany() syncs its pipeline: read, and heal, what it queued."""
        assert self._selfheal_pending is not None
        (call, mode, error), self._selfheal_pending = self._selfheal_pending, None
        gen.close()
        self._selfheal_busy = True
        succeeded = False
        try:
            err = yield _attempt.collect(self._pipeline)  # type: ignore[attr-defined]
            error = error or err
            if error is None:
                succeeded = True
                self._selfheal_busy = False
                yield from self._selfheal_explicit(self._selfheal_pending_writes, call.query,
                                                   True)
                return None
            if not isinstance(error, pgerrors.UniqueViolation):
                raise error
            if mode is _PASS:
                yield from self._selfheal_heal_only(error, call)
                raise error
            yield from self._selfheal_heal(error, call, mode)
            succeeded = True
            return None
        finally:
            self._selfheal_busy = False
            self._selfheal_release_notices(succeeded)

    def _selfheal_heal(self, ex: pgerrors.UniqueViolation, call: _attempt.Call,
                       mode: Mode) -> Flow[Any]:
        """Heal after `call` collided, and retry it once if `mode` allows."""
        mode = after_failure(mode, _attempt.shape(call.query, self))
        if mode is Mode.HEAL_ONLY:
            yield from self._selfheal_heal_only(ex, call)
            raise ex
        op = heal_flow(ex, mode, _attempt.shape(call.query, self),
                       self.info.dbname,  # type: ignore[attr-defined]
                       self.selfheal_options, self._selfheal_not_healable,
                       self._selfheal_planner.facts)

        def again() -> Flow[Any]:
            self._selfheal_retrying()
            state = call.cursor_state()
            call.uncount()
            try:
                return (yield self._selfheal_again(call))
            except psycopg.Error:
                call.restore_cursor(state)
                raise

        return (yield Drive(op, again))

    def _selfheal_heal_only(self, ex: pgerrors.UniqueViolation,
                            call: _attempt.Call | None = None) -> Flow[None]:
        """Heal after a collision the caller gets: on this connection if it is idle in
        autocommit, else on a side connection. Its own errors stay quiet: the caller
        raises `ex`."""
        if not worth_healing(ex, self._selfheal_not_healable):
            return
        shape = _attempt.shape(call.query, self) if call else _attempt.shape("", self)
        op = heal_flow(ex, Mode.HEAL_ONLY, shape,
                       self.info.dbname,  # type: ignore[attr-defined]
                       self.selfheal_options, self._selfheal_not_healable,
                       self._selfheal_planner.facts)
        busy, self._selfheal_busy = self._selfheal_busy, True
        try:
            yield Drive(op, side=self._selfheal_side_needed())
        except psycopg.Error:
            return  # the flow re-raises `ex`; the caller raises it itself
        finally:
            self._selfheal_busy = busy
