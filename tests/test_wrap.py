"""HealingConnection: catch primary-key collisions, resync, retry once."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from psycopg import errors as pgerrors
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from structlog.testing import capture_logs

import selfheal
from selfheal import HealingConnection

from .conftest import lock_key, round_trips, seq_next


def make_drifted(conn: psycopg.Connection, behind: int = 12, table: str = "payments") -> None:
    conn.execute(sql.SQL("CREATE TABLE {} (id serial PRIMARY KEY, note text)").format(
        sql.Identifier(table)))
    conn.execute(
        sql.SQL("INSERT INTO {} (id, note) SELECT g, 'seed' FROM generate_series(1, %s) g")
        .format(sql.Identifier(table)),
        (behind,),
    )


@pytest.fixture
def hconn(dsn: str) -> Iterator[HealingConnection]:
    with HealingConnection.connect(dsn, autocommit=True) as c:
        yield c


class TestTransactionStates:
    def test_autocommit(self, conn: psycopg.Connection, hconn: HealingConnection) -> None:
        """In autocommit the collision is healed and the insert retried once."""
        make_drifted(conn)
        with capture_logs() as logs:
            row = hconn.execute("INSERT INTO payments (note) VALUES ('x') RETURNING id").fetchone()
        assert row == (13,)
        assert conn.execute("SELECT count(*) FROM payments").fetchone() == (13,)
        [event] = [e for e in logs if e["event"] == "sequence_resynced"]
        assert (event["table"], event["before"], event["after"], event["retry"]) == (
            "payments", 2, 13, "succeeded")

    def test_implicit_transaction(self, conn: psycopg.Connection, dsn: str) -> None:
        """A statement that opens the transaction is rolled back and retried in a new one."""
        make_drifted(conn)
        with HealingConnection.connect(dsn) as hc:
            row = hc.execute("INSERT INTO payments (note) VALUES ('x') RETURNING id").fetchone()
            assert row == (13,)
            assert hc.info.transaction_status == TransactionStatus.INTRANS
            hc.execute("INSERT INTO payments (note) VALUES ('y')")
            hc.commit()
        assert conn.execute("SELECT count(*) FROM payments").fetchone() == (14,)

    def test_explicit_transaction_keeps_earlier_work(
        self, conn: psycopg.Connection, dsn: str
    ) -> None:
        """Inside a transaction, earlier statements survive the heal and commit."""
        make_drifted(conn)
        conn.execute("CREATE TABLE log (msg text)")
        with HealingConnection.connect(dsn) as hc:
            hc.execute("INSERT INTO log VALUES ('before')")
            hc.execute("UPDATE payments SET note = 'touched' WHERE id = 1")
            row = hc.execute("INSERT INTO payments (note) VALUES ('x') RETURNING id").fetchone()
            assert row == (13,)
            hc.execute("INSERT INTO log VALUES ('after')")
            hc.commit()
        assert conn.execute("SELECT msg FROM log ORDER BY msg").fetchall() == [
            ("after",), ("before",)]
        assert conn.execute("SELECT note FROM payments WHERE id = 1").fetchone() == ("touched",)
        assert conn.execute("SELECT count(*) FROM payments").fetchone() == (13,)

    def test_transaction_block(self, conn: psycopg.Connection, hconn: HealingConnection) -> None:
        """Inside conn.transaction() blocks, nested ones included, the heal keeps the block."""
        make_drifted(conn)
        with hconn.transaction():
            hconn.execute("UPDATE payments SET note = 'outer' WHERE id = 2")
            with hconn.transaction():
                hconn.execute("INSERT INTO payments (note) VALUES ('inner')")
        assert conn.execute(
            "SELECT count(*) FILTER (WHERE note = 'outer'), count(*) FROM payments"
        ).fetchone() == (1, 13)

    def test_repeatable_read(self, conn: psycopg.Connection, dsn: str) -> None:
        """A REPEATABLE READ transaction heals past rows committed after its snapshot."""
        conn.execute("CREATE TABLE payments (id serial PRIMARY KEY, note text)")
        with HealingConnection.connect(dsn) as hc:
            hc.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            assert hc.execute("SELECT count(*) FROM payments").fetchone() == (0,)
            conn.execute("INSERT INTO payments (id) SELECT generate_series(1, 30)")
            row = hc.execute("INSERT INTO payments (note) VALUES ('rr') RETURNING id").fetchone()
            assert row == (31,)
            hc.commit()
        assert conn.execute("SELECT count(*) FROM payments").fetchone() == (31,)

    def test_failed_transaction_not_retried(
        self, conn: psycopg.Connection, dsn: str
    ) -> None:
        """In a transaction that has already failed nothing is retried."""
        make_drifted(conn)
        with HealingConnection.connect(dsn) as hc:
            with pytest.raises(pgerrors.DivisionByZero):
                hc.execute("SELECT 1/0")
            with pytest.raises(pgerrors.InFailedSqlTransaction):
                hc.execute("INSERT INTO payments (note) VALUES ('x')")
            hc.rollback()
        assert seq_next(conn, "public.payments_id_seq") == 1


class TestWhatIsHealed:
    def test_non_pk_unique_untouched(self, conn: psycopg.Connection,
                                     hconn: HealingConnection) -> None:
        """A unique index that is not the key gets the original error; one value drawn."""
        conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text UNIQUE)")
        conn.execute("INSERT INTO users (email) VALUES ('a@example.com')")
        with pytest.raises(pgerrors.UniqueViolation) as info:
            hconn.execute("INSERT INTO users (email) VALUES ('a@example.com')")
        assert info.value.diag.constraint_name == "users_email_key"
        assert seq_next(conn, "public.users_id_seq") == 3
        with round_trips(hconn) as trips, pytest.raises(pgerrors.UniqueViolation):
            hconn.execute("INSERT INTO users (email) VALUES ('a@example.com')")
        assert trips.count == 1  # remembered: no catalog lookup the second time
        assert seq_next(conn, "public.users_id_seq") == 4

    def test_uuid_key(self, conn: psycopg.Connection, hconn: HealingConnection) -> None:
        """A uuid key collision is not a sequence problem: original error."""
        conn.execute("CREATE TABLE docs (id uuid PRIMARY KEY DEFAULT gen_random_uuid())")
        conn.execute("INSERT INTO docs VALUES ('00000000-0000-0000-0000-000000000001')")
        with pytest.raises(pgerrors.UniqueViolation):
            hconn.execute("INSERT INTO docs VALUES ('00000000-0000-0000-0000-000000000001')")
        assert conn.execute("SELECT count(*) FROM docs").fetchone() == (1,)

    def test_composite_key(self, conn: psycopg.Connection, hconn: HealingConnection) -> None:
        """A composite key is left alone."""
        conn.execute("CREATE TABLE pairs (a serial, b int, PRIMARY KEY (a, b))")
        conn.execute("INSERT INTO pairs VALUES (1, 1)")
        with pytest.raises(pgerrors.UniqueViolation):
            hconn.execute("INSERT INTO pairs (b) VALUES (1)")
        assert seq_next(conn, "public.pairs_a_seq") == 2

    def test_identity_quoted_names_other_search_path(
        self, conn: psycopg.Connection, dsn: str
    ) -> None:
        """The schema comes from the error, not the search_path."""
        conn.execute('CREATE SCHEMA "Tenant One"')
        conn.execute(
            'CREATE TABLE "Tenant One"."Order Items"'
            " (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, sku text)"
        )
        conn.execute('CREATE TABLE public."Order Items" (id serial PRIMARY KEY, sku text)')
        conn.execute('INSERT INTO "Tenant One"."Order Items" (id) SELECT generate_series(1, 9)')
        with HealingConnection.connect(dsn, autocommit=True,
                                       options="-c search_path=public") as hc:
            row = hc.execute(
                'INSERT INTO "Tenant One"."Order Items" (sku) VALUES (%s) RETURNING id', ("a",)
            ).fetchone()
        assert row == (10,)
        assert seq_next(conn, 'public."Order Items_id_seq"') == 1

    def test_unowned_sequence_increment_5(self, conn: psycopg.Connection,
                                          hconn: HealingConnection) -> None:
        """A default on a shared sequence with increment 5 heals onto the stride."""
        conn.execute("CREATE SEQUENCE ids INCREMENT 5")
        conn.execute("CREATE TABLE t (id int PRIMARY KEY DEFAULT nextval('ids'), v int)")
        conn.execute("INSERT INTO t (id) VALUES (1), (6), (11), (16)")
        row = hconn.execute("INSERT INTO t (v) VALUES (1) RETURNING id").fetchone()
        assert row == (21,)

    def test_partitioned_table(self, conn: psycopg.Connection, hconn: HealingConnection) -> None:
        """A collision reported on a partition heals the parent's sequence."""
        conn.execute("CREATE TABLE ev (id bigserial PRIMARY KEY, v int) PARTITION BY RANGE (id)")
        conn.execute("CREATE TABLE ev_lo PARTITION OF ev FOR VALUES FROM (1) TO (100)")
        conn.execute("CREATE TABLE ev_hi PARTITION OF ev FOR VALUES FROM (100) TO (10000)")
        conn.execute("INSERT INTO ev (id) SELECT generate_series(1, 150)")
        row = hconn.execute("INSERT INTO ev (v) VALUES (1) RETURNING id").fetchone()
        assert row == (151,)

    def test_trigger_into_drifted_table(self, conn: psycopg.Connection,
                                        hconn: HealingConnection) -> None:
        """A trigger's insert into a drifted table heals that table; the caller's
        statement is the one retried."""
        conn.execute("CREATE TABLE orders (id serial PRIMARY KEY, total int)")
        make_drifted(conn, 20, table="audit")
        conn.execute("""
            CREATE FUNCTION audit_order() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN INSERT INTO audit (note) VALUES ('order ' || NEW.id); RETURN NEW; END $$""")
        conn.execute("CREATE TRIGGER t AFTER INSERT ON orders"
                     " FOR EACH ROW EXECUTE FUNCTION audit_order()")
        with capture_logs() as logs:
            hconn.execute("INSERT INTO orders (total) VALUES (5)")
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (1,)
        assert conn.execute("SELECT count(*), max(id) FROM audit").fetchone() == (21, 21)
        assert [e["table"] for e in logs if e["event"] == "sequence_resynced"] == ["audit"]

    def test_retry_at_most_once(self, conn: psycopg.Connection,
                                hconn: HealingConnection) -> None:
        """A trigger that always forces a duplicate: one heal, one retry, then the error."""
        make_drifted(conn, 5)
        conn.execute("CREATE SEQUENCE attempts")
        conn.execute("""
            CREATE FUNCTION force_dup() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM nextval('attempts'); NEW.id := 1; RETURN NEW; END $$""")
        conn.execute("CREATE TRIGGER t BEFORE INSERT ON payments"
                     " FOR EACH ROW EXECUTE FUNCTION force_dup()")
        with capture_logs() as logs, pytest.raises(pgerrors.UniqueViolation):
            hconn.execute("INSERT INTO payments (note) VALUES ('x')")
        assert conn.execute("SELECT last_value FROM attempts").fetchone() == (2,)
        assert [e["retry"] for e in logs if e["event"] == "sequence_resynced"] == ["failed"]
        assert hconn.execute("SELECT count(*) FROM payments").fetchone() == (5,)

    def test_retry_off(self, conn: psycopg.Connection, dsn: str) -> None:
        """With retry=False the sequence is healed and the error re-raised."""
        make_drifted(conn)
        cls = HealingConnection.with_options(retry=False)
        with cls.connect(dsn, autocommit=True) as hc:
            with pytest.raises(pgerrors.UniqueViolation):
                hc.execute("INSERT INTO payments (note) VALUES ('x')")
            assert seq_next(conn, "public.payments_id_seq") == 13
            hc.execute("INSERT INTO payments (note) VALUES ('x')")
        assert conn.execute("SELECT count(*) FROM payments").fetchone() == (13,)

    def test_explicit_key_not_looped(self, conn: psycopg.Connection,
                                     hconn: HealingConnection) -> None:
        """A duplicate explicit id: nothing to move, one retry, the original error."""
        make_drifted(conn, 3)
        conn.execute("SELECT setval('payments_id_seq', 3)")
        with capture_logs() as logs, pytest.raises(pgerrors.UniqueViolation):
            hconn.execute("INSERT INTO payments (id) VALUES (2)")
        assert [e["event"] for e in logs] == ["sequence_already_in_sync"]
        assert logs[0]["log_level"] == "debug"


