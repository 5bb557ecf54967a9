"""The Django app that provides the ``selfheal_check`` and ``selfheal_fix`` commands."""

from __future__ import annotations

from django.apps import AppConfig


class SelfhealConfig(AppConfig):
    """selfheal as an installed app: management commands only, no models."""

    name = "selfheal.django"
    # The default label would be "django", the last part of the name.
    label = "selfheal"
    verbose_name = "selfheal"
