"""
The peer suites: which tests of each framework run, and the command that runs them.

Each suite is run twice on the same server, ``plain`` and ``selfheal``,
each time on fresh databases; only the backend (Django) or the
``install()`` of every engine (SQLAlchemy) differs between the two.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import URL

from . import server

ROOT = Path(__file__).resolve().parent.parent
MODES = ("plain", "selfheal")

DJANGO = ("Django", "5.2.19")
DJANGO_MODULES = (
    "backends", "schema", "migrations", "transactions", "transaction_hooks",
    "get_or_create", "bulk_create", "force_insert_update", "fixtures",
)
DJANGO_ENGINES = {"plain": "django.db.backends.postgresql", "selfheal": "selfheal.django"}

SQLALCHEMY = ("SQLAlchemy", "2.1.9")
SQLALCHEMY_FILES = (
    "test/engine",
    "test/orm/test_transaction.py",
    "test/orm/test_session.py",
    "test/sql/test_insert.py",
    "test/sql/test_insert_exec.py",
    "test/sql/test_returning.py",
    "test/sql/test_defaults.py",
    "test/sql/test_sequences.py",
    "test/dialect/postgresql",
)
# Left out unless --full, for time; none of them is about inserts or keys.
SQLALCHEMY_SLOW = (
    # Pool internals on a mock DBAPI (nothing reaches PostgreSQL): 30 s of sleeps.
    "test/engine/test_pool.py",
)
# Five of the six range-type round trips (7,400 parametrized tests, a minute);
# Int4RangeRoundTripTest runs the same tests on int4range.
SQLALCHEMY_SLOW_CLASSES = (
    "DateRangeRoundTripTest", "DateTimeRangeRoundTripTest", "DateTimeTZRangeRoundTripTest",
    "Int8RangeRoundTripTest", "NumRangeRoundTripTest",
)
# Through the asyncio adapter (AsyncHealingConnection): the files about
# connections, transactions and inserts, and SQLAlchemy's asyncio extension.
# The sync run covers the rest (types, reflection, compilation).
SQLALCHEMY_ASYNC_FILES = (
    "test/engine/test_execute.py",
    "test/engine/test_transaction.py",
    "test/engine/test_reconnect.py",
    "test/orm/test_transaction.py",
    "test/orm/test_session.py",
    "test/sql/test_insert_exec.py",
    "test/sql/test_returning.py",
    "test/sql/test_defaults.py",
    "test/sql/test_sequences.py",
    "test/dialect/postgresql/test_dialect.py",
    "test/dialect/postgresql/test_on_conflict.py",
    "test/ext/asyncio",
)
SQLALCHEMY_ASYNC_SLOW = (
    # Cancellation at every await point: 100 s on two cores.
    "test/ext/asyncio/test_cancellation.py",
)
# SQLAlchemy's suite expects these (README.unittests.rst, "Database Configuration").
SQLALCHEMY_SCHEMAS = ("test_schema", "test_schema_2")


@dataclass
class Run:
    """One run of one suite: its command, and the databases to drop after it."""

    cmd: list[str]
    cwd: Path
    env: dict[str, str]
    databases: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Suite:
    name: str
    package: tuple[str, str]  # the sdist's (name, version)


# The psycopg2 and asyncpg dialects: the files about connections,
# transactions and inserts (the psycopg runs cover types and reflection).
SQLALCHEMY_DRIVER_FILES = tuple(f for f in SQLALCHEMY_ASYNC_FILES if f != "test/ext/asyncio")

SUITES = (
    Suite("django", DJANGO),
    Suite("sqlalchemy", SQLALCHEMY),
    Suite("sqlalchemy-asyncio", SQLALCHEMY),
    Suite("sqlalchemy-psycopg2", SQLALCHEMY),
    Suite("sqlalchemy-asyncpg", SQLALCHEMY),
)

#: The SQLAlchemy driver each SQLAlchemy suite runs on.
SQLALCHEMY_DRIVERS = {"sqlalchemy": "psycopg", "sqlalchemy-asyncio": "psycopg_async",
                      "sqlalchemy-psycopg2": "psycopg2", "sqlalchemy-asyncpg": "asyncpg"}


def _env(results: Path, **extra: str) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PEER_RESULTS": str(results), **extra}


def django(src: Path, dsn: str, mode: str, results: Path, jobs: int,
           only: list[str] | None = None) -> Run:
    """Django's runtests.py on the stock backend or selfheal's; it makes its own test databases.

    `only`: these test ids instead of the modules (a class-level error's id,
    "setUpClass (module.Class)", runs its class).
    """
    labels = [t.partition(" (")[2].rstrip(")") or t for t in only] if only else DJANGO_MODULES
    return Run(
        cmd=[sys.executable, "runtests.py", "--settings=peer.django_settings",
             f"--parallel={jobs}", "--noinput", *labels],
        cwd=src / "tests",
        env=_env(results, PEER_DSN=dsn, PEER_ENGINE=DJANGO_ENGINES[mode],
                 PEER_DB=f"{server.PREFIX}django_{mode}"),
    )


def sqlalchemy_url(dsn: str, driver: str) -> URL:
    """A URL for `dsn`, without its password (that goes in PGPASSWORD, off the command line)."""
    params = server.libpq_params(dsn)
    params.pop("password", None)
    host = params.pop("host", None)
    port = params.pop("port", None)
    if host and host.startswith("/"):  # a socket directory only fits in the query
        params["host"] = host
        if port:
            params["port"] = port
        host = port = None
    return URL.create(
        f"postgresql+{driver}", username=params.pop("user", None), host=host,
        port=int(port) if port else None, database=params.pop("dbname", None),
        query=params,
    )


def sqlalchemy(src: Path, dsn: str, mode: str, results: Path, jobs: int, *,
               driver: str = "psycopg", full: bool = False, only: list[str] | None = None
               ) -> Run:
    """SQLAlchemy's pytest suite with --dburi on a fresh database; `install()` on every engine.

    `driver`: SQLAlchemy's name of the driver ("psycopg", "psycopg_async",
    "psycopg2", "asyncpg"). `only`: these test ids (pytest node ids) instead
    of the files.
    """
    name = f"{server.PREFIX}sqlalchemy_{driver}_{mode}"
    db = server.create_database(dsn, name, schemas=SQLALCHEMY_SCHEMAS)
    url = sqlalchemy_url(db, driver)
    asyncio = driver in ("psycopg_async", "asyncpg")
    files: tuple[str, ...]
    skip: tuple[str, ...]
    if full:
        files, skip = (*SQLALCHEMY_FILES, *(["test/ext/asyncio"] if asyncio else [])), ()
    elif driver == "psycopg_async":
        files, skip = SQLALCHEMY_ASYNC_FILES, SQLALCHEMY_ASYNC_SLOW
    elif driver == "asyncpg":
        files, skip = (*SQLALCHEMY_DRIVER_FILES, "test/ext/asyncio"), SQLALCHEMY_ASYNC_SLOW
    elif driver == "psycopg2":
        files, skip = SQLALCHEMY_DRIVER_FILES, ()
    else:
        files, skip = SQLALCHEMY_FILES, SQLALCHEMY_SLOW
    cmd = [sys.executable, "-m", "pytest", "-p", "peer.sqlalchemy_plugin",
           "-p", "no:cacheprovider", "-q", "-rN", "--dburi", url.render_as_string()]
    if only:
        cmd += only
    else:
        cmd += [*files, *(f"--ignore={path}" for path in skip)]
    if not full and driver == "psycopg" and not only:
        cmd += ["-k", " and ".join(f"not {cls}" for cls in SQLALCHEMY_SLOW_CLASSES)]
    if jobs > 1:
        cmd += ["-n", str(jobs)]  # each worker gets a database cloned from `db`
    password = server.libpq_params(dsn).get("password")
    env = _env(
        results,
        # Else SQLAlchemy's conftest puts the sdist's lib/ first and the run
        # tests that copy, not the SQLAlchemy installed (a pure-Python build).
        PYTHONNOUSERSITE="1",
        PEER_SELFHEAL="1" if mode == "selfheal" else "0",
        PEER_DRIVER=driver.removesuffix("_async"),
        **({"PGPASSWORD": password} if password else {}),
    )
    return Run(cmd=cmd, cwd=src, env=env, databases=[name])
