"""
psycopg's shell for selfheal's operations: serve their requests on a connection.

The operations (`selfheal._ops`) are I/O-free generators; the sync and async
drivers below are the only places that touch a psycopg connection for them,
so the two twins cannot drift apart.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias, TypeVar

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import TupleRow, tuple_row

from . import _ops
from ._attempt import collect
from ._ops import (
    STATEMENT,
    Batch,
    Command,
    FreshQuery,
    Operation,
    Query,
    Request,
    Statement,
)

__all__ = [
    "STATEMENT", "Batch", "Command", "FreshQuery", "Operation", "Query", "Request",
    "Statement", "arun", "arun_side", "conninfo_of", "run", "run_side",
]

Rows: TypeAlias = list[TupleRow]
T = TypeVar("T")

_ops.register(psycopg.Error)

IDLE, INTRANS, INERROR = (TransactionStatus.IDLE, TransactionStatus.INTRANS,
                          TransactionStatus.INERROR)


def conninfo_of(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> str:
    """Return a conninfo string, password included, that reaches the same database."""
    params = {
        opt.keyword.decode(): opt.val.decode()
        for opt in conn.pgconn.info
        if opt.val is not None and opt.keyword != b"options"
    }
    return psycopg.conninfo.make_conninfo("", **params)


def _fetch(cur: psycopg.Cursor[TupleRow]) -> Rows:
    return cur.fetchall() if cur.pgresult is not None and cur.description else []


async def _afetch(cur: psycopg.AsyncCursor[TupleRow]) -> Rows:
    return await cur.fetchall() if cur.pgresult is not None and cur.description else []


def _sync(conn: psycopg.Connection[Any]) -> None:
    # Every result read, even after an error: psycopg's own sync() would
    # leave the rest unread, and the pipeline could not be closed.
    with conn.lock:
        err = conn.wait(collect(conn._pipeline))
    if err is not None:
        raise err


async def _async(aconn: psycopg.AsyncConnection[Any]) -> None:
    async with aconn.lock:
        err = await aconn.wait(collect(aconn._pipeline))
    if err is not None:
        raise err


def run(
    conn: psycopg.Connection[Any],
    op: Operation[T],
    statement: Callable[[], Any] | None = None,
) -> T:
    """Drive `op` to completion on a sync connection and return its value.

    `statement` serves `STATEMENT` requests: it re-runs the caller's statement.
    """
    def serve(req: Request) -> Any:
        return statement() if req is STATEMENT and statement else _serve(conn, req)

    idle = conn.info.transaction_status == IDLE
    try:
        return _ops.drive(op, serve)
    except BaseException:
        if idle and _left_open(conn):
            _close(conn)
        raise


def run_side(conn: psycopg.Connection[Any], op: Operation[T]) -> T:
    """Drive `op` on a new autocommit connection to the same database as `conn`."""
    with psycopg.Connection.connect(conninfo_of(conn), autocommit=True) as side:
        return run(side, op)


def _serve(conn: psycopg.Connection[Any], req: Request) -> Any:
    if isinstance(req, Statement):
        raise TypeError("this operation needs a statement to re-run")
    if isinstance(req, Query):
        cur = psycopg.Cursor(conn, row_factory=tuple_row)
        with cur:
            # Never prepared: selfheal's statements stay out of the caller's
            # prepared-statement cache.
            cur.execute(req.query, req.params, prepare=False)
            if conn._pipeline is not None:
                _sync(conn)  # inside executemany()'s own pipeline
            return _fetch(cur)
    if isinstance(req, Command):
        with conn.lock:
            conn.wait(conn._exec_command(req.command))
        if conn._pipeline is not None:
            _sync(conn)
        return []
    if isinstance(req, Batch):
        if _opens_alone(conn, req):
            return [_serve(conn, req.queries[0]), *_serve(conn, Batch(req.queries[1:]))]
        curs = [psycopg.Cursor(conn, row_factory=tuple_row) for _ in req.queries]
        lost: psycopg.Error | None = None
        try:
            with conn.pipeline():
                try:
                    for cur, q in zip(curs, req.queries, strict=True):
                        if isinstance(q, Command):
                            with conn.lock:
                                conn.wait(conn._exec_command(q.command))
                        else:
                            cur.execute(q.query, q.params, prepare=False)
                except psycopg.Error as err:
                    # Failing while it queues (its connection lost, mostly: the
                    # server's FATAL message arrives before libpq marks the
                    # connection bad), the batch leaves its pipeline block
                    # without the error, then raises it. Left with the error,
                    # psycopg would log that it could not close the pipeline, a
                    # warning plain psycopg, with no pipeline there, never logs.
                    lost = err
        except psycopg.Error:
            if lost is None:
                raise
        if lost is not None:
            raise lost
        return [[] if isinstance(q, Command) else _fetch(cur)
                for cur, q in zip(curs, req.queries, strict=True)]
    with psycopg.Connection.connect(
        conninfo_of(conn), autocommit=True, options=_ops.libpq_options(req.settings)
    ) as side:
        return _serve(side, req.query)


async def arun(
    aconn: psycopg.AsyncConnection[Any],
    op: Operation[T],
    statement: Callable[[], Awaitable[Any]] | None = None,
) -> T:
    """Drive `op` to completion on an async connection and return its value."""
    async def serve(req: Request) -> Any:
        if req is STATEMENT and statement:
            return await statement()
        return await _aserve(aconn, req)

    idle = aconn.info.transaction_status == IDLE
    try:
        return await _ops.adrive(op, serve)
    except BaseException:
        if idle and _left_open(aconn):
            # In this task, which may hold the connection's lock already (the
            # caller's cursor does while selfheal heals inside it).
            with contextlib.suppress(BaseException):
                await _aclose(aconn)
        raise


def _opens_alone(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
                 batch: Batch) -> bool:
    """Whether `batch` starts with a BEGIN that must run before the rest is queued:
    outside autocommit psycopg opens a transaction of its own for a query queued
    while the connection is idle."""
    first = batch.queries[0] if batch.queries else None
    return (isinstance(first, Command) and first.command.startswith("BEGIN")
            and len(batch.queries) > 1 and not conn.autocommit
            and conn.info.transaction_status == IDLE)


def _left_open(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """Whether an operation interrupted midway (Ctrl-C, a cancelled task) left a scope of
    its own open on a connection that was idle: the caller's next statements would run
    in it (or fail, if it was aborted)."""
    return (not conn.closed and conn._pipeline is None
            and conn.info.transaction_status in (INTRANS, INERROR))


def _close(conn: psycopg.Connection[Any]) -> None:
    with contextlib.suppress(psycopg.Error), conn.lock:
        conn.wait(conn._exec_command(b"ROLLBACK"))


async def _aclose(aconn: psycopg.AsyncConnection[Any]) -> None:
    with contextlib.suppress(psycopg.Error):
        async with aconn.lock:
            await aconn.wait(aconn._exec_command(b"ROLLBACK"))


async def arun_side(aconn: psycopg.AsyncConnection[Any], op: Operation[T]) -> T:
    """Drive `op` on a new autocommit connection to the same database as `aconn`."""
    async with await psycopg.AsyncConnection.connect(conninfo_of(aconn), autocommit=True) as side:
        return await arun(side, op)


async def _aserve(aconn: psycopg.AsyncConnection[Any], req: Request) -> Any:
    if isinstance(req, Statement):
        raise TypeError("this operation needs a statement to re-run")
    if isinstance(req, Query):
        cur = psycopg.AsyncCursor(aconn, row_factory=tuple_row)
        async with cur:
            await cur.execute(req.query, req.params, prepare=False)
            if aconn._pipeline is not None:
                await _async(aconn)
            return await _afetch(cur)
    if isinstance(req, Command):
        async with aconn.lock:
            await aconn.wait(aconn._exec_command(req.command))
        if aconn._pipeline is not None:
            await _async(aconn)
        return []
    if isinstance(req, Batch):
        if _opens_alone(aconn, req):
            return [await _aserve(aconn, req.queries[0]),
                    *await _aserve(aconn, Batch(req.queries[1:]))]
        curs = [psycopg.AsyncCursor(aconn, row_factory=tuple_row) for _ in req.queries]
        lost: psycopg.Error | None = None
        try:
            async with aconn.pipeline():
                try:
                    for cur, q in zip(curs, req.queries, strict=True):
                        if isinstance(q, Command):
                            async with aconn.lock:
                                await aconn.wait(aconn._exec_command(q.command))
                        else:
                            await cur.execute(q.query, q.params, prepare=False)
                except psycopg.Error as err:
                    lost = err  # as in _serve
        except psycopg.Error:
            if lost is None:
                raise
        if lost is not None:
            raise lost
        return [[] if isinstance(q, Command) else await _afetch(cur)
                for cur, q in zip(curs, req.queries, strict=True)]
    async with await psycopg.AsyncConnection.connect(
        conninfo_of(aconn), autocommit=True, options=_ops.libpq_options(req.settings)
    ) as side:
        return await _aserve(side, req.query)
