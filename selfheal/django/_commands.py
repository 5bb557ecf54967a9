"""
What ``manage.py selfheal_check`` and ``selfheal_fix`` share.

They mirror ``selfheal check`` / ``selfheal fix`` (same flags, output shape
and exit codes: 0 all in sync, 1 drift left, 2 an error) on one of Django's
configured databases, through Django's own connection, with
`selfheal.check` and `selfheal.resync`.
"""

from __future__ import annotations

import json
import sys
from argparse import ArgumentParser, ArgumentTypeError
from dataclasses import dataclass, replace
from typing import Any

import psycopg
from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections

from ..errors import SelfhealError
from ..resync import LOCK_TIMEOUT, ResyncResult, SequenceStatus, check, resync, target_value


@dataclass(frozen=True)
class Outcome:
    """One sequence: as found, and what a fix did to it."""

    found: SequenceStatus
    result: ResyncResult | None = None
    error: str | None = None

    @property
    def now(self) -> SequenceStatus:
        """The sequence after the run."""
        if self.result is None:
            return self.found
        key = self.result.key_value
        if self.found.increment > 0:
            return replace(self.found, next_value=self.result.after, max_value=key)
        return replace(self.found, next_value=self.result.after, min_value=key)

    @property
    def in_sync(self) -> bool:
        return self.error is None and self.now.in_sync

    @property
    def changed(self) -> bool:
        return self.result is not None and self.result.changed


def gap(status: SequenceStatus) -> int:
    """How many nextval() calls stand between the sequence and its first free value."""
    key = status.max_value if status.increment > 0 else status.min_value
    target = target_value(status.next_value, status.increment, key)
    return 0 if target is None else (target - status.next_value) // status.increment


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if value <= 0:
        raise ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _first_line(ex: BaseException) -> str:
    text = str(ex).strip()
    return text.splitlines()[0] if text else type(ex).__name__


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
                            help="only schemas matching this SQL LIKE pattern, e.g. 'tenant_%%'")
        parser.add_argument("--json", action="store_true",
                            help="a JSON array, one object per sequence")
        parser.add_argument("--lock-timeout", type=_seconds, default=LOCK_TIMEOUT,
                            metavar="SECONDS",
                            help="give up on a table whose lock is not granted in time")
        if self.fix:
            parser.add_argument("--dry-run", action="store_true",
                                help="report what would move; move nothing")

    def handle(self, *args: Any, **options: Any) -> None:
        dry_run = bool(options.get("dry_run"))
        db = connections[options["database"]]
        try:
            db.ensure_connection()
            conn: psycopg.Connection[Any] = db.connection
            name = conn.info.dbname
            outcomes = [Outcome(s) for s in check(conn, options["schema"],
                                                  tables=options["table"])]
        except (SelfhealError, psycopg.Error, DatabaseError) as ex:
            raise CommandError(_first_line(ex), returncode=2) from ex
        problem = _missing(outcomes, name, options["schema"], options["table"])
        if problem:
            raise CommandError(problem, returncode=2)
        if self.fix and not dry_run:
            outcomes = [self._fix(conn, o, options["lock_timeout"]) for o in outcomes]
        if options["json"]:
            self.stdout.write(self._json(outcomes, name), ending="")
        else:
            self.stdout.write(self._table(outcomes, name, options["verbosity"] > 1, dry_run),
                              ending="")
        failed = [o for o in outcomes if o.error is not None]
        for o in failed:
            self.stderr.write(f"{name}: {o.found.schema}.{o.found.table}: {o.error}")
        self.exit_code = 2 if failed else 0 if all(o.in_sync for o in outcomes) else 1
        if failed:
            raise CommandError(f"{len(failed)} of {len(outcomes)} sequences could not be fixed",
                               returncode=2)
        # From the command line the exit code is the contract; from
        # call_command() drift is not an exception (errors are, above).
        if self.exit_code and getattr(self, "_called_from_command_line", False):
            sys.exit(self.exit_code)

    def _fix(self, conn: psycopg.Connection[Any], o: Outcome, lock_timeout: float) -> Outcome:
        if o.in_sync:
            return o
        try:
            return replace(o, result=resync(conn, o.found.table, o.found.schema,
                                            lock_timeout=lock_timeout))
        except (SelfhealError, psycopg.Error) as ex:
            return replace(o, error=_first_line(ex))

    def _json(self, outcomes: list[Outcome], name: str) -> str:
        items: list[dict[str, Any]] = []
        for o in outcomes:
            item: dict[str, Any] = {"database": name, **o.now.as_dict(), "in_sync": o.in_sync}
            if self.fix:
                item.update(before=o.found.next_value, after=o.now.next_value,
                            changed=o.changed)
            if o.error is not None:
                item["error"] = o.error
            items.append(item)
        return json.dumps(items, indent=2) + "\n"

    def _table(self, outcomes: list[Outcome], name: str, verbose: bool, dry_run: bool) -> str:
        header = ["DATABASE", "TABLE", "KEY MAX", "BEFORE" if self.fix else "NEXT"]
        header += ["AFTER", "STATUS"] if self.fix else ["STATUS"]
        rows: list[list[str]] = []
        for o in outcomes:
            if not (verbose or o.changed or not o.in_sync):
                continue
            found = o.found
            key = found.max_value if found.increment > 0 else found.min_value
            row = [name, f"{found.schema}.{found.table}", "" if key is None else str(key),
                   str(found.next_value)]
            if self.fix:
                row.append(str(o.now.next_value))
            row.append(_state(o, dry_run))
            rows.append(row)
        lines: list[str] = []
        if rows:
            widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
            for row in [header, *rows]:
                cells = [c.rjust(w) if 2 <= i < len(header) - 1 else c.ljust(w)
                         for i, (c, w) in enumerate(zip(row, widths, strict=False))]
                lines.append("  ".join([*cells, row[-1]]).rstrip())
        lines.append(self._summary(outcomes, dry_run))
        return "\n".join(lines) + "\n"

    def _summary(self, outcomes: list[Outcome], dry_run: bool) -> str:
        count = len(outcomes)
        head = f"{'fix' if self.fix else 'check'}: {count} sequence{'' if count == 1 else 's'}"
        parts: list[str] = []
        moved = sum(o.changed for o in outcomes)
        behind = sum(not o.in_sync and o.error is None for o in outcomes)
        failed = sum(o.error is not None for o in outcomes)
        if moved:
            parts.append(f"moved {moved}")
        if behind:
            parts.append(f"{behind} {'would move' if dry_run else 'behind'}")
        if failed:
            parts.append(f"{failed} failed")
        if not behind and not failed:
            parts.append("all in sync")
        if dry_run:
            parts.append("nothing changed (dry run)")
        return f"{head}: {', '.join(parts)}"


def _state(o: Outcome, dry_run: bool) -> str:
    if o.error is not None:
        return f"error: {o.error}"
    if o.changed:
        return "moved"
    if o.in_sync:
        return "in sync"
    behind = f"behind by {gap(o.found)}"
    return f"{behind}, would move" if dry_run else behind


def _missing(outcomes: list[Outcome], name: str, schema: str | None,
             tables: list[str] | None) -> str | None:
    """Why the filters look wrong: a table or schema that matched nothing."""
    found = {o.found.table for o in outcomes}
    in_schema = f" in schema {schema!r}" if schema else ""
    for table in tables or []:
        if table not in found:
            return (f"table {table!r} not found{in_schema} in database {name!r}"
                    " (or it has no sequence-backed primary key)")
    if schema and not found:
        return f"no table with a sequence-backed primary key in schema {schema!r} in {name!r}"
    return None
