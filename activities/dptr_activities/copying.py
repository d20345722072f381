"""CopyActivity: S3 to S3, S3 to a table, a table to S3; streamed, in bounded memory.

* **S3DataNode to S3DataNode.**  With the same data format on both nodes (or none on
  either) the bytes are copied as they are: a file to a file, a file into a directory
  (same name), a directory to a directory (every object under the prefix, same relative
  keys), or a directory into one file (the objects one after another, in key order).  A
  node's ``compression: gzip`` is undone on reading and done on writing, so gzip to plain
  and back is a copy too.  Two different formats copy record by record.
* **S3DataNode to SqlDataNode.**  Records (:mod:`dptr_activities.records`) are inserted
  :data:`~dptr_activities.connect.BATCH_ROWS` at a time with the node's ``insertQuery``
  (its ``?`` bound to the record's fields in order) or ``INSERT INTO <table>`` (the input
  format's ``column`` names, if it has any), all in one transaction: a bad record or a
  refused insert rolls back every row, so a table is never half copied.
* **SqlDataNode to S3DataNode.**  The node's ``selectQuery`` (or ``SELECT * FROM
  <table>``) is read through a server-side cursor, every value as the database's own
  text form, and written as records in the output's format to one object: the
  ``filePath``, or ``part-00000`` under the ``directoryPath``.  A failed read aborts the
  multipart upload, so no partial object is left.

Memory is bounded by the batch, one S3 part (8 MiB) and one record; bench/copy_memory.py
measures it.  SIGTERM (a cancel) is checked between chunks and batches, and cancels the
running statement on the server (``dptr_activities.cli``).
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import PurePosixPath

from dptr_common.activity_plan import ActivityPlan, NodePlan
from dptr_common.errors import TaskError, error_id
from dptr_sidecar.s3 import S3Client, S3Error, S3Uri, parse_s3_uri, sse_args

from .connect import BATCH_ROWS, DatabaseError, Session, connect
from .records import (
    RecordFormat,
    compressed,
    decoded,
    decompressed,
    encoded,
    parse_records,
    write_records,
)
from .sql import Stopped
from .sqlscript import split_script

__all__ = ["run_copy", "table_name"]

log = logging.getLogger("dptr.activity")

#: The object a table is written to under an output ``directoryPath``.
DIRECTORY_OBJECT = "part-00000"
# A table name as a pipeline author writes it: up to three dotted parts, each a plain
# identifier or one quoted with "" or ``.  It is put into SQL text, so nothing else passes.
# ('%' and '\\' are refused in quoted names too: the drivers' %s syntax, MySQL's escapes.)
_PART = r'(?:[A-Za-z_][A-Za-z0-9_$]*|"[^"\x00%\\]+"|`[^`\x00%\\]+`)'
_TABLE = re.compile(rf"^{_PART}(?:\.{_PART}){{0,2}}$")


def table_name(value: str, node: str) -> str:
    name = value.strip()
    if not _TABLE.match(name):
        raise TaskError(
            "dptr.Copy.BadTableName",
            f"SqlDataNode {node!r}: table {value[:80]!r} is not a table name (letters, digits, _ and $, "
            'dotted, or quoted with "" or ``)',
        )
    return name


def run_copy(
    plan: ActivityPlan,
    session_hook: list[Session],
    env: Mapping[str, str] | None = None,
    stopping: threading.Event | None = None,
) -> None:
    """Run the plan's copy; raises TaskError, DatabaseError, or Stopped once ``stopping`` is set."""
    env = os.environ if env is None else env
    stopping = stopping or threading.Event()
    source, target = plan.input, plan.output
    if source is None or target is None:
        raise TaskError("dptr.InvalidTask.Copy.InputOutput", "a CopyActivity needs one input and one output")
    with S3Client(env=env) as s3:
        if source.type == "S3DataNode" and target.type == "S3DataNode":
            _s3_to_s3(s3, source, target, stopping)
        elif source.type == "S3DataNode":
            _s3_to_sql(s3, source, target, session_hook=session_hook, env=env, stopping=stopping)
        elif target.type == "S3DataNode":
            _sql_to_s3(s3, source, target, session_hook=session_hook, env=env, stopping=stopping)
        else:
            raise TaskError(
                "dptr.Copy.UnsupportedPair.SqlDataNode-SqlDataNode",
                "dptr copies S3 to S3, S3 to SQL and SQL to S3",
            )


# ---------------------------------------------------------------------------- S3


def _s3_error(exc: S3Error, what: str) -> TaskError:
    return TaskError(error_id("Copy", "S3", exc.code), f"{what}: {exc.message}")


def _prefix(key: str) -> str:
    return key if not key or key.endswith("/") else key + "/"


