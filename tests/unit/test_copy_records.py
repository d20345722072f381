"""The record formats of CopyActivity (dptr_activities.records): the guide's unquoted,
backslash-escaped CSV, TSV and Custom separators, NULLs, gzip, and chunk boundaries."""

from __future__ import annotations

import gzip
import random
from typing import Any

import pytest

from dptr_activities.copying import table_name
from dptr_activities.records import (
    MAX_RECORD_CHARS,
    RecordFormat,
    compressed,
    decoded,
    decompressed,
    encoded,
    parse_records,
    write_records,
)
from dptr_common.activity_plan import DataFormatPlan
from dptr_common.errors import TaskError

CSV = RecordFormat.of(None)
HOSTILE_ROWS: list[list[str | None]] = [
    ["1", "plain", "text"],
    ["2", "a,b", 'say "hi"'],
    ["3", "line\nbreak", "back\\slash"],
    ["4", None, ""],
    ["5", "\\N", "N"],
    ["6", "Zoë 東京 €", "tab\there"],
    ["7", "ends with \\", ",\n\\"],
]


def _chunked(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_hostile_values_survive_a_round_trip_whatever_the_chunk_boundaries(size: int) -> None:
    text = "".join(write_records(HOSTILE_ROWS, CSV))
    assert list(parse_records(_chunked(text, size), CSV)) == HOSTILE_ROWS


def test_the_csv_written_is_unquoted_and_backslash_escaped() -> None:
    text = "".join(write_records([["a,b", None, 'q"', "x\ny"]], CSV))
    assert text == 'a\\,b,\\N,q",x\\\ny\n'


def test_tsv_and_custom_use_their_separators() -> None:
    tsv = RecordFormat.of(DataFormatPlan(id="T", type="TSV", column_separator="\t"))
    custom = RecordFormat.of(
        DataFormatPlan(id="C", type="Custom", column_separator="|", record_separator="\u0001")
    )
    assert "".join(write_records([["a\tb", "c|d"]], tsv)) == "a\\\tb\tc|d\n"
    assert "".join(write_records([["a\tb", "c|d"]], custom)) == "a\tb|c\\|d\u0001"
    for fmt in (tsv, custom):
        text = "".join(write_records(HOSTILE_ROWS, fmt))
        assert list(parse_records(_chunked(text, 5), fmt)) == HOSTILE_ROWS


def test_a_custom_escape_character_is_honoured() -> None:
    fmt = RecordFormat.of(DataFormatPlan(id="C", type="CSV", column_separator=",", escape_char="^"))
    text = "".join(write_records([["a,b", "c\\d", None]], fmt))
    assert text == "a^,b,c\\d,^N\n"
    assert list(parse_records([text], fmt)) == [["a,b", "c\\d", None]]


def test_separators_must_be_single_distinct_characters() -> None:
    with pytest.raises(TaskError, match="single character") as info:
        RecordFormat.of(DataFormatPlan(id="C", type="Custom", column_separator="||", record_separator="\n"))
    assert info.value.error_id == "dptr.Copy.BadDataFormat"
    with pytest.raises(TaskError, match="must differ"):
        RecordFormat.of(DataFormatPlan(id="C", type="Custom", column_separator="\\", record_separator="\n"))


def test_a_final_record_separator_ends_the_last_record_and_a_missing_one_is_fine() -> None:
    assert list(parse_records(["a,b\nc,d\n"], CSV)) == [["a", "b"], ["c", "d"]]
    assert list(parse_records(["a,b\nc,d"], CSV)) == [["a", "b"], ["c", "d"]]
    assert list(parse_records(["a\n\nb\n"], CSV)) == [["a"], [""], ["b"]]


def test_a_lone_escape_at_the_end_of_a_record_is_refused() -> None:
    with pytest.raises(TaskError, match="record 2 ends with a lone escape") as info:
        list(parse_records(["ok\nbad\\"], CSV))
    assert info.value.error_id == "dptr.Copy.BadRecord"


def test_a_record_without_end_is_refused_before_it_fills_memory() -> None:
    endless = ("x" * 1024 * 1024 for _ in range(MAX_RECORD_CHARS // (1024 * 1024) + 2))
    with pytest.raises(TaskError) as info:
        list(parse_records(endless, CSV))
    assert info.value.error_id == "dptr.Copy.RecordTooLarge"


def test_utf8_split_between_chunks_is_decoded_and_bad_bytes_are_named() -> None:
    data = "Zoë 東京 €\n".encode() * 3
    pieces = [data[i : i + 1] for i in range(len(data))]
    assert "".join(decoded(pieces, "s3://b/k")) == "Zoë 東京 €\n" * 3
    with pytest.raises(TaskError, match="not UTF-8") as info:
        list(decoded([b"ok\n\xff\xfe"], "s3://b/k"))
    assert info.value.error_id == "dptr.Copy.NotUtf8"


def test_gzip_round_trips_across_members_and_chunk_sizes() -> None:
    rng = random.Random(7)
    payload = bytes(rng.getrandbits(8) for _ in range(200_000)) + b"a" * 3_000_000
    packed = b"".join(compressed([payload[:100_000], payload[100_000:]]))
    assert gzip.decompress(packed) == payload
    two_members = gzip.compress(b"first\n") + gzip.compress(b"second\n")
    for size in (1, 10, 4096):
        pieces = [two_members[i : i + size] for i in range(0, len(two_members), size)]
        assert b"".join(decompressed(pieces, "s3://b/k.gz")) == b"first\nsecond\n"
    assert b"".join(decompressed([packed], "x")) == payload


def test_truncated_or_foreign_gzip_is_a_clear_failure() -> None:
    packed = gzip.compress(b"some records\n" * 100)
    with pytest.raises(TaskError, match="middle of a gzip stream"):
        list(decompressed([packed[:-12]], "s3://b/k.gz"))
    with pytest.raises(TaskError, match="not gzip data") as info:
        list(decompressed([b"plain text, not gzip"], "s3://b/k.gz"))
    assert info.value.error_id == "dptr.Copy.BadGzip"


def test_values_are_written_as_text() -> None:
    import datetime
    import decimal

    rows = [[True, False, 3, decimal.Decimal("1.50"), datetime.date(2026, 12, 2), b"\x00ab"]]
    assert "".join(write_records(rows, CSV)) == "true,false,3,1.50,2026-12-02,\x00ab\n"
    assert b"".join(encoded(["é"])) == "é".encode()


@pytest.mark.parametrize(
    "name", ["orders", "public.orders", "db.public.orders", '"Mixed Case"', "`my-table`", "t$1"]
)
def test_table_names_authors_write_pass(name: str) -> None:
    assert table_name(name, "Node") == name


@pytest.mark.parametrize(
    "name",
    [
        "orders; DROP TABLE x",
        "orders --",
        "a.b.c.d",
        '"a"b"',
        "1table",
        "t (id)",
        "orders WHERE 1=1",
        "",
        '"a%s"',
        "`a\\`",
    ],
)
def test_anything_else_as_a_table_name_is_refused(name: str) -> None:
    with pytest.raises(TaskError) as info:
        table_name(name, "Node")
    assert info.value.error_id == "dptr.Copy.BadTableName"


@pytest.mark.parametrize(
    ("column", "record", "escape"), [("N", "\n", "\\"), (",", "N", "\\"), (",", "\n", "N")]
)
def test_n_cannot_be_a_separator_or_the_escape_for_null_would_be_ambiguous(
    column: str, record: str, escape: str
) -> None:
    plan = DataFormatPlan(
        id="C", type="Custom", column_separator=column, record_separator=record, escape_char=escape
    )
    with pytest.raises(TaskError, match="N cannot be") as info:
        RecordFormat.of(plan)
    assert info.value.error_id == "dptr.Copy.BadDataFormat"


def test_a_record_of_many_escaped_newlines_is_one_record() -> None:
    text = "".join(write_records([["x\n" * 50_000, "y"]], CSV))
    chunks = _chunked(text, 4096)
    assert list(parse_records(chunks, CSV)) == [["x\n" * 50_000, "y"]]


def test_a_binary_value_that_is_not_text_fails_rather_than_changes() -> None:
    assert "".join(write_records([[b"caf\xc3\xa9"]], CSV)) == "café\n"
    with pytest.raises(TaskError) as info:
        "".join(write_records([[b"\xff\x00"]], CSV))
    assert info.value.error_id == "dptr.Copy.BinaryValue"


def test_zeros_after_the_last_gzip_member_are_padding() -> None:
    packed = gzip.compress(b"records\n") + b"\0" * 512
    assert b"".join(decompressed([packed], "s3://b/k.gz")) == b"records\n"


def test_a_mysql_data_node_carries_its_own_connection() -> None:
    """The guide's MySqlDataNode (and a SqlDataNode so written): connectionString, username
    and *password on the node itself, no database object."""
    from dptr_samples import task_object

    from dptr_common.activity_plan import build_plan
    from dptr_common.task import parse_task

    raw = task_object()
    attempt = raw["objects"][raw["attemptId"]]
    attempt["fields"] = [
        {"key": "type", "stringValue": "CopyActivity"},
        {"key": "input", "refValue": "Table"},
        {"key": "output", "refValue": "Out"},
    ]
    node = {
        "type": "MySqlDataNode",
        "table": "orders",
        "connectionString": "jdbc:mysql://db.internal:3306/shop",
        "username": "etl",
        "*password": "pa55",
    }
    raw["objects"] = {
        raw["attemptId"]: attempt,
        "Table": {
            "id": "Table",
            "name": "Table",
            "fields": [{"key": k, "stringValue": v} for k, v in node.items()],
        },
        "Out": {
            "id": "Out",
            "name": "Out",
            "fields": [
                {"key": "type", "stringValue": "S3DataNode"},
                {"key": "filePath", "stringValue": "s3://b/orders.csv"},
            ],
        },
    }
    plan = build_plan(parse_task(raw))
    assert plan.input is not None and plan.input.database is not None
    assert (plan.input.type, plan.input.table) == ("SqlDataNode", "orders")
    db = plan.input.database
    assert (db.dialect, db.host, db.port, db.database, db.username, db.password) == (
        "mysql",
        "db.internal",
        3306,
        "shop",
        "etl",
        "pa55",
    )


def test_zeros_after_a_member_are_padding_across_chunks_too() -> None:
    packed = gzip.compress(b"one\n") + b"\0" * 700 + gzip.compress(b"two\n") + b"\0" * 300
    for size in (1, 7, 256, 4096):
        pieces = [packed[i : i + size] for i in range(0, len(packed), size)]
        assert b"".join(decompressed(pieces, "s3://b/k.gz")) == b"one\ntwo\n"


def _copy_task(source: dict[str, str], target: dict[str, str], **more: dict[str, str]) -> Any:
    from dptr_samples import task_object

    from dptr_common.task import parse_task

    raw = task_object()
    attempt = raw["objects"][raw["attemptId"]]
    attempt["fields"] = [
        {"key": "type", "stringValue": "CopyActivity"},
        {"key": "input", "refValue": "In"},
        {"key": "output", "refValue": "Out"},
    ]

    def obj(object_id: str, fields: dict[str, str]) -> dict[str, Any]:
        return {
            "id": object_id,
            "name": object_id,
            "fields": [
                {"key": k[1:], "refValue": v} if k.startswith("@") else {"key": k, "stringValue": v}
                for k, v in fields.items()
            ],
        }

    raw["objects"] = {
        raw["attemptId"]: attempt,
        "In": obj("In", source),
        "Out": obj("Out", target),
        **{k: obj(k, v) for k, v in more.items()},
    }
    return parse_task(raw)


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ("s3://b/in/", "s3://b/in/out/"),
        ("s3://b/in/", "s3://b/in/"),
        ("s3://b/in", "s3://b/"),
        ("s3://b/in/", "s3://b/in/all.csv"),
    ],
)
def test_a_directory_copy_may_not_write_under_its_own_input(source: str, target: str) -> None:
    from dptr_common.activity_plan import build_plan

    def node(path: str) -> dict[str, str]:
        key = "filePath" if path.endswith(".csv") else "directoryPath"
        return {"type": "S3DataNode", key: path}

    with pytest.raises(TaskError) as info:
        build_plan(_copy_task(node(source), node(target)))
    assert info.value.error_id == "dptr.Copy.OverlappingPaths"
    build_plan(_copy_task(node("s3://b/in/"), node("s3://b/input-copy/")))  # a sibling is fine
    build_plan(_copy_task(node("s3://b/in/"), node("s3://other/in/out/")))  # another bucket too


def test_a_custom_formats_escape_char_reaches_the_plan() -> None:
    from dptr_common.activity_plan import build_plan

    task = _copy_task(
        {"type": "S3DataNode", "filePath": "s3://b/in.txt", "@dataFormat": "Fmt"},
        {"type": "S3DataNode", "filePath": "s3://b/out.txt", "@dataFormat": "Fmt"},
        Fmt={"type": "Custom", "columnSeparator": "\\t", "recordSeparator": "\\u0001", "escapeChar": "^"},
    )
    plan = build_plan(task)
    assert plan.input is not None and plan.input.data_format is not None
    fmt = RecordFormat.of(plan.input.data_format)
    assert (fmt.column, fmt.record, fmt.escape) == ("\t", "\u0001", "^")
