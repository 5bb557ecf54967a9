"""
Parity: the same script on a plain connection and on a healing one, compared.

selfheal's first promise is that whenever it does not heal, the caller sees
exactly what the plain driver shows. This harness proves it by difference:

- A `Script` is a list of steps (statements, commits, rollbacks, transaction
  blocks) plus connection `Options`. Between steps an admin connection injects
  drift: committed rows with explicit ids past a sequence (`Drift`), or a
  sequence set backwards (`Rewind`).
- The script runs twice, each time against its own database built by the same
  setup: first through the healing connection class, then through the plain
  one. After every step the harness records what the caller can observe
  (`Observation`); at the end, the committed rows and every sequence's next
  value (`FinalState`).
- The oracle for healing. The only difference allowed where selfheal heals is
  that the colliding statement succeeds. selfheal's audit events, captured per
  step on the healing run, say where that happened, and the plain run mirrors
  the heal on the admin connection with a ``setval`` of the same sequence:
  - retry "succeeded": before the step, to the event's ``after`` (the value
    the retry started from), so the plain statement runs where the retry ran;
  - retry "failed" or "not_attempted": after the step, to the value the
    healing run's sequence had after that step. The caller got the original
    error, as plain does; a failed retry also drew values from the healed
    sequence, which this setval accounts for.
  Then the two logs must be equal, ids included.
- Normalised, on purpose, and nothing else:
  - uuids drawn by ``gen_random_uuid()`` differ between any two runs; they
    read as ``<random uuid>`` (explicit uuids in scripts stay as they are);
  - a retried statement ran twice on the healing side, and under
    ``prepare_threshold=0`` the server keeps the prepared statement of the
    attempt plain did not make while psycopg forgets its name (the healing
    side may hold, per retried step, one extra copy of a statement text plain
    prepared too). Its notices are not normalised: selfheal holds them back
    and delivers those of the attempt that counts.
  Each statement in the generated scripts draws from one sequence at most,
  the one a heal resyncs, so an extra attempt leaves no different gaps in
  other sequences.

Drivers plug in through `Driver` and `Session` (the caller's side); the runner
is async, and a sync driver simply blocks inside its async methods. The
harness's own side (drift, the oracle's setval, the final reads) always uses
psycopg 3 admin connections, whatever the driver under test. `SCHEMA` and
`scripts()` (hypothesis) describe the tables and the random scripts that every
driver shares.
"""

from __future__ import annotations

import itertools
import re
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

import psycopg
from hypothesis import strategies as st
from psycopg import sql
from structlog.testing import capture_logs

from selfheal import insync

__all__ = [
    "SCHEMA",
    "TAKEN",
    "Begin",
    "Block",
    "Commit",
    "Database",
    "Drift",
    "Driver",
    "End",
    "ErrorSeen",
    "Execute",
    "FinalState",
    "Observation",
    "Options",
    "Outcome",
    "ResultSet",
    "Rewind",
    "Rollback",
    "Run",
    "Script",
    "Session",
    "assert_parity",
    "describe_psycopg",
    "differences",
    "final_state",
    "next_value",
    "normalise",
    "run_pair",
    "run_script",
    "scripts",
]

# -- scripts --------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """How the caller's connection is opened; the same on both runs."""

    autocommit: bool = False
    #: "default" leaves psycopg's own default (5).
    prepare_threshold: int | str | None = "default"
    read_only: bool = False
    #: A `psycopg.IsolationLevel` name, or None for the server default.
    isolation_level: str | None = None
    #: "Cursor", "ClientCursor" or "RawCursor".
    cursor: str = "Cursor"
    #: "tuple" or "dict".
    rows: str = "tuple"
    #: Log in as a role with USAGE but neither SELECT nor UPDATE on the sequences,
    #: so every heal fails.
    restricted: bool = False
    #: `selfheal.HealOptions` fields, as pairs (healing run only).
    heal: tuple[tuple[str, Any], ...] = ()


def heal_options(options: Options) -> dict[str, Any]:
    """The `selfheal.HealOptions` of a healing run.

    ``explicit_ids="allow"`` unless a script asks otherwise: moving a sequence
    past keys a statement wrote itself changes what later default inserts
    draw, on purpose (tests/test_explicit.py compares that statement's own
    results with the plain driver's); the harness proves that nothing else differs.
    """
    return {"explicit_ids": "allow", **dict(options.heal)}


