"""dptr's one version, and the image references that carry it.

The version is pyproject.toml's, as the installed distribution reports it; the chart's
``version`` and ``appVersion`` are the same string (``scripts/set-version.py`` changes all
three, and ``tests/unit/test_version.py`` fails when they drift), and every image is
tagged with it.  The operator's ``--sidecar-image`` and ``--activity-image`` defaults are
the images the chart deploys for that version, so an operator run without the chart
(``manifests/``, or out of cluster) starts the same task pods.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _distribution_version

__all__ = ["ACTIVITY_IMAGE", "OPERATOR_IMAGE", "REGISTRY", "SIDECAR_IMAGE", "VERSION"]


def _version() -> str:
    try:
        return _distribution_version("dptr")
    except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
        return "0.0.0+unknown"


VERSION = _version()
#: Where the release workflow pushes the images (the chart's ``*.image.repository`` defaults).
REGISTRY = "ghcr.io/dptr-dev"
OPERATOR_IMAGE = f"{REGISTRY}/dptr-operator:{VERSION}"
SIDECAR_IMAGE = f"{REGISTRY}/dptr-sidecar:{VERSION}"
ACTIVITY_IMAGE = f"{REGISTRY}/dptr-activity:{VERSION}"
