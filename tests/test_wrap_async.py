"""AsyncHealingConnection: the asyncio twin of HealingConnection."""

from __future__ import annotations

import ast
import asyncio
import inspect
import textwrap

import psycopg
import pytest
from psycopg import errors as pgerrors
from structlog.testing import capture_logs

from selfheal import AsyncHealingConnection, HealingConnection

from .conftest import seq_next
from .test_wrap import make_drifted


class TestAsyncStates:
    async def test_autocommit(self, conn: psycopg.Connection, dsn: str) -> None:
        """Autocommit: healed and retried once."""
        make_drifted(conn)
        async with await AsyncHealingConnection.connect(dsn, autocommit=True) as ac:
            cur = await ac.execute("INSERT INTO payments (note) VALUES ('a') RETURNING id")
            assert await cur.fetchone() == (13,)

    async def test_implicit_transaction(self, conn: psycopg.Connection, dsn: str) -> None:
        """A statement opening the transaction is rolled back, healed and retried."""
        make_drifted(conn)
        async with await AsyncHealingConnection.connect(dsn) as ac:
            await ac.execute("INSERT INTO payments (note) VALUES ('a')")
            await ac.commit()
        assert conn.execute("SELECT count(*) FROM payments").fetchone() == (13,)

    async def test_explicit_transaction(self, conn: psycopg.Connection, dsn: str) -> None:
        """Earlier statements of the transaction survive the heal."""
        make_drifted(conn)
        conn.execute("CREATE TABLE log (msg text)")
        async with await AsyncHealingConnection.connect(dsn) as ac:
            await ac.execute("INSERT INTO log VALUES ('kept')")
            cur = await ac.execute("INSERT INTO payments (note) VALUES ('a') RETURNING id")
            assert await cur.fetchone() == (13,)
            await ac.commit()
        assert conn.execute("SELECT count(*) FROM log").fetchone() == (1,)

    async def test_non_pk_untouched(self, conn: psycopg.Connection, dsn: str) -> None:
        """A non-key unique violation is the original error; one value drawn."""
        conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text UNIQUE)")
        conn.execute("INSERT INTO users (email) VALUES ('a')")
        async with await AsyncHealingConnection.connect(dsn, autocommit=True) as ac:
            with pytest.raises(pgerrors.UniqueViolation):
                await ac.execute("INSERT INTO users (email) VALUES ('a')")
        assert seq_next(conn, "public.users_id_seq") == 3

    @pytest.mark.parametrize("autocommit", [True, False])
    async def test_executemany_exactly_once(self, conn: psycopg.Connection, dsn: str,
                                            autocommit: bool) -> None:
        """Every row of a batch lands once."""
        make_drifted(conn, 10)
        async with await AsyncHealingConnection.connect(dsn, autocommit=autocommit) as ac:
            if not autocommit:
                await ac.execute("SELECT 1")
            await ac.cursor().executemany(
                "INSERT INTO payments (note) VALUES (%s)", [(f"r{i}",) for i in range(15)])
            await ac.commit()
        assert conn.execute(
            "SELECT count(*), count(DISTINCT note) FROM payments WHERE note LIKE 'r%'"
        ).fetchone() == (15, 15)

    async def test_copy(self, conn: psycopg.Connection, dsn: str) -> None:
        """COPY heals the sequence and re-raises."""
        make_drifted(conn)
        async with await AsyncHealingConnection.connect(dsn, autocommit=True) as ac:
            cur = ac.cursor()
            with pytest.raises(pgerrors.UniqueViolation):
                async with cur.copy("COPY payments (note) FROM STDIN") as cp:
                    await cp.write_row(("c",))
        assert seq_next(conn, "public.payments_id_seq") == 13

    async def test_repeatable_read(self, conn: psycopg.Connection, dsn: str) -> None:
        """REPEATABLE READ heals past rows committed after the snapshot."""
        conn.execute("CREATE TABLE payments (id serial PRIMARY KEY, note text)")
        async with await AsyncHealingConnection.connect(dsn) as ac:
            await ac.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
            await ac.execute("SELECT count(*) FROM payments")
            conn.execute("INSERT INTO payments (id) SELECT generate_series(1, 8)")
            cur = await ac.execute("INSERT INTO payments (note) VALUES ('rr') RETURNING id")
            assert await cur.fetchone() == (9,)
            await ac.commit()


