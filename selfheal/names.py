"""
Table names as operators write them on the command line.

``--table`` takes what selfheal prints and what psql takes: ``orders``,
``public.orders``, ``'"Invoice Lines"'``, ``'shop."Order Items"'``. A quoted
part means exactly that name; an unquoted one means the name as written or
folded to lower case, as PostgreSQL folds it. A name that matches nothing
gets suggestions from the names that exist.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["TableName", "parse_table_name", "suggest", "written"]

_PLAIN = re.compile(r"[a-z_][a-z0-9_$]*")


@dataclass(frozen=True)
class TableName:
    """One ``--table`` argument."""

    #: As given.
    text: str
    #: The schema it names, if any (exact, or its possible spellings).
    schemas: tuple[str, ...] | None
    #: The relation names it may mean.
    names: tuple[str, ...]

    def matches(self, schema: str, table: str) -> bool:
        return table in self.names and (self.schemas is None or schema in self.schemas)


def _spellings(part: str, quoted: bool) -> tuple[str, ...]:
    if quoted:
        return (part,)
    folded = part.lower()
    return (part,) if folded == part else (part, folded)


def parse_table_name(text: str) -> TableName:
    """Parse ``[schema.]table``, either part double-quoted; raises ValueError."""
    parts: list[tuple[str, bool]] = []
    i, n = 0, len(text)
    while True:
        if i < n and text[i] == '"':
            j, buf = i + 1, []
            while True:
                k = text.find('"', j)
                if k < 0:
                    raise ValueError(f"bad table name {text!r}: unterminated quote")
                buf.append(text[j:k])
                if text[k + 1:k + 2] == '"':  # "" inside quotes is one "
                    buf.append('"')
                    j = k + 2
                    continue
                break
            parts.append(("".join(buf), True))
            i = k + 1
        else:
            j = text.find(".", i)
            end = n if j < 0 else j
            part = text[i:end].strip()
            if not part or '"' in part:
                raise ValueError(f"bad table name {text!r}")
            parts.append((part, False))
            i = end
        if i >= n:
            break
        if text[i] != ".":
            raise ValueError(f"bad table name {text!r}: expected . after a quoted name")
        i += 1
    if len(parts) > 2 or not parts[-1][0]:
        raise ValueError(f"bad table name {text!r}: expected [schema.]table")
    table = _spellings(*parts[-1])
    schemas = _spellings(*parts[0]) if len(parts) == 2 else None
    return TableName(text, schemas, table)


def written(part: str) -> str:
    """`part` as a name on the command line: double-quoted unless PostgreSQL would fold
    it to itself."""
    if _PLAIN.fullmatch(part):
        return part
    return '"' + part.replace('"', '""') + '"'


def suggest(wanted: TableName, existing: Iterable[tuple[str, str]]) -> list[str]:
    """Up to three names close to `wanted` among `existing` ``(schema, table)`` pairs,
    written as ``--table`` takes them."""
    shown: dict[str, str] = {}  # compared in lower case -> as written
    for schema, table in existing:
        shown.setdefault(table.lower(), written(table))
        shown.setdefault(f"{schema}.{table}".lower(), f"{written(schema)}.{written(table)}")
    key = wanted.text.replace('"', "").lower()
    close = difflib.get_close_matches(key, list(shown), n=3, cutoff=0.6)
    return list(dict.fromkeys(shown[c] for c in close))