@dataclass(frozen=True)
class Execute:
    """``conn.execute()``, ``conn.cursor().execute()`` or ``cursor().executemany()``."""

    query: str
    params: tuple[Any, ...] | None = None
    #: "conn" or "cursor"; executemany always goes through a cursor.
    via: str = "conn"
    #: Parameter sets: run with executemany.
    many: tuple[tuple[Any, ...], ...] | None = None
    returning: bool = False

    def __str__(self) -> str:
        if self.many is not None:
            return f"cursor().executemany({self.query!r}, {list(self.many)!r}" + (
                ", returning=True)" if self.returning else ")")
        call = "conn.execute" if self.via == "conn" else "conn.cursor().execute"
        args = "" if self.params is None else f", {self.params!r}"
        return f"{call}({self.query!r}{args})"


@dataclass(frozen=True)
class Commit:
    """``conn.commit()``."""

    def __str__(self) -> str:
        return "conn.commit()"


@dataclass(frozen=True)
class Rollback:
    """``conn.rollback()``."""

    def __str__(self) -> str:
        return "conn.rollback()"


@dataclass(frozen=True)
class Begin:
    """Enter a ``conn.transaction()`` block, left open for later steps."""

    def __str__(self) -> str:
        return "conn.transaction().__enter__()"


@dataclass(frozen=True)
class End:
    """Leave the innermost block opened by `Begin`: commit, or raise psycopg.Rollback."""

    rollback: bool = False

    def __str__(self) -> str:
        return "exit block with Rollback" if self.rollback else "exit block"


@dataclass(frozen=True)
class Block:
    """``with conn.transaction(): <steps>``, optionally ending in ``raise Rollback``."""

    steps: tuple[Step, ...]
    rollback: bool = False

    def __str__(self) -> str:
        return "with conn.transaction():" + (" ... raise Rollback" if self.rollback else "")


@dataclass(frozen=True)
class Drift:
    """Admin: commit `count` rows with explicit ids from the sequence's next value + `offset`."""

    table: str
    offset: int = 0
    count: int = 1

    def __str__(self) -> str:
        return f"admin: {self.count} row(s) into {self.table} at next value + {self.offset}"


@dataclass(frozen=True)
class Rewind:
    """Admin: set the table's sequence `by` values back (not below 1)."""

    table: str
    by: int = 2

    def __str__(self) -> str:
        return f"admin: {self.table} sequence back by {self.by}"


Step = Execute | Commit | Rollback | Begin | End | Block | Drift | Rewind


@dataclass(frozen=True)
class Script:
    """What one example runs, on both sides."""

    steps: tuple[Step, ...]
    options: Options = Options()

    def render(self) -> str:
        """The script as numbered lines, paths as in the observations."""
        lines = [f"options: {self.options}"]

        def walk(steps: Sequence[Step], prefix: str, indent: str) -> None:
            for i, step in enumerate(steps, 1):
                lines.append(f"{indent}{prefix}{i} {step}")
                if isinstance(step, Block):
                    walk(step.steps, f"{prefix}{i}.", indent + "  ")

        walk(self.steps, "", "  ")
        return "\n".join(lines)


# -- observations -----------------------------------------------------------------------


@dataclass(frozen=True)
class ResultSet:
    """One result of a statement, as the cursor shows it."""

    statusmessage: str | None
    rowcount: int
    #: (name, type code) per column; None when the statement returns no rows.
    columns: tuple[tuple[str, int], ...] | None
    #: fetchall(), normalised; None without columns.
    rows: tuple[Any, ...] | None


@dataclass(frozen=True)
class ErrorSeen:
    """An exception the caller caught, with the server's diagnostics."""

    cls: str
    sqlstate: str | None
    message_primary: str | None
    message_detail: str | None
    schema_name: str | None
    table_name: str | None
    constraint_name: str | None
    text: str


@dataclass(frozen=True)
class Outcome:
    """What a session reports back for one action."""

    results: tuple[ResultSet, ...] = ()
    error: ErrorSeen | None = None
    #: A cursor the caller holds after its execute raised: what it still shows.
    cursor_after_error: ResultSet | None = None


@dataclass(frozen=True)
class Observation:
    """Everything the caller can observe after one step."""

    path: str
    step: str
    results: tuple[ResultSet, ...] = ()
    error: ErrorSeen | None = None
    cursor_after_error: ResultSet | None = None
    transaction_status: str = ""
    notices: tuple[str, ...] = ()


