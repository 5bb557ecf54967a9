"""
psycopg2's shell: connections whose cursors heal a lagging sequence and retry once.

    conn = psycopg2.connect(dsn, connection_factory=selfheal.psycopg2.HealingConnection)

The decisions are the core's (`selfheal.protect` chooses how a statement is
protected, `selfheal.heal.heal_flow` heals after a collision); this module
only runs the caller's statements and serves the core's requests with
psycopg2's API:

- psycopg2 has no hook below its cursors, so `HealingConnection.cursor()`
  hands out a subclass of the cursor class asked for (any ``cursor_factory``
  that is a cursor class), made once per class, whose ``execute`` and
  ``executemany`` go through the connection. Named (server-side) cursors run
  as they are.
- psycopg2 keeps its own idea of the transaction: it sends BEGIN itself before
  the first statement when autocommit is off (or inside ``with conn:``), and a
  COMMIT or ROLLBACK sent as SQL would put it out of step. So the core's
  transaction commands are served through ``conn.commit()`` and
  ``conn.rollback()`` there, and a scope's BEGIN becomes ``SET TRANSACTION``
  in the transaction psycopg2 opens.
- psycopg2 has no pipeline: a statement protected inside a transaction is
  preceded by ``SAVEPOINT _selfheal`` sent on a private cursor (one round trip
  more), and the savepoint is not released after a success (a RELEASE would
  cost another): it ends with the transaction, and selfheal's bound of 64
  savepoints a transaction counts it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeGuard

import psycopg2
import psycopg2.errors
import psycopg2.extensions as ext

from . import _ops, explicit
from ._ops import STATEMENT, Batch, Command, FreshQuery, Operation, Query, Request, Statement
from ._sqltext import copy_target, redacted_of, shape
from .detect import NotHealable
from .heal import HealOptions, Mode, after_failure, heal_flow, worth_healing
from .insync import facts_for
from .protect import Planner, Write

__all__ = ["HealingConnection", "HealOptions"]

_ops.register(psycopg2.Error)

_IDLE = ext.TRANSACTION_STATUS_IDLE
_INTRANS = ext.TRANSACTION_STATUS_INTRANS
_INERROR = ext.TRANSACTION_STATUS_INERROR
_SAVEPOINT = "SAVEPOINT _selfheal"
_PREFIX = "SAVEPOINT _selfheal; "
_PREFIX_BYTES = _PREFIX.encode()
_PASS = Mode.PASS
#: psycopg2's own ``cursor.query``.
_QUERY: Any = ext.cursor.__dict__["query"]


class _HealingCursor:
    """What every healing cursor class adds to the caller's: execute() through the connection."""

    connection: HealingConnection
    name: str | None
    #: 1 when the query the cursor ran last went behind selfheal's prefix.
    _selfheal_prefix = 0

    @property
    def query(self) -> bytes | None:
        """The query the cursor ran last, as psycopg2 shows it (selfheal's prefix aside)."""
        raw: bytes | None = _QUERY.__get__(self)
        if self._selfheal_prefix and raw is not None and raw.startswith(_PREFIX_BYTES):
            return raw[len(_PREFIX_BYTES):]
        return raw

    #: The caller's cursor class's own execute(), unbound (set per healing class).
    _selfheal_execute: Callable[..., Any]

    def execute(self, query: Any, vars: Any = None) -> None:
        conn = self.connection
        if self._selfheal_prefix:
            self._selfheal_prefix = 0
        if conn._selfheal_busy or self.name is not None:
            return self._selfheal_execute(self, query, vars)  # type: ignore[no-any-return]
        planner = conn._selfheal_planner
        status = conn._selfheal_info.transaction_status
        options = conn.selfheal_options
        mode: Mode | None = None
        if status == _INTRANS:
            mode = planner.quick(_INTRANS, False, query, options)
            if mode is None:
                mode = planner.plan(_INTRANS, False, query, conn, options)
        if mode is _PASS:
            # The hot path: inside a transaction, nothing to protect.
            try:
                value = self._selfheal_execute(self, query, vars)
            except psycopg2.errors.UniqueViolation as ex:
                conn._selfheal_heal_only(ex, query)
                raise
            if planner.explicit:
                conn._selfheal_explicit(planner.explicit, query)
            return value  # type: ignore[no-any-return]
        if status == _IDLE:
            # The other hot path: the statement opens a transaction, or autocommits.
            mode = planner.quick(_IDLE, not conn._selfheal_implicit(), query, options)
            if mode is not None:
                notices = list(conn.notices)
                try:
                    value = self._selfheal_execute(self, query, vars)
                except psycopg2.errors.UniqueViolation as ex:
                    return conn._selfheal_failed(  # type: ignore[no-any-return]
                        ex, lambda: self._selfheal_execute(self, query, vars), query, mode,
                        notices)
                if planner.deferred and conn._selfheal_info.transaction_status == _IDLE:
                    conn._selfheal_refresh()  # the transaction that wrote them is over
                return value  # type: ignore[no-any-return]
        return conn._selfheal_run(super().execute, query, vars, False, mode)  # type: ignore[misc, no-any-return]

    def executemany(self, query: Any, vars_list: Any) -> None:
        conn = self.connection
        if self._selfheal_prefix:
            self._selfheal_prefix = 0
        if conn._selfheal_busy or self.name is not None:
            return super().executemany(query, vars_list)  # type: ignore[misc, no-any-return]
        # A list: a retry needs the rows again.
        return conn._selfheal_run(super().executemany, query, list(vars_list), True)  # type: ignore[misc, no-any-return]


    def copy_from(self, file: Any, table: str, *args: Any, **kwargs: Any) -> None:
        super().copy_from(file, table, *args, **kwargs)  # type: ignore[misc]
        columns = kwargs.get("columns", args[3] if len(args) > 3 else None)
        self.connection._selfheal_copied((table,), columns,
                                         f"COPY {table} FROM STDIN")

    def copy_expert(self, sql: Any, file: Any, *args: Any, **kwargs: Any) -> None:
        super().copy_expert(sql, file, *args, **kwargs)  # type: ignore[misc]
        text = sql if isinstance(sql, str) else getattr(sql, "as_string", None)
        if callable(text):
            text = text(self.connection)
        target = copy_target(text) if isinstance(text, str) else None
        if target is not None:
            self.connection._selfheal_copied(target[0], target[1], text)  # type: ignore[arg-type]


