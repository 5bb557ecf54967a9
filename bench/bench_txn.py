"""
What HealingConnection costs inside transactions, shape by shape, against plain psycopg.

    python bench/bench_txn.py [--dsn DSN] [--rounds R] [--txns N] [--driver psycopg2]
                              [--cpu N|last|none]

Without --dsn it starts an embedded PostgreSQL. Each round runs every shape
N times on a plain and on a healing connection, interleaved transaction by
transaction on the same server; the ratio is healing/plain of the median
round, by wall time and by CPU time (client and server process). Also printed:
the transaction ids each shape takes per transaction (one for the
transaction, one per savepoint that wrote), and the latency of an insert
that collides and is healed and retried, against a plain insert.

Client and server processes run on one CPU (`--cpu`, see `pin`): on a small
shared machine the scheduler's placement of each connection's server process
moves its times by more than what is measured.

Shapes: a pgbench-style TPC-B transaction (3 UPDATE, SELECT, INSERT into a
bigserial history); an ORM request (SELECT, INSERT ... RETURNING into a
serial table, UPDATE); an insert-only transaction (20 default-id inserts);
the same through one cursor held across them (`insert-cursor`); the same
into a table known to be drifted (it collided and was healed: at risk, so
every insert is protected); and a single-row insert in autocommit.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import psycopg
import structlog
from psycopg import sql

from selfheal import HealingConnection

SETUP = """
CREATE TABLE branches (bid int PRIMARY KEY, bbalance int NOT NULL DEFAULT 0);
CREATE TABLE tellers (tid int PRIMARY KEY, bid int NOT NULL, tbalance int NOT NULL DEFAULT 0);
CREATE TABLE accounts (aid int PRIMARY KEY, bid int NOT NULL, abalance int NOT NULL DEFAULT 0);
CREATE TABLE history (id bigserial PRIMARY KEY, tid int, bid int, aid int, delta int,
                      mtime timestamptz);
INSERT INTO branches (bid) SELECT g FROM generate_series(1, 10) g;
INSERT INTO tellers (tid, bid) SELECT g, 1 + g % 10 FROM generate_series(1, 100) g;
INSERT INTO accounts (aid, bid) SELECT g, 1 + g % 10 FROM generate_series(1, 100000) g;
CREATE TABLE users (id serial PRIMARY KEY, name text NOT NULL);
CREATE TABLE orders (id serial PRIMARY KEY, user_id int NOT NULL, note text);
INSERT INTO users (name) SELECT 'u' || g FROM generate_series(1, 1000) g;
CREATE TABLE items (id serial PRIMARY KEY, v int);
CREATE TABLE drifted (id serial PRIMARY KEY, v int);
"""

Conn = Any  # a psycopg 3 connection, or `Psycopg2` around a psycopg2 one


class Psycopg2:
    """A psycopg2 connection with psycopg 3's ``execute()`` and ``info``, for the shapes."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.info = conn.info

    def execute(self, query: str, params: Any = None) -> Any:
        cur = self.conn.cursor()
        cur.execute(query, params)
        return cur

    def cursor(self) -> Any:
        return self.conn.cursor()

    def commit(self) -> None:
        self.conn.commit()

    def close(self) -> None:
        self.conn.close()


def connect(driver: str, dsn: str, healing: bool, autocommit: bool) -> Conn:
    """A plain or healing connection of `driver` ("psycopg" or "psycopg2")."""
    if driver == "psycopg2":
        import psycopg2
        import psycopg2.extensions

        import selfheal.psycopg2

        factory = (selfheal.psycopg2.HealingConnection if healing
                   else psycopg2.extensions.connection)
        conn = psycopg2.connect(dsn, connection_factory=factory)
        conn.autocommit = autocommit
        return Psycopg2(conn)
    cls = HealingConnection if healing else psycopg.Connection
    return cls.connect(dsn, autocommit=autocommit)


