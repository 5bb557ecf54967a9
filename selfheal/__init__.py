"""
selfheal: PostgreSQL connections that heal lagging id sequences.

When rows are inserted with explicit ids (seeders, restores, imports) a
table's sequence falls behind and every later insert collides with
``duplicate key value violates unique constraint "..._pkey"``. selfheal finds
the sequence behind the key, moves it past the table's keys without ever
moving it backwards, and (through `HealingConnection`) retries the statement.
"""

from __future__ import annotations

# Finding and fixing drift, one table or a whole database.
from .api import acheck, aresync, check, resync

# The errors selfheal raises.
from .errors import (
    LockTimeout,
    NoSequence,
    PermissionDenied,
    ReadOnly,
    ResyncError,
    SelfhealError,
    SequenceExhausted,
    TableNotFound,
)

# Connections that heal and retry; what resync and check return.
from .heal import HealOptions
from .resync import ResyncResult, SequenceStatus
from .wrap import AsyncHealingConnection, HealingConnection

__version__ = "0.1.0"

__all__ = [
    # healing connections
    "AsyncHealingConnection",
    "HealOptions",
    "HealingConnection",
    # resync / check
    "ResyncResult",
    "SequenceStatus",
    "acheck",
    "aresync",
    "check",
    "resync",
    # errors
    "LockTimeout",
    "NoSequence",
    "PermissionDenied",
    "ReadOnly",
    "ResyncError",
    "SelfhealError",
    "SequenceExhausted",
    "TableNotFound",
]
