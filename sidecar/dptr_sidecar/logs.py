"""The task's output streams on S3, where the official Task Runner puts them.

* ``stdout`` / ``stderr`` fields naming ``s3://`` paths: the stream is uploaded there
  as is (uncompressed), one object each.
* ``pipelineLogUri`` (set on the Default object, inherited by every activity): the
  attempt's logs go under
  ``<pipelineLogUri>/<pipelineId>/<componentId>/<instanceId>/<attemptId>/`` with the
  official runner's names, gzip-compressed as it uploads them: ``StdOutput.gz``,
  ``StdError.gz`` and ``Activity.log.gz`` (the runner's own log of the attempt: staging,
  the command, the exit; dptr writes its equivalent).

Uploads happen after every exit, success or failure.  A failed upload never changes
the outcome: :func:`upload_logs` returns problems (for an Event and the
errorMessage) instead of raising.

The task container's streams are captured to ``$DPTR_LOG_DIR/stdout`` and
``$DPTR_LOG_DIR/stderr`` by the wrapper ``render_staging`` puts around its command
(``tee``, so ``kubectl logs`` still shows them).  When the image lacks ``tee`` or
``mkfifo`` the wrapper leaves ``.nocapture`` and the caller's combined container log
(from the Kubernetes API) stands in for stdout.

The log volume is the task's to write, so it is read through :mod:`.safefs`: a capture
file that is a link, a FIFO, a device or larger than ``DPTR_MAX_LOG_BYTES`` is never
read.  Tampering is the one log problem that changes the outcome: the attempt ends
FAILED ``dptr.LogUploadFailed.<Symlink|NotRegularFile|TooLarge>``.
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dptr_common.errors import TaskError
from dptr_common.staging_plan import STAGING_ROOT
from dptr_common.task import Task, is_s3_path

from .s3 import CHUNK_SIZE, S3Client, S3Error, S3Uri, parse_s3_uri
from .safefs import SharedFile, SharedVolume, UnsafeFile
from .staging import DEFAULT_MAX_OUTPUT_BYTES, load_plan, stage_out

__all__ = [
    "ACTIVITY_LOG_NAME",
    "LOG_DIR",
    "STDERR_NAME",
    "STDOUT_NAME",
    "ActivityLog",
    "LogTargets",
    "TaskIOResult",
    "finish_task_io",
    "upload_logs",
]

#: The official runner's file names in an attempt's log directory (uploaded with ``.gz``).
STDOUT_NAME = "StdOutput"
STDERR_NAME = "StdError"
ACTIVITY_LOG_NAME = "Activity.log"
#: Where the task container's streams are captured (an emptyDir).
LOG_DIR = "/dptr/logs"
NO_CAPTURE_MARKER = ".nocapture"

#: The most each captured stream may hold, unless the TaskRunner says otherwise
#: (``spec.taskIO.maxLogBytes``, passed as ``DPTR_MAX_LOG_BYTES``).
DEFAULT_MAX_LOG_BYTES = 5 * 1024**3

#: bytes, a file (missing means empty), a safely opened file of the log volume, or a
#: factory of byte chunks (called per upload).
Source = bytes | Path | SharedFile | Callable[[], Iterable[bytes]] | None


@dataclass(frozen=True)
class LogTargets:
    """Where an attempt's logs go."""

    pipeline_id: str
    attempt_id: str
    component_id: str | None = None
    instance_id: str | None = None
    pipeline_log_uri: str | None = None
    stdout_uri: str | None = None
    stderr_uri: str | None = None
    #: Local ``stdout``/``stderr`` paths the task container's wrapper appends to.
    stdout_path: str | None = None
    stderr_path: str | None = None

    @property
    def wanted(self) -> bool:
        return bool(
            self.pipeline_log_uri
            or self.stdout_uri
            or self.stderr_uri
            or self.stdout_path
            or self.stderr_path
        )

    @classmethod
    def from_task(cls, task: Task) -> LogTargets:
        return cls(
            pipeline_id=task.pipeline_id,
            attempt_id=task.attempt_id,
            component_id=task.component_id,
            instance_id=task.instance_id,
            pipeline_log_uri=task.attempt.first("pipelineLogUri"),
            stdout_uri=task.stdout if is_s3_path(task.stdout) else None,
            stderr_uri=task.stderr if is_s3_path(task.stderr) else None,
            stdout_path=task.stdout if task.stdout and not is_s3_path(task.stdout) else None,
            stderr_path=task.stderr if task.stderr and not is_s3_path(task.stderr) else None,
        )

    _ENV = {
        "pipeline_id": "DPTR_PIPELINE_ID",
        "attempt_id": "DPTR_ATTEMPT_ID",
        "component_id": "DPTR_COMPONENT_ID",
        "instance_id": "DPTR_INSTANCE_ID",
        "pipeline_log_uri": "DPTR_PIPELINE_LOG_URI",
        "stdout_uri": "DPTR_STDOUT_URI",
        "stderr_uri": "DPTR_STDERR_URI",
        "stdout_path": "DPTR_STDOUT_PATH",
        "stderr_path": "DPTR_STDERR_PATH",
    }

    def to_env(self) -> dict[str, str]:
        return {name: value for attr, name in self._ENV.items() if (value := getattr(self, attr))}

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LogTargets:
        env = os.environ if env is None else env
        values = {attr: env.get(name) or None for attr, name in cls._ENV.items()}
        return cls(
            pipeline_id=values.pop("pipeline_id") or "",
            attempt_id=values.pop("attempt_id") or "",
            **values,
        )

    def attempt_prefix(self) -> S3Uri | None:
        """``<pipelineLogUri>/<pipelineId>/<component>/<instance>/<attempt>/``, or None."""
        if not self.pipeline_log_uri:
            return None
        # Attempt ids are "@<component>_<scheduled start>_Attempt=<n>"; the instance is the
        # attempt id without its "_Attempt=<n>" and the component without the "@" and time.
        instance = self.instance_id or self.attempt_id.rsplit("_Attempt=", 1)[0]
        component = self.component_id or instance.lstrip("@").rsplit("_", 1)[0]
        base = parse_s3_uri(self.pipeline_log_uri)
        return base.child(f"{self.pipeline_id}/{component}/{instance}/{self.attempt_id}/")