def _sources(s3: S3Client, node: NodePlan) -> Iterator[S3Uri]:
    """The S3 objects of an input node, in key order, listed a page at a time (a prefix
    may hold millions); a directory with none is empty."""
    assert node.uri is not None
    uri = parse_s3_uri(node.uri)
    if node.kind == "file":
        yield uri
        return
    try:
        for item, _size in s3.list(S3Uri(uri.bucket, _prefix(uri.key))):
            if not item.key.endswith("/"):
                yield item
    except S3Error as exc:
        raise _s3_error(exc, f"input {node.id} {node.uri}") from exc


def _read(s3: S3Client, uri: S3Uri, node: NodePlan, stopping: threading.Event) -> Iterator[bytes]:
    """One object's bytes, gzip undone if the node says so; Stopped on SIGTERM.  An S3
    error is the input's (it surfaces inside the output's upload, which reads this)."""

    def raw() -> Iterator[bytes]:
        if stopping.is_set():
            raise Stopped  # also between empty objects, which yield no chunk
        try:
            for chunk in s3.iter_object(uri):
                if stopping.is_set():
                    raise Stopped
                yield chunk
        except S3Error as exc:
            raise _s3_error(exc, f"input {node.id} {uri}") from exc

    return decompressed(raw(), str(uri)) if node.compression == "gzip" else raw()


def _write(s3: S3Client, target: NodePlan, uri: S3Uri, chunks: Iterable[bytes]) -> int:
    body = compressed(chunks) if target.compression == "gzip" else chunks
    try:
        return s3.upload_stream(body, uri, extra=sse_args(target.encryption, target.kms_key_id))
    except S3Error as exc:
        raise _s3_error(exc, f"output {target.id} {uri}") from exc


def _target_uri(target: NodePlan, name: str) -> S3Uri:
    assert target.uri is not None
    uri = parse_s3_uri(target.uri)
    if target.kind == "file":
        return uri
    return S3Uri(uri.bucket, _prefix(uri.key) + name)


def _s3_to_s3(s3: S3Client, source: NodePlan, target: NodePlan, stopping: threading.Event) -> None:
    by_bytes = source.data_format is None and target.data_format is None
    by_bytes = by_bytes or (
        source.data_format is not None and source.data_format.same_bytes_as(target.data_format)
    )
    # A byte copy never parses a record: its format is not checked for record rules.
    fmt_in, fmt_out = (
        (None, None)
        if by_bytes
        else (RecordFormat.of(source.data_format), RecordFormat.of(target.data_format))
    )
    count = 0

    def body(objects: Iterable[S3Uri]) -> Iterator[bytes]:
        nonlocal count
        for uri in objects:
            count += 1
            chunks = _read(s3, uri, source, stopping)
            if fmt_in is None or fmt_out is None:
                yield from chunks
            else:
                rows = parse_records(decoded(chunks, str(uri)), fmt_in)
                yield from encoded(write_records(rows, fmt_out))

    if source.kind == "file" or target.kind == "file":
        # One object written: a file's copy (into a directory: the same name), or a
        # directory's objects one after another in key order.
        name = PurePosixPath(parse_s3_uri(str(source.uri)).key).name or DIRECTORY_OBJECT
        uri = _target_uri(target, name if source.kind == "file" else DIRECTORY_OBJECT)
        size = _write(s3, target, uri, body(_sources(s3, source)))
        log.info("dptr: copied %d object(s) from %s to %s (%d bytes written)", count, source.uri, uri, size)
        return
    prefix = _prefix(parse_s3_uri(str(source.uri)).key)
    for item in _sources(s3, source):
        uri = _target_uri(target, item.key[len(prefix) :])
        size = _write(s3, target, uri, body([item]))
        log.info("dptr: copied %s to %s (%d bytes written)", item, uri, size)
    log.info("dptr: copied %d object(s) from %s to %s", count, source.uri, target.uri)


# ---------------------------------------------------------------------------- SQL


def _insert_statement(target: NodePlan, source: NodePlan, width: int, dialect: str) -> tuple[str, int]:
    """The INSERT for each record and how many fields it takes."""
    if target.insert_query:
        statements = split_script(target.insert_query, dialect=dialect)
        if len(statements) != 1:
            raise TaskError(
                "dptr.Copy.BadInsertQuery",
                f"SqlDataNode {target.id!r}: insertQuery must be one statement (it has {len(statements)})",
            )
        (statement,) = statements
        if statement.parameters == 0:
            raise TaskError(
                "dptr.Copy.BadInsertQuery",
                f"SqlDataNode {target.id!r}: insertQuery has no ? placeholder for the record's fields",
            )
        return statement.text, statement.parameters
    table = table_name(str(target.table), target.id)
    columns = source.data_format.columns if source.data_format else ()
    for column in columns:
        table_name(column, target.id)  # the same rule: it is put into SQL text too
    width = len(columns) or width
    names = f" ({', '.join(columns)})" if columns else ""
    return f"INSERT INTO {table}{names} VALUES ({', '.join(['%s'] * width)})", width


