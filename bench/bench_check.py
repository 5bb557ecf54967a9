"""
Benchmark: `selfheal check` over a fleet of tenant databases against the per-table way.

Creates DATABASES tenant databases of TABLES tables each (every 4th table
drifted), then times, in the same run and on the same server:

- per-table: one database after another, ``SELECT max(id)`` and
  ``SELECT last_value, is_called`` for each table. It is given the table and
  sequence names for free (as an application that knows its models would be),
  so only those queries are timed;
- ``selfheal check --jobs 1``: the same connections, one database after another,
  a constant number of round trips per database;
- ``selfheal check`` with its default ``--jobs``;
- the floor: per database, connect and one hand-written query with every
  table and sequence name known, as many databases at a time as ``--jobs``.

After a warm-up, REPEAT rounds run the four one after the other, each round
in another order; the medians of the times and of each round's ratios count
(the machine's drifts hit every way alike). All must find
the same drift. Every network is measured: the server's own address (a Unix
socket on the same host: no network at all), and for each ``--rtt-ms`` a TCP
proxy, started in its own process, that holds every packet for half the round
trip time in each direction, like a database in another availability zone.
``--rtt-ms 0`` measures the proxy's own overhead.

The server is a throw-away embedded one unless --dsn or SELFHEAL_TEST_DSN
names another (databases are created there and dropped).

    python bench/bench_check.py [--databases 120] [--tables 40] [--rtt-ms 0.5 ...]
"""

from __future__ import annotations

import argparse
import os
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from selfheal import fleet

# -- the fleet --------------------------------------------------------------------------


def create_fleet(admin: psycopg.Connection[Any], server: str, prefix: str, databases: int,
                 tables: int) -> list[str]:
    """A template with `tables` tables (every 4th drifted), copied `databases` times."""
    template = f"{prefix}template"
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(template)))
    with psycopg.connect(make_conninfo(server, dbname=template), autocommit=True) as conn:
        for i in range(tables):
            name = sql.Identifier(f"t{i:02d}")
            conn.execute(sql.SQL("CREATE TABLE {} (id bigserial PRIMARY KEY, v int)")
                         .format(name))
            conn.execute(sql.SQL("INSERT INTO {} (v) SELECT g FROM generate_series(1, 200) g")
                         .format(name))
            if i % 4 == 0:  # rows with explicit ids past the sequence: drift
                conn.execute(sql.SQL("INSERT INTO {} (id, v) SELECT g, g FROM"
                                     " generate_series(201, 260) g").format(name))
    # FILE_COPY copies directories: much faster than WAL_LOG for small databases.
    strategy = sql.SQL(" STRATEGY FILE_COPY" if admin.info.server_version >= 150000 else "")
    names = [f"{prefix}{i:04d}" for i in range(1, databases + 1)]
    for name in names:
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}{}").format(
            sql.Identifier(name), sql.Identifier(template), strategy))
    admin.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(template)))
    return names


def per_table(targets: list[fleet.Target], tables: int) -> int:
    """The per-table way, one database after another; returns the drifted count."""
    drifted = 0
    names = [(sql.Identifier(f"t{i:02d}"), sql.Identifier(f"t{i:02d}_id_seq"))
             for i in range(tables)]
    for target in targets:
        with psycopg.connect(target.conninfo, autocommit=True) as conn:
            for table, seq in names:
                row = conn.execute(sql.SQL("SELECT max(id) FROM {}").format(table)).fetchone()
                state = conn.execute(sql.SQL("SELECT last_value, is_called FROM {}")
                                     .format(seq)).fetchone()
                assert row is not None and state is not None
                next_value = state[0] + 1 if state[1] else state[0]
                if row[0] is not None and next_value <= row[0]:
                    drifted += 1
    return drifted


def floor(targets: list[fleet.Target], tables: int, jobs: int) -> int:
    """The floor: per database, connect and one hand-written query with every table
    and sequence name known; `jobs` databases at a time. Returns the drifted count."""
    cells = []
    for i in range(tables):
        table, seq = sql.Identifier(f"t{i:02d}"), sql.Identifier(f"t{i:02d}_id_seq")
        cells.append(sql.SQL(
            "(SELECT max(id) FROM {}), (SELECT CASE WHEN is_called THEN last_value + 1"
            " ELSE last_value END FROM {})").format(table, seq))
    query = sql.SQL("SELECT {}").format(sql.SQL(", ").join(cells))

    def one(target: fleet.Target) -> int:
        with psycopg.connect(target.conninfo, autocommit=True) as conn:
            row = conn.execute(query).fetchone()
        assert row is not None
        pairs = zip(row[::2], row[1::2], strict=True)
        return sum(1 for top, nxt in pairs if top is not None and nxt <= top)

    with ThreadPoolExecutor(jobs) as pool:
        return sum(pool.map(one, targets))


