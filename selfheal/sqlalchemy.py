"""
SQLAlchemy: make an engine's connections heal, in one line.

    engine = create_engine("postgresql+psycopg://app@db/shop")
    selfheal.sqlalchemy.install(engine)

`install` works for `Engine` and `AsyncEngine` (``create_async_engine``) on the
``psycopg`` driver, for `Engine` on ``psycopg2`` (``postgresql://`` and
``postgresql+psycopg2://``) and for `AsyncEngine` on ``asyncpg``
(``postgresql+asyncpg://``), Core and ORM alike. It replaces the ``connect`` method of
this engine's dialect (the call SQLAlchemy's pool makes after running the
``do_connect`` listeners) so that the pool opens `HealingConnection` (or
`AsyncHealingConnection`) instead of a plain psycopg connection; everything
else (URL, ``connect_args``, ``do_connect`` listeners that adjust the
arguments, pooling, pre-ping, invalidation, isolation levels) stays
SQLAlchemy's. The heal happens inside the driver's ``execute()``, below
SQLAlchemy, so a session transaction, ``begin_nested()`` savepoints and
``insertmanyvalues`` batches keep working unchanged, and a collision that
cannot be healed reaches the application as SQLAlchemy's usual
`sqlalchemy.exc.IntegrityError` wrapping the original ``UniqueViolation``.
"""

from __future__ import annotations

import dataclasses
import sys
import weakref
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import event, exc
from sqlalchemy.engine import Engine
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

from .wrap import AsyncHealingConnection, HealingConnection, HealOptions

if TYPE_CHECKING:
    # Not at run time: sqlalchemy.ext.asyncio needs greenlet, which sync-only
    # applications may not have installed.
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["install", "uninstall"]

E = TypeVar("E", "Engine", "AsyncEngine")

_HEALING: tuple[type[Any], ...] = (HealingConnection, AsyncHealingConnection)
_DRIVERS = ("psycopg", "psycopg2", "asyncpg")


def _healing() -> tuple[type[Any], ...]:
    # The psycopg2 and asyncpg shells count once an engine of theirs was
    # installed (they are optional).
    shells = [sys.modules.get(f"selfheal.{name}") for name in ("psycopg2", "asyncpg")]
    return (*_HEALING, *(m.HealingConnection for m in shells if m is not None))

# What install() put on each engine (its dialect's connect, its listeners), so
# that a second install() replaces it instead of stacking up, and uninstall()
# can take it off.
_installed: weakref.WeakKeyDictionary[Engine, tuple[Any, tuple[Any, ...]]] = (
    weakref.WeakKeyDictionary())


