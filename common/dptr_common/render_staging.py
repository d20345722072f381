"""Add staging and S3 logs to a rendered Job (pure: Job dict in, new Job dict out).

``render_job`` builds the pod; :func:`render_staging` adds what Task Runner parity needs
(docs/task-runner-parity.md):

``stage: true`` with S3 data nodes
    * an emptyDir ``dptr-staging`` at :data:`~dptr_common.staging_plan.STAGING_ROOT`;
    * an init container ``dptr-stage-in`` (``dptr-sidecar stage-in``, the sidecar image)
      after ``dptr-fetch-script``: it downloads the inputs and creates the output
      directories.  It gets S3 credentials, and the Data Pipeline endpoint only when a
      data node must be looked up with DescribeObjects;
    * the task container gets ``INPUTn_STAGING_DIR`` / ``OUTPUTn_STAGING_DIR`` in its
      environment (the shell expands ``${INPUT1_STAGING_DIR}`` in ``command``) and the
      volume read-write; ``scriptArgument`` values get the references substituted;
    * the sidecar mounts the volume read-only and uploads the outputs after exit 0;
    * stage-in writes the resolved plan into ``dptr-plan`` (``/dptr/plan``), which only
      it and the sidecar mount: the task can rewrite nothing the sidecar trusts.
``stdout`` / ``stderr`` S3 paths, or a ``pipelineLogUri``
    * an emptyDir ``dptr-logs`` at ``/dptr/logs``;
    * the task's command runs under a POSIX ``sh`` wrapper that ``tee``s stdout and
      stderr into it (``kubectl logs`` is unchanged), forwards SIGTERM and exits with
      the command's status;
    * the sidecar mounts it read-only and gets the log destinations in its env.

The task container never gets an API token or S3 credentials from this function.
"""

from __future__ import annotations

import copy
from typing import Any

from dptr_common.models import TaskRunner
from dptr_common.podspec import (
    SIDECAR_CONTAINER,
    STAGE_IN_CONTAINER,
    TASK_CONTAINER,
    command,
    identity_env,
    set_env,
)
from dptr_common.podspec import env as _env
from dptr_common.staging_plan import STAGING_ROOT, StagingPlan, plan_staging, substitute_staging_references
from dptr_common.task import Task, is_s3_path

__all__ = [
    "LOG_DIR",
    "LOG_VOLUME",
    "STAGE_IN_CONTAINER",
    "STAGING_VOLUME",
    "TEE_WRAPPER",
    "log_env",
    "render_staging",
]

STAGING_VOLUME = "dptr-staging"
#: stage-in hands the resolved plan to the sidecar here; the task does not mount it.
PLAN_VOLUME = "dptr-plan"
PLAN_DIR = "/dptr/plan"
LOG_VOLUME = "dptr-logs"
LOG_DIR = "/dptr/logs"
_WRAPPER_NAME = "dptr-capture"

#: Runs "$@" with stdout and stderr tee'd into $DPTR_LOG_DIR; POSIX sh, tee and mkfifo
#: only.  Without tee or mkfifo it runs the command uncaptured and leaves .nocapture.
TEE_WRAPPER = r"""d="${DPTR_LOG_DIR:-/dptr/logs}"
out= err=
# A local stdout/stderr path (DPTR_STDOUT_PATH, DPTR_STDERR_PATH) is appended to as well;
# one that cannot be written is named in .<stream>-path-error for the sidecar to report.
keep_path() {
  [ -n "$2" ] || return 0
  case "$2" in
    "$d"|"$d"/*) printf '%s\n' "$2 is inside dptr's own log directory" >"$d/.$1-path-error" ;;
    /*)
      # Only a regular file (or none yet): opening a FIFO would block the task forever.
      if [ -e "$2" ] && [ ! -f "$2" ]; then
        printf '%s\n' "$2 is not a regular file" >"$d/.$1-path-error"
      elif ( : >>"$2" ) 2>/dev/null; then
        eval "$1=\$2"
      else
        printf '%s\n' "cannot append to $2 in the task container" >"$d/.$1-path-error"
      fi ;;
    *) printf '%s\n' "$2 is not an absolute path" >"$d/.$1-path-error" ;;
  esac
}
stdout= stderr=
if command -v mkfifo >/dev/null 2>&1 && command -v tee >/dev/null 2>&1 \
  && mkfifo "$d/.stdout.fifo" "$d/.stderr.fifo" 2>/dev/null; then
  keep_path stdout "${DPTR_STDOUT_PATH:-}"
  keep_path stderr "${DPTR_STDERR_PATH:-}"
  tee -a "$d/stdout" ${stdout:+"$stdout"} <"$d/.stdout.fifo" &
  out=$!
  tee -a "$d/stderr" ${stderr:+"$stderr"} <"$d/.stderr.fifo" >&2 &
  err=$!
  "$@" >"$d/.stdout.fifo" 2>"$d/.stderr.fifo" &
else
  : >"$d/.nocapture" 2>/dev/null
  [ -z "${DPTR_STDOUT_PATH:-}" ] || printf '%s\n' "not written to $DPTR_STDOUT_PATH: the image has no tee or mkfifo" >"$d/.stdout-path-error"
  [ -z "${DPTR_STDERR_PATH:-}" ] || printf '%s\n' "not written to $DPTR_STDERR_PATH: the image has no tee or mkfifo" >"$d/.stderr-path-error"
  "$@" &
fi
child=$!
trap 'kill -TERM "$child" 2>/dev/null' TERM INT HUP
wait "$child"
rc=$?
while kill -0 "$child" 2>/dev/null; do wait "$child"; rc=$?; done
if [ -n "$out" ]; then wait "$out" "$err"; fi
exit "$rc"
"""


