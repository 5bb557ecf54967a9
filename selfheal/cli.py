"""
The ``selfheal`` command: ``selfheal check``, ``fix`` and ``guard``.

A thin layer over `selfheal.fleet` and `selfheal.guardfleet`: parse arguments,
call one fleet function,
render its report as a table, JSON or OpenMetrics. Exit codes are the
contract scripts rely on: 0 all in sync, 1 drift (found by check, or left by
``fix --dry-run``), 2 an error. Errors print one line, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, NoReturn, TextIO

import psycopg
import structlog
from psycopg.conninfo import make_conninfo

from . import __version__, fleet
from .conninfo import scrub
from .errors import SelfhealError, first_line
from .guardfleet import (
    guard_fleet,
    render_guard_json,
    render_guard_openmetrics,
    render_guard_table,
)
from .render import render_json, render_openmetrics, render_table
from .resync import LOCK_TIMEOUT

__all__ = ["audit_to_stderr", "main", "render_json", "render_openmetrics", "render_table"]

_EXAMPLES = """\
examples:
  selfheal check                                   # $DATABASE_URL
  selfheal check postgresql://app@db/shop --json
  selfheal fix --dry-run --table orders --table payments
  selfheal check --databases 'tenant%' --jobs 8 --format openmetrics --output drift.prom
  selfheal fix --databases 'tenant%' --shard "$JOB_COMPLETION_INDEX/8"
  selfheal check --schema 'tenant\\_%'              # schema per tenant
  selfheal check --databases 'tenant%' --exclude-database 'tenant\\_archive%'

exit codes: 0 all in sync, 1 drift found (or left by --dry-run), 2 error
"""


_GUARD_EXAMPLES = """\
examples:
  selfheal guard install postgresql://owner@db/shop --dry-run
  selfheal guard install --databases 'tenant%' --jobs 8
  selfheal guard status --databases 'tenant%' --json
  selfheal guard remove --table orders

