"""psycopg2: `selfheal.psycopg2.HealingConnection` heals, and shows what plain psycopg2 shows.

The parity harness (`tests.parity`) drives psycopg2 through `Psycopg2Session`:
the same random scripts as psycopg 3, plain `psycopg2.extensions.connection`
against the healing class. The other tests check heals, transactions, cursor
classes, the batch helpers, the pool and a storm of writers on a real server.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import psycopg
import psycopg2
import psycopg2.errors
import psycopg2.extensions as ext
import psycopg2.extras
import psycopg2.pool
import pytest
from structlog.testing import capture_logs

from selfheal.psycopg2 import HealingConnection

from . import parity
from .conftest import seq_next
from .parity import ErrorSeen, Execute, Options, Outcome, ResultSet, Script
from .test_parity import dbs  # noqa: F401  (the harness's two databases)
from .test_protect import subxact_cache, xids_of
from .test_wrap import make_drifted

# -- the harness's psycopg2 driver ----------------------------------------------------------

_STATUS = {ext.TRANSACTION_STATUS_IDLE: "IDLE", ext.TRANSACTION_STATUS_ACTIVE: "ACTIVE",
           ext.TRANSACTION_STATUS_INTRANS: "INTRANS", ext.TRANSACTION_STATUS_INERROR: "INERROR",
           ext.TRANSACTION_STATUS_UNKNOWN: "UNKNOWN"}


def describe(ex: BaseException) -> ErrorSeen:
    diag = getattr(ex, "diag", None)
    return ErrorSeen(
        cls=f"{type(ex).__module__}.{type(ex).__qualname__}",
        sqlstate=getattr(ex, "pgcode", None),
        message_primary=getattr(diag, "message_primary", None),
        message_detail=getattr(diag, "message_detail", None),
        schema_name=getattr(diag, "schema_name", None),
        table_name=getattr(diag, "table_name", None),
        constraint_name=getattr(diag, "constraint_name", None),
        text=str(ex),
    )


def _results(cur: Any) -> tuple[ResultSet, ...]:
    columns = None if cur.description is None else tuple(
        (c.name, c.type_code) for c in cur.description)
    rows = None if columns is None else parity.normalise(
        [tuple(r.values()) if isinstance(r, dict) else tuple(r) for r in cur.fetchall()])
    return (ResultSet(cur.statusmessage, cur.rowcount, columns, rows),)


class Psycopg2Session:
    """A psycopg2 connection driven by the harness. Blocks are ``with conn:``."""

    errors: tuple[type[BaseException], ...] = (psycopg2.Error,)

    def __init__(self, conn: Any, cursor_factory: Any) -> None:
        self.conn = conn
        self.cursor_factory = cursor_factory
        self._blocks = 0
        self._seen = 0

    async def execute(self, step: Execute) -> Outcome:
        cur = self.conn.cursor(cursor_factory=self.cursor_factory)
        try:
            if step.many is not None:
                cur.executemany(step.query, step.many)
            else:
                cur.execute(step.query, step.params)
        except psycopg2.Error as ex:
            after = ResultSet(cur.statusmessage, cur.rowcount, None, None)
            cur.close()
            return Outcome(error=describe(ex), cursor_after_error=after)
        try:
            return Outcome(results=_results(cur))
        finally:
            cur.close()

    async def commit(self) -> None:
        self.conn.commit()

    async def rollback(self) -> None:
        self.conn.rollback()

    async def begin(self) -> None:
        self.conn.__enter__()
        self._blocks += 1

    async def end(self, rollback: bool) -> None:
        self._blocks -= 1
        exc = (RuntimeError, RuntimeError(), None) if rollback else (None, None, None)
        self.conn.__exit__(*exc)

    async def block(self, body: Callable[[], Awaitable[None]], rollback: bool) -> None:
        try:
            with self.conn:
                await body()
                if rollback:
                    raise _Rollback()
        except _Rollback:
            pass

    def open_blocks(self) -> int:
        return self._blocks

    def transaction_status(self) -> str:
        return _STATUS[self.conn.info.transaction_status]

    def take_notices(self) -> tuple[str, ...]:
        notices = list(self.conn.notices)
        taken = tuple(n.strip() for n in notices[self._seen:])
        self._seen = len(notices)
        return taken

    def describe(self, ex: BaseException) -> ErrorSeen:
        return describe(ex)

    async def prepared_statements(self) -> Outcome:
        return Outcome()  # psycopg2 prepares nothing

    async def close(self) -> None:
        self.conn.close()


class _Rollback(Exception):
    """Leaves a ``with conn:`` block, which rolls the transaction back."""


@dataclass(frozen=True)
class Psycopg2:
    name: str = "psycopg2"
    is_async: bool = False

    async def connect(self, dsn: str, options: Options, healing: bool) -> Psycopg2Session:
        factory: Any = HealingConnection if healing else ext.connection
        if healing:
            factory = factory.with_options(**parity.heal_options(options))
        conn = psycopg2.connect(dsn, connection_factory=factory)
        psycopg2.extras.register_uuid(conn_or_curs=conn)  # uuids compare as psycopg's do
        conn.autocommit = options.autocommit
        if options.read_only or options.isolation_level is not None:
            conn.set_session(readonly=options.read_only or None,
                             isolation_level=(options.isolation_level or "").replace("_", " ")
                             or None)
        rows = psycopg2.extras.RealDictCursor if options.rows == "dict" else ext.cursor
        return Psycopg2Session(conn, rows)


def _without_many_returning(script: Script) -> Script:
    """`script` without what psycopg2 cannot run: its executemany() returns no rows."""
    def keep(steps: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(replace(s, steps=keep(s.steps)) if isinstance(s, parity.Block) else s
                     for s in steps if not (isinstance(s, Execute) and s.returning))
    return Script(keep(script.steps), script.options)


test_random_scripts, test_harness_plain_against_plain = parity.driver_tests(
    Psycopg2(), adapt=_without_many_returning)


def test_failed_retry_keeps_the_first_notices(
        dbs: tuple[parity.Database, parity.Database],  # noqa: F811
) -> None:
    """A protected CALL whose retry fails too leaves the notices of one attempt, as plain
    psycopg2 (found by the random scripts: the retry's were added to the first's)."""
    import asyncio

    script = Script((
        Execute("INSERT INTO ledger (note) VALUES (%s)", ("a",)),
        Execute("INSERT INTO ledger (note) VALUES (%s), (%s) RETURNING id, note", ("a", "a")),
        Execute("INSERT INTO ledger (id, note) VALUES (%s, %s)", (7, "a")),
        Execute("CALL batch()"),
    ))
    healed, plain = asyncio.run(parity.run_pair(Psycopg2(), script, *dbs))
    parity.assert_parity(script, healed, plain)
    assert healed.heals["4"]  # the CALL collided and was healed: the case at hand


# -- heals ----------------------------------------------------------------------------------


@pytest.fixture
def admin(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(dsn, autocommit=True) as c:
        yield c


def connect(dsn: str, **kwargs: Any) -> Any:
    autocommit = kwargs.pop("autocommit", False)
    conn = psycopg2.connect(dsn, connection_factory=kwargs.pop("factory", HealingConnection),
                            **kwargs)
    conn.autocommit = autocommit
    return conn


def ids(admin: psycopg.Connection[Any], table: str = "payments") -> list[int]:
    return [r[0] for r in admin.execute(f"SELECT id FROM {table} ORDER BY id").fetchall()]


class TestHeals:
    def test_autocommit(self, admin: psycopg.Connection[Any], dsn: str) -> None:
        make_drifted(admin, 12)
        conn = connect(dsn, autocommit=True)
        with capture_logs() as logs:
            cur = conn.cursor()
            cur.execute("INSERT INTO payments (note) VALUES ('new') RETURNING id")
            assert cur.fetchone() == (13,)
        assert [e["event"] for e in logs] == ["sequence_resynced"]
        assert logs[0]["retry"] == "succeeded" and logs[0]["table"] == "payments"
        assert ids(admin) == list(range(1, 14))
        assert seq_next(admin, "public.payments_id_seq") == 14
        conn.close()

    def test_statement_that_opens_the_transaction(self, admin: psycopg.Connection[Any],
                                                   dsn: str) -> None:
        make_drifted(admin, 5)
        conn = connect(dsn)
        cur = conn.cursor()
        cur.execute("INSERT INTO payments (note) VALUES ('first') RETURNING id")
        assert cur.fetchone() == (6,)
        # psycopg2 still knows the transaction is open: rollback() undoes the insert.
        assert conn.status == ext.STATUS_BEGIN
        conn.rollback()
        assert ids(admin) == [1, 2, 3, 4, 5]
        cur.execute("INSERT INTO payments (note) VALUES ('again') RETURNING id")
        assert cur.fetchone() == (7,)
        conn.commit()
        assert ids(admin) == [1, 2, 3, 4, 5, 7]
        conn.close()

    def test_inside_a_transaction_keeps_earlier_work(self, admin: psycopg.Connection[Any],
                                                     dsn: str) -> None:
        admin.execute("CREATE TABLE payments (id serial PRIMARY KEY, note text)")
        admin.execute("CREATE TABLE audit (id serial PRIMARY KEY, what text)")
        conn = connect(dsn)
        cur = conn.cursor()
        cur.execute("INSERT INTO audit (what) VALUES ('before')")
        cur.execute("INSERT INTO payments (note) VALUES ('one') RETURNING id")
        assert cur.fetchone() == (1,)
        admin.execute("INSERT INTO payments (id, note) SELECT g, 'seed' FROM"
                      " generate_series(2, 9) g")
        cur.execute("INSERT INTO payments (note) VALUES ('two') RETURNING id")
        assert cur.fetchone() == (10,)
        assert cur.query == b"INSERT INTO payments (note) VALUES ('two') RETURNING id"
        conn.commit()
        assert admin.execute("SELECT what FROM audit").fetchall() == [("before",)]
        assert ids(admin) == list(range(1, 11))
        conn.close()

    def test_protected_statement_reads_as_plain(self, admin: psycopg.Connection[Any],
                                                 dsn: str) -> None:
        """Under selfheal's savepoint (one string with the statement), the cursor and the
        errors read as plain psycopg2's: query, rows, status, an error's message and
        position, the aborted transaction after it."""
        admin.execute("CREATE TABLE payments (id serial PRIMARY KEY, note text)")
        seen = []
        for factory in (ext.connection, HealingConnection.with_options(protect="always")):
            conn = connect(dsn, factory=factory)
            cur = conn.cursor()
            cur.execute("SELECT 1")
            cur.execute("INSERT INTO payments (note) VALUES (%s) RETURNING id", ("a",))
            ok = (cur.query, cur.fetchall(), cur.statusmessage, cur.rowcount)
            with pytest.raises(psycopg2.Error) as info:
                cur.execute("INSERT INTO payments (nope) VALUES (%s)", (1,))
            failed = (type(info.value), str(info.value), info.value.diag.statement_position,
                      cur.query, conn.info.transaction_status, list(conn.notices))
            with pytest.raises(psycopg2.errors.InFailedSqlTransaction):
                cur.execute("SELECT 1")
            conn.rollback()
            seen.append((ok[0], ok[2:], failed))
            conn.close()
        assert seen[0] == seen[1]
        assert seen[0][2][0] is psycopg2.errors.UndefinedColumn

    def test_natural_key_is_left_alone(self, admin: psycopg.Connection[Any], dsn: str) -> None:
        admin.execute("CREATE TABLE users (id serial PRIMARY KEY, email text UNIQUE)")
        admin.execute("INSERT INTO users (email) VALUES ('taken')")
        conn = connect(dsn)
        cur = conn.cursor()
        cur.execute("SELECT 1")
        with pytest.raises(psycopg2.errors.UniqueViolation) as info:
            cur.execute("INSERT INTO users (email) VALUES ('taken')")
        assert info.value.diag.constraint_name == "users_email_key"
        assert conn.info.transaction_status == ext.TRANSACTION_STATUS_INERROR
        with pytest.raises(psycopg2.errors.InFailedSqlTransaction):
            cur.execute("SELECT 1")
        conn.rollback()
        # The failed insert drew 2; nothing moved.
        assert seq_next(admin, "public.users_id_seq") == 3
        conn.close()

    def test_with_block_in_autocommit(self, admin: psycopg.Connection[Any], dsn: str) -> None:
        """psycopg2 opens a transaction for `with conn:` even in autocommit: a heal there
        leaves psycopg2 in step with the server."""
        make_drifted(admin, 3)
        conn = connect(dsn, autocommit=True)
        with conn:
            cur = conn.cursor()
            cur.execute("INSERT INTO payments (note) VALUES ('in block') RETURNING id")
            assert cur.fetchone() == (4,)
            cur.execute("INSERT INTO payments (note) VALUES ('second') RETURNING id")
            assert cur.fetchone() == (5,)
        assert conn.info.transaction_status == ext.TRANSACTION_STATUS_IDLE
        assert ids(admin) == [1, 2, 3, 4, 5]
        assert conn.notices == []
        conn.close()

    def test_cursor_classes(self, admin: psycopg.Connection[Any], dsn: str) -> None:
        class Mine(psycopg2.extras.DictCursor):
            pass

        make_drifted(admin, 1)
        expected = {psycopg2.extras.DictCursor: [7], psycopg2.extras.RealDictCursor: {"id": 7},
                    psycopg2.extras.NamedTupleCursor: (7,), Mine: [7], ext.cursor: (7,)}
        for i, (factory, row) in enumerate(expected.items()):
            admin.execute("DELETE FROM payments WHERE id > 1")
            admin.execute("SELECT setval('payments_id_seq', 1, false)")
            admin.execute("INSERT INTO payments (id, note) SELECT g, 'seed' FROM"
                          " generate_series(2, 6) g")
            conn = connect(dsn, autocommit=True, cursor_factory=factory if i % 2 else None)
            cur = conn.cursor(cursor_factory=None if i % 2 else factory)
            assert isinstance(cur, factory)
            cur.execute("INSERT INTO payments (note) VALUES ('x') RETURNING id")
            got = cur.fetchone()
            assert (dict(got) if factory is psycopg2.extras.RealDictCursor else
                    list(got) if isinstance(row, list) else tuple(got)) == row, factory
            conn.close()

    def test_named_cursor_runs_as_it_is(self, admin: psycopg.Connection[Any], dsn: str) -> None:
        make_drifted(admin, 3)
        conn = connect(dsn)
        cur = conn.cursor("reader")
        cur.execute("SELECT id FROM payments ORDER BY id")
        assert [r[0] for r in cur.fetchall()] == [1, 2, 3]
        conn.close()


class TestSubtransactionsBounded:
    def test_thousand_protected_inserts(self, admin: psycopg.Connection[Any], dsn: str,
                                        server_version: int) -> None:
        """1,000 protected inserts in one transaction take 64 savepoints, then no more."""
        # No autovacuum: its ANALYZE would take transaction ids of its own.
        admin.execute("CREATE TABLE t (id serial PRIMARY KEY, note text)"
                      " WITH (autovacuum_enabled = false)")
        conn = connect(dsn, factory=HealingConnection.with_options(protect="always"))
        cur = conn.cursor()
        cache = []

        def run() -> None:
            for i in range(1000):
                cur.execute("INSERT INTO t (note) VALUES (%s)", (str(i),))
            if server_version >= 160000:
                cache.append(subxact_cache(admin, conn.get_backend_pid()))
            conn.commit()

        # The transaction's own id and 64 savepoints' (the first insert
        # opens the transaction and needs none).
        assert xids_of(admin, run) == 1 + 64
        if server_version >= 160000:
            assert cache == [(64, False)]
        assert admin.execute("SELECT count(*) FROM t").fetchone() == (1000,)
        conn.close()


class TestBatches:
    @pytest.mark.parametrize("autocommit", [False, True])
    def test_execute_values(self, admin: psycopg.Connection[Any], dsn: str,
                            autocommit: bool) -> None:
        """Every row exactly once, in a transaction and in autocommit, while the table
        drifts between pages."""
        make_drifted(admin, 4)
        conn = connect(dsn, autocommit=autocommit)
        cur = conn.cursor()
        psycopg2.extras.execute_values(cur, "INSERT INTO payments (note) VALUES %s",
                                       [(f"v{i}",) for i in range(10)], page_size=4)
        if not autocommit:
            conn.commit()  # the drift below would wait for the rows otherwise
        admin.execute("INSERT INTO payments (id, note) SELECT max(id) + g, 'seed' FROM"
                      " payments, generate_series(1, 3) g GROUP BY g")
        psycopg2.extras.execute_values(cur, "INSERT INTO payments (note) VALUES %s",
                                       [(f"w{i}",) for i in range(10)], page_size=4)
        if not autocommit:
            conn.commit()
        notes = "SELECT note FROM payments WHERE note <> 'seed' ORDER BY id"
        assert [r[0] for r in admin.execute(notes)] == [
            *(f"v{i}" for i in range(10)), *(f"w{i}" for i in range(10))]
        assert admin.execute("SELECT count(*) = count(DISTINCT id) FROM payments"
                             ).fetchone() == (True,)
        conn.close()

    @pytest.mark.parametrize("autocommit", [False, True])
    def test_execute_batch(self, admin: psycopg.Connection[Any], dsn: str,
                           autocommit: bool) -> None:
        """Pages of several statements in one string: a page that collides is healed and
        run again (it ran all or nothing), so every row lands exactly once."""
        make_drifted(admin, 4)
        conn = connect(dsn, autocommit=autocommit)
        cur = conn.cursor()
        with capture_logs() as logs:
            psycopg2.extras.execute_batch(cur, "INSERT INTO payments (note) VALUES (%s)",
                                          [(f"b{i}",) for i in range(10)], page_size=4)
        if not autocommit:
            conn.commit()
        assert [e["retry"] for e in logs if e["event"] == "sequence_resynced"] == ["succeeded"]
        assert [r[0] for r in admin.execute(
            "SELECT note FROM payments WHERE note <> 'seed' ORDER BY id")] == [
            f"b{i}" for i in range(10)]
        assert admin.execute("SELECT count(*) = count(DISTINCT id) FROM payments"
                             ).fetchone() == (True,)
        conn.close()

    def test_executemany_in_a_transaction(self, admin: psycopg.Connection[Any],
                                          dsn: str) -> None:
        make_drifted(admin, 6)
        conn = connect(dsn)
        cur = conn.cursor()
        cur.execute("SELECT 1")
        cur.executemany("INSERT INTO payments (note) VALUES (%s)", [("a",), ("b",), ("c",)])
        conn.commit()
        assert admin.execute("SELECT note FROM payments WHERE id > 6 ORDER BY id").fetchall(
            ) == [("a",), ("b",), ("c",)]
        conn.close()

    def test_executemany_in_autocommit_heals_and_raises(self, admin: psycopg.Connection[Any],
                                                        dsn: str) -> None:
        """Row by row in autocommit, as plain psycopg2: rows before the collision are in;
        it is never run twice, and the next attempt succeeds."""
        make_drifted(admin, 2)
        admin.execute("SELECT setval('payments_id_seq', 1, false)")
        admin.execute("DELETE FROM payments WHERE id = 1")
        conn = connect(dsn, autocommit=True)
        cur = conn.cursor()
        with pytest.raises(psycopg2.errors.UniqueViolation):
            cur.executemany("INSERT INTO payments (note) VALUES (%s)", [("a",), ("b",)])
        assert admin.execute("SELECT note FROM payments WHERE note <> 'seed'").fetchall() == [
            ("a",)]
        cur.executemany("INSERT INTO payments (note) VALUES (%s)", [("c",), ("d",)])
        assert admin.execute("SELECT note FROM payments WHERE note <> 'seed' ORDER BY id"
                             ).fetchall() == [("a",), ("c",), ("d",)]
        conn.close()


class TestPoolAndStorm:
    def test_pool(self, admin: psycopg.Connection[Any], dsn: str) -> None:
        make_drifted(admin, 8)
        pool = psycopg2.pool.ThreadedConnectionPool(1, 2, dsn,
                                                    connection_factory=HealingConnection)
        conn = pool.getconn()
        assert isinstance(conn, HealingConnection)
        cur = conn.cursor()
        cur.execute("INSERT INTO payments (note) VALUES ('pooled') RETURNING id")
        assert cur.fetchone() == (9,)
        conn.commit()
        pool.putconn(conn)
        pool.closeall()

    def test_storm_of_writers(self, admin: psycopg.Connection[Any], dsn: str) -> None:
        """24 writers on a table 500 behind, half in autocommit, half in transactions of
        five inserts: zero errors, every row once, one effective heal."""
        make_drifted(admin, 500)
        errors: list[BaseException] = []
        start = threading.Barrier(24)

        def writer(who: int) -> None:
            try:
                conn = connect(dsn, autocommit=who % 2 == 0)
                cur = conn.cursor()
                start.wait()
                for i in range(20):
                    cur.execute("INSERT INTO payments (note) VALUES (%s)", (f"{who}-{i}",))
                    if who % 2 and i % 5 == 4:
                        conn.commit()
                conn.close()
            except BaseException as ex:  # reported below
                errors.append(ex)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(24)]
        with capture_logs() as logs:
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        assert errors == []
        assert admin.execute("SELECT count(*), count(DISTINCT id), count(DISTINCT note)"
                             " FROM payments").fetchone() == (980, 980, 481)
        assert len([e for e in logs if e["event"] == "sequence_resynced"]) == 1
        assert all(e["retry"] == "succeeded" for e in logs if "retry" in e)
