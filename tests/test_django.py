"""Django: the selfheal.django backend, management commands, and django-tenants.

Everything runs examples/django_project in subprocesses (see djangoproject.py);
the database state is checked here through a separate psycopg connection.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from . import djangoproject as dj
from .conftest import seq_next
from .test_report import Receiver

_tag = f"{os.getpid()}"


def drift(dsn: str, schema: str = "public", table: str = "orders_order", upto: int = 5,
          start: int = 1) -> None:
    """Insert rows with explicit ids start..upto; the table's sequence is left behind."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("INSERT INTO {} (id, item, quantity) SELECT g, 'seed', 1"
                    " FROM generate_series(%s::int, %s::int) g"
                    ).format(sql.Identifier(schema, table)),
            (start, upto),
        )


def query(dsn: str, text: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(text).fetchall()  # type: ignore[arg-type]


def next_id(dsn: str, schema: str = "public", table: str = "orders_order") -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return seq_next(conn, f"{schema}.{table}_id_seq")


def dj_name(dsn: str) -> str:
    """The database a DSN names."""
    return str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])


def settings_module(tmp_path: Path, base: str, body: str) -> Path:
    """Write settings module ``test_settings`` (importing everything from `base`) in tmp_path."""
    (tmp_path / "test_settings.py").write_text(f"from {base} import *  # noqa\n{body}\n")
    return tmp_path


# -- databases ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_template(server_dsn: str) -> Iterator[str]:
    """A database migrated with shop.settings, used as a template."""
    name = f"sh_dj_plain_{_tag}"
    dsn = dj.create_db(server_dsn, name)
    try:
        out = dj.manage(dsn, "migrate", "-v0")
        assert out.returncode == 0, out.stderr
        yield name
    finally:
        dj.drop_db(server_dsn, name)


@pytest.fixture(scope="module")
def tenants_template(server_dsn: str) -> Iterator[str]:
    """A django-tenants database: shared apps in public, tenants tenant_a and tenant_b."""
    name = f"sh_dj_tenants_{_tag}"
    dsn = dj.create_db(server_dsn, name)
    try:
        out = dj.manage(dsn, "migrate_schemas", "--shared", "-v0", settings=dj.TENANTS)
        assert out.returncode == 0, out.stderr
        dj.script(dsn, """
            from customers.models import Client, Domain
            for schema, host in (("tenant_a", "a.localhost"), ("tenant_b", "b.localhost")):
                tenant = Client(schema_name=schema, name=schema)
                tenant.save()  # creates the schema and migrates it
                Domain(domain=host, tenant=tenant, is_primary=True).save()
            emit(None)
        """, settings=dj.TENANTS)
        yield name
    finally:
        dj.drop_db(server_dsn, name)


_clones = iter(range(1_000_000))


@pytest.fixture
def shop(server_dsn: str, plain_template: str) -> Iterator[str]:
    """A fresh copy of the migrated example database for one test."""
    with dj.clone(server_dsn, plain_template, f"sh_dj_{_tag}_{next(_clones)}") as dsn:
        yield dsn


@pytest.fixture
def tenant_shop(server_dsn: str, tenants_template: str) -> Iterator[str]:
    """A fresh copy of the django-tenants database for one test."""
    with dj.clone(server_dsn, tenants_template, f"sh_djt_{_tag}_{next(_clones)}") as dsn:
        yield dsn


# -- the backend -----------------------------------------------------------------------------


