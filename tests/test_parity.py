"""Parity by difference: plain psycopg against selfheal's healing connections.

The harness (`tests.parity`) runs one script on `psycopg.Connection` and on
`HealingConnection` (and on the asyncio pair), each on its own database, and
compares everything the caller can observe. This module plugs psycopg 3 in as
the two drivers, runs random scripts through hypothesis, and names the known
cases as scripts of their own.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import os
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, event, given, settings, target
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row, tuple_row

from selfheal import AsyncHealingConnection, HealingConnection

from . import parity
from .conftest import dsn_for
from .parity import (
    SCHEMA,
    TAKEN,
    Block,
    Commit,
    Database,
    Drift,
    Execute,
    Options,
    Outcome,
    ResultSet,
    Rewind,
    Run,
    Script,
)

# -- the psycopg 3 drivers ---------------------------------------------------------------


async def _await(value: Any) -> Any:
    """One code path for both twins: await what the async API returns, pass the rest."""
    return await value if inspect.isawaitable(value) else value


_CURSORS: dict[bool, dict[str, type[Any]]] = {
    False: {"Cursor": psycopg.Cursor, "ClientCursor": psycopg.ClientCursor,
            "RawCursor": psycopg.RawCursor},
    True: {"Cursor": psycopg.AsyncCursor, "ClientCursor": psycopg.AsyncClientCursor,
           "RawCursor": psycopg.AsyncRawCursor},
}


def _dollar(query: str) -> str:
    """``%s`` placeholders as RawCursor's ``$1, $2, ...``."""
    numbers = itertools.count(1)
    return re.sub("%s", lambda _: f"${next(numbers)}", query)


def _columns(cur: Any) -> tuple[tuple[str, int], ...] | None:
    if cur.description is None:
        return None
    return tuple((c.name, c.type_code) for c in cur.description)


class PsycopgSession:
    """A psycopg 3 connection, sync or async, driven by the harness."""

    # psycopg.Rollback escapes a transaction() block whose rollback failed
    # (a COMMIT ran inside it): plain psycopg raises it too.
    errors: tuple[type[BaseException], ...] = (psycopg.Error, psycopg.Rollback)

    def __init__(self, conn: Any, is_async: bool, raw: bool) -> None:
        self.conn = conn
        self.is_async = is_async
        self.raw = raw
        self._blocks: list[Any] = []
        self._notices: list[str] = []
        conn.add_notice_handler(lambda d: self._notices.append(
            f"{d.severity_nonlocalized} {d.sqlstate}: {d.message_primary}"))

    async def execute(self, step: Execute) -> Outcome:
        query = _dollar(step.query) if self.raw else step.query
        if step.via == "conn" and step.many is None:
            try:
                cur = await _await(self.conn.execute(query, step.params))
            except psycopg.Error as ex:
                return Outcome(error=parity.describe_psycopg(ex))
        else:
            cur = self.conn.cursor()
            try:
                if step.many is not None:
                    await _await(cur.executemany(query, step.many, returning=step.returning))
                else:
                    await _await(cur.execute(query, step.params))
            except psycopg.Error as ex:
                after = ResultSet(cur.statusmessage, cur.rowcount, _columns(cur), None)
                await _await(cur.close())
                return Outcome(error=parity.describe_psycopg(ex), cursor_after_error=after)
        try:
            return Outcome(results=await self._results(cur))
        finally:
            await _await(cur.close())

    async def _results(self, cur: Any) -> tuple[ResultSet, ...]:
        sets = []
        while True:
            columns = _columns(cur)
            rows = None
            if columns is not None:
                rows = parity.normalise(await _await(cur.fetchall()))
            sets.append(ResultSet(cur.statusmessage, cur.rowcount, columns, rows))
            if not cur.nextset():
                return tuple(sets)

    async def commit(self) -> None:
        await _await(self.conn.commit())

    async def rollback(self) -> None:
        await _await(self.conn.rollback())

    async def begin(self) -> None:
        tx = self.conn.transaction()
        await _await(tx.__aenter__() if self.is_async else tx.__enter__())
        self._blocks.append(tx)

    async def end(self, rollback: bool) -> None:
        tx = self._blocks.pop()
        exc = (psycopg.Rollback, psycopg.Rollback(), None) if rollback else (None, None, None)
        await _await(tx.__aexit__(*exc) if self.is_async else tx.__exit__(*exc))

    async def block(self, body: Callable[[], Awaitable[None]], rollback: bool) -> None:
        # Written as callers write it: a real with / async with statement.
        if self.is_async:
            async with self.conn.transaction():
                await body()
                if rollback:
                    raise psycopg.Rollback()
        else:
            with self.conn.transaction():
                await body()
                if rollback:
                    raise psycopg.Rollback()

    def open_blocks(self) -> int:
        return len(self._blocks)

    def transaction_status(self) -> str:
        return str(self.conn.info.transaction_status.name)

    def take_notices(self) -> tuple[str, ...]:
        taken = tuple(self._notices)
        self._notices.clear()
        return taken

    def describe(self, ex: BaseException) -> parity.ErrorSeen:
        return parity.describe_psycopg(ex)

    async def prepared_statements(self) -> Outcome:
        if self.conn.info.transaction_status not in (TransactionStatus.IDLE,
                                                     TransactionStatus.INTRANS):
            return Outcome()  # a failed transaction cannot read anything
        # A plain cursor, never prepared: it must not change what it reads.
        cls = psycopg.AsyncCursor if self.is_async else psycopg.Cursor
        cur = cls(self.conn, row_factory=tuple_row)
        await _await(cur.execute(
            "SELECT statement FROM pg_prepared_statements ORDER BY statement", prepare=False))
        rows = await _await(cur.fetchall())
        await _await(cur.close())
        return Outcome(results=(ResultSet(None, len(rows), None, tuple(rows)),))

    async def close(self) -> None:
        await _await(self.conn.close())


