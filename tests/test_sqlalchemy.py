"""SQLAlchemy 2: install() on sync and asyncio engines, Core and ORM, pool behaviour."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sentry_sdk
import sqlalchemy as sa
from psycopg import errors as pgerrors
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import event, exc
from sqlalchemy.engine import URL, Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from structlog.testing import capture_logs

import selfheal.sqlalchemy
from selfheal import AsyncHealingConnection, HealingConnection, HealOptions

from .conftest import seq_next
from .test_report import Receiver

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


class Base(DeclarativeBase):
    pass


class Payment(Base):
    __tablename__ = "payments"
    id: Mapped[int] = mapped_column(primary_key=True)
    note: Mapped[str | None]


class Log(Base):
    __tablename__ = "log"
    id: Mapped[int] = mapped_column(primary_key=True)
    msg: Mapped[str]


class Customer(Base):
    __tablename__ = "customers"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(unique=True)


def sa_url(dsn: str, driver: str = "psycopg") -> URL:
    """A postgresql+psycopg URL for a libpq DSN; every parameter but the names goes in the query.

    The embedded server's host is a unix socket directory, which URLs can
    only carry as a query parameter.
    """
    params = conninfo_to_dict(dsn)
    return URL.create(
        f"postgresql+{driver}",
        username=params.pop("user", None),
        password=params.pop("password", None),
        database=params.pop("dbname", None),
        query={k: str(v) for k, v in params.items()},
    )


def drift(conn: psycopg.Connection, lo: int = 1, hi: int = 12) -> None:
    """Insert payments with explicit ids lo..hi, so that their sequence lags."""
    conn.execute("INSERT INTO payments (id) SELECT generate_series(%s::int, %s::int)", (lo, hi))


def heals(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "sequence_resynced"]


@pytest.fixture
def engine(dsn: str, conn: psycopg.Connection) -> Iterator[Engine]:
    """A healing engine on the test database, with the ORM tables created."""
    eng = selfheal.sqlalchemy.install(sa.create_engine(sa_url(dsn)))
    Base.metadata.create_all(eng)
    yield eng
    eng.dispose()


@pytest.fixture
async def aengine(engine: Engine, dsn: str) -> AsyncIterator[AsyncEngine]:
    """A healing asyncio engine on the same database (tables made by `engine`)."""
    eng = selfheal.sqlalchemy.install(create_async_engine(sa_url(dsn)))
    yield eng
    await eng.dispose()


def driver_connection(connection: sa.Connection) -> Any:
    return connection.connection.driver_connection


class TestInstall:
    def test_connections_are_healing(self, engine: Engine) -> None:
        """Every connection the engine opens after install() is a HealingConnection."""
        with engine.connect() as c:
            assert isinstance(driver_connection(c), HealingConnection)

    def test_core_insert_heals(self, engine: Engine, conn: psycopg.Connection) -> None:
        """A Core insert into a drifted table gets the next free id; one audit event."""
        drift(conn)
        with capture_logs() as logs, engine.begin() as c:
            new_id = c.execute(sa.insert(Payment).values(note="x").returning(Payment.id)).scalar()
        assert new_id == 13
        [heal] = heals(logs)
        assert (heal["schema"], heal["table"], heal["retry"]) == ("public", "payments", "succeeded")

    def test_returns_the_engine(self, dsn: str) -> None:
        """install() returns its engine, so it wraps create_engine() in one line."""
        eng = sa.create_engine(sa_url(dsn))
        assert selfheal.sqlalchemy.install(eng) is eng
        eng.dispose()

    def test_other_drivers_refused(self) -> None:
        """Engines on other drivers are refused with ValueError."""
        with pytest.raises(ValueError, match="psycopg"):
            selfheal.sqlalchemy.install(sa.create_engine("sqlite://"))

    def test_pooled_connections_replaced(self, dsn: str, conn: psycopg.Connection) -> None:
        """Connections pooled before install() are replaced by healing ones at checkout."""
        eng = sa.create_engine(sa_url(dsn), pool_size=1)
        Base.metadata.create_all(eng)
        with eng.connect() as c:
            assert type(driver_connection(c)) is psycopg.Connection
        drift(conn)
        selfheal.sqlalchemy.install(eng)
        with eng.begin() as c:
            assert isinstance(driver_connection(c), HealingConnection)
            c.execute(sa.insert(Payment).values(note="x"))
        assert conn.execute("SELECT max(id) FROM payments").fetchone() == (13,)
        eng.dispose()

    def test_options_and_reinstall(self, dsn: str, conn: psycopg.Connection) -> None:
        """A second install() replaces the first; its options apply (retry off: heal, raise)."""
        eng = selfheal.sqlalchemy.install(sa.create_engine(sa_url(dsn)))
        selfheal.sqlalchemy.install(eng, HealOptions(retry=False))
        Base.metadata.create_all(eng)
        drift(conn)
        with capture_logs() as logs, pytest.raises(exc.IntegrityError), eng.begin() as c:
            assert not driver_connection(c).selfheal_options.retry
            c.execute(sa.insert(Payment).values(note="x"))
        [heal] = heals(logs)
        assert heal["retry"] == "not_attempted"
        assert seq_next(conn, "public.payments_id_seq") == 13
        assert len(eng.pool.dispatch.checkout) == 1
        eng.dispose()

    def test_uninstall(self, dsn: str) -> None:
        """uninstall() goes back to plain psycopg connections."""
        eng = selfheal.sqlalchemy.install(sa.create_engine(sa_url(dsn), poolclass=sa.NullPool))
        selfheal.sqlalchemy.uninstall(eng)
        with eng.connect() as c:
            assert type(driver_connection(c)) is psycopg.Connection

    def test_do_connect_listeners_run(self, dsn: str, conn: psycopg.Connection) -> None:
        """do_connect listeners added before and after install() both run; the connection heals.

        SQLAlchemy's recipe for per-connection tokens (cloud IAM auth): a
        listener that sets cparams["password"] for every new connection.
        """
        eng = sa.create_engine(sa_url(dsn), poolclass=sa.NullPool)
        tokens = iter(range(1, 100))
        event.listen(eng, "do_connect",
                     lambda d, rec, cargs, cparams: cparams.update(application_name="before"))
        selfheal.sqlalchemy.install(eng)

        @event.listens_for(eng, "do_connect")
        def provide_token(dialect: Any, rec: Any, cargs: Any, cparams: dict[str, Any]) -> None:
            cparams["password"] = f"token-{next(tokens)}"
            cparams["application_name"] += "+after"

        Base.metadata.create_all(eng)
        drift(conn)
        with capture_logs() as logs, eng.begin() as c:
            raw = driver_connection(c)
            assert isinstance(raw, HealingConnection)
            assert raw.info.password == "token-2"  # create_all() had token-1
            assert c.execute(sa.text("SHOW application_name")).scalar() == "before+after"
            c.execute(sa.insert(Payment).values(note="x"))
        assert [h["retry"] for h in heals(logs)] == ["succeeded"]
        assert conn.execute("SELECT max(id) FROM payments").fetchone() == (13,)

    async def test_do_connect_listener_after_install_async(
        self, engine: Engine, dsn: str, conn: psycopg.Connection
    ) -> None:
        """On an asyncio engine too, a do_connect listener added after install() runs."""
        aeng = selfheal.sqlalchemy.install(create_async_engine(sa_url(dsn)))
        event.listen(aeng.sync_engine, "do_connect",
                     lambda d, rec, cargs, cparams: cparams.update(application_name="iam"))
        drift(conn)
        async with aeng.begin() as c:
            raw = await c.get_raw_connection()
            assert isinstance(raw.driver_connection, AsyncHealingConnection)
            assert (await c.execute(sa.text("SHOW application_name"))).scalar() == "iam"
            await c.execute(sa.insert(Payment).values(note="x"))
        await aeng.dispose()
        assert conn.execute("SELECT max(id) FROM payments").fetchone() == (13,)

    def test_uninstall_restores_dialect(self, dsn: str) -> None:
        """uninstall() gives the dialect back its own connect; other engines are untouched."""
        eng = selfheal.sqlalchemy.install(sa.create_engine(sa_url(dsn)))
        other = sa.create_engine(sa_url(dsn))
        assert "connect" in vars(eng.dialect)
        assert "connect" not in vars(other.dialect)
        selfheal.sqlalchemy.uninstall(eng)
        assert "connect" not in vars(eng.dialect)

    def test_custom_creator_refused(self, dsn: str) -> None:
        """An engine whose creator= bypasses install() fails loudly instead of not healing."""
        eng = sa.create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn))
        selfheal.sqlalchemy.install(eng)
        with pytest.raises(TypeError, match="creator"):
            eng.connect()
        eng.dispose()

    def test_custom_creator_with_healing_connection(
        self, dsn: str, conn: psycopg.Connection
    ) -> None:
        """A creator= that returns a HealingConnection heals, install() or not."""
        eng = sa.create_engine("postgresql+psycopg://",
                               creator=lambda: HealingConnection.connect(dsn))
        Base.metadata.create_all(eng)
        drift(conn)
        with eng.begin() as c:
            c.execute(sa.insert(Payment).values(note="x"))
        assert conn.execute("SELECT max(id) FROM payments").fetchone() == (13,)
        eng.dispose()


class TestOrm:
    def test_add_commit(self, engine: Engine, conn: psycopg.Connection) -> None:
        """session.add(); session.commit() into a drifted table succeeds with the next free id."""
        drift(conn)
        with Session(engine) as session:
            payment = Payment(note="orm")
            session.add(payment)
            session.commit()
            assert payment.id == 13
        assert conn.execute("SELECT count(*) FROM payments").fetchone() == (13,)

    def test_earlier_statements_survive(self, engine: Engine, conn: psycopg.Connection) -> None:
        """Statements flushed earlier in the session's transaction are committed with the heal."""
        drift(conn)
        with Session(engine) as session:
            session.add(Log(msg="before"))
            session.flush()
            session.get(Payment, 3).note = "touched"  # type: ignore[union-attr]
            session.flush()
            session.add(Payment(note="new"))
            session.flush()
            session.add(Log(msg="after"))
            session.commit()
        assert conn.execute("SELECT msg FROM log ORDER BY id").fetchall() == [
            ("before",), ("after",)]
        assert conn.execute("SELECT note FROM payments WHERE id = 3").fetchone() == ("touched",)
        assert conn.execute("SELECT count(*), max(id) FROM payments").fetchone() == (13, 13)

    def test_begin_nested(self, engine: Engine, conn: psycopg.Connection) -> None:
        """begin_nested() savepoints keep working: a heal inside one, a rollback of another."""
        drift(conn)
        with Session(engine) as session:
            session.add(Log(msg="outer"))
            session.flush()
            with session.begin_nested():
                session.add(Payment(note="in savepoint"))
            nested = session.begin_nested()
            session.add(Payment(note="rolled back"))
            session.flush()
            nested.rollback()
            session.commit()
        assert conn.execute("SELECT note FROM payments WHERE id > 12 ORDER BY id").fetchall() == [
            ("in savepoint",)]
        assert conn.execute("SELECT count(*) FROM log").fetchone() == (1,)

    def test_not_healable_is_integrity_error(self, engine: Engine) -> None:
        """A unique violation that is not a lagging key is SQLAlchemy's IntegrityError, as usual."""
        with Session(engine) as session:
            session.add(Customer(email="a@example.com"))
            session.commit()
            session.add(Customer(email="a@example.com"))
            with pytest.raises(exc.IntegrityError) as info:
                session.commit()
            assert isinstance(info.value.orig, pgerrors.UniqueViolation)
            session.rollback()
            session.add(Customer(email="b@example.com"))
            session.commit()

    def test_failed_heal_is_integrity_error(self, engine: Engine, conn: psycopg.Connection
                                            ) -> None:
        """When the heal itself fails (sequence at MAXVALUE) the user gets IntegrityError."""
        conn.execute("ALTER SEQUENCE payments_id_seq MAXVALUE 12")
        drift(conn)
        with capture_logs() as logs, Session(engine) as session:
            session.add(Payment(note="x"))
            with pytest.raises(exc.IntegrityError) as info:
                session.commit()
        assert isinstance(info.value.orig, pgerrors.UniqueViolation)
        [failed] = [e for e in logs if e["event"] == "sequence_resync_failed"]
        assert failed["table"] == "payments"

    def test_insertmanyvalues_every_row_once(
        self, dsn: str, conn: psycopg.Connection
    ) -> None:
        """An ORM bulk insert batched by insertmanyvalues heals mid-way; every row lands once."""
        eng = selfheal.sqlalchemy.install(
            sa.create_engine(sa_url(dsn), insertmanyvalues_page_size=5))
        Base.metadata.create_all(eng)
        drift(conn, 8, 12)  # the second batch of five draws 6..10 and collides at 8
        inserts: list[str] = []
        event.listen(eng, "before_cursor_execute",
                     lambda c, cur, stmt, *a: inserts.append(stmt) if "INSERT" in stmt else None)
        with capture_logs() as logs, Session(eng) as session:
            payments = [Payment(note=f"bulk {i}") for i in range(20)]
            session.add_all(payments)
            session.commit()
            by_note = {p.note: p.id for p in payments}
        eng.dispose()
        assert len(inserts) == 4
        assert len(heals(logs)) == 1
        rows = conn.execute("SELECT note, id FROM payments WHERE note LIKE 'bulk%'").fetchall()
        assert dict(rows) == by_note
        assert len(rows) == 20
        assert conn.execute("SELECT count(*), count(DISTINCT id) FROM payments").fetchone() == (
            25, 25)

    def test_core_executemany(self, engine: Engine, conn: psycopg.Connection) -> None:
        """A Core executemany without RETURNING heals and writes every row exactly once."""
        drift(conn)
        with engine.begin() as c:
            c.execute(sa.insert(Log).values(msg="first"))
            c.execute(sa.insert(Payment), [{"note": f"many {i}"} for i in range(10)])
        assert conn.execute(
            "SELECT count(*), count(DISTINCT id), min(id) FROM payments WHERE note LIKE 'many%'"
        ).fetchone() == (10, 10, 13)
        assert conn.execute("SELECT count(*) FROM log").fetchone() == (1,)