class TestBackend:
    def test_connections_heal_behind_djangos_cursor(self, shop: str) -> None:
        """ENGINE selfheal.django opens HealingConnection; Django keeps exactly its own
        cursor class, and cursor_factory reads back what Django set."""
        got = dj.script(shop, """
            from django.db import connection
            from django.db.backends.postgresql.base import Cursor, ServerBindingCursor
            from selfheal import HealingConnection
            with connection.cursor() as cursor:
                raw = cursor.cursor
            emit([isinstance(connection.connection, HealingConnection),
                  type(raw) in (Cursor, ServerBindingCursor),
                  connection.connection.cursor_factory is type(raw)])
        """)
        assert got["result"] == [True, True, True]

    def test_create_in_autocommit(self, shop: str) -> None:
        """Model.objects.create() in autocommit heals and gets the next free id."""
        drift(shop)
        got = dj.script(shop, """
            from orders.models import Order
            with capture_logs() as logs:
                order = Order.objects.create(item="book")
            emit(order.id, logs)
        """)
        assert got["result"] == 6
        [heal] = got["events"]
        assert (heal["event"], heal["schema"], heal["table"], heal["retry"]) == (
            "sequence_resynced", "public", "orders_order", "succeeded")

    def test_atomic_keeps_earlier_work(self, shop: str) -> None:
        """Inside transaction.atomic() the heal keeps the block's earlier writes."""
        drift(shop)
        got = dj.script(shop, """
            from django.db import transaction
            from orders.models import AuditEntry, Order
            with transaction.atomic():
                AuditEntry.objects.create(message="first")
                Order.objects.filter(id=2).update(item="touched")
                order = Order.objects.create(item="book")
            emit(order.id)
        """)
        assert got["result"] == 6
        assert query(shop, "SELECT message FROM orders_auditentry") == [("first",)]
        assert query(shop, "SELECT item FROM orders_order WHERE id IN (2, 6) ORDER BY id") == [
            ("touched",), ("book",)]

    def test_nested_atomic(self, shop: str) -> None:
        """Nested atomic blocks: a heal in one savepoint, a rollback of another."""
        drift(shop)
        got = dj.script(shop, """
            from django.db import transaction
            from orders.models import AuditEntry, Order
            with transaction.atomic():
                AuditEntry.objects.create(message="outer")
                with transaction.atomic():
                    kept = Order.objects.create(item="kept")
                try:
                    with transaction.atomic():
                        Order.objects.create(item="rolled back")
                        raise ValueError
                except ValueError:
                    pass
                after = Order.objects.create(item="after")
            emit([kept.id, after.id])
        """)
        assert got["result"] == [6, 8]
        assert query(shop, "SELECT id, item FROM orders_order WHERE id > 5 ORDER BY id") == [
            (6, "kept"), (8, "after")]
        assert query(shop, "SELECT count(*) FROM orders_auditentry") == [(1,)]

    def test_bulk_create_every_row_once(self, shop: str) -> None:
        """bulk_create() in batches heals mid-way; each object lands once, with its own id."""
        drift(shop, start=4, upto=8)  # the second batch of three draws 4..6
        got = dj.script(shop, """
            from orders.models import Order
            with capture_logs() as logs:
                orders = Order.objects.bulk_create(
                    [Order(item=f"bulk {i}") for i in range(10)], batch_size=3)
            emit({o.item: o.id for o in orders}, logs)
        """)
        assert len(got["events"]) == 1
        rows = dict(query(shop, "SELECT item, id FROM orders_order WHERE item LIKE 'bulk%'"))
        assert rows == got["result"]
        assert sorted(rows.values()) == [1, 2, 3, 9, 10, 11, 12, 13, 14, 15]
        assert query(shop, "SELECT count(*), count(DISTINCT id) FROM orders_order") == [(15, 15)]

    def test_explicit_pks_advance_the_sequence(self, shop: str) -> None:
        """bulk_create() with explicit pks (a seeder's way) moves the sequence past them
        once it succeeded: the next create() from any client gets the next free id."""
        got = dj.script(shop, """
            from django.db import transaction
            from orders.models import Order
            with capture_logs() as logs:
                with transaction.atomic():
                    Order.objects.bulk_create(
                        [Order(id=100 + i, item=f"seeded {i}") for i in range(3)])
                made = Order.objects.create(item="after the seeder")
            emit(made.id, logs)
        """)
        assert got["result"] == 103
        [event] = [e for e in got["events"] if "explicit" in e["event"]]
        assert (event["event"], event["table"], event["after"]) == (
            "explicit_ids_advanced", "orders_order", 103)
        assert "seeded" not in event["statement"]
        assert next_id(shop) == 104

    def test_loaddata(self, shop: str) -> None:
        """loaddata inserts fixture rows without a pk into a drifted table."""
        drift(shop)
        out = dj.manage(shop, "loaddata", "orders")
        assert out.returncode == 0, out.stderr
        assert "Installed 3 object(s)" in out.stdout
        assert query(shop, "SELECT id, item FROM orders_order WHERE id > 5 ORDER BY id") == [
            (6, "fixture mug"), (7, "fixture pen")]
        assert query(shop, "SELECT id, message FROM orders_auditentry") == [(1, "fixture loaded")]

    def test_atomic_requests(self, shop: str) -> None:
        """A view under ATOMIC_REQUESTS heals and keeps the request's earlier write."""
        drift(shop)
        got = dj.script(shop, """
            from django.db import connection
            from django.test import Client
            assert connection.settings_dict["ATOMIC_REQUESTS"]
            response = Client().post("/orders/", {"item": "lamp"})
            emit([response.status_code, response.json()])
        """)
        assert got["result"] == [200, {"id": 6}]
        assert query(shop, "SELECT message FROM orders_auditentry") == [
            ("order placed for lamp",)]

    def test_unhealable_is_integrity_error(self, shop: str) -> None:
        """A collision selfheal cannot fix is Django's IntegrityError over UniqueViolation."""
        drift(shop)
        got = dj.script(shop, """
            from django.db import IntegrityError
            from orders.models import Order
            try:
                Order.objects.create(id=1, item="duplicate")
            except IntegrityError as ex:
                error = type(ex.__cause__).__name__
            emit([error, Order.objects.create(item="next").id])
        """)
        assert got["result"] == ["UniqueViolation", 6]

    def test_options(self, shop: str, tmp_path: Path) -> None:
        """OPTIONS["selfheal"] configures the connections: retry off heals, then re-raises."""
        drift(shop)
        extra = settings_module(tmp_path, dj.PLAIN,
                                'DATABASES["default"]["OPTIONS"]["selfheal"] = {"retry": False}')
        got = dj.script(shop, """
            from django.db import IntegrityError, connection
            from orders.models import Order
            with capture_logs() as logs:
                try:
                    Order.objects.create(item="first")
                except IntegrityError:
                    pass
            emit([connection.connection.selfheal_options.retry,
                  Order.objects.create(item="second").id], logs)
        """, settings="test_settings", extra_path=extra)
        assert got["result"] == [False, 6]
        assert [e["retry"] for e in got["events"]] == ["not_attempted"]

    def test_atomic_catching_errors_as_django(self, server_dsn: str, plain_template: str,
                                              tmp_path: Path) -> None:
        """atomic() blocks that catch IntegrityError behave exactly as with Django's own
        backend: a caught error without a savepoint poisons the block, one inside a
        nested atomic() is rolled back alone. Explicit duplicate ids are real errors."""
        code = """
            from django.db import IntegrityError, transaction, connection
            from django.db.transaction import TransactionManagementError
            from orders.models import AuditEntry, Order
            seen = []
            def attempt(fn):
                try:
                    fn()
                    seen.append("ok")
                except (IntegrityError, TransactionManagementError) as ex:
                    seen.append(type(ex).__name__)
            def poisoned():
                with transaction.atomic():
                    AuditEntry.objects.create(message="before")
                    attempt(lambda: Order.objects.create(id=1, item="dup"))
                    attempt(lambda: AuditEntry.objects.create(message="after"))
            def nested():
                with transaction.atomic():
                    AuditEntry.objects.create(message="outer")
                    def inner():
                        with transaction.atomic():
                            Order.objects.create(id=1, item="dup")
                    attempt(inner)
                    Order.objects.create(item="default id")
            attempt(poisoned)
            attempt(nested)
            attempt(lambda: Order.objects.create(id=1, item="dup in autocommit"))
            emit([seen, sorted(AuditEntry.objects.values_list("message", flat=True)),
                  sorted(Order.objects.values_list("item", flat=True))])
        """
        results = []
        for engine in ("django.db.backends.postgresql", "selfheal.django"):
            (tmp_path / engine).mkdir()
            extra = settings_module(tmp_path / engine, dj.PLAIN,
                                    f'DATABASES["default"]["ENGINE"] = "{engine}"')
            with dj.clone(server_dsn, plain_template,
                          f"sh_dj_{_tag}_{next(_clones)}") as dsn:
                drift(dsn, upto=1)  # order 1 exists; the sequence is past it
                with psycopg.connect(dsn, autocommit=True) as c:
                    c.execute("SELECT setval('orders_order_id_seq', 1)")
                results.append(dj.script(dsn, code, settings="test_settings",
                                         extra_path=extra)["result"])
        plain, healing = results
        assert healing == plain
        assert "IntegrityError" in plain[0]

    def test_bad_options(self, shop: str, tmp_path: Path) -> None:
        """Unknown OPTIONS["selfheal"] keys are an ImproperlyConfigured error."""
        extra = settings_module(tmp_path, dj.PLAIN,
                                'DATABASES["default"]["OPTIONS"]["selfheal"] = {"retyr": 1}')
        out = dj.run(shop, ["-c", "import django; django.setup();"
                               " from django.db import connection; connection.ensure_connection()"],
                     settings="test_settings", extra_path=extra)
        assert out.returncode == 1
        assert "ImproperlyConfigured: bad OPTIONS['selfheal']" in out.stderr

    def test_sentry_event(self, shop: str, tmp_path: Path) -> None:
        """With Sentry set up in settings (DjangoIntegration on), a heal sends one event."""
        drift(shop)
        receiver = Receiver()
        extra = settings_module(tmp_path, dj.PLAIN, "\n".join([
            "import os, sentry_sdk",
            "sentry_sdk.init(dsn=os.environ['SENTRY_DSN'])",
        ]))
        try:
            dj.script(shop, """
                import sentry_sdk
                from orders.models import Order
                Order.objects.create(item="reported")
                sentry_sdk.flush()
                emit(None)
            """, settings="test_settings", extra_path=extra, env={"SENTRY_DSN": receiver.dsn})
        finally:
            receiver.close()
        [event] = receiver.events
        assert event["tags"]["selfheal.table"] == "public.orders_order"

    def test_connection_pool(self, shop: str) -> None:
        """With OPTIONS["pool"], Django's psycopg pool builds healing connections."""
        drift(shop)
        got = dj.script(shop, """
            from django.db import connection
            from orders.models import Order
            order = Order.objects.create(item="pooled")
            emit([type(connection.connection).__name__, connection.pool.connection_class.__name__,
                  order.id])
        """, env={"DJANGO_DB_POOL": "1"})
        assert got["result"] == ["HealingConnection", "HealingConnection", 6]


