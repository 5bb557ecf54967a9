"""
Fleet: check and fix sequences across many databases.

The operator's side of selfheal. `selfheal.targets` decides which databases
to visit (`plan`, `shard`); `check_fleet` and `fix_fleet` visit them on a
bounded number of threads, one connection each, and collect a `FleetReport`.

One failing database (cannot connect, lock timeout) is recorded in the report
and never stops the others. Input that cannot be right (a malformed DSN, a
pattern or table that matches nothing) raises `FleetError` before anything
is changed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import psycopg

from . import report
from ._drive import run
from ._ops import Operation, Query
from .api import check_readable, resync
from .conninfo import redact, scrub
from .discover import TableInfo, list_tables
from .errors import SelfhealError, first_line
from .names import TableName, parse_table_name, suggest
from .resync import (
    CAUSE_LIMIT,
    LOCK_TIMEOUT,
    ResyncResult,
    SequenceStatus,
    causes_query,
    target_value,
)
from .targets import (
    CONNECT_TIMEOUT,
    FleetError,
    Plan,
    Skipped,
    Target,
    parse_shard,
    plan,
    session_conninfo,
    shard,
    validate_like,
)

__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_JOBS",
    "DatabaseReport",
    "FleetError",
    "FleetReport",
    "Plan",
    "SequenceReport",
    "Skipped",
    "Target",
    "check_fleet",
    "fix_fleet",
    "gap",
    "parse_shard",
    "plan",
    "redact",
    "shard",
]

#: Databases visited at once by default: few enough for a laptop's server and
#: its max_connections, enough to hide each connection's latency.
DEFAULT_JOBS = 4

#: Drifted tables of one database whose cause one check reads.
CAUSES_LIMIT = 200

#: Called from the calling thread as work completes: (phase, done, total).
Progress = Callable[[str, int, int], None]

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class SequenceReport:
    """One sequence in a fleet run: as found, and for `fix_fleet` what was done."""

    database: str
    #: The sequence as `check` found it.
    found: SequenceStatus
    #: What resync did (fix only, for sequences that were out of sync).
    resync: ResyncResult | None = None
    #: Why the resync failed, if it did.
    error: str | None = None
    #: What drifted it, as found (out of sync only): keys at or past the
    #: sequence's next value (counted up to 1000) and the nearest of them.
    cause: tuple[int, int | None] | None = None

    @property
    def status(self) -> SequenceStatus:
        """The sequence as it is after the run (as found, unless resync moved it)."""
        if self.resync is None:
            return self.found
        key = self.resync.key_value
        if self.found.increment > 0:
            return replace(self.found, next_value=self.resync.after, max_value=key)
        return replace(self.found, next_value=self.resync.after, min_value=key)

    @property
    def in_sync(self) -> bool:
        """True when the sequence is past its table's keys after the run."""
        return self.error is None and self.status.in_sync

    @property
    def changed(self) -> bool:
        """True when this run moved the sequence."""
        return self.resync is not None and self.resync.changed

    @property
    def move_to(self) -> int:
        """The next value a fix gives the sequence: past its keys, on its stride
        (its next value as it is when in sync)."""
        status = self.status
        key = status.max_value if status.increment > 0 else status.min_value
        target = target_value(status.next_value, status.increment, key)
        return status.next_value if target is None else target

    def as_dict(self, fix: bool = False, dry_run: bool = False) -> dict[str, Any]:
        """Plain data for JSON; `fix` adds ``before``, ``after`` and ``changed``,
        and a `dry_run` ``would_move_to``."""
        data: dict[str, Any] = {"database": self.database, **self.status.as_dict()}
        data["in_sync"] = self.in_sync
        if fix:
            data["before"] = self.found.next_value
            data["after"] = self.status.next_value
            data["changed"] = self.changed
            if dry_run:
                data["would_move_to"] = self.move_to
        cause = self.cause
        if self.resync is not None and self.resync.keys_past is not None:
            cause = (self.resync.keys_past, self.resync.first_key_past)
        if cause is not None:
            # What drifted it: how many keys lay past the sequence, from where to where.
            found = self.found
            data["keys_past"], data["first_key_past"] = cause
            data["keys_past_capped"] = cause[0] >= CAUSE_LIMIT
            data["last_key_past"] = found.max_value if found.increment > 0 else found.min_value
        if self.error is not None:
            data["error"] = self.error
        return data


@dataclass(frozen=True)
class DatabaseReport:
    """What a run found in one database, or why it could not look."""

    target: Target
    sequences: list[SequenceReport] = field(default_factory=list)
    #: Why the database could not be checked (connection, permission, lock timeout).
    error: str | None = None
    #: Tables that could not be checked, as (schema, table, why): the others were.
    unreadable: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        """True when the database, any of its tables or any of its resyncs failed."""
        return (self.error is not None or bool(self.unreadable)
                or any(s.error is not None for s in self.sequences))

    @property
    def drifted(self) -> list[SequenceReport]:
        """Sequences still behind their table's keys after the run."""
        return [s for s in self.sequences if not s.in_sync]