@dataclass(frozen=True)
class FinalState:
    """What the script left committed, read on a fresh connection."""

    tables: tuple[tuple[str, tuple[Any, ...]], ...]
    sequences: tuple[tuple[str, int], ...]


@dataclass
class Run:
    """One side's complete record."""

    observations: list[Observation]
    final: FinalState
    #: selfheal's audit events per step path (healing run only).
    heals: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def at(self, path: str) -> Observation:
        """The observation of the step at `path` (e.g. "3" or "4.2")."""
        [found] = [o for o in self.observations if o.path == path]
        return found


# -- drivers ----------------------------------------------------------------------------


class Session(Protocol):
    """A caller's connection, driven step by step.

    Every method raises only the driver's `errors` for what the database or
    the driver refuses; the runner records those and carries on.
    """

    #: The driver's database errors: the only exceptions a step may raise.
    errors: tuple[type[BaseException], ...]

    async def execute(self, step: Execute) -> Outcome:
        """Run `step`; its results, or its error (returned, not raised)."""
        ...

    async def commit(self) -> None: ...

    async def rollback(self) -> None: ...

    async def begin(self) -> None:
        """Enter a transaction block and keep it open."""
        ...

    async def end(self, rollback: bool) -> None:
        """Leave the innermost block `begin` opened."""
        ...

    async def block(self, body: Callable[[], Awaitable[None]], rollback: bool) -> None:
        """Run `body` inside a transaction block written as the caller writes one."""
        ...

    def open_blocks(self) -> int:
        """How many blocks `begin` opened that are not ended yet."""
        ...

    def transaction_status(self) -> str:
        """The connection's transaction status, as a name (IDLE, INTRANS, INERROR...)."""
        ...

    def take_notices(self) -> tuple[str, ...]:
        """The notices received since the last call."""
        ...

    def describe(self, ex: BaseException) -> ErrorSeen: ...

    async def prepared_statements(self) -> Outcome:
        """The session's pg_prepared_statements, without preparing or changing anything."""
        ...

    async def close(self) -> None: ...


class Driver(Protocol):
    """Opens plain and healing sessions of one database driver."""

    name: str
    is_async: bool

    async def connect(self, dsn: str, options: Options, healing: bool) -> Session: ...


# -- the schema -------------------------------------------------------------------------

TAKEN = "taken@example.com"


@dataclass(frozen=True)
class Table:
    """A harness table with a sequence-backed column, and how drift writes into it."""

    name: str
    sequence: str
    #: Takes the first and last id; skips ids already taken (by the caller's explicit ids).
    drift: str


@dataclass(frozen=True)
class Schema:
    setup: str
    reset: str
    tables: tuple[str, ...]
    drifting: dict[str, Table]
    restricted_grants: tuple[str, ...]


SCHEMA = Schema(
    setup="""
CREATE TABLE ledger (id serial PRIMARY KEY, note text);
CREATE TABLE users (id int GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, email text UNIQUE);
CREATE TABLE docs (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), title text);
CREATE TABLE pairs (a serial, b int, PRIMARY KEY (a, b));
CREATE PROCEDURE add_ledger(n text) LANGUAGE plpgsql AS $$
BEGIN
  RAISE NOTICE 'add_ledger %', n;
  INSERT INTO ledger (note) VALUES (n);
END $$;
CREATE PROCEDURE batch() LANGUAGE plpgsql AS $$
BEGIN
  RAISE NOTICE 'batch';
  INSERT INTO ledger (note) VALUES ('batch');
  COMMIT;
  INSERT INTO users (email) VALUES (NULL);
END $$;
CREATE FUNCTION new_ledger(n text) RETURNS int LANGUAGE sql AS $$
  INSERT INTO ledger (note) VALUES (n) RETURNING id
$$;
""",
    # Every sequence ends up in sync with its table.
    reset=f"""
TRUNCATE ledger, users, docs, pairs RESTART IDENTITY;
INSERT INTO ledger (note) VALUES ('seed1'), ('seed2'), ('seed3');
INSERT INTO users (email) VALUES ('{TAKEN}'), (NULL);
INSERT INTO docs (id, title) VALUES ('{uuid.UUID(int=1)}', 'seed');
INSERT INTO pairs (b) VALUES (0), (1);
""",
    tables=("docs", "ledger", "pairs", "users"),
    drifting={
        "ledger": Table("ledger", "public.ledger_id_seq",
                        "INSERT INTO ledger (id, note) SELECT g, 'drift'"
                        " FROM generate_series(%s::int, %s::int) g ON CONFLICT DO NOTHING"),
        "users": Table("users", "public.users_id_seq",
                       "INSERT INTO users (id) SELECT g"
                       " FROM generate_series(%s::int, %s::int) g ON CONFLICT DO NOTHING"),
        "pairs": Table("pairs", "public.pairs_a_seq",
                       "INSERT INTO pairs (a, b) SELECT g, 0"
                       " FROM generate_series(%s::int, %s::int) g ON CONFLICT DO NOTHING"),
    },
    restricted_grants=(
        "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}",
        "GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}",
    ),
)


