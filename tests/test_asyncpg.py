"""asyncpg: `selfheal.asyncpg.HealingConnection` heals, and shows what plain asyncpg shows.

The parity harness (`tests.parity`) drives asyncpg through `AsyncpgSession`:
the same random scripts as psycopg 3, plain `asyncpg.Connection` against the
healing class. asyncpg opens no transaction by itself, so a script that runs
outside autocommit is played as a caller writes it with asyncpg: a ``BEGIN``
before the first statement, ``COMMIT`` and ``ROLLBACK`` as SQL; blocks are
``conn.transaction()``. The other tests check heals, transactions, prepared
statements, executemany, COPY, the pool and a storm of writers on a real
server.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import psycopg
import pytest
from structlog.testing import capture_logs

from selfheal import HealOptions
from selfheal.asyncpg import HealingConnection, HealingPreparedStatement, placeholders

from . import parity
from .conftest import lock_key, seq_next
from .parity import ErrorSeen, Execute, Options, Outcome, ResultSet
from .test_parity import dbs  # noqa: F401  (the harness's two databases)
from .test_protect import next_xid, subxact_cache
from .test_wrap import make_drifted

# -- the harness's asyncpg driver -----------------------------------------------------------


def describe(ex: BaseException) -> ErrorSeen:
    return ErrorSeen(
        cls=f"{type(ex).__module__}.{type(ex).__qualname__}",
        sqlstate=getattr(ex, "sqlstate", None),
        message_primary=getattr(ex, "message", None),
        message_detail=getattr(ex, "detail", None),
        schema_name=getattr(ex, "schema_name", None),
        table_name=getattr(ex, "table_name", None),
        constraint_name=getattr(ex, "constraint_name", None),
        text=str(ex),
    )


def dollars(query: str) -> str:
    """A harness query (psycopg's ``%s``) with asyncpg's ``$n`` placeholders."""
    n = iter(range(1, 1000))
    return re.sub(r"%s", lambda _: f"${next(n)}", query).replace("%%", "%")


def connect_args(dsn: str) -> dict[str, Any]:
    """asyncpg's keyword arguments for a libpq conninfo string."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    names = {"dbname": "database"}
    return {names.get(k, k): int(v) if k == "port" else v  # type: ignore[call-overload]
            for k, v in info.items() if k in ("host", "port", "user", "password", "dbname")}


def _rows(records: list[Any]) -> tuple[Any, ...]:
    return parity.normalise([tuple(r) for r in records])


class AsyncpgSession:
    """An asyncpg connection driven by the harness."""

    errors: tuple[type[BaseException], ...] = (asyncpg.PostgresError, asyncpg.InterfaceError)

    def __init__(self, conn: asyncpg.Connection, options: Options) -> None:
        self.conn = conn
        self.options = options
        self._blocks: list[Any] = []
        self._notices: list[str] = []
        conn.add_log_listener(lambda _c, m: self._notices.append(str(m).strip()))

    async def _implicit(self) -> None:
        # What psycopg does outside autocommit, written as an asyncpg caller writes it.
        if not self.options.autocommit and not self.conn.is_in_transaction():
            begin = "BEGIN"
            if self.options.isolation_level:
                begin += " ISOLATION LEVEL " + self.options.isolation_level.replace("_", " ")
            if self.options.read_only:
                begin += " READ ONLY"
            await self.conn.execute(begin)

    async def execute(self, step: Execute) -> Outcome:
        conn = self.conn
        try:
            await self._implicit()
            query = dollars(step.query)
            if step.many is not None:
                if step.returning:
                    rows = await conn.fetchmany(query, list(step.many))
                    return Outcome(results=(ResultSet(None, -1, (), _rows(rows)),))
                await conn.executemany(query, list(step.many))
                return Outcome()
            if step.via == "conn":
                status = await conn.execute(query, *(step.params or ()))
                return Outcome(results=(ResultSet(status, -1, None, None),))
            if step.params is None:
                rows = await conn.fetch(query)
                return Outcome(results=(ResultSet(None, -1, (), _rows(rows)),))
            ps = await conn.prepare(query)
            rows = await ps.fetch(*step.params)
            columns = tuple((a.name, a.type.oid) for a in ps.get_attributes())
            return Outcome(results=(ResultSet(ps.get_statusmsg(), -1, columns, _rows(rows)),))
        except self.errors as ex:
            return Outcome(error=describe(ex))

    async def commit(self) -> None:
        if self.conn.is_in_transaction() and not self._blocks:
            await self.conn.execute("COMMIT")

    async def rollback(self) -> None:
        if self.conn.is_in_transaction() and not self._blocks:
            await self.conn.execute("ROLLBACK")

    def _transaction(self) -> Any:
        o = self.options
        isolation = (o.isolation_level or "").lower() or None
        return self.conn.transaction(isolation=isolation, readonly=o.read_only)

    async def begin(self) -> None:
        tr = self._transaction()
        await tr.start()
        self._blocks.append(tr)

    async def end(self, rollback: bool) -> None:
        tr = self._blocks.pop()
        await (tr.rollback() if rollback else tr.commit())

    async def block(self, body: Callable[[], Awaitable[None]], rollback: bool) -> None:
        tr = self._transaction()
        await tr.start()
        self._blocks.append(tr)
        try:
            await body()
        except BaseException:
            self._blocks.remove(tr)
            await tr.rollback()
            raise
        if tr in self._blocks:
            self._blocks.remove(tr)
            await (tr.rollback() if rollback else tr.commit())

    def open_blocks(self) -> int:
        return len(self._blocks)

    def transaction_status(self) -> str:
        return "INTRANS" if self.conn.is_in_transaction() else "IDLE"

    def take_notices(self) -> tuple[str, ...]:
        taken, self._notices[:] = tuple(self._notices), []
        return taken

    def describe(self, ex: BaseException) -> ErrorSeen:
        return describe(ex)

    async def prepared_statements(self) -> Outcome:
        return Outcome()  # asyncpg's statement cache is its own business

    async def close(self) -> None:
        await self.conn.close()


@dataclass(frozen=True)
class Asyncpg:
    name: str = "asyncpg"
    is_async: bool = True

    async def connect(self, dsn: str, options: Options, healing: bool) -> AsyncpgSession:
        cls: Any = HealingConnection if healing else asyncpg.Connection
        if healing:
            cls = cls.with_options(**parity.heal_options(options))
        conn = await asyncpg.connect(**connect_args(dsn), connection_class=cls)
        return AsyncpgSession(conn, options)


test_random_scripts, test_harness_plain_against_plain = parity.driver_tests(Asyncpg())


# -- heals ----------------------------------------------------------------------------------


@pytest.fixture
def admin(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(dsn, autocommit=True) as c:
        yield c


async def connect(dsn: str, cls: Any = HealingConnection) -> Any:
    return await asyncpg.connect(**connect_args(dsn), connection_class=cls)


def ids(admin: psycopg.Connection[Any], table: str = "payments") -> list[int]:
    return [r[0] for r in admin.execute(f"SELECT id FROM {table} ORDER BY id").fetchall()]


def test_placeholders() -> None:
    from psycopg import sql

    q = sql.SQL("SELECT {} FROM t WHERE a = %(x)s AND b = %(y)s OR a = %(x)s AND c LIKE 'p%%'"
                ).format(sql.Identifier("a b"))
    assert placeholders(q, {"x": 1, "y": "two"}) == (
        "SELECT \"a b\" FROM t WHERE a = $1 AND b = $2 OR a = $1 AND c LIKE 'p%'", (1, "two"))
    assert placeholders("SELECT %s, %s", (1, 2)) == ("SELECT $1, $2", (1, 2))
    assert placeholders("SELECT 1", None) == ("SELECT 1", ())


class TestHeals:
    async def test_autocommit(self, admin: psycopg.Connection[Any], dsn: str) -> None:
        make_drifted(admin, 12)
        conn = await connect(dsn)
        with capture_logs() as logs:
            assert await conn.fetchval(
                "INSERT INTO payments (note) VALUES ($1) RETURNING id", "new") == 13
            assert await conn.execute("INSERT INTO payments (note) VALUES ('simple')") \
                == "INSERT 0 1"
        assert [e["event"] for e in logs] == ["sequence_resynced"]
        assert logs[0]["retry"] == "succeeded" and logs[0]["table"] == "payments"
        assert ids(admin) == list(range(1, 15))
        assert seq_next(admin, "public.payments_id_seq") == 15
        await conn.close()

    @pytest.mark.parametrize("call", ["execute", "execute_args", "fetch", "fetchrow",
                                      "fetchval", "prepared"])
    async def test_inside_a_transaction_keeps_earlier_work(
            self, admin: psycopg.Connection[Any], dsn: str, call: str) -> None:
        admin.execute("CREATE TABLE payments (id serial PRIMARY KEY, note text)")
        admin.execute("CREATE TABLE audit (id serial PRIMARY KEY, what text)")
        conn = await connect(dsn)
        async with conn.transaction():
            await conn.execute("INSERT INTO audit (what) VALUES ('before')")
            await conn.execute("INSERT INTO payments (note) VALUES ('one')")
            admin.execute("INSERT INTO payments (id, note) SELECT g, 'seed' FROM"
                          " generate_series(2, 9) g")
            with capture_logs() as logs:
                q = "INSERT INTO payments (note) VALUES ($1) RETURNING id"
                if call == "execute":
                    got: Any = await conn.execute(
                        "INSERT INTO payments (note) VALUES ('two')")
                    assert got == "INSERT 0 1"
                elif call == "execute_args":
                    got = await conn.execute("INSERT INTO payments (note) VALUES ($1)", "two")
                    assert got == "INSERT 0 1"
                elif call == "fetch":
                    assert [tuple(r) for r in await conn.fetch(q, "two")] == [(10,)]
                elif call == "fetchrow":
                    assert tuple(await conn.fetchrow(q, "two")) == (10,)
                elif call == "fetchval":
                    assert await conn.fetchval(q, "two") == 10
                else:
                    ps = await conn.prepare(q)
                    assert isinstance(ps, HealingPreparedStatement)
                    assert [tuple(r) for r in await ps.fetch("two")] == [(10,)]
                    assert ps.get_statusmsg() == "INSERT 0 1"
            assert [e["retry"] for e in logs] == ["succeeded"]
        assert admin.execute("SELECT what FROM audit").fetchall() == [("before",)]
        assert ids(admin) == list(range(1, 11))
        await conn.close()

    async def test_protected_statement_reads_as_plain(
            self, admin: psycopg.Connection[Any], dsn: str) -> None:
        """Under selfheal's savepoint the results and the errors read as plain asyncpg's:
        status, an error's class, message and position, the aborted transaction after it."""
        admin.execute("CREATE TABLE payments (id serial PRIMARY KEY, note text)")
        seen = []
        for cls in (asyncpg.Connection, HealingConnection.with_options(protect="always")):
            conn = await connect(dsn, cls)
            tr = conn.transaction()
            await tr.start()
            ok = (await conn.execute("INSERT INTO payments (note) VALUES ('a')"),
                  await conn.fetchval("INSERT INTO payments (note) VALUES ($1) RETURNING 1",
                                      "b"))
            failed = []
            for bad in ("INSERT INTO payments (nope) VALUES (1)",
                        "INSERT INTO payments (id) VALUES (1/0)"):
                with pytest.raises(asyncpg.PostgresError) as info:
                    await conn.execute(bad)
                failed.append((type(info.value), str(info.value), info.value.position))
                with pytest.raises(asyncpg.InFailedSQLTransactionError):
                    await conn.execute("INSERT INTO payments (note) VALUES ('c')")
                with pytest.raises(asyncpg.InFailedSQLTransactionError):
                    await conn.fetchval("INSERT INTO payments (note) VALUES ($1) RETURNING 1",
                                        "c")
                await tr.rollback()
                tr = conn.transaction()
                await tr.start()
            await tr.rollback()
            seen.append((ok, failed))
            await conn.close()
        assert seen[0] == seen[1]
        assert seen[0][1][0][0] is asyncpg.UndefinedColumnError

    async def test_natural_key_is_left_alone(self, admin: psycopg.Connection[Any],
                                             dsn: str) -> None:
        admin.execute("CREATE TABLE users (id serial PRIMARY KEY, email text UNIQUE)")
        admin.execute("INSERT INTO users (email) VALUES ('taken')")
        conn = await connect(dsn)
        with capture_logs() as logs:
            async with conn.transaction():
                await conn.execute("SELECT 1")
                with pytest.raises(asyncpg.UniqueViolationError) as info:
                    await conn.execute("INSERT INTO users (email) VALUES ($1)", "taken")
                assert info.value.constraint_name == "users_email_key"
                with pytest.raises(asyncpg.InFailedSQLTransactionError):
                    await conn.execute("SELECT 1")
                with pytest.raises(asyncpg.InFailedSQLTransactionError):
                    await conn.execute("SELECT $1::int", 1)
        assert logs == []
        # The failed insert drew 2; nothing moved.
        assert seq_next(admin, "public.users_id_seq") == 3
        await conn.close()

    async def test_unprotected_collision_heals_aside(self, admin: psycopg.Connection[Any],
                                                     dsn: str) -> None:
        """With savepoints off, a collision in a transaction is healed on a side
        connection and raised, the transaction aborted as plain; the next try works."""
        make_drifted(admin, 4)
        conn = await connect(dsn, HealingConnection.with_options(savepoints=False))
        tr = conn.transaction()
        await tr.start()
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute("INSERT INTO payments (note) VALUES ($1)", "x")
        with pytest.raises(asyncpg.InFailedSQLTransactionError):
            await conn.execute("SELECT 1")
        await tr.rollback()
        assert seq_next(admin, "public.payments_id_seq") >= 5
        async with conn.transaction():
            assert await conn.fetchval(
                "INSERT INTO payments (note) VALUES ($1) RETURNING id", "y") >= 5
        assert len(ids(admin)) == 5
        await conn.close()


class TestCancelled:
    async def test_cancel_during_a_heal(self, admin: psycopg.Connection[Any], dsn: str) -> None:
        """A task cancelled (a timeout) while selfheal heals: the connection is out of any
        transaction, as plain asyncpg's after a cancelled statement, and the next
        statement commits on its own."""
        make_drifted(admin, 5)
        seen = []
        for cls in (asyncpg.Connection, HealingConnection.with_options(lock_timeout=10)):
            key = lock_key(admin, "payments")
            with psycopg.connect(dsn) as holder:
                # selfheal's heal waits for the healers' lock; plain asyncpg's
                # insert, which does not heal, waits for the table.
                holder.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
                if cls is asyncpg.Connection:
                    holder.execute("LOCK TABLE payments IN SHARE MODE")
                conn = await connect(dsn, cls)
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(
                        conn.execute("INSERT INTO payments (note) VALUES ('cancelled')"), 0.5)
            in_transaction = conn.is_in_transaction()
            await conn.execute("INSERT INTO payments (id, note) VALUES ($1, 'after')",
                               100 + len(seen))
            seen.append((in_transaction, ids(admin)[-1]))
            await conn.close()
        assert seen == [(False, 100), (False, 101)]


class TestBatches:
    @pytest.mark.parametrize("in_transaction", [False, True])
    async def test_executemany_lands_every_row_once(self, admin: psycopg.Connection[Any],
                                                    dsn: str, in_transaction: bool) -> None:
        make_drifted(admin, 3)
        conn = await connect(dsn)
        rows = ((f"r{i}",) for i in range(5))  # a generator: used up by a first try
        with capture_logs() as logs:
            if in_transaction:
                async with conn.transaction():
                    await conn.execute("INSERT INTO payments (note) VALUES ('before')")
                    await conn.executemany("INSERT INTO payments (note) VALUES ($1)", rows)
            else:
                await conn.executemany("INSERT INTO payments (note) VALUES ($1)", rows)
        assert [e["retry"] for e in logs if e["event"] == "sequence_resynced"] == ["succeeded"]
        notes = [r[0] for r in admin.execute(
            "SELECT note FROM payments WHERE id > 3 ORDER BY id").fetchall()]
        assert notes == (["before"] if in_transaction else []) + [f"r{i}" for i in range(5)]
        await conn.close()

    async def test_prepared_executemany_and_fetchmany(self, admin: psycopg.Connection[Any],
                                                      dsn: str) -> None:
        make_drifted(admin, 2)
        conn = await connect(dsn)
        ps = await conn.prepare("INSERT INTO payments (note) VALUES ($1) RETURNING id")
        got = await ps.fetchmany(iter([("a",), ("b",)]))
        assert [r[0] for r in got] == [3, 4]
        admin.execute("INSERT INTO payments (id, note) VALUES (5, 'x'), (6, 'x')")
        await ps.executemany(iter([("c",), ("d",)]))
        assert ids(admin) == list(range(1, 9))
        await conn.close()

    @pytest.mark.parametrize("in_transaction", [False, True])
    async def test_copy_heals_and_raises(self, admin: psycopg.Connection[Any], dsn: str,
                                         in_transaction: bool) -> None:
        """A COPY that collides is never run twice: the sequence moves, the error stays."""
        make_drifted(admin, 6)
        admin.execute("SELECT setval('payments_id_seq', 2)")
        conn = await connect(dsn)
        with capture_logs() as logs, pytest.raises(asyncpg.UniqueViolationError):
            if in_transaction:
                async with conn.transaction():
                    await conn.copy_records_to_table(
                        "payments", records=[(3, "dup")], columns=["id", "note"])
            else:
                await conn.copy_records_to_table(
                    "payments", records=[(3, "dup")], columns=["id", "note"])
        assert [e["retry"] for e in logs] == ["not_attempted"]
        assert seq_next(admin, "public.payments_id_seq") == 7
        assert ids(admin) == list(range(1, 7))
        assert await conn.fetchval("INSERT INTO payments (note) VALUES ('n') RETURNING id") == 7
        await conn.close()


class TestPoolAndStorm:
    async def test_pool(self, admin: psycopg.Connection[Any], dsn: str) -> None:
        make_drifted(admin, 8)
        pool = await asyncpg.create_pool(**connect_args(dsn), min_size=1, max_size=2,
                                         connection_class=HealingConnection)
        async with pool.acquire() as conn, conn.transaction():
            assert await conn.fetchval(
                "INSERT INTO payments (note) VALUES ('pooled') RETURNING id") == 9
            facts = conn._selfheal_planner.facts
        epoch = facts.epoch  # the commit had the table's name read (explicit ids)
        # The pool's reset on release (RESET ALL, CLOSE ALL...) is not taken
        # for the caller's DDL: what selfheal knows of the tables stays.
        async with pool.acquire() as conn:
            assert isinstance(conn._con, HealingConnection)
        assert facts.epoch == epoch
        assert await pool.fetchval(
            "INSERT INTO payments (note) VALUES ($1) RETURNING id", "p") == 10
        await pool.close()
        assert ids(admin) == list(range(1, 11))

    async def test_storm_of_writers(self, admin: psycopg.Connection[Any], dsn: str) -> None:
        """24 writers on a table 500 behind, half in autocommit, half in transactions of
        five inserts: zero errors, every row once, one effective heal."""
        make_drifted(admin, 500)
        start = asyncio.Event()

        async def writer(who: int) -> None:
            conn = await connect(dsn)
            await start.wait()
            for i in range(0, 20, 5):
                if who % 2:
                    async with conn.transaction():
                        for k in range(i, i + 5):
                            await conn.execute("INSERT INTO payments (note) VALUES ($1)",
                                               f"{who}-{k}")
                else:
                    for k in range(i, i + 5):
                        await conn.execute("INSERT INTO payments (note) VALUES ($1)",
                                           f"{who}-{k}")
            await conn.close()

        with capture_logs() as logs:
            tasks = [asyncio.create_task(writer(w)) for w in range(24)]
            await asyncio.sleep(0.2)
            start.set()
            await asyncio.gather(*tasks)
        assert admin.execute("SELECT count(*), count(DISTINCT id), count(DISTINCT note)"
                             " FROM payments").fetchone() == (980, 980, 481)
        assert len([e for e in logs if e["event"] == "sequence_resynced"]) == 1
        assert all(e["retry"] == "succeeded" for e in logs if "retry" in e)


class TestProtection:
    """Inside a transaction only tables at risk get a savepoint, and never more than 64."""

    INSERT = "INSERT INTO t (note) VALUES ($1)"

    @pytest.fixture
    def table(self, admin: psycopg.Connection[Any]) -> None:
        # No autovacuum: its ANALYZE would take transaction ids of its own.
        admin.execute("CREATE TABLE t (id serial PRIMARY KEY, note text)"
                      " WITH (autovacuum_enabled = false)")

    async def test_thousand_protected_inserts(self, admin: psycopg.Connection[Any], dsn: str,
                                              table: None, server_version: int) -> None:
        """1,000 protected inserts in one transaction take 64 savepoints, then no more."""
        conn = await connect(dsn, HealingConnection.with_options(protect="always"))
        before = next_xid(admin)
        cache = []
        async with conn.transaction():
            for i in range(1000):
                await conn.execute(self.INSERT, str(i))
            if server_version >= 160000:
                cache.append(subxact_cache(admin, conn.get_server_pid()))
        # The transaction's own id and 64 savepoints'.
        assert next_xid(admin) - before == 1 + 64
        if server_version >= 160000:
            assert cache == [(64, False)]
        assert admin.execute("SELECT count(*) FROM t").fetchone() == (1000,)
        await conn.close()

    async def test_verified_table_takes_no_savepoint(self, admin: psycopg.Connection[Any],
                                                     dsn: str, table: None) -> None:
        """Once `t` is verified in sync, a transaction of 100 inserts sends no savepoint;
        a drift the connection sees (an explicit id) puts them back."""
        conn = await connect(dsn)
        sent: list[str] = []
        conn.add_query_logger(lambda record: sent.append(record.query))
        for _ in range(2):  # one transaction asks for the check, the next runs it
            async with conn.transaction():
                await conn.execute(self.INSERT, "warm")
        sent.clear()
        before = next_xid(admin)
        async with conn.transaction():
            for i in range(100):
                await conn.execute(self.INSERT, str(i))
        assert next_xid(admin) - before == 1
        await asyncio.sleep(0)  # the query loggers run soon after each query
        assert [q for q in sent if "_selfheal" in q] == []
        async with conn.transaction():
            await conn.execute("INSERT INTO t (id, note) VALUES (1000, 'explicit')")
            await conn.execute(self.INSERT, "after")
        await asyncio.sleep(0)
        # The explicit id is looked at (and the sequence moved past it) under
        # savepoints of its own, rolled back (see tests/test_explicit.py); the
        # insert after it is protected until the table is checked again.
        ours = [q for q in sent if "_selfheal" in q]
        assert ours.count("SAVEPOINT _selfheal") == 1
        assert "SAVEPOINT _selfheal_resync" in ours  # the move
        # Left in sync, the table is not at risk: the next check verifies it again.
        for _ in range(2):
            async with conn.transaction():
                await conn.execute(self.INSERT, "again")
        sent.clear()
        async with conn.transaction():
            await conn.execute(self.INSERT, "verified")
        await asyncio.sleep(0)
        assert [q for q in sent if "_selfheal" in q] == []
        # Not looked at ("allow"): the table may be ahead of its sequence, and stays
        # protected however often it is checked.
        conn.selfheal_options = HealOptions(explicit_ids="allow")
        async with conn.transaction():
            await conn.execute("INSERT INTO t (id, note) VALUES (2000, 'explicit')")
        for _ in range(2):
            async with conn.transaction():
                await conn.execute(self.INSERT, "again")
        sent.clear()
        async with conn.transaction():
            await conn.execute(self.INSERT, "at risk")
        await asyncio.sleep(0)
        assert [q for q in sent if "_selfheal" in q] == ["SAVEPOINT _selfheal"]
        await conn.close()
