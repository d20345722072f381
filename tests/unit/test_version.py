"""One version: pyproject.toml's is the chart's version and appVersion, and the operator's
default images are the ones the chart deploys for it."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

from dptr_common import version
from dptr_common.render import DEFAULT_ACTIVITY_IMAGE
from dptr_operator.config import parse_args

REPO = Path(__file__).resolve().parents[2]


def test_the_package_the_chart_and_the_installed_distribution_agree() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((REPO / "charts" / "dptr" / "Chart.yaml").read_text())
    assert chart["version"] == chart["appVersion"] == project
    assert version.VERSION == project, "reinstall the package (make setup) after set-version.py"


def test_the_operators_default_images_are_the_charts() -> None:
    values = yaml.safe_load((REPO / "charts" / "dptr" / "values.yaml").read_text())
    chart = yaml.safe_load((REPO / "charts" / "dptr" / "Chart.yaml").read_text())
    tag = chart["appVersion"]
    assert version.SIDECAR_IMAGE == f"{values['sidecar']['image']['repository']}:{tag}"
    assert version.ACTIVITY_IMAGE == f"{values['activity']['image']['repository']}:{tag}"
    assert version.OPERATOR_IMAGE == f"{values['operator']['image']['repository']}:{tag}"
    config = parse_args(["--namespace", "team-a"], env={})
    assert (config.sidecar_image, config.activity_image) == (version.SIDECAR_IMAGE, version.ACTIVITY_IMAGE)
    assert DEFAULT_ACTIVITY_IMAGE == version.ACTIVITY_IMAGE