def _mount(container: dict[str, Any], volume: str, path: str, *, read_only: bool) -> None:
    mounts = [m for m in container.get("volumeMounts", []) if m.get("name") != volume]
    container["volumeMounts"] = [*mounts, {"name": volume, "mountPath": path, "readOnly": read_only}]


def local_log_paths(task: Task) -> dict[str, str]:
    """``DPTR_STDOUT_PATH`` / ``DPTR_STDERR_PATH``: the local stdout/stderr paths, if any."""
    values = {"DPTR_STDOUT_PATH": task.stdout, "DPTR_STDERR_PATH": task.stderr}
    return {k: v for k, v in values.items() if v and not is_s3_path(v)}


def log_env(task: Task) -> dict[str, str]:
    """The sidecar's log destinations (read back by ``dptr_sidecar.logs.LogTargets.from_env``)."""
    values = {
        "DPTR_PIPELINE_ID": task.pipeline_id,
        "DPTR_ATTEMPT_ID": task.attempt_id,
        "DPTR_COMPONENT_ID": task.component_id,
        "DPTR_INSTANCE_ID": task.instance_id,
        "DPTR_PIPELINE_LOG_URI": task.attempt.first("pipelineLogUri"),
        "DPTR_STDOUT_URI": task.stdout if is_s3_path(task.stdout) else None,
        "DPTR_STDERR_URI": task.stderr if is_s3_path(task.stderr) else None,
        **local_log_paths(task),
    }
    return {k: v for k, v in values.items() if v}


#: Types whose task container runs dptr's own code: their output is dptr's log (kubectl
#: logs, the errorStackTrace tail), not a user's stdout/stderr to capture and upload.
_OWN_CODE_TYPES = frozenset({"Exists", "SqlActivity", "CopyActivity"})


def _logs_wanted(task: Task) -> bool:
    if task.object_type in _OWN_CODE_TYPES:
        return False
    return bool(task.stdout or task.stderr or task.attempt.first("pipelineLogUri"))