class TestExecutemany:
    @pytest.mark.parametrize("autocommit", [True, False])
    @pytest.mark.parametrize("pipeline", [True, False])
    def test_exactly_once(self, conn: psycopg.Connection, dsn: str, autocommit: bool,
                          pipeline: bool, monkeypatch: pytest.MonkeyPatch) -> None:
        """Every row of a batch lands exactly once, with and without libpq pipelines."""
        if not pipeline:
            # Take psycopg's own code path for a libpq older than 14.
            monkeypatch.setattr(psycopg.Pipeline, "is_supported", classmethod(lambda cls: False))
        make_drifted(conn, 10)
        conn.execute("CREATE TABLE earlier (v int)")
        with HealingConnection.connect(dsn, autocommit=autocommit) as hc:
            if not autocommit:
                hc.execute("INSERT INTO earlier VALUES (1)")
            cur = hc.cursor()
            if autocommit and not pipeline:
                # Row by row, each row committed on its own: rows before the
                # collision are in, so the batch is healed and re-raised,
                # never run twice. The caller's next try lands.
                with pytest.raises(pgerrors.UniqueViolation):
                    cur.executemany("INSERT INTO payments (note) VALUES (%s)",
                                    [("row0",)])
            cur.executemany("INSERT INTO payments (note) VALUES (%s)",
                            ((f"row{i}",) for i in range(25)))
            if not autocommit:
                hc.commit()
        notes = conn.execute(
            "SELECT note, count(*) FROM payments WHERE note LIKE 'row%' GROUP BY note"
        ).fetchall()
        assert len(notes) == 25
        assert {n for _, n in notes} == {1}
        assert conn.execute("SELECT count(*), count(DISTINCT id) FROM payments").fetchone() == (
            35, 35)
        assert conn.execute("SELECT count(*) FROM earlier").fetchone() == (
            (0,) if autocommit else (1,))

    def test_returning(self, conn: psycopg.Connection, hconn: HealingConnection) -> None:
        """executemany(returning=True) gives each row's id after a heal."""
        make_drifted(conn, 4)
        cur = hconn.cursor()
        cur.executemany("INSERT INTO payments (note) VALUES (%s) RETURNING id",
                        [("a",), ("b",)], returning=True)
        ids = []
        while True:
            ids.extend(r[0] for r in cur.fetchall())
            if not cur.nextset():
                break
        assert ids == [5, 6]