class TestAsyncConcurrency:
    async def test_storm(self, conn: psycopg.Connection, dsn: str) -> None:
        """24 tasks x 20 inserts on a table 500 behind: zero errors, one effective heal."""
        make_drifted(conn, 500)
        conns = [await AsyncHealingConnection.connect(dsn, autocommit=True) for _ in range(24)]

        async def writer(ac: AsyncHealingConnection, i: int) -> None:
            for j in range(20):
                await ac.execute("INSERT INTO payments (note) VALUES (%s)", (f"{i}-{j}",))

        try:
            with capture_logs() as logs:
                await asyncio.gather(*(writer(ac, i) for i, ac in enumerate(conns)))
        finally:
            for ac in conns:
                await ac.close()
        assert conn.execute("SELECT count(*), count(DISTINCT id) FROM payments").fetchone() == (
            980, 980)
        assert len([e for e in logs if e["event"] == "sequence_resynced"]) == 1

    async def test_pool(self, conn: psycopg.Connection, dsn: str) -> None:
        """AsyncConnectionPool builds async healing connections."""
        from psycopg_pool import AsyncConnectionPool

        make_drifted(conn)
        pool = AsyncConnectionPool(dsn, connection_class=AsyncHealingConnection,
                                   min_size=1, max_size=3, open=False,
                                   kwargs={"autocommit": True})
        async with pool, pool.connection() as pc:
            assert isinstance(pc, AsyncHealingConnection)
            await pc.execute("INSERT INTO payments (note) VALUES ('pooled')")
        assert conn.execute("SELECT count(*) FROM payments").fetchone() == (13,)


class TestAsyncExecuteTellsWait:
    async def test_another_tasks_statement_is_not_taken(self, conn: psycopg.Connection,
                                                        dsn: str) -> None:
        """``execute()`` hands its statement to the same task's ``wait()`` only."""
        make_drifted(conn)
        async with await AsyncHealingConnection.connect(dsn, autocommit=True) as ac:
            other = ac.cursor()
            ac._selfheal_call = (
                asyncio.get_running_loop().create_future(), other,
                "INSERT INTO payments (note) VALUES ('wrong') RETURNING note", None, None)
            cur = ac.cursor()
            await cur.execute("INSERT INTO payments (note) VALUES ('right') RETURNING note")
            assert await cur.fetchone() == ("right",)
            assert ac._selfheal_call is not None  # not its own: left alone
            ac._selfheal_call = None
            assert await (await ac.execute("SELECT 1")).fetchone() == (1,)
            assert ac._selfheal_call is None
        assert conn.execute(
            "SELECT array_agg(note) FROM payments WHERE note <> 'seed'").fetchone() == (
            ["right"],)

    async def test_tasks_sharing_a_connection(self, conn: psycopg.Connection,
                                              dsn: str) -> None:
        """8 tasks on one connection, inserts into a table 100 behind: every cursor gets
        its own row back, every row lands once."""
        make_drifted(conn, 100)
        async with await AsyncHealingConnection.connect(dsn, autocommit=True) as ac:

            async def writer(i: int) -> None:
                for j in range(25):
                    note = f"{i}-{j}"
                    cur = await ac.execute(
                        "INSERT INTO payments (note) VALUES (%s) RETURNING note", (note,))
                    assert await cur.fetchone() == (note,)

            await asyncio.gather(*(writer(i) for i in range(8)))
        assert conn.execute(
            "SELECT count(*), count(DISTINCT id), count(DISTINCT note) FROM payments"
        ).fetchone() == (300, 300, 201)


class TestTwins:
    @pytest.mark.parametrize(
        ("sync", "async_"),
        [
            (HealingConnection, AsyncHealingConnection),
        ],
    )
    def test_same_public_methods(self, sync: type, async_: type) -> None:
        """The sync and async classes expose the same public methods and parameters."""
        def public(cls: type) -> dict[str, list[str]]:
            return {
                name: list(inspect.signature(getattr(cls, name)).parameters)
                for name in dir(cls)
                if not name.startswith("_") and callable(getattr(cls, name))
                and name in vars(cls)
            }

        assert public(sync) == public(async_)

    @pytest.mark.parametrize("method", ["execute", "wait", "_selfheal_run"])
    def test_same_code(self, method: str) -> None:
        """What the sync and async classes still write twice (the hot path, and the
        loop that serves `selfheal._shell`'s flows) reads the same but for ``await``."""
        def text(cls: type) -> str:
            source = inspect.getsource(getattr(cls, method))
            for word in ("await ", "async ", "Async", "arun"):
                source = source.replace(word, "" if word != "arun" else "run")
            return ast.dump(ast.parse(textwrap.dedent(source)), include_attributes=False)

        assert text(HealingConnection) == text(AsyncHealingConnection)
