"""
What `selfheal guard` costs writers: guarded against unguarded tables, same run.

    python bench/bench_guard.py [--dsn DSN] [--rounds R]

Without --dsn it starts an embedded PostgreSQL. Two identical tables, one
guarded; each round runs every shape on both, in alternating order, and the
median of the per-round ratios (guarded / unguarded) is printed. Shapes:

- default-id single-row inserts, autocommit and inside one transaction;
- a 1,000-row multi-row insert taking default ids;
- a 1,000-row insert of explicit ids past the sequence (a seeder);
- COPY of 100,000 explicit-id rows past the sequence (an import).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import psycopg
from psycopg import sql

from selfheal import guard
from selfheal._drive import run
from selfheal.discover import describe

SINGLE = 20
MULTI = 1000
COPY_ROWS = 100_000
TABLES = ("bench_plain", "bench_guarded")


def setup(conn: psycopg.Connection) -> None:
    for name in TABLES:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE TABLE {} (id bigserial PRIMARY KEY, v int NOT NULL,"
                             " note text)").format(sql.Identifier(name)))
    info = run(conn, describe("bench_guarded"))
    [(state, oid)] = guard.states(conn, [info])
    guard.install(conn, state, oid)


def _next_id(conn: psycopg.Connection, table: sql.Identifier) -> int:
    row = conn.execute(sql.SQL("SELECT coalesce(max(id), 0) + 1 FROM {}").format(table)
                       ).fetchone()
    assert row is not None
    return int(row[0])


def single_autocommit(conn: psycopg.Connection, table: sql.Identifier) -> float:
    stmt = sql.SQL("INSERT INTO {} (v) VALUES (%s)").format(table)
    started = time.perf_counter()
    for i in range(SINGLE):
        conn.execute(stmt, (i,))
    return time.perf_counter() - started


def single_transaction(conn: psycopg.Connection, table: sql.Identifier) -> float:
    stmt = sql.SQL("INSERT INTO {} (v) VALUES (%s)").format(table)
    started = time.perf_counter()
    with conn.transaction():
        for i in range(SINGLE):
            conn.execute(stmt, (i,))
    return time.perf_counter() - started


def multi_default(conn: psycopg.Connection, table: sql.Identifier) -> float:
    stmt = sql.SQL("INSERT INTO {} (v) SELECT g FROM unnest(%s::int[]) g").format(table)
    values = list(range(MULTI))
    started = time.perf_counter()
    conn.execute(stmt, (values,))
    return time.perf_counter() - started


def _catch_up(conn: psycopg.Connection, table: sql.Identifier) -> None:
    # Untimed: what the unguarded table needs by hand after explicit ids.
    conn.execute(sql.SQL(
        "SELECT setval(pg_get_serial_sequence({name}, 'id'), max(id)) FROM {tbl}"
        " HAVING max(id) >= nextval(pg_get_serial_sequence({name}, 'id'))"
    ).format(name=sql.Literal(table.as_string(conn)), tbl=table))


def multi_explicit(conn: psycopg.Connection, table: sql.Identifier) -> float:
    first = _next_id(conn, table) + 10
    stmt = sql.SQL("INSERT INTO {} (id, v) SELECT g, 1 FROM unnest(%s::bigint[]) g"
                   ).format(table)
    ids = list(range(first, first + MULTI))
    started = time.perf_counter()
    conn.execute(stmt, (ids,))
    took = time.perf_counter() - started
    _catch_up(conn, table)
    return took


def copy_explicit(conn: psycopg.Connection, table: sql.Identifier) -> float:
    first = _next_id(conn, table) + 10
    data = "".join(f"{i}\t1\n" for i in range(first, first + COPY_ROWS)).encode()
    started = time.perf_counter()
    with conn.cursor() as cur, cur.copy(sql.SQL("COPY {} (id, v) FROM STDIN").format(table)
                                        ) as copy:
        copy.write(data)
    took = time.perf_counter() - started
    _catch_up(conn, table)
    return took


SHAPES: dict[str, Callable[[psycopg.Connection, sql.Identifier], float]] = {
    "default id, single row, autocommit": single_autocommit,
    "default id, single row, in a transaction": single_transaction,
    "default id, 1,000-row insert": multi_default,
    "explicit ids, 1,000-row insert": multi_explicit,
    "explicit ids, COPY of 100,000 rows": copy_explicit,
}


#: Alternating turns per round and shape.
TURNS = {name: turns for name, turns in zip(SHAPES, (20, 20, 10, 10, 2), strict=True)}


def measure(dsn: str, rounds: int) -> dict[str, float]:
    """Median over rounds of guarded/unguarded time, per shape."""
    ratios: dict[str, list[float]] = {name: [] for name in SHAPES}
    with psycopg.connect(dsn, autocommit=True) as conn:
        setup(conn)
        tables = [sql.Identifier(name) for name in TABLES]
        for r in range(rounds + 1):
            for name, shape in SHAPES.items():
                # Short turns, alternating: the machine's drifts hit both alike.
                took = [0.0, 0.0]  # unguarded, guarded
                for turn in range(TURNS[name]):
                    for i in ((0, 1) if turn % 2 else (1, 0)):
                        took[i] += shape(conn, tables[i])
                if r:  # the first round warms caches up
                    ratios[name].append(took[1] / took[0])
            conn.execute("VACUUM ANALYZE bench_plain, bench_guarded")
    return {name: statistics.median(values) for name, values in ratios.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--dsn")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    dsn = args.dsn
    server = None
    if dsn is None:
        from selfheal._embedded import start_server

        dsn, server = start_server()
    with psycopg.connect(dsn) as conn:
        version = conn.info.server_version
    print(f"guarded / unguarded, median of {args.rounds} interleaved rounds,"
          f" PostgreSQL {version // 10000}:")
    for name, ratio in measure(dsn, args.rounds).items():
        print(f"  {name:<42} {ratio:.3f}x")
    del server


if __name__ == "__main__":
    main()