exit codes: 0 done (status: every table guarded and in sync), 1 status found a table
unguarded or behind (or --dry-run would change something), 2 error
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line instead of usage + error: scripts log it, people read it.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _shard(text: str) -> tuple[int, int]:
    try:
        return fleet.parse_shard(text)
    except fleet.FleetError as ex:
        raise argparse.ArgumentTypeError(str(ex)) from None


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("dsn", nargs="*",
                        help="databases to visit: connection strings or URLs, or database"
                             " names on $DATABASE_URL's server (default: $DATABASE_URL)")
    where = common.add_argument_group("what to look at")
    where.add_argument("--table", action="append", metavar="NAME",
                       help="only this table (repeatable)")
    where.add_argument("--schema", metavar="NAME_OR_PATTERN",
                       help="only schemas matching this SQL LIKE pattern, e.g. 'tenant\\_%%'"
                            " (_ alone matches any one character)")
    where.add_argument("--exclude-schema", action="append", metavar="PATTERN",
                       help="leave out schemas matching this LIKE pattern (repeatable)")
    where.add_argument("--exclude-database", action="append", metavar="PATTERN",
                       help="leave out databases matching this LIKE pattern (repeatable)")
    tenants = where.add_mutually_exclusive_group()
    tenants.add_argument("--databases", metavar="PATTERN",
                         help="every database on the DSN's server matching this LIKE pattern")
    tenants.add_argument("--all-databases", action="store_true",
                         help="every database on the DSN's server")
    tenants.add_argument("--tenants-query", metavar="SQL",
                         help="a query run on the DSN returning database names or DSNs")
    where.add_argument("--shard", type=_shard, metavar="I/N",
                       help="only slice I (0-based) of N stable slices of the databases")
    how = common.add_argument_group("how")
    how.add_argument("--jobs", type=_positive, default=fleet.DEFAULT_JOBS, metavar="N",
                     help=f"databases visited at once (default {fleet.DEFAULT_JOBS})")
    how.add_argument("--lock-timeout", type=_seconds, default=LOCK_TIMEOUT, metavar="SECONDS",
                     help="give up on a table whose lock is not granted in time (default 2)")
    how.add_argument("--connect-timeout", type=_seconds, default=fleet.CONNECT_TIMEOUT,
                     metavar="SECONDS", help="give up on an unreachable database (default 10)")
    out = common.add_argument_group("output")
    fmt = out.add_mutually_exclusive_group()
    fmt.add_argument("--json", dest="format", action="store_const", const="json",
                     default="table",
                     help="a JSON array, one object per sequence (same as --format json)")
    fmt.add_argument("--format", choices=("table", "json", "openmetrics"), default="table",
                     help="table (default), json, or openmetrics for a Prometheus"
                          " textfile collector")
    out.add_argument("--output", metavar="FILE",
                     help="write the report to FILE, atomically, instead of stdout")
    out.add_argument("-v", "--verbose", action="store_true",
                     help="list every sequence in the table, not only those out of sync")
    out.add_argument("--log-format", choices=("text", "json"), default="text",
                     help="the audit events fix writes on stderr (sequence_resynced, as a"
                          " healing connection's): text (default) or JSON lines")

    parser = _Parser(
        prog="selfheal",
        description="Find and repair PostgreSQL id sequences that fell behind their tables.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"selfheal {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{check,fix,guard,demo}",
                                     parser_class=_Parser)
    commands.required = True
    commands.add_parser("check", parents=[common], help="report sequences behind their keys",
                        description="Report sequences behind their table's keys. Moves nothing.",
                        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    fix = commands.add_parser(
        "fix", parents=[common], help="move sequences past their keys",
        description="Move every sequence behind its table's keys past them; never backwards.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fix.add_argument("--dry-run", action="store_true", help="report what would move; move nothing")
    guard = commands.add_parser(
        "guard", help="keep sequences past explicitly written keys, in the database",
        description="Install, list or remove the database-side guard: triggers that move a"
                    " table's sequence past keys written explicitly, by any client.",
        epilog=_GUARD_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = guard.add_subparsers(dest="action", metavar="{install,status,remove}",
                                   parser_class=_Parser)
    actions.required = True
    for action, help_ in (("install", "guard every selected table (idempotent)"),
                          ("status", "list guarded and unguarded tables; changes nothing"),
                          ("remove", "remove every object the guard installed")):
        sub = actions.add_parser(action, parents=[common], help=help_, description=help_,
                                 epilog=_GUARD_EXAMPLES,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        if action != "status":
            sub.add_argument("--dry-run", action="store_true",
                             help="report what would change; change nothing")
    # Listed for --help only: main() hands `demo` to selfheal.demo before parsing.
    commands.add_parser("demo", add_help=False,
                        help="the selfheal story on a throw-away PostgreSQL")
    return parser


# -- running -------------------------------------------------------------------------


class _ProgressBar:
    """A one-line bar on a terminal's stderr, redrawn at most ten times a second."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.drawn_at = 0.0
        self.width = 0

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        if 0 < done < total and now - self.drawn_at < 0.1:
            return
        self.drawn_at = now
        filled = 30 * done // total if total else 30
        line = f"{phase} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} databases"
        self.width = max(self.width, len(line))
        self.stream.write("\r" + line.ljust(self.width))
        self.stream.flush()

    def close(self) -> None:
        if self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()


def _write(text: str, path: str | None) -> None:
    if path is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    # tmp + rename: a textfile collector never reads a half-written file.
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as ex:
        raise OSError(f"cannot write {path}: {ex.strerror}") from ex
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the collector runs as another user
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _note(message: str) -> None:
    print(f"selfheal: note: {message}", file=sys.stderr)


def _dsn(arg: str) -> str:
    """A DSN argument; a bare database name means that database on $DATABASE_URL's server
    (or libpq's defaults: PGHOST, PGUSER, a service file...)."""
    if not arg or any(c.isspace() or c in "=:/@'\\" for c in arg):
        return arg  # a DSN, or something fleet.plan will report as malformed
    return make_conninfo(os.environ.get("DATABASE_URL", ""), dbname=arg)


def _writable(path: str) -> None:
    """Refuse an --output that cannot be written, before anything is changed."""
    target = Path(path)
    if target.is_dir():
        raise OSError(f"cannot write {path}: it is a directory")
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as ex:
        raise OSError(f"cannot write {path}: {ex.strerror}") from None
    os.close(fd)
    os.unlink(tmp)


def _run(args: argparse.Namespace) -> int:
    url = os.environ.get("DATABASE_URL")
    # Neither: libpq's own defaults, as psql uses them.
    dsns = [_dsn(d) for d in args.dsn] if args.dsn else [url or ""]
    if args.output is not None:
        _writable(args.output)
    planned = fleet.plan(
        dsns,
        databases=args.databases,
        all_databases=args.all_databases,
        tenants_query=args.tenants_query,
        exclude_databases=args.exclude_database or (),
        connect_timeout=args.connect_timeout,
    )
    for skipped in planned.skipped:
        _note(f"skipped database {skipped.name!r}: {skipped.reason}")
    targets = planned.targets
    if args.shard is not None:
        index, count = args.shard
        targets = fleet.shard(targets, index, count)
        if not targets:
            _note(f"shard {index}/{count} holds none of the {len(planned.targets)} databases")
    bar = (_ProgressBar(sys.stderr)
           if args.format == "table" and len(targets) > 1 and sys.stderr.isatty() else None)
    options: dict[str, Any] = {
        "schema": args.schema,
        "tables": args.table,
        "exclude_schemas": args.exclude_schema,
        "jobs": args.jobs,
        "connect_timeout": args.connect_timeout,
        "lock_timeout": args.lock_timeout,
        "progress": bar,
    }
    try:
        if args.command == "guard":
            return _guard(args, targets, options)
        if args.command == "fix":
            report = fleet.fix_fleet(targets, dry_run=args.dry_run, **options)
        else:
            report = fleet.check_fleet(targets, **options)
    finally:
        if bar is not None:
            bar.close()
    if args.format == "json":
        text = render_json(report)
    elif args.format == "openmetrics":
        text = render_openmetrics(report)
    else:
        text = render_table(report, verbose=args.verbose)
    # Where a script looks for failures, whatever the report's format and place.
    for db in report.failed:
        _failure(db.target.name, db.error)
        for schema, table, why in db.unreadable:
            _failure(db.target.name, why, f"{schema}.{table}")
        for s in db.sequences:
            _failure(db.target.name, s.error, f"{s.found.schema}.{s.found.table}")
    return _emit(text, args.output, report.exit_code)


def _failure(database: str, error: str | None, where: str | None = None) -> None:
    """One line on stderr for a failed database or table (nothing when `error` is None)."""
    if error is not None:
        print(f"selfheal: {database}: {where + ': ' if where else ''}{error}", file=sys.stderr)


def _guard(args: argparse.Namespace, targets: list[fleet.Target], options: dict[str, Any]
           ) -> int:
    report = guard_fleet(targets, args.action, dry_run=getattr(args, "dry_run", False),
                         **options)
    if args.format == "json":
        text = render_guard_json(report)
    elif args.format == "openmetrics":
        text = render_guard_openmetrics(report)
    else:
        text = render_guard_table(report)
    for db in report.databases:
        _failure(db.target.name, db.error)
        for t in db.tables:
            _failure(db.target.name, t.error, t.found.info.qualified_table)
    return _emit(text, args.output, report.exit_code)


def _emit(text: str, output: str | None, exit_code: int) -> int:
    try:
        _write(text, output)
    except OSError as ex:
        # What was done must not be lost: the report goes to stdout instead.
        _write(text, None)
        print(f"selfheal: error: {ex}; the report went to stdout", file=sys.stderr)
        return 2
    return exit_code


def audit_to_stderr(log_format: str = "text", stream: TextIO | None = None) -> None:
    """Send selfheal's audit events to `stream` (stderr), as text or JSON lines, never
    to stdout where the report goes. For commands, which are applications: the
    library itself never configures structlog."""
    renderer: Any = (structlog.processors.JSONRenderer() if log_format == "json"
                     else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True), renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def _audit(log_format: str) -> None:
    """Where the command's audit events go: stderr, as text or JSON lines; and Sentry
    when sentry-sdk is installed and ``SENTRY_DSN`` is set."""
    audit_to_stderr(log_format)
    if os.environ.get("SENTRY_DSN"):
        try:
            import sentry_sdk
        except ImportError:
            return
        if not sentry_sdk.get_client().is_active():
            sentry_sdk.init()


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``selfheal`` with `argv` (default: the command line); return the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["demo"]:
        from . import demo  # imports the optional demo dependencies only when asked

        try:
            return demo.main(args_list[1:])
        except SystemExit as ex:
            return ex.code if isinstance(ex.code, int) else 2
        except KeyboardInterrupt:
            return 130
        except (SelfhealError, psycopg.Error) as ex:
            print(f"selfheal demo: error: {scrub(first_line(ex))}", file=sys.stderr)
            return 2
    parser = _parser()
    if not args_list:
        parser.print_help()
        return 0
    try:
        args = parser.parse_args(args_list)
    except SystemExit as ex:  # --help, --version and usage errors
        return ex.code if isinstance(ex.code, int) else 2
    configured = structlog.get_config()
    _audit(args.log_format)
    try:
        return _run(args)
    except (SelfhealError, psycopg.Error, OSError) as ex:
        message = first_line(ex)
    except KeyboardInterrupt:
        print("selfheal: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as shells report it
    except Exception as ex:
        if os.environ.get("SELFHEAL_TRACEBACK"):
            raise
        message = f"unexpected {type(ex).__name__}: {ex} (SELFHEAL_TRACEBACK=1 shows where)"
    finally:
        # Called in-process (tests, scripts), the caller's configuration comes back.
        structlog.configure(**configured)
    print(f"selfheal: error: {scrub(message)}", file=sys.stderr)
    return 2
