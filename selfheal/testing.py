"""
Test helpers: fail a test when seeders or fixtures leave sequences behind.

A seeder that inserts rows with explicit ids and forgets ``setval()`` passes
its own tests and breaks the first real insert. Assert right after seeding::

    from selfheal.testing import assert_sequences_in_sync

    def test_seed_leaves_sequences_in_sync(conn):
        seed(conn)
        assert_sequences_in_sync(conn)

The check sees the connection's own uncommitted rows, so it also works
inside a test transaction that is rolled back afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from .api import acheck, check
from .resync import SequenceStatus

__all__ = ["aassert_sequences_in_sync", "assert_sequences_in_sync", "drift_message"]


def drift_message(drifted: Sequence[SequenceStatus]) -> str:
    """A readable account of sequences behind their tables' keys."""
    lines = [
        f"{len(drifted)} sequence{'s' if len(drifted) != 1 else ''} behind the table's keys"
        " (the next insert that uses the default will fail with a duplicate key):"
    ]
    for s in drifted:
        key = s.max_value if s.increment > 0 else s.min_value
        which = "highest" if s.increment > 0 else "lowest"
        lines.append(
            f"  {s.schema}.{s.table}.{s.column}: next value {s.next_value},"
            f" {which} key {key} (sequence {s.sequence})"
        )
    lines.append(
        "Whatever inserted these rows with explicit ids should move the sequence past them:"
        " selfheal.resync(conn, table), or setval(seq, max(id)) with is_called = true."
    )
    return "\n".join(lines)


def assert_sequences_in_sync(
    conn: psycopg.Connection[Any],
    schema: str | None = None,
    *,
    tables: list[str] | None = None,
) -> None:
    """Raise AssertionError listing every sequence behind its table's keys.

    `schema` (a LIKE pattern allowed) and `tables` narrow the check as in
    `selfheal.check`. Moves nothing.
    """
    __tracebackhide__ = True  # pytest shows the caller's line, not this one
    drifted = [s for s in check(conn, schema, tables=tables) if not s.in_sync]
    if drifted:
        raise AssertionError(drift_message(drifted))


async def aassert_sequences_in_sync(
    aconn: psycopg.AsyncConnection[Any],
    schema: str | None = None,
    *,
    tables: list[str] | None = None,
) -> None:
    """The async twin of `assert_sequences_in_sync`."""
    __tracebackhide__ = True
    drifted = [s for s in await acheck(aconn, schema, tables=tables) if not s.in_sync]
    if drifted:
        raise AssertionError(drift_message(drifted))
