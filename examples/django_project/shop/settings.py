"""
Settings of the selfheal example project.

The one line that turns selfheal on is ``"ENGINE": "selfheal.django"``: Django's
PostgreSQL backend, whose connections heal a lagging id sequence and retry
the statement. ``"selfheal.django"`` in INSTALLED_APPS adds the
``selfheal_check`` and ``selfheal_fix`` management commands.

Environment: DATABASE_URL (a libpq URI or ``key=value`` string, required);
DJANGO_DB_POOL=1 to use Django's psycopg connection pool.
"""

import os

from psycopg.conninfo import conninfo_to_dict

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-a-secret")
DEBUG = False
ALLOWED_HOSTS = ["localhost", ".localhost", "testserver"]
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "selfheal.django",  # manage.py selfheal_check / selfheal_fix
    "orders",
]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "shop.urls"


def database(url: str) -> dict:
    """A DATABASES entry from a libpq connection string, with selfheal as the ENGINE."""
    params = conninfo_to_dict(url)
    return {
        "ENGINE": "selfheal.django",  # instead of "django.db.backends.postgresql"
        "NAME": params.pop("dbname", ""),
        "USER": params.pop("user", ""),
        "PASSWORD": params.pop("password", ""),
        "HOST": params.pop("host", ""),  # a host name, or a unix socket directory
        "PORT": params.pop("port", ""),
        "ATOMIC_REQUESTS": True,
        # Anything else libpq understands (sslmode, ...); selfheal's own
        # options would go in OPTIONS["selfheal"], e.g. {"retry": True}.
        "OPTIONS": params,
    }


DATABASES = {"default": database(os.environ["DATABASE_URL"])}
if os.environ.get("DJANGO_DB_POOL") == "1":
    DATABASES["default"]["OPTIONS"]["pool"] = True