@dataclass(frozen=True)
class FleetReport:
    """The outcome of `check_fleet` or `fix_fleet` over every target."""

    command: str
    databases: list[DatabaseReport]
    dry_run: bool = False
    elapsed: float = 0.0

    @property
    def sequences(self) -> list[SequenceReport]:
        """Every sequence of every database, in target order."""
        return [s for db in self.databases for s in db.sequences]

    @property
    def failed(self) -> list[DatabaseReport]:
        """Databases that could not be checked or where a resync failed."""
        return [db for db in self.databases if db.failed]

    @property
    def exit_code(self) -> int:
        """0 all in sync, 1 drift left (found by check, or by a dry run), 2 an error."""
        if self.failed:
            return 2
        return 1 if any(db.drifted for db in self.databases) else 0


# -- visiting databases ------------------------------------------------------------


def _connect(target: Target, connect_timeout: float, lock_timeout: float
             ) -> psycopg.Connection[Any]:
    # Autocommit: check and each resync open and close their own scope, so
    # no transaction stays open between them.
    return psycopg.connect(session_conninfo(target.conninfo, connect_timeout, lock_timeout),
                           autocommit=True)


def _check_one(
    target: Target,
    schema: str | None,
    tables: list[TableName] | None,
    exclude_schemas: list[str] | None,
    connect_timeout: float,
    lock_timeout: float,
    guess: list[TableInfo],
) -> DatabaseReport:
    relnames = sorted({n for t in tables for n in t.names}) if tables else None
    try:
        with _connect(target, connect_timeout, lock_timeout) as conn:
            found, unreadable = check_readable(conn, schema, tables=relnames,
                                               exclude_schemas=exclude_schemas, guess=guess)
            causes = _causes(conn, [s for s in found if not s.in_sync])
    except (psycopg.Error, SelfhealError) as ex:
        return DatabaseReport(target, error=scrub(first_line(ex)))
    if tables:
        found = [s for s in found if any(t.matches(s.schema, s.table) for t in tables)]
        unreadable = [u for u in unreadable
                      if any(t.matches(u.info.schema, u.info.table) for t in tables)]
    return DatabaseReport(target, [SequenceReport(target.name, s, cause=causes.get(
                                       (s.schema, s.table))) for s in found],
                          unreadable=[(u.info.schema, u.info.table, f"permission denied:"
                                       f" selfheal needs {u.needs}") for u in unreadable])


def _causes(conn: psycopg.Connection[Any], drifted: list[SequenceStatus]
            ) -> dict[tuple[str, str], tuple[int, int | None]]:
    """What drifted each table of `drifted`: one query more, only where there is drift.

    Best effort: a table whose keys cannot be read now (a lock, a privilege)
    is reported without its cause, never as a failure.
    """
    if not drifted:
        return {}
    try:
        rows = run(conn, _one_query(causes_query(drifted[:CAUSES_LIMIT])))
    except psycopg.Error:
        return {}
    return {(drifted[i].schema, drifted[i].table): (count, first) for i, count, first in rows}


def _one_query(query: Query) -> Operation[list[Any]]:
    return (yield query)  # type: ignore[no-any-return]


def _table_names(tables: list[str] | None) -> list[TableName] | None:
    if not tables:
        return None
    try:
        return [parse_table_name(t) for t in tables]
    except ValueError as ex:
        raise FleetError(str(ex)) from None


def _existing(target: Target, schema: str | None, connect_timeout: float
              ) -> list[tuple[str, str]]:
    """The tables with a sequence-backed key in `target` (for suggestions; [] on failure)."""
    try:
        with _connect(target, connect_timeout, LOCK_TIMEOUT) as conn:
            infos = run(conn, list_tables([schema] if schema else None))
    except (psycopg.Error, SelfhealError):
        return []
    return [(i.schema, i.table) for i in infos]


def _fix_one(
    db: DatabaseReport, connect_timeout: float, lock_timeout: float
) -> DatabaseReport:
    done: list[SequenceReport] = []
    try:
        with _connect(db.target, connect_timeout, lock_timeout) as conn:
            for seq in db.sequences:
                if seq.in_sync:
                    done.append(seq)
                    continue
                started = time.perf_counter()
                try:
                    result = resync(conn, seq.found.table, seq.found.schema,
                                    lock_timeout=lock_timeout)
                except (psycopg.Error, SelfhealError) as ex:
                    done.append(replace(seq, error=scrub(first_line(ex))))
                else:
                    done.append(replace(seq, resync=result))
                    if result.changed:
                        report.fixed(db.target.name, seq.found, result,
                                     round((time.perf_counter() - started) * 1000, 3))
    except psycopg.Error as ex:
        return replace(db, error=scrub(first_line(ex)))
    return replace(db, sequences=done)


