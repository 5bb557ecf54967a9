"""
django-tenants' backend (``django_tenants.postgresql_backend``) with healing connections.

django-tenants builds its backend on ``settings.ORIGINAL_BACKEND`` (default:
Django's PostgreSQL backend). Setting ``ORIGINAL_BACKEND = "selfheal.django"``
with django-tenants' own ENGINE gives the same result as this ENGINE; both
are supported, and this module adds the healing only when it is not already
there.
"""

from __future__ import annotations

from django_tenants.postgresql_backend import base as tenants

from ..base import HealingWrapperMixin

__all__ = ["DatabaseWrapper"]

if issubclass(tenants.DatabaseWrapper, HealingWrapperMixin):
    # ORIGINAL_BACKEND = "selfheal.django": django-tenants already heals.
    DatabaseWrapper = tenants.DatabaseWrapper
else:

    class DatabaseWrapper(HealingWrapperMixin, tenants.DatabaseWrapper):  # type: ignore[no-redef]
        """django-tenants' backend, with `selfheal.HealingConnection` connections."""
