"""dptr_sidecar.s3 against moto's S3: streaming transfers, multipart, error codes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from parity_helpers import read_object

from dptr_sidecar.s3 import S3Client, S3Error, S3Uri, parse_s3_uri

MIB = 1024 * 1024


def test_parse_s3_uri() -> None:
    assert parse_s3_uri("s3://bucket/a/b c.txt") == S3Uri("bucket", "a/b c.txt")
    assert parse_s3_uri("s3://bucket") == S3Uri("bucket", "")
    assert parse_s3_uri("s3n://bucket/k").key == "k"
    assert S3Uri("b", "dir/").child("x/y") == S3Uri("b", "dir/x/y")
    assert S3Uri("b", "").child("x") == S3Uri("b", "x")
    with pytest.raises(S3Error) as caught:
        parse_s3_uri("/local/path")
    assert caught.value.code == "InvalidUri"


def test_multipart_file_upload_and_download_round_trip(
    s3_env: dict[str, str], s3_raw: Any, s3_bucket: str, tmp_path: Path
) -> None:
    data = os.urandom(11 * MIB + 123)
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    with S3Client(env=s3_env, part_size=5 * MIB) as s3:
        assert s3.upload_file(source, S3Uri(s3_bucket, "big.bin")) == len(data)
        head = s3_raw.head_object(Bucket=s3_bucket, Key="big.bin")
        assert head["ETag"].strip('"').endswith("-3")  # three parts
        assert s3.download(S3Uri(s3_bucket, "big.bin"), tmp_path / "back" / "big.bin") == len(data)
    assert (tmp_path / "back" / "big.bin").read_bytes() == data


def test_stream_upload_small_and_multipart(s3_env: dict[str, str], s3_raw: Any, s3_bucket: str) -> None:
    with S3Client(env=s3_env, part_size=5 * MIB) as s3:
        s3.upload_stream(iter([b"a", b"", b"bc"]), S3Uri(s3_bucket, "small"))
        chunks = [os.urandom(MIB) for _ in range(12)]
        s3.upload_stream(iter(chunks), S3Uri(s3_bucket, "large"))
        s3.upload_stream(iter([]), S3Uri(s3_bucket, "empty"))
    assert read_object(s3_raw, s3_bucket, "small") == b"abc"
    assert read_object(s3_raw, s3_bucket, "large") == b"".join(chunks)
    assert read_object(s3_raw, s3_bucket, "empty") == b""


def test_errors_carry_s3_codes(s3: S3Client, s3_bucket: str, tmp_path: Path) -> None:
    with pytest.raises(S3Error) as caught:
        s3.download(S3Uri(s3_bucket, "missing"), tmp_path / "x")
    assert caught.value.code == "NoSuchKey"
    assert not list(tmp_path.iterdir())  # no partial file left behind
    with pytest.raises(S3Error) as caught:
        s3.upload_stream(iter([b"x"]), S3Uri("no-such-bucket-dptr", "k"))
    assert caught.value.code == "NoSuchBucket"
    assert not s3.exists(S3Uri(s3_bucket, "missing"))


def test_list_yields_every_object_under_a_prefix(s3: S3Client, s3_raw: Any, s3_bucket: str) -> None:
    for key in ("d/a", "d/sub/b", "dx/c", "e"):
        s3_raw.put_object(Bucket=s3_bucket, Key=key, Body=b"1")
    assert sorted(u.key for u, _ in s3.list(S3Uri(s3_bucket, "d/"))) == ["d/a", "d/sub/b"]


def test_a_stream_that_fails_after_parts_were_sent_leaves_no_object_and_no_upload(
    s3_env: dict[str, str], s3_raw: Any, s3_bucket: str
) -> None:
    class Refused(Exception):
        pass

    def chunks() -> Any:
        for _ in range(12):
            yield os.urandom(MIB)
        raise Refused("a bad record after two parts")

    with S3Client(env=s3_env, part_size=5 * MIB) as s3, pytest.raises(Refused):
        s3.upload_stream(chunks(), S3Uri(s3_bucket, "aborted"))
    assert "Contents" not in s3_raw.list_objects_v2(Bucket=s3_bucket, Prefix="aborted")
    assert not s3_raw.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")


def test_the_part_size_grows_so_that_a_long_stream_fits_in_s3s_parts(
    s3_env: dict[str, str], s3_raw: Any, s3_bucket: str
) -> None:
    chunks = [os.urandom(MIB) for _ in range(42)]
    with S3Client(env=s3_env, part_size=5 * MIB) as s3:
        s3.parts_per_doubling = 1  # 5, 10, 20, 40 MiB ... at most 8 times the first
        s3.upload_stream(iter(chunks), S3Uri(s3_bucket, "grown"))
    assert read_object(s3_raw, s3_bucket, "grown") == b"".join(chunks)
    head = s3_raw.head_object(Bucket=s3_bucket, Key="grown", PartNumber=3)
    assert head["ContentLength"] == 20 * MIB  # the third part: two doublings
    assert s3_raw.head_object(Bucket=s3_bucket, Key="grown")["ETag"].strip('"').endswith("-4")
