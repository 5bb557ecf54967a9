"""
The caller's statement as psycopg runs it, and the protected ways to run it.

Every cursor operation of psycopg ends in ``connection.wait(gen)``, where
`gen` is an I/O-free generator of the cursor (``_execute_gen`` for
``execute()``, ``_executemany_gen_*`` for ``executemany()``). A healing
connection overrides ``wait()``, so the caller's cursor stays exactly the
class the caller chose: `call_of` recognises those generators and reads the
statement they were made for, and the generators below wrap a fresh copy of
one in selfheal's protection. They are I/O-free too (psycopg's own ``PQGen``),
so the sync and async connections run the very same code.

Anything not recognised (another cursor method, a cursor class that replaces
these generators, a future psycopg) is run as it is: never worse than plain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import psycopg
from psycopg._connection_base import BaseConnection
from psycopg._cursor_base import BaseCursor
from psycopg._pipeline_base import BasePipeline
from psycopg.abc import PQGen
from psycopg.errors import Diagnostic, _info_to_dict, error_from_result
from psycopg.generators import copy_end, send
from psycopg.pq import ExecStatus
from psycopg.transaction import BaseTransaction
from psycopg.waiting import Wait

from ._sqltext import shape

__all__ = [
    "COMMIT",
    "COPY",
    "COPY_END",
    "CURSORS",
    "EXECUTE",
    "EXIT",
    "Held",
    "ROLLBACK",
    "TX_ENTER",
    "Call",
    "HeldNotices",
    "call_of",
    "collect",
    "execute_call",
    "execute_locals",
    "runs_psycopgs_execute",
    "queued",
    "queued_and_collected",
    "savepointed",
    "savepointed_plain",
    "shape",
]

#: psycopg's cursor classes, whose ``execute()`` makes one ``_execute_gen`` and waits
#: for it first of all.
CURSORS = frozenset({
    psycopg.Cursor, psycopg.ClientCursor, psycopg.RawCursor,
    psycopg.AsyncCursor, psycopg.AsyncClientCursor, psycopg.AsyncRawCursor,
})

#: psycopg's generator of one ``execute()``.
EXECUTE = BaseCursor._execute_gen.__code__
_MANY_PIPELINE = BaseCursor._executemany_gen_pipeline.__code__
_MANY_NO_PIPELINE = BaseCursor._executemany_gen_no_pipeline.__code__

#: psycopg's generators of ``commit()`` and ``rollback()``.
COMMIT = BaseConnection._commit_gen.__code__
ROLLBACK = BaseConnection._rollback_gen.__code__
#: psycopg's generator that syncs and leaves a pipeline.
EXIT = BasePipeline._exit_gen.__code__
#: psycopg's generator that opens a ``conn.transaction()`` block.
TX_ENTER = BaseTransaction._enter_gen.__code__
#: psycopg's generator that starts a COPY.
COPY = BaseCursor._start_copy_gen.__code__
#: psycopg's generator that ends a COPY FROM.
COPY_END = getattr(copy_end, "__code__", None)

# What a cursor shows of the statement it ran: put back after a failed retry,
# so that the caller sees what the first failure left, as with plain psycopg.
_CURSOR_STATE = ("_results", "pgresult", "_pos", "_iresult", "_rowcount", "_statusmessage",
                 "_query", "_last_query", "_tx", "_make_row", "_execmany_returning")

_SAVEPOINT = b"SAVEPOINT _selfheal"
_RELEASE = b"RELEASE SAVEPOINT _selfheal"
_FATAL_ERROR = ExecStatus.FATAL_ERROR
_PIPELINE_SYNC = ExecStatus.PIPELINE_SYNC
_WAIT_R = Wait.R


@dataclass
class Call:
    """One ``execute()`` or ``executemany()`` of the caller, ready to run again."""

    cursor: Any
    query: Any
    #: execute(): the parameters; executemany(): the list of parameter sets.
    params: Any
    many: bool
    #: executemany() inside a pipeline (its own, or the caller's).
    pipelined: bool
    prepare: bool | None = None
    binary: bool | None = None
    returning: bool = False

    def gen(self) -> PQGen[None]:
        """A fresh generator of the statement, as the cursor would make it."""
        cur = self.cursor
        if not self.many:
            return cur._execute_gen(  # type: ignore[no-any-return]
                self.query, self.params, prepare=self.prepare, binary=self.binary
            )
        make = cur._executemany_gen_pipeline if self.pipelined else (
            cur._executemany_gen_no_pipeline)
        return make(self.query, self.params, self.returning)  # type: ignore[no-any-return]


    def cursor_state(self) -> dict[str, Any]:
        """What the cursor shows now (restore it with `restore_cursor`)."""
        state = {name: getattr(self.cursor, name, None) for name in _CURSOR_STATE}
        state["_results"] = list(state["_results"] or ())  # psycopg fills it in place
        return state

    def restore_cursor(self, state: dict[str, Any]) -> None:
        """Put back what `cursor_state` saved."""
        for name, value in state.items():
            setattr(self.cursor, name, value)

    def uncount(self) -> None:
        """Before the retry: the failed attempt no longer counts towards preparing.

        psycopg counts every execution towards its prepare threshold, failed
        ones too once a statement is known. Where selfheal retries, plain
        psycopg (with the sequence healed) runs the statement once; so only
        the retry counts, and the statement gets prepared at the same
        execution as with plain psycopg.
        """
        prepared = getattr(self.cursor._conn, "_prepared", None)
        query = getattr(self.cursor, "_query", None)
        if prepared is None or query is None or self.many:
            return
        key = prepared.key(query)
        count = prepared._counts.get(key)
        if count:  # known before the attempt (a new statement that failed is not kept)
            prepared._counts[key] = count - 1


class HeldNotices:
    """The caller's notice handlers, held back while a statement may be retried.

    A statement that is retried reaches the caller's handlers once, as it
    would with plain psycopg: the notices of the attempt that counts (the
    retry when it succeeds, else the first) are delivered when it is over.
    """

    __slots__ = ("_conn", "_first", "_handlers", "_retried", "_retry")

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._handlers: list[Any] = conn._notice_handlers
        self._first: list[Any] = []
        self._retry: list[Any] = []
        self._retried = False
        conn._notice_handlers = [self._keeper(self._first)]

    def retrying(self) -> None:
        """From now on the notices belong to the retry."""
        self._retried = True
        self._conn._notice_handlers = [self._keeper(self._retry)]

    @staticmethod
    def _keeper(into: list[Any]) -> Callable[[Any], None]:
        def keep(diag: Any) -> None:
            # The result a notice reads from is freed once handlers return.
            into.append(Diagnostic(_info_to_dict(diag._info), diag._encoding))

        return keep

    def release(self, succeeded: bool) -> None:
        """Give the caller its handlers back, with the notices that count."""
        self._conn._notice_handlers = self._handlers
        for diag in self._retry if self._retried and succeeded else self._first:
            for handler in self._handlers:
                try:
                    handler(diag)
                except Exception:  # as psycopg does: a failing handler is not the query's
                    continue


def call_of(gen: Any, code: Any = None) -> Call | None:
    """The caller's statement `gen` will run, or None for any other generator.

    `code`: the generator's code object, when already read. An
    ``executemany()`` generator is not started yet: its parameters are taken
    out of it (a retry needs them again) and it must not be run.
    """
    if code is None:
        code = getattr(gen, "gi_code", None)
    if code is EXECUTE:
        f = gen.gi_frame.f_locals
        return Call(f["self"], f["query"], f["params"], many=False, pipelined=False,
                    prepare=f["prepare"], binary=f["binary"])
    if code is _MANY_PIPELINE or code is _MANY_NO_PIPELINE:
        f = gen.gi_frame.f_locals
        return Call(f["self"], f["query"], list(f["params_seq"]), many=True,
                    pipelined=code is _MANY_PIPELINE, returning=f["returning"])
    return None


#: What a connection's ``execute()`` tells its ``wait()`` it is about to run:
#: (whose, cursor, query, params, prepare), the cursor's class one of `CURSORS`.
Held: TypeAlias = "tuple[object, Any, str, Any, bool | None]"


def runs_psycopgs_execute(cls: type, shell: type, connection: type) -> bool:
    """Whether ``super().execute()`` in `shell` reaches `connection`'s own (psycopg's)
    in `cls`'s MRO: no class mixed in after `shell` has an ``execute()`` of its own
    that `shell`'s must call."""
    mro = cls.__mro__
    for klass in mro[mro.index(shell) + 1:]:
        if "execute" in vars(klass):
            return klass is connection
    return False