class TestCursors:
    def test_client_side_binding_cursor(self, conn: psycopg.Connection, dsn: str) -> None:
        """A ClientCursor factory is healed too, with client-side binding kept."""
        make_drifted(conn)
        with HealingConnection.connect(dsn, autocommit=True,
                                       cursor_factory=psycopg.ClientCursor) as hc:
            cur = hc.cursor()
            assert type(cur) is psycopg.ClientCursor
            cur.execute("INSERT INTO payments (note) VALUES (%s) RETURNING id", ("c",))
            assert cur.fetchone() == (13,)
            assert cur.mogrify("SELECT %s", ("x",)) == "SELECT 'x'"

    def test_row_factory(self, conn: psycopg.Connection, dsn: str) -> None:
        """Row factories of the connection or cursor are kept across the retry."""
        make_drifted(conn)
        with HealingConnection.connect(dsn, autocommit=True, row_factory=dict_row) as hc:
            row = hc.execute("INSERT INTO payments (note) VALUES ('d') RETURNING id").fetchone()
            assert row == {"id": 13}

    def test_server_side_cursor(self, conn: psycopg.Connection, dsn: str) -> None:
        """Named (server-side) cursors work unchanged on a healing connection."""
        make_drifted(conn)
        with HealingConnection.connect(dsn) as hc:
            with hc.cursor("reader") as cur:
                cur.execute("SELECT id FROM payments ORDER BY id")
                assert [r[0] for r in cur.fetchmany(3)] == [1, 2, 3]
            row = hc.execute("INSERT INTO payments (note) VALUES ('s') RETURNING id").fetchone()
            assert row == (13,)
            hc.commit()

    def test_copy_heals_and_reraises(self, conn: psycopg.Connection,
                                     hconn: HealingConnection) -> None:
        """COPY is not retried, but the sequence is healed for the next attempt."""
        make_drifted(conn)
        cur = hconn.cursor()
        with pytest.raises(pgerrors.UniqueViolation), \
                cur.copy("COPY payments (note) FROM STDIN") as cp:
            cp.write_row(("copied",))
        assert seq_next(conn, "public.payments_id_seq") == 13
        with cur.copy("COPY payments (note) FROM STDIN") as cp:
            cp.write_row(("copied",))
        assert conn.execute("SELECT count(*) FROM payments").fetchone() == (13,)

    def test_select_in_transaction_heals_on_side(self, conn: psycopg.Connection,
                                                 dsn: str) -> None:
        """An unprotected statement in a transaction heals on a side connection and
        re-raises; the application's next attempt succeeds."""
        make_drifted(conn)
        conn.execute("""CREATE FUNCTION pay() RETURNS int LANGUAGE sql AS
                        'INSERT INTO payments (note) VALUES (''f'') RETURNING id'""")
        with HealingConnection.connect(dsn) as hc:
            hc.execute("SELECT 1")
            with pytest.raises(pgerrors.UniqueViolation):
                hc.execute("SELECT pay()")
            hc.rollback()
            assert hc.execute("SELECT pay()").fetchone() == (13,)
            hc.commit()


