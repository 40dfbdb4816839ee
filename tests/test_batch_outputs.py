"""`qvl batch -o` naming what is not a plain writable file: refused before the model loads, or
(pipes, FIFOs, /dev/stdout) answered there as the answers come."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import qvl_env, run_qvl


def _input(tmp_path: Path, n: int = 2) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"id": i, "messages": [{"role": "user", "content": "hi"}]}) + "\n"
                            for i in range(n)))
    return path


def test_an_output_that_is_a_directory_is_bad_usage_before_loading(tiny_model, tmp_path):
    result = run_qvl("batch", str(_input(tmp_path)), "-o", str(tmp_path), "--model-path", str(tiny_model))
    assert result.returncode == 2, result.stderr
    assert "is a directory" in result.stderr and "Traceback" not in result.stderr
    assert "unexpected" not in result.stderr and "loaded" not in result.stderr


def test_an_output_that_cannot_be_created_is_bad_usage_before_loading(tiny_model, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    for out in (blocker / "out.jsonl", Path("/proc/qvl-out.jsonl")):
        result = run_qvl("batch", str(_input(tmp_path)), "-o", str(out), "--model-path", str(tiny_model))
        assert result.returncode == 2, result.stderr
        assert str(out) in result.stderr and "unexpected" not in result.stderr and "loaded" not in result.stderr
    assert blocker.read_text() == "x"


def test_a_fifo_without_a_reader_is_refused_within_seconds(tiny_model, tmp_path):
    fifo = tmp_path / "answers"
    os.mkfifo(fifo)
    started = time.monotonic()
    result = run_qvl("batch", str(_input(tmp_path)), "-o", str(fifo), "--model-path", str(tiny_model),
                     "--max-tokens", "2", timeout=120)
    assert result.returncode == 2, result.stderr
    assert "no process reads the FIFO" in result.stderr
    assert time.monotonic() - started < 60


def test_answers_stream_to_dev_stdout_when_it_is_a_pipe(tiny_model, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qwenvl_cli", "batch", str(_input(tmp_path)), "-o", "/dev/stdout",
                           "--model-path", str(tiny_model), "--max-tokens", "2", "--quiet"],
                          env=qvl_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert sorted(r["id"] for r in records) == [0, 1] and all(r["error"] is None for r in records)
