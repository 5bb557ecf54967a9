"""
Report: tell operators about every heal, and alert once rather than flood.

Audit events go to ``structlog.get_logger("selfheal")``; the application
decides where they end up (selfheal never configures structlog):

- ``sequence_resynced`` (warning): a heal moved a sequence.
- ``sequence_already_in_sync`` (warning): a statement collided but the heal
  found nothing left to move: the statement drew the last stale value (the
  off-by-one ``setval(seq, max(id), false)``), or a concurrent healer got
  there first. Debug, and no Sentry event, when the statement supplied the
  key itself (a real duplicate, raised to the caller).
- ``sequence_resync_failed`` (error): a heal could not happen; the caller got
  its original error back.

When sentry-sdk is installed and the application initialised it, heals
(whether they moved the sequence or found it already past) and failed heals
are also sent to Sentry, one issue per
table, at most one event per table and interval (later ones are counted and
the count sent with the next event). See `selfheal.sentry` for the settings.

No event carries query parameters or row values (the only query text is
that of explicit-id writes, with its values taken out), and reporting
never raises into the application.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
import weakref
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, cast

import structlog

if TYPE_CHECKING:
    from .resync import ResyncResult, SequenceStatus

__all__ = ["Heal", "HealFailure", "Location", "cause", "fixed", "logger", "resync_failed",
           "resynced"]

logger = structlog.get_logger("selfheal")
_fallback = logging.getLogger("selfheal")

try:
    import sentry_sdk
    from sentry_sdk.utils import current_stacktrace, event_from_exception
except ImportError:  # pragma: no cover - sentry is an optional extra
    sentry_sdk = None  # type: ignore[assignment]
    _SDK2 = False
else:
    # sentry-sdk 2 takes what frames carry per call; 3 reads it from the
    # client's `data_collection` option. Either way selfheal strips the
    # variables from every frame it sends.
    _SDK2 = "include_local_variables" in inspect.signature(current_stacktrace).parameters

#: Default seconds during which repeated Sentry events for one table are
#: counted instead of sent.
SENTRY_INTERVAL = 300.0


@dataclass(frozen=True)
class Location:
    """Where a heal happened: the fields every audit event starts with."""

    database: str
    schema: str
    table: str
    column: str
    constraint: str
    sequence: str


@dataclass(frozen=True)
class Heal(Location):
    """One heal of a table's sequence, as the audit event reports it."""

    #: What the next nextval() returned before and after the heal.
    before: int
    after: int
    #: "nextval" (values drawn), "setval" (guarded jump) or "none".
    method: str
    duration_ms: float
    #: "succeeded", "failed" or "not_attempted".
    retry: str
    #: Who healed: "connection" (a healing connection, after a collision) or
    #: "fix" (``selfheal fix`` or ``manage.py selfheal_fix``, an operator).
    origin: str = "connection"
    #: The cause, as the heal found it: how many keys lay at or past the
    #: sequence's next value (counted up to 1000: `keys_past_capped`), and
    #: their range. None when nothing had to move.
    keys_past: int | None = None
    keys_past_capped: bool = False
    first_key_past: int | None = None
    last_key_past: int | None = None
    #: Whether this process saw statements through a healing connection write
    #: keys of their own into the table (`selfheal.explicit`), how many, and
    #: the last one's text without values.
    explicit_writes_seen: int = 0
    explicit_statement: str | None = None

    @property
    def changed(self) -> bool:
        return self.method != "none"

    def fields(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class HealFailure(Location):
    """A heal that could not happen; the caller got `original` back."""

    #: Why the heal failed (a `selfheal.errors.SelfhealError`).
    error: BaseException
    duration_ms: float
    #: The error the caller received.
    original: BaseException | None = None

    def fields(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(Location)}
        out["duration_ms"] = self.duration_ms
        out["error_class"] = type(self.error).__name__
        out["error"] = str(self.error)
        return out


def resynced(heal: Heal, *, explicit: bool = False) -> None:
    """Report a heal: a warning and a Sentry event.

    A collision on a sequence-backed key is the signal itself, also when the
    heal found nothing left to move (the failing statement drew the stale
    value; ``setval(seq, max(id), false)`` does that) and reports
    ``sequence_already_in_sync``. Only a collision on a key the statement
    supplied itself (`explicit`: a real duplicate, raised to the caller) is
    logged at debug level, without a Sentry event.
    """
    try:
        if not heal.changed and explicit:
            logger.debug("sequence_already_in_sync", **heal.fields())
            return
        logger.warning("sequence_resynced" if heal.changed else "sequence_already_in_sync",
                       **heal.fields())
        if sentry_sdk is not None and sentry_sdk.get_client().is_active():
            _send_heal(heal)
    except Exception:
        _fallback.exception("selfheal could not report a heal")


def fixed(database: str, status: SequenceStatus, result: ResyncResult,
          duration_ms: float) -> None:
    """Report an operator's fix (`selfheal.fleet`, the Django command) of one
    sequence (`status` as checked, `result` the `ResyncResult`) as a heal is
    reported: the same event, the same Sentry event."""
    resynced(Heal(database=database, schema=result.schema, table=result.table,
                  column=result.column, constraint=status.constraint, sequence=result.sequence,
                  before=result.before, after=result.after, method=result.method,
                  duration_ms=duration_ms, retry="not_attempted", origin="fix",
                  **cause(result)))


def cause(result: ResyncResult) -> dict[str, Any]:
    """The `Heal` fields that describe the cause, from a `ResyncResult`."""
    from .resync import CAUSE_LIMIT

    if result.keys_past is None:
        return {}
    return {"keys_past": result.keys_past, "keys_past_capped": result.keys_past >= CAUSE_LIMIT,
            "first_key_past": result.first_key_past, "last_key_past": result.key_value}


def resync_failed(failure: HealFailure) -> None:
    """Report a heal that could not happen: an error event, and one in Sentry."""
    try:
        logger.error("sequence_resync_failed", **failure.fields())
        if sentry_sdk is not None and sentry_sdk.get_client().is_active():
            _send_failure(failure)
    except Exception:
        _fallback.exception("selfheal could not report a failed heal")


# -- Sentry -------------------------------------------------------------------


class _Throttle:
    """Per table and kind: when the last event went out, and how many were held back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[tuple[str, ...], tuple[float, int]] = {}

    def admit(self, key: tuple[str, ...], interval: float) -> int | None:
        """None to hold the event back; else how many were held back before it."""
        now = time.monotonic()
        with self._lock:
            sent_at, held = self._last.get(key, (float("-inf"), 0))
            if now - sent_at < interval:
                self._last[key] = (sent_at, held + 1)
                return None
            self._last[key] = (now, 0)
            return held


# One throttle per Sentry client, so a re-initialised SDK starts afresh.
_throttles: weakref.WeakKeyDictionary[Any, _Throttle] = weakref.WeakKeyDictionary()
_throttles_lock = threading.Lock()


def _settings(client: Any) -> tuple[bool, float]:
    from .sentry import SelfhealIntegration

    integration = client.get_integration(SelfhealIntegration)
    if integration is None:
        return True, SENTRY_INTERVAL
    interval = integration.interval
    return integration.send_events, SENTRY_INTERVAL if interval is None else interval


def _admit(kind: str, database: str, schema: str, table: str) -> int | None:
    client = sentry_sdk.get_client()
    enabled, interval = _settings(client)
    if not enabled:
        return None
    with _throttles_lock:
        throttle = _throttles.get(client)
        if throttle is None:
            throttle = _throttles[client] = _Throttle()
    return throttle.admit((kind, database, schema, table), interval)


def _tags(database: str, schema: str, table: str, sequence: str) -> dict[str, str]:
    return {
        "selfheal.database": database,
        "selfheal.table": f"{schema}.{table}",
        "selfheal.sequence": sequence,
    }


def _stacktrace_without_locals() -> dict[str, Any]:
    # Where the application hit the collision, but never its variables:
    # they hold query parameters and row values.
    if _SDK2:
        trace = cast(Any, current_stacktrace)(
            include_local_variables=False,
            include_source_context=sentry_sdk.get_client().options.get(
                "include_source_context", True),
        )
    else:
        trace = current_stacktrace()
    _strip_variables(trace)
    return {"values": [{"stacktrace": trace, "crashed": False, "current": True}]}


def _strip_variables(stacktrace: Any) -> None:
    for frame in (stacktrace or {}).get("frames", ()):
        frame.pop("vars", None)


def _send_heal(heal: Heal) -> None:
    held = _admit("resynced", heal.database, heal.schema, heal.table)
    if held is None:
        return
    event: dict[str, Any] = {
        "level": "warning",
        "logger": "selfheal",
        "message": (f"selfheal resynced the id sequence of {heal.schema}.{heal.table}"
                    if heal.changed else
                    f"selfheal: an insert into {heal.schema}.{heal.table} collided on its key;"
                    " the sequence was already past the keys (nothing to move)"),
        "tags": _tags(heal.database, heal.schema, heal.table, heal.sequence),
        "contexts": {
            "selfheal": {
                "database": heal.database,
                "schema": heal.schema,
                "table": heal.table,
                "column": heal.column,
                "constraint": heal.constraint,
                "sequence": heal.sequence,
                "before": heal.before,
                "after": heal.after,
                "method": heal.method,
                "duration_ms": heal.duration_ms,
                "retry": heal.retry,
                "origin": heal.origin,
                "keys_past": heal.keys_past,
                "keys_past_capped": heal.keys_past_capped,
                "first_key_past": heal.first_key_past,
                "last_key_past": heal.last_key_past,
                "explicit_writes_seen": heal.explicit_writes_seen,
                "explicit_statement": heal.explicit_statement,
                "repeats_since_last_event": held,
            }
        },
        "fingerprint": ["selfheal", "sequence_resynced", heal.database, heal.schema, heal.table],
        "threads": _stacktrace_without_locals(),
    }
    sentry_sdk.capture_event(event)  # type: ignore[arg-type]


def _send_failure(failure: HealFailure) -> None:
    held = _admit("failed", failure.database, failure.schema, failure.table)
    if held is None:
        return
    client = sentry_sdk.get_client()
    shown = failure.original if failure.original is not None else failure.error
    mechanism = {"type": "selfheal", "handled": True}
    if _SDK2:
        options = dict(client.options)
        options.update(include_local_variables=False, add_full_stack=False)
        built, _hint = cast(Any, event_from_exception)(
            shown, client_options=options, mechanism=mechanism)
    else:
        built, _hint = event_from_exception(shown, mechanism=mechanism)
    event: dict[str, Any] = dict(built)
    for value in event.get("exception", {}).get("values", []):
        _strip_variables(value.get("stacktrace"))
        # The server's DETAIL line quotes the colliding key; keep the first line.
        value["value"] = str(value.get("value", "")).split("\n", 1)[0]
    event.update(
        level="error",
        logger="selfheal",
        message=f"selfheal could not resync the id sequence of {failure.schema}.{failure.table}",
        tags=_tags(failure.database, failure.schema, failure.table, failure.sequence),
        fingerprint=["selfheal", "sequence_resync_failed", failure.database, failure.schema,
                     failure.table],
    )
    event["contexts"] = {
        "selfheal": {
            **{k: v for k, v in failure.fields().items()},
            "repeats_since_last_event": held,
        }
    }
    # No hint: Sentry's dedupe would otherwise drop the application's own
    # report of this same exception, should it let the error propagate.
    sentry_sdk.capture_event(event)  # type: ignore[arg-type]
