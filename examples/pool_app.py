"""
A connection pool whose connections heal (psycopg_pool).

    DATABASE_URL=postgresql://... python examples/pool_app.py

`connection_class=` is all it takes; `with_options()` configures the class,
here with a shorter bound on lock waits while healing.
"""

import os
from concurrent.futures import ThreadPoolExecutor

from psycopg_pool import ConnectionPool

from selfheal import HealingConnection

dsn = os.environ["DATABASE_URL"]
Healing = HealingConnection.with_options(lock_timeout=1.0)

with ConnectionPool(dsn, connection_class=Healing, min_size=2, max_size=8,
                    kwargs={"autocommit": True}) as pool:
    with pool.connection() as conn:
        conn.execute("DROP TABLE IF EXISTS example_tickets")
        conn.execute("CREATE TABLE example_tickets (id serial PRIMARY KEY, seat int)")
        conn.execute("INSERT INTO example_tickets (id, seat) SELECT g, g"
                     " FROM generate_series(1, 50) g")

    def book(seat: int) -> int:
        with pool.connection() as conn:
            row = conn.execute(
                "INSERT INTO example_tickets (seat) VALUES (%s) RETURNING id", (seat,)
            ).fetchone()
            return row[0]

    with ThreadPoolExecutor(8) as workers:
        ids = sorted(workers.map(book, range(100, 116)))
    print(f"booked {len(ids)} tickets, ids {ids[0]}..{ids[-1]}")
