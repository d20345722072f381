"""Scripts and staged data: what runs before the task container and after it.

Who does what (docs/task-runner-parity.md has the why):

* ``dptr-fetch-script`` (init container): :func:`fetch_script_main` downloads
  ``scriptUri`` into the script emptyDir.
* ``dptr-stage-in`` (init container, only with ``stage: true``): :func:`stage_in_main`
  resolves data nodes PollForTask did not include (one DescribeObjects call), downloads
  every input into ``INPUTn_STAGING_DIR``, creates every ``OUTPUTn_STAGING_DIR``, and
  writes the resolved plan to ``/dptr/plan/plan.json`` for the sidecar (a volume the
  task container does not mount).
* the sidecar, after the task container exited 0: :func:`stage_out` uploads every
  output directory.  A failed upload makes the attempt FAILED (the data did not
  arrive), with ``dptr.StagingFailed.<S3 code>``.

A failure in an init container exits 1 with the termination message
``<errorId>\\n<message>`` (see :func:`parse_termination_message`), which
:func:`outcome_for_init_failure` turns into the attempt's FAILED outcome.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from dptr_common.awsauth import AssumedRole
from dptr_common.datapipeline import DataPipelineClient, DataPipelineError, call_with_retry
from dptr_common.errors import Outcome, TaskError, error_id, parse_termination_message
from dptr_common.render_staging import PLAN_DIR
from dptr_common.staging_plan import STAGING_ROOT, StagedNode, StagingPlan, data_node_location

from .config import time_scale_from_env
from .s3 import S3Client, S3Error, S3Uri, parse_s3_uri, sse_args
from .safefs import SharedVolume, UnsafeFile

__all__ = [
    "PLAN_FILE",
    "fetch_script",
    "fetch_script_main",
    "load_plan",
    "outcome_for_init_failure",
    "parse_termination_message",
    "resolve_plan",
    "stage_in",
    "stage_in_main",
    "stage_out",
    "write_termination_message",
]

#: The resolved plan, written by stage-in for the sidecar into a volume of their own
#: (``dptr-plan``): the task container does not mount it, so it cannot rewrite the plan.
PLAN_FILE = "plan.json"
#: Kubernetes' default terminationMessagePath.
TERMINATION_LOG = "/dev/termination-log"

Log = Callable[[str], None]


def _stderr_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _staging_error(exc: S3Error, what: str) -> TaskError:
    return TaskError(error_id("StagingFailed", exc.code), f"{what}: {exc.message}")


# --------------------------------------------------------------------------- plan


#: How long stage-in retries a DescribeObjects that failed transiently (throttling, 5xx,
#: no connection), protocol seconds: a transient error must not fail an attempt.
RESOLVE_RETRY_BUDGET = 60.0


def resolve_plan(plan: StagingPlan, client: Any, *, budget: float = RESOLVE_RETRY_BUDGET) -> StagingPlan:
    """Fill in data nodes PollForTask did not include, with one DescribeObjects call
    (retried for ``budget`` real seconds while it fails transiently).

    ``client`` is a :class:`dptr_common.datapipeline.DataPipelineClient` (or anything
    with its ``describe_objects(pipeline_id, ids, evaluate_expressions=True)``).
    Expressions are evaluated by the service (``evaluateExpressions=true``), so
    ``#{format(@scheduledStartTime, ...)}`` paths arrive as plain S3 URIs.
    """
    missing = plan.unresolved
    if not missing:
        return plan
    try:
        described = call_with_retry(
            lambda: client.describe_objects(plan.pipeline_id, missing, evaluate_expressions=True),
            deadline=time.monotonic() + budget,
            base=max(budget / 60, 0.01),
            cap=max(budget / 6, 0.05),
            on_retry=lambda error, wait: _stderr_log(
                f"dptr stage-in: DescribeObjects: {error}; retrying in {wait:.2f}s"
            ),
        )
    except DataPipelineError as exc:
        raise TaskError(
            error_id("StagingFailed", "DescribeObjects", exc.reason),
            f"could not look up data nodes {', '.join(missing)}: {exc}",
        ) from exc
    by_id = {str(obj.get("id")): obj for obj in described}
    nodes: list[StagedNode] = []
    for node in plan.nodes:
        if node.resolved:
            nodes.append(node)
            continue
        obj = by_id.get(node.ref)
        if obj is None:
            raise TaskError(
                "dptr.StagingFailed.DataNodeNotFound",
                f"{node.direction} data node {node.ref!r} is not in pipeline {plan.pipeline_id}",
            )
        location = data_node_location(obj)
        if location is not None:  # other data node types are not staged
            nodes.append(node.with_location(location))
    return StagingPlan(pipeline_id=plan.pipeline_id, nodes=tuple(nodes))


def load_plan(env: Mapping[str, str] | None = None) -> StagingPlan | None:
    """The plan for this pod: the one stage-in resolved (in the plan volume, which the
    task cannot write), else ``DPTR_STAGING_PLAN``, else None."""
    env = os.environ if env is None else env
    resolved = Path(env.get("DPTR_PLAN_DIR") or PLAN_DIR) / PLAN_FILE
    if resolved.is_file():
        return StagingPlan.from_json(resolved.read_text())
    raw = env.get("DPTR_STAGING_PLAN")
    return StagingPlan.from_json(raw) if raw else None


# --------------------------------------------------------------------------- transfers


def _safe_relative(prefix: str, key: str) -> PurePosixPath | None:
    """The key's path below the prefix; None for folder markers; refuses ``..``."""
    relative = key[len(prefix) :].lstrip("/")
    if not relative or relative.endswith("/") or relative.endswith("_$folder$"):
        return None
    path = PurePosixPath(relative)
    if any(part in {"..", "."} for part in path.parts):
        raise TaskError(
            "dptr.StagingFailed.UnsafeKey", f"refusing to stage key {key!r}: it leaves the directory"
        )
    return path


