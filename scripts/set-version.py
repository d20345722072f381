"""Set dptr's version everywhere it is written: pyproject.toml, the chart's ``version`` and
``appVersion``; then regenerate manifests/ (the chart's labels carry it).

    .venv/bin/python scripts/set-version.py 0.2.0

The image tags follow (the chart's default tag is its appVersion; the operator's
defaults come from dptr_common.version, which reads the installed package: reinstall with
``make setup``).  tests/unit/test_version.py fails when any of them drift.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_SEMVER = re.compile(r"^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?$")


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not _SEMVER.match(argv[0]):
        print("usage: set-version.py MAJOR.MINOR.PATCH[-PRERELEASE]", file=sys.stderr)
        return 2
    version = argv[0]
    pyproject = REPO / "pyproject.toml"
    text, count = re.subn(
        r'(?m)^version = "[^"]*"$', f'version = "{version}"', pyproject.read_text(), count=1
    )
    if count != 1:
        print("pyproject.toml has no version line", file=sys.stderr)
        return 1
    pyproject.write_text(text)
    chart = REPO / "charts" / "dptr" / "Chart.yaml"
    text = re.sub(r"(?m)^version: .*$", f"version: {version}", chart.read_text(), count=1)
    text = re.sub(r"(?m)^appVersion: .*$", f'appVersion: "{version}"', text, count=1)
    chart.write_text(text)
    subprocess.run([sys.executable, str(REPO / "scripts" / "generate-manifests.py")], check=True)
    print(f"dptr {version}: pyproject.toml, charts/dptr/Chart.yaml, manifests/")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
