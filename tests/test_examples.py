"""Every file in examples/ runs against the test server and does what it says."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from .test_report import Receiver

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, dsn: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        env={**os.environ, "DATABASE_URL": dsn, **env},
        capture_output=True, text=True, timeout=60, check=False,
    )


class TestExamples:
    def test_sync_app(self, dsn: str) -> None:
        """The sync example heals in autocommit and inside a transaction."""
        out = run_example("sync_app.py", dsn)
        assert out.returncode == 0, out.stderr
        assert "inserted order 3\n" in out.stdout
        assert "inserted order 4 in a transaction" in out.stdout

    def test_async_app(self, dsn: str) -> None:
        """The asyncio example heals past 100 imported rows."""
        out = run_example("async_app.py", dsn)
        assert out.returncode == 0, out.stderr
        assert "inserted event 101" in out.stdout

    def test_pool_app(self, dsn: str, conn: psycopg.Connection) -> None:
        """The pool example books 16 tickets from 8 threads past the 50 seeded rows.

        Ids need not be contiguous: a value drawn by an insert that collided
        while another thread healed is spent, as with any sequence.
        """
        out = run_example("pool_app.py", dsn)
        assert out.returncode == 0, out.stderr
        m = re.search(r"booked 16 tickets, ids (\d+)\.\.(\d+)", out.stdout)
        assert m is not None, out.stdout
        assert 50 < int(m[1]) < int(m[2])
        assert conn.execute("SELECT count(*), count(DISTINCT id), min(id) FILTER (WHERE seat"
                            " >= 100) FROM example_tickets").fetchone() == (66, 66, int(m[1]))

    def test_structlog_production(self, dsn: str) -> None:
        """The production logging example prints the audit event as one JSON line."""
        out = run_example("structlog_production.py", dsn)
        assert out.returncode == 0, out.stderr
        [line] = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
        assert line["event"] == "sequence_resynced"
        assert (line["table"], line["after"], line["level"]) == ("example_invoices", 4, "warning")

    def test_sentry_setup(self, dsn: str) -> None:
        """The Sentry example sends one warning event for the healed table."""
        receiver = Receiver()
        try:
            out = run_example("sentry_setup.py", dsn, SENTRY_DSN=receiver.dsn)
        finally:
            receiver.close()
        assert out.returncode == 0, out.stderr
        assert "refund 3 recorded; Sentry on" in out.stdout
        [event] = receiver.events
        assert event["tags"]["selfheal.table"] == "public.example_refunds"

    @pytest.mark.parametrize("name", ["sync_app.py", "sentry_setup.py"])
    def test_without_sentry_dsn(self, dsn: str, name: str) -> None:
        """Examples run with Sentry off when no SENTRY_DSN is set."""
        env = {k: v for k, v in os.environ.items() if k != "SENTRY_DSN"}
        out = subprocess.run([sys.executable, str(EXAMPLES / name)],
                             env={**env, "DATABASE_URL": dsn},
                             capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stderr


class TestDemo:
    def test_python_m_selfheal_demo(self, dsn: str) -> None:
        """`python -m selfheal demo` tells the whole story and exits 0."""
        out = subprocess.run(
            [sys.executable, "-m", "selfheal", "demo", "--dsn", dsn],
            env={k: v for k, v in os.environ.items() if k != "SENTRY_DSN"},
            capture_output=True, text=True, timeout=120, check=False,
        )
        assert out.returncode == 0, out.stderr
        text = out.stdout
        assert "Key (id)=(12) already exists." in text
        assert "selfheal_demo.payments: max(id) = 40, next value = 13  -> DRIFTED" in text
        [event] = [json.loads(x) for x in text.splitlines() if x.startswith("{")]
        assert (event["event"], event["before"], event["after"]) == ("sequence_resynced", 14, 41)
        assert "succeeded, new payment id 41" in text
        assert 'tags: {"selfheal.database"' in text
        assert "max(id) = 41, next value = 42  -> in sync" in text

    def test_demo_bad_dsn(self) -> None:
        """A DSN that cannot be reached: one line on stderr, exit 2, no traceback."""
        out = subprocess.run(
            [sys.executable, "-m", "selfheal", "demo", "--dsn",
             "postgresql://nobody@127.0.0.1:1/x?connect_timeout=2"],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert out.returncode == 2
        assert "Traceback" not in out.stderr
        assert out.stderr.startswith("selfheal demo: error:")
