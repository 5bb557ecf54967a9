"""
What HealingConnection costs: inserts/s against plain psycopg, and a heal's latency.

    python bench/bench_insert.py [--dsn DSN] [--rows N] [--rounds R]

Without --dsn it starts an embedded PostgreSQL. Plain and healing runs are
interleaved round by round on the same server, and the median round of each
is compared, so the ratios hold whatever the machine's speed.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable

import psycopg
import structlog

from selfheal import HealingConnection


def insert_rows(conn: psycopg.Connection, rows: int, in_transaction: bool) -> float:
    started = time.perf_counter()
    if in_transaction:
        with conn.transaction():
            for i in range(rows):
                conn.execute("INSERT INTO bench (v) VALUES (%s)", (i,))
    else:
        for i in range(rows):
            conn.execute("INSERT INTO bench (v) VALUES (%s)", (i,))
    return time.perf_counter() - started


def compare(dsn: str, rows: int, rounds: int, in_transaction: bool) -> tuple[float, float]:
    """Median seconds per round for plain psycopg and for HealingConnection."""
    times: dict[str, list[float]] = {"plain": [], "healing": []}
    classes: dict[str, Callable[..., psycopg.Connection]] = {
        "plain": psycopg.Connection.connect,
        "healing": HealingConnection.connect,
    }
    for r in range(rounds + 1):
        order = ["plain", "healing"] if r % 2 else ["healing", "plain"]
        for name in order:
            with classes[name](dsn, autocommit=True) as conn:
                elapsed = insert_rows(conn, rows, in_transaction)
            if r:  # the first round warms the server up
                times[name].append(elapsed)
    return statistics.median(times["plain"]), statistics.median(times["healing"])


def heal_latency(dsn: str, trials: int, behind: int) -> tuple[float, float]:
    """Median seconds of an insert that needs no heal, and of one that heals."""
    normal: list[float] = []
    healed: list[float] = []
    with psycopg.connect(dsn, autocommit=True) as admin, \
            HealingConnection.connect(dsn, autocommit=True) as hc:
        for _ in range(trials):
            admin.execute("TRUNCATE heal")
            admin.execute("SELECT setval('heal_id_seq', 1, false)")
            admin.execute("INSERT INTO heal (id) SELECT generate_series(1, %s)", (behind,))
            started = time.perf_counter()
            hc.execute("INSERT INTO heal (v) VALUES (1)")
            healed.append(time.perf_counter() - started)
            started = time.perf_counter()
            hc.execute("INSERT INTO heal (v) VALUES (2)")
            normal.append(time.perf_counter() - started)
    return statistics.median(normal), statistics.median(healed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--dsn")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--behind", type=int, default=500)
    args = parser.parse_args()
    # The heals are the point here, not their audit lines.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    dsn = args.dsn
    if not dsn:
        from selfheal._embedded import start_server

        dsn, _server = start_server()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench, heal")
        conn.execute("CREATE TABLE bench (id bigserial PRIMARY KEY, v int)")
        conn.execute("CREATE TABLE heal (id bigserial PRIMARY KEY, v int)")
        version = conn.info.server_version

    print(f"PostgreSQL {version // 10000}.{version % 10000}, psycopg {psycopg.__version__},"
          f" libpq {psycopg.pq.version()}, {args.rows} inserts x {args.rounds} rounds")
    for label, in_tx in (("autocommit", False), ("one transaction", True)):
        plain, healing = compare(dsn, args.rows, args.rounds, in_tx)
        print(f"{label:>16}: plain {args.rows / plain:8.0f} inserts/s,"
              f" HealingConnection {args.rows / healing:8.0f} inserts/s,"
              f" ratio {healing / plain:.3f}x")
    normal, healed = heal_latency(dsn, 30, args.behind)
    print(f"{'healed insert':>16}: {healed * 1000:.2f} ms vs {normal * 1000:.2f} ms"
          f" ({args.behind} behind): {(healed - normal) * 1000:.2f} ms extra")


if __name__ == "__main__":
    main()
