"""
The healing decision: what to do when a statement collides.

Nothing here touches a connection. `Mode` names how a statement was protected
(`selfheal.protect` picks it); `heal_flow` is the I/O-free operation that runs
after a collision (restore, look up, heal, retry once) and that every driver
shell serves with its own API. The rule it keeps: whenever it does not
end in a successful retry, the caller is left exactly where the plain driver
leaves it, with the original exception, and an aborted transaction still
aborted.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, replace
from typing import Any

from psycopg.pq import TransactionStatus

from . import _ops, report
from ._ops import STATEMENT, Operation
from ._sqltext import Shape
from .detect import ConstraintKey, NotHealable, constraint_of, healable
from .discover import TableInfo
from .errors import SelfhealError
from .insync import Facts
from .resync import LOCK_TIMEOUT, STATEMENT_TIMEOUT, ResyncResult, advance, scoped

__all__ = ["EXPLICIT_IDS", "PROTECT", "HealOptions", "Mode", "after_failure", "heal_flow"]


#: The values of `HealOptions.protect`.
PROTECT = ("auto", "always")
#: The values of `HealOptions.explicit_ids`.
EXPLICIT_IDS = ("advance", "warn", "allow")


@dataclass(frozen=True)
class HealOptions:
    """How a healing connection behaves. Set per class or per connection."""

    #: Retry the statement once after a heal. False: heal, then re-raise.
    retry: bool = True
    #: Inside a transaction, protect statements that can draw from a sequence
    #: with a savepoint. False: no savepoints (no subtransactions); a collision
    #: there is healed on a side connection and the error re-raised.
    savepoints: bool = True
    #: Bound, in seconds, on lock waits while healing.
    lock_timeout: float = LOCK_TIMEOUT
    #: Bound, in seconds, on each statement of a heal.
    statement_timeout: float = STATEMENT_TIMEOUT
    #: Inside a transaction, which statements get a savepoint. "auto": only
    #: those that may collide where a retry can follow (a default-key INSERT
    #: into a table not verified in sync, and the like; see
    #: `selfheal.protect`). "always": every statement that can draw from a
    #: sequence, as long as the transaction has savepoints to spare.
    protect: str = "auto"
    #: Seconds a table verified in sync stays trusted without a new check.
    verified_for: float = 1.0
    #: A statement that writes keys of its own into a sequence-backed primary
    #: key (an INSERT naming the key, or one without a column list), once it
    #: succeeded: "advance" moves the sequence past them and reports it,
    #: "warn" only reports, "allow" does nothing. See `selfheal.explicit`.
    explicit_ids: str = "advance"

    def __post_init__(self) -> None:
        if self.explicit_ids not in EXPLICIT_IDS:
            raise ValueError(f"explicit_ids must be one of {', '.join(map(repr, EXPLICIT_IDS))},"
                             f" not {self.explicit_ids!r}")
        if self.protect not in PROTECT:
            raise ValueError(f"protect must be one of {', '.join(map(repr, PROTECT))},"
                             f" not {self.protect!r}")
        if not self.verified_for >= 0:
            raise ValueError(f"verified_for must be a number of seconds >= 0,"
                             f" not {self.verified_for!r}")


class Mode(enum.Enum):
    """How a statement is protected, from the transaction state it runs in."""

    PASS = "pass"  # not protected, nothing done on failure
    AUTOCOMMIT = "autocommit"  # retry directly
    OPENED = "opened"  # the statement opens the transaction: roll back, retry
    SAVEPOINT = "savepoint"  # under a savepoint inside the caller's transaction
    HEAL_ONLY = "heal_only"  # heal (on a side connection if need be), re-raise


# Undo the statement, keeping the caller's transaction (SAVEPOINT mode); one
# round trip, and valid inside a pipeline too.
_ROLLBACK_TO = _ops.Batch([_ops.Command("ROLLBACK TO SAVEPOINT _selfheal"),
                           _ops.Command("RELEASE SAVEPOINT _selfheal")])
_ROLLBACK = _ops.Command("ROLLBACK")

#: A statement that fails on purpose: it puts a transaction that selfheal
#: restored back into the aborted state the plain driver would have left. Its
#: message says why, for whoever reads the server log.
ABORT = "SELECT 'selfheal: restoring the aborted transaction of a failed statement'::int"


def after_failure(mode: Mode, shape: Shape) -> Mode:
    """The mode to heal in, once the statement failed.

    A statement that may have committed part of its work before failing (a
    procedure or DO block that COMMITs, a multi-statement string) must not
    run again: heal, then re-raise.
    """
    if mode is Mode.AUTOCOMMIT and shape.may_commit:
        return Mode.HEAL_ONLY
    if mode is Mode.OPENED and shape.multi and not shape.atomic:
        return Mode.HEAL_ONLY
    return mode


def worth_healing(ex: Exception, not_healable: NotHealable) -> bool:
    """Whether `ex` may be healable: cheap, no I/O."""
    key = constraint_of(ex)
    return key is not None and key not in not_healable


def heal_flow(
    ex: Exception,
    mode: Mode,
    shape: Shape,
    database: str,
    options: HealOptions,
    not_healable: NotHealable,
    facts: Facts | None = None,
) -> Operation[Any]:
    """After `ex` escaped the caller's statement: restore, heal, retry once.

    Runs on the caller's connection for every mode but HEAL_ONLY, which runs
    on an autocommit connection (the caller's if it is one and idle, else a
    side connection). Raises `ex` itself whenever it does not retry, leaving a
    transaction the statement aborted aborted. `facts`: this database's, told
    that the table collided.
    """
    key = constraint_of(ex)
    if key is None or key in not_healable:
        # Decided without I/O: the transaction is still aborted, as plain.
        raise ex
    if facts is not None:
        facts.at_risk(key[0], key[1])
    restore = mode is Mode.SAVEPOINT or mode is Mode.OPENED
    if restore:
        try:
            yield _ROLLBACK_TO if mode is Mode.SAVEPOINT else _ROLLBACK
        except _ops.ERRORS:
            raise ex from None
    retried = False
    try:
        heal = yield from _heal(ex, key, mode, database, options, not_healable)
        if heal is None:
            raise ex
        if facts is not None:
            heal = replace(heal, **facts.explicit_seen(heal.schema, heal.table))
        if facts is not None and heal.table != key[1]:
            facts.at_risk(heal.schema, heal.table)  # a partition's root
        explicit = _supplies_key(shape, key, heal)
        if not options.retry or mode is Mode.HEAL_ONLY or explicit:
            # An explicit key that collides is a real duplicate: a retry
            # would fail the same way.
            report.resynced(heal, explicit=explicit)
            raise ex
        retried = True
        try:
            value = yield STATEMENT
        except _ops.ERRORS as err:
            report.resynced(replace(heal, retry="failed"))
            if _connection_lost(err):
                raise  # what the caller's pool must see to drop the connection
            raise ex from err
        report.resynced(replace(heal, retry="succeeded"))
        return value
    except Exception:
        if restore and not retried:
            yield from _abort()
        raise


def _heal(
    ex: Exception,
    key: ConstraintKey,
    mode: Mode,
    database: str,
    options: HealOptions,
    not_healable: NotHealable,
) -> Operation[report.Heal | None]:
    """Look up and heal `key`'s sequence in a throw-away scope; None: nothing to heal."""
    started = time.perf_counter()
    in_savepoint = mode is Mode.SAVEPOINT
    status = TransactionStatus.INTRANS if in_savepoint else TransactionStatus.IDLE
    # The lookup and the heal share one scope: a single transaction or savepoint.
    found: list[TableInfo] = []
    body = _lookup_and_advance(key, not_healable, options, mode is not Mode.HEAL_ONLY, found)
    try:
        result = yield from scoped(status, body)
    except SelfhealError as err:
        if not found:
            return None  # nothing was healed, nothing to report
        info = found[0]
        report.resync_failed(
            report.HealFailure(
                database=database,
                schema=info.schema,
                table=info.table,
                column=info.column,
                constraint=key[2],
                sequence=info.sequence,
                error=err,
                duration_ms=_ms(started),
                original=ex,
            )
        )
        raise ex from err
    if result is None:
        return None
    return _heal_event(result, database, key, started)