def _download_input(node: StagedNode, s3: S3Client, log: Log) -> int:
    assert node.uri is not None
    target = Path(node.staging_dir)
    target.mkdir(parents=True, exist_ok=True)
    try:
        uri = parse_s3_uri(node.uri)
    except S3Error as exc:
        raise _staging_error(exc, f"input {node.index} ({node.ref})") from exc
    count = 0
    try:
        if node.kind == "file":
            name = PurePosixPath(uri.key).name
            if not name:
                raise TaskError("dptr.StagingFailed.BadDataNode", f"filePath {node.uri!r} names no file")
            log(f"downloading {uri} to {target / name}")
            s3.download(uri, target / name)
            return 1
        prefix = uri.key if not uri.key or uri.key.endswith("/") else uri.key + "/"
        log(f"downloading directory {uri} to {target}")
        for item, _size in s3.list(S3Uri(uri.bucket, prefix)):
            relative = _safe_relative(prefix, item.key)
            if relative is None:
                continue
            s3.download(item, target / relative)
            count += 1
    except S3Error as exc:
        raise _staging_error(exc, f"input {node.index} ({node.ref}) {node.uri}") from exc
    if count == 0:
        raise TaskError(
            "dptr.StagingFailed.NoSuchKey",
            f"input {node.index} ({node.ref}): no objects under directoryPath {node.uri}",
        )
    return count


def stage_in(plan: StagingPlan, s3: S3Client, *, log: Log = _stderr_log) -> dict[str, str]:
    """Download every input, create every output directory; returns the staging env.

    Raises TaskError ``dptr.StagingFailed.<code>`` (``NoSuchKey``, ``NoSuchBucket``,
    ``AccessDenied``, ``DataNodeNotResolved``...).
    """
    for node in plan.nodes:
        if not node.resolved:
            raise TaskError(
                "dptr.StagingFailed.DataNodeNotResolved",
                f"{node.direction} data node {node.ref!r} has no location (resolve_plan first)",
            )
    for node in plan.inputs:
        count = _download_input(node, s3, log)
        log(f"{node.env_name}={node.staging_dir}: {count} object(s) from {node.uri}")
    for node in plan.outputs:
        Path(node.staging_dir).mkdir(parents=True, exist_ok=True)
    return plan.env()


def _upload_args(node: StagedNode) -> dict[str, str]:
    return sse_args(node.encryption, node.kms_key_id)


#: The most a task's staged outputs may add up to, unless the TaskRunner says otherwise
#: (``spec.taskIO.maxOutputBytes``, passed as ``DPTR_MAX_OUTPUT_BYTES``).
DEFAULT_MAX_OUTPUT_BYTES = 50 * 1024**3


def _unsafe(exc: UnsafeFile, node: StagedNode) -> TaskError:
    return TaskError(
        error_id("StagingFailed", exc.reason),
        f"{node.env_name} (output {node.index}, {node.ref}): {exc}; nothing of this output was uploaded",
    )


