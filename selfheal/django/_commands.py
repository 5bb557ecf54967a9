"""
What ``manage.py selfheal_check`` and ``selfheal_fix`` share.

They mirror ``selfheal check`` / ``selfheal fix`` (same flags, output shape
and exit codes: 0 all in sync, 1 drift left, 2 an error) on one of Django's
configured databases, through Django's own connection, with
`selfheal.check` and `selfheal.resync`.
"""

from __future__ import annotations

import sys
import time
from argparse import ArgumentParser
from dataclasses import replace
from typing import Any

import psycopg
import structlog
from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections

from .. import report
from ..api import check, resync
from ..cli import _seconds, audit_to_stderr
from ..errors import SelfhealError, first_line
from ..fleet import DatabaseReport, FleetReport, SequenceReport, Target
from ..names import TableName, parse_table_name
from ..render import render_json, render_table
from ..resync import LOCK_TIMEOUT


class SequenceCommand(BaseCommand):
    """Check (or, with ``fix = True``, fix) the sequences of one Django database."""

    fix = False
    #: The exit code of the last run: 0 all in sync, 1 drift left, 2 an error.
    exit_code = 0
    # Reading catalogs needs no model checks; a deploy step should not fail on them.
    requires_system_checks: list[str] = []  # noqa: RUF012 - Django's own attribute

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--database", default=DEFAULT_DB_ALIAS,
                            help="the database alias to look at (default: default)")
        parser.add_argument("--table", action="append", metavar="NAME",
                            help="only this table (repeatable)")
        parser.add_argument("--schema", metavar="NAME_OR_PATTERN",
                            help="only schemas matching this SQL LIKE pattern, e.g. 'tenant\\_%%'")
        parser.add_argument("--json", action="store_true",
                            help="a JSON array, one object per sequence")
        parser.add_argument("--lock-timeout", type=_seconds, default=LOCK_TIMEOUT,
                            metavar="SECONDS",
                            help="give up on a table whose lock is not granted in time")
        if self.fix:
            parser.add_argument("--dry-run", action="store_true",
                                help="report what would move; move nothing")

    def handle(self, *args: Any, **options: Any) -> None:
        if structlog.is_configured():
            return self._handle(**options)
        # The project left structlog as it comes, printing to stdout: the
        # audit events of a fix go to stderr instead, off the report.
        audit_to_stderr(stream=getattr(self.stderr, "_out", sys.stderr))
        try:
            return self._handle(**options)
        finally:
            structlog.reset_defaults()

    def _handle(self, **options: Any) -> None:
        dry_run = bool(options.get("dry_run"))
        alias = options["database"]
        if alias not in connections.settings:
            known = ", ".join(sorted(connections.settings)) or "none"
            raise CommandError(f"no database {alias!r} in settings.DATABASES (configured:"
                               f" {known})", returncode=2)
        db = connections[alias]
        started = time.monotonic()
        try:
            tables = [parse_table_name(t) for t in options["table"] or []]
        except ValueError as ex:
            raise CommandError(str(ex), returncode=2) from None
        relnames = sorted({n for t in tables for n in t.names}) or None
        try:
            db.ensure_connection()
            conn: psycopg.Connection[Any] = db.connection
            name = conn.info.dbname
            seqs = [SequenceReport(name, s) for s in check(conn, options["schema"],
                                                           tables=relnames)
                    if not tables or any(t.matches(s.schema, s.table) for t in tables)]
        except (SelfhealError, psycopg.Error, DatabaseError) as ex:
            raise CommandError(first_line(ex), returncode=2) from ex
        problem = _missing(seqs, name, options["schema"], tables)
        if problem:
            raise CommandError(problem, returncode=2)
        if self.fix and not dry_run:
            seqs = [self._fix(conn, s, options["lock_timeout"]) for s in seqs]
        # The same report, and so the same output, as the selfheal command's.
        report = FleetReport(
            command="fix" if self.fix else "check",
            databases=[DatabaseReport(Target(conninfo="", name=name), seqs)],
            dry_run=dry_run,
            elapsed=time.monotonic() - started,
        )
        if options["json"]:
            self.stdout.write(render_json(report), ending="")
        else:
            self.stdout.write(render_table(report, options["verbosity"] > 1), ending="")
        failed = [s for s in seqs if s.error is not None]
        for s in failed:
            self.stderr.write(f"{name}: {s.found.schema}.{s.found.table}: {s.error}")
        self.exit_code = report.exit_code
        if failed:
            raise CommandError(f"{len(failed)} of {len(seqs)} sequences could not be fixed",
                               returncode=2)
        # From the command line the exit code is the contract; from
        # call_command() drift is not an exception (errors are, above).
        if self.exit_code and getattr(self, "_called_from_command_line", False):
            sys.exit(self.exit_code)

    def _fix(self, conn: psycopg.Connection[Any], seq: SequenceReport,
             lock_timeout: float) -> SequenceReport:
        if seq.in_sync:
            return seq
        started = time.perf_counter()
        try:
            result = resync(conn, seq.found.table, seq.found.schema, lock_timeout=lock_timeout)
        except (SelfhealError, psycopg.Error) as ex:
            return replace(seq, error=first_line(ex))
        if result.changed:
            report.fixed(seq.database, seq.found, result,
                         round((time.perf_counter() - started) * 1000, 3))
        return replace(seq, resync=result)


def _missing(seqs: list[SequenceReport], name: str, schema: str | None,
             tables: list[TableName]) -> str | None:
    """Why the filters look wrong: a table or schema that matched nothing."""
    found = [(s.found.schema, s.found.table) for s in seqs]
    in_schema = f" in schema {schema!r}" if schema else ""
    for table in tables:
        if not any(table.matches(*f) for f in found):
            return (f"table {table.text!r} not found{in_schema} in database {name!r}"
                    " (or it has no sequence-backed primary key)")
    if schema and not found:
        return f"no table with a sequence-backed primary key in schema {schema!r} in {name!r}"
    return None
