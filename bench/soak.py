"""
Soak: many writers through healing connections while chaos keeps breaking things.

    python bench/soak.py [--dsn DSN] [--driver psycopg|psycopg-async|psycopg2|asyncpg]
                         [--transaction] [--writers 32] [--duration 120]

N writers insert rows with a unique marker through healing connections:
a psycopg_pool of `selfheal.HealingConnection` (the default) or of
`selfheal.AsyncHealingConnection` (N asyncio tasks), a
`psycopg2.pool.ThreadedConnectionPool` of `selfheal.psycopg2.HealingConnection`,
or an asyncpg pool of `selfheal.asyncpg.HealingConnection`. Each writes one
autocommit insert at a time, or with --transaction a transaction of a SELECT
and two inserts (so both run inside it, under selfheal's protection). A chaos
thread keeps moving the sequence backwards, inserts rows with explicit ids
ahead of it, and now and then terminates a writer's backend. At the end every
marker is counted: a marker whose insert reported success must be in the
table exactly once (else "lost"), and no marker may be there twice
("duplicates"). Not part of `make test`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import random
import statistics
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import structlog
from psycopg_pool import ConnectionPool

from selfheal import HealingConnection

events: collections.Counter[str] = collections.Counter()
events_lock = threading.Lock()


def count_events(logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    with events_lock:
        events[event_dict["event"]] += 1
        if "error_class" in event_dict:
            events["failed:" + event_dict["error_class"]] += 1
        if event_dict.get("retry") == "failed":
            events["retry_failed"] += 1
    raise structlog.DropEvent


def chaos(dsn: str, stop: threading.Event, interval: float, kill_every: float,
          stats: collections.Counter[str]) -> None:
    rng = random.Random(7)
    next_kill = time.monotonic() + kill_every
    with psycopg.connect(dsn, autocommit=True, application_name="soak-chaos") as c:
        while not stop.wait(interval * rng.uniform(0.5, 1.5)):
            if rng.random() < 0.5:
                c.execute("SELECT setval('soak_id_seq', greatest(1, last_value - %s))"
                          " FROM soak_id_seq", (rng.randint(50, 500),))
                stats["chaos_setval_backwards"] += 1
            else:
                c.execute(
                    "INSERT INTO soak (id, marker) SELECT last_value + g, 'chaos'"
                    " FROM soak_id_seq, generate_series(1, %s) g ON CONFLICT DO NOTHING",
                    (rng.randint(5, 200),),
                )
                stats["chaos_explicit_inserts"] += 1
            if time.monotonic() >= next_kill:
                next_kill += kill_every
                row = c.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = 'soak-writer'"
                    " ORDER BY random() LIMIT 1").fetchone()
                if row:
                    c.execute("SELECT pg_terminate_backend(%s)", row)
                    stats["chaos_backends_killed"] += 1


class _Counting(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith("psycopg.pool"):
            self.messages[str(record.msg)] += 1


class Tally:
    """What the writers saw: the id each marker got, and each failure."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.attempted = 0
        self.succeeded: dict[str, int] = {}
        self.failed: collections.Counter[str] = collections.Counter()
        self.failed_markers: list[str] = []
        self.latencies: list[float] = []

    def done(self, landed: dict[str, int], started: float) -> None:
        elapsed = time.perf_counter() - started
        with self.lock:
            self.attempted += 1
            self.succeeded.update(landed)
            self.latencies.append(elapsed)

    def fail(self, ex: BaseException, markers: list[str], landed: dict[str, int],
             transaction: bool) -> None:
        """An attempt that raised: in autocommit, the rows written before it stay."""
        with self.lock:
            self.attempted += 1
            self.failed[type(ex).__name__] += 1
            if not transaction:
                self.succeeded.update(landed)
            self.failed_markers.extend(m for m in markers if transaction or m not in landed)


def _markers(i: int, n: int, transaction: bool) -> list[str]:
    return [f"w{i}-{n}", f"w{i}-{n}b"] if transaction else [f"w{i}-{n}"]


#: One attempt: insert `markers`, noting in `landed` the id each one got.
Attempt = Callable[[list[str], dict[str, int]], None]
AsyncAttempt = Callable[[list[str], dict[str, int]], Awaitable[None]]


def _loop(i: int, attempt: Attempt, errors: tuple[type[BaseException], ...],
          args: argparse.Namespace, stop: threading.Event, tally: Tally) -> None:
    """Writer `i`: attempts until `stop`, each tallied."""
    n = 0
    while not stop.is_set():
        markers = _markers(i, n, args.transaction)
        n += 1
        started = time.perf_counter()
        landed: dict[str, int] = {}
        try:
            attempt(markers, landed)
            tally.done(landed, started)
        except errors as ex:
            tally.fail(ex, markers, landed, args.transaction)