@dataclass
class Database:
    """One side's database: the owner's DSN, the restricted role's, an admin connection."""

    dsn: str
    restricted_dsn: str
    admin: psycopg.Connection[Any]

    def reset(self) -> None:
        self.admin.execute(SCHEMA.reset)

    def dsn_for(self, options: Options) -> str:
        return self.restricted_dsn if options.restricted else self.dsn


# -- normalising ------------------------------------------------------------------------

RANDOM_UUID = "<random uuid>"


def normalise(value: Any) -> Any:
    """A value as compared: drawn uuids hidden, rows as tuples (dict rows keep their keys)."""
    if isinstance(value, uuid.UUID):
        return RANDOM_UUID if value.version == 4 else value
    if isinstance(value, dict):
        return ("dict", tuple((k, normalise(v)) for k, v in value.items()))
    if isinstance(value, tuple | list):
        return tuple(normalise(v) for v in value)
    return value


# -- the runner -------------------------------------------------------------------------

#: The path of the observation of pg_prepared_statements, read after the last step.
PREPARED = "end"
HEAL_EVENTS = frozenset({"sequence_resynced", "sequence_already_in_sync", "sequence_resync_failed"})
RETRIED = frozenset({"succeeded", "failed"})
#: Added to each heal event on the healing run: its sequence's next value after the step.
NEXT_AFTER_STEP = "next_after_step"


def _moved(event: dict[str, Any]) -> bool:
    return event["event"] in ("sequence_resynced", "sequence_already_in_sync")


class _Runner:
    def __init__(self, session: Session, db: Database,
                 heals: dict[str, list[dict[str, Any]]] | None) -> None:
        self.session = session
        self.db = db
        self.healing = heals is None
        self.heals: dict[str, list[dict[str, Any]]] = {} if heals is None else heals
        self.log: list[Observation] = []

    async def steps(self, steps: Sequence[Step], prefix: str = "") -> None:
        for i, step in enumerate(steps, 1):
            await self.step(f"{prefix}{i}", step)

    async def step(self, path: str, step: Step) -> None:
        s = self.session
        if isinstance(step, Drift | Rewind):
            self.drift(path, step)
        elif isinstance(step, Execute):
            await self.act(path, str(step), lambda: s.execute(step))
        elif isinstance(step, Commit):
            await self.act(path, str(step), s.commit)
        elif isinstance(step, Rollback):
            await self.act(path, str(step), s.rollback)
        elif isinstance(step, Begin):
            await self.act(path, str(step), s.begin)
        elif isinstance(step, End):
            if s.open_blocks():
                await self.act(path, str(step), lambda: s.end(step.rollback))
        else:
            await self.act(path, str(step), lambda: s.block(
                lambda: self.steps(step.steps, f"{path}."), step.rollback))

    async def act(self, path: str, label: str, action: Callable[[], Awaitable[Any]]) -> None:
        self.resync(path, retried=True)
        with capture_logs() as events:
            try:
                outcome = await action()
            except self.session.errors as ex:
                outcome = Outcome(error=self.session.describe(ex))
        if self.healing:
            self.heals[path] = [e for e in events if e["event"] in HEAL_EVENTS]
        self.resync(path, retried=False)
        outcome = outcome if isinstance(outcome, Outcome) else Outcome()
        self.log.append(Observation(
            path=path,
            step=label,
            results=outcome.results,
            error=outcome.error,
            cursor_after_error=outcome.cursor_after_error,
            transaction_status=self.session.transaction_status(),
            notices=self.session.take_notices(),
        ))

    def resync(self, path: str, retried: bool) -> None:
        """The oracle: on the plain run, move a sequence where the healing run healed.

        `retried`: before the step (for successful retries); else after it.
        """
        for event in self.heals.get(path, []):
            if not _moved(event):
                continue
            if self.healing:
                if not retried:
                    event[NEXT_AFTER_STEP] = next_value(self.db.admin, event["sequence"])
                continue
            succeeded = event["retry"] == "succeeded"
            if retried and succeeded:
                self._setval(event["sequence"], event["after"])
            elif not retried and not succeeded:
                self._setval(event["sequence"], event[NEXT_AFTER_STEP])

    def _setval(self, sequence: str, next_value: int) -> None:
        self.db.admin.execute("SELECT setval(%s::regclass, %s, false)", (sequence, next_value))

    def drift(self, path: str, step: Drift | Rewind) -> None:
        table = SCHEMA.drifting[step.table]
        admin = self.db.admin
        nxt = next_value(admin, table.sequence)
        error = None
        results: tuple[ResultSet, ...] = ()
        if isinstance(step, Drift):
            first, last = nxt + step.offset, nxt + step.offset + step.count - 1
            label = f"{step} -> ids {first}..{last}"
            try:
                cur = admin.execute(table.drift, (first, last))
                results = (ResultSet(cur.statusmessage, cur.rowcount, None, None),)
            except psycopg.errors.LockNotAvailable as ex:
                # Blocked by the caller's uncommitted row with that id: the
                # same on both sides, and nothing is written.
                error = describe_psycopg(ex)
        else:
            to = max(1, nxt - step.by)
            label = f"{step} -> next value {to}"
            admin.execute("SELECT setval(%s::regclass, %s, false)", (table.sequence, to))
        self.log.append(Observation(path=path, step=label, results=results, error=error))


