"""
Settings for Django's own ``tests/runtests.py``, from the environment run.py sets.

``PEER_DSN`` is the server (a libpq conninfo), ``PEER_ENGINE`` the backend
(``django.db.backends.postgresql`` or ``selfheal.django``) and ``PEER_DB``
the prefix of the test databases, so the plain and the selfheal runs each
create fresh ones on the same server.
"""

import os

from psycopg.conninfo import conninfo_to_dict

_params = conninfo_to_dict(os.environ["PEER_DSN"])
_server = {
    "ENGINE": os.environ["PEER_ENGINE"],
    "HOST": _params.pop("host", ""),
    "PORT": _params.pop("port", ""),
    "USER": _params.pop("user", ""),
    "PASSWORD": _params.pop("password", ""),
}
_params.pop("dbname", None)


def _database(suffix: str) -> dict[str, object]:
    name = f"{os.environ['PEER_DB']}_{suffix}"
    return {**_server, "NAME": name, "OPTIONS": dict(_params), "TEST": {"NAME": f"test_{name}"}}


DATABASES = {"default": _database("default"), "other": _database("other")}

SECRET_KEY = "django_tests_secret_key"  # Django's own test settings use it
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
USE_TZ = False
TEST_RUNNER = "peer.django_runner.RecordingRunner"
