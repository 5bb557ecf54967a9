"""`selfheal.fleet`: targets, shards, and checking and fixing many databases."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

import selfheal
from selfheal import fleet
from selfheal.api import check_readable
from selfheal.discover import TableInfo
from selfheal.fleet import FleetError, Target

from .conftest import round_trips
from .tenants import dbname, make_tenants, next_value, seed, unique_prefix


def like(prefix: str) -> str:
    return prefix.replace("_", "\\_") + "%"


def names(n: int) -> list[Target]:
    return [Target(f"dbname=tenant{i:05d}", f"tenant{i:05d}") for i in range(n)]


class TestRedact:
    @pytest.mark.parametrize(
        ("dsn", "shown"),
        [
            ("postgresql://app:hunter2@db:5432/shop", "postgresql://app:***@db:5432/shop"),
            ("postgres://app@db/shop?password=hunter2&sslmode=require",
             "postgres://app@db/shop?password=***&sslmode=require"),
            ("host=db dbname=shop password=hunter2", "host=db dbname=shop password=***"),
            ("postgresql://db/shop", "postgresql://db/shop"),
        ],
    )
    def test_password_hidden(self, dsn: str, shown: str) -> None:
        """Passwords in URLs, URL parameters and key=value strings are replaced by ***."""
        assert fleet.redact(dsn) == shown


class TestPlan:
    def test_plain_dsns(self, make_db: Callable[..., str]) -> None:
        """Without tenant options each DSN is one target, named by its database, sorted."""
        prefix = unique_prefix()
        b, a = make_db(f"{prefix}b"), make_db(f"{prefix}a")
        got = fleet.plan([b, a, b])
        assert [t.name for t in got.targets] == [f"{prefix}a", f"{prefix}b"]
        assert got.skipped == []

    def test_pattern_lists_server(self, make_db: Callable[..., str], server_dsn: str) -> None:
        """A LIKE pattern lists the server's databases; each target keeps the DSN's parameters."""
        prefix = unique_prefix()
        made = [make_db(f"{prefix}{i}") for i in (2, 1, 3)]
        got = fleet.plan([server_dsn], databases=like(prefix))
        assert [t.name for t in got.targets] == sorted(dbname(d) for d in made)
        params = conninfo_to_dict(got.targets[0].conninfo)
        server = conninfo_to_dict(server_dsn)
        assert params["dbname"] == f"{prefix}1"
        assert params["host"] == server["host"] and params["user"] == server["user"]

    def test_tenants_query_rows(self, make_db: Callable[..., str], server_dsn: str) -> None:
        """Tenant rows that look like DSNs are used as DSNs, others as database names."""
        dsn = make_db()
        query = ("SELECT * FROM (VALUES ('plain_name'), ('host=elsewhere dbname=x'),"
                 " ('postgresql://u@h/urldb')) v")
        got = fleet.plan([dsn], tenants_query=query)
        by_name = {t.name: t for t in got.targets}
        assert set(by_name) == {"plain_name", "x", "urldb"}
        assert conninfo_to_dict(by_name["plain_name"].conninfo)["host"] == \
            conninfo_to_dict(server_dsn)["host"]
        assert conninfo_to_dict(by_name["x"].conninfo)["host"] == "elsewhere"

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"databases": "shf_nothing_matches_%"}, "no database matching"),
            ({"databases": "x\\"}, "bad database pattern"),
            ({"tenants_query": "SELECT 'a' WHERE false"}, "returned none"),
            ({"tenants_query": "SELECT NULL::text"}, "names or DSNs"),
        ],
    )
    def test_bad_tenant_options(self, server_dsn: str, kwargs: dict[str, str],
                                message: str) -> None:
        """Tenant options that select nothing, or cannot, raise FleetError."""
        with pytest.raises(FleetError, match=message):
            fleet.plan([server_dsn], **kwargs)  # type: ignore[arg-type]

    def test_bad_dsn(self) -> None:
        """A malformed DSN raises FleetError before anything connects."""
        with pytest.raises(FleetError, match="invalid DSN"):
            fleet.plan(["host=db", "oops"])


class TestShard:
    @pytest.mark.parametrize("count", [1, 2, 3, 8, 50])
    def test_partition(self, count: int) -> None:
        """The slices of N are disjoint and cover every target exactly once."""
        targets = names(1000)
        seen = [t for i in range(count) for t in fleet.shard(targets, i, count)]
        assert sorted(seen, key=lambda t: t.name) == targets

    def test_balanced(self) -> None:
        """Thousands of tenants spread evenly enough over the slices."""
        sizes = [len(fleet.shard(names(4000), i, 8)) for i in range(8)]
        assert min(sizes) > 400 and max(sizes) < 600

    def test_stable_when_tenants_change(self) -> None:
        """A tenant keeps its slice when others come and go (pods list at different times)."""
        before = {t.name: i for i in range(4) for t in fleet.shard(names(300), i, 4)}
        changed = names(400)[50:]
        after = {t.name: i for i in range(4) for t in fleet.shard(changed, i, 4)}
        assert all(after[n] == before[n] for n in after if n in before)

    @pytest.mark.parametrize("text", ["0/1", "3/4", " 2 / 3 "])
    def test_parse(self, text: str) -> None:
        """I/N parses with 0 <= I < N."""
        index, count = fleet.parse_shard(text)
        assert 0 <= index < count

    @pytest.mark.parametrize("text", ["4/4", "1/0", "-1/2", "1", "a/b", "1/2/3", ""])
    def test_parse_rejects(self, text: str) -> None:
        """Anything else raises FleetError."""
        with pytest.raises(FleetError, match="bad shard"):
            fleet.parse_shard(text)


class TestCheckFleet:
    def test_constant_round_trips(self, make_db: Callable[..., str]) -> None:
        """A database costs the same round trips with 3 tables as with 80."""
        counts = []
        for n in (3, 80):
            dsn = make_db()
            with psycopg.connect(dsn, autocommit=True) as c:
                for i in range(n):
                    c.execute(sql.SQL("CREATE TABLE {} (id serial PRIMARY KEY)").format(
                        sql.Identifier(f"t{i}")))
            with fleet._connect(Target(dsn, dbname(dsn)), 5, 2) as conn, \
                    round_trips(conn) as trips:
                assert len(selfheal.check(conn)) == n
            counts.append(trips.count)
        assert counts[0] == counts[1] <= 4

    def test_sibling_databases_take_one_round_trip(self, make_db: Callable[..., str]) -> None:
        """A database whose tables are those of the one checked before it costs one round
        trip after connecting (discovery and status together); different tables, or one
        missing, cost more but read right."""
        shapes = [("a", "b"), ("a", "b"), ("a", "c"), ("a",), ("a",)]
        dsns = []
        for i, tables in enumerate(shapes):
            dsn = make_db()
            with psycopg.connect(dsn, autocommit=True) as c:
                for t in tables:
                    c.execute(sql.SQL("CREATE TABLE {} (id serial PRIMARY KEY)").format(
                        sql.Identifier(t)))
                    c.execute(sql.SQL("INSERT INTO {} (id) VALUES (%s)").format(
                        sql.Identifier(t)), (i + 1,))
            dsns.append(dsn)
        guess: list[TableInfo] = []
        counts, found = [], []
        for dsn in dsns:
            with fleet._connect(Target(dsn, dbname(dsn)), 5, 2) as conn, \
                    round_trips(conn) as trips:
                statuses, _ = check_readable(conn, guess=guess)
            counts.append(trips.count)
            found.append({(s.table, s.max_value, s.in_sync) for s in statuses})
        assert counts[0] == 2 and counts[1] == 1 and counts[2] >= 2 and counts[4] == 1
        assert found == [{(t, i + 1, False) for t in tables} for i, tables in enumerate(shapes)]

    def test_connections_bounded_by_jobs(self, make_db: Callable[..., str],
                                         server_dsn: str) -> None:
        """No more than `jobs` databases are open at once."""
        prefix = unique_prefix()
        tenants = make_tenants(make_db, prefix, 6)
        lockers = []
        for dsn in tenants:  # every check waits out its lock timeout: time to look
            locker = psycopg.connect(dsn)
            locker.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
            lockers.append(locker)
        seen: list[int] = []
        stop = threading.Event()

        def watch() -> None:
            with psycopg.connect(server_dsn, autocommit=True) as admin:
                while not stop.is_set():
                    row = admin.execute("SELECT count(*) FROM pg_stat_activity"
                                        " WHERE application_name = 'selfheal'").fetchone()
                    seen.append(row[0] if row else 0)
                    time.sleep(0.02)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            targets = fleet.plan([server_dsn], databases=like(prefix)).targets
            report = fleet.check_fleet(targets, jobs=2, lock_timeout=0.3)
        finally:
            stop.set()
            watcher.join()
            for locker in lockers:
                locker.close()
        assert len(report.failed) == 6
        assert all("lock timeout" in (db.error or "") for db in report.databases)
        assert max(seen) == 2

    def test_failure_isolated(self, make_db: Callable[..., str]) -> None:
        """A failing database is recorded and the others are still checked, in target order."""
        prefix = unique_prefix()
        good = make_tenants(make_db, prefix, 2)
        bad = Target("host=127.0.0.1 port=1 dbname=gone connect_timeout=2", "gone")
        targets = [Target(good[0], dbname(good[0])), bad, Target(good[1], dbname(good[1]))]
        report = fleet.check_fleet(targets, jobs=3)
        assert [db.target for db in report.databases] == targets
        assert report.databases[1].error is not None
        assert [len(db.sequences) for db in report.databases] == [3, 0, 3]
        assert report.exit_code == 2

    def test_exit_codes(self, conn: psycopg.Connection, dsn: str) -> None:
        """exit_code is 1 for drift, 0 once fixed."""
        seed(conn, users=4)
        target = [Target(dsn, dbname(dsn))]
        assert fleet.check_fleet(target).exit_code == 1
        assert fleet.fix_fleet(target, dry_run=True).exit_code == 1
        assert fleet.fix_fleet(target).exit_code == 0
        assert fleet.check_fleet(target).exit_code == 0


class TestFixFleet:
    def test_unknown_table_moves_nothing(self, conn: psycopg.Connection, dsn: str) -> None:
        """A table missing everywhere raises before any sequence of the run moves."""
        seed(conn, users=4)
        with pytest.raises(FleetError, match="table 'nope' not found"):
            fleet.fix_fleet([Target(dsn, dbname(dsn))], tables=["users", "nope"])
        assert next_value(dsn, "public.users_id_seq") == 1

    def test_report(self, conn: psycopg.Connection, dsn: str) -> None:
        """The report keeps the state found and the resync done, per sequence."""
        seed(conn, users=4)
        report = fleet.fix_fleet([Target(dsn, dbname(dsn))], tables=["users"])
        [seq] = report.sequences
        assert (seq.found.next_value, seq.status.next_value) == (1, 5)
        assert seq.changed and seq.in_sync and seq.resync is not None
        assert seq.resync.method == "nextval"

    def test_descending_sequence(self, conn: psycopg.Connection, dsn: str) -> None:
        """A descending sequence is measured and healed downwards."""
        conn.execute("CREATE SEQUENCE down INCREMENT -1 MAXVALUE -1 START -1")
        conn.execute("CREATE TABLE d (id int PRIMARY KEY DEFAULT nextval('down'))")
        conn.execute("INSERT INTO d (id) VALUES (-1), (-2), (-3)")
        [found] = fleet.check_fleet([Target(dsn, dbname(dsn))]).sequences
        assert fleet.gap(found.status) == 3
        [seq] = fleet.fix_fleet([Target(dsn, dbname(dsn))]).sequences
        assert seq.status.next_value == -4 and seq.in_sync


class TestGap:
    @pytest.mark.parametrize(
        ("max_value", "next_value", "increment", "expected"),
        [(None, 1, 1, 0), (10, 11, 1, 0), (10, 10, 1, 1), (10, 1, 1, 10), (10, 1, 5, 2)],
    )
    def test_gap(self, max_value: int | None, next_value: int, increment: int,
                 expected: int) -> None:
        """gap counts the nextval() calls needed to pass the highest key (0 when in sync)."""
        status = selfheal.SequenceStatus("s", "t", "id", "s.t_id_seq", max_value,
                                         None if max_value is None else 1, next_value,
                                         increment)
        assert fleet.gap(status) == expected
