"""Fault injection: killed backends, timeouts, read-only servers, odd keys, restarts.

Each test asserts that selfheal loses nothing, duplicates nothing, never moves
a sequence backwards and never hangs (pytest-timeout turns a hang into a failure).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import errors as pgerrors
from structlog.testing import capture_logs

import selfheal
from selfheal import AsyncHealingConnection, HealingConnection, _drive

from . import pgctl
from .conftest import lock_key, seq_next
from .test_wrap import make_drifted

pytestmark = pytest.mark.timeout(60)


def wait_for(conn: psycopg.Connection, query: str, timeout: float = 10) -> int:
    """Poll `query` until it returns a row; return its first column."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = conn.execute(query).fetchone()
        if row is not None:
            return int(row[0])
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for: {query}")


class TestKilledBackends:
    def test_healer_killed_mid_heal(self, conn: psycopg.Connection, dsn: str) -> None:
        """The backend is terminated while its heal waits: the caller gets an error,
        nothing is written, and later inserts heal."""
        make_drifted(conn, 30)
        errors: list[BaseException] = []
        with psycopg.connect(dsn) as holder:
            holder.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key(conn, "payments"),))

            def insert() -> None:
                try:
                    with HealingConnection.connect(dsn, autocommit=True,
                                                   application_name="victim") as hc:
                        hc.execute("INSERT INTO payments (note) VALUES ('victim')")
                except BaseException as ex:
                    errors.append(ex)

            t = threading.Thread(target=insert)
            t.start()
            pid = wait_for(conn, "SELECT pid FROM pg_stat_activity WHERE application_name ="
                                 " 'victim' AND wait_event_type = 'Lock'")
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            t.join(20)
            holder.rollback()
        assert len(errors) == 1
        assert isinstance(errors[0], psycopg.Error)
        assert conn.execute("SELECT count(*) FROM payments").fetchone() == (30,)
        with HealingConnection.connect(dsn, autocommit=True) as hc:
            row = hc.execute("INSERT INTO payments (note) VALUES ('later') RETURNING id")
            assert row.fetchone() == (31,)

    @pytest.mark.parametrize("kind", ["sync", "async"])
    async def test_killed_between_heal_steps(self, conn: psycopg.Connection, dsn: str,
                                             kind: str, caplog: pytest.LogCaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
        """The backend is terminated after the heal's lookup, before its pipelined batch:
        the caller gets the collision, as plain psycopg raises it, the connection is
        broken, and nothing is logged that plain psycopg would not log."""
        make_drifted(conn, 10)
        terminated: list[int] = []

        def terminate_first(c: Any, batch: Any) -> bool:
            # Once, before the heal's batch is queued: as if an operator had
            # terminated the backend between two of the heal's round trips.
            if not terminated and "pg_advisory_xact_lock" in repr(batch):
                terminated.append(c.info.backend_pid)
                _kill(conn, terminated[0])
            return opens_alone(c, batch)

        opens_alone = _drive._opens_alone
        monkeypatch.setattr(_drive, "_opens_alone", terminate_first)
        caplog.set_level(logging.DEBUG, logger="psycopg")
        if kind == "sync":
            with HealingConnection.connect(dsn, autocommit=True) as hc:
                with pytest.raises(psycopg.Error) as info:
                    hc.execute("INSERT INTO payments (note) VALUES ('x')")
                broken = hc.broken
        else:
            async with await AsyncHealingConnection.connect(dsn, autocommit=True) as ahc:
                with pytest.raises(psycopg.Error) as info:
                    await ahc.execute("INSERT INTO payments (note) VALUES ('x')")
                broken = ahc.broken
        assert terminated
        assert type(info.value) is pgerrors.UniqueViolation
        assert broken
        assert [r.getMessage() for r in caplog.records if r.name.startswith("psycopg")
                and r.levelno >= logging.WARNING] == []
        assert conn.execute("SELECT count(*) FROM payments").fetchone() == (10,)

    @pytest.mark.parametrize("table", ["new", "known", "drifted"])
    @pytest.mark.parametrize("driver", ["psycopg", "psycopg-async", "psycopg2", "asyncpg"])
    async def test_killed_while_idle(self, conn: psycopg.Connection, dsn: str, driver: str,
                                     table: str) -> None:
        """The backend is terminated while the connection is idle; the next insert fails
        as it does through the plain driver: same error, same message, connection closed.
        On a new connection selfheal's check of the table runs first, and meets the loss."""
        seen = []
        for healing in (False, True):
            conn.execute("DROP TABLE IF EXISTS k")
            conn.execute("CREATE TABLE k (id serial PRIMARY KEY, note text)")
            if table == "drifted":
                conn.execute("INSERT INTO k (id) SELECT generate_series(1, 5)")
            seen.append(await _insert_after_kill(conn, dsn, driver, healing, table == "known"))
        assert seen[0] == seen[1]
        assert seen[0][0] in ("AdminShutdown", "OperationalError", "ConnectionDoesNotExistError")
        assert conn.execute("SELECT count(*) FROM k WHERE note = 'x'").fetchone() == (0,)

    def test_app_killed_mid_retry(self, conn: psycopg.Connection, dsn: str) -> None:
        """The connection dies during the retry: an error, no row written twice."""
        make_drifted(conn, 10)
        conn.execute("CREATE SEQUENCE attempts")
        conn.execute("""
            CREATE FUNCTION slow_second() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
              IF nextval('attempts') = 2 THEN PERFORM pg_sleep(30); END IF;
              RETURN NEW;
            END $$""")
        conn.execute("CREATE TRIGGER t BEFORE INSERT ON payments"
                     " FOR EACH ROW EXECUTE FUNCTION slow_second()")
        errors: list[BaseException] = []

        def insert() -> None:
            try:
                with HealingConnection.connect(dsn, autocommit=True,
                                               application_name="retrying") as hc:
                    hc.execute("INSERT INTO payments (note) VALUES ('once')")
            except BaseException as ex:
                errors.append(ex)

        t = threading.Thread(target=insert)
        t.start()
        pid = wait_for(conn, "SELECT pid FROM pg_stat_activity WHERE application_name ="
                             " 'retrying' AND wait_event = 'PgSleep'")
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        t.join(20)
        assert len(errors) == 1 and isinstance(errors[0], psycopg.OperationalError)
        assert conn.execute("SELECT count(*) FROM payments WHERE note = 'once'").fetchone() == (0,)
        with HealingConnection.connect(dsn, autocommit=True) as hc:
            hc.execute("INSERT INTO payments (note) VALUES ('once')")
        assert conn.execute("SELECT count(*) FROM payments WHERE note = 'once'").fetchone() == (1,)
        assert conn.execute("SELECT count(*), count(DISTINCT id) FROM payments").fetchone() == (
            11, 11)


    def test_killed_in_a_protected_statement(self, conn: psycopg.Connection, dsn: str) -> None:
        """The connection dies while a statement runs under selfheal's savepoint:
        the same error class and connection state as plain psycopg, and no hang."""
        conn.execute("CREATE TABLE lost (id serial PRIMARY KEY, v int)")
        seen = []
        for cls in (psycopg.Connection, HealingConnection.with_options(protect="always")):
            c = cls.connect(dsn, application_name="killed")
            c.execute("SELECT 1")  # in a transaction: the insert runs under a savepoint
            t = threading.Thread(target=lambda: conn.execute(
                "SELECT pg_terminate_backend(%s)",
                (wait_for(conn, "SELECT pid FROM pg_stat_activity WHERE application_name ="
                                " 'killed' AND wait_event = 'PgSleep'"),)))
            t.start()
            with pytest.raises(psycopg.OperationalError) as info:
                c.execute("INSERT INTO lost (v) SELECT 1 FROM pg_sleep(30)")
            t.join(20)
            seen.append((type(info.value), c.closed, c.broken, c.info.status))
            c.close()
        assert seen[0] == seen[1]
        assert seen[0][0] is pgerrors.AdminShutdown
        assert conn.execute("SELECT count(*) FROM lost").fetchone() == (0,)

class TestTimeouts:
    def test_statement_timeout_while_healing(self, conn: psycopg.Connection, dsn: str) -> None:
        """A heal cut short by statement_timeout re-raises the original error, quickly."""
        make_drifted(conn)
        cls = HealingConnection.with_options(lock_timeout=30, statement_timeout=0.2)
        with psycopg.connect(dsn) as holder, cls.connect(dsn, autocommit=True) as hc:
            holder.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key(conn, "payments"),))
            started = time.monotonic()
            with capture_logs() as logs, pytest.raises(pgerrors.UniqueViolation):
                hc.execute("INSERT INTO payments (note) VALUES ('x')")
            assert time.monotonic() - started < 5
            assert [e["error_class"] for e in logs] == ["ResyncError"]
            assert "statement timeout" in logs[0]["error"]
            holder.rollback()
            assert hc.execute("SELECT 1").fetchone() == (1,)

    def test_long_transaction_holding_the_sequence(self, conn: psycopg.Connection,
                                                   dsn: str) -> None:
        """An open transaction that drew from the sequence does not block a heal."""
        make_drifted(conn)
        with psycopg.connect(dsn) as longtx:
            longtx.execute("SELECT nextval('payments_id_seq')")  # holds it to the end
            with HealingConnection.connect(dsn, autocommit=True) as hc:
                row = hc.execute("INSERT INTO payments (note) VALUES ('x') RETURNING id")
                assert row.fetchone() == (13,)
            longtx.rollback()

    def test_no_deadlock_with_callers_own_lock(self, conn: psycopg.Connection,
                                               dsn: str) -> None:
        """A REPEATABLE READ caller holding ACCESS EXCLUSIVE on the table: the fresh
        read waits at most lock_timeout instead of deadlocking with the caller."""
        make_drifted(conn)
        cls = HealingConnection.with_options(lock_timeout=0.3)
        with cls.connect(dsn) as hc:
            hc.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            hc.execute("LOCK TABLE payments IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            with capture_logs() as logs, pytest.raises(pgerrors.UniqueViolation):
                hc.execute("INSERT INTO payments (note) VALUES ('x')")
            assert time.monotonic() - started < 5
            assert [e["error_class"] for e in logs] == ["LockTimeout"]
            # Aborted, as the failed statement leaves it with plain psycopg.
            with pytest.raises(pgerrors.InFailedSqlTransaction):
                hc.execute("SELECT 1")
            hc.rollback()
            assert hc.execute("SELECT 1").fetchone() == (1,)


class TestCancelled:
    """A task cancelled (a timeout) while selfheal heals leaves the connection as a
    cancelled statement leaves plain psycopg's: idle in autocommit, the next
    statement committed on its own, not inside selfheal's scope."""

    async def test_cancel_during_a_heal(self, conn: psycopg.Connection, dsn: str) -> None:
        import asyncio

        make_drifted(conn, 5)
        seen = []
        for cls in (psycopg.AsyncConnection,
                    selfheal.AsyncHealingConnection.with_options(lock_timeout=10)):
            key = lock_key(conn, "payments")
            with psycopg.connect(dsn) as holder:
                # selfheal's heal waits for the healers' lock; plain psycopg's
                # insert, which does not heal, waits for the table.
                holder.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
                if cls is psycopg.AsyncConnection:
                    holder.execute("LOCK TABLE payments IN SHARE MODE")
                aconn = await cls.connect(dsn, autocommit=True)
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(
                        aconn.execute("INSERT INTO payments (note) VALUES ('cancelled')"), 0.5)
            status = aconn.info.transaction_status
            await aconn.execute("INSERT INTO payments (id, note) VALUES (%s, 'after')",
                                (100 + len(seen),))
            row = conn.execute("SELECT count(*) FROM payments WHERE id = %s",
                               (100 + len(seen),)).fetchone()
            seen.append((status, row))
            await aconn.close()
        assert seen[0] == seen[1] == (psycopg.pq.TransactionStatus.IDLE, (1,))


class TestReadOnly:
    def test_default_transaction_read_only(self, conn: psycopg.Connection, dsn: str) -> None:
        """On a read-only session the caller's own error comes back untouched."""
        make_drifted(conn)
        with HealingConnection.connect(
            dsn, autocommit=True, options="-c default_transaction_read_only=on"
        ) as hc:
            with pytest.raises(pgerrors.ReadOnlySqlTransaction):
                hc.execute("INSERT INTO payments (note) VALUES ('x')")
            assert hc.execute("SELECT 1").fetchone() == (1,)
        with psycopg.connect(dsn, autocommit=True,
                             options="-c default_transaction_read_only=on") as ro, \
                pytest.raises(selfheal.ReadOnly):
            selfheal.resync(ro, "payments")
        assert seq_next(conn, "public.payments_id_seq") == 1

    @pytest.mark.timeout(180)
    def test_hot_standby(self, conn: psycopg.Connection, dsn: str) -> None:
        """On a hot standby: inserts fail with their own error, resync raises ReadOnly,
        check still reports the drift."""
        make_drifted(conn)
        standby = pgctl.start_standby(dsn)
        try:
            deadline = time.monotonic() + 30
            with psycopg.connect(standby.dsn, autocommit=True) as sc:
                while sc.execute("SELECT to_regclass('payments')").fetchone() == (None,):
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
                assert sc.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
                with pytest.raises(selfheal.ReadOnly, match="read-only"):
                    selfheal.resync(sc, "payments")
                [status] = selfheal.check(sc)
                assert (status.table, status.in_sync) == ("payments", False)
            with HealingConnection.connect(standby.dsn, autocommit=True) as hc:
                with pytest.raises(pgerrors.ReadOnlySqlTransaction):
                    hc.execute("INSERT INTO payments (note) VALUES ('x')")
                assert hc.execute("SELECT count(*) FROM payments").fetchone() == (12,)
        finally:
            standby.stop()
        assert seq_next(conn, "public.payments_id_seq") == 1


class TestOddKeys:
    def test_sequence_near_maximum(self, conn: psycopg.Connection, dsn: str) -> None:
        """An integer identity at 2147483640 that cannot pass its keys: clear error,
        the caller's original error, nothing changed."""
        conn.execute("CREATE TABLE t (id int GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY)")
        conn.execute("SELECT setval('t_id_seq', 2147483640)")
        conn.execute("INSERT INTO t VALUES (2147483641), (2147483647)")
        with HealingConnection.connect(dsn, autocommit=True) as hc, capture_logs() as logs, \
                pytest.raises(pgerrors.UniqueViolation):
            hc.execute("INSERT INTO t DEFAULT VALUES")
        [event] = logs
        assert event["error_class"] == "SequenceExhausted"
        assert "MAXVALUE" in event["error"]
        assert seq_next(conn, "public.t_id_seq") == 2147483642
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (2,)

    def test_cache_20_sessions(self, conn: psycopg.Connection, dsn: str) -> None:
        """CACHE 20: values another session pre-allocated are below the keys. A healing
        session drains its own cache when it heals, so every healing insert lands; a
        plain session keeps drawing its stale cached values and collides."""
        conn.execute("CREATE SEQUENCE cached CACHE 20")
        conn.execute("CREATE TABLE t (id int PRIMARY KEY DEFAULT nextval('cached'), who text)")
        with HealingConnection.connect(dsn, autocommit=True) as a, \
                HealingConnection.connect(dsn, autocommit=True) as b, \
                psycopg.connect(dsn, autocommit=True) as plain:
            for s, who in ((a, "a"), (b, "b"), (plain, "plain")):
                s.execute("INSERT INTO t (who) VALUES (%s)", (who,))  # each caches 20
            # An import fills 1..200 around the three rows: every cached value collides.
            conn.execute("INSERT INTO t (id, who) SELECT g, 'import' FROM generate_series(1, 200)"
                         " g WHERE g NOT IN (1, 21, 41)")
            ids = []
            for _ in range(5):
                for s, who in ((a, "a"), (b, "b")):
                    row = s.execute("INSERT INTO t (who) VALUES (%s) RETURNING id", (who,))
                    ids.append(row.fetchone()[0])  # type: ignore[index]
            assert all(i > 200 for i in ids)
            with pytest.raises(pgerrors.UniqueViolation):
                for _ in range(20):
                    plain.execute("INSERT INTO t (who) VALUES ('plain')")
        assert conn.execute("SELECT count(*), count(DISTINCT id) FROM t").fetchone() == (
            210, 210)

    def test_deferrable_primary_key(self, conn: psycopg.Connection, dsn: str) -> None:
        """A deferred key fails at COMMIT: no retry, the original error."""
        conn.execute("CREATE TABLE t (id serial PRIMARY KEY DEFERRABLE INITIALLY DEFERRED)")
        conn.execute("INSERT INTO t SELECT generate_series(1, 5)")
        with HealingConnection.connect(dsn) as hc:
            hc.execute("INSERT INTO t DEFAULT VALUES")
            with pytest.raises(pgerrors.UniqueViolation):
                hc.commit()
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (5,)


class TestRestart:
    @pytest.fixture
    def restarted(self, server_dsn: str) -> Iterator[None]:
        yield
        pgctl.wait_ready(server_dsn)

    @pytest.mark.timeout(120)
    def test_restart_during_storm(self, dsn: str, server_dsn: str,
                                  restarted: None) -> None:
        """The server restarts under 16 writers through a pool: the pool recovers and
        every committed row is unique and accounted for."""
        from psycopg_pool import ConnectionPool

        with psycopg.connect(dsn, autocommit=True) as c:
            make_drifted(c, 300)
            started_at = c.execute("SELECT pg_postmaster_start_time()").fetchone()
        stop = threading.Event()
        done: list[str] = []
        failed: list[str] = []
        lock = threading.Lock()

        with ConnectionPool(dsn, connection_class=HealingConnection, min_size=4, max_size=16,
                            kwargs={"autocommit": True}, check=ConnectionPool.check_connection,
                            reconnect_timeout=60) as pool:

            def writer(i: int) -> None:
                n = 0
                while not stop.is_set():
                    marker = f"w{i}-{n}"
                    n += 1
                    try:
                        with pool.connection(timeout=30) as pc:
                            pc.execute("INSERT INTO payments (note) VALUES (%s)", (marker,))
                        with lock:
                            done.append(marker)
                    except psycopg.Error:
                        with lock:
                            failed.append(marker)
                        time.sleep(0.05)

            threads = [threading.Thread(target=writer, args=(i,)) for i in range(16)]
            for t in threads:
                t.start()
            time.sleep(1.0)
            pgctl.restart(server_dsn)
            time.sleep(1.5)
            stop.set()
            for t in threads:
                t.join(30)
            with pool.connection() as pc:
                pc.execute("INSERT INTO payments (note) VALUES ('after')")

        with psycopg.connect(dsn, autocommit=True) as c:
            assert c.execute("SELECT pg_postmaster_start_time()").fetchone() != started_at
            total, distinct = c.execute(
                "SELECT count(*), count(DISTINCT id) FROM payments").fetchone()  # type: ignore[misc]
            notes = dict(c.execute(
                "SELECT note, count(*) FROM payments WHERE note LIKE 'w%%' GROUP BY note"
            ).fetchall())
        assert total == distinct
        assert all(notes.get(m) == 1 for m in done), "a reported insert is missing or doubled"
        assert all(notes.get(m, 0) <= 1 for m in failed)
        assert len(done) > 100


def _kill(conn: psycopg.Connection, pid: int) -> None:
    conn.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,))


