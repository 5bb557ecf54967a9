"""
The library's calls on a psycopg connection: `resync` and `check`, sync and async.

The work is `selfheal.resync`'s I/O-free operations; these only drive them on
the caller's connection (`selfheal._drive`) and turn psycopg's errors into
selfheal's.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

from . import errors
from ._drive import arun, run
from .discover import TableInfo, Unreadable
from .resync import LOCK_TIMEOUT, ResyncResult, SequenceStatus, check_op, resync_op, scoped

__all__ = ["acheck", "aresync", "check", "check_readable", "resync"]


def resync(
    conn: psycopg.Connection[Any],
    table: str,
    schema: str | None = None,
    *,
    lock_timeout: float = LOCK_TIMEOUT,
) -> ResyncResult:
    """Move `table`'s key sequence past its highest key; never backwards.

    `schema` None resolves `table` through the connection's search_path; a
    partition resolves to its partitioned root. Works in autocommit, in an
    idle connection and inside a caller's transaction (in a savepoint, leaving
    the transaction as it was). Raises a `selfheal.errors.SelfhealError`.
    """
    op = resync_op(table, schema, lock_timeout)
    return run(conn, scoped(conn.info.transaction_status, op))


async def aresync(
    aconn: psycopg.AsyncConnection[Any],
    table: str,
    schema: str | None = None,
    *,
    lock_timeout: float = LOCK_TIMEOUT,
) -> ResyncResult:
    """The async twin of `resync`."""
    op = resync_op(table, schema, lock_timeout)
    return await arun(aconn, scoped(aconn.info.transaction_status, op))


def check(
    conn: psycopg.Connection[Any],
    schema: str | None = None,
    *,
    tables: list[str] | None = None,
    exclude_schemas: list[str] | None = None,
) -> list[SequenceStatus]:
    """Report every sequence-backed primary key in the database (or `schema`).

    `schema` may be a LIKE pattern (``tenant\\_%``: ``_`` alone matches any
    character), and so may `exclude_schemas`, schemas left out. Costs a
    constant number of round trips whatever the number of tables. Moves
    nothing.
    """
    op = check_op([schema] if schema else None, tables, exclude_schemas)
    try:
        return run(conn, scoped(conn.info.transaction_status, op))
    except psycopg.Error as ex:
        raise _check_failed(ex) from ex


def check_readable(
    conn: psycopg.Connection[Any],
    schema: str | None = None,
    *,
    tables: list[str] | None = None,
    exclude_schemas: list[str] | None = None,
    guess: list[TableInfo] | None = None,
) -> tuple[list[SequenceStatus], list[Unreadable]]:
    """As `check`, but the tables this role cannot read are returned apart, each
    with the privilege it lacks, and every other table is still checked.

    On an autocommit connection it opens no transaction (each query reads
    what is committed, as in one). `guess`, when given, is the list of tables
    a similar database had (its status query is sent with the discovery, one
    round trip); it is replaced by this database's tables.
    """
    unreadable: list[Unreadable] = []
    op = check_op([schema] if schema else None, tables, exclude_schemas,
                  unreadable=unreadable, guess=list(guess) if guess else None,
                  guess_out=guess)
    try:
        if conn.autocommit and conn.info.transaction_status == TransactionStatus.IDLE:
            found = run(conn, op)
        else:
            found = run(conn, scoped(conn.info.transaction_status, op))
    except psycopg.errors.LockNotAvailable as ex:
        held = _locked_tables(conn)
        raise errors.LockTimeout(
            "check failed: lock timeout"
            + (f" on {', '.join(held)} (locked by another session)" if held else f": {ex}"),
            sqlstate=ex.sqlstate) from ex
    except psycopg.Error as ex:
        raise _check_failed(ex) from ex
    return found, unreadable


def _check_failed(ex: psycopg.Error) -> errors.ResyncError:
    """The error a check raises for the database error `ex` it met."""
    return errors.ResyncError(f"check failed: {ex}", sqlstate=ex.sqlstate)


def _locked_tables(conn: psycopg.Connection[Any]) -> list[str]:
    """The tables of this database another session holds in ACCESS EXCLUSIVE mode: what a
    check that timed out waiting for a lock waited for (empty if it cannot tell)."""
    try:
        rows = conn.execute(
            "SELECT DISTINCT l.relation::regclass::text FROM pg_locks l"
            " JOIN pg_database d ON d.oid = l.database AND d.datname = current_database()"
            " WHERE l.locktype = 'relation' AND l.mode = 'AccessExclusiveLock' AND l.granted"
            " AND l.pid <> pg_backend_pid() ORDER BY 1").fetchall()
    except psycopg.Error:
        return []
    return [r[0] for r in rows]


async def acheck(
    aconn: psycopg.AsyncConnection[Any],
    schema: str | None = None,
    *,
    tables: list[str] | None = None,
    exclude_schemas: list[str] | None = None,
) -> list[SequenceStatus]:
    """The async twin of `check`."""
    op = check_op([schema] if schema else None, tables, exclude_schemas)
    try:
        return await arun(aconn, scoped(aconn.info.transaction_status, op))
    except psycopg.Error as ex:
        raise _check_failed(ex) from ex
