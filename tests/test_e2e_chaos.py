"""A short CI run of scripts/chaos: concurrent readers while faults fire at random."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.fuse, pytest.mark.slow]

SCRIPT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "chaos"
)


def test_chaos_short_run(tmp_path):
    res = subprocess.run(
        [sys.executable, SCRIPT, "--duration", "20", "--readers", "64", "--files", "1000",
         "--workdir", str(tmp_path), "-v"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("chaos: ")), None)
    assert line is not None, res.stdout + res.stderr
    summary = json.loads(line[len("chaos: ") :])
    print(line)
    assert summary["wrong_bytes"] == 0, res.stdout
    assert summary["reads"] > 500, line
    assert sum(summary["faults"].values()) >= 10, line
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("api", ["vi-json", "soap"])
def test_chaos_short_run_over_vim25(tmp_path, api):
    """The same run over each vim25 transport (the one above takes --api auto's choice)."""
    res = subprocess.run(
        [sys.executable, SCRIPT, "--duration", "15", "--readers", "64", "--files", "600",
         "--api", api, "--workdir", str(tmp_path), "-v"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("chaos: ")), None)
    assert line is not None, res.stdout + res.stderr
    summary = json.loads(line[len("chaos: ") :])
    print(api, line)
    assert summary["wrong_bytes"] == 0, res.stdout
    assert summary["reads"] > 300, line
    assert sum(summary["faults"].values()) >= 5, line
    assert res.returncode == 0, res.stdout + res.stderr
