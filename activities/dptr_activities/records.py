"""Records in an S3 object: the ``CSV``, ``TSV`` and ``Custom`` data formats, streamed.

The rules are the developer guide's for CopyActivity's CSV (dp-object-copyactivity.html,
"Limitations of using CSV"): the column separator is a comma, the record separator a
newline, **fields are not quoted**, and the escape character (``escapeChar``, a backslash
by default) makes the next character literal.  TSV and Custom work the same way with their
own ``columnSeparator`` and ``recordSeparator``, which must be single characters (the
guide's "only single characters are supported"); dptr uses the backslash as their escape
character too unless the format's ``escapeChar`` says otherwise.

dptr's own choices, documented in docs/task-runner-parity.md:

* a SQL ``NULL`` is written as the escape character and ``N`` (``\\N``, MySQL's and Hive's
  convention); a field that is exactly that reads back as NULL, an empty field as ``''``;
* on writing, the escape character and the first character of each separator are escaped
  wherever they occur in a value, so any text (commas, newlines, backslashes, quotes)
  survives a round trip;
* a record separator at the very end of the object ends the last record (it is not an
  empty record after it), but an empty line inside is a record of one empty field; a
  record longer than :data:`MAX_RECORD_CHARS` is refused, so memory stays bounded
  whatever the input;
* ``N`` cannot be a separator or the escape character (NULL would be ambiguous), and a
  binary value that is not UTF-8 text fails the copy (``dptr.Copy.BinaryValue``) rather
  than being written as something that would not come back as the same bytes.
"""

from __future__ import annotations

import codecs
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from dptr_common.activity_plan import DataFormatPlan
from dptr_common.errors import TaskError

__all__ = [
    "MAX_RECORD_CHARS",
    "RecordFormat",
    "compressed",
    "decoded",
    "decompressed",
    "encoded",
    "parse_records",
    "write_records",
]

#: The longest record dptr reads (characters); longer ones fail the copy.
MAX_RECORD_CHARS = 16 * 1024 * 1024
#: Text is handed to the encoder in blocks of about this many characters.
_BLOCK_CHARS = 256 * 1024


@dataclass(frozen=True)
class RecordFormat:
    column: str
    record: str
    escape: str

    @classmethod
    def of(cls, plan: DataFormatPlan | None) -> RecordFormat:
        """A node's format; a node without one reads and writes CSV."""
        if plan is None:
            return cls(",", "\n", "\\")
        escape = plan.escape_char or "\\"
        for name, value in (
            ("columnSeparator", plan.column_separator),
            ("recordSeparator", plan.record_separator),
        ):
            if len(value) != 1:
                raise TaskError(
                    "dptr.Copy.BadDataFormat",
                    f"{plan.type} {plan.id!r}: {name} must be a single character, not {value[:20]!r}",
                )
        if len({plan.column_separator, plan.record_separator, escape}) != 3:
            raise TaskError(
                "dptr.Copy.BadDataFormat",
                f"{plan.type} {plan.id!r}: the column separator, record separator and escape "
                "character must differ",
            )
        if "N" in (plan.column_separator, plan.record_separator, escape):
            # NULL is written as the escape character and N: an N of its own could not be told apart.
            raise TaskError(
                "dptr.Copy.BadDataFormat", f"{plan.type} {plan.id!r}: N cannot be a separator or the escape"
            )
        return cls(plan.column_separator, plan.record_separator, escape)

    @property
    def null(self) -> str:
        return self.escape + "N"


# ------------------------------------------------------------------------- reading


def _split_records(chunks: Iterable[str], fmt: RecordFormat) -> Iterator[str]:
    """Records, split at every record separator that is not escaped.  One forward scan:
    an escaped separator only moves the scan on, so text with many escaped newlines costs
    no more than plain text."""
    rec, esc = fmt.record, fmt.escape
    buf = ""
    scan = 0  # where the next separator may be, in buf
    for chunk in chunks:
        if not chunk:
            continue
        buf += chunk
        start = 0
        while (j := buf.find(rec, scan)) >= 0:
            k = j
            while k > start and buf[k - 1] == esc:
                k -= 1
            if (j - k) % 2:
                scan = j + 1  # escaped: part of this record
                continue
            yield buf[start:j]
            start = scan = j + 1
        buf, scan = buf[start:], len(buf) - start
        if len(buf) > MAX_RECORD_CHARS:
            raise TaskError(
                "dptr.Copy.RecordTooLarge",
                f"a record is longer than {MAX_RECORD_CHARS} characters (is the record separator right?)",
            )
    if buf:
        yield buf


