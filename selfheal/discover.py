"""
Discover: which sequence feeds a table's primary key.

One catalog query answers it for one table or for a whole database, so
`check` costs the same number of round trips for 4 tables or 4000. A key is
"sequence-backed" when it is a single integer column whose values come from a
sequence: an identity column, or a default that calls ``nextval()`` (serial
columns, and sequences the table does not own). Partitions map to their
partitioned root, where the key's sequence lives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from psycopg import sql
from psycopg.rows import TupleRow

from . import errors
from ._ops import Operation, Query

__all__ = ["TableInfo", "Unreadable", "describe", "detect", "list_readable", "list_tables",
           "named_query", "permission_denied", "relations"]


@dataclass(frozen=True)
class TableInfo:
    """A table whose single-column primary key is drawn from a sequence."""

    #: The table's schema and name (the partitioned root for partitions).
    schema: str
    table: str
    #: The key column.
    column: str
    #: The primary key constraint's name.
    constraint: str
    #: The sequence's schema, name and oid.
    sequence_schema: str
    sequence_name: str
    sequence_oid: int
    #: The sequence's parameters, as in ``pg_sequence``.
    increment: int
    min_value: int
    max_value: int
    cache: int

    @property
    def sequence(self) -> str:
        """The sequence's schema-qualified name, quoted where needed."""
        return f"{_quote(self.sequence_schema)}.{_quote(self.sequence_name)}"

    @property
    def qualified_table(self) -> str:
        """The table's schema-qualified name, quoted where needed."""
        return f"{_quote(self.schema)}.{_quote(self.table)}"

    @property
    def table_ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.table)

    @property
    def sequence_ident(self) -> sql.Identifier:
        return sql.Identifier(self.sequence_schema, self.sequence_name)


def _quote(name: str) -> str:
    # For messages and reports only, never for SQL: how psql would show the name.
    if name.isidentifier() and name == name.lower() and name.isascii():
        return name
    return '"' + name.replace('"', '""') + '"'


# One row per table: its key column and the sequence its values come from.
# The LEFT JOIN keeps tables without such a key, so a caller can tell
# "unknown table" from "no sequence". The sequence is the one the column's
# DEFAULT depends on (serial, or nextval() on any sequence), else its identity
# sequence. Everything past the table is looked up per table inside one
# LATERAL ... LIMIT 1, which the planner cannot flatten: each lookup stays an
# index probe, so the cost grows linearly with the number of tables. Flattened
# joins let catalog estimates (often stale right after a restore or CREATE
# DATABASE ... TEMPLATE) pick nested loops that grew with tables x sequences.
_TABLES = sql.SQL("""\
SELECT n.nspname, c.relname, k.attname, k.conname,
       k.seqschema, k.seqname, k.seqid,
       k.seqincrement, k.seqmin, k.seqmax, k.seqcache,
       has_column_privilege(c.oid, k.attnum, 'SELECT'),
       has_sequence_privilege(k.seqid::oid, 'SELECT')
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN LATERAL (
  SELECT a.attname, a.attnum, con.conname, sn.nspname AS seqschema, s.relname AS seqname,
         s.oid::bigint AS seqid, q.seqincrement, q.seqmin, q.seqmax, q.seqcache
  FROM pg_constraint con
  JOIN pg_attribute a
    ON a.attrelid = con.conrelid AND a.attnum = con.conkey[1]
   AND a.atttypid IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype)
  CROSS JOIN LATERAL (
    SELECT d.refobjid AS seqid, 1 AS pref
    FROM pg_depend d
    WHERE d.classid = 'pg_attrdef'::regclass AND d.refclassid = 'pg_class'::regclass
      AND d.objid = (SELECT ad.oid FROM pg_attrdef ad
                     WHERE ad.adrelid = con.conrelid AND ad.adnum = a.attnum)
    UNION ALL
    SELECT d.objid, 2
    FROM pg_depend d
    WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
      AND d.refobjid = con.conrelid AND d.refobjsubid = a.attnum AND d.deptype = 'i'
  ) dep
  JOIN pg_class s ON s.oid = dep.seqid AND s.relkind = 'S'
  JOIN pg_namespace sn ON sn.oid = s.relnamespace
  JOIN pg_sequence q ON q.seqrelid = s.oid
  WHERE con.conrelid = c.oid AND con.contype = 'p' AND cardinality(con.conkey) = 1
  ORDER BY dep.pref
  LIMIT 1
) k ON true
WHERE c.relkind IN ('r', 'p') AND {where}
ORDER BY n.nspname, c.relname
""")


def _to_info(row: TupleRow) -> TableInfo:
    return TableInfo(
        schema=row[0],
        table=row[1],
        column=row[2],
        constraint=row[3],
        sequence_schema=row[4],
        sequence_name=row[5],
        sequence_oid=row[6],
        increment=row[7],
        min_value=row[8],
        max_value=row[9],
        cache=row[10],
    )


def _named(schema: str | None, table: str) -> str:
    return f"{_quote(schema)}.{_quote(table)}" if schema is not None else _quote(table)


