"""
Guard fleet: ``selfheal guard install|status|remove`` over many databases.

Targets, tenant and schema selection and ``--table`` work as for `check` and
`fix` (see `selfheal.fleet`). Every database is looked at first; nothing is
installed or removed until every target was planned and every ``--table``
found. One failing database or table is recorded and never stops the others.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg

from . import fleet, guard, report
from .api import check_readable
from .conninfo import scrub
from .errors import SelfhealError, first_line
from .fleet import _connect, _map, _table_names
from .guard import GuardState
from .names import TableName, suggest
from .render import _labels
from .resync import LOCK_TIMEOUT
from .targets import CONNECT_TIMEOUT, FleetError, Target, validate_like

__all__ = ["GuardDatabase", "GuardFleetReport", "GuardTable", "guard_fleet",
           "render_guard_json", "render_guard_openmetrics", "render_guard_table"]

ACTIONS = ("install", "status", "remove")


@dataclass(frozen=True)
class GuardTable:
    """One table in a guard run: its guard as found, and what the run did."""

    database: str
    found: GuardState
    oid: int
    #: The sequence is past the table's keys (None: the role cannot read them).
    in_sync: bool | None
    #: "installed", "removed", "would install", "would remove", or None.
    action: str | None = None
    error: str | None = None

    @property
    def state(self) -> str:
        """The guard's state after the run."""
        if self.error is None and self.action == "installed":
            return "guarded"
        if self.error is None and self.action == "removed":
            return "unguarded"
        return self.found.state

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        info = self.found.info
        data: dict[str, Any] = {
            "database": self.database, "schema": info.schema, "table": info.table,
            "column": info.column, "sequence": info.sequence, "guard": self.state,
            "in_sync": self.in_sync,
        }
        if self.found.missing and self.state != "guarded":
            data["missing_on"] = list(self.found.missing)
        if self.action is not None:
            data["action"] = self.action
        if self.error is not None:
            data["error"] = self.error
        return data


@dataclass(frozen=True)
class GuardDatabase:
    """One database in a guard run, or why it could not be looked at."""

    target: Target
    tables: list[GuardTable] = field(default_factory=list)
    error: str | None = None

    @property
    def failed(self) -> bool:
        """True when the database or any of its tables failed."""
        return self.error is not None or any(t.error is not None for t in self.tables)


@dataclass(frozen=True)
class GuardFleetReport:
    """The outcome of `guard_fleet` over every target."""

    action: str
    databases: list[GuardDatabase]
    dry_run: bool = False
    elapsed: float = 0.0

    @property
    def tables(self) -> list[GuardTable]:
        """Every table of every database, in target order."""
        return [t for db in self.databases for t in db.tables]

    @property
    def exit_code(self) -> int:
        """0 done (status: every table guarded and in sync), 1 status found a table
        unguarded or behind (or a dry run would change something), 2 an error."""
        if any(db.failed for db in self.databases):
            return 2
        if self.action == "status":
            bad = any(t.state != "guarded" or t.in_sync is False for t in self.tables)
            return 1 if bad else 0
        return 1 if self.dry_run and any(t.action for t in self.tables) else 0


def _look(target: Target, schema: str | None, tables: list[TableName] | None,
          exclude_schemas: list[str] | None, connect_timeout: float, lock_timeout: float
          ) -> GuardDatabase:
    relnames = sorted({n for t in tables for n in t.names}) if tables else None
    try:
        with _connect(target, connect_timeout, lock_timeout) as conn:
            infos: list[Any] = []
            found, unreadable = check_readable(conn, schema, tables=relnames,
                                               exclude_schemas=exclude_schemas, guess=infos)
            infos = sorted([*infos, *(u.info for u in unreadable)],
                           key=lambda i: (i.schema, i.table))
            if tables:
                infos = [i for i in infos if any(t.matches(i.schema, i.table) for t in tables)]
            synced = {(s.schema, s.table): s.in_sync for s in found}
            states = guard.states(conn, infos)
    except (psycopg.Error, SelfhealError) as ex:
        return GuardDatabase(target, error=scrub(first_line(ex)))
    return GuardDatabase(target, [
        GuardTable(target.name, state, oid, synced.get((state.info.schema, state.info.table)))
        for state, oid in states])


def _apply(db: GuardDatabase, action: str, connect_timeout: float, lock_timeout: float
           ) -> GuardDatabase:
    done: list[GuardTable] = []
    try:
        with _connect(db.target, connect_timeout, lock_timeout) as conn:
            for table in db.tables:
                if table.action is None:
                    done.append(table)
                    continue
                try:
                    if action == "install":
                        guard.install(conn, table.found, table.oid)
                    else:
                        guard.remove(conn, table.found, table.oid)
                except psycopg.Error as ex:
                    done.append(replace(table, error=scrub(first_line(ex))))
                    continue
                verb = "installed" if action == "install" else "removed"
                done.append(replace(table, action=verb))
                info = table.found.info
                report.logger.info(f"guard_{verb}", database=db.target.name,
                                   schema=info.schema, table=info.table,
                                   sequence=info.sequence)
    except psycopg.Error as ex:
        return replace(db, error=scrub(first_line(ex)))
    return replace(db, tables=done)