@dataclass(frozen=True)
class Psycopg:
    """psycopg 3: `psycopg.Connection` / `HealingConnection`, or their async twins."""

    is_async: bool
    #: Open the plain class on the healing side too (to test the harness itself).
    plain_only: bool = False

    @property
    def name(self) -> str:
        return "psycopg-async" if self.is_async else "psycopg"

    async def connect(self, dsn: str, options: Options, healing: bool) -> PsycopgSession:
        healing = healing and not self.plain_only
        if self.is_async:
            cls: Any = AsyncHealingConnection if healing else psycopg.AsyncConnection
        else:
            cls = HealingConnection if healing else psycopg.Connection
        if healing:
            cls = cls.with_options(**parity.heal_options(options))
        kwargs: dict[str, Any] = {
            "autocommit": options.autocommit,
            "cursor_factory": _CURSORS[self.is_async][options.cursor],
            "row_factory": dict_row if options.rows == "dict" else tuple_row,
        }
        if options.prepare_threshold != "default":
            kwargs["prepare_threshold"] = options.prepare_threshold
        conn = await _await(cls.connect(dsn, **kwargs))
        if options.read_only:
            await _await(conn.set_read_only(True))
        if options.isolation_level is not None:
            level = psycopg.IsolationLevel[options.isolation_level]
            await _await(conn.set_isolation_level(level))
        return PsycopgSession(conn, self.is_async, raw=options.cursor == "RawCursor")


DRIVERS = [Psycopg(is_async=False), Psycopg(is_async=True)]
by_driver = pytest.mark.parametrize("driver", DRIVERS, ids=lambda d: d.name)

# -- databases --------------------------------------------------------------------------

_names = itertools.count()