def _lookup_and_advance(
    key: ConstraintKey,
    not_healable: NotHealable,
    options: HealOptions,
    drain_cache: bool,
    found: list[TableInfo],
) -> Operation[ResyncResult | None]:
    info = yield from healable(key, not_healable)
    if info is None:
        return None
    found.append(info)
    return (yield from advance(info, options.lock_timeout, options.statement_timeout,
                               drain_cache=drain_cache))


def _abort() -> Operation[None]:
    try:
        yield _ops.Query(ABORT)
    except _ops.ERRORS:
        return


def _connection_lost(err: BaseException) -> bool:
    # Client-side failures carry no SQLSTATE; 08 is connection exception,
    # 57P the server shutting the session down (not 57014, a cancel).
    state = _ops.sqlstate_of(err)
    return state is None or state.startswith(("08", "57P"))


def _supplies_key(shape: Shape, key: ConstraintKey, heal: report.Heal) -> bool:
    # The error names the table that collided (a partition, or a table a
    # trigger wrote to); the statement names the one it inserts into.
    return shape.supplies(key[1], heal.column) or shape.supplies(heal.table, heal.column)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def _heal_event(
    result: ResyncResult, database: str, key: ConstraintKey, started: float
) -> report.Heal:
    return report.Heal(
        database=database,
        schema=result.schema,
        table=result.table,
        column=result.column,
        constraint=key[2],
        sequence=result.sequence,
        before=result.before,
        after=result.after,
        method=result.method,
        duration_ms=_ms(started),
        retry="not_attempted",
        **report.cause(result),
    )