def _unmatched(databases: list[GuardDatabase], schema: str | None,
               tables: list[TableName] | None) -> str | None:
    looked = [db for db in databases if db.error is None]
    if not looked or (not tables and not schema):
        return None
    found = [(t.found.info.schema, t.found.info.table) for db in looked for t in db.tables]
    where = looked[0].target.display if len(databases) == 1 else \
        f"any of {len(databases)} databases"
    for table in tables or []:
        if not any(table.matches(*f) for f in found):
            close = suggest(table, found)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            return (f"table {table.text!r} not found in {where} (or it has no"
                    f" sequence-backed primary key){hint}")
    if not found:
        return f"no table with a sequence-backed primary key in schema {schema!r} in {where}"
    return None


def guard_fleet(
    targets: Sequence[Target],
    action: str,
    *,
    schema: str | None = None,
    tables: list[str] | None = None,
    exclude_schemas: list[str] | None = None,
    dry_run: bool = False,
    jobs: int = fleet.DEFAULT_JOBS,
    connect_timeout: float = CONNECT_TIMEOUT,
    lock_timeout: float = LOCK_TIMEOUT,
    progress: fleet.Progress | None = None,
) -> GuardFleetReport:
    """Look at the guard of every table in `targets`; `install` or `remove` it
    where needed (not with `dry_run`). Install is idempotent: a guarded table
    is left as it is, a partial guard (a partition added since) is completed."""
    if action not in ACTIONS:
        raise FleetError(f"unknown guard action {action!r}: use one of {', '.join(ACTIONS)}")
    if jobs < 1:
        raise FleetError(f"bad --jobs {jobs}: need at least 1")
    for pattern in [schema, *(exclude_schemas or [])]:
        if pattern is not None:
            validate_like(pattern, "schema")
    names = _table_names(tables)
    started = time.monotonic()
    databases = _map(lambda t: _look(t, schema, names, exclude_schemas, connect_timeout,
                                     lock_timeout), list(targets), jobs, "look", progress)
    problem = _unmatched(databases, schema, names)
    if problem:
        raise FleetError(problem)
    if action != "status":
        wanted = "would " + action if dry_run else action
        databases = [replace(db, tables=[
            replace(t, action=wanted) if (t.found.state != "guarded" if action == "install"
                                          else not t.found.absent) else t
            for t in db.tables]) for db in databases]
        todo = [db for db in databases if db.error is None and any(t.action for t in db.tables)]
        if todo and not dry_run:
            applied = _map(lambda db: _apply(db, action, connect_timeout, lock_timeout),
                           todo, jobs, action, progress)
            redone = {id(old): new for old, new in zip(todo, applied, strict=True)}
            databases = [redone.get(id(db), db) for db in databases]
    return GuardFleetReport(action, databases, dry_run=dry_run,
                            elapsed=time.monotonic() - started)


# -- rendering ------------------------------------------------------------------


def _note(table: GuardTable) -> str:
    if table.error is not None:
        return f"error: {table.error}"
    notes = []
    if table.action is not None:
        notes.append(table.action)
    if table.state == "partial" and table.action is None:
        notes.append("missing on " + ", ".join(table.found.missing))
    if table.in_sync is False:
        notes.append("sequence behind its keys: run selfheal fix")
    return "; ".join(notes)


def render_guard_table(report: GuardFleetReport) -> str:
    """Every table with its guard, and a summary line."""
    rows = [("DATABASE", "TABLE", "GUARD", "NOTE")]
    for db in report.databases:
        if db.error is not None:
            rows.append((db.target.name, "-", "-", f"error: {db.error}"))
        rows += [(t.database, t.found.info.qualified_table, t.state, _note(t))
                 for t in db.tables]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3]
             for r in rows]
    tables = report.tables
    guarded = sum(t.state == "guarded" for t in tables)
    failed = sum(db.failed for db in report.databases)
    summary = (f"guard {report.action}: {guarded} of {len(tables)} tables guarded in"
               f" {len(report.databases)} database{'s' if len(report.databases) != 1 else ''}"
               f" ({report.elapsed:.2f} s)")
    if failed:
        summary += f", {failed} failed"
    if report.dry_run:
        summary += ", nothing changed (dry run)"
    return "\n".join([*(line.rstrip() for line in lines), "", summary]) + "\n"


def render_guard_json(report: GuardFleetReport) -> str:
    """A JSON array: one object per table, and one per database that failed."""
    items: list[dict[str, Any]] = []
    for db in report.databases:
        if db.error is not None:
            items.append({"database": db.target.name, "error": db.error})
        items += [t.as_dict() for t in db.tables]
    return json.dumps(items, indent=2) + "\n"


def render_guard_openmetrics(report: GuardFleetReport) -> str:
    """``selfheal_table_guarded`` gauges, for a Prometheus textfile collector."""
    out = ["# HELP selfheal_table_guarded 1 when every part of the table's guard is in place.",
           "# TYPE selfheal_table_guarded gauge"]
    for t in report.tables:
        info = t.found.info
        out.append("selfheal_table_guarded" + _labels(database=t.database, schema=info.schema,
                                                      table=info.table)
                   + f" {int(t.state == 'guarded')}")
    out.append("# EOF")
    return "\n".join(out) + "\n"
