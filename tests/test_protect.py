"""Protection inside transactions: savepoints only where a retry may follow, never too many."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest
from psycopg import errors as pgerrors
from psycopg import sql
from psycopg.pq import TransactionStatus

from selfheal import AsyncHealingConnection, HealingConnection, HealOptions, insync, protect
from selfheal.heal import Mode

from .conftest import seq_next

# Trusted for the whole test: what a fact allows must not depend on timing.
Steady = HealingConnection.with_options(verified_for=600.0)
Always = HealingConnection.with_options(protect="always")
INSERT = "INSERT INTO t (note) VALUES ('x')"


def next_xid(observer: psycopg.Connection) -> int:
    """The transaction id the server assigns next."""
    (xmax,), = observer.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())").fetchall()
    return int(str(xmax))


def xids_of(observer: psycopg.Connection, run: Any) -> int:
    """How many transaction ids `run()` makes the server assign: one per
    transaction and one per subtransaction (savepoint) that writes."""
    before = next_xid(observer)
    run()
    return next_xid(observer) - before


def subxact_cache(observer: psycopg.Connection, pid: int) -> tuple[int, bool]:
    """(count, overflowed) of the backend's subtransaction cache (PostgreSQL 16+)."""
    row = observer.execute(
        "SELECT s.subxact_count, s.subxact_overflowed"
        " FROM pg_stat_get_backend_idset() b(id),"
        " LATERAL pg_stat_get_backend_subxact(b.id) s"
        " WHERE pg_stat_get_backend_pid(b.id) = %s", (pid,)).fetchone()
    assert row is not None
    return int(row[0]), bool(row[1])


@pytest.fixture
def table(conn: psycopg.Connection) -> None:
    # No autovacuum: its ANALYZE would take transaction ids of its own.
    conn.execute("CREATE TABLE t (id serial PRIMARY KEY, note text)"
                 " WITH (autovacuum_enabled = false)")


def drift(conn: psycopg.Connection, ahead: int = 5) -> int:
    """Write `ahead` rows with explicit ids past the sequence, as a plain client would."""
    start = seq_next(conn, "t_id_seq")
    conn.execute("INSERT INTO t (id, note) SELECT g, 'explicit'"
                 " FROM generate_series(%s::int, %s::int) g", (start, start + ahead - 1))
    return start + ahead - 1


def verified(hc: HealingConnection[Any]) -> None:
    """Make `t` known in sync: one transaction asks for the check, the next runs it.

    The first statement of a transaction needs no savepoint, nor a check.
    """
    for _ in range(2):
        hc.execute(INSERT)
        hc.execute(INSERT)
        hc.commit()


