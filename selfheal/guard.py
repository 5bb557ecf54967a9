"""
Guard: the database keeps its own sequences past the keys written into it.

A heal repairs drift where a Python process meets it; the guard stops it at
its source, for every client (other services, psql, ETL jobs). On each table
with a sequence-backed primary key it installs one trigger, in plain SQL and
PL/pgSQL: ``selfheal_guard``, AFTER INSERT OR UPDATE OF <key>, FOR EACH ROW,
cloned by PostgreSQL onto every partition (present and future). Its WHEN
clause is the whole hot path:

- a default id is never past the sequence's last value, so for it the clause
  stops at one comparison and nothing is queued or called;
- the first row of a statement that writes a key past the sequence sets a
  transaction-local marker and queues one event; later rows of the statement
  see the marker and queue nothing.

The marker is set by ``selfheal_guard_mark``; at the end of the statement
the one event runs ``selfheal_guard_fix`` (both functions of the table's
schema), which moves the sequence past the table's
keys with the same arithmetic and advisory lock as `selfheal.resync`: forward
only, bounded lock wait, the lock released before the statement ends. It runs
with its owner's rights (the role that installed it), its search_path pinned
and EXECUTE revoked from PUBLIC, so a role that may insert but not move the
sequence is covered too. When it cannot move the sequence (lock wait,
sequence at its limit, privileges), the write goes through and the client
gets a WARNING; the drift is left for ``status`` and ``fix`` to show.

Not covered: writes with triggers disabled (``session_replication_role =
replica``, a data-only restore with ``--disable-triggers``), a sequence reset
by hand. Run ``selfheal fix`` after a restore.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from .discover import TableInfo
from .resync import DRAW_LIMIT, lock_key

__all__ = ["FIX_FUNCTION", "GUARD_LOCK_TIMEOUT", "MARK_FUNCTION", "TRIGGER", "GuardState",
           "install", "remove", "states"]

TRIGGER = "selfheal_guard"
FIX_FUNCTION = "selfheal_guard_fix"
MARK_FUNCTION = "selfheal_guard_mark"

#: How long, in seconds, a guarded write waits for the sequence's advisory lock
#: (held by a heal or another guard for milliseconds) before it gives up moving
#: the sequence and warns instead.
GUARD_LOCK_TIMEOUT = 0.25

# The transaction-local setting that says "a key past the sequence was written
# by the current statement, and its event is queued"; the event clears it.
_MARKER = "selfheal.guard_"

# Set the marker, from the WHEN clause: true for the first row of a statement
# past the sequence. The WHEN clause tests the marker itself first, so later
# rows cost a setting lookup, not a call. Every call in a WHEN clause costs
# each statement (default ids included) microseconds to prepare: one
# function here is cheaper than set_config() and its comparison.
_MARK_BODY = """\
BEGIN
  IF pg_catalog.current_setting(marker, true) IS DISTINCT FROM 'pending' THEN
    PERFORM pg_catalog.set_config(marker, 'pending', true);
    RETURN true;
  END IF;
  RETURN false;
END
"""

# TG_ARGV: root table oid, key column, sequence oid, advisory lock key, lock
# wait (ms), and the largest gap closed by drawing values (see selfheal.resync.DRAW_LIMIT).
# The work runs in a block that always ends in an exception: rolling it back
# releases the advisory lock before the statement ends, whatever happens,
# while what nextval()/setval() did stays (sequences are not transactional).
_FIX_BODY = """\
DECLARE
  root oid := TG_ARGV[0]::oid;
  col text := TG_ARGV[1];
  seq oid := TG_ARGV[2]::oid;
  inc numeric; lo numeric; hi numeric;
  last numeric; called boolean; nxt numeric;
  key numeric; draws numeric; target numeric;
  msg text;
