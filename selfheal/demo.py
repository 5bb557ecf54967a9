"""
The selfheal story in under a minute, on a throw-away PostgreSQL.

    python -m selfheal demo [--dsn DSN]

Without --dsn it starts an embedded PostgreSQL (``selfheal[embedded]``). The
demo works in a schema of its own, dropped at the end. The Sentry event is
sent for real when SENTRY_DSN is set; otherwise it is shown, not sent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import psycopg
import structlog
from psycopg import sql

from . import check
from .errors import first_line
from .wrap import HealingConnection

SCHEMA = "selfheal_demo"


def _say(text: str = "") -> None:
    print(text, flush=True)


def _show_check(conn: psycopg.Connection[Any]) -> None:
    for s in check(conn, SCHEMA):
        state = "in sync" if s.in_sync else "DRIFTED"
        _say(f"   {s.schema}.{s.table}: max(id) = {s.max_value}, next value = {s.next_value}"
             f"  -> {state}")


def _setup_sentry() -> list[dict[str, Any]]:
    """Initialise Sentry: for real with SENTRY_DSN, else keep events to show them."""
    try:
        import sentry_sdk
        from sentry_sdk.transport import Transport
    except ImportError:
        return []
    kept: list[dict[str, Any]] = []
    if os.environ.get("SENTRY_DSN"):
        sentry_sdk.init(dsn=os.environ["SENTRY_DSN"])
        return kept

    class Keep(Transport):
        def capture_envelope(self, envelope: Any) -> None:
            for item in envelope.items:
                if item.type == "event":
                    kept.append(item.payload.json)

    sentry_sdk.init(dsn="http://demo@localhost/0", transport=Keep, default_integrations=False)
    return kept


def run(dsn: str) -> int:
    """Tell the story on the server at `dsn`; 0 when every step went as expected."""
    # An application (this demo) chooses how structlog renders: JSON lines.
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.JSONRenderer(),
        ]
    )
    kept = _setup_sentry()
    ident = sql.Identifier(SCHEMA)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(ident))
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(ident))
        conn.execute(sql.SQL("SET search_path TO {}").format(ident))
        try:
            return _story(conn, dsn, kept)
        finally:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(ident))


def _story(conn: psycopg.Connection[Any], dsn: str, kept: list[dict[str, Any]]) -> int:
    conn.execute("CREATE TABLE payments (id serial PRIMARY KEY, amount_cents int NOT NULL)")
    conn.execute("INSERT INTO payments (id, amount_cents) SELECT g, g * 100"
                 " FROM generate_series(1, 40) g")
    conn.execute("SELECT setval('payments_id_seq', 11)")
    _say("1. A restore brought back payments 1..40, but the id sequence came from an")
    _say("   older dump: it still hands out 12.")
    _say()
    _say("2. The application inserts a payment with plain psycopg:")
    try:
        conn.execute("INSERT INTO payments (amount_cents) VALUES (4200)")
    except psycopg.errors.UniqueViolation as ex:
        first, *rest = str(ex).strip().splitlines()
        _say(f"   psycopg.errors.{type(ex).__name__}: {first}")
        for line in rest:
            _say(f"   {line.strip()}")
    else:
        _say("   unexpectedly succeeded")
        return 1
    _say()
    _say("3. selfheal.check() sees the drift:")
    _show_check(conn)
    _say()
    _say("4. The same insert through selfheal.HealingConnection:")
    opts = f"-c search_path={SCHEMA}"
    with HealingConnection.connect(dsn, autocommit=True, options=opts) as hc:
        row = hc.execute(
            "INSERT INTO payments (amount_cents) VALUES (4200) RETURNING id"
        ).fetchone()
    _say(f"   -> succeeded, new payment id {row[0] if row else '?'}; the audit event above"
         " (structlog JSON) says what was healed.")
    _say()
    _say("5. The Sentry event, grouped per table:")
    try:
        import sentry_sdk

        sentry_sdk.flush()
    except ImportError:
        _say("   (sentry-sdk not installed: pip install 'selfheal[sentry]')")
    if os.environ.get("SENTRY_DSN"):
        _say("   sent to the project of SENTRY_DSN.")
    for event in kept:
        for key in ("level", "message", "tags", "fingerprint"):
            _say(f"   {key}: {json.dumps(event.get(key))}")
        _say(f"   contexts.selfheal: {json.dumps(event.get('contexts', {}).get('selfheal'))}")
    if not os.environ.get("SENTRY_DSN"):
        _say("   (shown, not sent: set SENTRY_DSN to send it to your Sentry)")
    _say()
    _say("6. selfheal.check() afterwards:")
    _show_check(conn)
    statuses = check(conn, SCHEMA)
    return 0 if row and all(s.in_sync for s in statuses) else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m selfheal demo``."""
    parser = argparse.ArgumentParser(prog="selfheal demo", description=__doc__.splitlines()[1])
    parser.add_argument("--dsn", help="a PostgreSQL to use instead of an embedded one")
    args = parser.parse_args(argv)
    dsn = args.dsn
    if not dsn:
        from ._embedded import start_server

        started = time.monotonic()
        dsn, _server = start_server()
        with psycopg.connect(dsn) as conn:
            version = conn.execute("SHOW server_version").fetchone()
        _say(f"selfheal demo: embedded PostgreSQL {version[0] if version else ''} started in"
             f" {time.monotonic() - started:.1f} s")
        _say()
    try:
        return run(dsn)
    except psycopg.Error as ex:
        print(f"selfheal demo: error: {first_line(ex)}", file=sys.stderr)
        return 2