def next_value(conn: psycopg.Connection[Any], sequence: str) -> int:
    """What nextval() on `sequence` would return, read without drawing."""
    row = conn.execute(
        sql.SQL("SELECT last_value, is_called, (SELECT seqincrement FROM pg_sequence"
                " WHERE seqrelid = {}::regclass) FROM {}").format(
            sql.Literal(sequence), sql.Identifier(*sequence.split(".")))
    ).fetchone()
    assert row is not None
    last, called, increment = row
    return int(last + increment if called else last)


def describe_psycopg(ex: BaseException) -> ErrorSeen:
    """An `ErrorSeen` from a psycopg 3 exception (used by the psycopg drivers too)."""
    diag = getattr(ex, "diag", None)

    def get(name: str) -> str | None:
        return getattr(diag, name, None) if diag is not None else None

    return ErrorSeen(
        cls=f"{type(ex).__module__}.{type(ex).__qualname__}",
        sqlstate=get("sqlstate"),
        message_primary=get("message_primary"),
        message_detail=get("message_detail"),
        schema_name=get("schema_name"),
        table_name=get("table_name"),
        constraint_name=get("constraint_name"),
        text=_CONNECTION_REPR.sub("<connection>", str(ex)),
    )


# psycopg's own errors (a transaction block closed out of order, say) quote the
# connection's repr: its database and address are the run's, not the outcome.
_CONNECTION_REPR = re.compile(r"\(user=[^()]*\) at 0x[0-9a-f]+")


def final_state(dsn: str) -> FinalState:
    """Committed rows of every table and each sequence's next value, on a fresh connection."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        tables = tuple(
            (name, tuple(sorted(
                (normalise(r) for r in conn.execute(
                    sql.SQL("SELECT * FROM {}").format(sql.Identifier(name))).fetchall()),
                key=repr)))
            for name in SCHEMA.tables
        )
        names = [r[0] for r in conn.execute(
            "SELECT 'public.' || relname FROM pg_class"
            " WHERE relkind = 'S' AND relnamespace = 'public'::regnamespace ORDER BY 1")]
        sequences = tuple((name, next_value(conn, name)) for name in names)
    return FinalState(tables=tables, sequences=sequences)


async def run_script(driver: Driver, script: Script, db: Database,
                     heals: dict[str, list[dict[str, Any]]] | None = None) -> Run:
    """Run `script` on `db`: healing when `heals` is None, else plain with that oracle."""
    session = await driver.connect(db.dsn_for(script.options), script.options,
                                   healing=heals is None)
    runner = _Runner(session, db, heals)
    try:
        await runner.steps(script.steps)
        # Read before any rollback: psycopg deallocates everything on rollback.
        await runner.act(PREPARED, "read pg_prepared_statements", session.prepared_statements)
        for k in range(session.open_blocks(), 0, -1):
            await runner.act(f"end.{k}", str(End(rollback=True)), lambda: session.end(True))
        await runner.act("end.0", str(Rollback()), session.rollback)
    finally:
        await session.close()
    return Run(observations=runner.log, final=final_state(db.dsn), heals=runner.heals)


async def run_pair(driver: Driver, script: Script, healing: Database,
                   plain: Database) -> tuple[Run, Run]:
    """Reset both databases, run the healing side, then the plain side with its oracle.

    The healing side starts as a new process would, knowing nothing of the
    tables: the reset is done behind its back, and what an earlier script
    verified less than `verified_for` ago would otherwise decide whether this
    one's statements are protected.
    """
    healing.reset()
    plain.reset()
    insync._forget_all()
    healed = await run_script(driver, script, healing)
    return healed, await run_script(driver, script, plain, heals=healed.heals)


# -- comparing --------------------------------------------------------------------------


def _retry(events: list[dict[str, Any]]) -> str | None:
    """How a step's retry went ("succeeded", "failed"), None if there was none."""
    retries = [e["retry"] for e in events if _moved(e) and e["retry"] in RETRIED]
    return retries[0] if retries else None


