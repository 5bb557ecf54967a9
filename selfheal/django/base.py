"""
The ``selfheal.django`` database backend: PostgreSQL with healing connections.

Django's PostgreSQL backend opens connections in one place,
``self.Database.connect(**params)`` (and, with ``OPTIONS["pool"]``, through a
psycopg_pool whose ``connection_class`` defaults to `psycopg.Connection`).
This backend changes only those two: its ``Database`` is psycopg except that
``connect`` builds a `HealingConnection`, and its pool builds the same class.
The cursor classes Django picks (client- or server-side binding) are kept:
`HealingConnection` puts healing in front of whatever cursor class is set.
Everything else is the stock backend.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import psycopg
from django.core.exceptions import ImproperlyConfigured
from django.db.backends.postgresql import base as postgresql

from ..wrap import HealingConnection, HealOptions

__all__ = ["DatabaseWrapper", "HealingWrapperMixin"]

_classes: dict[HealOptions, type[HealingConnection[Any]]] = {}


def connection_class(options: HealOptions) -> type[HealingConnection[Any]]:
    """The `HealingConnection` class for `options`, made once per distinct options."""
    if options == HealOptions():
        return HealingConnection
    cls = _classes.get(options)
    if cls is None:
        cls = _classes.setdefault(
            options, HealingConnection.with_options(**dataclasses.asdict(options))
        )
    return cls


class _Driver:
    """psycopg as the backend sees it, except that ``connect`` heals.

    Django also reads the driver's exception classes from it (to wrap them as
    ``django.db.IntegrityError`` and friends): those are psycopg's own.
    """

    def __init__(self, cls: type[HealingConnection[Any]]) -> None:
        self.connect = cls.connect

    def __getattr__(self, name: str) -> Any:
        return getattr(psycopg, name)


class HealingWrapperMixin:
    """Makes a PostgreSQL ``DatabaseWrapper`` (psycopg 3) open healing connections."""

    settings_dict: dict[str, Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not postgresql.is_psycopg3:
            raise ImproperlyConfigured("selfheal.django needs psycopg 3, not psycopg2")
        raw = self.settings_dict["OPTIONS"].get("selfheal") or {}
        try:
            options = HealOptions(**raw)
        except TypeError as ex:
            raise ImproperlyConfigured(f"bad OPTIONS['selfheal']: {ex}") from None
        self.selfheal_connection_class = connection_class(options)
        # An instance attribute: what get_new_connection() calls.
        self.Database = _Driver(self.selfheal_connection_class)

    def get_connection_params(self) -> dict[str, Any]:
        """Django's connection parameters, without selfheal's own options."""
        params: dict[str, Any] = super().get_connection_params()  # type: ignore[misc]
        params.pop("selfheal", None)
        return params

    @property
    def pool(self) -> Any:
        """Django's connection pool (``OPTIONS["pool"]``), building healing connections."""
        pool = super().pool  # type: ignore[misc]
        if pool is not None and not issubclass(pool.connection_class, HealingConnection):
            chosen = self.settings_dict["OPTIONS"].get("pool")
            if isinstance(chosen, dict) and "connection_class" in chosen:
                raise ImproperlyConfigured(
                    "OPTIONS['pool']['connection_class'] must be a subclass of"
                    " selfheal.HealingConnection"
                )
            # Django creates the pool closed and opens it on first use: the
            # class is swapped before any connection exists.
            pool.connection_class = self.selfheal_connection_class
        return pool


class DatabaseWrapper(HealingWrapperMixin, postgresql.DatabaseWrapper):
    """Django's PostgreSQL backend, with `HealingConnection` connections."""