def with_selfheal(targets: list[fleet.Target], jobs: int) -> int:
    """selfheal's fleet check; returns the drifted count."""
    report = fleet.check_fleet(targets, jobs=jobs)
    assert not report.failed, report.failed[0].error
    return sum(len(db.drifted) for db in report.databases)


# -- a delaying proxy (run in its own process, so it does not share our GIL) ------------


def _pump(src: socket.socket, dst: socket.socket, delay: float) -> None:
    held: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

    def send() -> None:
        while True:
            due, data = held.get()
            if not data:
                dst.close()
                return
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            try:
                dst.sendall(data)
            except OSError:
                return

    threading.Thread(target=send, daemon=True).start()
    while True:
        try:
            data = src.recv(65536)
        except OSError:
            data = b""
        held.put((time.perf_counter() + delay, data))
        if not data:
            return


def run_proxy(upstream: str, delay: float) -> None:
    """Accept on 127.0.0.1, forward to `upstream` (a socket path or host:port)."""
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    while True:
        client, _ = listener.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if upstream.startswith("/"):
            server = socket.socket(socket.AF_UNIX)
            server.connect(upstream)
        else:
            host, port = upstream.rsplit(":", 1)
            server = socket.create_connection((host, int(port)))
            server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for a, b in ((client, server), (server, client)):
            threading.Thread(target=_pump, args=(a, b, delay), daemon=True).start()


