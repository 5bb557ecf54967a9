"""
Resync: move a sequence past its table's keys, never backwards.

"Read max(id), then setval()" is racy: other sessions keep calling nextval()
between the read and the write, so a stale target can move the sequence
backwards and hand out ids already in use. selfheal instead:

- serializes healers of one sequence on an advisory lock (bounded by
  lock_timeout, so it cannot deadlock with a caller's transaction);
- advances small gaps by drawing values with nextval(), which is monotonic by
  construction whatever other sessions do;
- advances large gaps with one setval() guarded to act only while the
  sequence is still short of the target: a concurrent writer would have to
  draw the whole gap inside that one statement to be overtaken.

All work happens inside a transaction or savepoint that is rolled back at the
end: sequence changes are not transactional and survive it, while the
caller's transaction, settings and locks are left as they were.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from psycopg import sql
from psycopg.pq import TransactionStatus

from . import _ops, errors
from ._ops import Batch, Command, FreshQuery, Operation, Query, Request
from .discover import TableInfo, Unreadable, describe, list_readable, permission_denied

__all__ = [
    "DRAW_LIMIT",
    "ResyncResult",
    "SequenceStatus",
    "advance",
    "check_op",
    "resync_op",
    "scoped",
]

#: Gaps up to this many values are closed by drawing them with nextval();
#: larger ones by a guarded setval(). Drawing runs at millions of values a
#: second, so this bound keeps a heal within a few milliseconds.
DRAW_LIMIT = 10_000

#: Keys past the sequence are counted up to this many (one bounded index scan).
CAUSE_LIMIT = 1000

#: Default bound, in seconds, on lock waits during a resync.
LOCK_TIMEOUT = 2.0

#: Default bound, in seconds, on any one statement of a resync.
STATEMENT_TIMEOUT = 10.0

T = TypeVar("T")

# Advisory locks of selfheal live in their own key space: this prefix in the
# high 32 bits, the sequence's oid in the low 32.
_LOCK_SPACE = 0x5E1F


@dataclass(frozen=True)
class ResyncResult:
    """What a resync did. `before`/`after` are what the next nextval() returns."""

    schema: str
    table: str
    column: str
    sequence: str
    before: int
    after: int
    #: "nextval" (values drawn), "setval" (guarded jump) or "none".
    method: str = "none"
    #: The highest key (lowest for a descending sequence), None for an empty table.
    key_value: int | None = None
    #: What the heal found of the cause: how many keys lay at or past the
    #: sequence's next value (counted up to `CAUSE_LIMIT`), and the first of
    #: them; the last is `key_value`. None when the sequence was already past.
    keys_past: int | None = None
    first_key_past: int | None = None

    @property
    def changed(self) -> bool:
        """True when this call moved the sequence."""
        return self.method != "none"


@dataclass(frozen=True)
class SequenceStatus:
    """One sequence-backed primary key as `check` found it."""

    schema: str
    table: str
    column: str
    sequence: str
    #: The highest key in the table, None when it is empty (or, read by
    #: `check`, when the sequence descends: only the end it runs towards counts).
    max_value: int | None
    #: The lowest key in the table, None when it is empty (or, read by `check`,
    #: when the sequence ascends).
    min_value: int | None
    #: What the next nextval() would return.
    next_value: int
    #: The sequence's increment (negative for a descending sequence).
    increment: int
    #: The primary key constraint (for audit events; not part of `as_dict`).
    constraint: str = field(default="", compare=False)

    @property
    def in_sync(self) -> bool:
        """True when the next value lies past every existing key."""
        if self.increment > 0:
            return self.max_value is None or self.next_value > self.max_value
        return self.min_value is None or self.next_value < self.min_value

    def as_dict(self) -> dict[str, Any]:
        """The status as plain data, `in_sync` included (for JSON output)."""
        return {
            "schema": self.schema,
            "table": self.table,
            "column": self.column,
            "sequence": self.sequence,
            "max_value": self.max_value,
            "min_value": self.min_value,
            "next_value": self.next_value,
            "increment": self.increment,
            "in_sync": self.in_sync,
        }


# -- arithmetic (pure) --------------------------------------------------------


def next_value(last_value: int, is_called: bool, increment: int) -> int:
    """What nextval() returns next, from a sequence's ``last_value``/``is_called``."""
    return last_value + increment if is_called else last_value


