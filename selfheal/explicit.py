"""
Explicit ids: keys a statement wrote itself, caught where they are written.

The first cause of drift the guides name is code that writes its own keys
into a sequence-backed primary key: a seeder, an import, a fixture, a
``bulk_create`` with pks. A healing connection knows such a statement when it
plans it (`selfheal.protect.Write`: an INSERT naming the key, or one without a
column list; a COPY FROM that writes the key). Once the statement succeeded,
`settle` looks at the table and,
with ``HealOptions(explicit_ids="advance")``, moves the sequence past its keys
with the usual forward-only, lock-guarded arithmetic (`selfheal.resync`), so
that the next default insert from any client does not collide:

- in autocommit, one query reads the table's highest key and the sequence;
  only when the sequence is behind does a short transaction of selfheal's
  own take the advisory lock and move it;
- inside the caller's transaction, the same look runs under a savepoint
  taken and rolled back in the same round trip, and a move under another:
  rolled back afterwards, the lock goes with it (none is held past the
  statement), the sequence's move stays (sequences are not transactional),
  and a transaction rolled back later leaves a harmless gap.

Nothing here raises into the caller: a look that fails is reported
(``explicit_ids_advance_failed``) and the caller's transaction is left as it
was. Events (`report_outcomes`) are rate-limited per table; each write also
leaves a Sentry breadcrumb (never an event), and the database's `Facts`
remember it for the heal events (`Facts.explicit_seen`). Statement text is
reported without its values (`selfheal._sqltext.redacted`).

A table the process's catalog facts do not know yet (its first statement in
the process, inside a transaction) is looked at once the facts' next check
told about it: when that transaction is over (`Planner.take_deferred`).

A driver's shell only says where its connection is and drives what
`after_statement` and `after_check` return; looking, moving and reporting
happen here, alike for every driver.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from psycopg.pq import TransactionStatus

from . import _ops, report
from ._ops import Batch, Command, Operation
from .discover import TableInfo
from .errors import SelfhealError
from .heal import HealOptions
from .insync import Facts
from .protect import Planner, Write
from .resync import ResyncResult, SequenceStatus, advance, scoped, status_query, statuses

try:
    import sentry_sdk
except ImportError:  # pragma: no cover - sentry is an optional extra
    sentry_sdk = None  # type: ignore[assignment]

__all__ = ["WRITES_LIMIT", "Outcome", "after_check", "after_statement", "report_outcomes",
           "settle"]

#: Tables one statement is looked at for (a string of many INSERTs).
WRITES_LIMIT = 8

_IDLE, _INTRANS = TransactionStatus.IDLE, TransactionStatus.INTRANS

_throttle = report._Throttle()
_CRUMB = ("table", "schema", "sequence", "statement", "behind", "before", "after", "method",
          "next_value", "error")


@dataclass(frozen=True)
class Outcome:
    """What `settle` found for one table a statement wrote keys into."""

    info: TableInfo
    #: The statement named the key (False: no column list, and keys were past).
    certain: bool
    #: The sequence was at or behind the table's keys after the statement.
    status: SequenceStatus | None = None
    #: The move, with "advance" and a sequence that was behind.
    result: ResyncResult | None = None
    #: Why the look or the move failed.
    error: SelfhealError | None = None

    @property
    def behind(self) -> bool:
        return self.status is not None and not self.status.in_sync


def after_statement(planner: Planner, wrote: tuple[Write, ...], statement: str, where: str,
                    options: HealOptions, database: str) -> Operation[None] | None:
    """What a driver's shell runs after a statement that wrote keys of its own
    (`wrote`) succeeded, `where` it is (see `settle`), or None: nothing to look at.

    `statement`: its text as events show it (`selfheal._sqltext.redacted`). The
    shell asks only when explicit ids are looked at (not ``explicit_ids="allow"``):
    it skips the statement's redaction otherwise.
    """
    writes = planner.writes(wrote, statement)
    if not writes:
        return None
    return _settled([(writes, statement)], where, options, database, planner.facts)


def after_check(planner: Planner, where: str, options: HealOptions, database: str
                ) -> Operation[None] | None:
    """What a driver's shell runs after the facts' check: the looks at writes into
    tables the check has just told about (`Planner.take_deferred`), or None."""
    if not planner.deferred or options.explicit_ids == "allow":
        return None
    return _settled(planner.take_deferred(), where, options, database, planner.facts)


def _settled(writes: Sequence[tuple[Sequence[Write], str]], where: str, options: HealOptions,
             database: str, facts: Facts) -> Operation[None]:
    for each, statement in writes:
        outcomes = yield from settle(each, where, options)
        report_outcomes(outcomes, database, statement, options, facts)


def settle(writes: Sequence[Write], where: str, options: HealOptions
           ) -> Operation[list[Outcome]]:
    """After a statement with `writes` succeeded: look, and advance where behind.

    Runs on the caller's connection, `where` it is: inside its transaction
    ("transaction"), idle in autocommit ("autocommit"), or idle where the
    driver would open a transaction for any query ("idle": the look then runs
    in a throw-away transaction of its own). Never raises a database error.
    """
    outcomes: list[Outcome] = []
    handled: tuple[type[Exception], ...] = (*_ops.ERRORS, SelfhealError)
    for write in writes[:WRITES_LIMIT]:
        info = write.info
        assert info is not None  # `Planner.writes` told it
        try:
            if where == "idle":
                outcome = yield from scoped(_IDLE, _look(write, info, options, True))
            else:
                # The look alone first (in autocommit as it is, in the caller's
                # transaction under a savepoint): one round trip where nothing moves.
                outcome = yield from _look(write, info, options, False,
                                           peek=where == "transaction")
                if outcome is not None and outcome.behind and options.explicit_ids == "advance":
                    scope = _INTRANS if where == "transaction" else _IDLE
                    result = yield from scoped(scope, _advance(info, options))
                    outcome = Outcome(info, outcome.certain, outcome.status, result)
        except handled as err:
            error = err if isinstance(err, SelfhealError) else SelfhealError(str(err))
            outcome = Outcome(info, write.columns is not None, error=error)
        if outcome is not None:
            outcomes.append(outcome)
    return outcomes


def _look(write: Write, info: TableInfo, options: HealOptions, move: bool,
          peek: bool = False) -> Operation[Outcome | None]:
    certain = write.columns is not None
    if peek:
        status = yield from _peek(info)
    else:
        (status,) = statuses([info], (yield status_query([info])))
    if status.in_sync and not certain:
        return None  # no column list, and nothing past the sequence: nothing to tell
    if move and not status.in_sync and options.explicit_ids == "advance":
        result = yield from _advance(info, options)
        return Outcome(info, certain, status, result)
    return Outcome(info, certain, status)


_PEEK = Command("SAVEPOINT _selfheal_explicit")
_UNPEEK = [Command("ROLLBACK TO SAVEPOINT _selfheal_explicit"),
           Command("RELEASE SAVEPOINT _selfheal_explicit")]


def _peek(info: TableInfo) -> Operation[SequenceStatus]:
    """The table's keys and sequence read inside the caller's transaction, under a
    savepoint taken and rolled back in the same round trip (where the driver
    pipelines): a failing read leaves the transaction as it was."""
    try:
        _, rows, _, _ = yield Batch([_PEEK, status_query([info]), *_UNPEEK])
    except _ops.ERRORS:
        # The rest of the batch did not run: close the savepoint now.
        with contextlib.suppress(*_ops.ERRORS):
            yield Batch(_UNPEEK)
        raise
    (status,) = statuses([info], rows)
    return status


def _advance(info: TableInfo, options: HealOptions) -> Operation[ResyncResult]:
    return (yield from advance(info, options.lock_timeout, options.statement_timeout))


# -- reporting ------------------------------------------------------------------


def report_outcomes(outcomes: list[Outcome], database: str, statement: str,
                    options: HealOptions, facts: Facts | None) -> None:
    """Tell operators what `settle` found; remember the writes in `facts`."""
    for outcome in outcomes:
        info = outcome.info
        if facts is not None:
            facts.explicit_write(info.schema, info.table, statement)
            if outcome.result is not None or not (outcome.behind or outcome.error):
                # The sequence is past the keys now (moved under the lock, or
                # found past them): not at risk.
                facts.settled(info.schema, info.table)
        try:
            _report(outcome, database, statement, options)
        except Exception:
            report._fallback.exception("selfheal could not report an explicit-id write")


def _report(outcome: Outcome, database: str, statement: str, options: HealOptions) -> None:
    info = outcome.info
    fields: dict[str, Any] = {
        "database": database,
        "schema": info.schema,
        "table": info.table,
        "column": info.column,
        "constraint": info.constraint,
        "sequence": info.sequence,
        "statement": statement,
        "explicit_ids": options.explicit_ids,
        "named_key": outcome.certain,
        "behind": outcome.behind,
    }
    status, result = outcome.status, outcome.result
    if result is not None:
        event = "explicit_ids_advanced" if result.changed else "explicit_ids_written"
        fields.update(before=result.before, after=result.after, method=result.method,
                      **report.cause(result))
    elif outcome.error is not None:
        event = "explicit_ids_advance_failed"
        fields.update(error_class=type(outcome.error).__name__, error=str(outcome.error))
    else:
        event = "explicit_ids_written"
        if status is not None:
            fields.update(next_value=status.next_value,
                          key_value=status.max_value if status.increment > 0
                          else status.min_value)
    _breadcrumb(event, fields)
    held = _throttle.admit((event, database, info.schema, info.table), _interval())
    if held is None:
        return
    fields["repeats_since_last_event"] = held
    if outcome.behind or outcome.error is not None:
        report.logger.warning(event, **fields)
    else:
        report.logger.info(event, **fields)


def _interval() -> float:
    if sentry_sdk is not None:
        client = sentry_sdk.get_client()
        if client.is_active():
            return report._settings(client)[1]
    return report.SENTRY_INTERVAL


def _breadcrumb(event: str, fields: dict[str, Any]) -> None:
    if sentry_sdk is None or not sentry_sdk.get_client().is_active():
        return
    sentry_sdk.add_breadcrumb(
        category="selfheal",
        type="info",
        level="warning" if fields["behind"] else "info",
        message=f"selfheal: {event} on {fields['schema']}.{fields['table']}",
        # Sentry keeps ten keys of a breadcrumb's data: the ones that tell the cause.
        data={k: fields[k] for k in _CRUMB if k in fields},
    )
