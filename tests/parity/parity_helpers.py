"""Helpers shared by the parity tests."""

from __future__ import annotations

import gzip
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dptr_testbed.kubelet.spec import expand
from dptr_testbed.waiting import wait_for

#: The worker group of the parity_runner fixture's TaskRunner.
WORKER_GROUP = "wg-parity-e2e"


def outcomes(dp: Any, *object_ids: str, timeout: float = 60.0) -> dict[str, Any]:
    """The (last) attempt record of each object once it has its outcome."""

    def done() -> dict[str, Any] | None:
        records = {r.object_id: r for r in dp.ledger.attempts.values() if r.object_id in object_ids}
        if set(records) == set(object_ids) and all(r.outcome for r in records.values()):
            return records
        return None

    records: dict[str, Any] = wait_for(done, timeout=timeout, interval=0.2, what=f"outcomes of {object_ids}")
    return records


def read_object(s3_raw: Any, bucket: str, key: str) -> bytes:
    body: bytes = s3_raw.get_object(Bucket=bucket, Key=key)["Body"].read()
    return body


def keys_under(s3_raw: Any, bucket: str, prefix: str = "") -> list[str]:
    pages = s3_raw.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def read_gzip_object(s3_raw: Any, bucket: str, key: str) -> bytes:
    return gzip.decompress(read_object(s3_raw, bucket, key))


@dataclass(frozen=True)
class ParityS3:
    """moto's S3 as a parity test sees it (the ``parity_s3`` fixture): the endpoint a
    TaskRunner names, the environment of a dptr process that talks to it, a plain boto3
    client for arranging and checking objects, and the test's own bucket."""

    endpoint: str
    env: dict[str, str]
    raw: Any
    bucket: str

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}"

    def put(self, key: str, body: bytes) -> None:
        self.raw.put_object(Bucket=self.bucket, Key=key, Body=body)

    def read(self, key: str) -> bytes:
        return read_object(self.raw, self.bucket, key)

    def read_gzip(self, key: str) -> bytes:
        return read_gzip_object(self.raw, self.bucket, key)

    def keys(self, prefix: str = "") -> list[str]:
        return keys_under(self.raw, self.bucket, prefix)


# --------------------------------------------------------------------------- a pod, run locally


#: How each of our containers' commands runs here (cli.py dispatch is wired separately).
_OUR_COMMANDS = {
    ("dptr-sidecar", "stage-in"): "from dptr_sidecar.staging import stage_in_main as m",
    ("dptr-sidecar", "fetch-script"): "from dptr_sidecar.staging import fetch_script_main as m",
}


@dataclass
class LocalPod:
    """What running a rendered Job's pod locally produced."""

    root: Path
    init_exit: dict[str, int] = field(default_factory=dict)
    termination_messages: dict[str, str] = field(default_factory=dict)
    task_exit: int | None = None
    task_stdout: bytes = b""
    task_stderr: bytes = b""
    sidecar_env: dict[str, str] = field(default_factory=dict)


def _remap(value: str, mounts: dict[str, Path]) -> str:
    """Mount paths -> local directories, in one pass (a local path may contain a mount path)."""
    if not mounts:
        return value
    pattern = "|".join(re.escape(p) for p in sorted(mounts, key=len, reverse=True))
    return re.sub(pattern, lambda m: str(mounts[m.group(0)]), value)


def _container_env(
    container: dict[str, Any], base: dict[str, str], secrets: dict[str, str], mounts: dict[str, Path]
) -> dict[str, str]:
    env = dict(base)
    for entry in container.get("env", []):
        if "value" in entry:  # kubelet's $(VAR) expansion first, as on a node
            env[entry["name"]] = _remap(expand(entry["value"], env), mounts)
        elif "secretKeyRef" in entry.get("valueFrom", {}):
            env[entry["name"]] = secrets[entry["valueFrom"]["secretKeyRef"]["key"]]
    return env


def run_pod_locally(
    job: dict[str, Any], root: Path, base_env: dict[str, str], secrets: dict[str, str]
) -> LocalPod:
    """A minimal kubelet stand-in for one pod: emptyDirs are directories under ``root``,
    init containers (except the native sidecar) run in order, then the task container;
    mount paths in env and argv are remapped to the local directories.  The sidecar's
    environment is returned for the caller to run the sidecar's after-exit step."""
    pod = job["spec"]["template"]["spec"]
    result = LocalPod(root=root)
    volumes = {v["name"]: root / v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
    for path in volumes.values():
        path.mkdir(parents=True, exist_ok=True)

    def mounts_of(container: dict[str, Any]) -> dict[str, Path]:
        return {
            m["mountPath"]: volumes[m["name"]]
            for m in container.get("volumeMounts", [])
            if m["name"] in volumes
        }

    for container in pod.get("initContainers", []):
        mounts = mounts_of(container)
        env = _container_env(container, base_env, secrets, mounts)
        if container.get("restartPolicy") == "Always":
            result.sidecar_env = env
            continue
        termination = root / f"{container['name']}.termination-log"
        env["DPTR_TERMINATION_LOG"] = str(termination)
        code = _OUR_COMMANDS[tuple(expand(a, env) for a in container["command"])]
        proc = subprocess.run(
            [sys.executable, "-c", f"import sys; {code}; sys.exit(m())"], env=env, check=False
        )
        result.init_exit[container["name"]] = proc.returncode
        if termination.exists():
            result.termination_messages[container["name"]] = termination.read_text()
        if proc.returncode != 0:
            return result
    main = pod["containers"][0]
    mounts = mounts_of(main)
    env = _container_env(main, base_env, secrets, mounts)
    argv = [_remap(expand(a, env), mounts) for a in main["command"]]
    proc = subprocess.run(argv, env=env, capture_output=True, check=False, cwd=root)
    result.task_exit, result.task_stdout, result.task_stderr = proc.returncode, proc.stdout, proc.stderr
    return result
