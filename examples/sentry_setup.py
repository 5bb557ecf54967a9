"""
Sentry alerts for heals.

    SENTRY_DSN=https://...@sentry.example/1 DATABASE_URL=postgresql://... \
        python examples/sentry_setup.py

Once the application initialises sentry-sdk, every heal that moves a
sequence is a warning event and every failed heal an error event, grouped
into one Sentry issue per table. Listing SelfhealIntegration is optional; it
sets how long repeated heals of one table are counted before another event
is sent. Without SENTRY_DSN this example runs with Sentry off.
"""

import os

import psycopg
import sentry_sdk

from selfheal import HealingConnection
from selfheal.sentry import SelfhealIntegration

# selfheal never sends query parameters, row values or frames' variables,
# whatever the options for the rest of the application say.
sentry_sdk.init(
    dsn=os.environ.get("SENTRY_DSN"),
    integrations=[SelfhealIntegration(interval=600)],
)

# A seeder that is not selfheal writes ids of its own: the sequence stays behind.
with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as seeder:
    seeder.execute("DROP TABLE IF EXISTS example_refunds")
    seeder.execute("CREATE TABLE example_refunds (id serial PRIMARY KEY, cents int)")
    seeder.execute("INSERT INTO example_refunds (id, cents) VALUES (1, 500), (2, 700)")

with HealingConnection.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
    row = conn.execute("INSERT INTO example_refunds (cents) VALUES (900) RETURNING id").fetchone()
    state = "on" if sentry_sdk.get_client().is_active() else "off"
    print(f"refund {row[0]} recorded; Sentry {state}")

sentry_sdk.flush()
