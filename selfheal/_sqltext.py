"""
What a statement's text says about it, read in one linear pass.

A healing connection needs three facts about the caller's statement before it
runs: its first keyword (can it draw from a sequence?), whether the string
holds more than one statement (it cannot share a pipeline with a savepoint,
and may commit part of its work), and, for an INSERT, which columns it names
(does it supply the primary key itself?). The scanner below reads each
character at most once and never backtracks: comments, quoted identifiers,
string constants (standard, ``E''`` escapes) and dollar quotes are skipped as
whole tokens. Where the text is not understood, the answers are the cautious
ones: "may draw", "one statement unknown", "no column list known".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["Shape", "copy_target", "redacted", "redacted_of", "shape", "shape_of"]

T = TypeVar("T")

#: Statements that can draw from a sequence, directly or through triggers/rules.
DRAWING = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE", "WITH", "CALL", "DO", "EXECUTE"})

#: Statements that may run transaction control in their own body (a procedure
#: or a DO block that COMMITs): a failure may come after work was committed.
MAY_COMMIT = frozenset({"CALL", "DO"})

#: Statements a string of several may hold and still run all or nothing: in
#: autocommit such a string is one implicit transaction.
ATOMIC = frozenset({"INSERT", "UPDATE", "DELETE", "SELECT", "VALUES", "TABLE", "WITH", "MERGE"})

#: The statements of a string of several that are told apart (more: unknown).
PARTS_LIMIT = 1000

# Tokens: ("word", text), ("ident", text) for a quoted identifier, or a
# one-character punctuation token such as "(", ")", ",", ".", ";".
Token = tuple[str, str]


@dataclass(frozen=True)
class Shape:
    """What the text of one query string says about it."""

    #: The first keyword, upper case ("" when there is none, e.g. a blank string).
    keyword: str
    #: More than one statement in the string.
    multi: bool
    #: For an INSERT: the target table as written (name parts, unquoted,
    #: unquoted parts folded to lower case), else None.
    insert_table: tuple[str, ...] | None = None
    #: For an INSERT with a column list: the columns it names (none for
    #: DEFAULT VALUES), else None.
    insert_columns: frozenset[str] | None = None
    #: For a string of several statements, each one's shape; empty when there
    #: are more than `PARTS_LIMIT` or the string is not understood.
    parts: tuple[Shape, ...] = ()

    @property
    def may_draw(self) -> bool:
        """Whether the statement can draw from a sequence (when unsure: True)."""
        return self.multi or not self.keyword or self.keyword in DRAWING

    @property
    def may_commit(self) -> bool:
        """Whether a failure may follow work the statement already committed."""
        if self.multi:
            return not self.atomic
        return self.keyword in MAY_COMMIT

    @property
    def atomic(self) -> bool:
        """A string of several statements that runs all or nothing in autocommit:
        each of them known, and each one of `ATOMIC`."""
        return bool(self.parts) and all(p.keyword in ATOMIC for p in self.parts)

    def supplies(self, table: str, column: str) -> bool:
        """Whether this INSERT names `column` of `table` in its column list."""
        if self.insert_table is None or self.insert_columns is None:
            return False
        return self.insert_table[-1] == table and column in self.insert_columns


def _tokens(text: str) -> Iterator[Token]:
    """The tokens of `text`, comments and string constants skipped."""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif text.startswith("--", i):
            j = text.find("\n", i)
            i = n if j < 0 else j + 1
        elif text.startswith("/*", i):
            i = _skip_block_comment(text, i)
        elif c == "'" or (c in "eE" and text.startswith("'", i + 1)):
            i = _skip_string(text, i + 1 if c == "'" else i + 2, escapes=c != "'")
            yield ("const", "")
        elif c == '"':
            j = i + 1
            parts = []
            while True:
                k = text.find('"', j)
                if k < 0:
                    return  # unterminated: stop, the server will say what is wrong
                parts.append(text[j:k])
                if text.startswith('"', k + 1):
                    parts.append('"')
                    j = k + 2
                    continue
                i = k + 1
                break
            yield ("ident", "".join(parts))
        elif c == "$" and (tag_end := _dollar_tag_end(text, i)) > 0:
            tag = text[i:tag_end]
            j = text.find(tag, tag_end)
            i = n if j < 0 else j + len(tag)
            yield ("const", "")
        elif c.isalpha() or c == "_":
            j = i + 1
            while j < n and (text[j].isalnum() or text[j] in "_$"):
                j += 1
            yield ("word", text[i:j])
            i = j
        else:
            yield (c, c)
            i += 1


def _skip_block_comment(text: str, i: int) -> int:
    # Block comments nest in PostgreSQL.
    depth, i, n = 0, i, len(text)
    while i < n:
        if text.startswith("/*", i):
            depth += 1
            i += 2
        elif text.startswith("*/", i):
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    return n


def _skip_string(text: str, i: int, *, escapes: bool) -> int:
    n = len(text)
    while i < n:
        c = text[i]
        if escapes and c == "\\":
            i += 2
        elif c == "'":
            if text.startswith("'", i + 1):
                i += 2
            else:
                return i + 1
        else:
            i += 1
    return n


def _dollar_tag_end(text: str, i: int) -> int:
    """The end of a ``$tag$`` opening at `i`, or 0 when none opens there."""
    j, n = i + 1, len(text)
    if j < n and text[j].isdigit():
        return 0  # $1 is a parameter
    while j < n and (text[j].isalnum() or text[j] == "_"):
        j += 1
    return j + 1 if j < n and text[j] == "$" else 0


def shape_of(text: str) -> Shape:
    """Classify a query string (linear in its length, no backtracking)."""
    toks = _tokens(text)
    first, end = _statement(toks)
    if end != ";":
        return first
    parts = [first] if first is not _EMPTY else []
    while end == ";":
        part, end = _statement(toks)
        if part is not _EMPTY:
            parts.append(part)
    if len(parts) <= 1:
        return parts[0] if parts else first
    known = tuple(parts) if len(parts) <= PARTS_LIMIT else ()
    lead = parts[0]
    return Shape(keyword=lead.keyword, multi=True, insert_table=lead.insert_table,
                 insert_columns=lead.insert_columns, parts=known)


#: No statement at all (a blank string, or nothing between two ``;``).
_EMPTY = Shape(keyword="", multi=False)


def _statement(toks: Iterator[Token]) -> tuple[Shape, str]:
    """The shape of the next statement in `toks`, and how it ended: ";" or "" (the end)."""
    for kind, value in toks:
        if kind == "word":
            keyword = value.upper()
            break
        if kind == ";":
            return _EMPTY, ";"
        if kind != "(":
            return Shape(keyword="", multi=False), _to_end(toks, kind)
    else:
        return _EMPTY, ""
    if keyword != "INSERT":
        return Shape(keyword=keyword, multi=False), _to_end(toks, "")
    table, columns, last = _insert_target(toks)
    return (Shape(keyword=keyword, multi=False, insert_table=table, insert_columns=columns),
            _to_end(toks, last))


def _to_end(toks: Iterator[Token], last: str) -> str:
    """Skip to the end of the statement: ";" when one follows, "" at the end of the text."""
    if last == ";":
        return ";"
    for kind, _ in toks:
        if kind == ";":
            return ";"
    return ""


def _name(kind: str, value: str) -> str | None:
    if kind == "word":
        return value.lower()
    if kind == "ident":
        return value
    return None


def _qualified_name(toks: Iterator[Token]) -> tuple[list[str], str, str]:
    """Read ``[schema.]name`` from `toks`: its parts, and the token after it."""
    parts: list[str] = []
    kind, value = next(toks, ("", ""))
    while (part := _name(kind, value)) is not None:
        parts.append(part)
        kind, value = next(toks, ("", ""))
        if kind != ".":
            break
        kind, value = next(toks, ("", ""))
    return parts, kind, value


def _column_list(toks: Iterator[Token]) -> tuple[frozenset[str] | None, str]:
    """Read ``cols)`` after an opening "(": the columns (None: not a plain list of
    names), and the last token kind read."""
    columns: set[str] = set()
    for kind, value in toks:
        if kind == ")":
            return frozenset(columns), kind
        name = _name(kind, value)
        if name is not None:
            columns.add(name)
        elif kind != ",":
            # A sub-select or anything else: not a plain column list.
            return None, kind
    return None, ""


def _insert_target(
    toks: Iterator[Token],
) -> tuple[tuple[str, ...] | None, frozenset[str] | None, str]:
    """Read ``INTO name [AS alias] [(cols)]`` after INSERT; the last token kind read."""
    kind, value = next(toks, ("", ""))
    if kind != "word" or value.upper() != "INTO":
        return None, None, kind
    parts, kind, value = _qualified_name(toks)
    if not parts:
        return None, None, kind
    table = tuple(parts)
    if kind == "word" and value.upper() == "AS":
        next(toks, None)
        kind, value = next(toks, ("", ""))
    elif kind == "word" and value.upper() == "DEFAULT":
        kind, value = next(toks, ("", ""))
        if kind == "word" and value.upper() == "VALUES":
            return table, frozenset(), kind  # names no column
        return table, None, kind
    elif kind == "word" and value.upper() not in ("VALUES", "SELECT", "DEFAULT", "OVERRIDING",
                                                  "WITH", "TABLE"):
        kind, value = next(toks, ("", ""))  # an alias without AS
    if kind != "(":
        return table, None, kind
    columns, kind = _column_list(toks)
    return table, columns, kind


def copy_target(text: str) -> tuple[tuple[str, ...], frozenset[str] | None] | None:
    """For ``COPY name [(columns)] FROM ...``: the table and the columns (None: all).

    None for anything else (``COPY ... TO``, ``COPY (query) TO``, not understood).
    """
    toks = _tokens(text)
    kind, value = next(toks, ("", ""))
    if kind != "word" or value.upper() != "COPY":
        return None
    parts, kind, value = _qualified_name(toks)
    if not parts:
        return None
    columns: frozenset[str] | None = None
    if kind == "(":
        columns, kind = _column_list(toks)
        if columns is None:
            return None
        kind, value = next(toks, ("", ""))
    if kind != "word" or value.upper() != "FROM":
        return None
    return tuple(parts), columns


#: Shapes of query strings seen in this process, bounded (cleared when full).
_shapes: dict[str | bytes, Shape] = {}
_SHAPES_LIMIT = 1024


def shape(query: Any, conn: Any) -> Shape:
    """What the text of a driver's `query` says about it; each distinct string read once.

    `query` is a string, bytes, or a composed query object with
    ``as_string(conn)`` (psycopg's and psycopg2's `sql` modules both have it).
    """
    return _read_once(_shapes, shape_of, query, conn)


def _read_once(store: dict[str | bytes, T], read: Callable[[str], T], query: Any,
               conn: Any) -> T:
    """`read` of `query`'s text, kept in `store` (bounded) for a string or bytes."""
    key = query if isinstance(query, (str, bytes)) else None
    if key is not None and (found := store.get(key)) is not None:
        return found
    found = read(_text(query, conn))
    if key is not None:
        if len(store) >= _SHAPES_LIMIT:
            store.clear()
        store[key] = found
    return found


