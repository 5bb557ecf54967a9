"""
Sentry settings for selfheal.

selfheal sends its events to Sentry whenever the application initialised
sentry-sdk; nothing needs listing. Applications that list integrations
explicitly, or want other settings, add `SelfhealIntegration`::

    sentry_sdk.init(dsn, integrations=[SelfhealIntegration(interval=600)])
"""

from __future__ import annotations

from sentry_sdk.integrations import Integration

__all__ = ["SelfhealIntegration"]


class SelfhealIntegration(Integration):
    """Settings for selfheal's Sentry events.

    :param interval: seconds during which further heals (or failed heals) of
        the same table are counted rather than sent; the count travels with
        the next event, in the ``selfheal`` context. None: selfheal's default,
        300 (`selfheal.report.SENTRY_INTERVAL`).
    :param send_events: False keeps selfheal's events out of Sentry.
    """

    identifier = "selfheal"

    def __init__(self, interval: float | None = None, send_events: bool = True) -> None:
        if interval is not None and interval < 0:
            raise ValueError("interval must be >= 0")
        self.interval = interval
        self.send_events = send_events

    @staticmethod
    def setup_once() -> None:
        # Nothing to patch: selfheal reports from its own code paths.
        pass