class TestPool:
    def test_pre_ping_replaces_dead_connection(self, dsn: str, conn: psycopg.Connection
                                               ) -> None:
        """With pool_pre_ping, a connection killed server-side is replaced by a healing one."""
        eng = selfheal.sqlalchemy.install(
            sa.create_engine(sa_url(dsn), pool_pre_ping=True, pool_size=1))
        Base.metadata.create_all(eng)
        with eng.connect() as c:
            pid = driver_connection(c).info.backend_pid
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        drift(conn)
        with eng.begin() as c:
            assert driver_connection(c).info.backend_pid != pid
            assert isinstance(driver_connection(c), HealingConnection)
            c.execute(sa.insert(Payment).values(note="after ping"))
        assert conn.execute("SELECT max(id) FROM payments").fetchone() == (13,)
        eng.dispose()

    def test_invalidation(self, engine: Engine, conn: psycopg.Connection) -> None:
        """A disconnect invalidates the pool as usual; the next connection heals."""
        with engine.connect() as c:
            pid = driver_connection(c).info.backend_pid
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with engine.connect() as c, pytest.raises(exc.OperationalError) as info:
            c.execute(sa.text("SELECT 1"))
        assert info.value.connection_invalidated
        drift(conn)
        with engine.begin() as c:
            assert driver_connection(c).info.backend_pid != pid
            c.execute(sa.insert(Payment).values(note="after invalidation"))
        assert conn.execute("SELECT max(id) FROM payments").fetchone() == (13,)

    def test_autocommit_isolation_level(self, engine: Engine, conn: psycopg.Connection) -> None:
        """An AUTOCOMMIT connection heals too, and returns to the pool in its usual state."""
        drift(conn)
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(sa.insert(Payment).values(note="autocommit"))
        with engine.connect() as c:
            assert not driver_connection(c).autocommit
        assert conn.execute("SELECT max(id) FROM payments").fetchone() == (13,)