class TestSubclassing:
    def test_a_wait_mixin_sees_every_operation(self, conn: psycopg.Connection,
                                               dsn: str) -> None:
        """A connection class mixed in after HealingConnection (instrumentation, say) still
        has its wait() called for every operation, hot path or not: selfheal calls on
        through super(), never straight into psycopg."""
        seen: list[str] = []

        class Counting(psycopg.Connection):  # type: ignore[type-arg]
            def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None
                     ) -> Any:
                seen.append(getattr(gen, "gi_code", None).co_name)  # type: ignore[union-attr]
                return super().wait(gen, interval, timeout)

        class Instrumented(HealingConnection, Counting):  # type: ignore[type-arg, misc]
            pass

        make_drifted(conn)
        with Instrumented.connect(dsn) as hc:
            for _ in range(3):
                hc.execute("SELECT 1")
                hc.execute("INSERT INTO payments (note) VALUES ('m')")
                hc.commit()
        assert seen.count("_execute_gen") >= 6 and seen.count("_commit_gen") >= 3
        assert conn.execute("SELECT count(*) FROM payments").fetchone() == (15,)


class TestCannotHeal:
    def test_privilege_limited_role(self, conn: psycopg.Connection,
                                    make_role: Callable[..., str]) -> None:
        """A role that may insert but not read the table gets the original error,
        and its connection and transaction stay usable."""
        make_drifted(conn)
        conn.execute("CREATE TABLE notes (v text)")
        role_dsn = make_role("GRANT INSERT ON payments, notes TO {role}",
                             "GRANT USAGE ON payments_id_seq TO {role}")
        with HealingConnection.connect(role_dsn, autocommit=True) as hc:
            with capture_logs() as logs, pytest.raises(pgerrors.UniqueViolation):
                hc.execute("INSERT INTO payments (note) VALUES ('x')")
            assert hc.execute("SELECT 1").fetchone() == (1,)
        [event] = [e for e in logs if e["event"] == "sequence_resync_failed"]
        assert event["error_class"] == "PermissionDenied"
        with HealingConnection.connect(role_dsn) as hc:
            hc.execute("INSERT INTO notes VALUES ('lost with the transaction')")
            with pytest.raises(pgerrors.UniqueViolation):
                hc.execute("INSERT INTO payments (note) VALUES ('y')")
            # As with plain psycopg: the failed statement aborted the transaction.
            assert hc.info.transaction_status == TransactionStatus.INERROR
            with pytest.raises(pgerrors.InFailedSqlTransaction):
                hc.execute("INSERT INTO notes VALUES ('refused')")
            hc.commit()
            hc.execute("INSERT INTO notes VALUES ('usable after rollback')")
            hc.commit()
        assert conn.execute("SELECT v FROM notes").fetchall() == [("usable after rollback",)]

    def test_read_only_heal(self, conn: psycopg.Connection, dsn: str) -> None:
        """A heal that lands on a read-only transaction fails cleanly: original error,
        usable connection."""
        make_drifted(conn)
        conn.execute("""CREATE FUNCTION pay() RETURNS int LANGUAGE sql AS
                        'INSERT INTO payments (note) VALUES (''f'') RETURNING id'""")
        conn.execute(sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on")
                     .format(sql.Identifier(conn.info.dbname)))
        with HealingConnection.connect(dsn) as hc:
            hc.read_only = False  # this application's own transactions write
            hc.execute("SELECT 1")
            with capture_logs() as logs, pytest.raises(pgerrors.UniqueViolation):
                hc.execute("SELECT pay()")  # healed on a side connection: read-only
            hc.rollback()
            assert hc.execute("SELECT 1").fetchone() == (1,)
        assert [e["error_class"] for e in logs] == ["ReadOnly"]
        assert seq_next(conn, "public.payments_id_seq") == 2

    def test_lock_timeout(self, conn: psycopg.Connection, dsn: str) -> None:
        """A heal that cannot get its lock in time re-raises the original error."""
        make_drifted(conn)
        key = lock_key(conn, "payments")
        cls = HealingConnection.with_options(lock_timeout=0.2)
        with psycopg.connect(dsn) as holder, cls.connect(dsn, autocommit=True) as hc:
            holder.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
            with capture_logs() as logs, pytest.raises(pgerrors.UniqueViolation) as info:
                hc.execute("INSERT INTO payments (note) VALUES ('x')")
            assert isinstance(info.value.__context__, selfheal.LockTimeout)
            assert [e["error_class"] for e in logs] == ["LockTimeout"]
            holder.rollback()
            hc.execute("INSERT INTO payments (note) VALUES ('x')")