async def _aloop(i: int, attempt: AsyncAttempt, errors: tuple[type[BaseException], ...],
                 args: argparse.Namespace, stop: threading.Event, tally: Tally) -> None:
    """The async twin of `_loop`."""
    n = 0
    while not stop.is_set():
        markers = _markers(i, n, args.transaction)
        n += 1
        started = time.perf_counter()
        landed: dict[str, int] = {}
        try:
            await attempt(markers, landed)
            tally.done(landed, started)
        except errors as ex:
            tally.fail(ex, markers, landed, args.transaction)


def _run_threads(attempt: Attempt, errors: tuple[type[BaseException], ...],
                 args: argparse.Namespace, stop: threading.Event, tally: Tally) -> None:
    threads = [threading.Thread(target=_loop, args=(i, attempt, errors, args, stop, tally))
               for i in range(args.writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


INSERT = "INSERT INTO soak (marker) VALUES (%s) RETURNING id"


def psycopg_writers(dsn: str, args: argparse.Namespace, stop: threading.Event,
                    tally: Tally) -> None:
    with ConnectionPool(dsn, connection_class=HealingConnection, min_size=args.writers,
                        max_size=args.writers, check=ConnectionPool.check_connection,
                        kwargs={"autocommit": not args.transaction,
                                "application_name": "soak-writer"}) as pool:

        def attempt(markers: list[str], landed: dict[str, int]) -> None:
            with pool.connection(timeout=30) as pc:  # commits, or rolls back
                if args.transaction:
                    pc.execute("SELECT 1")
                for m in markers:
                    row = pc.execute(INSERT, (m,)).fetchone()
                    landed[m] = row[0] if row else -1

        _run_threads(attempt, (psycopg.Error,), args, stop, tally)


def psycopg_async_writers(dsn: str, args: argparse.Namespace, stop: threading.Event,
                          tally: Tally) -> None:
    import asyncio

    from psycopg_pool import AsyncConnectionPool

    from selfheal import AsyncHealingConnection

    async def main() -> None:
        async with AsyncConnectionPool(
                dsn, connection_class=AsyncHealingConnection, min_size=args.writers,
                max_size=args.writers, check=AsyncConnectionPool.check_connection,
                kwargs={"autocommit": not args.transaction,
                        "application_name": "soak-writer"}) as pool:

            async def attempt(markers: list[str], landed: dict[str, int]) -> None:
                async with pool.connection(timeout=30) as pc:
                    if args.transaction:
                        await pc.execute("SELECT 1")
                    for m in markers:
                        row = await (await pc.execute(INSERT, (m,))).fetchone()
                        landed[m] = row[0] if row else -1

            await asyncio.gather(*(_aloop(i, attempt, (psycopg.Error,), args, stop, tally)
                                   for i in range(args.writers)))

    asyncio.run(main())


def psycopg2_writers(dsn: str, args: argparse.Namespace, stop: threading.Event,
                     tally: Tally) -> None:
    import psycopg2
    import psycopg2.pool

    from selfheal.psycopg2 import HealingConnection as Healing2

    pool = psycopg2.pool.ThreadedConnectionPool(
        args.writers, args.writers, dsn, connection_factory=Healing2,
        application_name="soak-writer")

    def attempt(markers: list[str], landed: dict[str, int]) -> None:
        conn = pool.getconn()
        conn.autocommit = not args.transaction
        try:
            with conn.cursor() as cur:
                if args.transaction:
                    cur.execute("SELECT 1")
                for m in markers:
                    cur.execute(INSERT, (m,))
                    landed[m] = cur.fetchone()[0]
            if args.transaction:
                conn.commit()
        except psycopg2.Error:
            if not conn.closed:
                with contextlib.suppress(psycopg2.Error):
                    conn.rollback()
            raise
        finally:
            pool.putconn(conn, close=bool(conn.closed))

    try:
        _run_threads(attempt, (psycopg2.Error,), args, stop, tally)
    finally:
        pool.closeall()


def asyncpg_writers(dsn: str, args: argparse.Namespace, stop: threading.Event,
                    tally: Tally) -> None:
    import asyncio

    import asyncpg

    from selfheal.asyncpg import HealingConnection as HealingA

    failures = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError,
                OSError)
    insert = "INSERT INTO soak (marker) VALUES ($1) RETURNING id"

    async def main() -> None:
        pool = await asyncpg.create_pool(
            dsn, connection_class=HealingA, min_size=args.writers, max_size=args.writers,
            server_settings={"application_name": "soak-writer"})

        async def attempt(markers: list[str], landed: dict[str, int]) -> None:
            async with pool.acquire() as conn:
                if args.transaction:
                    async with conn.transaction():
                        await conn.fetchval("SELECT 1")
                        for m in markers:
                            landed[m] = await conn.fetchval(insert, m)
                else:
                    for m in markers:
                        landed[m] = await conn.fetchval(insert, m)

        await asyncio.gather(*(_aloop(i, attempt, failures, args, stop, tally)
                               for i in range(args.writers)))
        await pool.close()

    asyncio.run(main())


WRITERS = {"psycopg": psycopg_writers, "psycopg-async": psycopg_async_writers,
           "psycopg2": psycopg2_writers, "asyncpg": asyncpg_writers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--dsn")
    parser.add_argument("--driver", choices=sorted(WRITERS), default="psycopg")
    parser.add_argument("--transaction", action="store_true",
                        help="two inserts per transaction, instead of one in autocommit")
    parser.add_argument("--writers", type=int, default=32)
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--chaos-interval", type=float, default=0.2)
    parser.add_argument("--kill-every", type=float, default=3.0)
    args = parser.parse_args()
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)  # killed backends are expected
    # What the driver itself warns about (the pool aside): a terminated backend
    # gives plain psycopg nothing to warn about, so neither may selfheal.
    driver_warnings = _Counting()
    logging.getLogger("psycopg").addHandler(driver_warnings)
    structlog.configure(processors=[count_events],
                        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    dsn = args.dsn
    if not dsn:
        from selfheal._embedded import start_server

        dsn, _server = start_server()  # max_connections 100: fine up to ~90 writers
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS soak")
        c.execute("CREATE TABLE soak (id bigserial PRIMARY KEY, marker text NOT NULL)")

    stop = threading.Event()
    tally = Tally()
    chaos_stats: collections.Counter[str] = collections.Counter()
    writers = threading.Thread(target=WRITERS[args.driver], args=(dsn, args, stop, tally))
    chaos_thread = threading.Thread(
        target=chaos, args=(dsn, stop, args.chaos_interval, args.kill_every, chaos_stats))
    started = time.monotonic()
    writers.start()
    chaos_thread.start()
    time.sleep(args.duration)
    stop.set()
    for t in (writers, chaos_thread):
        t.join()
    wall = time.monotonic() - started

    with psycopg.connect(dsn, autocommit=True) as c:
        rows = c.execute("SELECT marker, count(*), min(id) FROM soak WHERE marker <> 'chaos'"
                         " GROUP BY marker").fetchall()
        total, distinct = c.execute("SELECT count(*), count(DISTINCT id) FROM soak").fetchone() \
            or (0, 0)
    found = {m: (n, i) for m, n, i in rows}
    succeeded = tally.succeeded
    duplicates = sum(1 for n, _ in found.values() if n > 1)
    lost = sum(1 for m in succeeded if m not in found)
    wrong_id = sum(1 for m, i in succeeded.items() if m in found and found[m][1] != i)
    ambiguous_landed = sum(1 for m in tally.failed_markers if m in found)
    lat = sorted(tally.latencies)
    what = "transactions of 2 inserts" if args.transaction else "autocommit inserts"

    print(f"soak: {args.writers} writers, {wall:.0f} s, PostgreSQL via {args.driver}"
          f" HealingConnection pool, {what}")
    attempts = "transactions attempted" if args.transaction else "inserts attempted"
    print(f"  {attempts:<23}{tally.attempted}")
    print(f"  rows succeeded         {len(succeeded)}  ({len(succeeded) / wall:.0f}/s)")
    print(f"  healed (resyncs)       {events['sequence_resynced']}"
          f"  (+{events['sequence_already_in_sync']} found already healed,"
          f" {events['sequence_resync_failed']} failed)")
    by_class = {k.removeprefix("failed:"): v for k, v in events.items() if k[:7] == "failed:"}
    print(f"  heal failures by class {by_class}")
    print(f"  retries that collided  {events['retry_failed']}  (chaos re-broke the sequence"
          " between heal and retry)")
    print(f"  failed with error      {sum(tally.failed.values())}  {dict(tally.failed)}"
          f"  ({ambiguous_landed} rows of them committed before the connection died)")
    print(f"  duplicates found       {duplicates}")
    print(f"  rows lost              {lost}")
    print(f"  wrong id returned      {wrong_id}")
    print(f"  ids unique             {total == distinct} ({total} rows)")
    if lat:
        print(f"  latency p50 / p99      {statistics.median(lat) * 1000:.2f} ms /"
              f" {lat[int(len(lat) * 0.99) - 1] * 1000:.2f} ms")
    print(f"  chaos                  {dict(chaos_stats)}")
    print(f"  driver warnings        {sum(driver_warnings.messages.values())}"
          f"  {dict(driver_warnings.messages)}")


if __name__ == "__main__":
    main()
