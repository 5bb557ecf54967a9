"""
In sync: the tables a statement can write to without a savepoint.

A primary-key collision needs a sequence whose next value is at or below
keys already in its table. Per database and per process, selfheal keeps the
verified fact "this table's sequence is past its keys" (one index probe of
the key's extremes and one read of the sequence) for a short window
(`HealOptions.verified_for`, one second by default). The fact is dropped on a
collision, on an explicit-key write selfheal sees (the table is then "at
risk" for `RISK_PERIOD`), and on any schema change selfheal sees.

What the catalog says about a name (which table it means, its key and
sequence, whether triggers or rules may make an insert write elsewhere) is
read once and again after `CATALOG_PERIOD`. Every memory here is bounded.

Nothing here touches a connection: `Facts.refresh` is an I/O-free operation,
two round trips, that a driver shell runs on a connection while it is idle
outside any transaction. Statements that find a fact missing or old ask for
it (`due`), and run protected until it is there.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from psycopg import sql

from . import _ops
from ._ops import Batch, Command, Operation, Query
from .discover import TableInfo, named_query, relations
from .resync import status_query, statuses

__all__ = ["CATALOG_PERIOD", "RISK_PERIOD", "Facts", "Relation", "facts_for"]

#: Seconds a table stays protected after a collision or an explicit-key write.
RISK_PERIOD = 60.0
#: Seconds before a failed check is tried again.
RETRY_PERIOD = 5.0
#: Seconds what the catalog said about a name is trusted.
CATALOG_PERIOD = 30.0
#: Entries of each kind (names, tables, resolutions) kept per database.
LIMIT = 4096
#: Tables one check reads at most, beyond those statements asked for.
CHECK_LIMIT = 100
#: Databases whose facts one process keeps.
DATABASES = 256

Key = tuple[str, str]

# The check runs in a read-only transaction of its own. BEGIN goes first and
# alone: a query queued behind it would make psycopg open a transaction too
# (a connection not in autocommit), since BEGIN has not run yet.
_BEGIN = Command("BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY")
# Bounds on selfheal's own check: it must never hold up the caller.
_OPEN = (
    Command("SET LOCAL lock_timeout = '50ms'"),
    Command("SET LOCAL statement_timeout = '2s'"),
)
_CLOSE = Command("ROLLBACK")

# Per relation called one of the names: is it temporary, and may an INSERT
# into it write elsewhere (not a plain table, rules, or a user trigger on it
# or on any of its partitions)?
_FLAGS = sql.SQL("""\
SELECT n.nspname, c.relname, c.relpersistence = 't',
       c.relkind NOT IN ('r', 'p') OR c.relhasrules OR EXISTS (
         SELECT 1 FROM pg_trigger t
         WHERE t.tgrelid IN (SELECT relid FROM pg_partition_tree(c.oid)) AND NOT t.tgisinternal)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname = ANY ({}) AND c.relkind IN ('r', 'p', 'v', 'f', 'm')
