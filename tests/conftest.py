"""Suite-wide fixtures.

The test bed (a real control plane plus kubelet stand-ins) is expensive to
start, so one bed serves the whole run. Under pytest-xdist the first worker
to ask starts it as a detached ``dptr-testbed up`` process and the others
attach; the controller process stops it when the session ends. Tests that
break the bed on purpose (API server restarts, lost nodes) start their own.

moto's S3 in server mode on loopback (never AWS) serves the session too; every test
gets its own buckets (``s3_bucket``), so tests do not see each other's objects.

So do a PostgreSQL and a MariaDB server (``postgres``, ``mariadb``): Debian's, on
loopback, one of each per xdist worker, started when a test first asks.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dptr_datapipeline import LocalDataPipeline
from dptr_sidecar.s3 import S3Client
from dptr_testbed.controlplane import RunningTestbed
from dptr_testbed.databases import DatabaseServer, mariadb_server, postgres_server
from dptr_testbed.installs import install_crds, install_sidecar_admission_policy
from dptr_testbed.waiting import wait_for


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the item, so a fixture's teardown can tell a failed
    test (and print what explains it) from a passing one."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _shared_root(factory: pytest.TempPathFactory, config: pytest.Config) -> Path:
    base = factory.getbasetemp()
    # Workers get per-worker base temps below one per-run directory.
    return base.parent if hasattr(config, "workerinput") else base


def _bed_dir(config: pytest.Config, factory: pytest.TempPathFactory) -> Path:
    return _shared_root(factory, config) / "testbed"


@pytest.fixture(scope="session")
def testbed(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> RunningTestbed:
    state = _bed_dir(pytestconfig, tmp_path_factory)
    lock_path = state.parent / "testbed.lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (state / "testbed.json").exists():
            state.mkdir(parents=True, exist_ok=True)
            log = (state.parent / "testbed-up.log").open("ab")
            proc = subprocess.Popen(
                [sys.executable, "-m", "dptr_testbed.cli", "up", "--state-dir", str(state), "--nodes", "2"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            (state.parent / "testbed.pid").write_text(str(proc.pid))

            def started() -> bool:
                if proc.poll() is not None:  # not tolerated: fails at once, with the log
                    raise RuntimeError(
                        "the test bed failed to start:\n"
                        + (state.parent / "testbed-up.log").read_text()[-4000:]
                    )
                return (state / "testbed.json").exists()

            wait_for(started, timeout=300, interval=0.5, what="the test bed to start")
    return RunningTestbed.attach(state)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Only the controller (or a plain, non-xdist run) owns the bed's lifetime.
    if hasattr(session.config, "workerinput"):
        return
    factory = session.config._tmp_path_factory  # type: ignore[attr-defined]
    root = factory.getbasetemp()
    for pid_file in (root / "testbed.pid", *root.glob("*/testbed.pid")):
        if pid_file.exists():
            _stop(int(pid_file.read_text()))
            pid_file.unlink()


def _stop(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            # Reap it if this process started it, or kill(0) sees a zombie.
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            pass
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def namespace(testbed: RunningTestbed, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (without waiting)."""
    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + "-" + os.urandom(3).hex()
    name = "".join(ch if ch.isalnum() or ch == "-" else "-" for ch in name)
    testbed.kubectl("create", "namespace", name)
    yield name
    testbed.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def crds(testbed: RunningTestbed) -> RunningTestbed:
    """The dptr CRDs installed (idempotently: every xdist worker may apply them), with the
    chart's admission policy for the sidecar's account, so every sidecar in the suite
    works under it."""
    install_crds(testbed)
    install_sidecar_admission_policy(testbed)
    return testbed


@pytest.fixture
def datapipeline() -> Iterator[LocalDataPipeline]:
    """A fresh local Data Pipeline service per test, time-scaled 100x.

    At 0.01 the 2-minute ack deadline is 1.2 s and the default 15-minute
    reportProgressTimeout is 9 s. Tests end with ``datapipeline.assert_clean()``
    (one outcome per attempt, no protocol violation) unless they provoke a
    violation on purpose.
    """
    svc = LocalDataPipeline(time_scale=0.01)
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()


# --------------------------------------------------------------------------- S3 (moto)

ACCESS_KEY = "AKIDPARITYTEST"
SECRET_KEY = "parity-secret"
REGION = "us-east-1"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_endpoint: str, tmp_path: Any) -> dict[str, str]:
    """Environment for a dptr process that talks to the moto S3 (and nothing else)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "DPTR_"))
        and k not in {"HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"}
    }
    env.update(
        {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_ENDPOINT_URL_S3": s3_endpoint,
            "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
    )
    return env


@pytest.fixture
def s3(s3_env: dict[str, str]) -> Iterator[S3Client]:
    client = S3Client(env=s3_env, access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY)
    yield client
    client.close()


@pytest.fixture
def s3_raw(s3_endpoint: str) -> Any:
    """A plain boto3 S3 client for arranging and checking objects."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )


@pytest.fixture
def s3_bucket(s3_raw: Any) -> str:
    name = "t-" + uuid.uuid4().hex[:12]
    s3_raw.create_bucket(Bucket=name)
    return name


# --------------------------------------------------------------------------- databases


# No skip when a server cannot start: a test that needs a database fails (with the server's
# log), so a machine without the packages shows up red rather than quietly testing less.
@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DatabaseServer]:
    """A PostgreSQL server on loopback for this session (this xdist worker)."""
    with postgres_server(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture(scope="session")
def mariadb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DatabaseServer]:
    """A MariaDB server on loopback for this session (this xdist worker)."""
    with mariadb_server(tmp_path_factory.mktemp("mariadb")) as server:
        yield server