def target_value(next_val: int, increment: int, key_value: int | None) -> int | None:
    """The first value on the sequence's stride past `key_value`, or None if already past.

    Staying on the stride (next_val + k * increment) keeps interleaved
    sequences (increment 5 with different starts) from meeting each other.
    """
    if key_value is None:
        return None
    step = abs(increment)
    # Work in the direction of the sequence: "past" is above for ascending.
    ahead = (key_value - next_val) if increment > 0 else (next_val - key_value)
    if ahead < 0:
        return None
    draws = ahead // step + 1
    return next_val + draws * increment


# -- the operation (I/O-free) --------------------------------------------------


def _scope(status: TransactionStatus) -> tuple[list[str], list[str]]:
    """Statements that open and close a throw-away scope on a connection.

    Inside the caller's transaction: a savepoint. Otherwise a transaction of
    our own, always READ COMMITTED, so that each statement sees what was
    committed before it (the advisory lock may be granted long after the
    scope opened).
    """
    if status == TransactionStatus.INTRANS:
        return (["SAVEPOINT _selfheal_resync"], ["ROLLBACK TO SAVEPOINT _selfheal_resync",
                                                 "RELEASE SAVEPOINT _selfheal_resync"])
    if status != TransactionStatus.IDLE:
        raise errors.ResyncError(
            "cannot resync on a connection whose transaction has failed; roll it back first"
        )
    # Sent as commands (see `Command`), also where psycopg would open the
    # transaction itself: it follows the server's transaction status.
    return (["BEGIN ISOLATION LEVEL READ COMMITTED"], ["ROLLBACK"])


def scoped(status: TransactionStatus, body: Operation[T]) -> Operation[T]:
    """Run `body` in a throw-away scope (see `_scope`), closed however it ends.

    Sequence changes are not transactional: they survive the rollback, while
    the caller's transaction, settings and locks are left as they were.
    """
    opening, closing = _scope(status)
    handled: tuple[type[Exception], ...] = (*_ops.ERRORS, errors.SelfhealError)
    try:
        result = yield from _opened([Command(stmt) for stmt in opening], body)
    except handled:
        yield from _close(closing)
        raise
    yield from _close(closing)
    return result


def _opened(opening: list[Command], body: Operation[T]) -> Operation[T]:
    """`body`, its first request sent behind `opening` in one `Batch` (one round
    trip where the driver pipelines); an error of either reaches `body` there."""
    try:
        req: Request = next(body)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]  # nothing to run: no scope
    value: Any = None
    error: BaseException | None = None
    try:
        if isinstance(req, Batch):
            value = (yield Batch([*opening, *req.queries]))[len(opening):]
        elif isinstance(req, (Query, Command)):
            value = (yield Batch([*opening, req]))[-1]
        else:  # a fresh connection's, or the caller's statement: the scope opens alone
            yield from opening
            value = yield req
    except BaseException as ex:  # thrown into `body`, as at its own request
        error = ex
    while True:
        try:
            req = body.throw(error) if error is not None else body.send(value)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        error = None
        try:
            value = yield req
        except BaseException as ex:
            error = ex


def _timeouts(lock_timeout: float, statement_timeout: float) -> dict[str, str]:
    """The heal's bounds as server settings, for our scope and any side connection."""
    return {
        "lock_timeout": f"{int(lock_timeout * 1000)}ms",
        "statement_timeout": f"{int(statement_timeout * 1000)}ms",
    }


def _key_extremes(info: TableInfo) -> sql.Composed:
    return sql.SQL("SELECT max({col}), min({col}) FROM {tbl}").format(
        col=sql.Identifier(info.column), tbl=info.table_ident
    )


def _seq_state(info: TableInfo) -> Query:
    return Query(
        sql.SQL(
            "SELECT last_value, is_called, current_setting('transaction_isolation') FROM {}"
        ).format(info.sequence_ident)
    )


