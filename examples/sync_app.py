"""
A sync application on HealingConnection.

    DATABASE_URL=postgresql://... python examples/sync_app.py

Creates a table whose sequence lags (rows inserted with explicit ids), then
inserts through a healing connection: the insert succeeds instead of failing
with a duplicate key.
"""

import os

from selfheal import HealingConnection

with HealingConnection.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
    conn.execute("DROP TABLE IF EXISTS example_orders")
    conn.execute("CREATE TABLE example_orders (id serial PRIMARY KEY, item text)")
    conn.execute("INSERT INTO example_orders (id, item) VALUES (1, 'seeded'), (2, 'seeded')")

    # The sequence still hands out 1: without selfheal this is a UniqueViolation.
    row = conn.execute(
        "INSERT INTO example_orders (item) VALUES (%s) RETURNING id", ("book",)
    ).fetchone()
    print(f"inserted order {row[0]}")

    # Inside a transaction the earlier statements survive the heal too.
    conn.execute("SELECT setval('example_orders_id_seq', 1)")
    with conn.transaction():
        conn.execute("UPDATE example_orders SET item = 'checked' WHERE id = 1")
        row = conn.execute(
            "INSERT INTO example_orders (item) VALUES (%s) RETURNING id", ("pen",)
        ).fetchone()
    print(f"inserted order {row[0]} in a transaction")