def _output_files(
    volume: SharedVolume, plan: StagingPlan, root: str, max_bytes: int
) -> list[tuple[StagedNode, list[tuple[str, int]]]]:
    """Every output's files, checked (all of them, before anything is uploaded)."""
    found = []
    total = 0
    for node in plan.outputs:
        relative = PurePosixPath(node.staging_dir).relative_to(root).as_posix()
        try:
            files = volume.files(relative) if volume.is_dir(relative) else []
        except UnsafeFile as exc:
            raise _unsafe(exc, node) from exc
        if node.kind == "file" and len(files) > 1:
            raise TaskError(
                "dptr.StagingFailed.TooManyFiles",
                f"{node.env_name} holds {len(files)} files but output {node.ref!r} is a filePath",
            )
        total += sum(size for _, size in files)
        if total > max_bytes:
            raise TaskError(
                "dptr.StagingFailed.TooLarge",
                f"the staged outputs hold more than {max_bytes} bytes (at {node.env_name}); "
                "nothing was uploaded (raise spec.taskIO.maxOutputBytes on the TaskRunner to allow more)",
            )
        found.append((node, [(f"{relative}/{name}", size) for name, size in files]))
    return found


def stage_out(
    plan: StagingPlan,
    s3: S3Client,
    *,
    log: Log = _stderr_log,
    root: str = STAGING_ROOT,
    max_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
) -> list[str]:
    """Upload every ``OUTPUTn_STAGING_DIR`` to its data node; returns the URIs written.

    A directoryPath receives the directory's files under their relative paths; a
    filePath receives the directory's single file (more than one is an error).  The
    staging volume is the task's to write, so it is read through :mod:`.safefs`: a
    symbolic link, FIFO, device or socket anywhere in an output, or outputs larger than
    ``max_bytes`` together, fail the attempt before anything is uploaded.  Raises
    TaskError ``dptr.StagingFailed.<code>`` (``Symlink``, ``NotRegularFile``,
    ``TooLarge``, ``TooManyFiles``, or S3's error code).
    """
    for node in plan.outputs:
        if node.uri is None:
            raise TaskError(
                "dptr.StagingFailed.DataNodeNotResolved", f"output data node {node.ref!r} has no location"
            )
    written: list[str] = []
    with SharedVolume(root) as volume:
        for node, files in _output_files(volume, plan, root, max_bytes):
            assert node.uri is not None
            prefix = PurePosixPath(node.staging_dir).relative_to(root).as_posix() + "/"
            try:
                uri = parse_s3_uri(node.uri)
                targets = [
                    (path, uri if node.kind == "file" else uri.child(path[len(prefix) :]))
                    for path, _ in files
                ]
                for path, target in targets:
                    log(f"uploading {root}/{path} to {target}")
                    try:
                        shared = volume.open(path, max_bytes=max_bytes)
                    except UnsafeFile as exc:  # changed since it was listed
                        raise _unsafe(exc, node) from exc
                    with shared:
                        s3.upload_fd(shared.fd, shared.size, target, extra=_upload_args(node))
                    written.append(str(target))
            except S3Error as exc:
                raise _staging_error(exc, f"output {node.index} ({node.ref}) {node.uri}") from exc
            log(f"{node.env_name}: {len(targets)} file(s) uploaded to {node.uri}")
    return written


def fetch_script(uri: str, path: Path, s3: S3Client) -> int:
    """Download ``scriptUri`` to ``path`` with mode 0755; TaskError ``dptr.ScriptFetchFailed.<code>``.

    The object is streamed to a temporary file beside ``path`` and renamed into place
    (:meth:`S3Client.download`), so the task never sees half a script and a failed
    download leaves nothing behind.
    """
    try:
        target = parse_s3_uri(uri)
        if not target.key or target.key.endswith("/"):
            raise S3Error("InvalidUri", f"{uri!r} is not an s3://bucket/key URI", uri=uri)
        size = s3.download(target, path)
        path.chmod(0o755)
    except S3Error as exc:
        raise TaskError(error_id("ScriptFetchFailed", exc.code), f"scriptUri {uri}: {exc.message}") from exc
    except OSError as exc:
        raise TaskError(
            error_id("ScriptFetchFailed", "LocalWrite"), f"scriptUri {uri}: cannot write {path}: {exc}"
        ) from exc
    return size


# --------------------------------------------------------------------------- init containers