class ActivityLog:
    """dptr's counterpart of the official runner's Activity.log: timestamped lines."""

    def __init__(self, echo: Callable[[str], None] | None = None) -> None:
        self.lines: list[str] = []
        self._echo = echo

    def __call__(self, line: str) -> None:
        stamp = time.strftime("%d %b %Y %H:%M:%S", time.gmtime())
        self.lines.append(f"{stamp} [INFO] {line}")
        if self._echo is not None:
            self._echo(line)

    def text(self) -> bytes:
        return ("\n".join(self.lines) + "\n").encode() if self.lines else b""


def _chunks(source: Source) -> Iterator[bytes]:
    if source is None:
        return
    if isinstance(source, bytes):
        if source:
            yield source
        return
    if isinstance(source, SharedFile):
        yield from source.chunks(CHUNK_SIZE)
        return
    if isinstance(source, Path):
        try:
            handle = source.open("rb")
        except FileNotFoundError:
            return
        with handle:
            yield from iter(lambda: handle.read(CHUNK_SIZE), b"")
        return
    for chunk in source():
        if chunk:
            yield chunk


def _gzip(chunks: Iterable[bytes]) -> Iterator[bytes]:
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: a gzip stream
    for chunk in chunks:
        out = compressor.compress(chunk)
        if out:
            yield out
    yield compressor.flush()


def _describe(exc: Exception) -> str:
    if isinstance(exc, S3Error):
        return f"{exc.code}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"


