"""A SqlActivity ``script`` split into statements, with its ``?`` placeholders found.

The official runner hands the script to JDBC, where ``?`` outside literals and comments
is a parameter bound from ``scriptArgument`` in order.  dptr binds the same way, through
the driver's own parameter passing (``%s`` for psycopg and PyMySQL), so an argument is
never spliced into the SQL text: a ``'; DROP TABLE x; --`` argument is a string value.

The scanner knows what the two dialects put around text that may hold a ``;`` or a
``?``: single-quoted literals (``''`` inside; MySQL also ``\\'``), double-quoted
identifiers, MySQL backtick identifiers, PostgreSQL dollar quoting (``$tag$...$tag$``),
``--`` and ``#`` (MySQL) line comments and ``/* */`` block comments.  A ``?`` inside any
of them is text.  A ``%`` in a statement that has parameters is doubled, for the drivers'
``%s`` syntax.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Statement", "manages_own_transaction", "split_script"]

_DOLLAR_TAG = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")
_LEADING_COMMENTS = re.compile(r"^(?:\s+|--[^\n]*(?:\n|$)|#[^\n]*(?:\n|$)|/\*.*?\*/)*", re.DOTALL)
_TRANSACTION_CONTROL = re.compile(
    r"^\s*(BEGIN|START\s+TRANSACTION|COMMIT|ROLLBACK|END|SAVEPOINT|RELEASE|SET\s+AUTOCOMMIT)\b", re.IGNORECASE
)


@dataclass(frozen=True)
class Statement:
    """One statement: its text for the driver (``?`` -> ``%s``), how many parameters it
    takes, and where it starts in the script (1-based line and column) for messages."""

    text: str
    parameters: int
    line: int
    column: int
    #: The statement as written, for messages.
    source: str


def _line_col(script: str, offset: int) -> tuple[int, int]:
    line = script.count("\n", 0, offset) + 1
    start = script.rfind("\n", 0, offset) + 1
    return line, offset - start + 1


def split_script(script: str, *, dialect: str) -> list[Statement]:
    """The script's statements in order, empty ones (``;;``, comments only) dropped."""
    mysql = dialect == "mysql"
    statements: list[Statement] = []
    out: list[str] = []
    params = 0
    start: int | None = None
    substantive = False
    i, n = 0, len(script)

    def flush(end: int) -> None:
        nonlocal out, params, start, substantive
        text = "".join(out).strip()
        if substantive and text and start is not None:
            line, column = _line_col(script, start)
            source = script[start:end].strip()
            statements.append(
                Statement(text=text, parameters=params, line=line, column=column, source=source)
            )
        out, params, start, substantive = [], 0, None, False

    # Pieces are kept raw; '%' is doubled only once the statement is known to have parameters.
    pieces: list[tuple[str, bool]] = []  # (text, is_code)

    def emit(text: str, code: bool) -> None:
        pieces.append((text, code))

    def finish(end: int) -> None:
        nonlocal pieces
        has_params = params > 0
        for piece, code in pieces:
            text = piece
            if has_params:
                text = text.replace("%", "%%")
                if code:
                    text = text.replace("\0?", "%s")
            elif code:
                text = text.replace("\0?", "?")
            out.append(text)
        pieces = []
        flush(end)

    while i < n:
        ch = script[i]
        nxt = script[i + 1] if i + 1 < n else ""
        if start is None and not ch.isspace():
            start = i
        if (ch == "-" and nxt == "-") or (mysql and ch == "#"):
            end = script.find("\n", i)
            end = n if end < 0 else end
            emit(script[i:end], False)
            i = end
            continue
        if ch == "/" and nxt == "*":
            end = script.find("*/", i + 2)
            end = n if end < 0 else end + 2
            emit(script[i:end], False)
            i = end
            continue
        if ch in "'\"`":
            j = i + 1
            while j < n:
                if mysql and script[j] == "\\" and ch != "`":
                    j += 2
                    continue
                if script[j] == ch:
                    if j + 1 < n and script[j + 1] == ch:
                        j += 2
                        continue
                    break
                j += 1
            end = min(j + 1, n)
            emit(script[i:end], False)
            substantive = True
            i = end
            continue
        if ch == "$" and not mysql:
            tag = _DOLLAR_TAG.match(script, i)
            if tag and not (i > 0 and (script[i - 1].isalnum() or script[i - 1] == "_")):
                close = script.find(tag.group(0), tag.end())
                end = n if close < 0 else close + len(tag.group(0))
                emit(script[i:end], False)
                substantive = True
                i = end
                continue
        if ch == "?":
            params += 1
            emit("\0?", True)
            substantive = True
            i += 1
            continue
        if ch == ";":
            finish(i)
            i += 1
            continue
        if not ch.isspace():
            substantive = True
        emit(ch, True)
        i += 1
    finish(n)
    return statements


def manages_own_transaction(statements: list[Statement]) -> bool:
    """Whether the script begins, commits or rolls back itself: then dptr runs each statement
    as written (autocommit) instead of wrapping the script in one transaction."""
    return any(_TRANSACTION_CONTROL.match(_LEADING_COMMENTS.sub("", s.text)) for s in statements)