def redacted(text: str, limit: int = 500) -> str:
    """`text` without its values, for audit events: what the caller's code wrote.

    String constants, dollar-quoted strings and numbers become ``?``,
    comments and runs of white space one space; parameter placeholders
    (``%s``, ``%(name)s``, ``$1``) and names stay. At most `limit` characters.
    """
    out: list[str] = []
    i, n, size = 0, len(text), 0
    while i < n and size < limit:
        c = text[i]
        if c.isspace() or text.startswith(("--", "/*"), i):
            if c.isspace():
                i += 1
            elif c == "-":
                j = text.find("\n", i)
                i = n if j < 0 else j + 1
            else:
                i = _skip_block_comment(text, i)
            if out and out[-1] != " ":
                out.append(" ")
                size += 1
            continue
        if c == "'" or (c in "eEnNbBxXuU" and text.startswith("'", i + 1)
                        and not (out and _ident_char(out[-1][-1]))):
            i = _skip_string(text, i + 1 if c == "'" else i + 2, escapes=c in "eE")
            piece = "?"
        elif c == "$" and (tag_end := _dollar_tag_end(text, i)) > 0:
            tag = text[i:tag_end]
            j = text.find(tag, tag_end)
            i = n if j < 0 else j + len(tag)
            piece = "?"
        elif c == "$" or c == "%":
            # A placeholder: $1, %s, %(name)s; kept as written.
            j = i + 1
            if c == "%" and text.startswith("(", j):
                k = text.find(")", j)
                j = n if k < 0 else k + 1
            while j < n and (text[j].isalnum() or text[j] == "_"):
                j += 1
            piece, i = text[i:j], j
        elif c.isdigit() or (c == "." and i + 1 < n and text[i + 1].isdigit()):
            j = i + 1
            while j < n and (text[j].isalnum() or text[j] in "._"):
                j += 1
            piece, i = "?", j
        elif c == '"' or c.isalpha() or c == "_":
            j = i + 1
            if c == '"':
                k = i + 1
                while True:
                    k = text.find('"', k)
                    if k < 0 or not text.startswith('"', k + 1):
                        break
                    k += 2
                j = n if k < 0 else k + 1
            else:
                while j < n and (_ident_char(text[j]) or text[j] == "$"):
                    j += 1
            piece, i = text[i:j], j
        else:
            piece, i = c, i + 1
        out.append(piece)
        size += len(piece)
    result = "".join(out).strip()
    return result[:limit] if i >= n and size <= limit else result[:limit - 3] + "..."


def _ident_char(c: str) -> bool:
    return c.isalnum() or c == "_"


#: Texts without values of query strings seen in this process, bounded.
_redacted: dict[str | bytes, str] = {}


def redacted_of(query: Any, conn: Any) -> str:
    """`redacted` text of a driver's `query`; each distinct string read once."""
    return _read_once(_redacted, redacted, query, conn)


def _text(query: Any, conn: Any) -> str:
    if isinstance(query, str):
        return query
    if isinstance(query, bytes):
        return query.decode("utf-8", "replace")
    as_string = getattr(query, "as_string", None)
    if callable(as_string):
        try:
            text = as_string(conn)
        except Exception:  # the driver itself will say what is wrong with it
            return ""
        return text if isinstance(text, str) else ""
    return ""
