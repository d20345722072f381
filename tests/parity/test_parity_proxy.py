"""A proxy for every AWS call of dptr's, end to end, with a real proxy server.

A firewalled cluster reaches AWS only through an HTTP(S) proxy.  Here tinyproxy (Debian's
package) runs on loopback in a mount namespace of its own whose /etc/hosts alone resolves
``dp.dptr-proxied.invalid`` and ``localhost-s3.dptr-proxied.invalid`` to the local Data Pipeline
service and moto's S3 (``.invalid`` never resolves anywhere else, RFC 6761).  So the
operator, the sidecar, the script fetcher and stage-in can reach them only through the
proxy, as configured by the operator's own HTTP_PROXY (what the Helm chart's ``proxy``
values set).  The proxy's access log then names every host it served.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from parity_helpers import WORKER_GROUP, keys_under, outcomes, read_gzip_object, read_object

from dptr_datapipeline import LocalDataPipeline
from dptr_testbed.controlplane import RunningTestbed
from dptr_testbed.installs import sidecar_rbac

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))
from op_helpers import QUIET_GRACES, Cluster, OperatorProcess

from dptr_testbed.waiting import wait_for

pytestmark = pytest.mark.cluster

DP_HOST = "dp.dptr-proxied.invalid"
# moto's server takes path-style buckets for hosts starting with "localhost" (its
# subdomain_based_buckets); any other dotted name would read as bucket.host.
S3_HOST = "localhost-s3.dptr-proxied.invalid"


@dataclass
class Proxy:
    url: str
    log: Path

    def requests(self) -> list[str]:
        """The request lines tinyproxy logged (``GET http://host:port/path HTTP/1.1``)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [line.split("): ", 1)[1] for line in text.splitlines() if "Request (file descriptor" in line]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    tinyproxy = shutil.which("tinyproxy")
    if tinyproxy is None:
        pytest.fail(
            "tinyproxy is not installed: `dptr-testbed node-prereqs --install` installs it (Debian tinyproxy)"
        )
    state = Path(tempfile.mkdtemp(prefix="dptr-proxy-"))
    port = _free_port()
    (state / "hosts").write_text(f"127.0.0.1 localhost\n127.0.0.1 {DP_HOST}\n127.0.0.1 {S3_HOST}\n")
    (state / "tinyproxy.conf").write_text(
        f"Port {port}\nListen 127.0.0.1\nTimeout 600\nMaxClients 200\nAllow 127.0.0.1\n"
        f'LogFile "{state / "access.log"}"\nLogLevel Info\n'
    )
    proc = subprocess.Popen(
        [
            "unshare",
            "--mount",
            "sh",
            "-c",
            'mount --bind "$1" /etc/hosts && exec "$2" -d -c "$3"',
            "dptr-proxy",
            str(state / "hosts"),
            tinyproxy,
            str(state / "tinyproxy.conf"),
        ],
        stdout=(state / "tinyproxy.out").open("wb"),
        stderr=subprocess.STDOUT,
    )

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_for(listening, timeout=15, what="tinyproxy listening")
        yield Proxy(f"http://127.0.0.1:{port}", state / "access.log")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(state, ignore_errors=True)


def test_a_staged_task_with_logs_runs_with_aws_reachable_only_through_the_proxy(
    crds: RunningTestbed,
    namespace: str,
    datapipeline: LocalDataPipeline,
    s3_endpoint: str,
    s3_raw: Any,
    s3_bucket: str,
    proxy: Proxy,
    tmp_path: Path,
) -> None:
    dp_port, s3_port = urlsplit(datapipeline.endpoint_url).port, urlsplit(s3_endpoint).port
    dp_url, s3_url = f"http://{DP_HOST}:{dp_port}", f"http://{S3_HOST}:{s3_port}"
    # Nobody reaches them directly: the names resolve only inside the proxy.
    with pytest.raises(OSError):
        socket.getaddrinfo(DP_HOST, dp_port)
    cluster = Cluster(crds, namespace)
    for obj in sidecar_rbac(namespace):
        cluster.apply(obj)
    extra = [*QUIET_GRACES, "--sidecar-report-grace-seconds", "6000"]
    op = OperatorProcess(crds, namespace, tmp_path, extra, env={"HTTP_PROXY": proxy.url}).start()
    try:
        cluster.create_runner(
            datapipeline,
            WORKER_GROUP,
            endpoint=False,
            endpointUrl=dp_url,
            s3EndpointUrl=s3_url,
            jobTemplate={"image": "debian:bookworm"},
        )
        s3_raw.put_object(Bucket=s3_bucket, Key="input/data.txt", Body=b"through the proxy\n")
        s3_raw.put_object(
            Bucket=s3_bucket, Key="scripts/upper.sh", Body=b'#!/bin/sh\ntr a-z A-Z < "$1" > "$2"\n'
        )
        pipeline_id = datapipeline.run_pipeline(
            {
                "Default": {"pipelineLogUri": f"s3://{s3_bucket}/logs/"},
                "In": {"type": "S3DataNode", "filePath": f"s3://{s3_bucket}/input/data.txt"},
                "Out": {"type": "S3DataNode", "directoryPath": f"s3://{s3_bucket}/output"},
                "Upper": {
                    "type": "ShellCommandActivity",
                    "scriptUri": f"s3://{s3_bucket}/scripts/upper.sh",
                    "scriptArgument": ["${INPUT1_STAGING_DIR}/data.txt", "${OUTPUT1_STAGING_DIR}/upper.txt"],
                    "stage": "true",
                    "input": {"ref": "In"},
                    "output": {"ref": "Out"},
                    "maximumRetries": "0",
                },
            },
            worker_group=WORKER_GROUP,
        )
        record = outcomes(datapipeline, "Upper", timeout=120)["Upper"]
        assert record.outcome == "FINISHED", record.error_message
        assert read_object(s3_raw, s3_bucket, "output/upper.txt") == b"THROUGH THE PROXY\n"
        prefix = f"logs/{pipeline_id}/Upper/{record.instance_id}/{record.attempt_id}/"
        assert read_gzip_object(s3_raw, s3_bucket, prefix + "StdOutput.gz") == b""
        assert prefix + "Activity.log.gz" in keys_under(s3_raw, s3_bucket, "logs/")
        (task,) = wait_for(
            lambda: [t for t in cluster.tasks() if t["status"].get("report", {}).get("reportedAt")],
            timeout=30,
            what="the report recorded on the PipelineTask",
        )
        # The sidecar reported, so its SetTaskStatus went through the proxy: there was no
        # other way to the service.
        assert task["status"]["report"]["reportedBy"].startswith("sidecar/")
        requests = proxy.requests()
        s3_paths = [r for r in requests if f"//{S3_HOST}:{s3_port}/" in r]
        assert any(r.startswith("GET ") and "scripts/upper.sh" in r for r in s3_paths), s3_paths  # fetcher
        assert any(r.startswith("GET ") and "input/data.txt" in r for r in s3_paths), s3_paths  # stage-in
        assert any(r.startswith("PUT ") and "output/upper.txt" in r for r in s3_paths), s3_paths  # sidecar
        assert any(r.startswith("PUT ") and "StdOutput.gz" in r for r in s3_paths), s3_paths  # sidecar
        dp_posts = [r for r in requests if r.startswith("POST ") and f"//{DP_HOST}:{dp_port}/" in r]
        calls = [
            c
            for c in datapipeline.ledger.calls
            if c.operation in ("PollForTask", "ReportTaskProgress", "SetTaskStatus")
        ]
        assert len(dp_posts) >= len(calls) > 0, (len(dp_posts), len(calls))
        datapipeline.assert_clean()
    finally:
        op.stop()
        sys.stdout.write(f"\n----- operator log -----\n{op.logs()[-6000:]}\n")
