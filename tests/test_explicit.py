"""Explicit ids: a healing connection moves the sequence past keys a statement wrote itself.

`HealOptions(explicit_ids="advance" | "warn" | "allow")` on every driver, checked
on a real server: the sequence after the statement, what a plain client's next
default insert gets, the caller's transaction and locks, the audit event, the
Sentry breadcrumb, and the heal event that names the cause.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg2
import psycopg2.extras
import pytest
import sentry_sdk
from structlog.testing import capture_logs

from selfheal import explicit
from selfheal.wrap import AsyncHealingConnection, HealingConnection

from .conftest import seq_next
from .test_asyncpg import connect_args
from .test_report import Receiver, init_sentry, receiver  # noqa: F401

SECRET = "s3cret-row-value"


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE items (id serial PRIMARY KEY, note text)")
        yield c


@pytest.fixture(autouse=True)
def fresh_throttle(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each test sees its own first event per table.
    monkeypatch.setattr(explicit, "_throttle", explicit.report._Throttle())


def plain_default_insert(dsn: str, table: str = "items") -> int:
    """A default-id insert from a client selfheal does not wrap; its id."""
    with psycopg.connect(dsn, autocommit=True) as plain:
        row = plain.execute(f"INSERT INTO {table} (note) VALUES ('plain') RETURNING id"
                            ).fetchone()  # test-authored names only
    assert row is not None
    return int(row[0])


def explicit_events(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if "explicit" in e["event"]]


class TestPsycopg:
    def test_autocommit_advances_and_reports(self, conn: psycopg.Connection, dsn: str) -> None:
        """A multi-row explicit insert in autocommit moves the sequence past its keys; the
        event names the table, sequence and statement, never the values."""
        with HealingConnection.connect(dsn, autocommit=True) as hc, capture_logs() as logs:
            hc.execute("INSERT INTO items (id, note) VALUES (%s, %s), (%s, 'lit')",
                       (40, SECRET, 41))
        assert seq_next(conn, "public.items_id_seq") == 42
        assert plain_default_insert(dsn) == 42
        [event] = explicit_events(logs)
        assert event["event"] == "explicit_ids_advanced"
        assert event["log_level"] == "warning"
        assert {k: event[k] for k in ("database", "schema", "table", "column", "sequence",
                                      "statement", "before", "after", "method", "behind",
                                      "explicit_ids")} == {
            "database": conn.info.dbname, "schema": "public", "table": "items",
            "column": "id", "sequence": "public.items_id_seq",
            "statement": "INSERT INTO items (id, note) VALUES (%s, %s), (%s, ?)",
            "before": 1, "after": 42, "method": "nextval", "behind": True,
            "explicit_ids": "advance"}
        assert (event["keys_past"], event["first_key_past"], event["last_key_past"]) == (
            2, 40, 41)
        assert SECRET not in repr(logs) and "lit" not in repr(logs)

    def test_in_transaction_keeps_work_and_holds_no_lock(self, conn: psycopg.Connection,
                                                         dsn: str) -> None:
        """Inside a transaction the sequence moves at once, before COMMIT: other clients'
        default inserts succeed meanwhile; no advisory lock is held past the statement and
        the caller's earlier work and later statements are untouched."""
        with HealingConnection.connect(dsn) as hc:
            hc.execute("INSERT INTO items (note) VALUES ('earlier')")
            hc.execute("INSERT INTO items (id, note) VALUES (100, 'explicit')")
            assert hc.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
            locks = conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = %s",
                (hc.info.backend_pid,)).fetchone()
            assert locks == (0,)
            assert seq_next(conn, "public.items_id_seq") == 101
            assert plain_default_insert(dsn) == 101  # another client, before the commit
            hc.execute("INSERT INTO items (note) VALUES ('later')")
            hc.commit()
        assert conn.execute("SELECT id, note FROM items ORDER BY id").fetchall() == [
            (1, "earlier"), (100, "explicit"), (101, "plain"), (102, "later")]

    def test_rolled_back_leaves_a_gap_never_backwards(self, conn: psycopg.Connection,
                                                      dsn: str) -> None:
        with HealingConnection.connect(dsn) as hc:
            hc.execute("INSERT INTO items (id, note) VALUES (500, 'x')")
            hc.rollback()
        assert seq_next(conn, "public.items_id_seq") == 501
        assert plain_default_insert(dsn) == 501
        with HealingConnection.connect(dsn, autocommit=True) as hc:
            hc.execute("INSERT INTO items (id, note) VALUES (7, 'below')")
        assert seq_next(conn, "public.items_id_seq") == 502

    def test_warn_reports_without_moving(self, conn: psycopg.Connection, dsn: str) -> None:
        options = {"explicit_ids": "warn"}
        with HealingConnection.connect(dsn, autocommit=True) as hc, capture_logs() as logs:
            hc.selfheal_options = hc.selfheal_options.__class__(**options)
            hc.execute("INSERT INTO items (id, note) VALUES (10, 'x')")
        assert seq_next(conn, "public.items_id_seq") == 1
        [event] = explicit_events(logs)
        assert (event["event"], event["log_level"], event["behind"], event["next_value"],
                event["key_value"]) == ("explicit_ids_written", "warning", True, 1, 10)

    def test_allow_does_nothing(self, conn: psycopg.Connection, dsn: str,
                                monkeypatch: pytest.MonkeyPatch) -> None:
        calls: list[object] = []
        monkeypatch.setattr(explicit, "settle", lambda *a: calls.append(a))
        Allow = HealingConnection.with_options(explicit_ids="allow")
        with Allow.connect(dsn, autocommit=True) as hc, capture_logs() as logs:
            hc.execute("INSERT INTO items (id, note) VALUES (10, 'x')")
        assert seq_next(conn, "public.items_id_seq") == 1
        assert calls == [] and explicit_events(logs) == []

    def test_bad_option(self) -> None:
        with pytest.raises(ValueError, match="explicit_ids must be one of"):
            HealingConnection.with_options(explicit_ids="fix")

    @pytest.mark.parametrize("autocommit", [True, False])
    def test_default_ids_pay_nothing(self, conn: psycopg.Connection, dsn: str,
                                     monkeypatch: pytest.MonkeyPatch, autocommit: bool) -> None:
        """Default-id statements, and explicit writes below the sequence in autocommit
        aside, never run the explicit-id look (once the table is known)."""
        looks: list[object] = []
        real = explicit.settle
        monkeypatch.setattr(explicit, "settle", lambda *a: looks.append(a) or real(*a))
        with HealingConnection.connect(dsn, autocommit=autocommit) as hc:
            hc.execute("INSERT INTO items (note) VALUES ('warm up')")
            hc.commit()
            looks.clear()
            for i in range(20):
                hc.execute("INSERT INTO items (note) VALUES (%s)", (f"n{i}",))
                hc.execute("SELECT note FROM items WHERE id = %s", (i,))
                hc.execute("UPDATE items SET note = 'u' WHERE id = %s", (i,))
            hc.cursor().executemany("INSERT INTO items (note) VALUES (%s)", [("a",), ("b",)])
            hc.execute("INSERT INTO items DEFAULT VALUES")
            hc.commit()
        assert looks == []
        assert conn.execute("SELECT count(*), max(id) FROM items").fetchone() == (24, 24)

    def test_no_column_list_and_executemany(self, conn: psycopg.Connection, dsn: str) -> None:
        """An INSERT without a column list, and executemany() with explicit ids (in its
        own pipeline), both move the sequence."""
        with HealingConnection.connect(dsn, autocommit=True) as hc:
            hc.execute("INSERT INTO items VALUES (50, 'x')")
            assert seq_next(conn, "public.items_id_seq") == 51
            hc.cursor().executemany("INSERT INTO items (id, note) VALUES (%s, %s)",
                                    [(60, "a"), (61, "b")])
            assert seq_next(conn, "public.items_id_seq") == 62
        with HealingConnection.connect(dsn) as hc:
            hc.cursor().executemany("INSERT INTO items (id, note) VALUES (%s, %s)",
                                    [(70, "a"), (71, "b")])
            assert seq_next(conn, "public.items_id_seq") == 72
            hc.commit()
        assert plain_default_insert(dsn) == 72

    def test_first_statement_of_a_process_in_a_transaction(self, make_db: Any) -> None:
        """A table the process's catalog facts do not know yet (a fresh database, the first
        statement inside a transaction) is looked up and advanced all the same, and so is
        a quoted name in another schema."""
        dsn = make_db()
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute('CREATE SCHEMA "Shop"; CREATE TABLE "Shop"."Line Items"'
                      ' (id bigint GENERATED BY DEFAULT AS IDENTITY (INCREMENT 5) PRIMARY KEY,'
                      ' note text)')
        with HealingConnection.connect(dsn) as hc:
            with hc.transaction():
                hc.execute('INSERT INTO "Shop"."Line Items" (id, note) VALUES (33, %s)',
                           ("x",))
            hc.commit()
        with psycopg.connect(dsn, autocommit=True) as c:
            row = c.execute('INSERT INTO "Shop"."Line Items" (note) VALUES (\'d\')'
                            ' RETURNING id').fetchone()
        assert row == (36,)  # on the sequence's stride (1, 6, ..., 36), past 33

    def test_rate_limited_per_table(self, conn: psycopg.Connection, dsn: str) -> None:
        conn.execute("CREATE TABLE others (id serial PRIMARY KEY)")
        with HealingConnection.connect(dsn, autocommit=True) as hc, capture_logs() as logs:
            for i in range(5):
                hc.execute("INSERT INTO items (id, note) VALUES (%s, 'x')", (100 + i,))
            hc.execute("INSERT INTO others (id) VALUES (9)")
        assert [(e["event"], e["table"]) for e in explicit_events(logs)] == [
            ("explicit_ids_advanced", "items"), ("explicit_ids_advanced", "others")]
        assert seq_next(conn, "public.items_id_seq") == 105  # every one advanced

    def test_never_fails_the_write(self, conn: psycopg.Connection, dsn: str) -> None:
        """A role that may insert but not move the sequence: the write and the caller's
        transaction go on; the event says why nothing moved."""
        conn.execute("DROP ROLE IF EXISTS sh_inserter")
        conn.execute("CREATE ROLE sh_inserter LOGIN PASSWORD 'pw'")
        conn.execute("GRANT INSERT, SELECT ON items TO sh_inserter")
        params = psycopg.conninfo.conninfo_to_dict(dsn)
        params.update(user="sh_inserter", password="pw")
        try:
            with HealingConnection.connect(**params) as hc, capture_logs() as logs:
                hc.execute("INSERT INTO items (id, note) VALUES (8, 'x')")
                hc.execute("INSERT INTO items (id, note) VALUES (9, 'y')")
                hc.commit()
        finally:
            conn.execute("DROP OWNED BY sh_inserter")
            conn.execute("DROP ROLE sh_inserter")
        assert conn.execute("SELECT id FROM items ORDER BY id").fetchall() == [(8,), (9,)]
        [event] = explicit_events(logs)
        assert event["event"] == "explicit_ids_advance_failed"
        assert event["log_level"] == "warning"
        assert seq_next(conn, "public.items_id_seq") == 1

    def test_breadcrumb_not_event(self, conn: psycopg.Connection, dsn: str,
                                  receiver: Receiver) -> None:  # noqa: F811
        init_sentry(receiver)
        with HealingConnection.connect(dsn, autocommit=True) as hc:
            hc.execute("INSERT INTO items (id, note) VALUES (20, %s)", (SECRET,))
        sentry_sdk.capture_message("later error")
        sentry_sdk.get_client().flush(timeout=5)
        [event] = receiver.events
        assert event["message"] == "later error"
        [crumb] = [b for b in event["breadcrumbs"]["values"] if b["category"] == "selfheal"]
        assert crumb["data"]["table"] == "items" and crumb["data"]["after"] == 21
        assert crumb["data"]["statement"] == "INSERT INTO items (id, note) VALUES (?, %s)"
        assert SECRET not in json.dumps(event)

    def test_heal_event_names_the_cause(self, conn: psycopg.Connection, dsn: str) -> None:
        """With "warn", the write is remembered: a later collision's heal event says this
        process saw explicit-id writes to the table, and from which statement."""
        Warn = HealingConnection.with_options(explicit_ids="warn")
        with Warn.connect(dsn, autocommit=True) as hc, capture_logs() as logs:
            hc.execute("INSERT INTO items (id, note) SELECT g, 'seed' FROM"
                       " generate_series(1, 3) g")
            hc.execute("INSERT INTO items (note) VALUES ('collides, healed')")
        [heal] = [e for e in logs if e["event"] == "sequence_resynced"]
        assert heal["explicit_writes_seen"] == 1
        assert heal["explicit_statement"] == (
            "INSERT INTO items (id, note) SELECT g, ? FROM generate_series(?, ?) g")
        assert conn.execute("SELECT max(id) FROM items").fetchone() == (4,)

    @pytest.mark.parametrize("autocommit", [True, False])
    def test_copy(self, conn: psycopg.Connection, dsn: str, autocommit: bool) -> None:
        """COPY FROM with the key column (or all columns) moves the sequence once it ends;
        COPY without the key, and COPY TO, do not look."""
        with HealingConnection.connect(dsn, autocommit=autocommit) as hc:
            hc.execute("INSERT INTO items (note) VALUES ('learn the table')")
            hc.commit()
            with hc.cursor().copy("COPY items (id, note) FROM STDIN") as copy:
                for i in range(100, 200):
                    copy.write_row((i, "copied"))
            assert seq_next(conn, "public.items_id_seq") == 200
            with hc.cursor().copy("COPY items FROM STDIN") as copy:
                copy.write_row((300, "all columns"))
            assert seq_next(conn, "public.items_id_seq") == 301
            with hc.cursor().copy("COPY items (note) FROM STDIN") as copy:
                copy.write_row(("default ids",))
            with hc.cursor().copy("COPY items TO STDOUT") as copy:
                assert len(list(copy.rows())) == 103
            hc.commit()
        assert plain_default_insert(dsn) == 302

    def test_async(self, conn: psycopg.Connection, dsn: str) -> None:
        async def main() -> None:
            async with await AsyncHealingConnection.connect(dsn) as ac:
                await ac.execute("INSERT INTO items (id, note) VALUES (30, 'a')")
                async with ac.cursor() as cur:
                    await cur.executemany("INSERT INTO items (id, note) VALUES (%s, 'b')",
                                          [(31,), (32,)])
                await ac.commit()

        asyncio.run(main())
        assert plain_default_insert(dsn) == 33