@contextmanager
def proxied(server: str, rtt_ms: float) -> Iterator[str]:
    """`server` reached through a proxy adding `rtt_ms` of round trip time."""
    params = conninfo_to_dict(server)
    host = str(params.get("host") or "/tmp")
    port = str(params.get("port") or "5432")
    upstream = f"{host}/.s.PGSQL.{port}" if host.startswith("/") else f"{host}:{port}"
    proc = subprocess.Popen(
        [sys.executable, __file__, "--proxy", upstream, str(rtt_ms / 2000)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        listen_port = proc.stdout.readline().strip()
        params.update(host="127.0.0.1", port=listen_port, sslmode="disable",
                      gssencmode="disable")
        yield make_conninfo("", **params)
    finally:
        proc.kill()
        proc.wait()


# -- main ---------------------------------------------------------------------------------


def round_trip(server: str) -> float:
    """The median time of ``SELECT 1`` on one connection: the network's round trip."""
    with psycopg.connect(server, autocommit=True) as conn:
        times = []
        for _ in range(301):
            started = time.perf_counter()
            conn.execute("SELECT 1").fetchone()
            times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


#: The ways timed, in the order of a round's first turn.
WAYS = ("per-table", "serial", "parallel", "floor")


def measure(server: str, names: list[str], args: argparse.Namespace
            ) -> tuple[float, dict[str, float], dict[str, float], int]:
    """Round trip time; then, over `args.repeat` rounds that run the four ways one after
    the other (each round in another order, so the machine's drifts hit them alike),
    the median time of each way and the median of each round's ratios."""
    rtt = round_trip(server)
    targets = [fleet.Target(make_conninfo(server, dbname=n), n) for n in names]
    expected = per_table(targets, args.tables)  # warm-up, and the reference answer
    assert with_selfheal(targets, args.jobs) == expected
    run: dict[str, Callable[[], int]] = {
        "per-table": lambda: per_table(targets, args.tables),
        "serial": lambda: with_selfheal(targets, 1),
        "parallel": lambda: with_selfheal(targets, args.jobs),
        "floor": lambda: floor(targets, args.tables, args.jobs),
    }
    rounds: list[dict[str, float]] = []
    for r in range(args.repeat):
        order = WAYS[r % len(WAYS):] + WAYS[:r % len(WAYS)]
        times = {}
        for way in (order if r % 2 == 0 else order[::-1]):
            started = time.perf_counter()
            found = run[way]()
            times[way] = time.perf_counter() - started
            assert found == expected, (way, found, expected)
        rounds.append(times)
    medians = {way: statistics.median(t[way] for t in rounds) for way in WAYS}
    ratios = {
        "serial": statistics.median(t["per-table"] / t["serial"] for t in rounds),
        "parallel": statistics.median(t["per-table"] / t["parallel"] for t in rounds),
        "floor": statistics.median(t["parallel"] / t["floor"] for t in rounds),
    }
    return rtt, medians, ratios, expected


def scale(admin: psycopg.Connection[Any], server: str, prefix: str, counts: list[int],
          jobs: int) -> None:
    """`selfheal check` over growing numbers of small databases (3 tables each): time,
    and the peak of Python memory during the run (tracemalloc), which should grow with
    the report only (a few hundred bytes per sequence), not with the connections."""
    import tracemalloc

    top = max(counts)
    names = create_fleet(admin, server, f"{prefix}s", top, 3)
    try:
        print(f"{'databases':>10} {'check':>9} {'per database':>13} {'peak memory':>12}"
              f" {'per database':>13}")
        for count in sorted(counts):
            targets = [fleet.Target(make_conninfo(server, dbname=n), n) for n in names[:count]]
            tracemalloc.start()
            started = time.perf_counter()
            report = fleet.check_fleet(targets, jobs=jobs)
            elapsed = time.perf_counter() - started
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            assert not report.failed and len(report.databases) == count
            print(f"{count:>10} {elapsed:8.2f}s {elapsed / count * 1000:10.2f} ms"
                  f" {peak / 2**20:9.1f} MiB {peak / count / 1024:10.1f} KiB")
            del report
    finally:
        for name in names:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="selfheal check vs the per-table way")
    parser.add_argument("--databases", type=int, default=120)
    parser.add_argument("--tables", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=fleet.DEFAULT_JOBS)
    parser.add_argument("--rtt-ms", type=float, action="append",
                        help="also measure through a proxy adding this round trip time"
                             " (repeatable; default 0.5)")
    parser.add_argument("--dsn", default=os.environ.get("SELFHEAL_TEST_DSN"))
    parser.add_argument("--scale", type=int, action="append", metavar="N",
                        help="instead: check N small databases (repeatable, e.g. 500 1000"
                             " 2000), with time and peak memory")
    args = parser.parse_args(argv)
    rtts: list[float] = args.rtt_ms if args.rtt_ms is not None else [0.5]

    server_handle = None
    if args.dsn:
        server = args.dsn
    else:
        from selfheal._embedded import start_server

        server, server_handle = start_server()
    prefix = f"shbench_{os.getpid()}_"
    results: list[tuple[str, tuple[float, dict[str, float], dict[str, float], int]]] = []
    try:
        with psycopg.connect(server, autocommit=True) as admin:
            version = admin.execute("SHOW server_version").fetchone()
            if args.scale:
                print(f"PostgreSQL {version[0] if version else '?'}, {os.cpu_count()} CPUs,"
                      f" --jobs {args.jobs}")
                scale(admin, server, prefix, args.scale, args.jobs)
                return 0
            started = time.perf_counter()
            names = create_fleet(admin, server, prefix, args.databases, args.tables)
            print(f"PostgreSQL {version[0] if version else '?'}, {os.cpu_count()} CPUs:"
                  f" created {len(names)} databases x {args.tables} tables"
                  f" in {time.perf_counter() - started:.1f} s", flush=True)
            try:
                results.append(("server's own address (same host)",
                                measure(server, names, args)))
                for rtt in rtts:
                    with proxied(server, rtt) as via:
                        results.append((f"TCP, delay proxy +{rtt:g} ms round trip",
                                        measure(via, names, args)))
            finally:
                for name in names:
                    admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(name)))
    finally:
        if server_handle is not None:
            server_handle.cleanup()

    print(f"{args.databases} databases x {args.tables} tables, median of {args.repeat}"
          " interleaved rounds (times, and each round's ratios);"
          f" per-table way: {2 * args.tables} queries per database, selfheal: 1 round trip"
          " (2 for a database whose tables differ from the one before)")
    default = " (default)" if args.jobs == fleet.DEFAULT_JOBS else ""
    print(f"{'network':<36} {'SELECT 1':>9} {'per-table':>10} {'--jobs 1':>16}"
          f" {f'--jobs {args.jobs}{default}':>26} {'floor':>8} {'vs floor':>9}")
    for label, (rtt, times, ratios, _) in results:
        print(f"{label:<36} {rtt * 1000:7.2f}ms {times['per-table']:9.2f}s"
              f" {times['serial']:8.2f}s ({ratios['serial']:4.1f}x)"
              f" {times['parallel']:17.2f}s ({ratios['parallel']:4.1f}x)"
              f" {times['floor']:7.2f}s {ratios['floor']:8.2f}x")
    print(f"drifted sequences found: {results[0][1][3]} by every way")
    print(f"floor: per database, connect and one hand-written query with the {args.tables}"
          f" table and sequence names known, --jobs {args.jobs} at a time")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--proxy":
        run_proxy(sys.argv[2], float(sys.argv[3]))
    else:
        sys.exit(main())
