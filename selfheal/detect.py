"""
Detect: is this error a collision selfheal can heal?

Only a `UniqueViolation` on a primary key whose values come from a sequence
qualifies. The decision uses the error's structured fields (schema, table,
constraint), never its message, which is localized and may be withheld under
row-level security. Constraints found not to qualify are remembered, so an
application that relies on catching unique violations (a natural key, an
``email`` unique index) pays for one catalog lookup per constraint, not one per
error.
"""

from __future__ import annotations

from . import _ops
from ._ops import Operation
from .discover import TableInfo, detect

__all__ = ["ConstraintKey", "NotHealable", "constraint_of", "healable"]

#: (schema, table, constraint) as reported by the server.
ConstraintKey = tuple[str, str, str]


class NotHealable:
    """A bounded memory of constraints that are not sequence-backed primary keys."""

    __slots__ = ("_keys", "_limit")

    def __init__(self, limit: int = 256) -> None:
        self._keys: set[ConstraintKey] = set()
        self._limit = limit

    def __contains__(self, key: ConstraintKey) -> bool:
        return key in self._keys

    def add(self, key: ConstraintKey) -> None:
        if len(self._keys) >= self._limit:
            self._keys.clear()
        self._keys.add(key)


def constraint_of(ex: BaseException) -> ConstraintKey | None:
    """The constraint a unique violation names, or None for any other error."""
    if _ops.sqlstate_of(ex) != "23505":
        return None
    schema, table, constraint = _ops.diag_of(ex)
    if not (schema and table and constraint):
        return None
    return (schema, table, constraint)


def healable(key: ConstraintKey, not_healable: NotHealable) -> Operation[TableInfo | None]:
    """The table to heal for a violation of `key`, or None (remembered) if there is none."""
    if key in not_healable:
        return None
    try:
        info = yield from detect(*key)
    except _ops.ERRORS:
        # The lookup itself failed (connection lost, statement timeout):
        # nothing to heal now, and nothing to remember.
        return None
    if info is None:
        not_healable.add(key)
    return info
