"""
Targets: which databases a fleet run visits, decided before any is touched.

`plan` turns DSNs and tenant options (a LIKE pattern over the server's
databases, every database, or a query returning tenants) into a sorted list
of `Target` databases, every DSN validated first (`selfheal.conninfo`);
`shard` keeps one stable slice of it. Input that cannot be right raises
`FleetError` before anything is changed.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .conninfo import InvalidDSN, redact, validate
from .errors import SelfhealError, first_line

__all__ = [
    "CONNECT_TIMEOUT",
    "FleetError",
    "Plan",
    "Skipped",
    "Target",
    "like_regex",
    "parse_shard",
    "plan",
    "session_conninfo",
    "shard",
    "validate_like",
]

#: Seconds to wait for a connection before recording the database as failed.
CONNECT_TIMEOUT = 10.0


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
        shown = redact(dsn)
        where = "" if shown in str(ex) else f" ({shown})"
        raise FleetError(f"invalid DSN{which}{where}: {ex}") from None


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


def validate_like(pattern: str, what: str) -> None:
    # An odd run of trailing backslashes escapes nothing; PostgreSQL rejects it.
    trailing = len(pattern) - len(pattern.rstrip("\\"))
    if trailing % 2:
        raise FleetError(f"bad {what} pattern {pattern!r}: it ends with the escape character \\")


def _admin(dsn: str, connect_timeout: float) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(session_conninfo(dsn, connect_timeout, None), autocommit=True)
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
        validate_like(databases, "database")
    for pattern in exclude_databases:
        validate_like(pattern, "database")
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


def session_conninfo(conninfo: str, connect_timeout: float, lock_timeout: float | None) -> str:
    params = conninfo_to_dict(conninfo)
    params.setdefault("connect_timeout", str(max(1, round(connect_timeout))))
    params.setdefault("application_name", "selfheal")
    if lock_timeout is not None:
        # Set at connection time: bounds check's waits without a round trip.
        setting = f"-c lock_timeout={int(lock_timeout * 1000)}ms"
        params["options"] = f"{params.get('options', '')} {setting}".strip()
    return make_conninfo("", **params)
