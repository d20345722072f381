#!/usr/bin/env python3
"""Write the chart's schema of ``taskRunners[].spec`` (in charts/dptr/values.schema.json)
from the TaskRunner CRD's structural schema, so that a typo in a TaskRunner declared in
the values fails ``helm install``/``template`` with its path instead of being pruned.

    .venv/bin/python scripts/generate-values-schema.py          # rewrite it
    .venv/bin/python scripts/generate-values-schema.py --check  # exit 1 if it is stale

The CRD's OpenAPI v3 schema becomes JSON Schema (draft-07, what Helm checks values with):

* every object that has ``properties`` and does not preserve unknown fields gets
  ``additionalProperties: false`` (the API server prunes unknown fields of a custom
  resource, or refuses them only when the client asks for strict field validation);
* objects with ``x-kubernetes-preserve-unknown-fields`` stay open, as in the CRD;
* ``x-kubernetes-*`` keys (CEL rules among them: the API server checks those at install),
  ``format: int32/int64`` and OpenAPI's boolean ``exclusiveMinimum`` are translated or
  dropped.

The rest of values.schema.json is written by hand; only that one subtree is replaced.
tests/chart/test_chart_render.py runs the check.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "dptr"
CRD = CHART / "crds" / "taskrunners.yaml"
SCHEMA = CHART / "values.schema.json"
#: Where the generated subtree lives in values.schema.json.
PATH = ("properties", "taskRunners", "items", "properties", "spec")
COMMENT = (
    "Generated from charts/dptr/crds/taskrunners.yaml by scripts/generate-values-schema.py: "
    "edit the CRD and run the script, not this."
)
_INTEGER_FORMATS = {"int32", "int64"}


def convert(node: dict[str, Any]) -> dict[str, Any]:
    """One CRD schema node as JSON Schema (draft-07)."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-"):
            continue
        if key == "format" and value in _INTEGER_FORMATS:
            continue
        if key == "properties":
            out[key] = {name: convert(sub) for name, sub in value.items()}
        elif key in {"items", "additionalProperties", "not"} and isinstance(value, dict):
            out[key] = convert(value)
        elif key in {"anyOf", "allOf", "oneOf"}:
            out[key] = [convert(sub) for sub in value]
        elif key in {"exclusiveMinimum", "exclusiveMaximum", "nullable"}:
            continue  # below
        else:
            out[key] = value
    for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if node.get(exclusive) is True and bound in out:
            out[exclusive] = out.pop(bound)
    if node.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    closed = "properties" in node and "additionalProperties" not in node
    if closed and not node.get("x-kubernetes-preserve-unknown-fields"):
        # Right after "type", where the hand-written parts of the schema say it.
        keys = list(out)
        at = keys.index("type") + 1 if "type" in keys else 0
        items = list(out.items())
        out = dict([*items[:at], ("additionalProperties", False), *items[at:]])
    return out


def spec_schema(crd_text: str) -> dict[str, Any]:
    """The generated schema of ``taskRunners[].spec``."""
    crd = yaml.safe_load(crd_text)
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    spec = convert(version["schema"]["openAPIV3Schema"]["properties"]["spec"])
    return {"$comment": COMMENT, **spec}


def render(schema_text: str, crd_text: str) -> str:
    """values.schema.json with its ``taskRunners[].spec`` generated from the CRD."""
    schema = json.loads(schema_text)
    parent = schema
    for key in PATH[:-1]:
        parent = parent[key]
    parent[PATH[-1]] = spec_schema(crd_text)
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if it is stale")
    args = parser.parse_args(argv)
    have = SCHEMA.read_text()
    want = render(have, CRD.read_text())
    if args.check:
        # The generated subtree only: the rest of the file is hand-written, in any layout.
        current: Any = json.loads(have)
        for key in PATH:
            current = current.get(key) if isinstance(current, dict) else None
        expected = spec_schema(CRD.read_text())
        if current != expected:
            sys.stdout.writelines(
                difflib.unified_diff(
                    json.dumps(current, indent=2, ensure_ascii=False).splitlines(keepends=True),
                    json.dumps(expected, indent=2, ensure_ascii=False).splitlines(keepends=True),
                    "taskRunners[].spec in charts/dptr/values.schema.json (on disk)",
                    "taskRunners[].spec (from the CRD)",
                )
            )
            print(
                "charts/dptr/values.schema.json drifted from the TaskRunner CRD: "
                "run scripts/generate-values-schema.py",
                file=sys.stderr,
            )
            return 1
        return 0
    if have != want:
        SCHEMA.write_text(want)
        print(f"wrote {SCHEMA.relative_to(REPO)}")
    else:
        print(f"{SCHEMA.relative_to(REPO)} is current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
