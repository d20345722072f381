"""charts/dptr/README.md is generated from values.yaml's ``# --`` comments and kept current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "generate-chart-readme.py"


def test_the_chart_readme_is_current() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr + "\nrun: .venv/bin/python scripts/generate-chart-readme.py"


def test_every_documented_value_is_in_the_table_and_a_section_rule_is_not() -> None:
    text = (REPO / "charts" / "dptr" / "values.yaml").read_text()
    import importlib.util

    spec = importlib.util.spec_from_file_location("chart_readme", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    keys = dict(module.documented(text))
    assert text.count("# -- ") == len(keys)  # every description found, once
    assert keys["operator.leaderElection.renewSeconds"].startswith("Seconds between renewals")
    assert keys["activity.image"].startswith("The image of SqlActivity")
    assert not any("-----" in d for d in keys.values())
    readme = (REPO / "charts" / "dptr" / "README.md").read_text()
    assert all(f"| `{key}` |" in readme for key in keys)