def execute_locals(held: Held | None) -> dict[str, Any]:
    """The locals `execute_call` reads, from `held`: what the frame of the generator
    of ``cursor.execute(query, params, prepare=prepare)`` holds."""
    assert held is not None
    _, cur, query, params, prepare = held
    return {"self": cur, "query": query, "params": params, "prepare": prepare,
            "binary": None}


def execute_call(f: dict[str, Any]) -> Call:
    """The `Call` of an ``execute()`` generator, from its frame's locals."""
    return Call(f["self"], f["query"], f["params"], many=False, pipelined=False,
                prepare=f["prepare"], binary=f["binary"])


class _Batch(BasePipeline):
    """A pipeline that only queues, for one statement under a savepoint.

    psycopg's own pipeline sends each command as it is queued, a write and a
    poll apiece. Here every command of the batch goes into libpq's output
    buffer; `savepointed` sends the whole batch with one flush and reads its
    results in one go. The results are processed by psycopg's own pipeline
    code, so the cursor ends up exactly as in a psycopg pipeline.
    """

    def _communicate_gen(self) -> PQGen[None]:
        self.queue_all()
        return
        yield  # a generator that never waits

    def queue_all(self) -> None:
        """Put every queued command into libpq's output buffer."""
        commands = self.command_queue
        while commands:
            commands.popleft()()