class TestPsycopg2:
    @pytest.mark.parametrize("autocommit", [True, False])
    def test_execute_and_batch_helpers(self, conn: psycopg.Connection, dsn: str,
                                       autocommit: bool) -> None:
        from selfheal.psycopg2 import HealingConnection as P2

        pc = psycopg2.connect(dsn, connection_factory=P2)
        try:
            pc.autocommit = autocommit
            cur = pc.cursor(cursor_factory=psycopg2.extras.RealDictCursor)
            cur.execute("INSERT INTO items (id, note) VALUES (%s, %s)", (10, SECRET))
            assert seq_next(conn, "public.items_id_seq") == 11
            psycopg2.extras.execute_values(
                cur, "INSERT INTO items (id, note) VALUES %s", [(20, "a"), (21, "b")])
            assert seq_next(conn, "public.items_id_seq") == 22
            cur.executemany("INSERT INTO items (id, note) VALUES (%s, 'c')", [(30,), (31,)])
            assert seq_next(conn, "public.items_id_seq") == 32
            cur.execute("INSERT INTO items (note) VALUES ('default') RETURNING id")
            assert cur.fetchone() == {"id": 32}
            pc.commit()
        finally:
            pc.close()
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (6,)


    def test_first_statement_of_a_process_in_a_transaction(self, make_db: Any) -> None:
        """A table not known yet, written inside the process's first transaction: looked at
        when that transaction commits."""
        from selfheal.psycopg2 import HealingConnection as P2

        dsn = make_db()
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("CREATE TABLE items (id serial PRIMARY KEY, note text)")
        pc = psycopg2.connect(dsn, connection_factory=P2)
        try:
            pc.cursor().execute("INSERT INTO items (id, note) VALUES (77, 'x')")
            pc.commit()
        finally:
            pc.close()
        assert plain_default_insert(dsn) == 78


    def test_copy(self, conn: psycopg.Connection, dsn: str) -> None:
        import io

        from selfheal.psycopg2 import HealingConnection as P2

        pc = psycopg2.connect(dsn, connection_factory=P2)
        try:
            pc.autocommit = True
            cur = pc.cursor()
            cur.execute("INSERT INTO items (note) VALUES ('learn the table')")
            cur.copy_from(io.StringIO("40\ta\n41\tb\n"), "items", columns=("id", "note"))
            assert seq_next(conn, "public.items_id_seq") == 42
            cur.copy_expert("COPY items FROM STDIN", io.StringIO("50\tc\n"))
            assert seq_next(conn, "public.items_id_seq") == 51
            cur.copy_from(io.StringIO("d\n"), "items", columns=("note",))
        finally:
            pc.close()
        assert plain_default_insert(dsn) == 52


