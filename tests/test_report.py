"""Audit events (structlog) and Sentry events, through the real sentry-sdk transport."""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import brotli
import psycopg
import pytest
import sentry_sdk
from psycopg import errors as pgerrors
from structlog.testing import capture_logs

from selfheal import HealingConnection
from selfheal.sentry import SelfhealIntegration

from .conftest import lock_key
from .test_wrap import make_drifted

SECRET = "card-4111-1111"  # a row value that must never leave the process


class Receiver:
    """A tiny Sentry endpoint on 127.0.0.1 that keeps every event it is sent."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.raw: list[bytes] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "br":
                    body = brotli.decompress(body)
                receiver.raw.append(body)
                lines = body.split(b"\n")
                for header, payload in zip(lines[1::2], lines[2::2], strict=False):
                    if json.loads(header).get("type") == "event":
                        receiver.events.append(json.loads(payload))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def dsn(self) -> str:
        return f"http://publickey@127.0.0.1:{self.server.server_address[1]}/42"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    sentry_sdk.get_client().close()
    sentry_sdk.init()  # no DSN: Sentry off again for the other tests
    r.close()


#: The init options that send frames' variables, on the installed sentry-sdk
#: (2: a flag of its own; 3: `data_collection`).
SEND_LOCALS: dict[str, Any] = (
    {"include_local_variables": True}
    if sentry_sdk.VERSION.startswith("2.")
    else {"data_collection": {"stack_frame_variables": True}}
)


def init_sentry(receiver: Receiver, **options: Any) -> None:
    sentry_sdk.init(dsn=receiver.dsn, default_integrations=False, **options)
    # Breadcrumbs outlive init() (sentry-sdk 3): earlier tests' must not show.
    for scope in (sentry_sdk.get_global_scope(), sentry_sdk.get_isolation_scope(),
                  sentry_sdk.get_current_scope()):
        scope.clear_breadcrumbs()


class TestAuditEvents:
    def test_sequence_resynced_fields(self, conn: psycopg.Connection, dsn: str) -> None:
        """sequence_resynced carries every documented field and no row values."""
        make_drifted(conn)
        with HealingConnection.connect(dsn, autocommit=True) as hc, capture_logs() as logs:
            hc.execute("INSERT INTO payments (note) VALUES (%s)", (SECRET,))
        [event] = logs
        assert event["event"] == "sequence_resynced"
        assert event["log_level"] == "warning"
        assert {k: event[k] for k in ("database", "schema", "table", "column", "constraint",
                                      "sequence", "before", "after", "method", "retry")} == {
            "database": conn.info.dbname, "schema": "public", "table": "payments",
            "column": "id", "constraint": "payments_pkey",
            "sequence": "public.payments_id_seq", "before": 2, "after": 13,
            "method": "nextval", "retry": "succeeded"}
        assert event["duration_ms"] > 0
        assert SECRET not in repr(logs)
        # The cause: the seeded range the sequence would have run into.
        assert {k: event[k] for k in ("keys_past", "keys_past_capped", "first_key_past",
                                      "last_key_past")} == {
            "keys_past": 11, "keys_past_capped": False, "first_key_past": 2,
            "last_key_past": 12}

    def test_cause_is_bounded(self, conn: psycopg.Connection, dsn: str) -> None:
        """A large seeded range is counted up to 1000 keys (capped), its range in full;
        one explicit id far ahead reads as a single key."""
        make_drifted(conn, behind=5000)
        conn.execute("INSERT INTO payments (id, note) VALUES (90000, 'far')")
        with HealingConnection.connect(dsn, autocommit=True) as hc, capture_logs() as logs:
            hc.execute("INSERT INTO payments (note) VALUES ('x')")
        [event] = logs
        assert (event["keys_past"], event["keys_past_capped"], event["first_key_past"],
                event["last_key_past"]) == (1000, True, 2, 90000)
        conn.execute("CREATE TABLE far (id serial PRIMARY KEY)")
        conn.execute("INSERT INTO far SELECT generate_series(1, 3)")
        conn.execute("SELECT setval('far_id_seq', 3)")
        conn.execute("INSERT INTO far VALUES (50)")
        with HealingConnection.connect(dsn, autocommit=True) as hc, capture_logs() as logs:
            for _ in range(47):
                hc.execute("INSERT INTO far DEFAULT VALUES")
        [event] = [e for e in logs if e["event"] == "sequence_already_in_sync"]
        assert event["keys_past"] is None  # the collision drew the last stale value

    def test_failed_event(self, conn: psycopg.Connection, dsn: str) -> None:
        """sequence_resync_failed names the location and the error class."""
        make_drifted(conn)
        key = lock_key(conn, "payments")
        cls = HealingConnection.with_options(lock_timeout=0.1)
        with psycopg.connect(dsn) as holder, cls.connect(dsn, autocommit=True) as hc:
            holder.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
            with capture_logs() as logs, pytest.raises(pgerrors.UniqueViolation):
                hc.execute("INSERT INTO payments (note) VALUES (%s)", (SECRET,))
        [event] = logs
        assert event["event"] == "sequence_resync_failed"
        assert event["log_level"] == "error"
        assert (event["table"], event["sequence"]) == ("payments", "public.payments_id_seq")
        assert event["error_class"] == "LockTimeout"
        assert "lock" in event["error"]
        assert SECRET not in repr(logs)

    def test_library_does_not_configure_structlog(self) -> None:
        """Importing and using selfheal leaves structlog's configuration untouched."""
        import subprocess
        import sys

        out = subprocess.run(
            [sys.executable, "-c",
             "import structlog, selfheal, selfheal.report, selfheal.sentry;"
             " print(structlog.is_configured())"],
            capture_output=True, text=True, check=True,
        )
        assert out.stdout.strip() == "False"


