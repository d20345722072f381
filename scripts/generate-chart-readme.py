"""Write charts/dptr/README.md: the chart's introduction and its values table, generated
from the ``# --`` comments in values.yaml (helm-docs' convention: a comment that starts
with ``# --``, and the ``#`` lines after it, describe the key right below it).

    .venv/bin/python scripts/generate-chart-readme.py          # write it
    .venv/bin/python scripts/generate-chart-readme.py --check  # exit 1 if it is stale

tests/chart/test_chart_readme.py runs the check, like manifests/' drift test.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "dptr"
_KEY = re.compile(r"^(\s*)([A-Za-z0-9_.-]+):(?:\s|$)")
_DESCRIPTION = re.compile(r"^(\s*)# --(?!-) ?(.*)$")
_CONTINUED = re.compile(r"^(\s*)#(?: (.*))?$")

INTRO = """# dptr

{description}

Version {version} (appVersion {app_version}); Kubernetes {kube_version}.

```sh
helm install dptr oci://ghcr.io/dptr-dev/charts/dptr --version {version} \\
  --namespace dptr-system --create-namespace
```

docs/install.md (in the repository) walks through credentials, the IAM policies, the
first TaskRunner and upgrades; docs/security.md says what the chart's RBAC grants and
why. values.schema.json checks every value below: a wrong one fails `helm install`.

This file is generated from the `# --` comments in values.yaml by
`scripts/generate-chart-readme.py`; edit those, not this.

## Values

| Key | Type | Default | Description |
| --- | --- | --- | --- |
"""


def documented(text: str) -> list[tuple[str, str]]:
    """(dotted key, description) for every key with a ``# --`` comment, in file order."""
    found: list[tuple[str, str]] = []
    stack: list[tuple[int, str]] = []
    pending: list[str] | None = None
    for line in text.splitlines():
        if not line.strip():
            pending = None
            continue
        if match := _DESCRIPTION.match(line):
            pending = [match.group(2).strip()]
            continue
        if pending is not None and (match := _CONTINUED.match(line)) and not line.strip().startswith("# ---"):
            pending.append((match.group(2) or "").strip())
            continue
        key = _KEY.match(line)
        if key is None:
            if not line.lstrip().startswith("#"):
                pending = None
            else:
                pending = None if line.strip().startswith("# ---") else pending
            continue
        indent = len(key.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key.group(2)))
        if pending is not None:
            found.append((".".join(k for _, k in stack), " ".join(p for p in pending if p)))
        pending = None
    return found


def _lookup(values: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        values = values[part]
    return values


def _type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return "null"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    out = INTRO.format(
        description=" ".join(str(chart["description"]).split()),
        version=chart["version"],
        app_version=chart["appVersion"],
        kube_version=chart.get("kubeVersion", "any"),
    )
    rows = []
    for key, description in documented(text):
        value = _lookup(values, key)
        default = json.dumps(value, ensure_ascii=False)
        shown = "(see values.yaml)" if len(default) > 60 else f"`{_cell(default)}`"
        rows.append(f"| `{key}` | {_type(value)} | {shown} | {_cell(description)} |")
    return out + "\n".join(rows) + "\n"


def main(argv: list[str]) -> int:
    target = CHART / "README.md"
    wanted = render()
    if argv == ["--check"]:
        if not target.exists() or target.read_text() != wanted:
            print(f"{target} is stale: run scripts/generate-chart-readme.py", file=sys.stderr)
            return 1
        return 0
    target.write_text(wanted)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