BEGIN
  PERFORM pg_catalog.set_config('selfheal.guard_' || TG_ARGV[0], '', true);
  BEGIN
    PERFORM pg_catalog.set_config('lock_timeout', TG_ARGV[4] || 'ms', true);
    PERFORM pg_catalog.pg_advisory_xact_lock(TG_ARGV[3]::bigint);
    SELECT seqincrement, seqmin, seqmax INTO inc, lo, hi
      FROM pg_catalog.pg_sequence WHERE seqrelid = seq;
    EXECUTE pg_catalog.format(
      CASE WHEN inc > 0 THEN 'SELECT max(%I) FROM %s' ELSE 'SELECT min(%I) FROM %s' END,
      col, root::regclass) INTO key;
    EXECUTE pg_catalog.format('SELECT last_value, is_called FROM %s', seq::regclass)
      INTO last, called;
    nxt := CASE WHEN called THEN last + inc ELSE last END;
    -- At or past the next value, in the direction the sequence runs.
    IF key IS NOT NULL AND (key - nxt) * pg_catalog.sign(inc) >= 0 THEN
      draws := pg_catalog.div(pg_catalog.abs(key - nxt), pg_catalog.abs(inc)) + 1;
      target := nxt + draws * inc;
      IF target > hi OR target < lo THEN
        RAISE EXCEPTION 'the next value past key % is beyond the sequence''s limit', key;
      ELSIF draws <= TG_ARGV[5]::numeric THEN
        PERFORM pg_catalog.max(pg_catalog.nextval(seq::regclass))
          FROM pg_catalog.generate_series(1, draws::bigint);
      ELSE
        EXECUTE pg_catalog.format(
          'SELECT pg_catalog.setval(%s, $1, false) FROM %s WHERE $1 %s'
          ' (CASE WHEN is_called THEN last_value + $2 ELSE last_value END)',
          seq, seq::regclass, CASE WHEN inc > 0 THEN '>' ELSE '<' END)
          USING target::bigint, inc::bigint;
      END IF;
    END IF;
    RAISE SQLSTATE 'SH000';
  EXCEPTION
    WHEN SQLSTATE 'SH000' THEN NULL;
    WHEN OTHERS THEN
      GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT;
      RAISE WARNING 'selfheal guard did not move sequence % past the keys of %: %',
        seq::regclass, root::regclass, msg
        USING HINT = 'the write went through; run selfheal fix to move the sequence';
  END;
  RETURN NULL;
END
"""


@dataclass(frozen=True)
class GuardState:
    """How one table is guarded."""

    info: TableInfo
    #: The relations of the table (itself, and its partitions) lacking a part of
    #: the guard, or holding it disabled or for another sequence.
    missing: tuple[str, ...]
    #: True when no part of the guard is on the table.
    absent: bool

    @property
    def guarded(self) -> bool:
        """True when every part of the guard is in place and enabled."""
        return not self.missing

    @property
    def state(self) -> str:
        """``guarded``, ``unguarded`` or ``partial``."""
        if self.guarded:
            return "guarded"
        return "unguarded" if self.absent else "partial"


def _marker(root_oid: int) -> str:
    return f"{_MARKER}{root_oid}"


def _fix_args(info: TableInfo, root_oid: int) -> list[str]:
    return [str(root_oid), info.column, str(info.sequence_oid), str(lock_key(info)),
            str(int(GUARD_LOCK_TIMEOUT * 1000)), str(DRAW_LIMIT)]


def _past_sequence(info: TableInfo, server_version: int) -> sql.Composable:
    # pg_sequence_last_value() is NULL before the first nextval() and, from
    # PostgreSQL 17, for a role without privileges on the sequence: neither
    # is a default id, so both count as past. Before 17 it raises for such a
    # role, so the privilege is asked first.
    past = sql.SQL(
        "(NEW.{col} {op} pg_catalog.pg_sequence_last_value({seq}::oid::regclass))"
        " IS NOT FALSE"
    ).format(col=sql.Identifier(info.column), op=sql.SQL(">" if info.increment > 0 else "<"),
             seq=sql.Literal(info.sequence_oid))
    if server_version >= 170000:
        return past
    return sql.SQL(
        "CASE WHEN pg_catalog.has_sequence_privilege({seq}::oid, 'SELECT, USAGE')"
        " THEN {past} ELSE true END"
    ).format(seq=sql.Literal(info.sequence_oid), past=past)


def _functions(schema: str) -> list[sql.Composed]:
    fix = sql.Identifier(schema, FIX_FUNCTION)
    mark = sql.Identifier(schema, MARK_FUNCTION)
    return [
        sql.SQL("CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql"
                " SECURITY DEFINER SET search_path = pg_catalog, pg_temp"
                " AS {}").format(fix, sql.Literal(_FIX_BODY)),
        sql.SQL("REVOKE ALL ON FUNCTION {}() FROM PUBLIC").format(fix),
        # Runs with the writer's rights, on the writer's own session: every
        # writer must be able to call it, or its writes would fail.
        sql.SQL("CREATE OR REPLACE FUNCTION {}(marker text) RETURNS boolean"
                " LANGUAGE plpgsql AS {}").format(mark, sql.Literal(_MARK_BODY)),
        sql.SQL("GRANT EXECUTE ON FUNCTION {}(text) TO PUBLIC").format(mark),
    ]


def _trigger(info: TableInfo, root_oid: int, server_version: int) -> sql.Composed:
    return sql.SQL(
        "CREATE OR REPLACE TRIGGER {name} AFTER INSERT OR UPDATE OF {col} ON {tbl}"
        " FOR EACH ROW WHEN ({past}"
        " AND pg_catalog.current_setting({marker}, true) IS DISTINCT FROM 'pending'"
        " AND {mark}({marker}))"
        " EXECUTE FUNCTION {fn}({args})"
    ).format(
        name=sql.Identifier(TRIGGER), col=sql.Identifier(info.column), tbl=info.table_ident,
        past=_past_sequence(info, server_version), marker=sql.Literal(_marker(root_oid)),
        mark=sql.Identifier(info.schema, MARK_FUNCTION),
        fn=sql.Identifier(info.schema, FIX_FUNCTION),
        args=sql.SQL(", ").join(sql.Literal(v) for v in _fix_args(info, root_oid)),
    )


# Per table: its oid, and every relation of its partition tree (itself first)
# with the guard's trigger on it: (schema, name, trigger args or NULL, enabled).
_STATE = sql.SQL("""\
SELECT w.i, c.oid::bigint, (
  SELECT pg_catalog.array_agg(ARRAY[rn.nspname, r.relname,
           pg_catalog.encode(tg.tgargs, 'escape'), (tg.tgenabled <> 'D')::text]
         ORDER BY t.root DESC, rn.nspname, r.relname)
  FROM (SELECT c.oid AS relid, true AS root
        UNION SELECT p.relid, false FROM pg_catalog.pg_partition_tree(c.oid) p
        WHERE p.relid <> c.oid) t
  JOIN pg_catalog.pg_class r ON r.oid = t.relid
  JOIN pg_catalog.pg_namespace rn ON rn.oid = r.relnamespace
  LEFT JOIN pg_catalog.pg_trigger tg ON tg.tgrelid = r.oid AND tg.tgname = {name})
FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS w(nsp, rel, i)
JOIN pg_catalog.pg_namespace n ON n.nspname = w.nsp
JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = w.rel
ORDER BY w.i
""").format(name=sql.Literal(TRIGGER))


def _split_args(encoded: str | None) -> list[str] | None:
    if encoded is None:
        return None
    # tgargs: each argument followed by a NUL, shown by encode() as \000.
    return encoded.split("\\000")[:-1]


def _relname(schema: str, name: str) -> str:
    return TableInfo(schema, name, "", "", "", "", 0, 1, 1, 1, 1).qualified_table


def states(conn: psycopg.Connection[Any], infos: Sequence[TableInfo]
           ) -> list[tuple[GuardState, int]]:
    """How each of `infos` is guarded, with the table's oid."""
    if not infos:
        return []
    rows = conn.execute(_STATE, ([i.schema for i in infos], [i.table for i in infos])
                        ).fetchall()
    found: list[tuple[GuardState, int]] = []
    for index, oid, relations in rows:
        info = infos[index - 1]
        missing: list[str] = []
        present = False
        for schema, name, args, enabled in relations:
            present = present or args is not None
            if _split_args(args) != _fix_args(info, oid) or enabled != "true":
                missing.append(_relname(schema, name))
        found.append((GuardState(info, tuple(missing), absent=not present), oid))
    return found


def install(conn: psycopg.Connection[Any], state: GuardState, oid: int) -> None:
    """Install (or renew) the guard of one table, in one transaction.

    Takes the table's SHARE ROW EXCLUSIVE lock, as any CREATE TRIGGER does, so
    `conn` should carry a lock_timeout: writers queue behind a waiting DDL.
    """
    info = state.info
    with conn.transaction():
        for stmt in _functions(info.schema):
            conn.execute(stmt)
        conn.execute(_trigger(info, oid, conn.info.server_version))
        # Also the clones on partitions, one of which may have been disabled.
        conn.execute(sql.SQL("ALTER TABLE {} ENABLE TRIGGER {}").format(
            info.table_ident, sql.Identifier(TRIGGER)))


def remove(conn: psycopg.Connection[Any], state: GuardState, oid: int) -> None:
    """Remove the guard of one table, and the schema's functions once unused."""
    info = state.info
    with conn.transaction():
        conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
            sql.Identifier(TRIGGER), info.table_ident))
        used = conn.execute(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_trigger t"
            " JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid"
            " JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = %s AND p.proname = %s)", (info.schema, FIX_FUNCTION)
        ).fetchone()
        if used and not used[0]:
            conn.execute(sql.SQL("DROP FUNCTION IF EXISTS {}(), {}(text)").format(
                sql.Identifier(info.schema, FIX_FUNCTION),
                sql.Identifier(info.schema, MARK_FUNCTION)))