class TestSubtransactionsBounded:
    def test_thousand_protected_inserts(self, conn: psycopg.Connection, dsn: str, table: None,
                                        server_version: int) -> None:
        """1,000 protected inserts in one transaction take 64 savepoints, then no more."""
        cache = []
        with Always.connect(dsn) as hc:

            def run() -> None:
                for _ in range(1000):
                    hc.execute(INSERT)
                if server_version >= 160000:
                    cache.append(subxact_cache(conn, hc.info.backend_pid))
                hc.commit()

            # The transaction's own id and 64 savepoints' (the first insert
            # opens the transaction and needs none).
            assert xids_of(conn, run) == 1 + 64
        if server_version >= 160000:
            assert cache == [(64, False)]
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (1000,)

    def test_callers_savepoints_around_selfheals(self, conn: psycopg.Connection, dsn: str,
                                                table: None) -> None:
        """selfheal's savepoints stay until the transaction ends: the caller's own, taken
        before or after them, release and roll back exactly as with plain psycopg, and a
        collision after that is still retried in place."""
        script = [INSERT, "SAVEPOINT a", INSERT, "SAVEPOINT b", INSERT, "RELEASE SAVEPOINT b",
                  INSERT, "SAVEPOINT c", INSERT, "ROLLBACK TO SAVEPOINT c", INSERT,
                  "ROLLBACK TO SAVEPOINT a", INSERT, "RELEASE SAVEPOINT a", INSERT]
        seen = []
        for cls in (psycopg.Connection, Always):
            conn.execute("TRUNCATE t RESTART IDENTITY")
            with cls.connect(dsn) as c:
                steps = [(c.execute(q).statusmessage, c.info.transaction_status) for q in script]
                c.commit()
            seen.append((steps, conn.execute("SELECT id FROM t ORDER BY id").fetchall()))
        assert seen[0] == seen[1]
        assert seen[1][1] == [(1,), (7,), (8,)]

        with Always.connect(dsn) as hc:
            hc.execute(INSERT)
            hc.execute("SAVEPOINT a")
            hc.execute(INSERT)
            hc.execute("SAVEPOINT b")
            hc.execute(INSERT)
            hc.execute("ROLLBACK TO SAVEPOINT a")
            top = drift(conn)
            assert hc.execute("INSERT INTO t (note) VALUES ('y') RETURNING id").fetchone() == (
                top + 1,)
            hc.execute("RELEASE SAVEPOINT a")
            hc.commit()
        assert conn.execute("SELECT count(*) FROM t WHERE note = 'x' AND id > 8").fetchone() == (
            1,)
        assert conn.execute("SELECT max(id) FROM t").fetchone() == (top + 1,)

    def test_callers_savepoints_count(self, conn: psycopg.Connection, dsn: str,
                                      table: None) -> None:
        """The caller's own savepoints count against the bound: selfheal stops at 64 in all."""
        counts = []
        for cls in (psycopg.Connection, Always):
            with cls.connect(dsn) as c:

                def run() -> None:
                    c.execute(INSERT)  # opens the transaction
                    for _ in range(100):
                        with c.transaction():
                            c.execute(INSERT)
                    c.commit()

                counts.append(xids_of(conn, run))
        # The caller's 100 either way; selfheal's 32 came with the first 32.
        assert counts == [1 + 100, 1 + 100 + 32]

    def test_past_the_bound_heals_and_reraises(self, conn: psycopg.Connection, dsn: str,
                                               table: None) -> None:
        """Past the bound a collision heals on the side and raises, as plain; then it works."""
        with Always.connect(dsn) as hc:
            for _ in range(65):
                hc.execute(INSERT)
            top = drift(conn)
            with pytest.raises(pgerrors.UniqueViolation) as info:
                hc.execute(INSERT)
            assert info.value.diag.constraint_name == "t_pkey"
            assert hc.info.transaction_status == TransactionStatus.INERROR
            hc.rollback()
            assert seq_next(conn, "t_id_seq") == top + 1
            hc.execute(INSERT)
            hc.commit()
        assert conn.execute("SELECT count(*), max(id) FROM t").fetchone() == (6, top + 1)
        assert conn.execute("SELECT count(*) FROM t WHERE note = 'x'").fetchone() == (1,)


