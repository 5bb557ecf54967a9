"""
What `selfheal guard` costs writers: guarded against unguarded tables, same run.

    python bench/bench_guard.py [--dsn DSN] [--rounds R]

Without --dsn it starts an embedded PostgreSQL. Identical tables, one
guarded; each round (on a fresh connection) runs every shape on each table,
in alternating order, and the median of the per-round ratios against the
unguarded table is printed. Shapes:

- default-id single-row inserts, autocommit and inside one transaction;
- a 1,000-row multi-row insert taking default ids;
- COPY of 100,000 rows taking default ids (an import that lets the sequence
  number its rows);
- a 1,000-row insert of explicit ids past the sequence (a seeder);
- COPY of 100,000 explicit-id rows past the sequence (an import).

Every shape also runs, in the same turns, on three reference tables that
say what any guard could cost here:

- ``same``: a second unguarded table, the run's noise (ideally 1.00x);
- ``idle trigger``: a row trigger whose WHEN clause is a constant false,
  the floor of any row trigger (it can never tell a default id from another);
- ``compare only``: a row trigger whose WHEN clause only compares the key
  with ``pg_sequence_last_value()``, the least a trigger must do to tell a
  key past the sequence from a default id. Its function does nothing; on the
  explicit-id shapes it shows what calling a function once per row past
  the sequence costs at least, which is what the guard's marker avoids.
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
PLAIN, GUARDED = "bench_plain", "bench_guarded"
#: The reference tables, by column heading: what they say is in the docstring.
REFERENCES = {"same": "bench_same", "idle trigger": "bench_idle",
              "compare only": "bench_compare"}
TABLES = (PLAIN, GUARDED, *REFERENCES.values())

_NOTHING = sql.SQL(
    "CREATE OR REPLACE FUNCTION bench_nothing() RETURNS trigger LANGUAGE plpgsql"
    " AS 'BEGIN RETURN NULL; END'")
_TRIGGER = sql.SQL(
    "CREATE TRIGGER bench_reference AFTER INSERT ON {table} FOR EACH ROW"
    " WHEN ({when}) EXECUTE FUNCTION bench_nothing()")


def setup(conn: psycopg.Connection) -> None:
    for name in TABLES:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE TABLE {} (id bigserial PRIMARY KEY, v int NOT NULL,"
                             " note text)").format(sql.Identifier(name)))
    info = run(conn, describe(GUARDED))
    [(state, oid)] = guard.states(conn, [info])
    guard.install(conn, state, oid)
    conn.execute(_NOTHING)
    idle, compare = (sql.Identifier(REFERENCES[k]) for k in ("idle trigger", "compare only"))
    conn.execute(_TRIGGER.format(table=idle, when=sql.SQL("false")))
    own = run(conn, describe(REFERENCES["compare only"])).sequence_oid
    conn.execute(_TRIGGER.format(table=compare, when=sql.SQL(
        "NEW.id > pg_catalog.pg_sequence_last_value({}::oid::regclass)").format(
            sql.Literal(own))))


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


def copy_default(conn: psycopg.Connection, table: sql.Identifier) -> float:
    data = "".join(f"{i}\n" for i in range(COPY_ROWS)).encode()
    started = time.perf_counter()
    with conn.cursor() as cur, cur.copy(sql.SQL("COPY {} (v) FROM STDIN").format(table)
                                        ) as copy:
        copy.write(data)
    return time.perf_counter() - started


def _catch_up(conn: psycopg.Connection, table: sql.Identifier) -> None:
    # Untimed: what a table without the guard needs by hand after explicit ids.
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
    "default id, COPY of 100,000 rows": copy_default,
    "explicit ids, 1,000-row insert": multi_explicit,
    "explicit ids, COPY of 100,000 rows": copy_explicit,
}

#: Alternating turns per round and shape.
TURNS = dict(zip(SHAPES, (20, 20, 10, 2, 10, 2), strict=True))


def measure(dsn: str, rounds: int) -> dict[str, dict[str, float]]:
    """Per shape and table, the median over rounds of its time / the unguarded one's."""
    ratios: dict[str, dict[str, list[float]]] = {
        shape: {name: [] for name in TABLES[1:]} for shape in SHAPES}
    with psycopg.connect(dsn, autocommit=True) as conn:
        setup(conn)
    for r in range(rounds + 1):
        # A fresh connection each round: one that lives through the whole run
        # drifts in speed on a shared machine.
        with psycopg.connect(dsn, autocommit=True) as conn:
            for shape, func in SHAPES.items():
                names = list(TABLES)
                took = dict.fromkeys(names, 0.0)
                # Short turns, alternating: the machine's drifts hit all alike.
                for turn in range(TURNS[shape]):
                    for name in (names if turn % 2 else names[::-1]):
                        took[name] += func(conn, sql.Identifier(name))
                if r:  # the first round warms caches up
                    for name in names[1:]:
                        ratios[shape][name].append(took[name] / took[PLAIN])
            conn.execute(sql.SQL("VACUUM ANALYZE {}").format(
                sql.SQL(", ").join(map(sql.Identifier, TABLES))))
    return {shape: {name: statistics.median(values) for name, values in by_table.items()}
            for shape, by_table in ratios.items()}


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
    print(f"time / unguarded time, median of {args.rounds} interleaved rounds,"
          f" PostgreSQL {version // 10000}:")
    print(f"  {'':<42}" + "".join(f"{h:>14}" for h in ("guarded", *REFERENCES)))
    for shape, by_table in measure(dsn, args.rounds).items():
        print(f"  {shape:<42}" + "".join(f"{by_table[name]:>13.3f}x" for name in TABLES[1:]))
    del server


if __name__ == "__main__":
    main()