class TestAsyncio:
    async def test_connections_are_healing(self, aengine: AsyncEngine) -> None:
        """create_async_engine() connections are AsyncHealingConnection after install()."""
        async with aengine.connect() as c:
            raw = await c.get_raw_connection()
            assert isinstance(raw.driver_connection, AsyncHealingConnection)

    async def test_session_commit(self, aengine: AsyncEngine, conn: psycopg.Connection) -> None:
        """AsyncSession add/commit heals; earlier statements in the transaction survive."""
        drift(conn)
        with capture_logs() as logs:
            async with AsyncSession(aengine, expire_on_commit=False) as session:
                session.add(Log(msg="before"))
                await session.flush()
                payment = Payment(note="async")
                session.add(payment)
                await session.commit()
                assert payment.id == 13
        [heal] = heals(logs)
        assert heal["retry"] == "succeeded"
        assert conn.execute("SELECT count(*) FROM log").fetchone() == (1,)

    async def test_begin_nested(self, aengine: AsyncEngine, conn: psycopg.Connection) -> None:
        """Savepoints from begin_nested() work on the asyncio engine."""
        drift(conn)
        async with aengine.begin() as c:
            await c.execute(sa.insert(Log).values(msg="outer"))
            async with c.begin_nested():
                await c.execute(sa.insert(Payment).values(note="nested"))
        assert conn.execute("SELECT note FROM payments WHERE id = 13").fetchone() == ("nested",)
        assert conn.execute("SELECT count(*) FROM log").fetchone() == (1,)

    async def test_insertmanyvalues(self, dsn: str, engine: Engine, conn: psycopg.Connection
                                    ) -> None:
        """An asyncio bulk insert in batches heals mid-way; every row lands once."""
        aeng = selfheal.sqlalchemy.install(
            create_async_engine(sa_url(dsn), insertmanyvalues_page_size=5))
        drift(conn, 8, 12)
        async with AsyncSession(aeng, expire_on_commit=False) as session:
            payments = [Payment(note=f"bulk {i}") for i in range(20)]
            session.add_all(payments)
            await session.commit()
        await aeng.dispose()
        assert sorted(p.id for p in payments) == [*range(1, 6), *range(13, 28)]
        assert conn.execute("SELECT count(*), count(DISTINCT id) FROM payments").fetchone() == (
            25, 25)

    async def test_integrity_error(self, aengine: AsyncEngine) -> None:
        """An unhealable collision is IntegrityError wrapping UniqueViolation, as usual."""
        async with AsyncSession(aengine) as session:
            session.add_all([Customer(email="x@example.com"), Customer(email="x@example.com")])
            with pytest.raises(exc.IntegrityError) as info:
                await session.commit()
        assert isinstance(info.value.orig, pgerrors.UniqueViolation)


