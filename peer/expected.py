"""
Differences that are selfheal's design, not regressions: each with its reason.

They run like every other test and are listed apart in the report; a test
listed here that passes through selfheal again is reported too, so the
list is kept short and true. A bug must never go here.
"""

from __future__ import annotations

import re

# install() refuses, with a TypeError at the first connection, a connection it
# did not build: the tests below substitute their own (a Mock, or a psycopg
# connection from a do_connect listener, or a dialect.connect replaced after
# install()). Refusing is deliberate: an engine must not look healing and not heal.
_REFUSED_OWN_CONNECTION = (
    "install() refuses a connection it did not build (the test makes its own)"
)
# The test patches the DBAPI module's connect() (psycopg.connect) to wrap each
# connection in a proxy; install() opens HealingConnection.connect() instead,
# so the patched function is never called.
_PATCHED_DBAPI_CONNECT = (
    "the test patches psycopg.connect(); install() opens HealingConnection.connect()"
)

# The same test on psycopg2, whose dialect install() calls through
# psycopg2.connect() (with connection_factory): the patched function runs and
# wraps the healing connection in a proxy of the test's, which install()
# refuses as a connection it did not build.
_PROXIED_DBAPI_CONNECT = (
    "the test wraps psycopg2.connect()'s connections in its own proxy; install() refuses it"
)

# The test writes ids 1 and 2 itself, then upserts a row with a default id whose
# ON CONFLICT branch copies that id (SET id = excluded.id) and expects 1: the
# stale value a lagging sequence hands out. Through selfheal the sequence was
# moved past 1 and 2 right after they were written (HealOptions(explicit_ids=
# "advance"), the default), so the default id, and the row's new id, is 3.
_EXPLICIT_IDS_ADVANCED = (
    "explicit_ids=\"advance\" moved the sequence past the ids the test wrote; its upsert"
    " expects the stale default id 1"
)
_EXOTIC_FOUR = {
    f"test/dialect/postgresql/test_on_conflict.py::OnConflictTest"
    f"::test_on_conflict_do_update_exotic_targets_four_no_pk[{param}]": _EXPLICIT_IDS_ADVANCED
    for param in ("not_string_index_elements", "string_index_elements")}

_SQLALCHEMY_BOTH = {
    "test/dialect/postgresql/test_dialect.py::DialectTest::test_ensure_version_is_qualified":
        _REFUSED_OWN_CONNECTION,
    "test/engine/test_execute.py::DialectEventTest::test_connect_do_connect":
        _REFUSED_OWN_CONNECTION,
    "test/engine/test_execute.py::DialectEventTest::test_connect_replace_params":
        _REFUSED_OWN_CONNECTION,
    "test/engine/test_execute.py::DialectEventTest"
    "::test_connect_do_connect_no_cargs_cparams_leak_nullpool":
        _REFUSED_OWN_CONNECTION,
}

EXPECTED: dict[str, dict[str, str]] = {
    "django": {},
    "sqlalchemy": {
        **_SQLALCHEMY_BOTH,
        **_EXOTIC_FOUR,
        **{f"test/engine/test_reconnect.py::RealPrePingEventHandlerTest::{test}":
           _PATCHED_DBAPI_CONNECT for test in (
               "test_control", "test_event_handler_can_downgrade_disconnect",
               "test_event_handler_didnt_upgrade_disconnect")},
    },
    "sqlalchemy-asyncio": {**_SQLALCHEMY_BOTH, **_EXOTIC_FOUR},
    "sqlalchemy-psycopg2": {
        **_SQLALCHEMY_BOTH,
        **_EXOTIC_FOUR,
        **{f"test/engine/test_reconnect.py::RealPrePingEventHandlerTest::{test}":
           _PROXIED_DBAPI_CONNECT for test in (
               "test_control", "test_downgrade_control",
               "test_event_handler_can_downgrade_disconnect",
               "test_event_handler_can_upgrade_disconnect",
               "test_event_handler_didnt_downgrade_disconnect",
               "test_event_handler_didnt_upgrade_disconnect")},
    },
    "sqlalchemy-asyncpg": {
        test: why for test, why in _SQLALCHEMY_BOTH.items() if "DialectEventTest" in test},
}

# SQLAlchemy names a backend test class after the database it runs on
# ("RealPrePingEventHandlerTest_postgresql+psycopg_18_6"): the list names
# the class alone, for every server version.
_BACKEND_SUFFIX = re.compile(r"_postgresql\+\w+?_\d+(_\d+)*(?=::)")


def reason(suite: str, test: str) -> str | None:
    """Why `test` of `suite` is expected to differ through selfheal, or None."""
    return EXPECTED.get(suite, {}).get(_BACKEND_SUFFIX.sub("", test, count=1))
