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

import dataclasses
import enum
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from psycopg.pq import TransactionStatus

from ._sqltext import Shape
from .discover import TableInfo
from .heal import HealOptions, Mode
from .insync import Facts, Relation

__all__ = ["SUBTRANSACTIONS", "Planner", "Write"]

#: The most savepoints one transaction holds through selfheal, the caller's
#: own included: PostgreSQL's per-backend subtransaction cache.
SUBTRANSACTIONS = 64

#: Seconds before a verified fact runs out when a new check is asked for, so
#: that a steady stream of statements never meets it expired.
RENEW = 0.25

#: Query strings whose verdicts one connection keeps.
VERDICTS = 512

#: Writes into tables not known yet that one connection keeps for later.
DEFERRED = 16

#: Statements after which what the catalog said may be wrong.
SCHEMA_CHANGES = frozenset({"CREATE", "ALTER", "DROP", "TRUNCATE", "IMPORT", "REINDEX"})

_IDLE = TransactionStatus.IDLE
_INTRANS = TransactionStatus.INTRANS


class Kind(enum.Enum):
    """What a statement is, for protection: decided once per query string."""

    QUIET = "quiet"  # cannot draw from a sequence
    SAVEPOINT = "savepoint"  # the caller's own SAVEPOINT
    SCHEMA = "schema"  # DDL, or a string of several statements: facts forgotten
    UNSURE = "unsure"  # may draw, nothing known to say it cannot collide
    TRIGGERED = "triggered"  # UPDATE or DELETE: may draw through triggers or rules
    NO_KEY = "no_key"  # INSERT into a table without a sequence-backed key
    EXPLICIT = "explicit"  # INSERT that names the key
    DEFAULT_KEY = "default_key"  # INSERT drawing the key: safe while verified in sync
    MULTI = "multi"  # several statements, all or nothing: judged one by one (`parts`)


@dataclass(frozen=True, slots=True)
class Write:
    """An INSERT that wrote, or may have written, keys of its own (`selfheal.explicit`)."""

    #: The table's sequence-backed key, None while the catalog does not say.
    info: TableInfo | None
    #: The table as the statement names it.
    name: tuple[str, ...]
    #: The columns it names (None: no column list, each row may give every column).
    columns: frozenset[str] | None
    #: The search_path the name was read under (None: qualified, or not reported).
    search_path: str | bytes | None = None

    @property
    def certain(self) -> bool:
        """Whether it names the key: it wrote keys of its own."""
        return (self.info is not None and self.columns is not None
                and self.info.column in self.columns)


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: Kind
    #: The facts' catalog epoch it was judged in.
    epoch: int
    #: The search_path it was judged under (None: it does not depend on it).
    search_path: str | bytes | None = None
    #: The table written to (EXPLICIT, DEFAULT_KEY), and the key of its facts.
    rel: Relation | None = None
    key: tuple[str, str] | None = None
    #: MULTI: the verdict of each statement.
    parts: tuple[Verdict, ...] = ()
    #: The INSERTs that may have written keys of their own (`selfheal.explicit`).
    writes: tuple[Write, ...] = ()
    #: SET, RESET, DISCARD or a call of set_config: the search_path other
    #: verdicts were judged under may change.
    session: bool = False


#: First keywords of the statements that may change the session's search_path.
SESSION_CHANGES = frozenset({"SET", "RESET", "DISCARD"})

# Enum members as module constants: the hot path compares them by identity.
_PASS, _AUTOCOMMIT, _OPENED = Mode.PASS, Mode.AUTOCOMMIT, Mode.OPENED
_QUIET, _DEFAULT_KEY, _TRIGGERED = Kind.QUIET, Kind.DEFAULT_KEY, Kind.TRIGGERED
_EXPLICIT, _SCHEMA, _MULTI = Kind.EXPLICIT, Kind.SCHEMA, Kind.MULTI