""")

# Whether anything in the database can make an UPDATE or DELETE insert rows.
_TRIGGERS = Query(
    "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE NOT tgisinternal)"
    " OR EXISTS (SELECT 1 FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class"
    " WHERE r.rulename <> '_RETURN' AND c.relnamespace <> 'pg_catalog'::regnamespace)"
)


@dataclass(frozen=True, slots=True)
class Relation:
    """What the catalog says about one relation a statement may write to."""

    schema: str
    table: str
    #: Its sequence-backed primary key, None when it has none.
    info: TableInfo | None
    #: An insert may write to other tables (triggers, rules) or it is no plain table.
    guarded: bool
    #: A temporary table (it shadows others of its name in its own session).
    temp: bool
    #: The role that looked can read its key and sequence.
    readable: bool

    @property
    def key(self) -> Key:
        """The table its facts are kept under: the one its key belongs to."""
        info = self.info
        return (info.schema, info.table) if info is not None else (self.schema, self.table)


class Facts:
    """What one process knows about one database."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: relname -> (when read, the relations of that name in any schema)
        self.catalog: dict[str, tuple[float, tuple[Relation, ...]]] = {}
        #: Tables verified in sync -> until when (time.monotonic()).
        self.verified: dict[Key, float] = {}
        self._risky: dict[Key, float] = {}
        self._wanted_names: set[str] = set()
        self._wanted_tables: dict[Key, TableInfo] = {}
        #: Whether the database has user triggers or rules (None: not known yet).
        self.triggers: bool | None = None
        self._triggers_at = 0.0
        self._refreshing = False
        #: Something is wanted: run `refresh` at the next idle moment.
        self.due = False
        #: Changes whenever what the catalog says may have changed.
        self.epoch = 0
        #: Tables a healing connection wrote keys of its own into (`selfheal.explicit`)
        #: -> (how many statements, the last one's text without values).
        self.explicit_writes: dict[Key, tuple[int, str]] = {}
        #: Counts the changes that may end a statement's passing (`keep_passing`).
        self.changes = 0
        self._watchers: weakref.WeakSet[Any] = weakref.WeakSet()

    # -- the connections' passing statements ---------------------------------------

    def watch(self, planner: Any) -> None:
        """Empty ``planner.passing`` whenever what it holds may no longer hold."""
        with self._lock:
            self._watchers.add(planner)

    def keep_passing(self, passing: dict[str, float], query: str, until: float,
                     changes: int) -> None:
        """Keep `query` in a watcher's `passing` until `until`, unless the facts
        changed since `changes` (`Facts.changes`) was read to judge it."""
        with self._lock:
            if self.changes == changes:
                passing[query] = until

    def keep_opening(self, opening: set[str], query: str, changes: int) -> None:
        """Keep `query` in a watcher's `opening`, unless the facts changed since
        `changes` was read, or a check is due."""
        with self._lock:
            if self.changes == changes and not self.due:
                opening.add(query)

    def _changed(self) -> None:
        # Called with the lock held: every passing statement is judged again.
        self.changes += 1
        for planner in self._watchers:
            planner.passing.clear()
            planner.opening.clear()

    def _due(self) -> None:
        # Called with the lock held: the next transaction to open runs the check.
        self.due = True
        for planner in self._watchers:
            planner.opening.clear()

    # -- the hot path: dictionary lookups -----------------------------------------

    def target(self, name: tuple[str, ...], search_path: str | bytes | None, user: str,
               now: float) -> Relation | None:
        """The relation an INSERT into `name` writes to; None when unsure.

        An unqualified name is resolved through `search_path` (None when the
        server does not report it: then only a name that one schema has).
        Called once per statement string and catalog epoch (the connections'
        verdicts keep the answer).
        """
        entry = self.catalog.get(name[-1])
        if entry is None or entry[0] <= now - CATALOG_PERIOD:
            self._want_name(name[-1])
            return None
        return _resolve(name, entry[1], search_path, user)

    def in_sync(self, rel: Relation, now: float) -> bool:
        """Whether `rel` is verified in sync now; if not, ask for a check."""
        key = rel.key
        until = self.verified.get(key)
        if until is not None and until > now:
            return True
        if rel.readable and self._risky.get(key, 0.0) <= now:
            self.renew(rel)
        return False

    def renew(self, rel: Relation) -> None:
        """Ask for a new check of `rel` at the next idle moment."""
        if rel.info is not None and rel.key not in self._wanted_tables:
            with self._lock:
                if len(self._wanted_tables) < LIMIT:
                    self._wanted_tables[rel.key] = rel.info
                    self._due()

    def want_triggers(self) -> None:
        """Ask to learn whether the database has triggers or rules."""
        with self._lock:
            self._due()

    # -- what drops facts ---------------------------------------------------------

    def at_risk(self, schema: str, table: str, period: float = RISK_PERIOD) -> None:
        """A collision or an explicit-key write on this table: protect it for `period`."""
        key = (schema, table)
        with self._lock:
            if self.verified.pop(key, None) is not None:
                self._changed()
            if len(self._risky) >= LIMIT:
                self._risky.clear()
            self._risky[key] = time.monotonic() + period

    def explicit_write(self, schema: str, table: str, statement: str) -> None:
        """A statement through a healing connection wrote keys of its own into this table."""
        key = (schema, table)
        with self._lock:
            count = self.explicit_writes.get(key, (0, ""))[0]
            if not count and len(self.explicit_writes) >= LIMIT:
                self.explicit_writes.clear()
            self.explicit_writes[key] = (count + 1, statement)
        self.at_risk(schema, table)

    def settled(self, schema: str, table: str) -> None:
        """An explicit-key write was looked at and left the sequence past the keys
        (`selfheal.explicit`): no longer at risk. Not verified either: the next
        check (asked for by the next statement that needs it) may verify it."""
        with self._lock:
            self._risky.pop((schema, table), None)

    def explicit_seen(self, schema: str, table: str) -> dict[str, Any]:
        """The heal event's fields telling whether this process saw explicit-id writes."""
        found = self.explicit_writes.get((schema, table))
        if found is None:
            return {"explicit_writes_seen": 0}
        return {"explicit_writes_seen": found[0], "explicit_statement": found[1]}

    def forget_verified(self) -> None:
        """A write selfheal cannot read (COPY): no table is known in sync any more."""
        with self._lock:
            self.verified.clear()
            self._changed()

    def schema_changed(self) -> None:
        """DDL was seen: forget what the catalog said, and every verified table."""
        with self._lock:
            self.catalog.clear()
            self.verified.clear()
            self.triggers = None
            self.epoch += 1
            self._changed()

    # -- the check: one round trip, I/O-free ---------------------------------------

    def refresh(self, verified_for: float,
                clock: Callable[[], float] = time.monotonic
                ) -> Operation[BaseException | None]:
        """Read what statements asked for, on a connection idle outside any transaction.

        Never raises a database error: a check that fails leaves the tables
        protected and is tried again after `RETRY_PERIOD`, and returns the
        error it met (None otherwise), for the driver shell to tell a lost
        connection: the caller's next statement would have met that error.
        """
        now = clock()
        with self._lock:
            if self._refreshing or not self.due:
                return None
            self._refreshing, self.due = True, False
            # Names read long ago are read again with whatever was asked for.
            stale = [name for name, (at, _) in self.catalog.items()
                     if at <= now - CATALOG_PERIOD][:CHECK_LIMIT]
            names = sorted(self._wanted_names.union(stale))
            tables = list(self._wanted_tables.values())
            self._wanted_names.clear()
            self._wanted_tables.clear()
            triggers = self.triggers is None or self._triggers_at <= now - CATALOG_PERIOD
        try:
            queries: list[Query | Command] = [*_OPEN]
            if names:
                queries += [named_query(names), Query(_FLAGS.format(names))]
            if triggers:
                queries.append(_TRIGGERS)
            if tables:
                queries.append(status_query(tables))
            if len(queries) == len(_OPEN):
                return None
            try:
                yield _BEGIN
                # Tables of names learned now are checked in the same
                # transaction, a round trip later.
                results = yield Batch(queries if names else [*queries, _CLOSE])
                self._learn(results[len(_OPEN):], names, tables, triggers, verified_for, clock())
                if names:
                    more = self._unchecked(names, tables)
                    if more:
                        (rows, _) = yield Batch([status_query(more), _CLOSE])
                        self._learn([rows], [], more, False, verified_for, clock())
                    else:
                        yield _CLOSE
            except _ops.ERRORS as err:
                with contextlib.suppress(*_ops.ERRORS):
                    yield _CLOSE
                self._failed(names, tables)
                return err
        finally:
            self._refreshing = False
        return None

    def _unchecked(self, names: list[str], checked: list[TableInfo]) -> list[TableInfo]:
        """The tables called one of `names` that could be checked, up to `CHECK_LIMIT`."""
        done = {(info.schema, info.table) for info in checked}
        found: list[TableInfo] = []
        for name in names:
            for rel in self.catalog.get(name, (0.0, ()))[1]:
                info = rel.info
                if info is not None and rel.readable and not rel.guarded and (
                        info.schema, info.table) not in done:
                    done.add((info.schema, info.table))
                    found.append(info)
        return found[:CHECK_LIMIT]

    def _learn(self, results: list[Any], names: list[str], tables: list[TableInfo],
               triggers: bool, verified_for: float, now: float) -> None:
        i = 0
        with self._lock:
            if names:
                self._store(names, results[0], results[1], now)
                i = 2
            if triggers:
                found = bool(results[i][0][0])
                if found and self.triggers is not True:
                    self._changed()
                self.triggers, self._triggers_at = found, now
                i += 1
            if tables:
                for info, status in zip(tables, statuses(tables, results[i]), strict=True):
                    key = (info.schema, info.table)
                    if status.in_sync and self._risky.get(key, 0.0) <= now:
                        if len(self.verified) >= LIMIT:
                            self.verified.clear()
                            self._changed()
                        self.verified[key] = now + verified_for

    def _store(self, names: list[str], keyed: list[Any], flags: list[Any], now: float) -> None:
        infos = {(schema, table): (info, readable)
                 for schema, table, info, readable in relations(keyed)}
        found: dict[str, list[Relation]] = {name: [] for name in names}
        for schema, table, temp, guarded in flags:
            info, readable = infos.get((schema, table), (None, False))
            found.setdefault(table, []).append(Relation(
                schema, table, info, guarded=bool(guarded), temp=bool(temp), readable=readable))
        if len(self.catalog) + len(found) > LIMIT:
            self.catalog.clear()
        for name, rels in found.items():
            self.catalog[name] = (now, tuple(rels))
        self.epoch += 1
        self._changed()

    def _failed(self, names: list[str], tables: list[TableInfo]) -> None:
        # Unknown until the retry: statements stay protected meanwhile.
        until = time.monotonic() + RETRY_PERIOD
        with self._lock:
            for name in names:
                self.catalog[name] = (until - CATALOG_PERIOD, ())
            self.epoch += 1
            self._changed()
            for info in tables:
                self._risky[(info.schema, info.table)] = until

    def _want_name(self, name: str) -> None:
        with self._lock:
            if len(self._wanted_names) < LIMIT:
                self._wanted_names.add(name)
                self._due()


