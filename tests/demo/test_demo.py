"""The README's first command: the local end-to-end demo runs and tells the truth."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster


def test_demo_runs_every_kind_of_outcome_and_cleans_up() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dptr_testbed.cli", "demo", "--timeout", "300"],
        capture_output=True,
        text=True,
        timeout=480,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    attempts = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1].startswith("@") and "_Attempt=" in parts[1]:
            attempts.setdefault(parts[0], []).append(parts[2])
    assert attempts["SayHello"] == ["FINISHED"]
    assert attempts["BrokenStep"] == ["FAILED"]
    assert attempts["LongStep"] == ["CANCELED"]
    # The runner re-checks within the one attempt (every 6 s at time scale 0.1) until
    # preconditionTimeout (12 s), then answers FALSE: Data Pipeline does not re-schedule it.
    assert attempts["InputArrived"] == ["FALSE"], attempts["InputArrived"]
    assert "GuardedStep" not in attempts  # its precondition never held
    assert "every attempt has exactly one outcome, no protocol violation" in out
    assert "kubectl get taskrunners,pipelinetasks,jobs,pods -n dptr-demo" in out
    # It cleaned up: its state directory is gone.
    state = out.split("in ", 1)[1].split()[0]
    assert not Path(state).exists()
