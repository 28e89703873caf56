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


READERS, READS, TIMEOUT = 32, 40, 5.0


def test_chaos_short_run(tmp_path):
    # A fixed amount of work (READS per reader), so no assertion depends on throughput;
    # --duration only caps a run that would hang.
    res = subprocess.run(
        [sys.executable, SCRIPT, "--reads", str(READS), "--duration", "300",
         "--readers", str(READERS), "--files", "600", "--timeout", f"{TIMEOUT:g}",
         "--bound", f"{3 * TIMEOUT:g}", "--workdir", str(tmp_path), "-v"],
        capture_output=True, text=True, timeout=480,
    )  # fmt: skip
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("chaos: ")), None)
    assert line is not None, res.stdout + res.stderr
    summary = json.loads(line[len("chaos: ") :])
    print(line)
    assert summary["wrong_bytes"] == 0, res.stdout
    assert summary["reads"] >= READERS * READS, line  # every reader did all its work
    assert sum(summary["faults"].values()) >= 3, line
    # The per-syscall bound (issue 10 item 3): the longest blocked read/open.
    assert summary["max_block_s"] <= 3 * TIMEOUT, line
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