def write_termination_message(error: TaskError, env: Mapping[str, str] | None = None) -> None:
    """``<errorId>\\n<message>`` to the termination log (and stderr, for ``kubectl logs``)."""
    env = os.environ if env is None else env
    text = f"{error.error_id}\n{error.message}"
    _stderr_log(f"dptr: {error.error_id}: {error.message}")
    target = Path(env.get("DPTR_TERMINATION_LOG") or TERMINATION_LOG)
    with contextlib.suppress(OSError):
        target.write_text(text[:4000])


_INIT_FAILURE_IDS = {
    "dptr-fetch-script": "dptr.ScriptFetchFailed",
    "dptr-stage-in": "dptr.StagingFailed",
}


def outcome_for_init_failure(container: str, terminated: Mapping[str, Any]) -> Outcome:
    """FAILED for an init container of ours that failed (``state.terminated`` as an API dict)."""
    parsed = parse_termination_message(terminated.get("message"))
    if parsed is not None:
        return Outcome("FAILED", parsed[0], parsed[1] or f"{container} failed")
    base = _INIT_FAILURE_IDS.get(container, error_id("InitContainerFailed", container))
    reason = terminated.get("reason") or f"exit code {terminated.get('exitCode')}"
    message = f"{container} failed: {reason}"
    detail = str(terminated.get("message") or "").strip()
    if detail:  # FallbackToLogsOnError: the end of its log, e.g. a crash before our message
        message += f": {detail[-2000:]}"
    return Outcome("FAILED", f"{base}.{reason}" if reason == "OOMKilled" else base, message)


def _s3_from_env(env: Mapping[str, str]) -> S3Client:
    return S3Client(env=env)


def _dp_client_from_env(env: Mapping[str, str]) -> Any:
    return DataPipelineClient(
        region=env.get("DPTR_REGION") or env.get("AWS_REGION") or "us-east-1",
        endpoint_url=env.get("DPTR_ENDPOINT_URL") or None,
        role=AssumedRole.from_env(env),
    )


def _unexpected(base: str, what: str, exc: Exception) -> TaskError:
    """Anything else (credentials, a full disk, a bug) still ends as one clear line and an errorId."""
    if isinstance(exc, OSError):
        return TaskError(error_id(base, "LocalWrite"), f"{what}: {exc}")
    return TaskError(error_id(base, type(exc).__name__), f"{what}: {type(exc).__name__}: {exc}")


def stage_in_main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """``dptr-sidecar stage-in``: 0 when staged, 1 with a termination message otherwise."""
    env = os.environ if env is None else env
    try:
        raw = env.get("DPTR_STAGING_PLAN")
        if not raw:
            _stderr_log("dptr stage-in: DPTR_STAGING_PLAN is not set; nothing to stage")
            return 0
        plan = StagingPlan.from_json(raw)
        if plan.unresolved:
            client = _dp_client_from_env(env)
            try:
                plan = resolve_plan(plan, client, budget=RESOLVE_RETRY_BUDGET * time_scale_from_env(env))
            finally:
                client.close()
        with _s3_from_env(env) as s3:
            stage_in(plan, s3)
        (Path(env.get("DPTR_PLAN_DIR") or PLAN_DIR) / PLAN_FILE).write_text(plan.to_json())
    except TaskError as error:
        write_termination_message(error, env)
        return 1
    except Exception as exc:
        write_termination_message(_unexpected("dptr.StagingFailed", "staging in", exc), env)
        return 1
    return 0


def fetch_script_main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """``dptr-sidecar fetch-script``: ``$DPTR_SCRIPT_URI`` -> ``$DPTR_SCRIPT_PATH`` (0755).

    Exit 0 when fetched; 1 with the termination message ``<errorId>\\n<message>`` and
    one line on stderr (``dptr: dptr.ScriptFetchFailed.NoSuchKey: scriptUri s3://...``)
    otherwise.
    """
    env = os.environ if env is None else env
    uri, path = (env.get("DPTR_SCRIPT_URI") or "").strip(), (env.get("DPTR_SCRIPT_PATH") or "").strip()
    try:
        if not uri or not path:
            raise TaskError(
                "dptr.ScriptFetchFailed.NotConfigured", "DPTR_SCRIPT_URI and DPTR_SCRIPT_PATH must be set"
            )
        with _s3_from_env(env) as s3:
            size = fetch_script(uri, Path(path), s3)
        _stderr_log(f"dptr fetch-script: {uri} -> {path} ({size} bytes)")
    except TaskError as error:
        write_termination_message(error, env)
        return 1
    except Exception as exc:
        write_termination_message(_unexpected("dptr.ScriptFetchFailed", f"scriptUri {uri}", exc), env)
        return 1
    return 0