class TestCost:
    def test_hot_path_no_extra_round_trip(self, conn: psycopg.Connection,
                                          hconn: HealingConnection) -> None:
        """A statement that does not fail costs exactly the round trips plain psycopg does."""
        conn.execute("CREATE TABLE t (id serial PRIMARY KEY, v int)")
        hconn.execute("INSERT INTO t (v) VALUES (0)")  # the process learns the table once
        with round_trips(hconn) as trips:
            hconn.execute("INSERT INTO t (v) VALUES (1)")
            hconn.cursor().executemany("INSERT INTO t (v) VALUES (%s)", [(1,), (2,)])
        with round_trips(conn) as plain:
            conn.execute("INSERT INTO t (v) VALUES (1)")
            conn.cursor().executemany("INSERT INTO t (v) VALUES (%s)", [(1,), (2,)])
        assert trips.count == plain.count

    def test_savepoint_in_one_round_trip(self, conn: psycopg.Connection, dsn: str) -> None:
        """Inside a transaction, the savepoint travels with the statement."""
        conn.execute("CREATE TABLE t (id serial PRIMARY KEY, v int)")
        with HealingConnection.connect(dsn) as hc:
            hc.execute("SELECT 1")
            with round_trips(hc) as trips:
                hc.execute("INSERT INTO t (v) VALUES (1)")
            with round_trips(hc) as reads:
                hc.execute("SELECT count(*) FROM t")
            hc.rollback()
        assert trips.count == 1
        assert reads.count == 1


    def test_an_execute_mixin_is_called(self, conn: psycopg.Connection, dsn: str) -> None:
        """A connection class mixed in after HealingConnection with its own execute()
        still has it called by ``conn.execute()``, and the collision still heals."""
        seen: list[str] = []

        class Logging(psycopg.Connection):  # type: ignore[type-arg]
            def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
                seen.append(query)
                return super().execute(query, *args, **kwargs)

        class Logged(HealingConnection, Logging):  # type: ignore[type-arg, misc]
            pass

        class Plain(HealingConnection):  # type: ignore[type-arg]
            pass

        assert Plain._selfheal_own_execute and not Logged._selfheal_own_execute
        make_drifted(conn)
        with Logged.connect(dsn) as hc:
            hc.execute("SELECT 1")
            row = hc.execute("INSERT INTO payments (note) VALUES ('m') RETURNING id").fetchone()
            assert row == (13,)
            hc.commit()
        assert seen == ["SELECT 1", "INSERT INTO payments (note) VALUES ('m') RETURNING id"]