def install(engine: E, options: HealOptions | None = None) -> E:
    """Make every connection `engine` opens from now on a healing one; return `engine`.

    Call it right after ``create_engine()`` / ``create_async_engine()``.
    Connections the pool opened before are replaced when next checked out,
    so calling it later is safe too. `options` configures the healing
    connections (see `HealOptions`). Raises `ValueError` for an engine that
    is not ``postgresql+psycopg``, ``postgresql+psycopg2`` or ``postgresql+asyncpg``.

    ``do_connect`` listeners, added before or after, run as usual and may
    change the connection arguments. Engines built with ``creator=`` or
    ``async_creator=`` (or a ``do_connect`` listener returning a connection
    of its own) bypass the dialect's connect: have them return a
    `HealingConnection` / `AsyncHealingConnection` instead (their first
    connection otherwise fails with a `TypeError` saying so, rather than
    silently not healing).
    """
    sync_engine = _sync_engine(engine)
    dialect = sync_engine.dialect
    if dialect.name != "postgresql" or dialect.driver not in _DRIVERS:
        raise ValueError(
            f"selfheal needs the psycopg (3), psycopg2 or asyncpg driver, this engine uses"
            f" {dialect.name}+{dialect.driver}: use a postgresql+psycopg:// URL"
        )
    uninstall(engine)
    base: type[Any]
    if dialect.driver == "psycopg2":
        from .psycopg2 import HealingConnection as Psycopg2HealingConnection

        base = Psycopg2HealingConnection
    elif dialect.driver == "asyncpg":
        from .asyncpg import HealingConnection as AsyncpgHealingConnection

        base = AsyncpgHealingConnection
    else:
        base = AsyncHealingConnection if dialect.is_async else HealingConnection
    cls: Any = base.with_options(**dataclasses.asdict(options)) if options is not None else base
    chosen: dict[Any, Any] = {}

    def healing(given: Any) -> Any:
        # A subclass of the healing class given in connect_args stays (with
        # `options`, when given); anything else becomes the healing class.
        if not (isinstance(given, type) and issubclass(given, base)):
            return cls
        if options is None:
            return given
        found = chosen.get(given)
        if found is None:
            found = chosen[given] = given.with_options(**dataclasses.asdict(options))
        return found

    # Not a do_connect listener returning the connection: that would end
    # SQLAlchemy's do_connect chain, so a listener added after install() (the
    # documented recipe for per-connection tokens: set cparams["password"])
    # would never run. The pool's creator looks up dialect.connect at call
    # time, after every listener; an instance attribute changes this engine's
    # dialect only (each create_engine() makes its own).
    if dialect.driver == "asyncpg":
        dbapi = dialect.loaded_dbapi

        def connect(*cargs: Any, **cparams: Any) -> Any:
            # asyncpg.connect(), as the adapter calls it, on the healing class.
            return dbapi.connect(*cargs, **{
                **cparams, "connection_class": healing(cparams.get("connection_class"))})
    elif dialect.is_async:
        dbapi = dialect.loaded_dbapi

        def connect(*cargs: Any, **cparams: Any) -> Any:
            # The asyncio adapter calls `async_creator_fn(*cargs, **cparams)`
            # and wraps the awaited connection.
            return dbapi.connect(*cargs, **{**cparams, "async_creator_fn": cls.connect})
    elif dialect.driver == "psycopg2":
        dbapi = dialect.loaded_dbapi

        def connect(*cargs: Any, **cparams: Any) -> Any:
            # psycopg2.connect(), as the dialect calls it, building the
            # healing class.
            return dbapi.connect(*cargs, **{
                **cparams, "connection_factory": healing(cparams.get("connection_factory"))})
    else:
        def connect(*cargs: Any, **cparams: Any) -> Any:
            # Exactly what the dialect would call, psycopg.connect(), but on
            # the healing class.
            return cls.connect(*cargs, **cparams)

    dialect.connect = connect  # type: ignore[method-assign]
    listeners = (("connect", _on_connect), ("checkout", _on_checkout))
    for name, fn in listeners:
        event.listen(sync_engine, name, fn)
    _installed[sync_engine] = (connect, listeners)
    return engine


def uninstall(engine: Engine | AsyncEngine) -> None:
    """Undo `install`: connections opened from now on are plain psycopg ones."""
    sync_engine = _sync_engine(engine)
    installed = _installed.pop(sync_engine, None)
    if installed is None:
        return
    connect, listeners = installed
    if vars(sync_engine.dialect).get("connect") is connect:
        del sync_engine.dialect.connect
    for name, fn in listeners:
        event.remove(sync_engine, name, fn)


def _sync_engine(engine: Engine | AsyncEngine) -> Engine:
    # An AsyncEngine proxies a sync Engine, which owns the dialect and pool.
    return engine if isinstance(engine, Engine) else engine.sync_engine


def _driver_connection(dbapi_connection: Any) -> Any:
    # The asyncio adapter wraps the psycopg connection; the sync dialect
    # hands it out as it is.
    return getattr(dbapi_connection, "driver_connection", dbapi_connection)


def _on_connect(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    if not isinstance(_driver_connection(dbapi_connection), _healing()):
        # A creator= / async_creator= engine skips dialect.connect (as does a
        # do_connect listener returning its own connection). Refuse
        # rather than let the application believe it heals.
        raise TypeError(
            "selfheal.sqlalchemy.install(): this engine's connections bypass install()"
            " (creator=, async_creator= or another do_connect listener); make them"
            " selfheal HealingConnection / AsyncHealingConnection instead"
        )


def _on_checkout(dbapi_connection: Any, record: ConnectionPoolEntry,
                 proxy: PoolProxiedConnection) -> None:
    if not isinstance(_driver_connection(dbapi_connection), _healing()):
        # Opened before install(): SQLAlchemy's own recipe for replacing a
        # pooled connection on checkout. Costs an isinstance() per checkout.
        raise exc.DisconnectionError("replaced by a selfheal connection")