def _only_first_attempts(h: Observation, p: Observation, retries: int) -> bool:
    """Whether the healing side's extra prepared statements are failed first attempts.

    psycopg prepares a statement in the same round trip that runs it; when it
    fails, the server keeps the statement but psycopg forgets its name, so
    each retried statement may leave one more copy of a text plain prepared too.
    """
    if not (h.results and p.results) or h.results[0].rows is None or p.results[0].rows is None:
        return False
    extra = Counter(h.results[0].rows)
    extra.subtract(Counter(p.results[0].rows))
    if any(n < 0 for n in extra.values()):
        return False
    return all(text in p.results[0].rows for text, n in extra.items() if n) and (
        sum(extra.values()) <= retries)


def differences(healed: Run, plain: Run) -> list[str]:
    """One line per difference between the two runs, in step order."""
    out: list[str] = []
    retries = sum(_retry(events) is not None for events in healed.heals.values())
    pairs = itertools.zip_longest(healed.observations, plain.observations)
    for h, p in pairs:
        if h is None or p is None:
            out.append(f"only one side ran a step: healing={h} plain={p}")
            break
        if h.path != p.path:
            out.append(f"the runs took different paths: healing={h.path} plain={p.path}")
            break
        if h.path == PREPARED and _only_first_attempts(h, p, retries):
            h = replace(h, results=p.results)
        for f in fields(Observation):
            hv, pv = getattr(h, f.name), getattr(p, f.name)
            if hv != pv:
                out.append(f"step {h.path} ({h.step}): {f.name}: healing={hv!r} plain={pv!r}")
    for (name, hrows), (_, prows) in zip(healed.final.tables, plain.final.tables, strict=True):
        if hrows != prows:
            out.append(f"committed rows of {name}: healing={hrows!r} plain={prows!r}")
    if healed.final.sequences != plain.final.sequences:
        out.append(f"sequences' next values: healing={healed.final.sequences!r}"
                   f" plain={plain.final.sequences!r}")
    return out


def assert_parity(script: Script, healed: Run, plain: Run) -> None:
    """Fail with every difference, the script and selfheal's events, if the runs differ."""
    diffs = differences(healed, plain)
    if diffs:
        events = {k: [(e["event"], e.get("table"), e.get("retry")) for e in v]
                  for k, v in healed.heals.items() if v}
        raise AssertionError(
            "plain and healing connections differ:\n  " + "\n  ".join(diffs)
            + f"\nscript:\n{script.render()}\nselfheal events: {events}")


# -- random scripts (hypothesis) --------------------------------------------------------

_notes = st.sampled_from(["a", "b"])
_ids = st.integers(1, 9)
_emails = st.sampled_from(["a@example.com", "b@example.com", TAKEN, None])
# Mostly no email, so that a drawing insert into users mostly meets the drift, not an email.
_some_emails = st.sampled_from([None, None, None, "a@example.com", TAKEN])
_uuids = st.sampled_from([uuid.UUID(int=1), uuid.UUID(int=2)])
_vias = st.sampled_from(["conn", "cursor"])


def _ex(query: str, *params: st.SearchStrategy[Any]) -> st.SearchStrategy[Execute]:
    args = st.tuples(*params) if params else st.none()
    return st.builds(Execute, st.just(query), args, via=_vias)