class TestVerifiedInSync:
    def test_no_savepoint_on_a_table_in_sync(self, conn: psycopg.Connection, dsn: str,
                                             table: None) -> None:
        """Once the table is verified in sync, inserts in a transaction take no savepoint."""
        with Steady.connect(dsn) as hc:

            def run(n: int) -> None:
                for _ in range(n):
                    hc.execute(INSERT)
                hc.commit()

            # The facts' check runs before the statement that opens the first
            # transaction (it asked for the table's name): verified from the start.
            assert xids_of(conn, lambda: run(2)) == 1
            assert xids_of(conn, lambda: run(100)) == 1
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (102,)

    def test_not_verified_is_protected(self, conn: psycopg.Connection, dsn: str,
                                       table: None) -> None:
        """A table not verified yet (its check not run: the transaction opened first)
        gets its savepoint."""
        with Steady.connect(dsn) as hc:
            hc.execute("SELECT 1")  # opens the transaction; nothing asked for yet

            def run(n: int) -> None:
                for _ in range(n):
                    hc.execute(INSERT)
                hc.commit()

            assert xids_of(conn, lambda: run(2)) == 1 + 2
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (2,)

    def test_protect_always_takes_savepoints(self, conn: psycopg.Connection, dsn: str,
                                             table: None) -> None:
        """protect="always" protects a table in sync too."""
        cls = HealingConnection.with_options(protect="always", verified_for=600.0)
        with cls.connect(dsn) as hc:
            verified(hc)

            def run() -> None:
                for _ in range(10):
                    hc.execute(INSERT)
                hc.commit()

            assert xids_of(conn, run) == 1 + 9

    def test_drift_while_running(self, conn: psycopg.Connection, dsn: str, table: None) -> None:
        """Drift inside the window: the first collision heals and raises; later ones retry."""
        with Steady.connect(dsn) as hc:
            verified(hc)
            hc.execute("INSERT INTO t (note) VALUES ('debit')")
            top = drift(conn)
            with pytest.raises(pgerrors.UniqueViolation) as info:
                hc.execute(INSERT)
            assert info.value.diag.constraint_name == "t_pkey"
            assert hc.info.transaction_status == TransactionStatus.INERROR
            with pytest.raises(pgerrors.InFailedSqlTransaction):
                hc.execute(INSERT)
            hc.rollback()
            # Healed on the side connection: the next attempt succeeds.
            assert seq_next(conn, "t_id_seq") == top + 1
            (new_id,), = hc.execute("INSERT INTO t (note) VALUES ('again') RETURNING id")
            assert new_id == top + 1
            hc.commit()
            # The table is at risk now: protected, so a second drift is healed and retried.
            hc.execute("INSERT INTO t (note) VALUES ('debit')")
            top = drift(conn)
            (new_id,), = hc.execute("INSERT INTO t (note) VALUES ('retried') RETURNING id")
            assert new_id == top + 1
            hc.commit()
        assert conn.execute("SELECT count(*) FROM t WHERE note = 'debit'").fetchone() == (1,)

    def test_unprotected_collision_is_plain(self, make_db: Any) -> None:
        """An unprotected collision shows exactly what plain psycopg shows."""
        seen = []
        for cls in (psycopg.Connection, Steady):
            dsn = make_db()
            with psycopg.connect(dsn, autocommit=True) as admin:
                admin.execute("CREATE TABLE t (id serial PRIMARY KEY, note text)")
                with cls.connect(dsn) as c:
                    verified(c)  # type: ignore[arg-type]
                    log: list[Any] = []
                    c.execute("INSERT INTO t (note) VALUES ('debit')")
                    drift(admin)
                    for stmt in (INSERT, INSERT):
                        try:
                            c.execute(stmt)
                            log.append("ok")
                        except psycopg.Error as ex:
                            log.append((type(ex), ex.sqlstate, ex.diag.constraint_name,
                                        str(ex).splitlines()[0]))
                        log.append(c.info.transaction_status)
                    c.commit()
                rows = admin.execute("SELECT id, note FROM t ORDER BY id").fetchall()
            seen.append((log, rows))
        assert seen[0] == seen[1]
        assert seen[0][0][0][0] is pgerrors.UniqueViolation

    def test_explicit_key_write_drops_the_fact(self, conn: psycopg.Connection, dsn: str,
                                               table: None) -> None:
        """An explicit-key write through selfheal puts the table at risk: protected again."""
        with Steady.connect(dsn) as hc:
            verified(hc)
            start = seq_next(conn, "t_id_seq")
            hc.execute("INSERT INTO t (id, note) VALUES (%s, 'explicit')", (start,))
            (new_id,), = hc.execute("INSERT INTO t (note) VALUES ('x') RETURNING id")
            assert new_id == start + 1  # protected: healed and retried
            hc.commit()

    def test_schema_change_forgets(self, conn: psycopg.Connection, dsn: str,
                                   table: None) -> None:
        """DDL seen by selfheal forgets the facts: the table is checked again."""
        with Steady.connect(dsn, autocommit=True) as hc:

            def block() -> None:
                with hc.transaction():
                    hc.execute(INSERT)
                    hc.execute(INSERT)

            counts = [xids_of(conn, block), xids_of(conn, block)]
            hc.execute("ALTER TABLE t ADD COLUMN extra int")
            counts.append(xids_of(conn, block))
        # Unknown, both protected; checked when the next block opened; forgotten.
        assert counts == [3, 1, 3]