class TestAsyncpg:
    def test_execute_fetch_and_transaction(self, conn: psycopg.Connection, dsn: str) -> None:
        import asyncpg

        from selfheal.asyncpg import HealingConnection as APG

        async def main() -> None:
            ac = await asyncpg.connect(**connect_args(dsn), connection_class=APG)
            try:
                await ac.execute("INSERT INTO items (id, note) VALUES (10, 'a')")
                assert seq_next(conn, "public.items_id_seq") == 11
                await ac.fetch("INSERT INTO items (id, note) VALUES ($1, $2) RETURNING id",
                               20, SECRET)
                assert seq_next(conn, "public.items_id_seq") == 21
                async with ac.transaction():
                    await ac.executemany("INSERT INTO items (id, note) VALUES ($1, 'b')",
                                         [(30,), (31,)])
                    assert seq_next(conn, "public.items_id_seq") == 32
                    ps = await ac.prepare("INSERT INTO items (id, note) VALUES ($1, 'p')")
                    await ps.fetch(40)
                    assert seq_next(conn, "public.items_id_seq") == 41
                assert await ac.fetchval(
                    "INSERT INTO items (note) VALUES ('d') RETURNING id") == 41
            finally:
                await ac.close()

        asyncio.run(main())
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (6,)

    def test_copy_records(self, conn: psycopg.Connection, dsn: str) -> None:
        """copy_records_to_table() with the key column moves the sequence once it ended."""
        import asyncpg

        from selfheal.asyncpg import HealingConnection as APG

        async def main() -> None:
            ac = await asyncpg.connect(**connect_args(dsn), connection_class=APG)
            try:
                await ac.execute("INSERT INTO items (note) VALUES ('learn the table')")
                await ac.copy_records_to_table("items", records=[(50, "a"), (51, "b")],
                                               columns=["id", "note"])
                assert seq_next(conn, "public.items_id_seq") == 52
                async with ac.transaction():
                    await ac.copy_records_to_table("items", records=[(60, "c")],
                                                   schema_name="public")
                    assert seq_next(conn, "public.items_id_seq") == 61
                await ac.copy_records_to_table("items", records=[("d",)], columns=["note"])
            finally:
                await ac.close()

        asyncio.run(main())
        assert plain_default_insert(dsn) == 62

    def test_first_statement_of_a_process_in_a_transaction(self, make_db: Any) -> None:
        import asyncpg

        from selfheal.asyncpg import HealingConnection as APG

        dsn = make_db()
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("CREATE TABLE items (id serial PRIMARY KEY, note text)")

        async def main() -> None:
            ac = await asyncpg.connect(**connect_args(dsn), connection_class=APG)
            try:
                async with ac.transaction():
                    await ac.execute("INSERT INTO items (id, note) VALUES ($1, 'x')", 77)
            finally:
                await ac.close()

        asyncio.run(main())
        assert plain_default_insert(dsn) == 78


