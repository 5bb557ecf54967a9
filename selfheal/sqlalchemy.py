"""
SQLAlchemy: make an engine's connections heal, in one line.

    engine = create_engine("postgresql+psycopg://app@db/shop")
    selfheal.sqlalchemy.install(engine)

`install` works for `Engine` and `AsyncEngine` (``create_async_engine``) on the
``psycopg`` driver, Core and ORM alike. It hooks SQLAlchemy's documented
``do_connect`` event so that the pool opens `HealingConnection` (or
`AsyncHealingConnection`) instead of a plain psycopg connection; everything
else (URL, ``connect_args``, pooling, pre-ping, invalidation, isolation levels)
stays SQLAlchemy's. The heal happens inside the driver's ``execute()``, below
SQLAlchemy, so a session transaction, ``begin_nested()`` savepoints and
``insertmanyvalues`` batches keep working unchanged, and a collision that
cannot be healed reaches the application as SQLAlchemy's usual
`sqlalchemy.exc.IntegrityError` wrapping the original ``UniqueViolation``.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import event, exc
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

from .wrap import AsyncHealingConnection, HealingConnection, HealOptions

if TYPE_CHECKING:
    # Not at run time: sqlalchemy.ext.asyncio needs greenlet, which sync-only
    # applications may not have installed.
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["install", "uninstall"]

E = TypeVar("E", "Engine", "AsyncEngine")

_HEALING = (HealingConnection, AsyncHealingConnection)

# The listeners installed on each engine, so that a second install() replaces
# them instead of stacking up, and uninstall() can take them off.
_installed: weakref.WeakKeyDictionary[Engine, tuple[Any, ...]] = weakref.WeakKeyDictionary()


def install(engine: E, options: HealOptions | None = None) -> E:
    """Make every connection `engine` opens from now on a healing one; return `engine`.

    Call it right after ``create_engine()`` / ``create_async_engine()``.
    Connections the pool opened before are replaced when next checked out,
    so calling it later is safe too. `options` configures the healing
    connections (see `HealOptions`). Raises `ValueError` for an engine that
    is not ``postgresql+psycopg``.

    Engines built with ``creator=`` or ``async_creator=`` bypass SQLAlchemy's
    connect hook: have the creator return a `HealingConnection` /
    `AsyncHealingConnection` instead (their first connection otherwise
    fails with a `TypeError` saying so, rather than silently not healing).
    """
    sync_engine = _sync_engine(engine)
    dialect = sync_engine.dialect
    if dialect.name != "postgresql" or dialect.driver != "psycopg":
        raise ValueError(
            f"selfheal needs the psycopg (3) driver, this engine uses"
            f" {dialect.name}+{dialect.driver}: use a postgresql+psycopg:// URL"
        )
    uninstall(engine)
    base: type[Any] = AsyncHealingConnection if dialect.is_async else HealingConnection
    cls = base.with_options(**dataclasses.asdict(options)) if options is not None else base

    if dialect.is_async:
        def do_connect(dialect: Dialect, record: ConnectionPoolEntry, cargs: list[Any],
                       cparams: dict[str, Any]) -> Any:
            # The asyncio adapter calls `async_creator_fn(*cargs, **cparams)`
            # and wraps the awaited connection; returning None lets it.
            cparams["async_creator_fn"] = cls.connect
            return None
    else:
        def do_connect(dialect: Dialect, record: ConnectionPoolEntry, cargs: list[Any],
                       cparams: dict[str, Any]) -> Any:
            # Exactly what the dialect would call, psycopg.connect(), but on
            # the healing class.
            return cls.connect(*cargs, **cparams)

    listeners = (("do_connect", do_connect), ("connect", _on_connect),
                 ("checkout", _on_checkout))
    for name, fn in listeners:
        event.listen(sync_engine, name, fn)
    _installed[sync_engine] = listeners
    return engine


def uninstall(engine: Engine | AsyncEngine) -> None:
    """Undo `install`: connections opened from now on are plain psycopg ones."""
    sync_engine = _sync_engine(engine)
    for name, fn in _installed.pop(sync_engine, ()):
        event.remove(sync_engine, name, fn)


def _sync_engine(engine: Engine | AsyncEngine) -> Engine:
    # An AsyncEngine proxies a sync Engine, which owns the dialect and pool.
    return engine if isinstance(engine, Engine) else engine.sync_engine


def _driver_connection(dbapi_connection: Any) -> Any:
    # The asyncio adapter wraps the psycopg connection; the sync dialect
    # hands it out as it is.
    return getattr(dbapi_connection, "driver_connection", dbapi_connection)


def _on_connect(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    if not isinstance(_driver_connection(dbapi_connection), _HEALING):
        # A creator= / async_creator= engine skips do_connect (as would an
        # earlier do_connect listener returning its own connection). Refuse
        # rather than let the application believe it heals.
        raise TypeError(
            "selfheal.sqlalchemy.install(): this engine's connections bypass install()"
            " (creator=, async_creator= or another do_connect listener); make them"
            " selfheal HealingConnection / AsyncHealingConnection instead"
        )


def _on_checkout(dbapi_connection: Any, record: ConnectionPoolEntry,
                 proxy: PoolProxiedConnection) -> None:
    if not isinstance(_driver_connection(dbapi_connection), _HEALING):
        # Opened before install(): SQLAlchemy's own recipe for replacing a
        # pooled connection on checkout. Costs an isinstance() per checkout.
        raise exc.DisconnectionError("replaced by a selfheal connection")
