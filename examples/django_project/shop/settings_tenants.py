"""
The example project as a django-tenants project: one schema per tenant.

The only selfheal-specific line is again the ENGINE: ``"selfheal.django.tenants"``
instead of ``"django_tenants.postgresql_backend"``. (Equivalently, keep
django-tenants' ENGINE and set ``ORIGINAL_BACKEND = "selfheal.django"``.)

    DJANGO_SETTINGS_MODULE=shop.settings_tenants python manage.py migrate_schemas --shared
"""

from .settings import *  # noqa: F403
from .settings import DATABASES

DATABASES["default"]["ENGINE"] = "selfheal.django.tenants"
DATABASE_ROUTERS = ["django_tenants.routers.TenantSyncRouter"]

SHARED_APPS = [
    "django_tenants",
    "customers",
    "django.contrib.contenttypes",
    "selfheal.django",
    # Also shared: public has an orders table of its own, which a heal in a
    # tenant must leave alone.
    "orders",
]
TENANT_APPS = ["django.contrib.contenttypes", "orders"]
INSTALLED_APPS = SHARED_APPS + [app for app in TENANT_APPS if app not in SHARED_APPS]

TENANT_MODEL = "customers.Client"
TENANT_DOMAIN_MODEL = "customers.Domain"
MIDDLEWARE = ["django_tenants.middleware.main.TenantMainMiddleware"]
