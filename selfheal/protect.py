"""
Protect: how one connection runs each statement, decided without I/O.

A statement that opens its transaction, or runs in autocommit, costs nothing
to protect: a collision there is rolled back and retried. Inside a
transaction only a savepoint taken before the statement allows a retry, and
each savepoint that writes takes a subtransaction id for the rest of the
transaction. So a statement there gets one only where a collision is
possible and a retry could follow:

- it can draw from a sequence-backed primary key: an INSERT that does not
  name the key into a table that is not verified in sync (`selfheal.insync`),
  an UPDATE or DELETE in a database with triggers or rules, and MERGE, WITH,
  CALL, DO, EXECUTE and anything not understood;
- and the transaction holds fewer than `SUBTRANSACTIONS` savepoints, the
  caller's own counted (past that, the server's subtransaction cache of the
  backend overflows, which slows every session's snapshots).

Every other statement runs as it is; if it collides, the sequence is healed
on a side connection and the error re-raised, as plain.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from psycopg.pq import TransactionStatus

from ._sqltext import Shape
from .heal import HealOptions, Mode
from .insync import Facts

__all__ = ["SUBTRANSACTIONS", "Planner"]

#: The most savepoints one transaction holds through selfheal, the caller's
#: own included: PostgreSQL's per-backend subtransaction cache.
SUBTRANSACTIONS = 64

#: Statements after which what the catalog said may be wrong.
SCHEMA_CHANGES = frozenset({"CREATE", "ALTER", "DROP", "TRUNCATE", "IMPORT", "REINDEX"})

_IDLE = TransactionStatus.IDLE
_INTRANS = TransactionStatus.INTRANS


class Planner:
    """One connection's protection decisions and savepoint count."""

    __slots__ = ("facts", "savepoints", "search_path", "user")

    def __init__(self, facts: Facts, user: str,
                 search_path: Callable[[], str | bytes | None]) -> None:
        self.facts = facts
        self.user = user
        #: The session's search_path as the server reports it (None: not reported).
        self.search_path = search_path
        #: Savepoints in the current transaction, selfheal's and the caller's.
        self.savepoints = 0

    def plan(self, status: TransactionStatus, autocommit: bool, shape: Callable[[], Shape],
             options: HealOptions, *, pipeline: bool = True) -> Mode:
        """How to run the caller's next statement, from the connection's state.

        `shape` is called only where the answer depends on the statement's
        text. `pipeline`: a savepoint can travel with the statement in one
        round trip.
        """
        if status == _IDLE:
            self.savepoints = 0
            if self.facts.known:
                self._watch(shape())
            return Mode.AUTOCOMMIT if autocommit else Mode.OPENED
        if status != _INTRANS:
            return Mode.PASS
        s = shape()
        keyword = s.keyword
        if keyword == "SAVEPOINT":
            self.savepoints += 1
            return Mode.PASS
        if (not s.may_draw or s.multi or not (options.savepoints and pipeline)
                or self.savepoints >= SUBTRANSACTIONS):
            # A multi-statement string cannot share a pipeline, and may hold
            # savepoint commands of its own that would release ours.
            self._watch(s)
            return Mode.PASS
        if options.protect == "always":
            self._watch(s)
        elif not self._at_risk(s):
            return Mode.PASS
        self.savepoints += 1
        return Mode.SAVEPOINT

    def transaction_block(self, status: TransactionStatus) -> None:
        """The caller opens a ``conn.transaction()`` block: a savepoint when inside one."""
        if status == _IDLE:
            self.savepoints = 0
        elif status == _INTRANS:
            self.savepoints += 1

    def _at_risk(self, s: Shape) -> bool:
        """Whether `s` inside a transaction may collide where a retry can follow."""
        keyword = s.keyword
        if keyword == "INSERT":
            if s.insert_table is None:
                return True
            facts = self.facts
            now = time.monotonic()
            rel = facts.target(s.insert_table, self.search_path(), self.user, now)
            if rel is None or rel.guarded:
                return True
            info = rel.info
            if info is None:
                return False  # no sequence-backed key: nothing selfheal could retry
            if s.insert_columns is None:
                return True
            if info.column in s.insert_columns:
                # An explicit key: a collision is a real duplicate, never
                # retried; and the table may now be ahead of its sequence.
                facts.at_risk(info.schema, info.table)
                return False
            return not facts.in_sync(rel, now)
        if keyword in ("UPDATE", "DELETE"):
            triggers = self.facts.triggers
            if triggers is None:
                self.facts.want_triggers()
                return True
            return triggers
        return True

    def _watch(self, s: Shape) -> None:
        """Note what a statement run without a check does to the facts."""
        keyword = s.keyword
        if keyword == "INSERT":
            if s.insert_table is None or s.insert_columns is None:
                return
            rel = self.facts.target(s.insert_table, self.search_path(), self.user,
                                    time.monotonic())
            if rel is not None and rel.info is not None and rel.info.column in s.insert_columns:
                self.facts.at_risk(rel.info.schema, rel.info.table)
        elif keyword in SCHEMA_CHANGES or s.multi:
            self.facts.schema_changed()