def lock_key(info: TableInfo) -> int:
    """The advisory lock key that serializes everything moving `info`'s sequence."""
    key = (_LOCK_SPACE << 32) | info.sequence_oid
    return key - (1 << 64) if key >= 1 << 63 else key


def advance(
    info: TableInfo,
    lock_timeout: float = LOCK_TIMEOUT,
    statement_timeout: float = STATEMENT_TIMEOUT,
    draw_limit: int = DRAW_LIMIT,
    drain_cache: bool = False,
) -> Operation[ResyncResult]:
    """Move `info`'s sequence past the table's keys; run it inside `scoped`.

    `drain_cache`: the connection is the session whose statement collided.
    With CACHE n > 1 it may still hold pre-allocated values below the keys,
    which its retry would draw; drawing n more values empties that cache.
    """
    timeouts = _timeouts(lock_timeout, statement_timeout)
    try:
        # One round trip where the driver pipelines: the bounds, the lock, then
        # (once it is granted: each statement reads what is committed by then)
        # the keys and the sequence.
        _, _, ((key_max, key_min),), ((last, called, isolation),) = yield Batch([
            Query("SELECT set_config('lock_timeout', %(lock_timeout)s, true),"
                  " set_config('statement_timeout', %(statement_timeout)s, true)", timeouts),
            Query("SELECT pg_advisory_xact_lock(%s)", (lock_key(info),)),
            Query(_key_extremes(info)),
            _seq_state(info),
        ])
        if isolation != "read committed":
            # The caller's snapshot predates rows committed since; also look
            # at them from a fresh one, and keep the caller's own rows too.
            (fmax, fmin), = yield FreshQuery(Query(_key_extremes(info)), timeouts)
            key_max = _pick(max, key_max, fmax)
            key_min = _pick(min, key_min, fmin)
        key = key_max if info.increment > 0 else key_min
        before = next_value(last, called, info.increment)
        target = target_value(before, info.increment, key)
        method = "none"
        moves: list[Query | Command] = []
        if target is not None:
            if not info.min_value <= target <= info.max_value:
                raise errors.SequenceExhausted(
                    f"sequence {info.sequence} cannot move past key {key} of"
                    f" {info.qualified_table}: the next value {target} is beyond its"
                    f" {'MAXVALUE' if info.increment > 0 else 'MINVALUE'}"
                )
            draws = (target - before) // info.increment
            method = "nextval" if draws <= draw_limit else "setval"
            moves = [_keys_past(info, before),
                     _draw(info, draws) if draws <= draw_limit else _guarded_setval(info, target)]
        if drain_cache and info.cache > 1:
            moves.append(_draw(info, info.cache))
        # The cause, the move and the state after it: one more round trip.
        results = yield Batch([*moves, _seq_state(info)])
        past = first = None
        if target is not None:
            (past, first), = results[0]
        (last, called, _), = results[-1]
        after = next_value(last, called, info.increment)
    except _ops.ERRORS as ex:
        raise _translate(ex, info) from ex
    return ResyncResult(
        schema=info.schema,
        table=info.table,
        column=info.column,
        sequence=info.sequence,
        before=before,
        after=after,
        method=method,
        key_value=key,
        keys_past=past,
        first_key_past=first,
    )


def _keys_past(info: TableInfo, next_val: int) -> Query:
    # The keys the sequence would run into, nearest first: what drifted it
    # (one explicit id far ahead, or a whole seeded range) reads from these.
    ascending = info.increment > 0
    return Query(
        sql.SQL(
            "SELECT count(*), {first}(k) FROM (SELECT {col} AS k FROM {tbl}"
            " WHERE {col} {cmp} %s ORDER BY {col} {order} LIMIT %s) s"
        ).format(first=sql.SQL("min" if ascending else "max"),
                 col=sql.Identifier(info.column), tbl=info.table_ident,
                 cmp=sql.SQL(">=" if ascending else "<="),
                 order=sql.SQL("ASC" if ascending else "DESC")),
        (next_val, CAUSE_LIMIT),
    )


