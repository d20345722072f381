"""The stand-in's pure parts, without a cluster."""

from __future__ import annotations

import os
import signal
import time
from decimal import Decimal
from pathlib import Path

import pytest

from dptr_testbed.kubelet import spec
from dptr_testbed.kubelet.launch import ContainerProcess, LaunchSpec, Mount
from dptr_testbed.kubelet.logs import tail
from dptr_testbed.kubelet.pods import termination_message
from dptr_testbed.kubelet.volumes import write_atomic
from dptr_testbed.waiting import wait_for

POD = {
    "metadata": {
        "name": "p",
        "namespace": "ns",
        "uid": "u-1",
        "labels": {"b": "2", "a": 'say "x"'},
        "annotations": {"k": "v"},
    },
    "spec": {"nodeName": "node-1", "serviceAccountName": "sa"},
}


def test_expand_follows_kubelet_rules() -> None:
    env = {"A": "1", "B": "two"}
    assert spec.expand("$(A)-$(B)", env) == "1-two"
    assert spec.expand("$(MISSING)", env) == "$(MISSING)"
    assert spec.expand("$$(A) costs $$5", env) == "$(A) costs $5"
    assert spec.expand("no refs $A", env) == "no refs $A"


def test_field_refs() -> None:
    assert spec.field_ref(POD, "metadata.name") == "p"
    assert spec.field_ref(POD, "metadata.uid") == "u-1"
    assert spec.field_ref(POD, "spec.nodeName") == "node-1"
    assert spec.field_ref(POD, "status.podIP") == "127.0.0.1"
    assert spec.field_ref(POD, "metadata.labels['b']") == "2"
    assert spec.field_ref(POD, "metadata.annotations['k']") == "v"
    assert spec.field_ref(POD, "metadata.labels") == 'a="say \\"x\\""\nb="2"'
    with pytest.raises(ValueError):
        spec.field_ref(POD, "spec.nothing")


def test_quantities_and_resource_refs() -> None:
    assert spec.parse_quantity("500m") == Decimal("0.5")
    assert spec.parse_quantity("1Gi") == 2**30
    assert spec.parse_quantity("2k") == 2000
    container = {"resources": {"limits": {"cpu": "1500m", "memory": "64Mi"}, "requests": {"cpu": "250m"}}}
    assert spec.resource_field_ref(container, {"resource": "limits.cpu"}) == "2"  # rounded up
    assert spec.resource_field_ref(container, {"resource": "limits.cpu", "divisor": "1m"}) == "1500"
    assert spec.resource_field_ref(container, {"resource": "requests.cpu", "divisor": "1m"}) == "250"
    assert spec.resource_field_ref(container, {"resource": "limits.memory", "divisor": "1Mi"}) == "64"
    assert spec.resource_field_ref({}, {"resource": "limits.cpu"}) == spec.NODE_CPU


def test_grace_period_prefers_the_deletion_grace() -> None:
    pod = {"metadata": {"deletionGracePeriodSeconds": 2}, "spec": {"terminationGracePeriodSeconds": 30}}
    assert spec.grace_period(pod) == 2
    assert spec.grace_period({"metadata": {}, "spec": {}}) == 30


def test_tail_and_limit() -> None:
    data = b"a\nb\nc\n"
    assert tail(data, 2, None) == b"b\nc\n"
    assert tail(data, 0, None) == b""
    assert tail(data, None, 3) == b"a\nb"


def test_termination_message_rules(tmp_path: Path) -> None:
    term, logf = tmp_path / "term", tmp_path / "log"
    logf.write_bytes(b"".join(b"line%d\n" % i for i in range(200)))
    term.write_bytes(b"")
    assert termination_message(term, logf, "File", 1) == ""
    assert termination_message(term, logf, "FallbackToLogsOnError", 0) == ""
    fallback = termination_message(term, logf, "FallbackToLogsOnError", 1)
    assert fallback.splitlines() == [f"line{i}" for i in range(120, 200)]
    term.write_bytes(b"x" * 5000)
    assert termination_message(term, logf, "FallbackToLogsOnError", 1) == "x" * 4096


def test_atomic_writer_layout(tmp_path: Path) -> None:
    target = tmp_path / "vol"
    write_atomic(target, {"token": (b"t1", 0o644), "dir/ca.crt": (b"ca", 0o600)})
    assert (target / "token").read_bytes() == b"t1"
    assert os.readlink(target / "token") == "..data/token"
    assert (target / "dir" / "ca.crt").read_bytes() == b"ca"
    first = os.readlink(target / "..data")
    write_atomic(target, {"token": (b"t2", 0o644)})
    assert (target / "token").read_bytes() == b"t2"
    assert not (target / "dir").exists()
    assert not (target / first).exists()