def savepointed(conn: Any, gen: PQGen[None]) -> PQGen[None]:
    """Run `gen` under ``SAVEPOINT _selfheal`` in one round trip.

    `conn` is not in pipeline mode. SAVEPOINT and the statement go out as
    one pipeline with one Sync, in one write. The SAVEPOINT is sent unnamed
    and unprepared, so it never enters the caller's prepared-statement
    cache, and its result is read here: only the statement's own go through
    psycopg's processing. The savepoint is not released: a RELEASE is one
    more command for the server on every protected statement, and the
    savepoint ends with the transaction anyway, counted against the bound of
    savepoints a transaction (`selfheal.protect.SUBTRANSACTIONS`), as the
    psycopg2 and asyncpg shells leave theirs. Every result is read before
    this returns, so an error leaves no aborted pipeline behind and the
    connection is out of pipeline mode.
    """
    first: psycopg.Error | None = None
    pgconn = conn.pgconn
    batch = _batch_of(conn)
    pgconn.enter_pipeline_mode()
    batch.level = 1
    conn._pipeline = batch
    try:
        try:
            pgconn.send_query_params(_SAVEPOINT, None)
            try:
                yield from gen
            except psycopg.Error as ex:
                first = ex
            batch.queue_all()
            pgconn.pipeline_sync()
            yield from send(pgconn)
            # One result set per command: SAVEPOINT, the statement's.
            sets, lost = yield from _results_to_sync(pgconn)
            if sets and sets[0][0].status == _FATAL_ERROR:
                first = first or error_from_result(sets[0][0], encoding=pgconn._encoding)
            queue = batch.result_queue
            for results in sets[1:]:
                if not queue:
                    break
                try:
                    batch._process_results(queue.popleft(), results)
                except psycopg.Error as ex:
                    first = first or ex
            # A connection lost midway: its last word (say AdminShutdown) comes first.
            first = first or lost
        except psycopg.Error as ex:
            first = first or ex
        finally:
            batch._exit(first)
    finally:
        conn._pipeline = None
    if first is not None:
        raise first