def _s3_to_sql(
    s3: S3Client,
    source: NodePlan,
    target: NodePlan,
    *,
    session_hook: list[Session],
    env: Mapping[str, str],
    stopping: threading.Event,
) -> None:
    assert target.database is not None
    fmt = RecordFormat.of(source.data_format)

    def records() -> Iterator[list[str | None]]:
        for uri in _sources(s3, source):
            yield from parse_records(decoded(_read(s3, uri, source, stopping), str(uri)), fmt)

    session = connect(target.database, env=env, autocommit=False)
    session_hook.append(session)
    try:
        # The target's table and insertQuery are checked before any record is read.
        _insert_statement(target, source, 0, session.dialect)
        if target.create_table_sql:
            _create_table(session, target)
        stream = records()
        first = next(stream, None)
        if first is None:
            log.info("dptr: %s holds no records; nothing inserted", source.uri)
            return
        sql, width = _insert_statement(target, source, len(first), session.dialect)
        done = 0
        batch: list[list[str | None]] = []
        for number, record in enumerate(itertools.chain([first], stream), start=1):
            if len(record) != width:
                raise TaskError(
                    "dptr.Copy.BadRecord",
                    f"record {number} of {source.uri} has {len(record)} field(s); the insert takes {width}",
                )
            batch.append(record)
            if len(batch) >= BATCH_ROWS:
                done = _insert(session, sql, batch, done, stopping)
                batch = []
        if batch:
            done = _insert(session, sql, batch, done, stopping)
        if stopping.is_set():
            raise Stopped
        session.commit()
        log.info("dptr: inserted %d record(s) from %s into %s", done, source.uri, target.id)
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _create_table(session: Session, target: NodePlan) -> None:
    """The node's ``createTableSql``, run when its ``table`` does not exist yet (in the copy's
    transaction on PostgreSQL; MySQL commits DDL at once)."""
    if not target.table:
        raise TaskError(
            "dptr.Copy.BadDataNode", f"SqlDataNode {target.id!r} has createTableSql but no table to check"
        )
    probe = f"SELECT 1 FROM {table_name(target.table, target.id)} WHERE 1 = 0"
    try:
        session.execute(probe)
        return
    except DatabaseError:
        session.rollback()  # no such table (or none we may read): create it
    statements = split_script(str(target.create_table_sql), dialect=session.dialect)
    if len(statements) != 1 or statements[0].parameters:
        raise TaskError(
            "dptr.Copy.BadCreateTableSql",
            f"SqlDataNode {target.id!r}: createTableSql must be one statement without ? placeholders",
        )
    try:
        session.execute(statements[0].text)
    except DatabaseError as exc:
        raise DatabaseError(exc.error_id, f"createTableSql of {target.id}: {exc.message}") from exc
    log.info("dptr: created table %s (createTableSql of %s)", target.table, target.id)


def _insert(
    session: Session, sql: str, batch: list[list[str | None]], done: int, stopping: threading.Event
) -> int:
    if stopping.is_set():
        raise Stopped
    try:
        session.insert_many(sql, batch)
    except DatabaseError as exc:
        if stopping.is_set():
            raise Stopped from exc  # cancelled by SIGTERM: not the records' fault
        raise DatabaseError(
            exc.error_id, f"records {done + 1} to {done + len(batch)}: {exc.message}"
        ) from exc
    return done + len(batch)


def _sql_to_s3(
    s3: S3Client,
    source: NodePlan,
    target: NodePlan,
    *,
    session_hook: list[Session],
    env: Mapping[str, str],
    stopping: threading.Event,
) -> None:
    assert source.database is not None
    fmt = RecordFormat.of(target.data_format)
    query = source.select_query or f"SELECT * FROM {table_name(str(source.table), source.id)}"
    session = connect(source.database, env=env, autocommit=False)
    session_hook.append(session)
    count = 0
    try:
        _names, rows = session.stream(query, as_text=True)

        def counted() -> Iterator[Sequence[object]]:
            nonlocal count
            for row in rows:
                count += 1
                if count % BATCH_ROWS == 0 and stopping.is_set():
                    raise Stopped
                yield row

        uri = _target_uri(target, DIRECTORY_OBJECT)
        size = _write(s3, target, uri, encoded(write_records(counted(), fmt)))
        log.info("dptr: wrote %d record(s) of %s to %s (%d bytes)", count, source.id, uri, size)
    except DatabaseError as exc:
        if stopping.is_set():
            raise Stopped from exc  # the query was cancelled by SIGTERM
        raise
    finally:
        # Closed, not rolled back: a read-only transaction ends with its connection, and
        # PyMySQL's rollback would first read every row the query has not yet returned.
        session.close()
