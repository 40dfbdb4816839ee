"""scripts/demo.sh, the offline demo of the main job, runs to the end (tiny model, loopback hub)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, qvl_env


@pytest.mark.slow
def test_demo_script_runs_offline_end_to_end(tmp_path):
    env = qvl_env({"PYTHON": sys.executable, "TMPDIR": str(tmp_path)})
    proc = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh")], env=env, capture_output=True,
                          text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for step in ("TINY RANDOM", "GIBBERISH", "qwen2-vl-instruct-2b-pytorch is running",
                 "talking to qwen2-vl-instruct-2b-pytorch", "completion tokens",
                 "qwen2-vl-instruct-2b-pytorch: stopped"):
        assert step in out, step
    assert proc.stdout.rstrip().splitlines()[-3:][0].strip() == "[]"  # list --json after terminate
    assert not list(tmp_path.glob("qvl-demo.*"))  # its temporary folder is gone