class TestTriggers:
    def test_update_without_triggers_is_not_protected(self, conn: psycopg.Connection, dsn: str,
                                                      table: None) -> None:
        conn.execute("INSERT INTO t (note) VALUES ('a')")
        with Steady.connect(dsn) as hc:

            def run() -> None:
                for _ in range(10):
                    hc.execute("UPDATE t SET note = 'b'")
                hc.commit()

            counts = [xids_of(conn, run), xids_of(conn, run)]
        # Triggers unknown at first: the nine UPDATEs inside the transaction
        # were protected; then known to be none.
        assert counts == [1 + 9, 1]

    def test_update_with_a_trigger_is_protected(self, conn: psycopg.Connection, dsn: str,
                                                table: None) -> None:
        """A trigger that inserts into a drifted table: the UPDATE is healed and retried."""
        conn.execute("CREATE TABLE audit (id serial PRIMARY KEY, what text)")
        conn.execute("CREATE FUNCTION log_it() RETURNS trigger LANGUAGE plpgsql AS $$"
                     " BEGIN INSERT INTO audit (what) VALUES ('update'); RETURN NEW; END $$")
        conn.execute("CREATE TRIGGER t_audit AFTER UPDATE ON t FOR EACH ROW"
                     " EXECUTE FUNCTION log_it()")
        conn.execute("INSERT INTO t (note) VALUES ('a')")
        with Steady.connect(dsn) as hc:
            verified(hc)
            conn.execute("INSERT INTO audit (id, what) SELECT g, 'seed'"
                         " FROM generate_series(1, 3) g")
            hc.execute("INSERT INTO t (note) VALUES ('kept')")
            hc.execute("UPDATE t SET note = 'b' WHERE id = 1")
            hc.commit()
        assert conn.execute("SELECT count(*) FROM audit").fetchone() == (4,)
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (6,)


class TestBounded:
    def test_facts_stay_bounded(self, conn: psycopg.Connection, dsn: str,
                                monkeypatch: pytest.MonkeyPatch) -> None:
        """However many tables a process writes to, each memory keeps at most LIMIT entries."""
        monkeypatch.setattr(insync, "LIMIT", 8)
        for i in range(20):
            conn.execute(f"CREATE TABLE t{i} (id serial PRIMARY KEY)")
        with Steady.connect(dsn) as hc:
            for _ in range(3):
                for i in range(20):
                    hc.execute(f"INSERT INTO t{i} DEFAULT VALUES")
                    hc.execute(f"INSERT INTO t{i} DEFAULT VALUES")
                hc.commit()
            facts = hc._selfheal_planner.facts
            sizes = [len(facts.catalog), len(facts.verified),
                     len(facts._wanted_names), len(facts._wanted_tables)]
        assert max(sizes) <= 8
        assert sizes[0] > 0 and sizes[1] > 0  # it did learn, within the bound
        assert conn.execute("SELECT count(*) FROM t0").fetchone() == (6,)


    def test_verdicts_stay_bounded(self, conn: psycopg.Connection, dsn: str, table: None,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
        """One verdict per statement string, at most VERDICTS of them per connection."""
        monkeypatch.setattr(protect, "VERDICTS", 16)
        with Steady.connect(dsn) as hc:
            for i in range(100):
                hc.execute(f"INSERT INTO t (note) VALUES ('{i}')")
                assert len(hc._selfheal_planner._verdicts) <= 16
            hc.commit()
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (100,)


def two_tenants(conn: psycopg.Connection, other: str) -> None:
    """Schemas tenant_a and `other`, each with a table t; `other`'s is behind its
    sequence (rows 1 to 5 written with explicit ids), tenant_a's is in sync."""
    for schema in ("tenant_a", other):
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("CREATE TABLE {}.t (id serial PRIMARY KEY, note text)").format(
            sql.Identifier(schema)))
    conn.execute(sql.SQL("INSERT INTO {}.t (id, note) SELECT g, 'explicit'"
                         " FROM generate_series(1, 5) g").format(sql.Identifier(other)))


class TestSchemas:
    def test_same_name_in_two_schemas(self, conn: psycopg.Connection, dsn: str) -> None:
        """A table verified in one tenant's schema says nothing of the other's."""
        two_tenants(conn, "Tenant B")
        with Steady.connect(dsn) as hc:
            hc.execute("SET search_path = tenant_a")
            hc.commit()
            verified(hc)
            hc.execute(sql.SQL("SET search_path = {}").format(sql.Identifier("Tenant B")))
            hc.commit()
            hc.execute("SELECT 1")
            # "t" is B's here: not verified, so protected, healed and retried.
            (new_id,), = hc.execute("INSERT INTO t (note) VALUES ('b') RETURNING id")
            assert new_id == 6
            hc.commit()
        assert conn.execute('SELECT count(*) FROM "Tenant B".t').fetchone() == (6,)
        assert conn.execute("SELECT count(*) FROM tenant_a.t").fetchone() == (4,)