class TestIntegrations:
    def test_sqlalchemy_orm(self, conn: psycopg.Connection, dsn: str) -> None:
        """ORM objects saved with their own ids: the next object without one gets the
        next free id."""
        import sqlalchemy as sa
        from sqlalchemy.orm import DeclarativeBase, Session

        import selfheal.sqlalchemy

        class Base(DeclarativeBase):
            pass

        class Item(Base):
            __tablename__ = "items"
            id = sa.Column(sa.Integer, primary_key=True)
            note = sa.Column(sa.Text)

        params = psycopg.conninfo.conninfo_to_dict(dsn)
        engine = sa.create_engine("postgresql+psycopg://", connect_args=params)
        selfheal.sqlalchemy.install(engine)
        try:
            with Session(engine) as session:
                session.add_all([Item(id=90, note="seed"), Item(id=91, note="seed")])
                session.commit()
                session.add(Item(note="default"))
                session.commit()
        finally:
            engine.dispose()
        assert conn.execute("SELECT id FROM items ORDER BY id").fetchall() == [
            (90,), (91,), (92,)]



class TestSideBySide:
    """What the caller sees of an explicit-id statement is what plain psycopg shows."""

    SCRIPT = (
        ("INSERT INTO items (id, note) VALUES (%s, %s), (%s, %s) RETURNING id, note",
         (5, "a", 6, "b")),
        ("INSERT INTO items VALUES (9, 'c')", None),
        ("INSERT INTO items (id, note) SELECT g, 'd' FROM generate_series(10, 12) g"
         " ON CONFLICT (id) DO NOTHING", None),
        ("INSERT INTO items (id, note) VALUES (5, 'dup') ON CONFLICT (id)"
         " DO UPDATE SET note = excluded.note RETURNING note", None),
    )

    @pytest.mark.parametrize("autocommit", [True, False])
    def test_same_results(self, make_db: Any, autocommit: bool) -> None:
        seen: dict[bool, list[Any]] = {}
        for healing in (False, True):
            dsn = make_db()
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute("CREATE TABLE items (id serial PRIMARY KEY, note text)")
            cls: Any = HealingConnection if healing else psycopg.Connection
            notices: list[str] = []
            with cls.connect(dsn, autocommit=autocommit) as hc:
                hc.add_notice_handler(
                    lambda d, notices=notices: notices.append(d.message_primary))
                out = []
                for query, params in self.SCRIPT:
                    cur = hc.execute(query, params)
                    out.append((cur.statusmessage, cur.rowcount,
                                cur.fetchall() if cur.description else None,
                                hc.info.transaction_status))
                hc.commit()
                out.append(hc.execute("SELECT id, note FROM items ORDER BY id").fetchall())
                out.append(notices)
                nextval = seq_next(hc, "public.items_id_seq")
            seen[healing] = out
            assert nextval == (13 if healing else 1)
        assert seen[True] == seen[False]


@pytest.mark.parametrize(("text", "expected"), [
    ("INSERT INTO t (id, v) VALUES (12, 'card 4111'), (13, E'it\\'s')",
     "INSERT INTO t (id, v) VALUES (?, ?), (?, ?)"),
    ('insert into "T 1" (id) values ($1), (%s), (%(n)s) -- 42\n',
     'insert into "T 1" (id) values ($1), (%s), (%(n)s)'),
    ("INSERT INTO t2 SELECT $$x 5$$, 1.5e3, col1 /* 7 */ FROM s",
     "INSERT INTO t2 SELECT ?, ?, col1 FROM s"),
    ("INSERT INTO t VALUES (" + "1, " * 300 + "1)", None),
])
def test_statement_text_without_values(text: str, expected: str | None) -> None:
    from selfheal._sqltext import redacted

    got = redacted(text)
    if expected is None:
        assert len(got) == 500 and got.endswith("...") and "1" not in got
    else:
        assert got == expected