class TestSentry:
    def test_heal_event(self, receiver: Receiver, conn: psycopg.Connection, dsn: str) -> None:
        """A heal sends one warning with tags, context and a per-table fingerprint."""
        init_sentry(receiver)
        make_drifted(conn)
        with HealingConnection.connect(dsn, autocommit=True) as hc:
            hc.execute("INSERT INTO payments (note) VALUES (%s)", (SECRET,))
        sentry_sdk.flush()
        [event] = receiver.events
        assert event["level"] == "warning"
        assert "payments" in event["message"]
        assert event["tags"] == {
            "selfheal.database": conn.info.dbname,
            "selfheal.table": "public.payments",
            "selfheal.sequence": "public.payments_id_seq",
        }
        assert event["fingerprint"] == [
            "selfheal", "sequence_resynced", conn.info.dbname, "public", "payments"]
        ctx = event["contexts"]["selfheal"]
        assert (ctx["before"], ctx["after"], ctx["method"]) == (2, 13, "nextval")
        assert all(SECRET.encode() not in raw for raw in receiver.raw)

    def test_off_by_one_is_reported(self, receiver: Receiver, conn: psycopg.Connection,
                                    dsn: str) -> None:
        """setval(seq, max(id), false), the common reset gone wrong: the insert draws the
        stale max and collides, the heal finds nothing left to move. The collision is
        still a warning and a Sentry event, saying nothing moved; the retry lands."""
        init_sentry(receiver)
        make_drifted(conn, 5)
        conn.execute("SELECT setval('payments_id_seq', 5, false)")
        with HealingConnection.connect(dsn, autocommit=True) as hc, capture_logs() as logs:
            row = hc.execute("INSERT INTO payments (note) VALUES ('x') RETURNING id").fetchone()
        assert row == (6,)
        [event] = logs
        assert (event["event"], event["log_level"], event["method"], event["retry"]) == (
            "sequence_already_in_sync", "warning", "none", "succeeded")
        assert (event["before"], event["after"]) == (6, 6)
        sentry_sdk.flush()
        [sent] = receiver.events
        assert sent["level"] == "warning"
        assert "nothing to move" in sent["message"] and "public.payments" in sent["message"]
        assert sent["fingerprint"] == [
            "selfheal", "sequence_resynced", conn.info.dbname, "public", "payments"]
        assert sent["contexts"]["selfheal"]["method"] == "none"

    def test_explicit_duplicate_stays_quiet(self, receiver: Receiver,
                                            conn: psycopg.Connection, dsn: str) -> None:
        """A duplicate id the statement supplied itself is the caller's error: debug only."""
        init_sentry(receiver)
        make_drifted(conn, 3)
        conn.execute("SELECT setval('payments_id_seq', 3)")
        with HealingConnection.connect(dsn, autocommit=True) as hc, capture_logs() as logs, \
                pytest.raises(pgerrors.UniqueViolation):
            hc.execute("INSERT INTO payments (id) VALUES (2)")
        assert [(e["event"], e["log_level"]) for e in logs] == [
            ("sequence_already_in_sync", "debug")]
        sentry_sdk.flush()
        assert receiver.events == []

    def test_no_locals_even_with_attach_stacktrace(
        self, receiver: Receiver, conn: psycopg.Connection, dsn: str
    ) -> None:
        """With attach_stacktrace on, frames are sent without their variables."""
        init_sentry(receiver, attach_stacktrace=True, **SEND_LOCALS)
        make_drifted(conn)
        with HealingConnection.connect(dsn, autocommit=True) as hc:
            hc.execute("INSERT INTO payments (note) VALUES (%s)", (SECRET,))
        sentry_sdk.flush()
        [event] = receiver.events
        frames = event["threads"]["values"][0]["stacktrace"]["frames"]
        assert frames and all("vars" not in f for f in frames)
        assert all(SECRET.encode() not in raw for raw in receiver.raw)

    @pytest.mark.parametrize("integration", [
        pytest.param(lambda: SelfhealIntegration(interval=3600), id="interval"),
        pytest.param(SelfhealIntegration, id="default-interval"),
    ])
    def test_repeats_counted_not_resent(
        self, receiver: Receiver, conn: psycopg.Connection, dsn: str,
        integration: Callable[[], SelfhealIntegration],
    ) -> None:
        """Heals of one table within the interval (selfheal's default of 300 s when the
        integration gives none) are counted, then sent with the next."""
        init_sentry(receiver, integrations=[integration()])
        make_drifted(conn)
        conn.execute("CREATE TABLE other (id serial PRIMARY KEY)")
        conn.execute("INSERT INTO other VALUES (1), (2)")
        with HealingConnection.connect(dsn, autocommit=True) as hc:
            for _ in range(3):
                conn.execute("SELECT setval('payments_id_seq', 1, false)")
                hc.execute("INSERT INTO payments (note) VALUES ('again')")
            hc.execute("INSERT INTO other DEFAULT VALUES")
        sentry_sdk.flush()
        assert sorted(e["tags"]["selfheal.table"] for e in receiver.events) == [
            "public.other", "public.payments"]

    def test_repeat_count_travels(self, receiver: Receiver, conn: psycopg.Connection,
                                  dsn: str) -> None:
        """After the interval, the next event says how many were held back."""
        init_sentry(receiver, integrations=[SelfhealIntegration(interval=0.3)])
        make_drifted(conn)
        import time

        with HealingConnection.connect(dsn, autocommit=True) as hc:
            for pause in (0, 0, 0.4):
                time.sleep(pause)
                conn.execute("SELECT setval('payments_id_seq', 1, false)")
                hc.execute("INSERT INTO payments (note) VALUES ('again')")
        sentry_sdk.flush()
        repeats = [e["contexts"]["selfheal"]["repeats_since_last_event"]
                   for e in receiver.events]
        assert repeats == [0, 1]

    def test_failed_heal_is_error_with_original(
        self, receiver: Receiver, conn: psycopg.Connection, make_role: Any
    ) -> None:
        """A failed heal sends level error carrying the original UniqueViolation,
        without the DETAIL line that quotes the key."""
        init_sentry(receiver)
        make_drifted(conn)
        role_dsn = make_role("GRANT INSERT ON payments TO {role}",
                             "GRANT USAGE ON payments_id_seq TO {role}")
        with HealingConnection.connect(role_dsn, autocommit=True) as hc, \
                pytest.raises(pgerrors.UniqueViolation):
            hc.execute("INSERT INTO payments (note) VALUES (%s)", (SECRET,))
        sentry_sdk.flush()
        [event] = receiver.events
        assert event["level"] == "error"
        [exc] = event["exception"]["values"]
        assert exc["type"] == "UniqueViolation"
        assert "payments_pkey" in exc["value"]
        assert "Key (id)" not in json.dumps(event)
        assert event["fingerprint"][:2] == ["selfheal", "sequence_resync_failed"]
        assert event["contexts"]["selfheal"]["error_class"] == "PermissionDenied"
        assert all(SECRET.encode() not in raw for raw in receiver.raw)

    def test_send_events_off(self, receiver: Receiver, conn: psycopg.Connection,
                             dsn: str) -> None:
        """SelfhealIntegration(send_events=False) keeps Sentry quiet; the log remains."""
        init_sentry(receiver, integrations=[SelfhealIntegration(send_events=False)])
        make_drifted(conn)
        with HealingConnection.connect(dsn, autocommit=True) as hc, capture_logs() as logs:
            hc.execute("INSERT INTO payments (note) VALUES ('x')")
        sentry_sdk.flush()
        assert receiver.events == []
        assert [e["event"] for e in logs] == ["sequence_resynced"]

    def test_reporting_never_raises(self, receiver: Receiver, conn: psycopg.Connection,
                                    dsn: str) -> None:
        """A before_send hook that crashes does not reach the application."""
        def broken(event: Any, hint: Any) -> Any:
            raise RuntimeError("boom")

        init_sentry(receiver, before_send=broken)
        make_drifted(conn)
        with HealingConnection.connect(dsn, autocommit=True) as hc:
            row = hc.execute("INSERT INTO payments (note) VALUES ('x') RETURNING id").fetchone()
        assert row == (13,)