def upload_logs(
    targets: LogTargets,
    s3: S3Client,
    *,
    stdout: Source,
    stderr: Source,
    activity_log: Source = None,
    skip: frozenset[str] = frozenset(),
) -> list[str]:
    """Upload the streams wherever ``targets`` says; returns problems (never raises for S3).

    Each destination is tried independently, so one refused bucket does not cost the
    other copies.  Streams named in ``skip`` (``"stdout"``, ``"stderr"``) are not
    uploaded anywhere.
    """
    problems: list[str] = []
    uploads: list[tuple[str, Source, str, bool]] = []
    for stream, source, uri in (
        ("stdout", stdout, targets.stdout_uri),
        ("stderr", stderr, targets.stderr_uri),
    ):
        if uri:
            uploads.append((stream, source, uri, False))
    try:
        prefix = targets.attempt_prefix()
    except S3Error as exc:
        problems.append(f"pipelineLogUri {targets.pipeline_log_uri!r} is not an s3:// URI ({exc.code})")
        prefix = None
    if prefix is not None:
        uploads.append(("stdout", stdout, str(prefix.child(STDOUT_NAME + ".gz")), True))
        uploads.append(("stderr", stderr, str(prefix.child(STDERR_NAME + ".gz")), True))
        if activity_log is not None:
            uploads.append(("activity log", activity_log, str(prefix.child(ACTIVITY_LOG_NAME + ".gz")), True))
    for stream, source, uri, compress in uploads:
        if stream in skip:
            continue
        try:
            target = parse_s3_uri(uri)
        except S3Error:
            problems.append(f"{stream} path {uri!r} is not an s3:// URI; dptr writes logs to S3 only")
            continue
        chunks = _chunks(source)
        extra = {"ContentType": "application/x-gzip" if compress else "text/plain"}
        try:
            s3.upload_stream(_gzip(chunks) if compress else chunks, target, extra=extra)
        except Exception as exc:  # any failure is a problem to report, never a lost outcome
            problems.append(f"could not upload {stream} to {uri}: {_describe(exc)}")
    return problems


@dataclass
class TaskIOResult:
    """What happened after the task container exited."""

    #: Set when staged outputs could not be uploaded: the attempt is FAILED with it.
    error: TaskError | None = None
    #: Log upload problems: report them (Event, errorMessage); they change no outcome.
    problems: list[str] = field(default_factory=list)
    #: Output objects written.
    uploaded: list[str] = field(default_factory=list)


@dataclass
class Captured:
    """The task's captured streams, opened safely, and what was refused."""

    stdout: Source = None
    stderr: Source = None
    refused: list[UnsafeFile] = field(default_factory=list)
    _open: list[SharedFile] = field(default_factory=list)

    def close(self) -> None:
        for shared in self._open:
            shared.close()


def capture_sources(
    log_dir: Path,
    combined_output: Callable[[], Iterable[bytes]] | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_LOG_BYTES,
) -> Captured:
    """stdout and stderr as the wrapper captured them, or the combined container log when
    it could not capture.  A capture file the sidecar refuses (a link, a FIFO, a device,
    too large) is listed in ``refused`` and not uploaded at all."""
    captured = Captured()
    try:
        volume = SharedVolume(str(log_dir))
    except OSError:
        return captured if combined_output is None else Captured(stdout=combined_output, stderr=b"")
    with volume:
        uncaptured = volume.exists(NO_CAPTURE_MARKER) or not volume.exists("stdout")
        if uncaptured and combined_output is not None:
            return Captured(stdout=combined_output, stderr=b"")
        for stream in ("stdout", "stderr"):
            source: Source = b""
            try:
                shared = volume.open(stream, max_bytes=max_bytes)
                captured._open.append(shared)
                source = shared
            except FileNotFoundError:
                pass
            except UnsafeFile as refusal:
                captured.refused.append(refusal)
                source = None
            setattr(captured, stream, source)
    return captured


