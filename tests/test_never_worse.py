"""
Never worse: wherever selfheal does not heal, the caller sees what plain psycopg shows.

Each test runs one script side by side, on `psycopg.Connection` and on
`HealingConnection` (or the async pair), each against its own database set up
the same way, and compares what the caller can observe.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import psycopg
import pytest
from psycopg import errors as pgerrors
from psycopg import sql
from psycopg.pq import TransactionStatus
from structlog.testing import capture_logs

from selfheal import AsyncHealingConnection, HealingConnection, HealOptions
from selfheal._sqltext import shape_of

from .conftest import seq_next

SETUP = [
    "CREATE TABLE ledger (id serial PRIMARY KEY, note text)",
    "CREATE TABLE users (id serial PRIMARY KEY, email text UNIQUE)",
    "INSERT INTO users (email) VALUES ('a@x')",
    # Drifted: the sequence hands out 1 while 1..5 exist.
    "CREATE TABLE payments (id serial PRIMARY KEY, note text)",
    "INSERT INTO payments (id, note) SELECT g, 'seed' FROM generate_series(1, 5) g",
]


def error_of(ex: BaseException) -> tuple[Any, ...]:
    """What a caller can see of an error: class, SQLSTATE, message, diag."""
    if not isinstance(ex, psycopg.Error):
        return (type(ex),)
    d = ex.diag
    return (type(ex), ex.sqlstate, str(ex), d.message_primary, d.message_detail,
            d.schema_name, d.table_name, d.constraint_name)


def rows_of(dsn: str) -> dict[str, Any]:
    """The committed state: every row of the script's tables, each sequence's next value."""
    with psycopg.connect(dsn, autocommit=True) as c:
        return {
            table: (c.execute(sql.SQL("SELECT * FROM {} ORDER BY 1").format(
                sql.Identifier(table))).fetchall(), seq_next(c, f"public.{table}_id_seq"))
            for table in ("ledger", "users")
        }


class Recorder:
    """Runs steps on one connection, recording what each shows the caller."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.log: list[Any] = []
        self.notices: list[str] = []
        conn.add_notice_handler(lambda d: self.notices.append(d.message_primary or ""))

    def step(self, fn: Callable[[Any], Any]) -> Any:
        try:
            value = fn(self.conn)
        except psycopg.Error as ex:
            self.log.append(("error", error_of(ex)))
            value = None
        else:
            self.log.append(("ok", value))
        self.log.append(("status", self.conn.info.transaction_status))
        return value

    async def astep(self, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        try:
            value = await fn(self.conn)
        except psycopg.Error as ex:
            self.log.append(("error", error_of(ex)))
            value = None
        else:
            self.log.append(("ok", value))
        self.log.append(("status", self.conn.info.transaction_status))
        return value


def cursor_result(cur: psycopg.Cursor[Any]) -> tuple[Any, ...]:
    """Everything a cursor shows after execute(), every result set included."""
    sets = []
    while True:
        desc = [(c.name, c.type_code) for c in cur.description] if cur.description else None
        sets.append((cur.rowcount, cur.statusmessage, desc, cur.fetchall() if desc else None))
        if not cur.nextset():
            break
    return tuple(sets)


async def acursor_result(cur: psycopg.AsyncCursor[Any]) -> tuple[Any, ...]:
    sets = []
    while True:
        desc = [(c.name, c.type_code) for c in cur.description] if cur.description else None
        sets.append((cur.rowcount, cur.statusmessage, desc,
                     await cur.fetchall() if desc else None))
        if not cur.nextset():
            break
    return tuple(sets)


@pytest.fixture(autouse=True, params=["auto", "always"])
def protect(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every case in both protection modes: speed may never buy a difference."""
    options = HealOptions(protect=request.param)
    monkeypatch.setattr(HealingConnection, "selfheal_options", options)
    monkeypatch.setattr(AsyncHealingConnection, "selfheal_options", options)
    return str(request.param)


@pytest.fixture
def pair(make_db: Callable[..., str]) -> tuple[str, str]:
    """Two databases in the same state: one for plain psycopg, one for selfheal."""
    dsns = (make_db(), make_db())
    for dsn in dsns:
        with psycopg.connect(dsn, autocommit=True) as c:
            for stmt in SETUP:
                c.execute(stmt)
    return dsns


def side_by_side(pair: tuple[str, str], script: Callable[[Recorder], None],
                 **kwargs: Any) -> tuple[Recorder, Recorder]:
    plain_dsn, heal_dsn = pair
    with psycopg.Connection.connect(plain_dsn, **kwargs) as c:
        plain = Recorder(c)
        script(plain)
    with HealingConnection.connect(heal_dsn, **kwargs) as c:
        healing = Recorder(c)
        script(healing)
    assert healing.log == plain.log
    assert healing.notices == plain.notices
    assert rows_of(heal_dsn) == rows_of(plain_dsn)
    return plain, healing


async def aside_by_side(pair: tuple[str, str], script: Callable[[Recorder], Awaitable[None]],
                        **kwargs: Any) -> None:
    plain_dsn, heal_dsn = pair
    async with await psycopg.AsyncConnection.connect(plain_dsn, **kwargs) as c:
        plain = Recorder(c)
        await script(plain)
    async with await AsyncHealingConnection.connect(heal_dsn, **kwargs) as c:
        healing = Recorder(c)
        await script(healing)
    assert healing.log == plain.log
    assert rows_of(heal_dsn) == rows_of(plain_dsn)


def transfer(r: Recorder) -> None:
    """Half a transfer, a caught natural-key violation, the other half, commit."""
    r.step(lambda c: c.execute("INSERT INTO ledger (note) VALUES ('debit')").statusmessage)
    r.step(lambda c: c.execute("INSERT INTO users (email) VALUES ('a@x')").statusmessage)
    r.step(lambda c: c.execute("INSERT INTO ledger (note) VALUES ('credit')").statusmessage)
    r.step(lambda c: c.commit())


class TestAbortedStaysAborted:
    @pytest.mark.parametrize("prepare_threshold", [0, 5, None])
    def test_caught_natural_key_violation(self, pair: tuple[str, str],
                                          prepare_threshold: int | None) -> None:
        """A caught unique violation inside a transaction aborts it; COMMIT writes nothing."""
        plain, _ = side_by_side(pair, transfer, prepare_threshold=prepare_threshold)
        assert plain.log[3] == ("status", TransactionStatus.INERROR)
        assert plain.log[4][1][0] is pgerrors.InFailedSqlTransaction
        assert rows_of(pair[0])["ledger"][0] == []

    def test_twice_same_constraint(self, pair: tuple[str, str]) -> None:
        """The second time (the constraint now known not to heal) behaves the same."""
        def script(r: Recorder) -> None:
            transfer(r)
            transfer(r)

        side_by_side(pair, script)

    def test_executemany(self, pair: tuple[str, str]) -> None:
        """executemany() that hits a natural-key violation aborts the transaction."""
        def script(r: Recorder) -> None:
            r.step(lambda c: c.execute("INSERT INTO ledger (note) VALUES ('debit')").rowcount)
            r.step(lambda c: c.cursor().executemany(
                "INSERT INTO users (email) VALUES (%s)", [("b@x",), ("a@x",)]))
            r.step(lambda c: c.execute("INSERT INTO ledger (note) VALUES ('credit')").rowcount)
            r.step(lambda c: c.commit())

        side_by_side(pair, script)

    def test_inside_transaction_block(self, pair: tuple[str, str]) -> None:
        """Inside `with conn.transaction()` the caught error fails the block's next statement."""
        def script(r: Recorder) -> None:
            def block(c: psycopg.Connection[Any]) -> None:
                with c.transaction():
                    c.execute("INSERT INTO ledger (note) VALUES ('in block')")
                    with contextlib.suppress(psycopg.IntegrityError):
                        c.execute("INSERT INTO users (email) VALUES ('a@x')")
                    c.execute("INSERT INTO ledger (note) VALUES ('after')")

            r.step(block)
            r.step(lambda c: c.execute("SELECT count(*) FROM ledger").fetchall())

        side_by_side(pair, script, autocommit=True)

    def test_nested_savepoint_rollback(self, pair: tuple[str, str]) -> None:
        """A nested block that catches the error by rolling back its savepoint keeps the rest."""
        def script(r: Recorder) -> None:
            def block(c: psycopg.Connection[Any]) -> None:
                with c.transaction():
                    c.execute("INSERT INTO ledger (note) VALUES ('outer')")
                    try:
                        with c.transaction():
                            c.execute("INSERT INTO users (email) VALUES ('a@x')")
                    except psycopg.IntegrityError:
                        pass
                    c.execute("INSERT INTO ledger (note) VALUES ('kept')")

            r.step(block)

        side_by_side(pair, script, autocommit=True)

    def test_heal_that_fails(self, pair: tuple[str, str],
                             make_role: Callable[..., str]) -> None:
        """A heal that cannot happen (no privilege) leaves the transaction aborted too."""
        role = psycopg.conninfo.conninfo_to_dict(make_role())["user"]
        grants = ("GRANT SELECT, INSERT ON ledger, payments TO {}",
                  "GRANT USAGE ON ledger_id_seq, payments_id_seq TO {}")
        role_dsns = []
        for dsn in pair:
            with psycopg.connect(dsn, autocommit=True) as c:
                for grant in grants:
                    c.execute(sql.SQL(grant).format(sql.Identifier(role)))
            params = psycopg.conninfo.conninfo_to_dict(dsn)
            params["user"] = role
            params.pop("password", None)
            role_dsns.append(psycopg.conninfo.make_conninfo("", **params))

        def script(r: Recorder) -> None:
            r.step(lambda c: c.execute("INSERT INTO ledger (note) VALUES ('debit')").rowcount)
            r.step(lambda c: c.execute(
                "INSERT INTO payments (note) VALUES ('x') RETURNING id").fetchall())
            r.step(lambda c: c.execute("INSERT INTO ledger (note) VALUES ('credit')").rowcount)
            r.step(lambda c: c.commit())

        try:
            with psycopg.Connection.connect(role_dsns[0]) as c:
                plain = Recorder(c)
                script(plain)
            with capture_logs() as logs, HealingConnection.connect(role_dsns[1]) as c:
                healing = Recorder(c)
                script(healing)
        finally:
            for dsn in pair:
                with psycopg.connect(dsn, autocommit=True) as c:
                    c.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        assert healing.log == plain.log
        assert rows_of(pair[1]) == rows_of(pair[0])
        assert [e["event"] for e in logs if e["event"].startswith("sequence_")] == [
            "sequence_resync_failed"]


def committing_procedure(conn: psycopg.Connection) -> None:
    """``batch()``: writes a ledger row, COMMITs, then collides on a lagging key."""
    conn.execute("CREATE TABLE ledger (id serial PRIMARY KEY, note text)")
    conn.execute("CREATE TABLE payments (id serial PRIMARY KEY, note text)")
    conn.execute("INSERT INTO payments (id) SELECT generate_series(1, 5)")
    conn.execute("""
        CREATE PROCEDURE batch() LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO ledger (note) VALUES ('committed once');
            COMMIT;
            INSERT INTO payments (note) VALUES ('collides');
        END $$""")


class TestCommittedWorkNotRepeated:
    def test_call_that_commits_then_collides(self, conn: psycopg.Connection,
                                             dsn: str) -> None:
        """CALL of a procedure that COMMITs, then collides: healed, re-raised, not re-run."""
        committing_procedure(conn)
        with HealingConnection.connect(dsn, autocommit=True) as hc:
            with capture_logs() as logs, pytest.raises(pgerrors.UniqueViolation):
                hc.execute("CALL batch()")
            assert conn.execute("SELECT count(*) FROM ledger").fetchone() == (1,)
            assert seq_next(conn, "public.payments_id_seq") == 6  # healed
            [event] = [e for e in logs if e["event"] == "sequence_resynced"]
            assert event["retry"] == "not_attempted"
            hc.execute("CALL batch()")  # the caller's own retry now lands
        assert conn.execute("SELECT count(*) FROM ledger").fetchone() == (2,)

    def test_do_block_in_autocommit(self, conn: psycopg.Connection, dsn: str) -> None:
        """A DO block may COMMIT too: healed and re-raised."""
        conn.execute("CREATE TABLE payments (id serial PRIMARY KEY, note text)")
        conn.execute("INSERT INTO payments (id) SELECT generate_series(1, 5)")
        with HealingConnection.connect(dsn, autocommit=True) as hc, pytest.raises(
                pgerrors.UniqueViolation):
            hc.execute("DO $$BEGIN INSERT INTO payments (note) VALUES ('x'); END$$")
        assert seq_next(conn, "public.payments_id_seq") == 6

    def test_call_in_transaction_is_retried(self, conn: psycopg.Connection, dsn: str) -> None:
        """Inside a transaction a procedure cannot commit: the CALL is healed and retried."""
        conn.execute("CREATE TABLE payments (id serial PRIMARY KEY, note text)")
        conn.execute("INSERT INTO payments (id) SELECT generate_series(1, 5)")
        conn.execute("CREATE PROCEDURE pay() LANGUAGE sql AS"
                     " $$INSERT INTO payments (note) VALUES ('p')$$")
        with HealingConnection.connect(dsn) as hc:
            hc.execute("SELECT 1")
            hc.execute("CALL pay()")
            hc.commit()
        assert conn.execute("SELECT id FROM payments WHERE note = 'p'").fetchall() == [(6,)]


class TestNotices:
    @pytest.mark.parametrize("autocommit", [True, False])
    def test_retried_statement_notices_once(self, conn: psycopg.Connection, dsn: str,
                                            autocommit: bool) -> None:
        """A healed and retried statement reaches notice handlers once, as the single
        run plain psycopg makes; a statement that is not retried, with its own notices."""
        conn.execute("CREATE TABLE payments (id serial PRIMARY KEY, note text)")
        conn.execute("INSERT INTO payments (id) SELECT generate_series(1, 5)")
        conn.execute("CREATE FUNCTION say() RETURNS trigger LANGUAGE plpgsql AS $$"
                     " BEGIN RAISE NOTICE 'inserting %', NEW.note; RETURN NEW; END $$")
        conn.execute("CREATE TRIGGER say BEFORE INSERT ON payments FOR EACH ROW"
                     " EXECUTE FUNCTION say()")
        seen: list[tuple[str | None, str | None]] = []
        with HealingConnection.connect(dsn, autocommit=autocommit) as hc:
            hc.add_notice_handler(lambda d: seen.append((d.sqlstate, d.message_primary)))
            if not autocommit:
                hc.execute("SELECT 1")
            hc.execute("INSERT INTO payments (note) VALUES ('healed')")
            assert seen == [("00000", "inserting healed")]
            with pytest.raises(pgerrors.UniqueViolation):
                hc.execute("INSERT INTO payments (id, note) VALUES (1, 'dup')")
            assert seen[1:] == [("00000", "inserting dup")]


class TestMultiStatementStrings:
    @pytest.mark.parametrize("autocommit", [True, False])
    def test_runs_as_plain(self, pair: tuple[str, str], autocommit: bool) -> None:
        """A string of several statements runs, with every result set, as plain psycopg."""
        def script(r: Recorder) -> None:
            r.step(lambda c: c.execute("SELECT 1").statusmessage)
            r.step(lambda c: cursor_result(c.execute(
                "INSERT INTO ledger (note) VALUES ('a'); INSERT INTO ledger (note) VALUES ('b')"
                " RETURNING id; SELECT count(*) FROM ledger")))
            # What Django sends when a migration makes a column NOT NULL.
            r.step(lambda c: cursor_result(c.execute(
                "UPDATE ledger SET note = 'n' WHERE note IS NULL; SET CONSTRAINTS ALL IMMEDIATE")))
            r.step(lambda c: c.commit())

        side_by_side(pair, script, autocommit=autocommit)

    def test_collision_in_transaction(self, pair: tuple[str, str]) -> None:
        """A collision in a multi-statement string heals on the side and re-raises."""
        def script(r: Recorder) -> None:
            r.step(lambda c: c.execute("INSERT INTO ledger (note) VALUES ('first')").rowcount)
            r.step(lambda c: cursor_result(c.execute(
                "INSERT INTO ledger (note) VALUES ('a'); INSERT INTO payments (note) VALUES ('p')"
            )))
            r.step(lambda c: c.rollback())

        plain_dsn, heal_dsn = pair
        with psycopg.Connection.connect(plain_dsn) as c:
            plain = Recorder(c)
            script(plain)
        with HealingConnection.connect(heal_dsn) as c:
            healing = Recorder(c)
            script(healing)
        assert healing.log == plain.log
        with psycopg.connect(heal_dsn) as c:
            assert seq_next(c, "public.payments_id_seq") == 6


    @pytest.mark.parametrize("autocommit", [True, False])
    def test_all_or_nothing_string_is_retried(self, conn: psycopg.Connection, dsn: str,
                                              autocommit: bool) -> None:
        """A string of DML statements runs all or nothing, where it is the whole
        transaction: after a heal it runs again, and every row lands once."""
        conn.execute("CREATE TABLE pages (id serial PRIMARY KEY, note text)")
        conn.execute("INSERT INTO pages (id, note) SELECT g, 'seed' FROM generate_series(1, 3) g")
        with capture_logs() as logs, HealingConnection.connect(dsn, autocommit=autocommit) as hc:
            hc.execute("INSERT INTO pages (note) VALUES ('a'); INSERT INTO pages (note)"
                       " VALUES ('b')")
            hc.commit()
        assert [e["retry"] for e in logs if e["event"] == "sequence_resynced"] == ["succeeded"]
        assert conn.execute("SELECT note FROM pages WHERE id > 3 ORDER BY id").fetchall() == [
            ("a",), ("b",)]

    def test_string_that_commits_is_not_run_again(self, conn: psycopg.Connection,
                                                  dsn: str) -> None:
        """A string holding a COMMIT may have committed part of its work: healed and
        re-raised, never run twice."""
        conn.execute("CREATE TABLE pages (id serial PRIMARY KEY, note text)")
        conn.execute("INSERT INTO pages (id, note) VALUES (2, 'seed')")
        with (HealingConnection.connect(dsn, autocommit=True) as hc,
              pytest.raises(pgerrors.UniqueViolation)):
            hc.execute("INSERT INTO pages (note) VALUES ('a'); COMMIT;"
                       " INSERT INTO pages (note) VALUES ('b')")
        assert conn.execute("SELECT note FROM pages WHERE note <> 'seed'").fetchall() == [
            ("a",)]
        assert seq_next(conn, "public.pages_id_seq") == 3


class TestPreparedStatements:
    @pytest.mark.parametrize("threshold", [0, 1, 5])
    def test_heals_and_prepares_nothing_of_its_own(self, conn: psycopg.Connection, dsn: str,
                                                   threshold: int) -> None:
        """At any prepare_threshold a collision in a transaction heals, and none of
        selfheal's statements end up prepared on the caller's connection."""
        conn.execute("CREATE TABLE payments (id serial PRIMARY KEY, note text)")
        with HealingConnection.connect(dsn, prepare_threshold=threshold) as hc:
            # Never trusted in sync: a drift by another client in the window would
            # otherwise fail once (protect="auto"), as documented.
            hc.selfheal_options = replace(hc.selfheal_options, verified_for=0)
            for i in range(6):
                hc.execute("INSERT INTO payments (note) VALUES (%s)", (f"warm{i}",))
            conn.execute("INSERT INTO payments (id) SELECT generate_series(7, 20)")
            row = hc.execute("INSERT INTO payments (note) VALUES (%s) RETURNING id",
                             ("healed",)).fetchone()
            assert row == (21,)
            prepared = [s for (s,) in hc.execute(
                "SELECT statement FROM pg_prepared_statements").fetchall()]
            hc.commit()
        assert prepared, "the caller's own statements are prepared as usual"
        assert not [s for s in prepared if "selfheal" in s.lower() or "SAVEPOINT" in s]


class TestCursorClasses:
    @pytest.mark.parametrize("factory", [psycopg.Cursor, psycopg.ClientCursor,
                                         psycopg.RawCursor])
    def test_exactly_the_class_set(self, dsn: str, factory: type) -> None:
        """cursor_factory reads back what was set; cursors are of exactly that class."""
        class Mine(factory):  # type: ignore[misc, valid-type]
            pass

        with psycopg.connect(dsn) as plain, HealingConnection.connect(dsn) as hc:
            for c in (plain, hc):
                c.cursor_factory = Mine
            assert hc.cursor_factory is plain.cursor_factory is Mine
            assert type(hc.cursor()) is Mine
            assert type(hc.execute("SELECT 1")) is Mine
            assert repr(hc.cursor()).split(" ")[0] == repr(plain.cursor()).split(" ")[0]

    async def test_async(self, dsn: str) -> None:
        """The same for the async connection."""
        async with await AsyncHealingConnection.connect(
                dsn, cursor_factory=psycopg.AsyncClientCursor) as ac:
            assert ac.cursor_factory is psycopg.AsyncClientCursor
            assert type(ac.cursor()) is psycopg.AsyncClientCursor
            assert type(await ac.execute("SELECT 1")) is psycopg.AsyncClientCursor


class TestExplicitKeys:
    def test_duplicate_explicit_id_not_retried(self, conn: psycopg.Connection,
                                               dsn: str) -> None:
        """A collision on an id the statement supplies is re-raised without a retry:
        the statement's other sequences are drawn once, as with plain psycopg."""
        conn.execute("CREATE TABLE t (id serial PRIMARY KEY, n serial, v text)")
        conn.execute("INSERT INTO t (v) VALUES ('a')")
        with HealingConnection.connect(dsn, autocommit=True) as hc, capture_logs() as logs:
            with pytest.raises(pgerrors.UniqueViolation):
                hc.execute("INSERT INTO t (id, v) VALUES (1, 'dup')")
            assert seq_next(conn, "public.t_n_seq") == 3  # drawn once, not twice
        assert not [e for e in logs if e.get("retry") in ("succeeded", "failed")]

    def test_default_id_after_another_session_healed(self, conn: psycopg.Connection,
                                                     dsn: str) -> None:
        """A default id that collided is retried even when the heal had nothing to move."""
        conn.execute("CREATE TABLE t (id serial PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t (id) SELECT generate_series(1, 3)")
        conn.execute("CREATE FUNCTION heal_first() RETURNS trigger LANGUAGE plpgsql AS $$"
                     " BEGIN PERFORM setval('t_id_seq', 10); RETURN NEW; END $$")
        # Another session heals between this insert's draw and its check.
        conn.execute("CREATE TRIGGER heal_first BEFORE INSERT ON t FOR EACH ROW"
                     " WHEN (NEW.id <= 3) EXECUTE FUNCTION heal_first()")
        with HealingConnection.connect(dsn, autocommit=True) as hc:
            assert hc.execute("INSERT INTO t (v) VALUES ('x') RETURNING id").fetchone() == (11,)

    @pytest.mark.parametrize(
        ("text", "table", "column", "expected"),
        [
            ("INSERT INTO t (id, v) VALUES (1, 'x')", "t", "id", True),
            ('insert into public."T" AS x ("id") select 1', "T", "id", True),
            ("INSERT INTO t (v) VALUES ('id')", "t", "id", False),
            ("INSERT INTO t VALUES (1, 'x')", "t", "id", False),
            ("INSERT INTO t DEFAULT VALUES", "t", "id", False),
            ("INSERT INTO other (id) VALUES (1)", "t", "id", False),
            ("WITH x AS (SELECT 1) INSERT INTO t (id) SELECT 1", "t", "id", False),
        ],
    )
    def test_supplies(self, text: str, table: str, column: str, expected: bool) -> None:
        """The column list of an INSERT tells whether it supplies the key."""
        assert shape_of(text).supplies(table, column) is expected


class TestStatementText:
    @pytest.mark.parametrize(
        "text",
        [
            " " * 60,
            "\n" + " " * 40 + "x",
            "(" * 5000 + "SELECT 1",
            "/*" * 5000,
            "-- c\n" * 5000 + "INSERT INTO t VALUES (1)",
            "'" + "''" * 50000,
            "$a$" + "$" * 100000,
        ],
    )
    def test_linear(self, text: str) -> None:
        """Pathological texts classify at once (a backtracking scan took minutes)."""
        shape_of(text * 20)

    def test_composed_blank_prefix(self, dsn: str) -> None:
        """A composed query whose first part is whitespace runs and heals as usual."""
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("CREATE TABLE p (id serial PRIMARY KEY)")
            c.execute("INSERT INTO p SELECT generate_series(1, 3)")
        q = sql.SQL("\n" + " " * 40 + "{}").format(sql.SQL("INSERT INTO p DEFAULT VALUES"))
        with HealingConnection.connect(dsn) as hc:
            hc.execute("SELECT 1")
            hc.execute(q)
            hc.commit()

    @pytest.mark.parametrize(
        ("text", "keyword", "multi"),
        [
            ("INSERT INTO t VALUES (';')", "INSERT", False),
            ("INSERT INTO t VALUES ($$;x$$);", "INSERT", False),
            ("SELECT 1; ", "SELECT", False),
            ("SELECT 1;;", "SELECT", False),
            ("SELECT 1; SELECT 2", "SELECT", True),
            ('SELECT ";" FROM t -- ;x\n', "SELECT", False),
            ("/* ; /* nested ; */ ; */ UPDATE t SET a = E'\\';'", "UPDATE", False),
            ("UPDATE t SET a = 1; SET CONSTRAINTS ALL IMMEDIATE", "UPDATE", True),
            ("SELECT $1; x", "SELECT", True),
        ],
    )
    def test_shape(self, text: str, keyword: str, multi: bool) -> None:
        """Keywords and statement boundaries are read past strings, quotes and comments."""
        shape = shape_of(text)
        assert (shape.keyword, shape.multi) == (keyword, multi)


class TestNoNoise:
    def test_psycopg_logs_nothing(self, dsn: str, caplog: pytest.LogCaptureFixture) -> None:
        """Heals inside a transaction and in executemany() leave no psycopg warnings."""
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("CREATE TABLE p (id serial PRIMARY KEY, v int)")
        caplog.set_level(logging.WARNING, logger="psycopg")
        with HealingConnection.connect(dsn) as hc:
            # Never trusted in sync: another client drifts the table each round.
            hc.selfheal_options = replace(hc.selfheal_options, verified_for=0)
            for round_ in range(20):
                with psycopg.connect(dsn, autocommit=True) as c:
                    # Explicit ids past the sequence: the next default id collides.
                    c.execute("INSERT INTO p (id) SELECT coalesce(max(id), 0) + g"
                              " FROM p, generate_series(1, 3) g GROUP BY g")
                hc.execute("SELECT 1")
                if round_ % 2:
                    hc.cursor().executemany("INSERT INTO p (v) VALUES (%s)", [(1,), (2,)])
                else:
                    hc.execute("INSERT INTO p (v) VALUES (1)")
                hc.commit()
        assert [r.getMessage() for r in caplog.records if r.name.startswith("psycopg")] == []


class TestAsync:
    async def test_caught_natural_key_violation(self, pair: tuple[str, str]) -> None:
        """The async twin leaves a caught violation's transaction aborted too."""
        async def script(r: Recorder) -> None:
            async def ins(c: Any, q: str) -> Any:
                return (await c.execute(q)).statusmessage

            await r.astep(lambda c: ins(c, "INSERT INTO ledger (note) VALUES ('debit')"))
            await r.astep(lambda c: ins(c, "INSERT INTO users (email) VALUES ('a@x')"))
            await r.astep(lambda c: ins(c, "INSERT INTO ledger (note) VALUES ('credit')"))
            await r.astep(lambda c: c.commit())

        await aside_by_side(pair, script)

    async def test_multi_statement(self, pair: tuple[str, str]) -> None:
        """Multi-statement strings run inside a transaction, every result set as plain."""
        async def run_select_1(c: Any) -> Any:
            return (await c.execute("SELECT 1")).statusmessage

        async def script(r: Recorder) -> None:
            async def run(c: Any) -> Any:
                return await acursor_result(await c.execute(
                    "INSERT INTO ledger (note) VALUES ('a'); SELECT count(*) FROM ledger"))

            await r.astep(run_select_1)
            await r.astep(run)
            await r.astep(lambda c: c.commit())

        await aside_by_side(pair, script)

    async def test_call_that_commits(self, conn: psycopg.Connection, dsn: str) -> None:
        """The async twin does not re-run a CALL that committed before colliding."""
        committing_procedure(conn)
        async with await AsyncHealingConnection.connect(dsn, autocommit=True) as ac:
            with pytest.raises(pgerrors.UniqueViolation):
                await ac.execute("CALL batch()")
        assert conn.execute("SELECT count(*) FROM ledger").fetchone() == (1,)
        assert seq_next(conn, "public.payments_id_seq") == 6

    async def test_prepare_threshold_zero(self, conn: psycopg.Connection, dsn: str) -> None:
        """prepare_threshold=0: a collision in a transaction heals, nothing of selfheal's
        is prepared."""
        conn.execute("CREATE TABLE payments (id serial PRIMARY KEY, note text)")
        conn.execute("INSERT INTO payments (id) SELECT generate_series(1, 5)")
        async with await AsyncHealingConnection.connect(dsn, prepare_threshold=0) as ac:
            await ac.execute("SELECT 1")
            cur = await ac.execute("INSERT INTO payments (note) VALUES (%s) RETURNING id",
                                   ("x",))
            assert await cur.fetchone() == (6,)
            cur = await ac.execute("SELECT statement FROM pg_prepared_statements")
            prepared = [s for (s,) in await cur.fetchall()]
            await ac.commit()
        assert not [s for s in prepared if "SAVEPOINT" in s or "selfheal" in s.lower()]


class TestPsycopgInternals:
    def test_generators_recognised(self, dsn: str) -> None:
        """The psycopg generators selfheal hooks are there: fails loudly on a psycopg
        that renames them (its statements would run unprotected)."""
        from selfheal import _attempt

        with psycopg.connect(dsn) as c:
            cur = c.cursor()
            gen = cur._execute_gen("SELECT %s", (1,), prepare=False)
            call = _attempt.call_of(gen)
            gen.close()
            assert call is not None
            assert (call.cursor, call.query, call.params, call.many) == (
                cur, "SELECT %s", (1,), False)
            gen = cur._executemany_gen_pipeline("SELECT %s", iter([(1,), (2,)]), False)
            call = _attempt.call_of(gen)
            gen.close()
            assert call is not None
            assert (call.params, call.many, call.pipelined) == ([(1,), (2,)], True, True)
            assert _attempt.call_of(c._exec_command(b"SELECT 1")) is None
            with c.pipeline() as p:
                assert p._exit_gen.__code__ is _attempt.EXIT


class TestThreads:
    def test_one_connection_many_threads(self, conn: psycopg.Connection, dsn: str) -> None:
        """Threads sharing one healing connection each get their rows in, exactly once,
        while the table keeps drifting under them."""
        import threading

        conn.execute("CREATE TABLE p (id serial PRIMARY KEY, who int)")
        errors: list[BaseException] = []
        with HealingConnection.connect(dsn, autocommit=True) as hc:
            def work(who: int) -> None:
                try:
                    for _ in range(50):
                        hc.execute("INSERT INTO p (who) VALUES (%s)", (who,))
                except BaseException as ex:  # reported below
                    errors.append(ex)

            threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for _ in range(10):
                # The drifter races the writers for that id too: a loss is no drift.
                conn.execute("INSERT INTO p (id, who) SELECT coalesce(max(id), 0) + 3, -1 FROM p"
                             " ON CONFLICT (id) DO NOTHING")
            for t in threads:
                t.join(60)
        assert errors == []
        assert conn.execute("SELECT who, count(*) FROM p WHERE who >= 0 GROUP BY who"
                            " ORDER BY who").fetchall() == [(0, 50), (1, 50), (2, 50), (3, 50)]


class TestExecutemanyParameters:
    @pytest.mark.parametrize("autocommit", [True, False])
    def test_generator_in_callers_pipeline(self, pair: tuple[str, str],
                                           autocommit: bool) -> None:
        """executemany() of a generator, inside the caller's own pipeline, lands every row."""
        def script(r: Recorder) -> None:
            def batch(c: psycopg.Connection[Any]) -> Any:
                with c.pipeline():
                    cur = c.cursor()
                    cur.executemany("INSERT INTO ledger (note) VALUES (%s)",
                                    ((f"n{i}",) for i in range(5)))
                return cur.rowcount

            r.step(batch)
            r.step(lambda c: c.commit())

        side_by_side(pair, script, autocommit=autocommit)
        assert len(rows_of(pair[1])["ledger"][0]) == 5

    def test_natural_key_violation_repeatedly(self, dsn: str) -> None:
        """executemany() failing on a natural key inside a transaction, many times over:
        always the UniqueViolation, and the connection always recovers (a heal inside
        executemany()'s pipeline once left unread results behind, about 1 run in 20)."""
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("CREATE TABLE u (id serial PRIMARY KEY, email text UNIQUE)")
            c.execute("INSERT INTO u (email) VALUES ('taken')")
        for _ in range(150):
            # A new connection each time: it has yet to learn the constraint.
            with HealingConnection.connect(dsn) as hc:
                hc.execute("SELECT 1")
                with pytest.raises(pgerrors.UniqueViolation):
                    hc.cursor().executemany("INSERT INTO u (email) VALUES (%s)",
                                            [("new",), ("taken",)])
                assert hc.info.transaction_status == TransactionStatus.INERROR
                hc.rollback()

    async def test_natural_key_violation_repeatedly_async(self, dsn: str) -> None:
        """The same for the async twin."""
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("CREATE TABLE u (id serial PRIMARY KEY, email text UNIQUE)")
            c.execute("INSERT INTO u (email) VALUES ('taken')")
        for _ in range(150):
            async with await AsyncHealingConnection.connect(dsn) as ac:
                await ac.execute("SELECT 1")
                with pytest.raises(pgerrors.UniqueViolation):
                    await ac.cursor().executemany("INSERT INTO u (email) VALUES (%s)",
                                                  [("new",), ("taken",)])
                assert ac.info.transaction_status == TransactionStatus.INERROR
                await ac.rollback()