# -- management commands ------------------------------------------------------------------


class TestManagementCommands:
    def test_check_reports_drift(self, shop: str) -> None:
        """selfheal_check lists the drifted table and exits 1."""
        drift(shop)
        out = dj.manage(shop, "selfheal_check")
        assert out.returncode == 1, out.stderr
        [header, row, summary] = out.stdout.splitlines()
        assert header.split() == ["DATABASE", "TABLE", "KEY", "MAX", "NEXT", "STATUS"]
        assert row.split()[1:] == ["public.orders_order", "5", "1", "behind", "by", "5"]
        assert re.fullmatch(
            r"check: 4 sequences in 1 database \(\d+\.\d\d s\): 1 behind in 1 database", summary)

    def test_check_in_sync(self, shop: str) -> None:
        """selfheal_check exits 0 when every sequence is past its keys."""
        out = dj.manage(shop, "selfheal_check")
        assert out.returncode == 0, out.stderr
        assert re.fullmatch(
            r"check: 4 sequences in 1 database \(\d+\.\d\d s\): all in sync\n", out.stdout)

    def test_check_json_table(self, shop: str) -> None:
        """--json --table gives one object for that table."""
        drift(shop)
        out = dj.manage(shop, "selfheal_check", "--json", "--table", "orders_order")
        assert out.returncode == 1, out.stderr
        [item] = json.loads(out.stdout)
        assert {k: item[k] for k in ("schema", "table", "max_value", "next_value", "in_sync")} == {
            "schema": "public", "table": "orders_order", "max_value": 5, "next_value": 1,
            "in_sync": False}

    def test_unknown_table(self, shop: str) -> None:
        """A --table that matches nothing is an error: exit 2, one line on stderr."""
        out = dj.manage(shop, "selfheal_check", "--table", "nope")
        assert out.returncode == 2
        assert out.stderr.strip().splitlines() == [
            f"CommandError: table 'nope' not found in database {dj_name(shop)!r}"
            " (or it has no sequence-backed primary key)"]

    def test_unknown_database_alias(self, shop: str) -> None:
        """--database naming no configured alias: one CommandError line, exit 2."""
        out = dj.manage(shop, "selfheal_check", "--database", "nosuch")
        assert out.returncode == 2
        assert out.stderr.strip().splitlines() == [
            "CommandError: no database 'nosuch' in settings.DATABASES (configured: default)"]

    def test_fix_failure(self, shop: str) -> None:
        """A sequence that cannot move is reported; the others are fixed; exit 2."""
        drift(shop)
        with psycopg.connect(shop, autocommit=True) as conn:
            conn.execute("INSERT INTO orders_auditentry (id, message) VALUES (1, 'a'), (3, 'b')")
            conn.execute("ALTER TABLE orders_order ALTER COLUMN id SET MAXVALUE 5")
        out = dj.manage(shop, "selfheal_fix")
        assert out.returncode == 2
        assert "public.orders_order" in out.stdout and "error: sequence" in out.stdout
        assert out.stderr.strip().splitlines()[-1] == (
            "CommandError: 1 of 4 sequences could not be fixed")
        assert next_id(shop, table="orders_auditentry") == 4

    def test_unreachable_database(self, shop: str) -> None:
        """A database that cannot be reached is exit 2 with one line, no traceback."""
        missing = shop.replace(dj_name(shop), "sh_dj_no_such_db")
        out = dj.manage(missing, "selfheal_check")
        assert out.returncode == 2
        [line] = out.stderr.strip().splitlines()
        assert line.startswith("CommandError: ") and "sh_dj_no_such_db" in line

    def test_call_command(self, shop: str) -> None:
        """From call_command() drift is no exception (exit_code says 1); errors raise."""
        drift(shop)
        got = dj.script(shop, """
            from django.core.management import CommandError, call_command
            from selfheal.django.management.commands.selfheal_check import Command
            command = Command()
            call_command(command, "--json")
            try:
                call_command("selfheal_check", table=["nope"])
            except CommandError as ex:
                error = ex.returncode
            emit([command.exit_code, error])
        """)
        assert got["result"] == [1, 2]

    def test_fix_dry_run(self, shop: str) -> None:
        """selfheal_fix --dry-run moves nothing and exits 1."""
        drift(shop)
        out = dj.manage(shop, "selfheal_fix", "--dry-run")
        assert out.returncode == 1, out.stderr
        assert "behind by 5, would move" in out.stdout
        assert next_id(shop) == 1

    def test_fix(self, shop: str) -> None:
        """selfheal_fix moves the sequence past the keys and exits 0; check agrees."""
        drift(shop)
        out = dj.manage(shop, "selfheal_fix", "--json")
        assert out.returncode == 0, out.stderr
        moved = [i for i in json.loads(out.stdout) if i["changed"]]
        assert [(i["table"], i["before"], i["after"], i["in_sync"]) for i in moved] == [
            ("orders_order", 1, 6, True)]
        assert next_id(shop) == 6
        assert dj.manage(shop, "selfheal_check").returncode == 0