@pytest.fixture(scope="module")
def dbs(server_dsn: str) -> Iterator[tuple[Database, Database]]:
    """Two databases with the harness schema (healing side, plain side) and a restricted role.

    Shared by the module's tests: every run resets both (`parity.run_pair`).
    """
    tag = f"{os.getpid()}_{next(_names)}"
    role = f"sh_parity_{tag}"
    names = [f"sh_parity_{tag}_{side}" for side in ("healing", "plain")]
    made: list[Database] = []
    try:
        with psycopg.connect(server_dsn, autocommit=True) as c:
            c.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
            for name in names:
                c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        for name in names:
            dsn = dsn_for(server_dsn, name)
            admin = psycopg.connect(dsn, autocommit=True)
            admin.execute(SCHEMA.setup)
            for grant in SCHEMA.restricted_grants:
                admin.execute(sql.SQL(grant).format(role=sql.Identifier(role)))
            # Drift must not wait on a caller's uncommitted row: it fails fast, on both sides.
            admin.execute("SET lock_timeout = '100ms'")
            params = conninfo_to_dict(dsn)
            params["user"] = role
            params.pop("password", None)
            made.append(Database(dsn, make_conninfo("", **params), admin))
        yield made[0], made[1]
    finally:
        for db in made:
            db.admin.close()
        with psycopg.connect(server_dsn, autocommit=True) as c:
            for name in names:
                c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)))
            c.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def run(driver: Psycopg, script: Script, dbs: tuple[Database, Database]) -> tuple[Run, Run]:
    return asyncio.run(parity.run_pair(driver, script, *dbs))


def committed(run: Run, table: str) -> tuple[Any, ...]:
    return dict(run.final.tables)[table]


def error_class(run: Run, path: str) -> str | None:
    error = run.at(path).error
    return None if error is None else error.cls.rsplit(".", 1)[-1]


def events(run: Run, path: str) -> list[tuple[str, str | None]]:
    return [(e["event"], e.get("retry")) for e in run.heals.get(path, [])]


def ledger(note: str) -> Execute:
    return Execute("INSERT INTO ledger (note) VALUES (%s)", (note,))


# -- random scripts ---------------------------------------------------------------------


@by_driver
@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(script=parity.scripts())
def test_random_scripts(driver: Psycopg, dbs: tuple[Database, Database],
                        script: Script) -> None:
    """A random script shows the same on plain and healing connections, heals aside."""
    healed, plain = run(driver, script, dbs)
    heals = [e for found in healed.heals.values() for e in found]
    for e in heals:  # shown by --hypothesis-show-statistics
        event(f"{e['event']} retry={e.get('retry')}")
    # Steer towards scripts in which sequences really move (heals, retried or not).
    target(float(sum(e["event"] == "sequence_resynced" for e in heals)), label="heals")
    parity.assert_parity(script, healed, plain)


class TestHarness:
    @by_driver
    @settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(script=parity.scripts())
    def test_plain_against_plain(self, driver: Psycopg, dbs: tuple[Database, Database],
                                 script: Script) -> None:
        """Two plain runs of one script agree: the harness itself is deterministic."""
        plain_twice = Psycopg(is_async=driver.is_async, plain_only=True)
        first, second = run(plain_twice, script, dbs)
        assert parity.differences(first, second) == []

    @by_driver
    def test_a_difference_is_reported(self, driver: Psycopg,
                                      dbs: tuple[Database, Database]) -> None:
        """A row only one database holds shows in the step that reads it and at the end."""
        script = Script((Execute("SELECT count(*) FROM ledger"),))
        healing_db, plain_db = dbs
        healing_db.reset()
        plain_db.reset()
        plain_db.admin.execute("INSERT INTO ledger (note) VALUES ('extra')")
        healed = asyncio.run(parity.run_script(driver, script, healing_db))
        plain = asyncio.run(parity.run_script(driver, script, plain_db, heals={}))
        diffs = parity.differences(healed, plain)
        assert [d.split(":")[0] for d in diffs] == [
            "step 1 (conn.execute('SELECT count(*) FROM ledger'))", "committed rows of ledger",
            "sequences' next values"]


# -- known cases ------------------------------------------------------------------------


