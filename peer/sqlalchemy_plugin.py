"""
pytest plugin for SQLAlchemy's own suite: record outcomes, optionally heal.

Loaded with ``-p peer.sqlalchemy_plugin``. It writes every test's outcome to
``$PEER_RESULTS``. With ``PEER_SELFHEAL=1`` it applies
`selfheal.sqlalchemy.install` to every engine the suite creates on the
psycopg dialect, sync or asyncio (and on ``$PEER_DRIVER``'s, psycopg2 or
asyncpg, when set), through the dialect's ``engine_created``
hook, which ``create_engine()`` calls on the dialect class just before
returning any engine (also those built by ``sqlalchemy.testing``, by
``create_async_engine()`` and by tests calling ``create_engine()`` directly).
Engines given a DBAPI module of their own (``module=``, the suite's mock
DBAPIs) never reach a server and are left alone.
"""

from __future__ import annotations

import inspect
import os
import weakref
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import event
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool

import selfheal.sqlalchemy

from .outcomes import class_name, merge, save

_outcomes: dict[str, str] = {}
_connections: Counter[str] = Counter()
_healed: weakref.WeakSet[Engine] = weakref.WeakSet()


def _drivers() -> dict[str, tuple[type[Any], Any]]:
    """Per driver, its dialect class and its DBAPI's module (the suite's mocks have others)."""
    found: dict[str, tuple[type[Any], Any]] = {"psycopg": (PGDialect_psycopg, psycopg)}
    driver = os.environ.get("PEER_DRIVER", "psycopg")
    if driver == "psycopg2":
        import psycopg2
        from sqlalchemy.dialects.postgresql.psycopg2 import PGDialect_psycopg2

        found[driver] = (PGDialect_psycopg2, psycopg2)
    elif driver == "asyncpg":
        import asyncpg
        from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg

        found[driver] = (PGDialect_asyncpg, asyncpg)
    return found


def _module_of(engine: Engine) -> Any:
    # An asyncio dialect's DBAPI is an adapter holding the driver's module.
    dbapi = engine.dialect.loaded_dbapi
    for name in ("psycopg", "asyncpg"):
        inner = getattr(dbapi, name, None)
        if inner is not None and not callable(inner):
            return inner
    return dbapi


def _heal_every_engine() -> None:
    for dialect, module in _drivers().values():
        _heal_engines_of(dialect, module)


def _heal_engines_of(dialect: type[Any], module: Any) -> None:
    # The classmethod's function, wherever in the MRO it is defined.
    original = inspect.getattr_static(dialect, "engine_created").__func__

    def engine_created(cls: type[Any], engine: Engine) -> None:
        original(cls, engine)
        # create_engine() calls the hook on two classes for
        # create_async_engine("postgresql+psycopg://"): install once.
        if _module_of(engine) is module and engine not in _healed:
            selfheal.sqlalchemy.install(engine)
            _healed.add(engine)

    dialect.engine_created = classmethod(engine_created)


def _note_connection(dbapi_connection: Any, record: Any) -> None:
    driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    if type(driver).__module__.split(".")[0] in ("psycopg", "psycopg2", "asyncpg", "selfheal"):
        _connections[class_name(driver)] += 1


def pytest_configure(config: pytest.Config) -> None:
    event.listen(Pool, "connect", _note_connection)
    if os.environ.get("PEER_SELFHEAL") == "1":
        _heal_every_engine()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if hasattr(report, "wasxfail") and report.skipped:
        outcome = "xfail"
    elif report.failed:
        outcome = "failed"
    elif report.skipped:
        outcome = "skipped"
    elif report.when == "call":
        outcome = "passed"
    else:
        return  # a setup or teardown that went well says nothing yet
    merge(_outcomes, report.nodeid, outcome)


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        # A pytest-xdist worker: its reports already went to the controller,
        # its connections go with its output.
        workeroutput["peer_connections"] = dict(_connections)
        return
    save(Path(os.environ["PEER_RESULTS"]), _outcomes, _connections)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    _connections.update(getattr(node, "workeroutput", {}).get("peer_connections", {}))