class TestExecuteTellsWait:
    """``conn.execute()`` hands its statement to ``wait()`` (no read of psycopg's
    generator frame): only to the same thread's next wait, never to another's."""

    def test_another_threads_statement_is_not_taken(self, conn: psycopg.Connection,
                                                    hconn: HealingConnection) -> None:
        make_drifted(conn)
        other = hconn.cursor()
        hconn._selfheal_call = (threading.get_ident() + 1, other,
                                "INSERT INTO payments (note) VALUES ('wrong') RETURNING note",
                                None, None)
        cur = hconn.cursor()
        cur.execute("INSERT INTO payments (note) VALUES ('right') RETURNING note")
        assert cur.fetchone() == ("right",)  # healed and retried from its own frame
        assert conn.execute(
            "SELECT array_agg(note) FROM payments WHERE note <> 'seed'").fetchone() == (
            ["right"],)

    def test_nothing_left_behind(self, conn: psycopg.Connection,
                                 hconn: HealingConnection) -> None:
        make_drifted(conn)
        assert hconn.execute("INSERT INTO payments (note) VALUES ('a') RETURNING id"
                             ).fetchone() == (13,)
        assert hconn._selfheal_call is None
        with pytest.raises(pgerrors.UndefinedTable):
            hconn.execute("INSERT INTO nosuch (note) VALUES ('a')")
        assert hconn._selfheal_call is None

    def test_threads_sharing_a_connection(self, conn: psycopg.Connection,
                                          hconn: HealingConnection) -> None:
        """8 threads on one connection, inserts into a table 100 behind: every cursor
        gets its own row back, every row lands once."""
        make_drifted(conn, 100)
        barrier = threading.Barrier(8)

        def writer(i: int) -> None:
            barrier.wait()
            for j in range(25):
                note = f"{i}-{j}"
                row = hconn.execute(
                    "INSERT INTO payments (note) VALUES (%s) RETURNING note", (note,)
                ).fetchone()
                assert row == (note,)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(writer, range(8)))  # raises what a writer raised
        assert conn.execute(
            "SELECT count(*), count(DISTINCT id), count(DISTINCT note) FROM payments"
        ).fetchone() == (300, 300, 201)