def _many(query: str, row: st.SearchStrategy[tuple[Any, ...]], returning: bool
          ) -> st.SearchStrategy[Execute]:
    return st.builds(Execute, st.just(query), st.none(), via=st.just("cursor"),
                     many=st.lists(row, min_size=1, max_size=3).map(tuple),
                     returning=st.just(returning))


# Statements that draw from one table's sequence, by table: a collision after drift.
# (Each statement draws from one sequence at most; see the module docstring.)
drawing: dict[str, st.SearchStrategy[Execute]] = {
    "ledger": st.one_of(
        _ex("INSERT INTO ledger (note) VALUES (%s)", _notes),
        _ex("INSERT INTO ledger (note) VALUES (%s), (%s) RETURNING id, note", _notes, _notes),
        _ex("INSERT INTO ledger (note) VALUES (%s) RETURNING id", _notes),
        _ex("UPDATE ledger SET id = DEFAULT WHERE id = %s RETURNING id", _ids),
        _many("INSERT INTO ledger (note) VALUES (%s)", st.tuples(_notes), False),
        _many("INSERT INTO ledger (note) VALUES (%s) RETURNING id", st.tuples(_notes), True),
        _ex("INSERT INTO ledger (note) VALUES ('m1'); INSERT INTO ledger (note) VALUES ('m2')"),
        _ex("INSERT INTO docs (title) VALUES ('m'); INSERT INTO ledger (note) VALUES ('m')"
            " RETURNING id"),
        _ex("SELECT count(*) FROM ledger; INSERT INTO ledger (note) VALUES ('m')"),
        _ex("CALL add_ledger(%s)", _notes),
        _ex("SELECT new_ledger(%s)", _notes),
    ),
    "users": st.one_of(
        _ex("INSERT INTO users (email) VALUES (%s)", _some_emails),
        _ex("INSERT INTO users (email) VALUES (%s), (%s)", _some_emails, _some_emails),
        _ex("INSERT INTO users (email) VALUES (%s) RETURNING id, email", _some_emails),
        _ex("INSERT INTO users (email) VALUES (%s) ON CONFLICT (email) DO NOTHING RETURNING id",
            _some_emails),
        _many("INSERT INTO users (email) VALUES (%s)", st.tuples(_some_emails), False),
        _ex("CALL batch()"),  # a ledger row, COMMIT, then a users row
    ),
    "pairs": _ex("INSERT INTO pairs (b) VALUES (%s)", st.integers(0, 1)),
}

statements: st.SearchStrategy[Execute] = st.one_of(
    *drawing.values(),
    _ex("INSERT INTO ledger (id, note) VALUES (%s, %s)", _ids, _notes),
    _ex("UPDATE ledger SET note = %s WHERE id = %s", _notes, _ids),
    _ex("DELETE FROM ledger WHERE id = %s", _ids),
    _ex("SELECT id, note FROM ledger ORDER BY id"),
    _ex("INSERT INTO users (id, email) VALUES (%s, %s)", _ids, _emails),
    _ex("UPDATE users SET email = %s WHERE id = %s", _emails, _ids),
    _ex("INSERT INTO docs (title) VALUES (%s) RETURNING id", _notes),
    _ex("INSERT INTO docs (id, title) VALUES (%s, %s)", _uuids, _notes),
    _ex("INSERT INTO pairs (a, b) VALUES (%s, %s)", _ids, st.integers(0, 1)),
    _ex("BEGIN"),  # transaction control as SQL: psycopg lets callers do it
    _ex("COMMIT"),
    _ex("SAVEPOINT s1"),
    _ex("ROLLBACK TO SAVEPOINT s1"),
    _ex("RELEASE SAVEPOINT s1"),
    _ex("SELECT 1/0"),
)

_drifting = st.sampled_from(sorted(SCHEMA.drifting))
drifts: st.SearchStrategy[Step] = st.one_of(
    st.builds(Drift, _drifting, st.integers(0, 1), st.integers(1, 3)),
    st.builds(Rewind, _drifting, st.integers(1, 3)),
)
#: Drift, then a statement drawing from that table's sequence: mostly a collision.
collisions: st.SearchStrategy[list[Step]] = _drifting.flatmap(lambda table: st.tuples(
    st.one_of(st.builds(Drift, st.just(table), st.integers(0, 1), st.integers(1, 3)),
              st.builds(Rewind, st.just(table), st.integers(1, 3))),
    drawing[table],
).map(list))