def tpcb(conn: Conn, rng: random.Random) -> None:
    aid, tid, bid, delta = (rng.randint(1, 100000), rng.randint(1, 100), rng.randint(1, 10),
                            rng.randint(-5000, 5000))
    conn.execute("UPDATE accounts SET abalance = abalance + %s WHERE aid = %s", (delta, aid))
    conn.execute("SELECT abalance FROM accounts WHERE aid = %s", (aid,)).fetchone()
    conn.execute("UPDATE tellers SET tbalance = tbalance + %s WHERE tid = %s", (delta, tid))
    conn.execute("UPDATE branches SET bbalance = bbalance + %s WHERE bid = %s", (delta, bid))
    conn.execute("INSERT INTO history (tid, bid, aid, delta, mtime)"
                 " VALUES (%s, %s, %s, %s, now())", (tid, bid, aid, delta))
    conn.commit()


def orm(conn: Conn, rng: random.Random) -> None:
    uid = rng.randint(1, 1000)
    conn.execute("SELECT id, name FROM users WHERE id = %s", (uid,)).fetchone()
    conn.execute("INSERT INTO orders (user_id, note) VALUES (%s, %s) RETURNING id",
                 (uid, "n")).fetchone()
    conn.execute("UPDATE users SET name = %s WHERE id = %s", (f"u{uid}", uid))
    conn.commit()


def inserts(table: str) -> Callable[[Conn, random.Random], None]:
    # A string, as applications send: composed once.
    query = sql.SQL("INSERT INTO {} (v) VALUES (%s)").format(sql.Identifier(table)).as_string()

    def run(conn: Conn, rng: random.Random) -> None:
        for i in range(20):
            conn.execute(query, (i,))
        conn.commit()

    return run


def cursor_inserts(table: str) -> Callable[[Conn, random.Random], None]:
    """The insert-only shape through one cursor held across the statements, as code
    that keeps a cursor runs them (selfheal reads each statement from psycopg's
    generator there; ``conn.execute()`` hands it over)."""
    query = sql.SQL("INSERT INTO {} (v) VALUES (%s)").format(sql.Identifier(table)).as_string()

    def run(conn: Conn, rng: random.Random) -> None:
        cur = conn.cursor()
        for i in range(20):
            cur.execute(query, (i,))
        conn.commit()

    return run


def autocommit_insert(conn: Conn, rng: random.Random) -> None:
    conn.execute("INSERT INTO items (v) VALUES (%s)", (1,))


def mark_drifted(admin: Conn, healing: Conn) -> None:
    """Drift `drifted` as another client would (a row at the sequence's next value),
    and let the healing connection collide with it once: the heal retries the
    insert and keeps the table at risk (`selfheal.insync.RISK_PERIOD`), so its
    inserts run protected from then on."""
    admin.execute("INSERT INTO drifted (id, v) SELECT nextval('drifted_id_seq') + 1, 0")
    healing.execute("INSERT INTO drifted (v) VALUES (0)")
    healing.commit()


SHAPES: dict[str, tuple[Callable[[Conn, random.Random], None], bool]] = {
    "tpcb": (tpcb, False),
    "orm": (orm, False),
    "insert-only": (inserts("items"), False),
    "insert-cursor": (cursor_inserts("items"), False),
    "drifted": (inserts("drifted"), False),
    "autocommit": (autocommit_insert, True),
}


def pin(pids: list[int], cpu: int | None) -> str:
    """Run this process and the server processes `pids` on one CPU (`cpu`; None: leave
    them to the scheduler), and say what was done.

    On a small shared machine the scheduler decides, connection by connection,
    whether a client and its server process share a CPU or wake each other
    across two, and that moves one connection's time by tens of percent for
    the whole run: more than what is measured. On one CPU every connection
    runs alike, and a ratio shows the work each side adds.
    """
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        return "not pinned"
    try:
        for pid in (0, *pids):
            os.sched_setaffinity(pid, {cpu})
    except OSError as ex:  # a server on another host, or another user's processes
        return f"not pinned ({ex.strerror})"
    return f"client and server processes pinned to CPU {cpu}"


def next_xid(conn: Conn) -> int:
    (xmax,), = conn.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())").fetchall()
    return int(str(xmax))