class TestNaturalKeyInTransaction:
    """Case 1: a caught error that selfheal does not heal leaves the transaction failed."""

    @by_driver
    def test_unique_email(self, driver: Psycopg, dbs: tuple[Database, Database]) -> None:
        """After a caught UNIQUE violation on users.email the next insert fails; commit
        writes nothing."""
        script = Script((
            ledger("before"),
            Execute("INSERT INTO users (email) VALUES (%s)", (TAKEN,)),
            ledger("after"),
            Commit(),
        ))
        healed, plain = run(driver, script, dbs)
        assert error_class(healed, "2") == "UniqueViolation"
        assert error_class(healed, "3") == "InFailedSqlTransaction", healed.at("3")
        assert committed(healed, "ledger") == committed(plain, "ledger")
        parity.assert_parity(script, healed, plain)

    @by_driver
    def test_executemany(self, driver: Psycopg, dbs: tuple[Database, Database]) -> None:
        """The same through cursor().executemany(), every time.

        Repeated: the healing connection once left its pipeline busy in a few
        percent of runs (OperationalError, then a connection stuck in pipeline
        mode; see /tmp/parity-findings.md, finding 1).
        """
        script = Script((
            ledger("before"),
            Execute("INSERT INTO users (email) VALUES (%s)", via="cursor",
                    many=(("new@example.com",), (TAKEN,))),
            ledger("after"),
            Commit(),
        ))
        for attempt in range(20):
            healed, plain = run(driver, script, dbs)
            assert error_class(healed, "2") == "UniqueViolation", (attempt, healed.at("2"))
            assert error_class(healed, "3") == "InFailedSqlTransaction", healed.at("3")
            parity.assert_parity(script, healed, plain)

    @by_driver
    def test_failed_heal(self, driver: Psycopg, dbs: tuple[Database, Database]) -> None:
        """A primary-key collision whose heal fails (no SELECT/UPDATE on the sequence)
        also leaves the transaction failed."""
        script = Script((
            ledger("before"),
            Drift("users", count=2),
            Execute("INSERT INTO users (email) VALUES (NULL)"),
            ledger("after"),
            Commit(),
        ), Options(restricted=True))
        healed, plain = run(driver, script, dbs)
        assert events(healed, "3") == [("sequence_resync_failed", None)]
        assert error_class(healed, "3") == "UniqueViolation"
        assert error_class(healed, "4") == "InFailedSqlTransaction", healed.at("4")
        parity.assert_parity(script, healed, plain)


class TestCallThatCommits:
    """Case 2: a procedure that commits before it collides is not run again."""

    @by_driver
    def test_committed_row_once(self, driver: Psycopg, dbs: tuple[Database, Database]) -> None:
        """In autocommit, CALL batch() heals users but leaves one 'batch' ledger row."""
        script = Script((Drift("users", count=2), Execute("CALL batch()")),
                        Options(autocommit=True))
        healed, plain = run(driver, script, dbs)
        assert [e for e, _ in events(healed, "2")] == ["sequence_resynced"], healed.heals
        batch_rows = [r for r in committed(healed, "ledger") if r[1] == "batch"]
        assert len(batch_rows) == 1, batch_rows
        parity.assert_parity(script, healed, plain)


class TestMultiStatementString:
    """Case 3: several statements in one string, inside a transaction."""

    TWO = "INSERT INTO ledger (note) VALUES ('m1'); INSERT INTO ledger (note) VALUES ('m2')"

    @by_driver
    def test_opened_transaction(self, driver: Psycopg,
                                dbs: tuple[Database, Database]) -> None:
        """After an earlier statement, conn.execute("INSERT ...; INSERT ...") works."""
        script = Script((ledger("first"), Execute(self.TWO), Commit()))
        healed, plain = run(driver, script, dbs)
        assert healed.at("2").error is None, healed.at("2").error
        parity.assert_parity(script, healed, plain)

    @by_driver
    def test_transaction_block(self, driver: Psycopg,
                               dbs: tuple[Database, Database]) -> None:
        """Inside a conn.transaction() block in autocommit, it works too."""
        script = Script((Block((Execute(self.TWO),)),), Options(autocommit=True))
        healed, plain = run(driver, script, dbs)
        assert healed.at("1.1").error is None, healed.at("1.1").error
        parity.assert_parity(script, healed, plain)

    @by_driver
    def test_second_statement_collides(self, driver: Psycopg,
                                       dbs: tuple[Database, Database]) -> None:
        """When the string's second insert collides, the caller sees what plain shows
        (with the heal's one allowed difference)."""
        script = Script((ledger("first"), Drift("ledger", offset=1), Execute(self.TWO),
                         Commit()))
        healed, plain = run(driver, script, dbs)
        parity.assert_parity(script, healed, plain)


