"""
What `HealOptions(explicit_ids=...)` costs: healing against plain psycopg, same run.

    python bench/bench_explicit.py [--dsn DSN] [--rounds R] [--against plain|allow]

Without --dsn it starts an embedded PostgreSQL. One table; each round runs
every shape through a plain psycopg connection and a `HealingConnection`
(the default, ``explicit_ids="advance"``), in alternating order, and the
median of the per-round ratios (healing / plain) is printed, with the median
time the healing connection adds to each statement. Shapes:

- default-id single-row inserts, autocommit and inside one transaction
  (what every application does: the target is "nothing new");
- explicit-id single-row inserts below the sequence (the sequence is already
  past them: one look), autocommit and inside one transaction;
- explicit-id single-row inserts past the sequence (each one moves it: a
  seeder writing one row at a time), autocommit and inside one transaction;
- a 1,000-row explicit-id INSERT ... SELECT past the sequence (a seeder).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import psycopg
import structlog

from selfheal import HealingConnection

SINGLE = 20
MULTI = 1000
# Past the sequence, fresh each time, far apart: default ids drawn in between
# (the sequence follows the explicit ones) never reach the next explicit one.
_ids = itertools.count(10**9, 10**6)
_below = itertools.count(-1, -1)  # below it, fresh each time
# Each shape writes to a table of its own: the explicit shapes' moves do not
# change what the default-id shapes measure.
_table = "bench_explicit"


def _run(conn: psycopg.Connection[Any], transaction: bool, query: str,
         params: Callable[[], tuple[Any, ...]], n: int) -> float:
    query = query.replace("bench_explicit", _table)  # the shape's own table
    started = time.perf_counter()
    if transaction:
        with conn.transaction():
            for _ in range(n):
                conn.execute(query, params())
    else:
        for _ in range(n):
            conn.execute(query, params())
    return time.perf_counter() - started


def default_ids(conn: psycopg.Connection[Any], transaction: bool) -> float:
    return _run(conn, transaction, "INSERT INTO bench_explicit (v) VALUES (%s)",
                lambda: (1,), SINGLE)


def below(conn: psycopg.Connection[Any], transaction: bool) -> float:
    return _run(conn, transaction, "INSERT INTO bench_explicit (id, v) VALUES (%s, 1)",
                lambda: (next(_below),), SINGLE)


def ahead(conn: psycopg.Connection[Any], transaction: bool) -> float:
    return _run(conn, transaction, "INSERT INTO bench_explicit (id, v) VALUES (%s, 1)",
                lambda: (next(_ids),), SINGLE)


def multi(conn: psycopg.Connection[Any], transaction: bool) -> float:
    def span() -> tuple[int, int]:
        first = next(_ids)
        return first, first + MULTI - 1

    return _run(conn, transaction, "INSERT INTO bench_explicit (id, v) SELECT g, 1"
                " FROM generate_series(%s::bigint, %s::bigint) g", span, 1)


SHAPES: dict[str, tuple[Callable[[psycopg.Connection[Any], bool], float], bool, int]] = {
    "default id, single row, autocommit": (default_ids, False, 20),
    "default id, single row, in a transaction": (default_ids, True, 20),
    "explicit id below the sequence, autocommit": (below, False, 10),
    "explicit id below the sequence, in a transaction": (below, True, 10),
    "explicit id past the sequence, autocommit": (ahead, False, 6),
    "explicit id past the sequence, in a transaction": (ahead, True, 6),
    "1,000-row explicit-id insert, autocommit": (multi, False, 6),
}


def measure(dsn: str, rounds: int, against: str = "plain"
            ) -> dict[str, tuple[float, float]]:
    """Median over rounds of healing/plain time, per shape: the default-id shapes
    first, on connections of their own, then the explicit-id ones (run together
    they disturb each other's timings, on both connections alike or not)."""
    default = [name for name in SHAPES if name.startswith("default")]
    base: type[psycopg.Connection[Any]] = (
        psycopg.Connection if against == "plain"
        else HealingConnection.with_options(explicit_ids="allow"))
    if against != "plain":  # only the default-id shapes compare with "allow"
        return _measure(dsn, rounds, default, base)
    return {**_measure(dsn, rounds, default, base),
            **_measure(dsn, rounds, [name for name in SHAPES if name not in default], base)}


def _measure(dsn: str, rounds: int, names: list[str],
             base: type[psycopg.Connection[Any]]) -> dict[str, tuple[float, float]]:
    shapes = {name: SHAPES[name] for name in names}
    ratios: dict[str, list[float]] = {name: [] for name in shapes}
    added: dict[str, list[float]] = {name: [] for name in shapes}
    global _table
    tables = {name: f"bench_explicit_{i}" for i, name in enumerate(shapes)}
    with psycopg.connect(dsn, autocommit=True) as admin:
        for table in tables.values():
            admin.execute(f"DROP TABLE IF EXISTS {table}")
            admin.execute(f"CREATE TABLE {table} (id bigserial PRIMARY KEY, v int)")
    for r in range(rounds + 1):
        # Fresh connections each round, opened in alternating order: on a small
        # machine where a server process runs (next to the client or not) biases
        # one connection's timings for as long as it lives.
        kinds = (base, HealingConnection)
        opened = [kind.connect(dsn, autocommit=True)
                  for kind in (kinds if r % 2 else kinds[::-1])]
        conns = opened if r % 2 else opened[::-1]
        try:
            for name, (shape, transaction, turns) in shapes.items():
                _table = tables[name]
                # Short turns, alternating: the machine's drifts hit both alike.
                took = [0.0, 0.0]
                for turn in range(turns):
                    for i in ((0, 1) if turn % 2 else (1, 0)):
                        took[i] += shape(conns[i], transaction)
                if r:  # the first round warms caches up (and teaches the table)
                    ratios[name].append(took[1] / took[0])
                    # What the healing connection adds per statement, in µs.
                    statements = turns * (1 if shape is multi else SINGLE)
                    added[name].append((took[1] - took[0]) / statements * 1e6)
            conns[0].execute(f"VACUUM ANALYZE {', '.join(tables.values())}")
        finally:
            for conn in opened:
                conn.close()
    return {name: (statistics.median(values), statistics.median(added[name]))
            for name, values in ratios.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--dsn")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--against", choices=("plain", "allow"), default="plain",
                        help="the baseline: plain psycopg, or a HealingConnection with"
                        " explicit_ids=\"allow\" (what explicit_ids adds to default ids)")
    args = parser.parse_args()
    # The audit events are not what is measured (they are rate-limited anyway).
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    dsn = args.dsn
    server = None
    if dsn is None:
        from selfheal._embedded import start_server

        dsn, server = start_server()
    with psycopg.connect(dsn) as conn:
        version = conn.info.server_version
    baseline = ("plain psycopg" if args.against == "plain"
                else 'HealingConnection(explicit_ids="allow")')
    print(f"healing / {baseline}, median of {args.rounds} interleaved rounds,"
          f" PostgreSQL {version // 10000}:")
    for name, (ratio, added) in measure(dsn, args.rounds, args.against).items():
        print(f"  {name:<50} {ratio:.3f}x  {added:+8.0f} µs a statement")
    del server


if __name__ == "__main__":
    main()
