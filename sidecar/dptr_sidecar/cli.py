"""``dptr-sidecar``: the task pod's sidecar (``run``, the default), and the init
containers' ``fetch-script`` and ``stage-in`` (both in :mod:`dptr_sidecar.staging`).

Imports stay lazy: ``fetch-script`` and ``stage-in`` never load the Kubernetes client,
and nothing loads boto3, kopf or the ``kubernetes`` package (the idle sidecar must stay
under 60 MB).
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import sys
import threading

from dptr_common.awsauth import AssumedRole
from dptr_common.datapipeline import DataPipelineClient

from .config import ConfigError, SidecarConfig

USAGE = """usage: dptr-sidecar [run | fetch-script | stage-in | check-exists]

  run           (default) heartbeat the task, honour cancels, upload staged outputs and
                logs, report the task's exit
  fetch-script  download $DPTR_SCRIPT_URI (s3://bucket/key) to $DPTR_SCRIPT_PATH, mode 0755
  stage-in      download the inputs of $DPTR_STAGING_PLAN into $DPTR_STAGING_ROOT/inputN
                and create the output directories
  check-exists  the Exists precondition: check $DPTR_EXISTS_URI every
                $DPTR_CHECK_RETRY_DELAY seconds until it exists or the deadline passes

Configured through environment variables only; see docs/sidecar.md.
"""


def _setup_logging() -> None:
    from dptr_common import logformat

    # The pod's own attempt, on every line (the operator passes DPTR_LOG_FORMAT on).
    logformat.configure(
        os.environ.get("DPTR_LOG_LEVEL", "INFO"),
        os.environ.get("DPTR_LOG_FORMAT", "text"),
        static={
            "taskrunner": f"{namespace}/{runner}"
            if (namespace := os.environ.get("POD_NAMESPACE"))
            and (runner := os.environ.get("DPTR_TASKRUNNER"))
            else "",
            "pipeline": os.environ.get("DPTR_PIPELINE_ID", ""),
            "attempt": os.environ.get("DPTR_ATTEMPT_ID", ""),
            "task": os.environ.get("DPTR_PIPELINETASK", ""),
        },
    )
    # botocore logs credentials lookups and retries at INFO/DEBUG; keep it quiet.
    logging.getLogger("botocore").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def run() -> int:
    # Lazy: fetch-script and stage-in never load the Kubernetes client (.sidecar does too).
    from dptr_common.kube import KubeClient

    from .sidecar import Sidecar

    sigterm = threading.Event()

    def on_sigterm(signum: int, _frame: object) -> None:
        # Keep going: the task container's final status may not be visible yet.
        sigterm.set()

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, on_sigterm)
    try:
        config = SidecarConfig.from_env()
    except ConfigError as exc:
        print(f"dptr-sidecar: {exc}", file=sys.stderr)
        return 2

    def make_dp() -> DataPipelineClient:
        return DataPipelineClient(
            config.region,
            config.endpoint_url,
            role=AssumedRole.from_env(os.environ),
            max_pool_connections=2,
        )

    kube = KubeClient.from_env(timeout=20.0)
    kube.config.namespace = config.namespace
    sidecar = Sidecar(config, kube, make_dp, sigterm=sigterm)
    try:
        return sidecar.run()
    finally:
        _log_usage()


def _log_usage() -> None:
    # What the sidecar cost its pod, in its own words: a cgroup reading cannot be had
    # once the container is gone, and operators size the sidecar's requests from this.
    usage = resource.getrusage(resource.RUSAGE_SELF)
    logging.getLogger("dptr.sidecar").info(
        "exiting: peak RSS %.1f MiB, CPU %.2fs user + %.2fs system",
        usage.ru_maxrss / 1024,  # KiB on Linux
        usage.ru_utime,
        usage.ru_stime,
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else "run"
    if command in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    _setup_logging()
    if command == "run":
        return run()
    if command == "fetch-script":
        # Lazy: .staging loads pydantic (about 11 MB), which ``run`` never needs.
        from .staging import fetch_script_main

        return fetch_script_main(args[1:])
    if command == "stage-in":
        # Lazy, as for fetch-script.
        from .staging import stage_in_main

        return stage_in_main(args[1:])
    if command == "check-exists":
        from .preconditions import check_exists_main

        return check_exists_main(args[1:])
    print(f"dptr-sidecar: unknown command {command!r}\n{USAGE}", file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    sys.exit(main())
