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


def test_demo_script_outside_the_venv_says_what_to_do(tmp_path):
    """An interpreter without qvl's dependencies: one line and a hint, exit 2, no traceback."""
    bare = tmp_path / "bare-python"
    bare.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')  # -S: no site-packages
    bare.chmod(0o755)
    env = qvl_env({"PYTHON": str(bare), "TMPDIR": str(tmp_path)})
    # qvl_env's PYTHONPATH names where qwenvl_cli was imported from: site-packages itself when
    # qvl is installed (as in CI), which would hand the bare interpreter every dependency.
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and "missing typer" in lines[0]
    assert lines[1].startswith("hint: ") and "pip install -c constraints.txt ." in lines[1]
    assert not list(tmp_path.glob("qvl-demo.*"))