class TestAsyncpg:
    """install() on a ``postgresql+asyncpg://`` engine: asyncpg connections that heal,
    SQLAlchemy's prepared statements and ``executemany`` included."""

    @pytest.fixture
    async def aengine2(self, dsn: str, engine: Engine) -> AsyncIterator[AsyncEngine]:
        eng = selfheal.sqlalchemy.install(
            create_async_engine(sa_url(dsn, "asyncpg"), insertmanyvalues_page_size=5))
        yield eng
        await eng.dispose()

    async def test_orm_session_heals(self, aengine2: AsyncEngine,
                                     conn: psycopg.Connection) -> None:
        import selfheal.asyncpg

        drift(conn)
        with capture_logs() as logs:
            async with AsyncSession(aengine2, expire_on_commit=False) as session:
                raw = await (await session.connection()).get_raw_connection()
                assert isinstance(raw.driver_connection, selfheal.asyncpg.HealingConnection)
                session.add(Log(msg="before"))
                await session.flush()
                first = Payment(note="first")
                session.add(first)
                await session.flush()
                async with session.begin_nested():
                    session.add(Payment(note="nested"))
                many = [Payment(note=f"many {i}") for i in range(12)]
                session.add_all(many)
                await session.commit()
        [heal] = heals(logs)
        assert (heal["table"], heal["retry"]) == ("payments", "succeeded")
        assert first.id == 13
        assert sorted(p.id for p in many) == list(range(15, 27))
        assert conn.execute("SELECT count(*), count(DISTINCT id) FROM payments").fetchone() == (
            26, 26)
        assert conn.execute("SELECT count(*) FROM log").fetchone() == (1,)

    async def test_bulk_insert_heals_mid_way(self, aengine2: AsyncEngine,
                                             conn: psycopg.Connection) -> None:
        drift(conn, 8, 12)
        async with AsyncSession(aengine2, expire_on_commit=False) as session:
            payments = [Payment(note=f"bulk {i}") for i in range(20)]
            session.add_all(payments)
            await session.commit()
        assert sorted(p.id for p in payments) == [*range(1, 6), *range(13, 28)]

    async def test_integrity_error(self, aengine2: AsyncEngine) -> None:
        """An unhealable collision is IntegrityError wrapping asyncpg's error, as usual."""
        import asyncpg

        async with AsyncSession(aengine2) as session:
            session.add_all([Customer(email="x@example.com"), Customer(email="x@example.com")])
            with pytest.raises(exc.IntegrityError) as info:
                await session.commit()
        assert isinstance(info.value.orig.__cause__, asyncpg.UniqueViolationError)

    async def test_options_and_connect_args(self, dsn: str) -> None:
        import selfheal.asyncpg

        class Mine(selfheal.asyncpg.HealingConnection):
            pass

        eng = selfheal.sqlalchemy.install(
            create_async_engine(sa_url(dsn, "asyncpg"), connect_args={"connection_class": Mine}),
            HealOptions(retry=False))
        async with eng.connect() as c:
            raw = (await c.get_raw_connection()).driver_connection
            assert isinstance(raw, Mine) and raw.selfheal_options.retry is False
        await eng.dispose()
        eng = selfheal.sqlalchemy.install(create_async_engine(sa_url(dsn, "asyncpg")),
                                          HealOptions(retry=False))
        async with eng.connect() as c:
            raw = (await c.get_raw_connection()).driver_connection
            assert raw.selfheal_options.retry is False
        await eng.dispose()