class TestConcurrency:
    def test_storm(self, conn: psycopg.Connection, dsn: str) -> None:
        """24 threads x 20 inserts on a table 500 behind: zero errors, one effective heal."""
        make_drifted(conn, 500)
        errors: list[BaseException] = []
        barrier = threading.Barrier(24)

        def writer(i: int) -> None:
            try:
                with HealingConnection.connect(dsn, autocommit=True) as hc:
                    barrier.wait()
                    for j in range(20):
                        hc.execute("INSERT INTO payments (note) VALUES (%s)", (f"{i}-{j}",))
            except BaseException as ex:
                errors.append(ex)

        with capture_logs() as logs:
            threads = [threading.Thread(target=writer, args=(i,)) for i in range(24)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert errors == []
        assert conn.execute(
            "SELECT count(*), count(DISTINCT id), count(DISTINCT note) FROM payments"
        ).fetchone() == (980, 980, 481)
        moved = [e for e in logs if e["event"] == "sequence_resynced"]
        assert len(moved) == 1
        assert all(e["retry"] == "succeeded" for e in logs if "retry" in e)


class TestPool:
    def test_connection_pool(self, conn: psycopg.Connection, dsn: str) -> None:
        """psycopg_pool builds healing connections with connection_class=."""
        from psycopg_pool import ConnectionPool

        make_drifted(conn)
        cls = HealingConnection.with_options(lock_timeout=1.0)
        with ConnectionPool(dsn, connection_class=cls, min_size=2, max_size=4,
                            kwargs={"autocommit": True}) as pool:
            for _ in range(3):
                with pool.connection() as pc:
                    assert isinstance(pc, HealingConnection)
                    assert pc.selfheal_options.lock_timeout == 1.0
                    pc.execute("INSERT INTO payments (note) VALUES ('pooled')")
            with pool.connection() as pc, pc.transaction():
                pc.execute("INSERT INTO payments (note) VALUES ('tx')")
        assert conn.execute("SELECT count(*) FROM payments").fetchone() == (16,)


class TestSavepointFidelity:
    """Inside a transaction the caller's statement runs exactly as on plain psycopg:
    the savepoint travels beside it, never inside it."""

    @pytest.fixture
    def tx(self, conn: psycopg.Connection, dsn: str) -> Iterator[HealingConnection]:
        make_drifted(conn, 12)
        with HealingConnection.connect(dsn) as hc:
            hc.execute("SELECT 1")  # the transaction is open from here on
            yield hc
            hc.rollback()

    def test_cursor_adapters_kept(self, tx: HealingConnection) -> None:
        """Dumpers registered on the cursor bind the values, as without selfheal."""
        class Upper(psycopg.adapt.Dumper):
            oid = psycopg.adapters.types["text"].oid

            def dump(self, obj: str) -> bytes:
                return obj.upper().encode()

        cur = tx.cursor()
        cur.adapters.register_dumper(str, Upper)
        cur.execute("INSERT INTO payments (note) VALUES (%s) RETURNING id, note", ("hello",))
        assert cur.fetchone() == (13, "HELLO")

    def test_one_result_set(self, tx: HealingConnection) -> None:
        """The cursor holds the caller's result only: no savepoint results to step over."""
        cur = tx.execute("INSERT INTO payments (note) VALUES ('a') RETURNING id")
        assert (cur.statusmessage, cur.rowcount, cur.fetchall()) == ("INSERT 0 1", 1, [(13,)])
        assert cur.nextset() is None
        cur = tx.execute("UPDATE payments SET note = 'u' WHERE id <= 5")
        assert (cur.statusmessage, cur.rowcount) == ("UPDATE 5", 5)

    def test_values_kept_exactly(self, tx: HealingConnection) -> None:
        """Quotes, percent signs, backslashes and NULL arrive unchanged."""
        note = "it's 100% \\ done; -- not a comment"
        tx.execute("INSERT INTO payments (note) VALUES (%s)", (note,))
        tx.execute("INSERT INTO payments (note) VALUES (%(n)s)", {"n": None})
        assert tx.execute("SELECT note FROM payments WHERE id > 12 ORDER BY id").fetchall() == [
            (note,), (None,)]

    def test_prepared_statements_still_used(self, tx: HealingConnection) -> None:
        """Statements repeated in a transaction are prepared, as psycopg does by default."""
        for _ in range(6):
            tx.execute("INSERT INTO payments (note) VALUES (%s)", ("p",))
        names = tx.execute("SELECT count(*) FROM pg_prepared_statements"
                           " WHERE statement LIKE 'INSERT INTO payments%%'").fetchone()
        assert names == (1,)

    def test_raw_cursor(self, conn: psycopg.Connection, dsn: str) -> None:
        """Raw ($1) cursors are protected too."""
        make_drifted(conn, 12)
        with HealingConnection.connect(dsn, cursor_factory=psycopg.RawCursor) as hc:
            hc.execute("SELECT 1")
            cur = hc.execute("INSERT INTO payments (note) VALUES ($1) RETURNING id", ("raw",))
            assert cur.fetchone() == (13,)
            hc.commit()

    def test_binary(self, tx: HealingConnection) -> None:
        """binary=True results come back binary after a heal."""
        cur = tx.cursor()
        cur.execute("INSERT INTO payments (note) VALUES (%s) RETURNING id", ("b",), binary=True)
        assert cur.fetchone() == (13,)
        assert cur.pgresult is not None and cur.pgresult.fformat(0) == 1

    def test_caller_savepoints_kept(self, tx: HealingConnection) -> None:
        """The caller's own savepoints survive selfheal's."""
        tx.execute("SAVEPOINT mine")
        tx.execute("INSERT INTO payments (note) VALUES ('inside')")
        tx.execute("ROLLBACK TO SAVEPOINT mine")
        tx.execute("INSERT INTO payments (note) VALUES ('after')")
        assert tx.execute("SELECT note FROM payments WHERE id > 12").fetchall() == [("after",)]


class TestMayDraw:
    @pytest.mark.parametrize(
        ("query", "expected"),
        [
            ("INSERT INTO t VALUES (1)", True),
            ("  -- comment\n /* block */ (WITH x AS (SELECT 1) INSERT INTO t SELECT 1)", True),
            ("update t set a = 1", True),
            ("MERGE INTO t USING s ON true WHEN NOT MATCHED THEN INSERT VALUES (1)", True),
            ("CALL make_payment()", True),
            ("SELECT * FROM t", False),
            ("SAVEPOINT x", False),
            ("COMMIT", False),
            (b"insert into t values (1)", True),
            (sql.SQL("INSERT INTO {} VALUES (1)").format(sql.Identifier("t")), True),
            (sql.SQL("SELECT {}").format(1), False),
            ("", True),
        ],
    )
    def test_first_keyword(self, query: object, expected: bool) -> None:
        """Statements that can draw from a sequence are recognised by their first keyword."""
        from selfheal._attempt import shape

        assert shape(query, None).may_draw is expected