class TestPrepareThresholdZero:
    """Case 4: with every statement prepared, a collision in a transaction still heals."""

    @by_driver
    def test_heals_without_prepared_savepoints(self, driver: Psycopg,
                                               dbs: tuple[Database, Database]) -> None:
        """The insert heals and retries; pg_prepared_statements holds no _selfheal statement."""
        script = Script((
            ledger("first"),
            Drift("ledger", count=2),
            Execute("INSERT INTO ledger (note) VALUES (%s) RETURNING id", ("x",)),
            Commit(),
        ), Options(prepare_threshold=0))
        healed, plain = run(driver, script, dbs)
        assert events(healed, "3") == [("sequence_resynced", "succeeded")]
        assert healed.at("3").error is None, healed.at("3").error
        [prepared] = healed.at("end").results
        ours = [s for (s,) in prepared.rows or () if "_selfheal" in s]
        assert ours == [], ours
        parity.assert_parity(script, healed, plain)


class TestExplicitDuplicateId:
    """Case 5: a collision on an id the caller supplied is re-raised, not retried."""

    @by_driver
    @pytest.mark.parametrize("lagging", [False, True], ids=["in_sync", "lagging"])
    @pytest.mark.parametrize("state", ["autocommit", "opens", "in_transaction"])
    def test_not_retried(self, driver: Psycopg, dbs: tuple[Database, Database],
                         state: str, lagging: bool) -> None:
        """INSERT ... (id) VALUES (2): the original error, and no retry that fails."""
        steps: list[Any] = [Rewind("ledger", by=3)] if lagging else []
        if state == "in_transaction":
            steps.append(Execute("INSERT INTO users (email) VALUES (NULL)"))
        steps.append(Execute("INSERT INTO ledger (id, note) VALUES (%s, %s)", (2, "dup")))
        script = Script(tuple(steps), Options(autocommit=state == "autocommit"))
        healed, plain = run(driver, script, dbs)
        path = str(len(steps))
        assert error_class(healed, path) == "UniqueViolation"
        assert ("failed" not in [retry for _, retry in events(healed, path)]), \
            events(healed, path)
        parity.assert_parity(script, healed, plain)


class TestFailedRetry:
    """A retry that fails leaves the caller where the first attempt left it, as plain."""

    @by_driver
    def test_cursor_shows_the_original_failure(self, driver: Psycopg,
                                              dbs: tuple[Database, Database]) -> None:
        """executemany() whose retry gets one row further: the cursor still shows no rows."""
        script = Script((
            ledger("before"),
            Rewind("users", by=1),
            Execute("INSERT INTO users (email) VALUES (%s)", via="cursor",
                    many=((None,), (TAKEN,))),
        ))
        healed, plain = run(driver, script, dbs)
        assert events(healed, "3") == [("sequence_already_in_sync", "failed")]
        assert healed.at("3").error is not None
        assert healed.at("3").error.constraint_name == "users_pkey"
        assert healed.at("3").cursor_after_error == plain.at("3").cursor_after_error, (
            healed.at("3").cursor_after_error)
        parity.assert_parity(script, healed, plain)


@by_driver
def test_a_retry_counts_once_towards_preparing(driver: Psycopg,
                                               dbs: tuple[Database, Database]) -> None:
    """Under psycopg's default prepare threshold, a healed and retried statement counts
    as plain's one failed execution: the same statements end up prepared (found by the
    random scripts: the retries used to make one prepared an execution early)."""
    insert = ledger("a")
    script = Script((insert, insert, Drift("ledger"), insert, Rewind("ledger", by=1), insert,
                     insert, insert))
    healed, plain = run(driver, script, dbs)
    assert [r for path in ("4", "6") for _, r in events(healed, path)] == [
        "succeeded", "succeeded"]
    parity.assert_parity(script, healed, plain)