class TestPassing:
    """What the hot path lets pass with one lookup (`Planner.passing`, `Planner.opening`)
    follows every change that could make a statement need protection."""

    @pytest.fixture
    def tenants(self, conn: psycopg.Connection) -> None:
        two_tenants(conn, "tenant_b")

    @pytest.mark.parametrize("switch", [
        "SET search_path = tenant_b",
        "SET LOCAL search_path = tenant_b",
        "SELECT set_config('search_path', 'tenant_b', true)",
    ])
    def test_search_path_changed_inside_a_transaction(
            self, conn: psycopg.Connection, dsn: str, tenants: None, switch: str) -> None:
        """A statement let through under one search_path is judged again once the
        transaction changes it: the same text now means the drifted table, which
        is protected, healed and retried."""
        with Steady.connect(dsn) as hc:
            hc.execute("SET search_path = tenant_a")
            hc.commit()
            verified(hc)
            returning = "INSERT INTO t (note) VALUES ('x') RETURNING id"
            hc.execute(returning)
            hc.execute(returning)
            # Let through by the lookup where the server reports the search_path
            # (PostgreSQL 18); before that a name two schemas have is always protected.
            reported = hc.info.parameter_status("search_path") is not None
            assert (returning in hc._selfheal_planner.passing) is reported
            hc.execute(switch)
            (new_id,), = hc.execute(returning)
            assert new_id == 6
            hc.commit()
        assert conn.execute("SELECT count(*) FROM tenant_b.t").fetchone() == (6,)
        assert conn.execute("SELECT count(*) FROM tenant_a.t").fetchone() == (6,)

    def test_another_connection_puts_the_table_at_risk(
            self, conn: psycopg.Connection, dsn: str, table: None) -> None:
        """An explicit-key write through another healing connection of the process
        ends what the first one lets pass: its next inserts, in the same
        transaction, are protected again."""
        with Steady.connect(dsn) as hc, Steady.connect(dsn, autocommit=True) as other:
            verified(hc)

            def run() -> None:
                hc.execute(INSERT)
                hc.execute(INSERT)
                start = seq_next(conn, "t_id_seq")
                other.execute("INSERT INTO t (id, note) VALUES (%s, 'explicit')", (start + 5,))
                hc.execute(INSERT)
                hc.execute(INSERT)
                hc.commit()

            # hc's transaction, other's insert, and one savepoint per insert after it.
            assert xids_of(conn, run) == 1 + 1 + 2

    def test_checks_keep_running(self, conn: psycopg.Connection, dsn: str,
                                 table: None) -> None:
        """Statements served from the lookups still let the facts' check run when it
        is due: a table stays verified, window after window, with no savepoint."""
        cls = HealingConnection.with_options(verified_for=0.3)
        with cls.connect(dsn) as hc:
            verified(hc)

            def run() -> int:
                count = 0
                deadline = time.monotonic() + 1.5
                while time.monotonic() < deadline:
                    for _ in range(3):
                        hc.execute(INSERT)
                    hc.commit()
                    count += 1
                    time.sleep(0.005)
                return count

            spent = [0]
            taken = xids_of(conn, lambda: spent.__setitem__(0, run()))
            # One id per transaction; a savepoint only where a window ran out
            # mid-transaction (a few at most, on a slow machine), never one per insert.
            assert spent[0] <= taken <= spent[0] + 15 < 4 * spent[0]
            assert len(hc._selfheal_planner.facts.verified) == 1

    def test_lookups_stay_bounded(self, conn: psycopg.Connection, dsn: str, table: None,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
        """At most VERDICTS statements are kept in each lookup."""
        monkeypatch.setattr(protect, "VERDICTS", 16)
        with Steady.connect(dsn) as hc:
            planner = hc._selfheal_planner
            for i in range(100):
                for _ in range(2):  # a string is kept from its second run on
                    hc.execute(f"SELECT {i}")
                    hc.execute(f"SELECT {i}, 1")
                    hc.commit()
                assert len(planner.passing) <= 16 and len(planner.opening) <= 16
            assert planner.passing and planner.opening


class TestOptions:
    def test_protect_must_be_known(self) -> None:
        with pytest.raises(ValueError, match="protect must be one of"):
            HealOptions(protect="sometimes")


class TestAsync:
    async def test_in_sync_then_drift(self, conn: psycopg.Connection, dsn: str,
                                      table: None) -> None:
        cls = AsyncHealingConnection.with_options(verified_for=600.0)
        async with await cls.connect(dsn) as hc:
            for _ in range(2):
                await hc.execute(INSERT)
                await hc.execute(INSERT)
                await hc.commit()
            before = next_xid(conn)
            for _ in range(20):
                await hc.execute(INSERT)
            await hc.commit()
            assert next_xid(conn) - before == 1  # in sync: no savepoint
            await hc.execute(INSERT)
            top = drift(conn)
            with pytest.raises(pgerrors.UniqueViolation):
                await hc.execute(INSERT)
            await hc.rollback()
            cur = await hc.execute("INSERT INTO t (note) VALUES ('again') RETURNING id")
            assert await cur.fetchone() == (top + 1,)
            await hc.commit()


class TestQuick:
    """`Planner.quick`, the drivers' hot path, answers as `Planner.plan` would, or not at all."""

    SCRIPT = (
        "SELECT 1",
        INSERT,
        "UPDATE t SET note = 'y' WHERE id = 1",
        "INSERT INTO t (id, note) VALUES (-1, 'explicit') ON CONFLICT DO NOTHING",
        INSERT,
        "SAVEPOINT a",
        INSERT,
        "RELEASE SAVEPOINT a",
        "INSERT INTO t (note) VALUES ('a'); INSERT INTO t (note) VALUES ('b')",
        INSERT,
        "INSERT INTO other (note) VALUES ('o')",
        "DELETE FROM t WHERE id = -1",
    )
    #: Run in the third round only: what DDL does to the answers.
    DDL = "CREATE TEMP TABLE scratch (x int)"

    @pytest.mark.parametrize("protect_mode", ["auto", "always"])
    @pytest.mark.parametrize("autocommit", [False, True])
    def test_quick_agrees_with_plan(self, conn: psycopg.Connection, dsn: str, table: None,
                                    monkeypatch: pytest.MonkeyPatch, protect_mode: str,
                                    autocommit: bool) -> None:
        """Over rounds of every kind of statement, in sync, at risk and after DDL, every
        answer of quick() is plan()'s; it answers the statements that need nothing."""
        conn.execute("CREATE TABLE other (id serial PRIMARY KEY, note text)")
        answers: list[tuple[str, Any, Any]] = []
        quick = protect.Planner.quick

        def checked(self: protect.Planner, status: int, autocommit: bool, query: Any,
                    options: HealOptions, savepoint: bool = False) -> Any:
            mode = quick(self, status, autocommit, query, options, savepoint)
            if mode is Mode.SAVEPOINT:
                return mode  # plan()'s own answer: quick() asked it
            planned = None
            if mode is not None:
                planned = self.plan(status, autocommit, query, None, options)
            answers.append((query, mode, planned))
            return mode

        monkeypatch.setattr(protect.Planner, "quick", checked)
        cls = HealingConnection.with_options(protect=protect_mode, verified_for=600.0)
        with cls.connect(dsn, autocommit=autocommit) as hc:
            planner = hc._selfheal_planner
            for i in range(6):
                for query in self.SCRIPT:
                    if not (autocommit and "SAVEPOINT" in query):
                        hc.execute(query)
                    # What the hot path lets pass on its own is what plan() would.
                    for kept in list(planner.passing):
                        answers.append((kept, Mode.PASS, planner.plan(
                            TransactionStatus.INTRANS, autocommit, kept, None,
                            hc.selfheal_options)))
                if i == 2:
                    hc.execute(self.DDL)
                if not autocommit:
                    hc.commit()
        assert [a for a in answers if a[1] is not None and a[1] is not a[2]] == []
        answered = {query for query, mode, _ in answers if mode is not None}
        assert {"UPDATE t SET note = 'y' WHERE id = 1", "DELETE FROM t WHERE id = -1"} <= answered
        assert ("RELEASE SAVEPOINT a" in answered) is not autocommit
        # A default-id insert into a table verified in sync needs nothing, but under
        # protect="always" in a transaction; the explicit-id one always has its look.
        other = "INSERT INTO other (note) VALUES ('o')"
        assert (other in answered) is (protect_mode == "auto" or autocommit)
        assert self.SCRIPT[3] not in answered
        # Every row landed once: 6 default-id rows into t a round.
        assert conn.execute("SELECT count(*) FROM t WHERE id > 0").fetchone() == (6 * 6,)
        assert conn.execute("SELECT count(*) FROM other").fetchone() == (6,)