def _seen(ex: BaseException, closed: Any) -> tuple[str, str, bool]:
    return type(ex).__name__, str(ex), bool(closed)


async def _insert_after_kill(conn: psycopg.Connection, dsn: str, driver: str, healing: bool,
                             known: bool) -> tuple[str, str, bool]:
    """Open a connection, terminate its backend, insert: (error class, message, closed)."""
    insert = "INSERT INTO k (note) VALUES ('x') RETURNING id"
    first = "INSERT INTO k (note) VALUES ('a')"
    if driver == "psycopg":
        c = (HealingConnection if healing else psycopg.Connection).connect(dsn, autocommit=True)
        if known:
            c.execute(first)
        _kill(conn, c.info.backend_pid)
        with c, pytest.raises(psycopg.Error) as info:
            c.execute(insert)
        return _seen(info.value, c.closed)
    if driver == "psycopg-async":
        ac = await (AsyncHealingConnection if healing else psycopg.AsyncConnection
                    ).connect(dsn, autocommit=True)
        if known:
            await ac.execute(first)
        _kill(conn, ac.info.backend_pid)
        async with ac:
            with pytest.raises(psycopg.Error) as info:
                await ac.execute(insert)
        return _seen(info.value, ac.closed)
    if driver == "psycopg2":
        import psycopg2

        from selfheal.psycopg2 import HealingConnection as Healing2

        c2 = psycopg2.connect(dsn, connection_factory=Healing2 if healing else None)
        c2.autocommit = True
        cur = c2.cursor()
        if known:
            cur.execute(first)
        _kill(conn, c2.info.backend_pid)
        with pytest.raises(psycopg2.Error) as info2:
            cur.execute(insert)
        seen = _seen(info2.value, c2.closed)
        c2.close()
        return seen
    import asyncpg

    from selfheal.asyncpg import HealingConnection as HealingA

    from .test_asyncpg import connect_args

    a = await asyncpg.connect(**connect_args(dsn), connection_class=HealingA if healing
                              else asyncpg.Connection)
    if known:
        await a.execute(first)
    _kill(conn, a.get_server_pid())
    with pytest.raises(asyncpg.PostgresError) as info3:
        await a.fetchval(insert)
    seen = _seen(info3.value, a.is_closed())
    await a.close()
    return seen
