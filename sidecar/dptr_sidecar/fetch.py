"""``dptr-sidecar fetch-script``: download a task's ``scriptUri`` before the task runs.

Runs as the ``dptr-fetch-script`` init container.  It streams the S3 object to a
temporary file beside ``$DPTR_SCRIPT_PATH`` (never the whole object in memory), makes it
executable (0755) and renames it into place, so the task never sees half a script.  On
failure it prints one clear line and exits non-zero; the termination message (the
container uses ``FallbackToLogsOnError``) is what the operator and the sidecar report as
``dptr.ScriptFetchFailed``.

Environment: ``DPTR_SCRIPT_URI`` (``s3://bucket/key``), ``DPTR_SCRIPT_PATH``, the region
from ``AWS_REGION``/``DPTR_REGION``, an S3 endpoint override from ``DPTR_S3_ENDPOINT_URL``
or ``AWS_ENDPOINT_URL_S3``, credentials from botocore's default chain.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from typing import Any

__all__ = ["FetchError", "fetch_script", "fetch_script_main", "parse_s3_uri"]

_CHUNK = 256 * 1024
_S3_URI = re.compile(r"^s3://(?P<bucket>[^/\s]+)/(?P<key>.+)$")


class FetchError(Exception):
    """The script could not be fetched; the message says why, for the task's errorMessage."""


def parse_s3_uri(uri: str) -> tuple[str, str]:
    match = _S3_URI.match(uri.strip())
    if not match:
        raise FetchError(f"scriptUri {uri!r} is not an s3://bucket/key URI")
    return match.group("bucket"), match.group("key")


def _s3_client(region: str, endpoint_url: str | None) -> Any:
    import botocore.session
    from botocore.config import Config

    session = botocore.session.get_session()
    config = Config(
        region_name=region,
        connect_timeout=10,
        read_timeout=60,
        retries={"mode": "standard", "max_attempts": 5},
    )
    return session.create_client("s3", region_name=region, endpoint_url=endpoint_url, config=config)


def fetch_script(uri: str, path: str, *, region: str, endpoint_url: str | None = None) -> int:
    """Stream ``uri`` to ``path`` (mode 0755); the number of bytes written."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = parse_s3_uri(uri)
    directory = os.path.dirname(os.path.abspath(path)) or "."
    client = _s3_client(region, endpoint_url)
    try:
        response = client.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        raise FetchError(f"cannot download {uri}: {code}: {error.get('Message') or exc}") from exc
    except BotoCoreError as exc:
        raise FetchError(f"cannot download {uri}: {exc}") from exc
    body = response["Body"]
    fd, tmp = tempfile.mkstemp(prefix=".script-", dir=directory)
    written = 0
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                for chunk in body.iter_chunks(_CHUNK):
                    out.write(chunk)
                    written += len(chunk)
            except (BotoCoreError, OSError) as exc:
                raise FetchError(f"download of {uri} broke off after {written} bytes: {exc}") from exc
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        body.close()
    return written


def fetch_script_main() -> int:
    uri = os.environ.get("DPTR_SCRIPT_URI", "").strip()
    path = os.environ.get("DPTR_SCRIPT_PATH", "").strip()
    if not uri or not path:
        print("dptr-sidecar fetch-script: DPTR_SCRIPT_URI and DPTR_SCRIPT_PATH must be set", file=sys.stderr)
        return 2
    region = os.environ.get("AWS_REGION") or os.environ.get("DPTR_REGION") or "us-east-1"
    endpoint = os.environ.get("DPTR_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") or None
    try:
        size = fetch_script(uri, path, region=region, endpoint_url=endpoint)
    except FetchError as exc:
        print(f"dptr-sidecar fetch-script: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"dptr-sidecar fetch-script: cannot write {path}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # credentials and the like: still one clear line
        print(
            f"dptr-sidecar fetch-script: cannot download {uri}: {type(exc).__name__}: {exc}", file=sys.stderr
        )
        return 1
    print(f"dptr-sidecar fetch-script: {uri} -> {path} ({size} bytes)", file=sys.stderr)
    return 0