@pytest.fixture
def root() -> None:
    # The stand-in's containers get their own namespaces, which takes root. The
    # bed always runs as root (CI included): without it these fail, not skip.
    assert os.geteuid() == 0, "the kubelet stand-in needs root for container namespaces"


def _run(tmp_path: Path, argv: list[str], **kw: object) -> tuple[ContainerProcess, str]:
    ls = LaunchSpec(
        argv=argv,
        env={"PATH": "/usr/bin:/bin"},
        scratch=tmp_path / "scratch",
        log=tmp_path / "c.log",
        termination_log=tmp_path / "term",
        **kw,  # type: ignore[arg-type]
    )
    ls.termination_log.write_bytes(b"")
    proc = ContainerProcess(ls)
    proc.popen.wait(20)
    return proc, ls.log.read_text()


@pytest.mark.usefixtures("root")
def test_a_container_sees_only_its_mounts_and_its_own_dev(tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "f").write_text("data")
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "key").write_text("k")
    target = tmp_path / "target"  # created as a mount point; inside tmp_path to leave the host alone
    script = (
        f"cat {target}/f; echo; (echo x > {target}/g) 2>/dev/null || echo ro; "
        f"ls {hidden} | wc -l; hostname; echo msg > /dev/termination-log; exit 3"
    )
    proc, out = _run(
        tmp_path,
        ["sh", "-c", script],
        mounts=[Mount(vol, str(target), read_only=True)],
        hide=[hidden],
        hostname="unit",
    )
    assert proc.outcome() == (3, None, None)
    assert out == "data\nro\n0\nunit\n"
    assert (tmp_path / "term").read_text() == "msg\n"


@pytest.mark.usefixtures("root")
def test_exit_status_and_start_errors(tmp_path: Path) -> None:
    proc, _ = _run(tmp_path, ["no-such-command-dptr"])
    code, sig, message = proc.outcome()
    assert (code, sig) == (128, None)
    assert message is not None and "executable file not found" in message


@pytest.mark.usefixtures("root")
def test_pid_1_ignores_sigterm_without_a_handler_and_dies_to_sigkill(tmp_path: Path) -> None:
    ls = LaunchSpec(
        argv=["sleep", "30"],
        env={"PATH": "/usr/bin:/bin"},
        scratch=tmp_path / "s",
        log=tmp_path / "log",
        termination_log=tmp_path / "t",
    )
    ls.termination_log.write_bytes(b"")
    proc = ContainerProcess(ls)
    wait_for(proc.exec_done, timeout=10, interval=0.05, what="the container's exec")
    assert proc.signal(signal.SIGTERM)
    time.sleep(0.5)
    assert proc.poll() is None
    proc.signal(signal.SIGKILL)
    proc.popen.wait(10)
    assert proc.outcome() == (137, 9, None)


@pytest.mark.usefixtures("root")
def test_a_volume_over_the_checkout_hides_neither_state_nor_programs(tmp_path: Path) -> None:
    """An emptyDir at a parent of the bed's state and of the image stand-in (a checkout
    under /tmp with an emptyDir at /tmp) keeps its sources, the termination log, the error
    file and the container's own programs reachable."""
    image = tmp_path / "image"
    image.mkdir()
    prog = image / "prog"
    prog.write_text("#!/bin/sh\necho from-image; echo done > /dev/termination-log\n")
    prog.chmod(0o755)
    empty = tmp_path / "empty"
    empty.mkdir()
    token = tmp_path / "token"
    token.mkdir()
    (token / "t").write_text("secret")
    proc, out = _run(
        tmp_path,
        ["sh", "-c", f"{prog}; cat {tmp_path}/token-mount/t; echo; touch {prog} 2>/dev/null || echo ro"],
        # Mounted over tmp_path itself: scratch, sources and the image all live below it.
        mounts=[Mount(empty, str(tmp_path)), Mount(token, str(tmp_path / "token-mount"))],
        image_paths=[image],
    )
    assert proc.outcome() == (0, None, None), out
    assert out == "from-image\nsecret\nro\n"
    assert (tmp_path / "term").read_text() == "done\n"
