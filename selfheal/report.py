"""
Report: tell operators about every heal.

Events go to ``structlog.get_logger("selfheal")``; the application decides
where they end up (selfheal never configures structlog). No event carries
query text, parameters or row values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import structlog

__all__ = ["Heal", "HealFailure", "logger", "resync_failed", "resynced"]

logger = structlog.get_logger("selfheal")


@dataclass(frozen=True)
class Heal:
    """One heal of a table's sequence, as the audit event reports it."""

    database: str
    schema: str
    table: str
    column: str
    constraint: str
    sequence: str
    #: What the next nextval() returned before and after the heal.
    before: int
    after: int
    #: "nextval" (values drawn), "setval" (guarded jump) or "none".
    method: str
    duration_ms: float
    #: "succeeded", "failed" or "not_attempted".
    retry: str

    @property
    def changed(self) -> bool:
        return self.method != "none"

    def fields(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class HealFailure:
    """A heal that could not happen; the caller got its original error back."""

    database: str
    schema: str
    table: str
    column: str
    constraint: str
    sequence: str
    error: BaseException
    duration_ms: float

    def fields(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "error"}
        out["error_class"] = type(self.error).__name__
        out["error"] = str(self.error)
        return out


def resynced(heal: Heal) -> None:
    """Report a heal: a warning when it moved the sequence, debug when it did not."""
    if heal.changed:
        logger.warning("sequence_resynced", **heal.fields())
    else:
        logger.debug("sequence_already_in_sync", **heal.fields())


def resync_failed(failure: HealFailure) -> None:
    """Report a heal that could not happen."""
    logger.error("sequence_resync_failed", **failure.fields())
