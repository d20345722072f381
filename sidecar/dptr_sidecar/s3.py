"""Streaming S3 access for scripts, staging and logs, on botocore (imported lazily).

Nothing here reads a whole object or file into memory: downloads copy the response
body to disk in :data:`CHUNK_SIZE` pieces, uploads of more than :data:`PART_SIZE` go
as a multipart upload one part at a time, so the resident memory of a transfer is
about one part, whatever the object's size (see ``bench/staging_memory.py``).

Endpoint: ``endpoint_url``, else ``DPTR_S3_ENDPOINT_URL``, else ``AWS_ENDPOINT_URL_S3``
(botocore's own variable), else AWS.  A custom endpoint (moto in tests, MinIO, a VPC
endpoint) is addressed path-style.  Credentials come from botocore's default chain
(environment, web identity/IRSA, EKS Pod Identity) without the EC2 instance metadata
service, as for the Data Pipeline client: a pod must not silently act as its node.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dptr_common.awsauth import AssumedRole, StaticCredentials, make_session

from .safefs import file_slice

__all__ = [
    "CHUNK_SIZE",
    "PART_SIZE",
    "S3Client",
    "S3Error",
    "S3Uri",
    "parse_s3_uri",
    "sse_args",
]

log = logging.getLogger("dptr.s3")

#: Read/write granularity of a download.
CHUNK_SIZE = 1024 * 1024
#: S3's most parts in one multipart upload.
MAX_PARTS = 10_000
#: Multipart part size (S3's minimum is 5 MiB); the memory a single upload holds.
PART_SIZE = 8 * 1024 * 1024

_URI = re.compile(r"^s3[an]?://([^/\s]+)(?:/(.*))?$", re.DOTALL)


class S3Error(Exception):
    """An S3 operation failed.  ``code`` is S3's error code (``NoSuchKey``, ``AccessDenied``...)."""

    def __init__(self, code: str, message: str, *, uri: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = re.sub(r"[^A-Za-z0-9_-]+", "_", code) or "Unknown"
        self.message = message
        self.uri = uri


@dataclass(frozen=True)
class S3Uri:
    """``s3://bucket/key``; ``key`` may be empty (the bucket's root)."""

    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def child(self, relative: str) -> S3Uri:
        """The object ``relative`` below this one, as a directory (one ``/`` between)."""
        base = self.key.rstrip("/")
        return S3Uri(self.bucket, f"{base}/{relative.lstrip('/')}" if base else relative.lstrip("/"))


def parse_s3_uri(uri: str) -> S3Uri:
    """Parse ``s3://bucket/key`` (``s3n://`` and ``s3a://`` too, as Hadoop users write them)."""
    match = _URI.match(uri.strip())
    if match is None:
        raise S3Error("InvalidUri", f"{uri!r} is not an s3://bucket/key URI", uri=uri)
    return S3Uri(match.group(1), match.group(2) or "")


def _error_code(exc: BaseException) -> tuple[str, str]:
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        error = response.get("Error", {}) or {}
        code = str(error.get("Code") or "")
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in {"404", "NotFound"} or (not code and status == 404):
            code = "NoSuchKey"
        elif code == "403" or (not code and status == 403):
            code = "AccessDenied"
        return code or f"HTTP{status}", str(error.get("Message") or exc)
    return type(exc).__name__, str(exc)


def _from_aws_call(exc: BaseException) -> bool:
    """Whether ``exc`` came from botocore (a refused or failed call), not from our own code."""
    return type(exc).__module__.split(".")[0] in ("botocore", "urllib3", "boto3")


def sse_args(encryption: str | None, kms_key_id: str | None) -> dict[str, str]:
    """PutObject's encryption arguments for an S3DataNode's ``s3EncryptionType`` and ``kmsKeyId``
    (SSE-S3 when the node says nothing, as the service's default)."""
    if encryption == "NONE":
        return {}
    if encryption == "SERVER_SIDE_ENCRYPTION_KMS":
        args = {"ServerSideEncryption": "aws:kms"}
        if kms_key_id:
            args["SSEKMSKeyId"] = kms_key_id
        return args
    return {"ServerSideEncryption": "AES256"}


class S3Client:
    """The few S3 calls dptr needs, streaming, with S3's errors as :class:`S3Error`."""

    #: upload_stream doubles its part size after this many parts (S3's limit is 10,000).
    parts_per_doubling = 2000

    def __init__(
        self,
        region: str | None = None,
        endpoint_url: str | None = None,
        *,
        env: Mapping[str, str] | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        part_size: int = PART_SIZE,
    ) -> None:
        # Lazy: botocore is loaded only when S3 is used (the module docstring's promise).
        from botocore.config import Config

        env = os.environ if env is None else env
        self.region = region or env.get("AWS_REGION") or env.get("DPTR_REGION") or "us-east-1"
        self.endpoint_url = endpoint_url or env.get("DPTR_S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3")
        self.part_size = max(part_size, 5 * 1024 * 1024)
        if access_key_id is None and env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
            # Static keys from the given environment (a Secret, in the pod); without them,
            # botocore's chain (web identity, pod identity) applies.
            access_key_id, secret_access_key = env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
            session_token = session_token or env.get("AWS_SESSION_TOKEN") or None
        keys = (
            StaticCredentials(access_key_id, secret_access_key or "", session_token)
            if access_key_id is not None
            else None
        )
        # The TaskRunner's role (credentials.roleArn), assumed on top: S3 as the team's role.
        session = make_session(keys, AssumedRole.from_env(env), region=self.region)
        config_args: dict[str, Any] = {
            "region_name": self.region,
            "connect_timeout": 10,
            "read_timeout": 60,
            "retries": {"mode": "standard", "max_attempts": 5},
            # Checksums of whole bodies would need a second pass over a file; S3 checks
            # Content-MD5/ETag per part anyway.
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
        }
        if self.endpoint_url:
            config_args["s3"] = {"addressing_style": "path"}
        self._client: Any = session.create_client(
            "s3",
            region_name=self.region,
            endpoint_url=self.endpoint_url or None,
            config=Config(**config_args),
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> S3Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- reads ----------------------------------------------------------------

    def download(self, uri: S3Uri, dest: Path) -> int:
        """Stream one object to ``dest`` (written beside it, then renamed); returns its size."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".dptr-", dir=dest.parent)
        written = 0
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    response = self._client.get_object(Bucket=uri.bucket, Key=uri.key)
                    body = response["Body"]
                    for chunk in body.iter_chunks(CHUNK_SIZE):
                        out.write(chunk)
                        written += len(chunk)
                    body.close()
                except Exception as exc:
                    raise self._error(exc, uri) from exc
            os.replace(tmp_name, dest)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return written

    def iter_object(self, uri: S3Uri, *, limit: int | None = None) -> Iterator[bytes]:
        """One object's bytes in :data:`CHUNK_SIZE` pieces; past ``limit`` bytes, S3Error ``TooLarge``."""
        try:
            body = self._client.get_object(Bucket=uri.bucket, Key=uri.key)["Body"]
        except Exception as exc:
            raise self._error(exc, uri) from exc
        read = 0
        try:
            for chunk in body.iter_chunks(CHUNK_SIZE):
                read += len(chunk)
                if limit is not None and read > limit:
                    raise S3Error("TooLarge", f"{uri} is larger than {limit} bytes", uri=str(uri))
                yield chunk
        except S3Error:
            raise
        except Exception as exc:
            raise self._error(exc, uri) from exc
        finally:
            body.close()

    def exists(self, uri: S3Uri) -> bool:
        try:
            self._client.head_object(Bucket=uri.bucket, Key=uri.key)
        except Exception as exc:
            error = self._error(exc, uri)
            if error.code == "NoSuchKey":
                return False
            raise error from exc
        return True

    def list(self, uri: S3Uri) -> Iterator[tuple[S3Uri, int]]:
        """Every object whose key starts with ``uri.key`` (one page at a time)."""
        token: str | None = None
        while True:
            params: dict[str, Any] = {"Bucket": uri.bucket, "Prefix": uri.key}
            if token:
                params["ContinuationToken"] = token
            try:
                page = self._client.list_objects_v2(**params)
            except Exception as exc:
                raise self._error(exc, uri) from exc
            for item in page.get("Contents", []):
                yield S3Uri(uri.bucket, item["Key"]), int(item.get("Size", 0))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    # ---- writes ---------------------------------------------------------------

    def upload_file(self, path: Path, uri: S3Uri, *, extra: Mapping[str, str] | None = None) -> int:
        """Upload a local file of the sidecar's own (multipart above one part); returns its size."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return self.upload_fd(fd, os.fstat(fd).st_size, uri, extra=extra)
        finally:
            os.close(fd)

    def upload_fd(self, fd: int, size: int, uri: S3Uri, *, extra: Mapping[str, str] | None = None) -> int:
        """Upload exactly ``size`` bytes of the open file ``fd`` (multipart above one part).

        Each request body is a ``pread`` slice of its own, so nothing of the file is held
        in memory beyond the HTTP client's send buffer, a retried part re-reads its own
        bytes, and a file that grows after it was opened adds nothing."""
        extra = dict(extra or {})
        if size <= self.part_size:
            try:
                self._client.put_object(Bucket=uri.bucket, Key=uri.key, Body=file_slice(fd, 0, size), **extra)
            except Exception as exc:
                raise self._error(exc, uri) from exc
            return size
        try:
            upload_id = self._client.create_multipart_upload(Bucket=uri.bucket, Key=uri.key, **extra)[
                "UploadId"
            ]
        except Exception as exc:
            raise self._error(exc, uri) from exc
        parts: list[dict[str, Any]] = []
        try:
            for number, offset in enumerate(range(0, size, self.part_size), start=1):
                part = file_slice(fd, offset, min(self.part_size, size - offset))
                parts.append(self._upload_part(uri, upload_id, number, part))
            self._client.complete_multipart_upload(
                Bucket=uri.bucket, Key=uri.key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except Exception as exc:
            with contextlib.suppress(Exception):
                self._client.abort_multipart_upload(Bucket=uri.bucket, Key=uri.key, UploadId=upload_id)
            raise self._error(exc, uri) from exc
        return size

    def upload_stream(
        self, chunks: Iterable[bytes], uri: S3Uri, *, extra: Mapping[str, str] | None = None
    ) -> int:
        """Upload a stream of unknown length, holding at most about one part in memory.

        S3 takes at most 10,000 parts: the part size doubles after every
        :attr:`parts_per_doubling` parts, up to 8 times the first (64 MiB), so a stream of
        up to about 350 GiB fits; the memory held grows only past 16 GiB uploaded, to about
        two 64 MiB parts.  A longer stream fails ``TooManyParts`` (its upload aborted)."""
        extra = dict(extra or {})
        buffer = bytearray()
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []
        total = 0
        try:
            for chunk in chunks:
                buffer += chunk
                total += len(chunk)
                while len(buffer) >= (
                    size := self.part_size << min(len(parts) // self.parts_per_doubling, 3)
                ):
                    if len(parts) >= MAX_PARTS - 1:
                        raise S3Error(
                            "TooManyParts",
                            f"{uri}: the stream is longer than S3's {MAX_PARTS} parts",
                            uri=str(uri),
                        )
                    if upload_id is None:
                        upload_id = self._client.create_multipart_upload(
                            Bucket=uri.bucket, Key=uri.key, **extra
                        )["UploadId"]
                    part = bytes(memoryview(buffer)[:size])  # one copy, not two
                    del buffer[:size]
                    parts.append(self._upload_part(uri, upload_id, len(parts) + 1, part))
                    del part
            if upload_id is None:
                self._client.put_object(Bucket=uri.bucket, Key=uri.key, Body=bytes(buffer), **extra)
                return total
            if buffer or not parts:
                parts.append(self._upload_part(uri, upload_id, len(parts) + 1, bytes(buffer)))
            self._client.complete_multipart_upload(
                Bucket=uri.bucket, Key=uri.key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
            upload_id = None
            return total
        except BaseException as exc:
            # Whatever ends the stream (S3, or the producer of ``chunks``: a bad record, a
            # SIGTERM) leaves no object behind: the parts are dropped.
            if upload_id is not None:
                try:
                    self._client.abort_multipart_upload(Bucket=uri.bucket, Key=uri.key, UploadId=upload_id)
                except Exception as abort_error:
                    # Its parts stay (and are billed) until a lifecycle rule drops them
                    # (docs/install.md: AbortIncompleteMultipartUpload).
                    log.warning(
                        "could not abort the multipart upload %s of %s: %s", upload_id, uri, abort_error
                    )
            if isinstance(exc, S3Error) or not _from_aws_call(exc):
                raise
            raise self._error(exc, uri) from exc

    def _upload_part(self, uri: S3Uri, upload_id: str, number: int, data: Any) -> dict[str, Any]:
        response = self._client.upload_part(
            Bucket=uri.bucket, Key=uri.key, UploadId=upload_id, PartNumber=number, Body=data
        )
        return {"PartNumber": number, "ETag": response["ETag"]}

    @staticmethod
    def _error(exc: BaseException, uri: S3Uri) -> S3Error:
        if isinstance(exc, S3Error):
            return exc
        code, message = _error_code(exc)
        return S3Error(code, f"{uri}: {message}", uri=str(uri))