_classes: dict[type[Any], type[Any]] = {}
_classes_lock = threading.Lock()


def _healing_class(factory: type[Any]) -> type[Any]:
    """The healing subclass of cursor class `factory`, made once."""
    found = _classes.get(factory)
    if found is None:
        with _classes_lock:
            found = _classes.get(factory)
            if found is None:
                found = type(factory.__name__, (_HealingCursor, factory),
                             {"__module__": factory.__module__,
                              "_selfheal_execute": staticmethod(factory.execute)})
                _classes[factory] = found
    return found


class HealingConnection(ext.connection):
    """A psycopg2 connection that heals lagging sequences behind primary keys.

    Use it as ``connection_factory=`` of `psycopg2.connect`, of the
    `psycopg2.pool` classes, or in SQLAlchemy's and Django's connect
    arguments. Options: `selfheal_options` on the instance, or a configured
    subclass from `with_options()`.
    """

    #: How connections of this class heal; see `HealOptions`.
    selfheal_options: HealOptions = HealOptions()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Set while selfheal runs statements of its own or the caller's again.
        self._selfheal_busy = False
        # Inside `with conn:`, where psycopg2 opens transactions even in autocommit.
        self._selfheal_entered = 0
        self._selfheal_not_healable = NotHealable()
        # How selfheal's own scope was opened: by psycopg2 ("psycopg2") or as SQL.
        self._selfheal_scope: str | None = None
        # One ConnectionInfo (psycopg2 makes a new one on every `info` read).
        self._selfheal_info = info = self.info
        self._selfheal_planner = Planner(
            facts_for((info.host, info.port, info.dbname)), info.user,
            lambda: info.parameter_status("search_path"), shape, multi_savepoints=True)

    @classmethod
    def with_options(cls, **options: Any) -> type[HealingConnection]:
        """A subclass with these `HealOptions`, e.g. for ``connection_factory=``."""
        return type(cls.__name__, (cls,), {"selfheal_options": HealOptions(**options)})

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        """As psycopg2's; the cursor is a healing subclass of the class asked for."""
        if not args and not kwargs:
            # The common call: the connection's factory, whose class is made already.
            factory: Any = self.cursor_factory
            found = _classes.get(factory or ext.cursor)
            if found is not None:
                return super().cursor(cursor_factory=found)
        if len(args) >= 2:
            factory = args[1]
            if _subclassable(factory):
                args = (args[0], _healing_class(factory), *args[2:])
        else:
            factory = (kwargs.get("cursor_factory") or getattr(self, "cursor_factory", None)
                       or ext.cursor)
            if _subclassable(factory):
                kwargs["cursor_factory"] = _healing_class(factory)
        return super().cursor(*args, **kwargs)

    def commit(self) -> None:
        """As psycopg2's; writes of the transaction into tables not known yet are looked at."""
        super().commit()
        if self._selfheal_planner.deferred and not self._selfheal_busy:
            self._selfheal_refresh()

    def __enter__(self) -> Any:
        value = super().__enter__()
        self._selfheal_entered += 1
        return value

    def __exit__(self, *exc: Any) -> Any:
        self._selfheal_entered -= 1
        return super().__exit__(*exc)

    # -- running the caller's statement -------------------------------------------

    def _selfheal_lost(self, method: Callable[[Any, Any], Any], query: Any, params: Any,
                       lost: BaseException) -> Any:
        """The check before a statement lost the connection, and met the error the
        statement would have met first with plain psycopg2: the statement still runs (its
        cursor notes it as plain psycopg2's does) and fails with that error."""
        try:
            return method(query, params)
        except psycopg2.InterfaceError:
            raise lost from None

    def _selfheal_implicit(self) -> bool:
        """Whether psycopg2 opens a transaction before the next statement itself.

        It does when autocommit is off (or inside ``with conn:``) and it
        believes no transaction is open: a COMMIT the caller sent as SQL
        leaves it believing one still is, and the next statement autocommits.
        """
        return ((not self.autocommit or self._selfheal_entered > 0)
                and self.status == ext.STATUS_READY)

    def _selfheal_run(self, method: Callable[[Any, Any], Any], query: Any, params: Any,
                      many: bool, mode: Mode | None = None) -> Any:
        """Run the caller's statement, protected as `selfheal.protect` decides (`mode`,
        when decided already inside the transaction)."""
        status = self._selfheal_info.transaction_status
        planner = self._selfheal_planner
        options = self.selfheal_options
        if mode is None and status == _IDLE:
            autocommit = not self._selfheal_implicit()
            mode = planner.plan(status, autocommit, query, self, options)
            if planner.facts.due:
                # What the statement asked to know (or earlier ones) is read first.
                lost = self._selfheal_refresh()
                if lost is not None:
                    return self._selfheal_lost(method, query, params, lost)
                mode = planner.plan(status, autocommit, query, self, options)
            if many and autocommit:
                # In autocommit executemany() commits row by row: rows before
                # a failure are in, so it is never run twice.
                mode = Mode.HEAL_ONLY
        elif mode is None:
            mode = planner.plan(status, self.autocommit, query, self, options)
        wrote = planner.explicit
        if mode is _PASS or mode is Mode.HEAL_ONLY:
            try:
                value = method(query, params)
            except psycopg2.errors.UniqueViolation as ex:
                self._selfheal_heal_only(ex, query)
                raise
        else:
            value = self._selfheal_protected(method, query, params, mode, many)
        if wrote:
            self._selfheal_explicit(wrote, query)
        elif planner.deferred and self._selfheal_info.transaction_status == _IDLE:
            self._selfheal_refresh()  # the transaction that wrote them is over
        return value

    def _selfheal_protected(self, method: Callable[[Any, Any], Any], query: Any, params: Any,
                            mode: Mode, many: bool) -> Any:
        notices = list(self.notices)
        if mode is Mode.SAVEPOINT:
            prefixed = None if many else _prefixed(query, self)
            if prefixed is not None:
                return self._selfheal_prefixed(method, query, prefixed, params, notices)
            self._selfheal_private(_SAVEPOINT)
        try:
            return method(query, params)
        except psycopg2.errors.UniqueViolation as ex:
            return self._selfheal_failed(ex, lambda: method(query, params), query, mode,
                                         notices)

    def _selfheal_failed(self, ex: Exception, run: Callable[[], Any], query: Any, mode: Mode,
                         notices: list[Any]) -> Any:
        """The caller's statement (`run` runs it again) collided on its first attempt:
        heal it, and retry as `mode` allows."""
        if mode is Mode.AUTOCOMMIT and self._selfheal_info.transaction_status == _INERROR:
            mode = Mode.OPENED  # `with conn:` opened the transaction
        return self._selfheal_heal(ex, run, query, mode, notices)

    def _selfheal_prefixed(self, method: Callable[[Any, Any], Any], query: Any, prefixed: Any,
                           params: Any, notices: list[Any]) -> Any:
        """Run `query` as one string behind ``SAVEPOINT _selfheal;``: one round trip.

        psycopg2 keeps the last result of a string, the statement's, so the
        cursor shows what plain psycopg2 shows; its ``query`` reads without
        the prefix. An error whose message points into the text (a position:
        parsing and analysis, before anything ran) is raised by the statement
        run again without the prefix, after rolling back to the savepoint, so
        that it reads as plain psycopg2's.
        """
        cur = method.__self__  # type: ignore[attr-defined]
        cur._selfheal_prefix = 1
        try:
            return method(prefixed, params)
        except psycopg2.errors.UniqueViolation as ex:
            cur._selfheal_prefix = 0
            return self._selfheal_heal(ex, lambda: method(query, params), query, Mode.SAVEPOINT,
                                       notices)
        except psycopg2.Error as ex:
            cur._selfheal_prefix = 0
            if getattr(ex.diag, "statement_position", None) is None:
                raise
            try:
                self._selfheal_private("ROLLBACK TO SAVEPOINT _selfheal")
            except psycopg2.Error:
                raise ex from None
            if isinstance(self.notices, list):
                self.notices[:] = notices
            return method(query, params)

    def _selfheal_heal(self, ex: Exception, run: Callable[[], Any], query: Any, mode: Mode,
                       notices: list[Any]) -> Any:
        s = shape(query, self)
        mode = after_failure(mode, s)
        if mode is Mode.HEAL_ONLY:
            self._selfheal_heal_only(ex, query)
            raise ex
        op = heal_flow(ex, mode, s, self.info.dbname, self.selfheal_options,
                       self._selfheal_not_healable, self._selfheal_planner.facts)
        failed = list(self.notices)

        def again() -> Any:
            # The caller sees the notices of the attempt that counts only: the
            # retry's when it succeeds, else the first's (the error is the first's).
            try:
                value = run()
            except BaseException:
                if isinstance(self.notices, list):
                    self.notices[:] = failed
                raise
            if isinstance(self.notices, list):
                retried = self.notices[len(failed):]
                self.notices[:] = notices + retried
            return value

        return self._selfheal_drive(op, again)

    def _selfheal_heal_only(self, ex: Exception, query: Any) -> None:
        if not worth_healing(ex, self._selfheal_not_healable):
            return
        op = heal_flow(ex, Mode.HEAL_ONLY, shape(query, self), self.info.dbname,
                       self.selfheal_options, self._selfheal_not_healable,
                       self._selfheal_planner.facts)
        try:
            if not self._selfheal_implicit() and self.info.transaction_status == _IDLE:
                self._selfheal_drive(op)
            else:
                with _side(self) as side:
                    side._selfheal_drive(op)
        except psycopg2.Error:
            return  # the flow re-raises `ex`; the caller raises it itself

    def _selfheal_refresh(self) -> BaseException | None:
        """Run the facts' check; return the error it met if it lost the connection."""
        planner = self._selfheal_planner
        err: BaseException | None = self._selfheal_drive(
            planner.facts.refresh(self.selfheal_options.verified_for))
        if err is not None and self.closed:
            return err
        op = explicit.after_check(planner, "idle" if self._selfheal_implicit() else "autocommit",
                                  self.selfheal_options, self.info.dbname)
        if op is not None:
            self._selfheal_drive(op)
        return None

    def _selfheal_explicit(self, wrote: tuple[Write, ...], query: Any) -> None:
        """After a statement that wrote keys of its own: look, advance (`selfheal.explicit`)."""
        options = self.selfheal_options
        if options.explicit_ids == "allow":
            return
        status = self._selfheal_info.transaction_status
        if status == _INTRANS:
            where = "transaction"
        elif status == _IDLE and not self._selfheal_implicit():
            where = "autocommit"
        else:
            return  # a statement of selfheal's would open a transaction
        op = explicit.after_statement(self._selfheal_planner, wrote, redacted_of(query, self),
                                      where, options, self.info.dbname)
        if op is not None:
            self._selfheal_drive(op)

    def _selfheal_copied(self, name: tuple[str, ...], columns: Any, statement: str) -> None:
        """A COPY FROM ended: the keys it may have written are looked at."""
        if self._selfheal_busy or self.selfheal_options.explicit_ids == "allow":
            return
        writes = self._selfheal_planner.copy_writes(
            name, None if columns is None else frozenset(columns))
        if writes:
            self._selfheal_explicit(writes, statement)

    # -- serving the core's requests ----------------------------------------------

    def _selfheal_drive(self, op: Operation[Any], statement: Callable[[], Any] | None = None
                        ) -> Any:
        def serve(req: Request) -> Any:
            if req is STATEMENT and statement is not None:
                return statement()
            return self._selfheal_serve(req)

        busy, self._selfheal_busy = self._selfheal_busy, True
        try:
            return _ops.drive(op, serve)
        finally:
            self._selfheal_busy = busy

    def _selfheal_serve(self, req: Request) -> Any:
        if isinstance(req, Query):
            return self._selfheal_private(req.query, req.params)
        if isinstance(req, Command):
            self._selfheal_command(req.command)
            return []
        if isinstance(req, Batch):
            return [self._selfheal_serve(q) for q in req.queries]
        if isinstance(req, FreshQuery):
            with _side(self, req.settings) as side:
                return side._selfheal_serve(req.query)
        if isinstance(req, Statement):
            raise TypeError("this operation needs a statement to re-run")
        raise TypeError(f"unknown request {req!r}")

    def _selfheal_command(self, command: str) -> None:
        # psycopg2 keeps track of the transactions it opens: those are opened
        # by psycopg2 itself and closed by commit() and rollback(); a COMMIT
        # or ROLLBACK sent as SQL would put it out of step with the server.
        if command.startswith("BEGIN"):
            if self._selfheal_implicit():
                self._selfheal_scope = "psycopg2"
                characteristics = command[len("BEGIN"):].strip()
                # psycopg2 sends BEGIN before this, its first statement.
                self._selfheal_private(f"SET TRANSACTION {characteristics}"
                                       if characteristics else "SELECT")
            else:
                self._selfheal_scope = "sql"
                self._selfheal_private(command)
        elif command in ("ROLLBACK", "COMMIT"):
            # No scope of selfheal's: the caller's transaction, which psycopg2
            # opened (the statement that opened it failed).
            scope, self._selfheal_scope = self._selfheal_scope, None
            if scope == "sql":
                self._selfheal_private(command)
            elif command == "ROLLBACK":
                self.rollback()
            else:
                self.commit()
        else:
            self._selfheal_private(command)

    def _selfheal_private(self, query: Any, params: Any = None) -> list[Any]:
        """Run one of selfheal's statements on a cursor of its own; its rows."""
        text = query if isinstance(query, str) else query.as_string(None)
        busy, self._selfheal_busy = self._selfheal_busy, True
        try:
            with ext.cursor(self) as cur:
                cur.execute(text, params)
                return cur.fetchall() if cur.description is not None else []
        finally:
            self._selfheal_busy = busy


