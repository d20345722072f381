"""The GitHub Actions workflows (.github/workflows) pass actionlint.

They cannot run here (no GitHub, no registry), so this is all the suite checks of them:
syntax, expressions and their types, job needs, the inputs of well-known actions, and,
where shellcheck is on PATH, the shell of every ``run:``. actionlint is built from its Go
module by ``make binaries`` (dptr_testbed.binaries), like helm for the chart tests, so
``make unit`` needs it too; a missing binary fails here, it does not skip.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from dptr_testbed import binaries

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / ".github" / "workflows"


@pytest.fixture(scope="module")
def actionlint() -> Path:
    path = binaries.Binaries(binaries.bin_dir()).actionlint
    # `make test` builds it first; a missing binary is a broken setup, not a skip.
    assert path.exists(), f"actionlint is not built ({path}); run `make binaries`"
    return path


def lint(actionlint: Path, *files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(actionlint), "-no-color", *map(str, files)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_the_pinned_actionlint_is_built(actionlint: Path) -> None:
    assert binaries.actionlint_is_current(actionlint), f"{actionlint} is not {binaries.ACTIONLINT_VERSION}"


def test_every_workflow_passes_actionlint(actionlint: Path) -> None:
    files = sorted([*WORKFLOWS.glob("*.yml"), *WORKFLOWS.glob("*.yaml")])
    assert {f.name for f in files} >= {"ci.yml", "release.yml"}
    result = lint(actionlint, *files)
    assert result.returncode == 0, f"actionlint exit {result.returncode}:\n{result.stdout}{result.stderr}"


GOOD = """\
on: push
jobs:
  build:
    runs-on: ubuntu-latest
    strategy:
      matrix:
        target: [a, b]
    steps:
      - uses: actions/checkout@v6
        with:
          persist-credentials: false
      - run: echo "${{ matrix.target }}"
"""

# Each breaks GOOD in one way actionlint must catch, with what it must say.
BROKEN = {
    "unknown-key": (("    runs-on:", "    runs-onn:"), 'unexpected key "runs-onn"'),
    "undefined-matrix-property": (("matrix.target }}", "matrix.nope }}"), 'property "nope" is not defined'),
    "unknown-action-input": (("persist-credentials:", "persist-credential:"), 'input "persist-credential"'),
    "needs-unknown-job": (
        ("    runs-on: ubuntu-latest\n", "    needs: [nope]\n    runs-on: ubuntu-latest\n"),
        'needs job "nope" which does not exist',
    ),
}


def test_the_good_sample_passes(actionlint: Path, tmp_path: Path) -> None:
    sample = tmp_path / "good.yml"
    sample.write_text(GOOD)
    result = lint(actionlint, sample)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_workflow_fails_actionlint(actionlint: Path, tmp_path: Path, case: str) -> None:
    (old, new), message = BROKEN[case]
    assert GOOD.count(old) == 1
    sample = tmp_path / f"{case}.yml"
    sample.write_text(GOOD.replace(old, new))
    result = lint(actionlint, sample)
    # 1: problems found (2 and 3 are usage and fatal errors, which would prove nothing).
    assert result.returncode == 1, f"actionlint exit {result.returncode}:\n{result.stdout}{result.stderr}"
    assert message in result.stdout, result.stdout


def test_ci_checks_out_the_whole_history() -> None:
    """tests/chart/test_chart_upgrade.py installs the previous chart from a commit: a
    shallow clone (checkout's default) does not have it."""
    ci = yaml.safe_load((WORKFLOWS / "ci.yml").read_text())
    steps = ci["jobs"]["test"]["steps"]
    checkout = [s for s in steps if str(s.get("uses", "")).startswith("actions/checkout@")]
    assert len(checkout) == 1
    assert checkout[0]["with"]["fetch-depth"] == 0