def local_path_problems(log_dir: Path, targets: LogTargets, log: Callable[[str], None]) -> list[str]:
    """Whether the wrapper could append the streams to their local paths (it leaves
    ``.<stream>-path-error`` when it could not): problems to report, never silence."""
    problems: list[str] = []
    for stream, path in (("stdout", targets.stdout_path), ("stderr", targets.stderr_path)):
        if not path:
            continue
        reason = None
        try:
            with SharedVolume(str(log_dir)) as volume:
                marker = volume.open(f".{stream}-path-error", max_bytes=4096)
                try:
                    reason = b"".join(marker.chunks()).decode("utf-8", "replace").strip() or "unknown reason"
                finally:
                    marker.close()
        except FileNotFoundError:
            log(f"{stream} also written to {path} in the task container")
        except (OSError, UnsafeFile) as exc:
            reason = f"its error marker could not be read ({exc})"
        if reason is not None:
            problems.append(f"{stream} was not written to the local path {path!r}: {reason}")
            log(problems[-1])
    return problems


def _limit(env: Mapping[str, str], name: str, default: int) -> int:
    try:
        value = int(env.get(name) or default)
    except ValueError:
        return default
    return value if value > 0 else default


def finish_task_io(
    env: Mapping[str, str] | None = None,
    *,
    exit_code: int | None,
    combined_output: Callable[[], Iterable[bytes]] | None = None,
    s3: S3Client | None = None,
    activity_log: ActivityLog | None = None,
) -> TaskIOResult:
    """The sidecar's one call after the task container terminated (before SetTaskStatus).

    * exit 0 and a staging plan: upload the outputs; a failure is ``result.error``
      (report FAILED with it instead of FINISHED);
    * always, when the activity names S3 paths or has a pipelineLogUri: upload stdout,
      stderr and the activity log; failures are ``result.problems``.

    ``combined_output`` (the container's log from the Kubernetes API) is used for stdout
    only when the wrapper could not capture the streams separately.
    """
    env = os.environ if env is None else env
    result = TaskIOResult()
    log = activity_log or ActivityLog()
    targets = LogTargets.from_env(env)
    try:
        plan = load_plan(env)
    except TaskError as error:
        plan, result.error = None, error
    if plan is None and not targets.wanted and result.error is None:
        return result
    own_client = s3 is None
    client = s3 if s3 is not None else S3Client(env=env)
    try:
        log(
            "task container did not run"
            if exit_code is None
            else f"task container exited with code {exit_code}"
        )
        if plan is not None and plan.outputs and exit_code == 0:
            try:
                result.uploaded = stage_out(
                    plan,
                    client,
                    log=log,
                    root=env.get("DPTR_STAGING_ROOT") or STAGING_ROOT,
                    max_bytes=_limit(env, "DPTR_MAX_OUTPUT_BYTES", DEFAULT_MAX_OUTPUT_BYTES),
                )
            except TaskError as error:
                result.error = error
                log(f"staging out failed: {error.error_id}: {error.message}")
        elif plan is not None and plan.outputs:
            log("outputs not uploaded: the command did not succeed")
        if targets.wanted:
            captured = capture_sources(
                Path(env.get("DPTR_LOG_DIR") or LOG_DIR),
                combined_output,
                max_bytes=_limit(env, "DPTR_MAX_LOG_BYTES", DEFAULT_MAX_LOG_BYTES),
            )
            result.problems += local_path_problems(Path(env.get("DPTR_LOG_DIR") or LOG_DIR), targets, log)
            try:
                for refusal in captured.refused:
                    note = f"not uploading {refusal}"
                    log(note)
                    result.problems.append(note)
                if captured.refused and result.error is None:
                    first = captured.refused[0]
                    result.error = TaskError(
                        f"dptr.LogUploadFailed.{first.reason}",
                        f"the task's captured output was tampered with: {first}; it was not uploaded",
                    )
                result.problems += upload_logs(
                    targets,
                    client,
                    stdout=captured.stdout,
                    stderr=captured.stderr,
                    activity_log=lambda: [log.text()],
                    skip=frozenset(Path(r.path).name for r in captured.refused),
                )
            finally:
                captured.close()
    finally:
        if own_client:
            client.close()
    return result
