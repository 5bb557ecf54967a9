"""
What selfheal.asyncpg.HealingConnection costs, shape by shape, against plain asyncpg.

    python bench/bench_asyncpg.py [--dsn DSN] [--rounds R] [--txns N] [--cpu N|last|none]

The shapes of bench_txn.py, written as asyncpg applications write them
(``async with conn.transaction():``, ``$n`` parameters), on the same tables.
Without --dsn it starts an embedded PostgreSQL. Each round runs every shape
N times on a plain and on a healing connection, interleaved transaction by
transaction on the same server; the ratio is healing/plain of the median
round, by wall time and by CPU time (the event loop's thread plus the server
process). Also printed: transaction ids per transaction (one for the
transaction, one per savepoint that wrote).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import psycopg
import structlog
from bench_txn import SETUP, cpu_of, pin
from psycopg import sql

from selfheal.asyncpg import HealingConnection

Shape = Callable[[Any, random.Random], Awaitable[None]]


async def tpcb(conn: Any, rng: random.Random) -> None:
    aid, tid, bid, delta = (rng.randint(1, 100000), rng.randint(1, 100), rng.randint(1, 10),
                            rng.randint(-5000, 5000))
    async with conn.transaction():
        await conn.execute("UPDATE accounts SET abalance = abalance + $1 WHERE aid = $2",
                           delta, aid)
        await conn.fetchval("SELECT abalance FROM accounts WHERE aid = $1", aid)
        await conn.execute("UPDATE tellers SET tbalance = tbalance + $1 WHERE tid = $2",
                           delta, tid)
        await conn.execute("UPDATE branches SET bbalance = bbalance + $1 WHERE bid = $2",
                           delta, bid)
        await conn.execute("INSERT INTO history (tid, bid, aid, delta, mtime)"
                           " VALUES ($1, $2, $3, $4, now())", tid, bid, aid, delta)


async def orm(conn: Any, rng: random.Random) -> None:
    uid = rng.randint(1, 1000)
    async with conn.transaction():
        await conn.fetchrow("SELECT id, name FROM users WHERE id = $1", uid)
        await conn.fetchval("INSERT INTO orders (user_id, note) VALUES ($1, $2) RETURNING id",
                            uid, "n")
        await conn.execute("UPDATE users SET name = $1 WHERE id = $2", f"u{uid}", uid)


def inserts(table: str) -> Shape:
    query = sql.SQL("INSERT INTO {} (v) VALUES ($1)").format(sql.Identifier(table)).as_string()

    async def run(conn: Any, rng: random.Random) -> None:
        async with conn.transaction():
            for i in range(20):
                await conn.execute(query, i)

    return run


async def autocommit_insert(conn: Any, rng: random.Random) -> None:
    await conn.execute("INSERT INTO items (v) VALUES ($1)", 1)


async def mark_drifted(admin: psycopg.Connection[Any], healing: Any) -> None:
    """Drift `drifted` as another client would, and let the healing connection collide
    with it once: the heal keeps the table at risk, its inserts protected from then on."""
    admin.execute("INSERT INTO drifted (id, v) SELECT nextval('drifted_id_seq') + 1, 0")
    await healing.execute("INSERT INTO drifted (v) VALUES (0)")


SHAPES: dict[str, Shape] = {
    "tpcb": tpcb,
    "orm": orm,
    "insert-only": inserts("items"),
    "drifted": inserts("drifted"),
    "autocommit": autocommit_insert,
}


def backend_cpu(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except OSError:
        return None


async def round_of(name: str, plain: Any, healing: Any, txns: int, seed: int,
                   admin: psycopg.Connection[Any]) -> tuple[list[float], list[float]]:
    run = SHAPES[name]
    if name == "drifted":
        await mark_drifted(admin, healing)
    rngs = random.Random(seed), random.Random(seed)
    spent = [[0.0, 0.0], [0.0, 0.0]]
    pids = plain.get_server_pid(), healing.get_server_pid()
    clock, cpu = time.perf_counter, time.thread_time
    for i in range(txns):
        for side in ((0, 1) if i % 2 else (1, 0)):
            conn = healing if side else plain
            server = backend_cpu(pids[side])
            started, used = clock(), cpu()
            await run(conn, rngs[side])
            ended, used = clock(), cpu() - used
            after = backend_cpu(pids[side])
            spent[side][0] += ended - started
            if server is not None and after is not None:
                spent[side][1] += used + after - server
    return spent[0], spent[1]


def next_xid(admin: psycopg.Connection[Any]) -> int:
    row = admin.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())").fetchone()
    assert row is not None
    return int(str(row[0]))


def connect_args(dsn: str) -> dict[str, Any]:
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    names = {"dbname": "database"}
    return {names.get(k, k): int(str(v)) if k == "port" else v for k, v in info.items()
            if k in ("host", "port", "user", "password", "dbname")}


async def bench(dsn: str, rounds: int, txns: int, cpu: int | None) -> None:
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(SETUP)
        plain = await asyncpg.connect(**connect_args(dsn))
        healing = await asyncpg.connect(**connect_args(dsn), connection_class=HealingConnection)
        pinned = pin([admin.info.backend_pid, plain.get_server_pid(),
                      healing.get_server_pid()], cpu)
        times: dict[tuple[str, str], list[list[float]]] = {}
        xids: dict[tuple[str, str], float] = {}
        for r in range(rounds + 1):
            for name in SHAPES:
                spent = await round_of(name, plain, healing, txns, r, admin)
                if r:  # round 0 warms up the server and selfheal's facts
                    times.setdefault((name, "plain"), []).append(spent[0])
                    times.setdefault((name, "healing"), []).append(spent[1])
            for name, run in SHAPES.items():
                for side, conn in (("plain", plain), ("healing", healing)):
                    rng = random.Random(r)
                    for _ in range(20):
                        await run(conn, rng)
                    before = next_xid(admin)
                    for _ in range(20):
                        await run(conn, rng)
                    xids[(name, side)] = (next_xid(admin) - before) / 20
        await plain.close()
        await healing.close()
    print(f"asyncpg: {rounds} interleaved rounds of {txns} transactions per shape;"
          f" median round; {pinned}")
    print(f"{'shape':<12} {'plain us/txn':>13} {'healing us/txn':>15} {'ratio':>6}"
          f" {'cpu ratio':>10} {'xids/txn plain':>15} {'healing':>8}")
    for name in SHAPES:
        p, h = (statistics.median(r[0] for r in times[(name, side)]) / txns * 1e6
                for side in ("plain", "healing"))
        pc, hc = (statistics.median(r[1] for r in times[(name, side)])
                  for side in ("plain", "healing"))
        cpu = f"{hc / pc:>9.2f}x" if pc else f"{'n/a':>10}"
        print(f"{name:<12} {p:>13.0f} {h:>15.0f} {h / p:>5.2f}x {cpu}"
              f" {xids[(name, 'plain')]:>15.2f} {xids[(name, 'healing')]:>8.2f}")
    print("cpu ratio: the event loop's CPU time plus the server process's, healing/plain"
          " (steadier than wall time on a shared machine)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--dsn")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--txns", type=int, default=200)
    parser.add_argument("--cpu", default="last",
                        help="the CPU to run client and server processes on: a number,"
                             " 'last' (default) or 'none' (the scheduler's choice)")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    server = None
    dsn = args.dsn
    if dsn is None:
        from selfheal._embedded import start_server

        dsn, server = start_server()
    try:
        asyncio.run(bench(dsn, args.rounds, args.txns, cpu_of(args.cpu)))
    finally:
        if server is not None:
            server.cleanup()


if __name__ == "__main__":
    main()