def _stage_in_container(
    plan: StagingPlan, runner: TaskRunner, sidecar: dict[str, Any], s3_env: list[dict[str, Any]]
) -> dict[str, Any]:
    # The sidecar's AWS identity: its keys, and the TaskRunner's role to assume on top.
    credentials = identity_env(sidecar)
    env = [
        _env("DPTR_STAGING_PLAN", plan.to_json()),
        _env("DPTR_STAGING_ROOT", STAGING_ROOT),
        _env("DPTR_PLAN_DIR", PLAN_DIR),
        _env("DPTR_REGION", runner.spec.region),
        _env("AWS_REGION", runner.spec.region),
        *s3_env,
    ]
    if plan.unresolved and runner.spec.endpoint_url:
        env.append(_env("DPTR_ENDPOINT_URL", runner.spec.endpoint_url))
    env += credentials
    return {
        "name": STAGE_IN_CONTAINER,
        "image": sidecar["image"],
        "command": command(["dptr-sidecar", "stage-in"]),
        "env": env,
        # The sidecar's (the operator's --sidecar-resources): the same program.
        "resources": copy.deepcopy(sidecar.get("resources", {})),
        "securityContext": copy.deepcopy(sidecar.get("securityContext", {})),
        "volumeMounts": [
            {"name": STAGING_VOLUME, "mountPath": STAGING_ROOT, "readOnly": False},
            {"name": PLAN_VOLUME, "mountPath": PLAN_DIR, "readOnly": False},
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def render_staging(job: dict[str, Any], task: Task, runner: TaskRunner) -> dict[str, Any]:
    """``job`` (from ``render_job``) with staging and S3 log capture added where the task asks.

    Returns a new dict; ``job`` is not modified.  A task that asks for neither comes
    back equal to ``job``.  Raises TaskError ``dptr.StagingFailed.*`` for a data node
    that cannot be staged (nothing must be created then).
    """
    plan = plan_staging(task)
    plan = plan if plan is not None and plan.nodes else None
    wants_logs = _logs_wanted(task)
    job = copy.deepcopy(job)
    if plan is None and not wants_logs:
        return job
    pod = job["spec"]["template"]["spec"]
    inits: list[dict[str, Any]] = pod.setdefault("initContainers", [])
    sidecar = next(c for c in inits if c["name"] == SIDECAR_CONTAINER)
    main = next(c for c in pod["containers"] if c["name"] == TASK_CONTAINER)
    volumes: list[dict[str, Any]] = pod.setdefault("volumes", [])
    s3_env = [_env("AWS_ENDPOINT_URL_S3", runner.spec.s3_endpoint_url)] if runner.spec.s3_endpoint_url else []
    sidecar_env: list[dict[str, Any]] = [*s3_env]

    if plan is not None:
        volumes.append({"name": STAGING_VOLUME, "emptyDir": {}})
        volumes.append({"name": PLAN_VOLUME, "emptyDir": {"sizeLimit": "1Mi"}})
        inits.append(_stage_in_container(plan, runner, sidecar, s3_env))
        staging_env = plan.env()
        set_env(main, [_env(k, v) for k, v in staging_env.items()])
        _mount(main, STAGING_VOLUME, STAGING_ROOT, read_only=False)
        count = len(task.script_arguments)
        if count:
            # The arguments are rebuilt from the task, not edited in the escaped command.
            argv = list(main["command"])
            argv[-count:] = command(
                substitute_staging_references(a, staging_env) for a in task.script_arguments
            )
            main["command"] = argv
        _mount(sidecar, STAGING_VOLUME, STAGING_ROOT, read_only=True)
        _mount(sidecar, PLAN_VOLUME, PLAN_DIR, read_only=True)
        sidecar_env += [
            _env("DPTR_STAGING_PLAN", plan.to_json()),
            _env("DPTR_STAGING_ROOT", STAGING_ROOT),
            _env("DPTR_PLAN_DIR", PLAN_DIR),
            _env("DPTR_MAX_OUTPUT_BYTES", str(runner.spec.task_io.output_bytes)),
        ]

    if wants_logs:
        volumes.append({"name": LOG_VOLUME, "emptyDir": {}})
        main["command"] = [*command(["/bin/sh", "-c", TEE_WRAPPER, _WRAPPER_NAME]), *main["command"]]
        set_env(
            main, [_env("DPTR_LOG_DIR", LOG_DIR), *(_env(k, v) for k, v in local_log_paths(task).items())]
        )
        _mount(main, LOG_VOLUME, LOG_DIR, read_only=False)
        _mount(sidecar, LOG_VOLUME, LOG_DIR, read_only=True)
        sidecar_env += [
            _env("DPTR_LOG_DIR", LOG_DIR),
            _env("DPTR_MAX_LOG_BYTES", str(runner.spec.task_io.log_bytes)),
            *(_env(k, v) for k, v in log_env(task).items()),
        ]

    set_env(sidecar, sidecar_env)
    return job


def wants_task_io(job: dict[str, Any]) -> bool:
    """Whether :func:`render_staging` gave this Job staging or S3 log capture."""
    volumes = {v.get("name") for v in job["spec"]["template"]["spec"].get("volumes", [])}
    return bool(volumes & {STAGING_VOLUME, LOG_VOLUME})