class TestReporting:
    @pytest.fixture
    def receiver(self) -> Iterator[Receiver]:
        r = Receiver()
        sentry_sdk.init(dsn=r.dsn, default_integrations=False)
        yield r
        sentry_sdk.get_client().close()
        sentry_sdk.init()  # no DSN: Sentry off again for the other tests
        r.close()

    def test_sentry_event(self, receiver: Receiver, engine: Engine, conn: psycopg.Connection
                          ) -> None:
        """A heal under SQLAlchemy sends the same Sentry event as on a plain connection."""
        drift(conn)
        with Session(engine) as session:
            session.add(Payment(note="x"))
            session.commit()
        sentry_sdk.flush()
        [event] = receiver.events
        assert event["level"] == "warning"
        assert event["tags"]["selfheal.table"] == "public.payments"


class TestExample:
    def test_sqlalchemy_app(self, dsn: str) -> None:
        """examples/sqlalchemy_app.py heals with the ORM, savepoints, bulk inserts and asyncio."""
        url = sa_url(dsn).render_as_string(hide_password=False)
        out = subprocess.run(
            [sys.executable, str(EXAMPLES / "sqlalchemy_app.py")],
            env={**os.environ, "DATABASE_URL": url},
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert out.returncode == 0, out.stderr
        # Unconfigured structlog prints the audit events to stdout as well.
        lines = [line for line in out.stdout.splitlines() if "sequence_" not in line]
        assert lines == [
            "added book 4",
            "added pen 7 in a savepoint, after the audit entry",
            "bulk-inserted 10 items, ids 51..60",
            "asyncio: added lamp 63",
        ]


class TestPsycopg2:
    """install() on a ``postgresql+psycopg2://`` engine: psycopg2 connections that heal."""

    @pytest.fixture
    def engine2(self, dsn: str) -> Iterator[Engine]:
        eng = selfheal.sqlalchemy.install(sa.create_engine(sa_url(dsn, "psycopg2")))
        Base.metadata.create_all(eng)
        yield eng
        eng.dispose()

    def test_orm_insert_heals(self, engine2: Engine, conn: psycopg.Connection) -> None:
        import selfheal.psycopg2

        drift(conn)
        with capture_logs() as logs, Session(engine2) as session:
            assert isinstance(session.connection().connection.driver_connection,
                              selfheal.psycopg2.HealingConnection)
            session.add(Payment(note="first"))
            session.flush()
            with session.begin_nested():
                session.add(Payment(note="nested"))
            session.add_all([Payment(note=f"many {i}") for i in range(5)])
            session.commit()
        [heal] = heals(logs)
        assert (heal["table"], heal["retry"]) == ("payments", "succeeded")
        assert conn.execute("SELECT count(*), count(DISTINCT id), min(id) FILTER"
                            " (WHERE note IS NOT NULL) FROM payments").fetchone() == (19, 19, 13)

    def test_options_and_connect_args(self, dsn: str, conn: psycopg.Connection) -> None:
        import selfheal.psycopg2

        eng = selfheal.sqlalchemy.install(sa.create_engine(sa_url(dsn, "psycopg2")),
                                          HealOptions(retry=False))
        with eng.connect() as c:
            raw = c.connection.driver_connection
            assert isinstance(raw, selfheal.psycopg2.HealingConnection)
            assert raw.selfheal_options.retry is False
        eng.dispose()