def describe(table: str, schema: str | None = None) -> Operation[TableInfo]:
    """Find the sequence behind `table`'s primary key.

    With `schema` None the name resolves through the connection's search_path;
    otherwise only `schema` is looked in. A partition resolves to its root.
    """
    if schema is None:
        target = sql.SQL("to_regclass(quote_ident({}))").format(table)
    else:
        target = sql.SQL(
            "(SELECT c2.oid FROM pg_class c2 JOIN pg_namespace n2 ON n2.oid = c2.relnamespace"
            " WHERE n2.nspname = {} AND c2.relname = {} AND c2.relkind IN ('r', 'p'))"
        ).format(schema, table)
    where = sql.SQL("c.oid = (SELECT coalesce(pg_partition_root(r), r) FROM (SELECT {} AS r) x)")
    rows = yield Query(_TABLES.format(where=where.format(target)))
    if not rows:
        raise errors.TableNotFound(f"table {_named(schema, table)} does not exist")
    row = rows[0]
    if row[5] is None:
        raise errors.NoSequence(
            f"table {_quote(row[0])}.{_quote(row[1])} has no single-column integer primary key"
            " drawn from a sequence"
        )
    return _to_info(row)


def detect(schema: str, table: str, constraint: str) -> Operation[TableInfo | None]:
    """Tell whether `constraint` on `schema.table` is a sequence-backed primary key.

    Returns the table to heal (the partitioned root for a partition), or None
    when the constraint is anything else: a unique index, a composite or
    natural key, or a key with no sequence behind it.
    """
    where = sql.SQL(
        "c.oid = (SELECT coalesce(pg_partition_root(ct.conrelid), ct.conrelid)"
        " FROM pg_constraint ct JOIN pg_class cc ON cc.oid = ct.conrelid"
        " JOIN pg_namespace nc ON nc.oid = cc.relnamespace"
        " WHERE ct.contype = 'p' AND ct.conname = {} AND cc.relname = {} AND nc.nspname = {})"
    ).format(constraint, table, schema)
    rows = yield Query(_TABLES.format(where=where))
    if not rows or rows[0][5] is None:
        return None
    return _to_info(rows[0])


@dataclass(frozen=True)
class Unreadable:
    """A table with a sequence-backed key that this role cannot check."""

    info: TableInfo
    #: What the role lacks, e.g. "SELECT on sequence public.orders_id_seq".
    needs: str


def list_readable(
    schemas: Sequence[str] | None = None,
    tables: Sequence[str] | None = None,
    exclude_schemas: Sequence[str] | None = None,
) -> Operation[tuple[list[TableInfo], list[Unreadable]]]:
    """As `list_tables`, but the tables the role cannot read are returned apart,
    each with the privilege it lacks, instead of raised."""
    conds: list[sql.Composable] = [
        sql.SQL("NOT c.relispartition"),
        sql.SQL("k.seqid IS NOT NULL"),
        sql.SQL("n.nspname NOT IN ('pg_catalog', 'information_schema')"),
        sql.SQL("n.nspname NOT LIKE 'pg\\_%'"),
    ]
    if schemas:
        conds.append(sql.SQL("n.nspname LIKE ANY ({})").format(list(schemas)))
    if tables:
        conds.append(sql.SQL("c.relname = ANY ({})").format(list(tables)))
    if exclude_schemas:
        conds.append(sql.SQL("NOT n.nspname LIKE ANY ({})").format(list(exclude_schemas)))
    rows = yield Query(_TABLES.format(where=sql.SQL(" AND ").join(conds)))
    seen: set[tuple[str, str]] = set()
    infos: list[TableInfo] = []
    denied: list[Unreadable] = []
    for row in rows:
        if (row[0], row[1]) in seen:
            continue
        seen.add((row[0], row[1]))
        info = _to_info(row)
        if row[11] and row[12]:
            infos.append(info)
            continue
        needs = [f"SELECT on column {info.qualified_table}.{_quote(info.column)}"] \
            if not row[11] else []
        if not row[12]:
            needs.append(f"SELECT on sequence {info.sequence}")
        denied.append(Unreadable(info, " and ".join(needs)))
    return infos, denied


def list_tables(
    schemas: Sequence[str] | None = None,
    tables: Sequence[str] | None = None,
    exclude_schemas: Sequence[str] | None = None,
) -> Operation[list[TableInfo]]:
    """List every table with a sequence-backed key, roots only (not partitions).

    `schemas` and `tables` narrow the list; schema entries may be SQL LIKE
    patterns (``tenant\\_%``), and so may `exclude_schemas`, schemas left
    out. System schemas are always left out. Raises
    `errors.PermissionDenied` naming what the role cannot read.
    """
    infos, denied = yield from list_readable(schemas, tables, exclude_schemas)
    if denied:
        raise permission_denied(denied)
    return infos


def permission_denied(denied: Sequence[Unreadable]) -> errors.PermissionDenied:
    """The error naming every privilege `denied` lacks."""
    return errors.PermissionDenied(
        "selfheal needs " + "; ".join(f"{d.needs} (table {d.info.qualified_table})"
                                      for d in denied),
        sqlstate="42501",
    )


def named_query(relnames: Sequence[str]) -> Query:
    """A query for every table (partitions too) called one of `relnames`, in any schema.

    Read its rows with `relations`.
    """
    return Query(_TABLES.format(where=sql.SQL("c.relname = ANY ({})").format(list(relnames))))


def relations(rows: list[TupleRow]) -> list[tuple[str, str, TableInfo | None, bool]]:
    """The rows of a `named_query` as ``(schema, table, info, readable)``.

    `info` is None for a table without a sequence-backed key; `readable`
    tells whether this role can read its key column and sequence.
    """
    return [(row[0], row[1], _to_info(row) if row[5] is not None else None,
             bool(row[11] and row[12])) for row in rows]