def _resolve(name: tuple[str, ...], rels: tuple[Relation, ...],
             search_path: str | bytes | None, user: str) -> Relation | None:
    """Which of `rels` (the relations called ``name[-1]``) `name` means; None: unsure."""
    if len(name) > 1:
        schema = name[-2]
        return next((r for r in rels if r.schema == schema and not r.temp), None)
    if any(r.temp for r in rels):
        return None  # a session's own temporary table would come first
    if search_path is None:
        return rels[0] if len(rels) == 1 else None
    for schema in _schemas(search_path, user):
        for r in rels:
            if r.schema == schema:
                return r
    return None


def _schemas(search_path: str | bytes, user: str) -> list[str]:
    """The schema names of a reported search_path, ``$user`` replaced by `user`."""
    if isinstance(search_path, bytes):
        search_path = search_path.decode("utf-8", "replace")
    out: list[str] = []
    for part in _split(search_path):
        if part == "$user":
            out.append(user)
        else:
            out.append(part)
    return out


def _split(text: str) -> list[str]:
    # search_path as the server reports it: comma-separated, quoted where needed.
    parts: list[str] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " ,":
            i += 1
        if i >= n:
            break
        if text[i] == '"':
            j, buf = i + 1, []
            while j < n:
                if text[j] == '"':
                    if text.startswith('"', j + 1):
                        buf.append('"')
                        j += 2
                        continue
                    break
                buf.append(text[j])
                j += 1
            parts.append("".join(buf))
            i = j + 1
        else:
            j = i
            while j < n and text[j] != ",":
                j += 1
            parts.append(text[i:j].strip().lower())
            i = j
    return parts


_registry: dict[tuple[Any, ...], Facts] = {}
_registry_lock = threading.Lock()


def facts_for(database: tuple[Any, ...]) -> Facts:
    """This process's `Facts` for `database` (an identity such as host, port, name)."""
    found = _registry.get(database)
    if found is not None:
        return found
    with _registry_lock:
        found = _registry.get(database)
        if found is None:
            if len(_registry) >= DATABASES:
                _registry.pop(next(iter(_registry)))
            found = _registry[database] = Facts()
        return found


def _forget_all() -> None:
    # A forked child starts afresh: its parent's locks may be held.
    global _registry_lock
    _registry.clear()
    _registry_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_all)