def causes_query(statuses: Sequence[SequenceStatus]) -> Query:
    """What drifted each of `statuses` (out of sync): one query for them all.

    Its rows are ``(index, count, first)``: how many keys lie at or past the
    sequence's next value (counted up to `CAUSE_LIMIT`) and the nearest one.
    """
    parts = []
    for i, st in enumerate(statuses):
        ascending = st.increment > 0
        parts.append(sql.SQL(
            "SELECT {i}, count(*), {first}(k) FROM (SELECT {col} AS k FROM {tbl}"
            " WHERE {col} {cmp} {next} ORDER BY {col} {order} LIMIT {limit}) s{i}"
        ).format(i=sql.Literal(i), first=sql.SQL("min" if ascending else "max"),
                 col=sql.Identifier(st.column), tbl=sql.Identifier(st.schema, st.table),
                 cmp=sql.SQL(">=" if ascending else "<="), next=sql.Literal(st.next_value),
                 order=sql.SQL("ASC" if ascending else "DESC"),
                 limit=sql.Literal(CAUSE_LIMIT)))
    return Query(sql.SQL(" UNION ALL ").join(parts))


def _close(closing: list[str]) -> Operation[None]:
    """Close a scope; the error that brought us here matters more than this one."""
    try:
        if len(closing) == 1:
            yield Command(closing[0])
        else:
            yield Batch([Command(stmt) for stmt in closing])  # one round trip
    except _ops.ERRORS:
        return


def _pick(fn: Any, a: int | None, b: int | None) -> int | None:
    vals = [v for v in (a, b) if v is not None]
    return fn(vals) if vals else None


def _draw(info: TableInfo, count: int) -> Query:
    # Monotonic by construction: every value drawn is one nobody else gets.
    return Query(
        sql.SQL("SELECT max(nextval({}::oid::regclass)) FROM generate_series(1, %s)").format(
            sql.Literal(info.sequence_oid)
        ),
        (count,),
    )


def _guarded_setval(info: TableInfo, target: int) -> Query:
    # Acts only while the sequence is short of the target, in one statement.
    short = ">" if info.increment > 0 else "<"
    return Query(
        sql.SQL(
            "SELECT setval({oid}::oid::regclass, %(t)s, false) FROM {seq}"
            " WHERE %(t)s {short} (CASE WHEN is_called THEN last_value + %(inc)s"
            " ELSE last_value END)"
        ).format(oid=sql.Literal(info.sequence_oid), seq=info.sequence_ident, short=sql.SQL(short)),
        {"t": target, "inc": info.increment},
    )


def _translate(ex: Exception, info: TableInfo) -> errors.SelfhealError:
    where = f"{info.qualified_table} (sequence {info.sequence})"
    state = _ops.sqlstate_of(ex)
    detail = errors.first_line(ex)
    if state == "55P03":  # lock_not_available
        return errors.LockTimeout(f"lock wait timed out while resyncing {where}", sqlstate=state)
    if state == "42501":  # insufficient_privilege
        return errors.PermissionDenied(
            f"permission denied resyncing {where}: {detail}; selfheal needs SELECT on the"
            " key column, and SELECT and UPDATE on the sequence",
            sqlstate=state,
        )
    if state == "25006":  # read_only_sql_transaction
        return errors.ReadOnly(f"cannot resync {where} on a read-only server or transaction",
                               sqlstate=state)
    if state == "2200H":  # sequence_generator_limit_exceeded
        return errors.SequenceExhausted(f"sequence {info.sequence} reached its limit: {detail}")
    return errors.ResyncError(f"resync of {where} failed: {detail}", sqlstate=state)


def resync_op(table: str, schema: str | None, lock_timeout: float
              ) -> Operation[ResyncResult]:
    try:
        info = yield from describe(table, schema)
    except _ops.ERRORS as ex:
        raise errors.ResyncError(f"cannot look up table {table!r}: {ex}",
                                 sqlstate=_ops.sqlstate_of(ex)) from ex
    return (yield from advance(info, lock_timeout))