def backend_cpu(conn: Conn) -> float | None:
    """Seconds of CPU the connection's server process has used, when the server
    runs on this machine (Linux), else None."""
    try:
        with open(f"/proc/{conn.info.backend_pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except OSError:
        return None


def round_of(name: str, plain: Conn, healing: Conn, txns: int, seed: int, admin: Conn
             ) -> tuple[list[float], list[float]]:
    """Seconds `txns` transactions of `name` take on each connection, interleaved
    transaction by transaction (so the machine's drifts hit both alike): for
    each side, [wall time, client CPU + server CPU] (CPU is 0 when the server's
    is not readable)."""
    run, _ = SHAPES[name]
    if name == "drifted":
        mark_drifted(admin, healing)
    rngs = random.Random(seed), random.Random(seed)
    spent = [[0.0, 0.0], [0.0, 0.0]]
    clock, cpu = time.perf_counter, time.thread_time
    for i in range(txns):
        for side in ((0, 1) if i % 2 else (1, 0)):
            conn = healing if side else plain
            server = backend_cpu(conn)
            started, used = clock(), cpu()
            run(conn, rngs[side])
            ended, used = clock(), cpu() - used
            after = backend_cpu(conn)
            spent[side][0] += ended - started
            if server is not None and after is not None:
                spent[side][1] += used + after - server
    return spent[0], spent[1]


def libpq_floor(dsn: str, rounds: int, txns: int, cpu: int | None) -> tuple[float, float]:
    """Median seconds of a 20-insert transaction sent straight through libpq, each
    insert alone and each behind a SAVEPOINT in one pipeline (what selfheal
    sends): what a savepoint costs the server and the protocol, without any
    Python around it."""
    from psycopg import pq

    insert, savepoint = b"INSERT INTO items (v) VALUES ($1)", b"SAVEPOINT s"

    def run(pg: Any, protected: bool) -> None:
        pg.exec_(b"BEGIN")
        for i in range(20):
            if protected:
                pg.enter_pipeline_mode()
                pg.send_query_params(savepoint, None)
                pg.send_query_params(insert, [b"%d" % i])
                pg.pipeline_sync()
                while (r := pg.get_result()) is None or r.status != pq.ExecStatus.PIPELINE_SYNC:
                    pass
                pg.exit_pipeline_mode()
            else:
                pg.exec_params(insert, [b"%d" % i])
        pg.exec_(b"COMMIT")

    with psycopg.connect(dsn) as a, psycopg.connect(dsn) as b:
        pin([a.info.backend_pid, b.info.backend_pid], cpu)
        rounds_of: list[list[float]] = [[], []]
        for _ in range(rounds):
            spent = [0.0, 0.0]
            for i in range(txns):
                for side in ((0, 1) if i % 2 else (1, 0)):
                    started = time.perf_counter()
                    run((b if side else a).pgconn, bool(side))
                    spent[side] += time.perf_counter() - started
            rounds_of[0].append(spent[0] / txns)
            rounds_of[1].append(spent[1] / txns)
    return statistics.median(rounds_of[0]), statistics.median(rounds_of[1])


def heal_latency(dsn: str, samples: int, cpu: int | None) -> tuple[float, float]:
    """Median seconds of a protected insert and of one healed and retried, both in a
    transaction (with ``protect="always"``, as into a table at risk: in a table
    verified in sync a collision is healed on the side and raised)."""
    plain, healed = [], []
    always = HealingConnection.with_options(protect="always")
    with psycopg.connect(dsn, autocommit=True) as admin, always.connect(dsn) as hc:
        pin([admin.info.backend_pid, hc.info.backend_pid], cpu)
        admin.execute("CREATE TABLE lat (id serial PRIMARY KEY, v int)")
        for i in range(samples):
            hc.execute("SELECT 1")  # the transaction is open: the insert runs inside it
            started = time.perf_counter()
            hc.execute("INSERT INTO lat (v) VALUES (0)")
            plain.append(time.perf_counter() - started)
            hc.commit()
            admin.execute("INSERT INTO lat (id, v) SELECT max(id) + g, 1 FROM lat,"
                          " generate_series(1, 3) g GROUP BY g")
            hc.execute("SELECT 1")
            started = time.perf_counter()
            hc.execute("INSERT INTO lat (v) VALUES (%s)", (i,))
            healed.append(time.perf_counter() - started)
            hc.commit()
    return statistics.median(plain), statistics.median(healed)


def cpu_of(arg: str) -> int | None:
    """The CPU `--cpu` names."""
    if arg == "none":
        return None
    if arg == "last":
        return max(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return int(arg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--dsn")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--txns", type=int, default=200)
    parser.add_argument("--driver", choices=("psycopg", "psycopg2"), default="psycopg")
    parser.add_argument("--cpu", default="last",
                        help="the CPU to run client and server processes on: a number,"
                             " 'last' (default) or 'none' (the scheduler's choice)")
    args = parser.parse_args()
    # Heal events are not what is measured here.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    server = None
    dsn = args.dsn
    if dsn is None:
        from selfheal._embedded import start_server

        dsn, server = start_server()
    try:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(SETUP)
            conns: dict[tuple[str, bool], Conn] = {}
            for healing in (False, True):
                for autocommit in (False, True):
                    conns[("healing" if healing else "plain", autocommit)] = connect(
                        args.driver, dsn, healing, autocommit)
            pinned = pin([admin.info.backend_pid,
                          *(c.info.backend_pid for c in conns.values())], cpu_of(args.cpu))
            times: dict[tuple[str, str], list[list[float]]] = {}
            xids: dict[tuple[str, str], float] = {}
            for r in range(args.rounds + 1):
                for name, (_, autocommit) in SHAPES.items():
                    plain, healing = conns[("plain", autocommit)], conns[("healing", autocommit)]
                    spent = round_of(name, plain, healing, args.txns, r, admin)
                    if r:  # round 0 warms up the server and selfheal's facts
                        times.setdefault((name, "plain"), []).append(spent[0])
                        times.setdefault((name, "healing"), []).append(spent[1])
                for name, (_, autocommit) in SHAPES.items():
                    for side in ("plain", "healing"):
                        # Transaction ids per transaction, one side at a time,
                        # in a steady stream (after 20 unmeasured).
                        run, _ = SHAPES[name]
                        rng = random.Random(r)
                        for _ in range(20):
                            run(conns[(side, autocommit)], rng)
                        before = next_xid(admin)
                        for _ in range(20):
                            run(conns[(side, autocommit)], rng)
                        xids[(name, side)] = (next_xid(admin) - before) / 20
            for conn in conns.values():
                conn.close()
        print(f"{args.driver}: {args.rounds} interleaved rounds of {args.txns} transactions"
              f" per shape; median round; {pinned}")
        print(f"{'shape':<12} {'plain us/txn':>13} {'healing us/txn':>15} {'ratio':>6}"
              f" {'cpu ratio':>10} {'xids/txn plain':>15} {'healing':>8}")
        for name in SHAPES:
            p, h = (statistics.median(r[0] for r in times[(name, side)]) / args.txns * 1e6
                    for side in ("plain", "healing"))
            pc, hc = (statistics.median(r[1] for r in times[(name, side)])
                      for side in ("plain", "healing"))
            cpu = f"{hc / pc:>9.2f}x" if pc else f"{'n/a':>10}"
            print(f"{name:<12} {p:>13.0f} {h:>15.0f} {h / p:>5.2f}x {cpu}"
                  f" {xids[(name, 'plain')]:>15.2f} {xids[(name, 'healing')]:>8.2f}")
        print("cpu ratio: the client's CPU time plus the server process's, healing/plain"
              " (steadier than wall time on a shared machine)")
        if args.driver != "psycopg":
            return
        bare, saved = libpq_floor(dsn, args.rounds, args.txns // 4, cpu_of(args.cpu))
        print(f"floor, straight through libpq: 20 inserts {bare * 1e6:.0f} us/txn, each under"
              f" a pipelined SAVEPOINT {saved * 1e6:.0f} us/txn ({saved / bare:.2f}x)")
        p, h = (statistics.median(r[0] for r in times[("drifted", side)]) / args.txns
                for side in ("plain", "healing"))
        print(f"a savepoint costs an insert: {(saved - bare) / 20 * 1e6:.0f} us straight through"
              f" libpq, {(h - p) / 20 * 1e6:.0f} us through selfheal (drifted)")
        plain_ins, healed_ins = heal_latency(dsn, 50, cpu_of(args.cpu))
        print(f"protected insert in a transaction: {plain_ins * 1e6:.0f} us; healed and retried:"
              f" {healed_ins * 1e6:.0f} us ({healed_ins / plain_ins:.1f}x)")
    finally:
        if server is not None:
            server.cleanup()


if __name__ == "__main__":
    main()