# -- django-tenants ----------------------------------------------------------------------------


class TestTenants:
    def test_heals_the_tenant_schema(self, tenant_shop: str) -> None:
        """An insert in a tenant heals that tenant's table only, not public's or another's."""
        drift(tenant_shop, "tenant_a")
        drift(tenant_shop, "public", upto=3)
        drift(tenant_shop, "tenant_b", upto=2)
        got = dj.script(tenant_shop, """
            from django.db import connection
            from orders.models import Order
            connection.set_schema("tenant_a")
            with capture_logs() as logs:
                order = Order.objects.create(item="tenant book")
            emit(order.id, logs)
        """, settings=dj.TENANTS)
        assert got["result"] == 6
        [heal] = got["events"]
        assert (heal["schema"], heal["table"]) == ("tenant_a", "orders_order")
        assert next_id(tenant_shop, "public") == 1
        assert next_id(tenant_shop, "tenant_b") == 1

    def test_heal_follows_the_error_not_search_path(self, tenant_shop: str, tmp_path: Path
                                                    ) -> None:
        """Healed on a side connection (public search_path), the tenant named in the error moves."""
        drift(tenant_shop, "tenant_a")
        drift(tenant_shop, "public", upto=3)
        extra = settings_module(tmp_path, dj.TENANTS,
                                'DATABASES["default"]["OPTIONS"]["selfheal"] = '
                                '{"savepoints": False}')
        got = dj.script(tenant_shop, """
            from django.db import IntegrityError, connection, transaction
            from orders.models import AuditEntry, Order
            connection.set_schema("tenant_a")
            with capture_logs() as logs:
                try:
                    with transaction.atomic():
                        AuditEntry.objects.create(message="opens the transaction")
                        Order.objects.create(item="first")
                except IntegrityError:
                    pass
            emit(Order.objects.create(item="second").id, logs)
        """, settings="test_settings", extra_path=extra)
        assert got["result"] == 6
        [heal] = got["events"]
        assert (heal["schema"], heal["retry"]) == ("tenant_a", "not_attempted")
        assert next_id(tenant_shop, "public") == 1

    def test_request_through_tenant_middleware(self, tenant_shop: str) -> None:
        """A request for a tenant's domain (ATOMIC_REQUESTS) heals that tenant's table."""
        drift(tenant_shop, "tenant_b")
        got = dj.script(tenant_shop, """
            from django.test import Client
            response = Client(HTTP_HOST="b.localhost").post("/orders/", {"item": "mug"})
            emit([response.status_code, response.json()])
        """, settings=dj.TENANTS)
        assert got["result"] == [200, {"id": 6}]
        assert query(tenant_shop, "SELECT message FROM tenant_b.orders_auditentry") == [
            ("order placed for mug",)]
        assert query(tenant_shop, "SELECT count(*) FROM tenant_a.orders_auditentry") == [(0,)]

    def test_commands_with_schema_pattern(self, tenant_shop: str) -> None:
        """selfheal_check/fix --schema 'tenant_%' look at tenant schemas only."""
        drift(tenant_shop, "tenant_a")
        drift(tenant_shop, "public", upto=3)
        out = dj.manage(tenant_shop, "selfheal_check", "--json", "--schema", "tenant_%",
                        settings=dj.TENANTS)
        assert out.returncode == 1, out.stderr
        items = json.loads(out.stdout)
        assert {i["schema"] for i in items} == {"tenant_a", "tenant_b"}
        assert [(i["schema"], i["table"]) for i in items if not i["in_sync"]] == [
            ("tenant_a", "orders_order")]
        out = dj.manage(tenant_shop, "selfheal_fix", "--schema", "tenant_%", settings=dj.TENANTS)
        assert out.returncode == 0, out.stderr
        assert next_id(tenant_shop, "tenant_a") == 6
        assert next_id(tenant_shop, "public") == 1
        assert dj.manage(tenant_shop, "selfheal_check", settings=dj.TENANTS).returncode == 1

    def test_original_backend_setting(self, tenant_shop: str, tmp_path: Path) -> None:
        """django-tenants' ENGINE with ORIGINAL_BACKEND = "selfheal.django" heals too."""
        drift(tenant_shop, "tenant_a")
        extra = settings_module(tmp_path, dj.TENANTS, "\n".join([
            'DATABASES["default"]["ENGINE"] = "django_tenants.postgresql_backend"',
            'ORIGINAL_BACKEND = "selfheal.django"',
        ]))
        got = dj.script(tenant_shop, """
            from django.db import connection
            from orders.models import Order
            from selfheal import HealingConnection
            connection.set_schema("tenant_a")
            order = Order.objects.create(item="via ORIGINAL_BACKEND")
            emit([isinstance(connection.connection, HealingConnection), order.id])
        """, settings="test_settings", extra_path=extra)
        assert got["result"] == [True, 6]

    def test_cli_schema_pattern(self, tenant_shop: str) -> None:
        """The documented ``selfheal check --schema 'tenant_%'`` sees tenant schemas only."""
        drift(tenant_shop, "tenant_a")
        drift(tenant_shop, "public", upto=3)
        out = dj.run(tenant_shop, ["-m", "selfheal", "check", tenant_shop, "--schema", "tenant_%",
                                   "--json"])
        assert out.returncode == 1, out.stderr
        items = json.loads(out.stdout)
        assert {i["schema"] for i in items} == {"tenant_a", "tenant_b"}
        assert [i["schema"] for i in items if not i["in_sync"]] == ["tenant_a"]