def _map(
    fn: Callable[[T], R],
    items: Sequence[T],
    jobs: int,
    phase: str,
    progress: Progress | None,
) -> list[R]:
    """`fn` over `items` on at most `jobs` threads; results in the order of `items`."""
    results: list[Any] = [None] * len(items)
    if progress:
        progress(phase, 0, len(items))
    if jobs <= 1 or len(items) <= 1:
        for i, item in enumerate(items):
            results[i] = fn(item)
            if progress:
                progress(phase, i + 1, len(items))
        return results
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="selfheal") as pool:
        futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
        try:
            for done, future in enumerate(as_completed(futures), 1):
                results[futures[future]] = future.result()
                if progress:
                    progress(phase, done, len(items))
        except BaseException:
            # Ctrl-C: do not open connections to the databases not reached yet.
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return results


def _missing(
    reports: list[DatabaseReport], schema: str | None, tables: list[TableName] | None,
    connect_timeout: float,
) -> str | None:
    """Why the filters look wrong: a table or schema found in no database checked."""
    checked = [db for db in reports if db.error is None]
    if not checked or (not tables and not schema):
        return None
    where = checked[0].target.display if len(reports) == 1 else f"any of {len(reports)} databases"
    in_schema = f" in schema {schema!r}" if schema else ""
    found = [(s.found.schema, s.found.table) for db in checked for s in db.sequences]
    found += [(schema, table) for db in checked for schema, table, _ in db.unreadable]
    for table in tables or []:
        if not any(table.matches(*f) for f in found):
            close = suggest(table, _existing(checked[0].target, schema, connect_timeout))
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            return (f"table {table.text!r} not found{in_schema} in {where}"
                    f" (or it has no sequence-backed primary key){hint}")
    if not found:
        return f"no table with a sequence-backed primary key in schema {schema!r} in {where}"
    return None


def _validate_jobs(jobs: int) -> None:
    if jobs < 1:
        raise FleetError(f"bad --jobs {jobs}: need at least 1")


def check_fleet(
    targets: Sequence[Target],
    *,
    schema: str | None = None,
    tables: list[str] | None = None,
    exclude_schemas: list[str] | None = None,
    jobs: int = DEFAULT_JOBS,
    connect_timeout: float = CONNECT_TIMEOUT,
    lock_timeout: float = LOCK_TIMEOUT,
    progress: Progress | None = None,
) -> FleetReport:
    """Check every target, `jobs` databases at a time; moves nothing.

    Costs one connection and a constant number of round trips per database,
    whatever its number of tables. `schema` may be a LIKE pattern (schema per
    tenant: ``tenant\\_%``), and so may each of `exclude_schemas`, schemas
    left out. `tables` as ``--table`` takes them (see `selfheal.names`).
    Raises `FleetError` when `tables` or `schema` match nothing in any
    database that could be checked.
    """
    _validate_jobs(jobs)
    if schema is not None:
        validate_like(schema, "schema")
    for pattern in exclude_schemas or []:
        validate_like(pattern, "schema")
    names = _table_names(tables)
    started = time.monotonic()
    # Per worker thread, the tables the last database it checked had: the next
    # one's status query goes with its discovery (see `check_readable`).
    guesses = threading.local()

    def one(target: Target) -> DatabaseReport:
        guess = getattr(guesses, "tables", None)
        if guess is None:
            guess = guesses.tables = []
        return _check_one(target, schema, names, exclude_schemas, connect_timeout,
                          lock_timeout, guess)

    reports = _map(
        one,
        list(targets), jobs, "check", progress,
    )
    problem = _missing(reports, schema, names, connect_timeout)
    if problem:
        raise FleetError(problem)
    return FleetReport("check", reports, elapsed=time.monotonic() - started)


def fix_fleet(
    targets: Sequence[Target],
    *,
    schema: str | None = None,
    tables: list[str] | None = None,
    exclude_schemas: list[str] | None = None,
    dry_run: bool = False,
    jobs: int = DEFAULT_JOBS,
    connect_timeout: float = CONNECT_TIMEOUT,
    lock_timeout: float = LOCK_TIMEOUT,
    progress: Progress | None = None,
) -> FleetReport:
    """Check every target, then resync only the sequences found behind.

    The whole fleet is checked first, so a table or schema that matches
    nothing raises `FleetError` before any sequence moves; only databases
    with drift are visited again. `dry_run` stops after the check. Each resync
    is race-free and never moves a sequence backwards (see `selfheal.resync`).
    """
    started = time.monotonic()
    found = check_fleet(
        targets, schema=schema, tables=tables, exclude_schemas=exclude_schemas, jobs=jobs,
        connect_timeout=connect_timeout, lock_timeout=lock_timeout, progress=progress,
    )
    databases = found.databases
    todo = [db for db in databases if db.error is None and db.drifted]
    if todo and not dry_run:
        fixed = _map(lambda db: _fix_one(db, connect_timeout, lock_timeout),
                     todo, jobs, "fix", progress)
        redone = {id(old): new for old, new in zip(todo, fixed, strict=True)}
        databases = [redone.get(id(db), db) for db in databases]
    return FleetReport("fix", databases, dry_run=dry_run, elapsed=time.monotonic() - started)


def gap(status: SequenceStatus) -> int:
    """How many nextval() calls stand between the sequence and its first free value."""
    key = status.max_value if status.increment > 0 else status.min_value
    target = target_value(status.next_value, status.increment, key)
    return 0 if target is None else (target - status.next_value) // status.increment
