"""dptr_sidecar.safefs: what a task can plant in a shared volume, on a real filesystem."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from dptr_common.errors import TaskError
from dptr_common.staging_plan import StagedNode, StagingPlan
from dptr_sidecar.logs import capture_sources
from dptr_sidecar.safefs import SharedVolume, UnsafeFile
from dptr_sidecar.staging import stage_out


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    root = tmp_path / "vol"
    root.mkdir()
    return root


def _refusal(root: Path, relative: str, **kw: Any) -> str:
    with SharedVolume(str(root)) as vol, pytest.raises(UnsafeFile) as info:
        vol.open(relative, **kw).close()
    return info.value.reason


def test_regular_files_are_read_exactly(volume: Path) -> None:
    (volume / "out").mkdir()
    (volume / "out" / "a").write_bytes(b"hello")
    with SharedVolume(str(volume)) as vol, vol.open("out/a") as shared:
        assert shared.size == 5
        assert b"".join(shared.chunks(2)) == b"hello"
        assert b"".join(shared.chunks()) == b"hello"  # again, from the start
        assert shared.reader().read() == b"hello"


@pytest.mark.parametrize(
    "target", ["/proc/self/environ", "/dev/zero", "/etc/hostname", "..", "../..", "/var/run/secrets"]
)
def test_a_link_is_refused_wherever_it_points(volume: Path, target: str) -> None:
    (volume / "stdout").symlink_to(target)
    assert _refusal(volume, "stdout") == "Symlink"


def test_a_linked_directory_on_the_way_is_refused(volume: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret-dir"
    secret.mkdir()
    (secret / "token").write_text("sa-token")
    (volume / "output1").symlink_to(secret)
    assert _refusal(volume, "output1/token") == "Symlink"
    with SharedVolume(str(volume)) as vol, pytest.raises(UnsafeFile) as info:
        vol.files("output1")
    assert info.value.reason == "Symlink"


def test_a_fifo_is_refused_without_waiting_for_a_writer(volume: Path) -> None:
    os.mkfifo(volume / "stdout")
    done: list[str] = []
    worker = threading.Thread(target=lambda: done.append(_refusal(volume, "stdout")), daemon=True)
    worker.start()
    worker.join(5)
    assert done == ["NotRegularFile"], "opening a FIFO must not block"


def test_a_huge_sparse_file_is_refused_before_a_byte_is_read(volume: Path) -> None:
    with (volume / "huge").open("wb") as handle:
        handle.truncate(2**40)  # 1 TiB of holes
    assert _refusal(volume, "huge", max_bytes=5 * 1024**3) == "TooLarge"


def test_only_the_size_at_open_is_read(volume: Path) -> None:
    path = volume / "grows"
    path.write_bytes(b"abc")
    with SharedVolume(str(volume)) as vol, vol.open("grows") as shared:
        with path.open("ab") as more:
            more.write(b"def")
        assert b"".join(shared.chunks()) == b"abc"


def test_paths_that_leave_the_volume_are_refused(volume: Path) -> None:
    for relative in ("../x", "/etc/passwd", "a/../../b"):
        assert _refusal(volume, relative) == "OutsideVolume"


def test_a_walk_refuses_links_and_special_files_anywhere_below(volume: Path) -> None:
    out = volume / "output1"
    (out / "nested").mkdir(parents=True)
    (out / "a").write_bytes(b"1")
    (out / "nested" / "b").write_bytes(b"22")
    with SharedVolume(str(volume)) as vol:
        assert vol.files("output1") == [("a", 1), ("nested/b", 2)]
    (out / "nested" / "up").symlink_to("../..")
    with SharedVolume(str(volume)) as vol, pytest.raises(UnsafeFile) as info:
        vol.files("output1")
    assert info.value.reason == "Symlink" and info.value.path.endswith("nested/up")
    (out / "nested" / "up").unlink()
    os.mkfifo(out / "pipe")
    with SharedVolume(str(volume)) as vol, pytest.raises(UnsafeFile) as info:
        vol.files("output1")
    assert info.value.reason == "NotRegularFile"


class _NoS3:
    """An S3 client that must not be used: the refusal comes before any upload."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"S3 was called ({name}) for outputs that should have been refused")


def _plan(root: Path) -> StagingPlan:
    node = StagedNode("output", 1, "Out", f"{root}/output1", uri="s3://b/out", kind="directory")
    return StagingPlan("df-1", (node,))


def test_stage_out_refuses_a_huge_sparse_output_with_the_default_cap(volume: Path) -> None:
    (volume / "output1").mkdir()
    (volume / "output1" / "ok").write_bytes(b"fine")
    with (volume / "output1" / "huge").open("wb") as handle:
        handle.truncate(2**40)
    with pytest.raises(TaskError) as info:
        stage_out(_plan(volume), _NoS3(), root=str(volume), log=lambda _: None)  # type: ignore[arg-type]
    assert info.value.error_id == "dptr.StagingFailed.TooLarge"


def test_stage_out_refuses_an_output_directory_linked_elsewhere(volume: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "token-dir"
    elsewhere.mkdir()
    (elsewhere / "token").write_text("sa-token")
    (volume / "output1").symlink_to(elsewhere)
    with pytest.raises(TaskError) as info:
        stage_out(_plan(volume), _NoS3(), root=str(volume), log=lambda _: None)  # type: ignore[arg-type]
    assert info.value.error_id == "dptr.StagingFailed.Symlink"
    assert "OUTPUT1_STAGING_DIR" in info.value.message


def test_captured_logs_that_were_tampered_with_are_refused(volume: Path) -> None:
    (volume / "stdout").symlink_to("/proc/self/environ")
    os.mkfifo(volume / "stderr")
    captured = capture_sources(volume)
    try:
        assert captured.stdout is None and captured.stderr is None
        assert sorted(r.reason for r in captured.refused) == ["NotRegularFile", "Symlink"]
    finally:
        captured.close()
