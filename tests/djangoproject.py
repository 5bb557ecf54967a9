"""Helpers for Django tests: run examples/django_project in subprocesses.

Django settings are process-global, so every Django step (manage.py, a
script) runs in a subprocess against a database given by DATABASE_URL. A
migrated database is made once per test module and cloned per test with
``CREATE DATABASE ... TEMPLATE``, which takes milliseconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from .conftest import dsn_for

PROJECT = Path(__file__).resolve().parent.parent / "examples" / "django_project"
PLAIN = "shop.settings"
TENANTS = "shop.settings_tenants"

# Every script starts Django and can report structlog events and a result.
_PRELUDE = """\
import json
import django
django.setup()
from structlog.testing import capture_logs

def emit(result, logs=()):
    events = [{k: v for k, v in e.items() if k != "log_level"} for e in logs
              if e["event"].startswith(("sequence_", "explicit_"))]
    print("RESULT " + json.dumps({"result": result, "events": events}, default=str))
"""


def run(dsn: str, args: list[str], settings: str = PLAIN, extra_path: Path | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python <args>`` in the project directory with Django pointed at `dsn`."""
    path = [str(PROJECT)] + ([str(extra_path)] if extra_path else [])
    if os.environ.get("PYTHONPATH"):
        path.append(os.environ["PYTHONPATH"])
    return subprocess.run(
        [sys.executable, *args],
        cwd=PROJECT,
        env={**os.environ, "DATABASE_URL": dsn, "DJANGO_SETTINGS_MODULE": settings,
             "PYTHONPATH": os.pathsep.join(path), **(env or {})},
        capture_output=True, text=True, timeout=120, check=False,
    )


def manage(dsn: str, *args: str, settings: str = PLAIN,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python manage.py <args>``."""
    return run(dsn, ["manage.py", *args], settings=settings, env=env)


def script(dsn: str, code: str, settings: str = PLAIN, extra_path: Path | None = None,
           env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `code` with Django set up; return what it passed to ``emit()``.

    Fails the test, with the script's stderr, if it does not exit cleanly.
    """
    out = run(dsn, ["-c", _PRELUDE + textwrap.dedent(code)], settings, extra_path, env)
    assert out.returncode == 0, out.stderr
    [line] = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    result: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
    return result


def create_db(server_dsn: str, name: str, template: str | None = None) -> str:
    """Create database `name` (a copy of `template`); return its DSN."""
    query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template:
        query += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(query)
    return dsn_for(server_dsn, name)


def drop_db(server_dsn: str, name: str) -> None:
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


@contextmanager
def clone(server_dsn: str, template: str, name: str) -> Iterator[str]:
    """A copy of database `template` for one test, dropped afterwards."""
    dsn = create_db(server_dsn, name, template)
    try:
        yield dsn
    finally:
        drop_db(server_dsn, name)