def _batch_of(conn: Any) -> _Batch:
    """The connection's own `_Batch`, empty: made once, it costs more than a statement's
    decision."""
    batch: _Batch | None = getattr(conn, "_selfheal_batch", None)
    if batch is None or batch.pgconn is not conn.pgconn:
        batch = conn._selfheal_batch = _Batch(conn)
    else:
        batch.command_queue.clear()
        batch.result_queue.clear()
    return batch


def _results_to_sync(pgconn: Any) -> PQGen[tuple[list[list[Any]], psycopg.Error | None]]:
    """Each command's results, up to the pipeline's Sync, read as they arrive.

    What psycopg's ``fetch_many`` does command by command, in one loop for
    the whole batch. Notifications are left in libpq's queue for psycopg's
    next read (the server sends none inside a transaction anyway). If the
    connection fails first: the result sets read until then, and the error.
    """
    sets: list[list[Any]] = []
    results: list[Any] = []
    while True:
        if pgconn.is_busy():
            while not (yield _WAIT_R):
                continue
            try:
                pgconn.consume_input()
            except psycopg.OperationalError as ex:
                if results:
                    sets.append(results)
                return sets, ex
            continue
        result = pgconn.get_result()
        if result is None:
            if not results:  # every command has a result: the connection failed
                return sets, psycopg.OperationalError(
                    pgconn.get_error_message() or "the connection was lost")
            sets.append(results)
            results = []
        elif result.status == _PIPELINE_SYNC:
            return sets, None
        else:
            results.append(result)


def queued(conn: Any, gen: PQGen[None], savepoint: bool) -> PQGen[psycopg.Error | None]:
    """Queue an ``executemany()`` generator in the pipeline it opened.

    Returns the error met while queueing (results may arrive early) instead
    of raising it: the pipeline is synced when psycopg closes it, and
    `collect` then reports the first error of all.
    """
    try:
        if savepoint:
            yield from conn._exec_command(_SAVEPOINT)
        yield from gen
        if savepoint:
            yield from conn._exec_command(_RELEASE)
    except psycopg.Error as ex:
        return ex
    return None


def queued_and_collected(conn: Any, gen: PQGen[None]) -> PQGen[None]:
    """`queued` without a savepoint, then `collect`: raise the first error."""
    first = yield from queued(conn, gen, savepoint=False)
    err = yield from collect(conn._pipeline)
    if first or err:
        raise first or err  # type: ignore[misc]


def savepointed_plain(conn: Any, gen: PQGen[None]) -> PQGen[None]:
    """Run `gen` under ``SAVEPOINT _selfheal`` without a pipeline (own round trips)."""
    yield from conn._exec_command(_SAVEPOINT)
    yield from gen
    yield from conn._exec_command(_RELEASE)


def collect(pipeline: Any) -> PQGen[psycopg.Error | None]:
    """Sync `pipeline` and process every result; return the first error.

    psycopg's own sync stops at the first error it meets in a batch of
    results, and the rest then surface later as "pipeline aborted" in place
    of the statement's own error. Reading to the end keeps the statement's.
    """
    first: psycopg.Error | None = None
    pipeline._enqueue_sync()
    try:
        yield from pipeline._communicate_gen()
    except psycopg.Error as ex:
        first = ex
    while pipeline.result_queue:
        left = len(pipeline.result_queue)
        try:
            yield from pipeline._fetch_gen(flush=False)
        except psycopg.Error as ex:
            first = first or ex
        if len(pipeline.result_queue) == left:
            break  # nothing more arrives
    return first
