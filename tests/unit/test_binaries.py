"""The build recipe for the test bed's binaries (pure parts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dptr_testbed import binaries


def test_ldflags_carry_the_real_version_for_both_version_packages() -> None:
    flags = binaries.kubernetes_ldflags("v1.34.4")
    for pkg in ("k8s.io/client-go/pkg/version", "k8s.io/component-base/version"):
        assert f"-X {pkg}.gitVersion=v1.34.4" in flags
        assert f"-X {pkg}.gitMajor=1" in flags
        assert f"-X {pkg}.gitMinor=34" in flags


def test_ldflags_refuse_a_non_release_version() -> None:
    with pytest.raises(ValueError, match="not a Kubernetes release"):
        binaries.kubernetes_ldflags("master")


def test_cache_is_keyed_by_every_pinned_version(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DPTR_CACHE_DIR", str(tmp_path))
    path = binaries.bin_dir()
    assert path.parent == tmp_path / "bin"
    for version in (binaries.KUBERNETES_VERSION, binaries.ETCD_VERSION, binaries.HELM_VERSION):
        assert version in path.name