def _one(strategy: st.SearchStrategy[Step]) -> st.SearchStrategy[list[Step]]:
    return strategy.map(lambda step: [step])


_leaf: st.SearchStrategy[list[Step]] = st.one_of(_one(statements), collisions, _one(drifts))


def _flat(chunks: list[list[Step]]) -> tuple[Step, ...]:
    return tuple(step for chunk in chunks for step in chunk)


blocks: st.SearchStrategy[Step] = st.builds(
    Block,
    st.lists(st.one_of(_leaf, _one(st.builds(Block, st.lists(_leaf, max_size=2).map(_flat),
                                              st.booleans()))),
             max_size=3).map(_flat),
    st.booleans(),
)
chunks: st.SearchStrategy[list[Step]] = st.one_of(
    _one(statements), _one(statements), collisions, collisions, collisions, _one(drifts),
    _one(st.just(Commit())), _one(st.just(Rollback())), _one(st.just(Rollback())),
    _one(st.just(Rollback())),
    _one(st.just(Begin())), _one(st.builds(End, st.booleans())), _one(blocks),
)

options: st.SearchStrategy[Options] = st.builds(
    Options,
    autocommit=st.booleans(),
    prepare_threshold=st.sampled_from(["default", 0, None]),
    read_only=st.sampled_from([False] * 7 + [True]),
    isolation_level=st.sampled_from(
        [None, "READ_COMMITTED", "REPEATABLE_READ", "SERIALIZABLE"]),
    cursor=st.sampled_from(["Cursor", "ClientCursor", "RawCursor"]),
    rows=st.sampled_from(["tuple", "dict"]),
    restricted=st.sampled_from([False] * 5 + [True]),
    heal=st.sampled_from([()] * 4 + [(("protect", "always"),)] * 2
                         + [(("retry", False),), (("savepoints", False),)]),
)


def _balanced(seq: Sequence[Step]) -> tuple[Step, ...]:
    """Drop each `End` that has no open `Begin` to close."""
    out: list[Step] = []
    depth = 0
    for step in seq:
        if isinstance(step, End):
            if depth == 0:
                continue
            depth -= 1
        elif isinstance(step, Begin):
            depth += 1
        out.append(step)
    return tuple(out)


def scripts(min_chunks: int = 3, max_chunks: int = 9) -> st.SearchStrategy[Script]:
    """Random scripts: chunks of steps (one step, or drift and a collision) under options."""
    steps = st.lists(chunks, min_size=min_chunks, max_size=max_chunks).map(_flat).map(_balanced)
    return st.builds(Script, steps, options)


# -- the two tests every driver's module runs ------------------------------------------


@dataclass(frozen=True)
class PlainTwice:
    """A driver whose sessions are plain on both runs: the harness checking itself."""

    driver: Driver

    @property
    def name(self) -> str:
        return f"{self.driver.name} (plain twice)"

    @property
    def is_async(self) -> bool:
        return self.driver.is_async

    async def connect(self, dsn: str, options: Options, healing: bool) -> Session:
        return await self.driver.connect(dsn, options, False)


def driver_tests(driver: Driver, examples: int = 60,
                 adapt: Callable[[Script], Script] = lambda script: script,
                 ) -> tuple[Callable[..., None], Callable[..., None]]:
    """`driver`'s random-script test and its plain-against-plain check, as module-level
    tests (they take the ``dbs`` fixture). `adapt` drops what the driver cannot run."""
    import asyncio

    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=examples, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(script=scripts())
    def test_random_scripts(dbs: tuple[Database, Database], script: Script) -> None:
        script = adapt(script)
        healed, plain = asyncio.run(run_pair(driver, script, *dbs))
        assert_parity(script, healed, plain)

    @settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(script=scripts())
    def test_harness_plain_against_plain(dbs: tuple[Database, Database],
                                         script: Script) -> None:
        script = adapt(script)
        first, second = asyncio.run(run_pair(PlainTwice(driver), script, *dbs))
        assert differences(first, second) == []

    test_random_scripts.__doc__ = (f"A random script shows the same on plain and healing"
                                   f" {driver.name}, heals aside.")
    test_harness_plain_against_plain.__doc__ = (
        f"Two plain {driver.name} runs of one script agree: the driver is deterministic.")
    return test_random_scripts, test_harness_plain_against_plain