#: The most tables one `status_query` reads: two columns each, and a SELECT
#: list holds at most 1,664.
STATUS_TABLES = 800


def status_query(infos: Sequence[TableInfo]) -> Query:
    """One query reading every table's key extreme and sequence state (read it with
    `statuses`): at most `STATUS_TABLES` tables.

    One row, two columns a table, each a scalar subquery: on a backend that
    has just started (a fleet check connects to each database afresh) this
    plans faster than a UNION ALL of a row per table, and as fast on one that
    runs a while.
    """
    if len(infos) > STATUS_TABLES:
        raise ValueError(f"at most {STATUS_TABLES} tables a status query")
    # Only the end of the keys the sequence runs towards: one index probe a table.
    cell = sql.SQL("(SELECT {extreme}({col}) FROM {tbl}),"
                   " (SELECT ARRAY[last_value, is_called::int] FROM {seq})")
    return Query(sql.SQL("SELECT {}").format(sql.SQL(", ").join(
        cell.format(
            extreme=sql.SQL("max" if info.increment > 0 else "min"),
            col=sql.Identifier(info.column),
            tbl=info.table_ident,
            seq=info.sequence_ident,
        )
        for info in infos
    )))


def statuses(infos: Sequence[TableInfo], rows: Sequence[Sequence[Any]]) -> list[SequenceStatus]:
    """The `SequenceStatus` of each of `infos`, from the rows of its `status_query`."""
    (row,) = rows
    out = []
    for i, info in enumerate(infos):
        key, (last, called) = row[2 * i], row[2 * i + 1]
        ascending = info.increment > 0
        out.append(SequenceStatus(
            schema=info.schema,
            table=info.table,
            column=info.column,
            sequence=info.sequence,
            max_value=key if ascending else None,
            min_value=None if ascending else key,
            next_value=next_value(last, bool(called), info.increment),
            increment=info.increment,
            constraint=info.constraint,
        ))
    return out


def check_op(
    schemas: list[str] | None,
    tables: list[str] | None,
    exclude_schemas: list[str] | None = None,
    chunk: int = 500,
    unreadable: list[Unreadable] | None = None,
    guess: Sequence[TableInfo] | None = None,
    guess_out: list[TableInfo] | None = None,
) -> Operation[list[SequenceStatus]]:
    # `unreadable`: collects the tables the role cannot read, instead of raising.
    # `guess`: the tables a sibling database had (tenants cloned from one
    # template, or migrated alike, have the same): their status query travels
    # with the discovery, and serves when the discovery finds the same tables.
    discovery = list_readable(schemas, tables, exclude_schemas)
    request = next(discovery)
    assert isinstance(request, Query)
    rows = guessed = None
    if guess and len(guess) <= chunk:
        try:
            rows, guessed = yield Batch([request, status_query(guess)])
        except _ops.ERRORS:
            rows = None  # not the same tables after all
    if rows is None:
        rows = yield request
    try:
        discovery.send(rows)
    except StopIteration as stop:
        infos, denied = stop.value
    else:  # pragma: no cover - one query, then its answer
        raise AssertionError("discovery asked for more than one query")
    if unreadable is None:
        if denied:
            raise permission_denied(denied)
    else:
        unreadable.extend(denied)
    results: list[Any] | None = None
    if guessed is not None and guess is not None and (
            [_shape(i) for i in infos] == [_shape(i) for i in guess]):
        results = [guessed]
    if guess_out is not None:
        guess_out[:] = infos
    chunks = [infos[start : start + chunk] for start in range(0, len(infos), chunk)]
    if results is None:
        batches = [status_query(part) for part in chunks]
        results = []
        if len(batches) == 1:
            results = [(yield batches[0])]
        elif batches:
            results = yield Batch(batches)
    found = [status for part, rows in zip(chunks, results, strict=True)
             for status in statuses(part, rows)]
    found.sort(key=lambda s: (s.schema, s.table))
    return found


def _shape(info: TableInfo) -> tuple[Any, ...]:
    # What a status query depends on: names and direction, not oids.
    return (info.schema, info.table, info.column, info.sequence_schema, info.sequence_name,
            info.increment > 0)
