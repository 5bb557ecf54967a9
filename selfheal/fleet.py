"""
Fleet: check and fix sequences across many databases.

The operator's side of selfheal. `plan` turns DSNs and tenant options
(a LIKE pattern over the server's databases, every database, or a query
returning tenants) into a sorted list of `Target` databases; `shard` keeps one
stable slice of it; `check_fleet` and `fix_fleet` visit the targets on a
bounded number of threads, one connection each, and collect a `FleetReport`.

One failing database (cannot connect, lock timeout) is recorded in the report
and never stops the others. Input that cannot be right (a malformed DSN, a
pattern or table that matches nothing) raises `FleetError` before anything
is changed.
"""

from __future__ import annotations

import os
import re
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from . import report
from ._drive import run
from .conninfo import InvalidDSN, redact, scrub, validate
from .discover import list_tables
from .errors import SelfhealError, first_line
from .names import TableName, parse_table_name, suggest
from .resync import (
    LOCK_TIMEOUT,
    ResyncResult,
    SequenceStatus,
    check_readable,
    resync,
    target_value,
)

__all__ = [
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

#: Seconds to wait for a connection before recording the database as failed.
CONNECT_TIMEOUT = 10.0

#: Called from the calling thread as work completes: (phase, done, total).
Progress = Callable[[str, int, int], None]

T = TypeVar("T")
R = TypeVar("R")


class FleetError(SelfhealError):
    """Input that cannot be right: a bad DSN or shard, a pattern or table matching nothing."""


@dataclass(frozen=True)
class Target:
    """One database to visit."""

    #: Connection string, password included: never print it, print `display`.
    conninfo: str
    #: The database name, as reported in output.
    name: str

    @property
    def display(self) -> str:
        """The connection string with any password hidden."""
        return redact(self.conninfo)


@dataclass(frozen=True)
class Skipped:
    """A database that matched but cannot be visited (a template, or no connections)."""

    name: str
    reason: str


@dataclass(frozen=True)
class Plan:
    """The databases a run will visit, sorted by name, and those it skipped."""

    targets: list[Target]
    skipped: list[Skipped] = field(default_factory=list)


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


# -- targets ---------------------------------------------------------------------

_URL = re.compile(r"^postgres(ql)?://", re.IGNORECASE)


def _dbname(conninfo: str) -> str:
    # libpq's own fallbacks when the DSN names no database.
    params = conninfo_to_dict(conninfo)
    name = params.get("dbname") or os.environ.get("PGDATABASE") or params.get("user")
    return str(name or os.environ.get("PGUSER") or redact(conninfo))


def _target(conninfo: str) -> Target:
    return Target(conninfo=conninfo, name=_dbname(conninfo))


def _validate_dsn(dsn: str, number: int, of: int) -> None:
    try:
        validate(dsn)
    except InvalidDSN as ex:
        which = f" #{number} of {of}" if of > 1 else ""
        raise FleetError(f"invalid DSN{which} ({redact(dsn)}): {ex}") from None


def like_regex(pattern: str) -> re.Pattern[str]:
    """SQL LIKE `pattern` (``%``, ``_``, ``\\`` escaping) as a regular expression."""
    out: list[str] = []
    chars = iter(pattern)
    for c in chars:
        if c == "\\":
            out.append(re.escape(next(chars, "\\")))
        elif c == "%":
            out.append(".*")
        elif c == "_":
            out.append(".")
        else:
            out.append(re.escape(c))
    return re.compile("".join(out), re.DOTALL)


def _validate_like(pattern: str, what: str) -> None:
    # An odd run of trailing backslashes escapes nothing; PostgreSQL rejects it.
    trailing = len(pattern) - len(pattern.rstrip("\\"))
    if trailing % 2:
        raise FleetError(f"bad {what} pattern {pattern!r}: it ends with the escape character \\")


def _admin(dsn: str, connect_timeout: float) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(_session_conninfo(dsn, connect_timeout, None), autocommit=True)
    except psycopg.Error as ex:
        raise FleetError(f"cannot connect to {redact(dsn)}: {first_line(ex)}") from ex


def _list_databases(dsn: str, pattern: str, connect_timeout: float) -> Plan:
    # Templates and datallowconn = false are fetched too, to say they were skipped.
    with _admin(dsn, connect_timeout) as conn:
        rows = conn.execute(
            "SELECT datname, datistemplate, datallowconn FROM pg_database"
            " WHERE datname LIKE %s ORDER BY datname",
            (pattern,),
        ).fetchall()
    targets: list[Target] = []
    skipped: list[Skipped] = []
    for name, is_template, allows in rows:
        if is_template:
            skipped.append(Skipped(name, "template database"))
        elif not allows:
            skipped.append(Skipped(name, "does not allow connections"))
        else:
            targets.append(Target(conninfo=make_conninfo(dsn, dbname=name), name=name))
    return Plan(targets, skipped)


def _run_tenants_query(dsn: str, query: str, connect_timeout: float) -> list[Target]:
    with _admin(dsn, connect_timeout) as conn:
        try:
            # Operator-supplied SQL, run as given: it is the operator's own query.
            rows = conn.execute(query.encode()).fetchall()
        except psycopg.Error as ex:
            raise FleetError(f"tenants query failed on {redact(dsn)}: {first_line(ex)}") from ex
    targets: list[Target] = []
    for number, row in enumerate(rows, 1):
        if not row or not isinstance(row[0], str) or not row[0]:
            raise FleetError(
                "tenants query must return database names or DSNs (text) in its first column,"
                f" got {row[0] if row else None!r}"
            )
        value = row[0]
        if "=" in value or _URL.match(value):
            try:
                targets.append(_target(value))
            except psycopg.Error:
                # One bad row is one failing tenant (reported when it is
                # visited), not a reason to skip all the others.
                targets.append(Target(conninfo=value, name=f"tenants query row {number}"))
        else:
            targets.append(Target(conninfo=make_conninfo(dsn, dbname=value), name=value))
    return targets


def plan(
    dsns: Sequence[str],
    *,
    databases: str | None = None,
    all_databases: bool = False,
    tenants_query: str | None = None,
    exclude_databases: Sequence[str] = (),
    connect_timeout: float = CONNECT_TIMEOUT,
) -> Plan:
    """Expand DSNs into the databases to visit, sorted by name.

    Without tenant options each DSN is one database. `databases` (a LIKE
    pattern) or `all_databases` list the databases of each DSN's server,
    skipping templates and databases that refuse connections; `tenants_query`
    is run on each DSN and returns database names (reached with the DSN's
    other parameters) or full DSNs. Databases whose name matches one of the
    LIKE patterns `exclude_databases` are left out. Raises `FleetError` for a
    malformed DSN, a failing listing or an empty result.
    """
    if not dsns:
        raise FleetError("no DSN given and DATABASE_URL is not set")
    for number, dsn in enumerate(dsns, 1):
        _validate_dsn(dsn, number, len(dsns))
    if databases is not None:
        _validate_like(databases, "database")
    for pattern in exclude_databases:
        _validate_like(pattern, "database")
    excluded = [like_regex(p) for p in exclude_databases]
    targets: list[Target] = []
    skipped: list[Skipped] = []
    for dsn in dsns:
        if databases is not None or all_databases:
            listed = _list_databases(dsn, "%" if all_databases else (databases or ""),
                                     connect_timeout)
            targets += listed.targets
            skipped += listed.skipped
        elif tenants_query is not None:
            targets += _run_tenants_query(dsn, tenants_query, connect_timeout)
        else:
            targets.append(_target(dsn))
    if excluded:
        targets = [t for t in targets if not any(r.fullmatch(t.name) for r in excluded)]
    unique = {_identity(t): t for t in targets}
    ordered = sorted(unique.values(), key=lambda t: (t.name, t.display))
    if not ordered:
        where = ", ".join(redact(d) for d in dsns)
        if excluded:
            raise FleetError(f"no database left to visit on {where} after --exclude-database")
        if databases is not None:
            raise FleetError(f"no database matching {databases!r} on {where}")
        raise FleetError(f"no database to visit: the tenants query returned none on {where}")
    return Plan(ordered, skipped)


def _identity(target: Target) -> str:
    try:
        params = conninfo_to_dict(target.conninfo)
    except psycopg.Error:
        return target.name
    params.pop("password", None)
    return make_conninfo("", **dict(sorted(params.items())))


def parse_shard(text: str) -> tuple[int, int]:
    """Parse ``I/N`` (0 <= I < N, as Kubernetes' JOB_COMPLETION_INDEX counts)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise FleetError(f"bad shard {text!r}: expected I/N, e.g. 0/4")
    index, count = int(match[1]), int(match[2])
    if count < 1 or index >= count:
        raise FleetError(f"bad shard {text!r}: need 0 <= I < N")
    return index, count


def shard(targets: Iterable[Target], index: int, count: int) -> list[Target]:
    """The targets of slice `index` of `count`.

    A database's slice depends on its name alone (CRC-32 mod `count`), not on
    its position in the list: pods of an Indexed Job list tenants at slightly
    different times, and a tenant created in between must not shift every
    other tenant into a neighbour's slice (visited twice, or never).
    """
    return [t for t in targets if zlib.crc32(t.name.encode()) % count == index]


# -- visiting databases ------------------------------------------------------------


def _session_conninfo(conninfo: str, connect_timeout: float, lock_timeout: float | None) -> str:
    params = conninfo_to_dict(conninfo)
    params.setdefault("connect_timeout", str(max(1, round(connect_timeout))))
    params.setdefault("application_name", "selfheal")
    if lock_timeout is not None:
        # Set at connection time: bounds check's waits without a round trip.
        setting = f"-c lock_timeout={int(lock_timeout * 1000)}ms"
        params["options"] = f"{params.get('options', '')} {setting}".strip()
    return make_conninfo("", **params)


def _connect(target: Target, connect_timeout: float, lock_timeout: float
             ) -> psycopg.Connection[Any]:
    # Autocommit: check and each resync open and close their own scope, so
    # no transaction stays open between them.
    return psycopg.connect(_session_conninfo(target.conninfo, connect_timeout, lock_timeout),
                           autocommit=True)


def _check_one(
    target: Target,
    schema: str | None,
    tables: list[TableName] | None,
    exclude_schemas: list[str] | None,
    connect_timeout: float,
    lock_timeout: float,
) -> DatabaseReport:
    relnames = sorted({n for t in tables for n in t.names}) if tables else None
    try:
        with _connect(target, connect_timeout, lock_timeout) as conn:
            found, unreadable = check_readable(conn, schema, tables=relnames,
                                               exclude_schemas=exclude_schemas)
    except (psycopg.Error, SelfhealError) as ex:
        return DatabaseReport(target, error=scrub(first_line(ex)))
    if tables:
        found = [s for s in found if any(t.matches(s.schema, s.table) for t in tables)]
        unreadable = [u for u in unreadable
                      if any(t.matches(u.info.schema, u.info.table) for t in tables)]
    return DatabaseReport(target, [SequenceReport(target.name, s) for s in found],
                          unreadable=[(u.info.schema, u.info.table, f"permission denied:"
                                       f" selfheal needs {u.needs}") for u in unreadable])


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
        _validate_like(schema, "schema")
    for pattern in exclude_schemas or []:
        _validate_like(pattern, "schema")
    names = _table_names(tables)
    started = time.monotonic()
    reports = _map(
        lambda t: _check_one(t, schema, names, exclude_schemas, connect_timeout, lock_timeout),
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
