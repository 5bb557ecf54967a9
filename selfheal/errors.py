"""
The errors selfheal raises.

Every error names the table or sequence it is about, so the one line a user
sees is enough to act on. Errors caused by the database keep the original
psycopg error as ``__cause__`` and its SQLSTATE in `sqlstate`.
"""

from __future__ import annotations

__all__ = [
    "first_line",
    "LockTimeout",
    "NoSequence",
    "PermissionDenied",
    "ReadOnly",
    "ResyncError",
    "SelfhealError",
    "SequenceExhausted",
    "TableNotFound",
]


def first_line(ex: BaseException) -> str:
    """The first line of an error's message (the server's DETAIL lines left out),
    or its class name when it has no message: what a one-line report shows."""
    text = str(ex).strip()
    return text.splitlines()[0].strip() if text else type(ex).__name__


class SelfhealError(Exception):
    """Base class of every error raised by selfheal."""


class TableNotFound(SelfhealError):
    """The table named does not exist (or is not visible to the role)."""


class NoSequence(SelfhealError):
    """The table has no single-column integer primary key drawn from a sequence."""


class SequenceExhausted(SelfhealError):
    """Moving the sequence past the table's keys would cross its MAXVALUE/MINVALUE."""


class ResyncError(SelfhealError):
    """The database refused or interrupted a resync; nothing was moved backwards."""

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class LockTimeout(ResyncError):
    """A lock needed by the resync was not granted within the configured bound."""


class PermissionDenied(ResyncError):
    """The role lacks a privilege the resync needs (see the README's privileges)."""


class ReadOnly(ResyncError):
    """The server or transaction is read-only (a hot standby, or read-only default)."""