def _prefixed(query: Any, conn: Any) -> str | bytes | None:
    """`query` behind selfheal's savepoint, in one string; None if it cannot be."""
    if isinstance(query, str):
        return _PREFIX + query
    if isinstance(query, bytes):
        return _PREFIX_BYTES + query
    as_string = getattr(query, "as_string", None)
    if callable(as_string):
        try:
            text = as_string(conn)
        except Exception:
            return None
        return _PREFIX + text if isinstance(text, str) else None
    return None


def _subclassable(factory: Any) -> TypeGuard[type[Any]]:
    return (isinstance(factory, type) and issubclass(factory, ext.cursor)
            and not issubclass(factory, _HealingCursor))


class _Side:
    """A short-lived autocommit connection to the caller's database."""

    def __init__(self, conn: HealingConnection, settings: dict[str, str] | None) -> None:
        params = dict(conn.info.dsn_parameters)
        params.pop("options", None)  # the caller's session settings are not the heal's
        password = conn.info.password
        if password:
            params["password"] = password
        if settings:
            params["options"] = _ops.libpq_options(settings)
        self._params = params
        self._conn: HealingConnection | None = None

    def __enter__(self) -> HealingConnection:
        side: HealingConnection = psycopg2.connect(  # type: ignore[call-overload]
            None, connection_factory=HealingConnection, **self._params)
        side.autocommit = True
        side._selfheal_busy = True  # its statements are selfheal's own
        self._conn = side
        return side

    def __exit__(self, *exc: Any) -> None:
        if self._conn is not None:
            self._conn.close()


def _side(conn: HealingConnection, settings: dict[str, str] | None = None) -> _Side:
    return _Side(conn, settings)