def _fields(record: str, fmt: RecordFormat, number: int) -> list[str | None]:
    sep, esc = fmt.column, fmt.escape
    if esc not in record:
        return list(record.split(sep))
    fields: list[str | None] = []
    current: list[str] = []
    start = i = 0
    n = len(record)
    while i <= n:
        if i == n or record[i] == sep:
            raw = record[start:i]
            fields.append(None if raw == fmt.null else "".join(current))
            current = []
            start = i + 1
            i += 1
            continue
        ch = record[i]
        if ch == esc:
            if i + 1 >= n:
                raise TaskError(
                    "dptr.Copy.BadRecord", f"record {number} ends with a lone escape character {esc!r}"
                )
            current.append(record[i + 1])
            i += 2
            continue
        current.append(ch)
        i += 1
    return fields


def parse_records(chunks: Iterable[str], fmt: RecordFormat) -> Iterator[list[str | None]]:
    """The records of a text stream, each a list of fields (None for NULL)."""
    for number, record in enumerate(_split_records(chunks, fmt), start=1):
        yield _fields(record, fmt, number)


# ------------------------------------------------------------------------- writing


def _text(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes | bytearray | memoryview):
        # A binary column (MySQL's BLOB, BINARY) as text only when it is text: anything
        # else would not come back as the same bytes.
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise TaskError(
                "dptr.Copy.BinaryValue",
                "a value is binary, not UTF-8 text; select it as text (HEX(), TO_BASE64(), encode())",
            ) from None
    return str(value)


def write_records(rows: Iterable[Sequence[object]], fmt: RecordFormat) -> Iterator[str]:
    """Rows as text in ``fmt``, in blocks of about :data:`_BLOCK_CHARS` characters."""
    specials = re.compile("[" + re.escape(fmt.escape + fmt.column + fmt.record) + "]")
    escaped = fmt.escape.replace("\\", "\\\\") + r"\g<0>"
    block: list[str] = []
    size = 0
    for row in rows:
        fields = []
        for value in row:
            if value is None:
                fields.append(fmt.null)
                continue
            text = _text(value)
            fields.append(specials.sub(escaped, text) if specials.search(text) else text)
        line = fmt.column.join(fields) + fmt.record
        block.append(line)
        size += len(line)
        if size >= _BLOCK_CHARS:
            yield "".join(block)
            block, size = [], 0
    if block:
        yield "".join(block)


# ------------------------------------------------------------------------- bytes


def decoded(chunks: Iterable[bytes], what: str) -> Iterator[str]:
    """UTF-8 text of a byte stream (a character split between chunks is kept whole)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        for chunk in chunks:
            text = decoder.decode(chunk)
            offset += len(chunk)
            if text:
                yield text
        tail = decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise TaskError(
            "dptr.Copy.NotUtf8", f"{what} is not UTF-8 text (near byte {offset + exc.start}): {exc.reason}"
        ) from None
    if tail:
        yield tail


def encoded(texts: Iterable[str]) -> Iterator[bytes]:
    for text in texts:
        yield text.encode("utf-8")


def decompressed(chunks: Iterable[bytes], what: str) -> Iterator[bytes]:
    """A gzip stream's bytes, member after member (``cat a.gz b.gz`` is one stream); zeros
    after a member are padding (gzip(1) skips them), wherever the chunks split them."""
    inflater = zlib.decompressobj(wbits=31)
    started = False
    between = False  # after a member's end: zeros are skipped until the next member
    try:
        for chunk in chunks:
            pending = chunk.lstrip(b"\0") if between else chunk
            while pending:
                started, between = True, False
                out = inflater.decompress(pending, 1024 * 1024)
                if out:
                    yield out
                if inflater.eof:
                    pending = inflater.unused_data.lstrip(b"\0")
                    inflater = zlib.decompressobj(wbits=31)
                    started, between = False, True
                else:
                    pending = inflater.unconsumed_tail
        if started:
            rest = inflater.flush()
            if rest:
                yield rest
            if not inflater.eof:
                raise TaskError("dptr.Copy.BadGzip", f"{what} ends in the middle of a gzip stream")
    except zlib.error as exc:
        raise TaskError("dptr.Copy.BadGzip", f"{what} is not gzip data: {exc}") from None


def compressed(chunks: Iterable[bytes]) -> Iterator[bytes]:
    deflater = zlib.compressobj(6, zlib.DEFLATED, 31)
    for chunk in chunks:
        out = deflater.compress(chunk)
        if out:
            yield out
    yield deflater.flush()
