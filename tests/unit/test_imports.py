"""dptr_common is shared with the sidecar, which must stay small: no kopf, no kubernetes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

MODULES = ["errors", "models", "naming", "pacing", "render", "task"]
FORBIDDEN = ("kopf", "kubernetes")


@pytest.mark.parametrize("module", MODULES)
def test_module_does_not_import_kopf_or_kubernetes(module: str) -> None:
    code = (
        "import json, sys\n"
        f"import dptr_common.{module}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {'kopf', 'kubernetes', 'boto3'})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = json.loads(result.stdout)
    assert not [m for m in loaded if m.split(".")[0] in FORBIDDEN], loaded
    # botocore is allowed but loaded lazily; boto3 is never needed here.
    assert "boto3" not in loaded
