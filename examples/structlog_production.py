"""
Production logging for selfheal's audit events: JSON lines via structlog.

    DATABASE_URL=postgresql://... python examples/structlog_production.py

selfheal logs through structlog.get_logger("selfheal") and never configures
structlog: the application does, once, at start-up. This configuration writes
one JSON object per line (for Loki, CloudWatch, Datadog, ...), with ISO
timestamps and the level, and drops debug events.
"""

import logging
import os

import structlog

structlog.configure(
    processors=[
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer(),
    ],
    wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    cache_logger_on_first_use=True,
)

import psycopg  # noqa: E402

from selfheal import HealingConnection  # noqa: E402  (configure logging first)

# A seeder that is not selfheal writes ids of its own: the sequence stays behind.
with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as seeder:
    seeder.execute("DROP TABLE IF EXISTS example_invoices")
    seeder.execute("CREATE TABLE example_invoices (id serial PRIMARY KEY, total int)")
    seeder.execute("INSERT INTO example_invoices (id, total) VALUES (1, 10), (2, 20), (3, 30)")

with HealingConnection.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
    # Prints: {"database": ..., "table": "example_invoices", ..., "event": "sequence_resynced"}
    conn.execute("INSERT INTO example_invoices (total) VALUES (40)")