class Planner:
    """One connection's protection decisions and savepoint count."""

    __slots__ = ("__weakref__", "_passing_options", "_passing_path", "_verdicts", "deferred",
                 "explicit", "facts", "multi_savepoints", "opening", "passing", "savepoints",
                 "search_path", "shape", "user")

    def __init__(self, facts: Facts, user: str,
                 search_path: Callable[[], str | bytes | None],
                 shape: Callable[[Any, Any], Shape], multi_savepoints: bool = False) -> None:
        self.facts = facts
        #: Whether the driver can put a savepoint before a string of several
        #: statements (psycopg2's one string can; psycopg's pipeline cannot).
        self.multi_savepoints = multi_savepoints
        #: `shape(query, conn)`: what the driver's query object says (cached).
        self.shape = shape
        self.user = user
        #: The session's search_path as the server reports it (None: not reported).
        self.search_path = search_path
        #: Savepoints in the current transaction, selfheal's and the caller's.
        self.savepoints = 0
        #: What the statement `plan` was last asked about may have written
        #: keys of its own: checked once it succeeded (`selfheal.explicit`).
        self.explicit: tuple[Write, ...] = ()
        #: Writes into tables the catalog facts did not know yet, with their
        #: statement's text: looked at after the facts' next check (`take_deferred`).
        self.deferred: list[tuple[Write, str]] = []
        self._verdicts: dict[str | bytes, Verdict] = {}
        #: Query strings that run as they are inside a transaction, until the
        #: time given (time.monotonic()): `quick`'s answers, kept where a
        #: driver's hot path decides with one lookup. The facts empty it
        #: whenever one answer may have changed (`Facts.keep_passing`); so does
        #: a statement that may change the search_path, and the next
        #: transaction when the search_path or the options differ.
        self.passing: dict[str, float] = {}
        #: Query strings that open a transaction, or autocommit, as they are
        #: (`Mode.OPENED`, `Mode.AUTOCOMMIT`): `quick`'s answers, emptied as
        #: `passing` is and whenever a check of the facts is due.
        self.opening: set[str] = set()
        self._passing_path: str | bytes | None = None
        self._passing_options: HealOptions | None = None
        facts.watch(self)

    def plan(self, status: int, autocommit: bool, query: Any, conn: Any,
             options: HealOptions, pipeline: bool = True) -> Mode:
        """How to run the caller's next statement, from the connection's state.

        `pipeline`: a savepoint can travel with the statement in one round trip.
        """
        if status == _INTRANS:
            v = self._verdicts.get(query) if type(query) is str else None
            if v is None or v.epoch != self.facts.epoch or (
                    v.search_path is not None and v.search_path != self.search_path()):
                v = self._verdict(query, conn)
            if v.session:
                self.passing.clear()
            return self._planned_in_transaction(v, options, pipeline)
        if status == _IDLE:
            self.savepoints = 0
            if self.passing:
                self._opening(options)
            facts = self.facts
            if facts.verified or facts.catalog or options.explicit_ids != "allow":
                # Explicit keys and DDL seen here still count.
                v = self._verdicts.get(query) if type(query) is str else None
                if v is None or v.epoch != facts.epoch:
                    v = self._verdict(query, conn)
                if v.session:
                    self.passing.clear()
                self.explicit = v.writes
                if v.kind is _EXPLICIT or v.kind is _SCHEMA or v.kind is _MULTI:
                    self._watch(v)
            else:
                self.explicit = ()
            return _AUTOCOMMIT if autocommit else _OPENED
        self.explicit = ()
        return _PASS

    def quick(self, status: int, autocommit: bool, query: Any, options: HealOptions,
              savepoint: bool = False) -> Mode | None:
        """`plan` for the statements a connection runs most, or None: ask `plan`.

        A query string judged before, with nothing to watch, that runs as it
        is: inside a transaction (`Mode.PASS`), one that cannot draw from a
        sequence, an UPDATE or DELETE where no trigger or rule could, or a
        default-key INSERT into a table verified in sync for a while yet
        (with the ``"auto"`` protection); outside one (`Mode.AUTOCOMMIT`,
        `Mode.OPENED`), one that writes no key of its own and changes no
        schema, while no check of the facts is due. Dictionary lookups, no
        call into the catalog. An answer is kept (`passing`, `opening`): the
        string's next run is decided by one lookup.

        `savepoint`: the driver runs `Mode.SAVEPOINT` itself too. Then a
        default-key INSERT inside a transaction is always decided here, by
        `plan` when its table is not verified in sync for a while yet.
        """
        if type(query) is not str:
            return None
        if status == _INTRANS:
            until = self.passing.get(query)
            if until is not None and until > time.monotonic():
                self.explicit = ()
                return _PASS
        elif status == _IDLE and query in self.opening:
            self.savepoints = 0
            self.explicit = ()
            return _AUTOCOMMIT if autocommit else _OPENED
        v = self._verdicts.get(query)
        if v is None or v.writes:
            return None
        facts = self.facts
        changes = facts.changes
        if v.epoch != facts.epoch or (
                v.search_path is not None and v.search_path != self.search_path()):
            return None
        if v.session:
            self.passing.clear()
        kind = v.kind
        if status == _INTRANS:
            if kind is _DEFAULT_KEY:
                until = facts.verified.get(v.key) if (  # type: ignore[arg-type]
                    options.protect == "auto") else None
                if until is None or until < time.monotonic() + RENEW:
                    # `plan` renews it, or protects.
                    return self._planned_in_transaction(v, options, True) if (
                        savepoint) else None
                until -= RENEW
            elif kind is _QUIET or (kind is _TRIGGERED and facts.triggers is False):
                until = math.inf
            else:
                return None
            self.explicit = ()
            if not v.session:
                self._keep_passing(query, until, changes, options)
            return _PASS
        if status == _IDLE and not facts.due and not (
                kind is _EXPLICIT or kind is _SCHEMA or kind is _MULTI):
            self.savepoints = 0
            self.explicit = ()
            if self.passing:
                self._opening(options)
            if not v.session:
                if len(self.opening) >= VERDICTS:
                    self.opening.clear()
                facts.keep_opening(self.opening, query, changes)
            return _AUTOCOMMIT if autocommit else _OPENED
        return None

    def _keep_passing(self, query: str, until: float, changes: int, options: HealOptions
                      ) -> None:
        passing = self.passing
        if not passing:
            self._passing_path, self._passing_options = self.search_path(), options
        elif len(passing) >= VERDICTS:
            passing.clear()
        self.facts.keep_passing(passing, query, until, changes)

    def _opening(self, options: HealOptions) -> None:
        """A transaction opens: `passing` holds while the search_path and options are
        those it was filled under."""
        if options is not self._passing_options or self.search_path() != self._passing_path:
            self.passing.clear()

    def writes(self, explicit: tuple[Write, ...], statement: str | None = None
               ) -> list[Write]:
        """`explicit` (a verdict's writes) told by what the catalog says now.

        A table the catalog did not know when the statement was planned may be
        known now (the facts' check ran before it); one without a
        sequence-backed key, or an INSERT that did not name the key, drops out.
        Tables still unknown are kept with `statement` for `take_deferred`
        (None: dropped).
        """
        out: list[Write] = []
        now = time.monotonic()
        for w in explicit:
            if w.columns is not None and not w.columns:
                continue  # DEFAULT VALUES
            info = w.info
            if info is None:
                rel = self.facts.target(w.name, w.search_path, self.user, now)
                if rel is None:
                    if statement is not None and len(self.deferred) < DEFERRED:
                        self.deferred.append((w, statement))
                    continue
                info = rel.info
                if info is None:
                    continue
                w = Write(info, w.name, w.columns)
            if w.columns is not None and info.column not in w.columns:
                continue
            out.append(w)
        return out

    def copy_writes(self, name: tuple[str, ...], columns: frozenset[str] | None
                    ) -> tuple[Write, ...]:
        """The write of a ``COPY name [(columns)] FROM``: every row gives the columns."""
        search_path = self.search_path() if len(name) == 1 else None
        rel = self.facts.target(name, search_path, self.user, time.monotonic())
        if rel is None:
            return (Write(None, name, columns, search_path),)
        info = rel.info
        if info is None:
            return ()
        return (Write(info, name, frozenset({info.column}) if columns is None else columns),)

    def take_deferred(self) -> list[tuple[list[Write], str]]:
        """The deferred writes, told by what the catalog says after its check."""
        deferred, self.deferred = self.deferred, []
        return [(writes, statement) for w, statement in deferred
                if (writes := self.writes((w,)))]

    def transaction_block(self, status: int) -> None:
        """The caller opens a ``conn.transaction()`` block: a savepoint when inside one."""
        if status == _IDLE:
            self.savepoints = 0
        elif status == _INTRANS:
            self.savepoints += 1

    def _planned_in_transaction(self, v: Verdict, options: HealOptions, pipeline: bool
                                ) -> Mode:
        """`plan` inside a transaction, for the statement judged `v`."""
        self.explicit = v.writes
        kind = v.kind
        if kind is _DEFAULT_KEY and options.protect == "auto":
            # The hot path: a table verified in sync needs no savepoint.
            until = self.facts.verified.get(v.key)  # type: ignore[arg-type]
            if until is not None:
                now = time.monotonic()
                if until > now:
                    if until < now + RENEW:
                        self.facts.renew(v.rel)  # type: ignore[arg-type]
                    return _PASS
        elif kind is _QUIET or (kind is _TRIGGERED and self.facts.triggers is False):
            return _PASS
        return self._in_transaction(v, options, pipeline)

    def _in_transaction(self, v: Verdict, options: HealOptions, pipeline: bool) -> Mode:
        kind = v.kind
        if kind is Kind.SAVEPOINT:
            self.savepoints += 1
            return Mode.PASS
        if kind is Kind.QUIET or kind is Kind.SCHEMA or (
                kind is Kind.MULTI and not self.multi_savepoints):
            # A string of several statements cannot share a pipeline; one that
            # is not all DML may hold savepoint commands that would release ours.
            self._watch(v)
            return Mode.PASS
        if not (options.savepoints and pipeline) or self.savepoints >= SUBTRANSACTIONS:
            self._watch(v)
            return Mode.PASS
        if options.protect == "always":
            self._watch(v)
        elif not self._at_risk(v):
            return Mode.PASS
        self.savepoints += 1
        return Mode.SAVEPOINT

    def _at_risk(self, v: Verdict) -> bool:
        """Whether a statement inside a transaction may collide where a retry can follow."""
        kind = v.kind
        if kind is Kind.DEFAULT_KEY:
            assert v.rel is not None
            return not self.facts.in_sync(v.rel, time.monotonic())
        if kind is Kind.MULTI:
            return any([self._at_risk(p) for p in v.parts])  # each one judged (and watched)
        if kind is Kind.EXPLICIT:
            # A collision on an explicit key is a real duplicate, never
            # retried; and the table may now be ahead of its sequence.
            self._watch(v)
            return False
        if kind is Kind.NO_KEY:
            return False  # no sequence-backed key: nothing selfheal could retry
        if kind is Kind.TRIGGERED:
            triggers = self.facts.triggers
            if triggers is None:
                self.facts.want_triggers()
                return True
            return triggers
        return True

    def _watch(self, v: Verdict) -> None:
        """Note what a statement run without a check does to the facts."""
        if v.kind is Kind.MULTI:
            for p in v.parts:
                self._watch(p)
        elif v.kind is Kind.EXPLICIT:
            assert v.rel is not None
            self.facts.at_risk(*v.rel.key)
        elif v.kind is Kind.SCHEMA:
            self.facts.schema_changed()

    def _verdict(self, query: Any, conn: Any) -> Verdict:
        """What `query` is, judged once per string and catalog epoch."""
        found = self._verdicts.get(query) if isinstance(query, (str, bytes)) else None
        if found is not None and found.epoch == self.facts.epoch and (
                found.search_path is None or found.search_path == self.search_path()):
            return found
        v = self._judge(self.shape(query, conn))
        if not v.session and _calls_set_config(query):
            v = dataclasses.replace(v, session=True)
        if isinstance(query, (str, bytes)):
            if len(self._verdicts) >= VERDICTS:
                self._verdicts.clear()
            self._verdicts[query] = v
        return v

    def _judge(self, s: Shape) -> Verdict:
        facts = self.facts
        epoch = facts.epoch
        keyword = s.keyword
        if keyword == "SAVEPOINT":
            return Verdict(Kind.SAVEPOINT, epoch)
        if s.multi:
            if not s.atomic:
                return Verdict(Kind.SCHEMA, epoch)
            parts = tuple(self._judge(p) for p in s.parts)
            if all(p.kind is Kind.QUIET for p in parts):
                return Verdict(Kind.QUIET, epoch)
            paths = {p.search_path for p in parts} - {None}
            return Verdict(Kind.MULTI, facts.epoch, paths.pop() if paths else None,
                           parts=parts, writes=tuple(w for p in parts for w in p.writes))
        if keyword in SCHEMA_CHANGES:
            return Verdict(Kind.SCHEMA, epoch)
        if keyword in SESSION_CHANGES:
            return Verdict(Kind.QUIET, epoch, session=True)
        if not s.may_draw:
            return Verdict(Kind.QUIET, epoch)
        if keyword in ("UPDATE", "DELETE"):
            return Verdict(Kind.TRIGGERED, epoch)
        if keyword != "INSERT" or s.insert_table is None:
            return Verdict(Kind.UNSURE, epoch)
        table, columns = s.insert_table, s.insert_columns
        search_path = self.search_path() if len(table) == 1 else None
        rel = facts.target(table, search_path, self.user, time.monotonic())
        epoch = facts.epoch  # target() may have learnt nothing new, or asked
        if rel is None:
            # Unknown yet: its key is looked up once the statement succeeded.
            return Verdict(Kind.UNSURE, epoch, search_path, writes=(
                Write(None, table, columns, search_path),))
        info = rel.info
        if info is None:
            return Verdict(Kind.NO_KEY, epoch, search_path, rel, rel.key)
        if columns is None or info.column in columns:
            # Naming the key, or without a column list (each row may give it).
            writes = (Write(info, table, columns),)
            if rel.guarded or columns is None:
                return Verdict(Kind.UNSURE, epoch, search_path, writes=writes)
            return Verdict(Kind.EXPLICIT, epoch, search_path, rel, rel.key, writes=writes)
        if rel.guarded:
            return Verdict(Kind.UNSURE, epoch, search_path)
        return Verdict(Kind.DEFAULT_KEY, epoch, search_path, rel, rel.key)


def _calls_set_config(query: Any) -> bool:
    """Whether the text of `query` calls set_config (which may set the search_path)."""
    if isinstance(query, str):
        return "set_config" in query.lower()
    if isinstance(query, bytes):
        return b"set_config" in query.lower()
    return False
