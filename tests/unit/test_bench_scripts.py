"""The benchmark scripts are not run by the suite (each takes minutes), so their imports
and arguments are: a rename in the test helpers they reuse once broke every one of them
without a test noticing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("[a-z]*.py"))


def test_the_bench_directory_has_scripts() -> None:
    assert len(SCRIPTS) >= 5, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_imports_and_parses_its_arguments(script: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage:" in proc.stdout, proc.stdout
