#!/usr/bin/env python3
"""Start-up of two checkouts side by side, interleaved in the same run (issue 12: the move
into wings must not slow `qvl list-specs` / `qvl --help` down).

    python scripts/bench_startup_compare.py RUNS OLD_CHECKOUT

OLD_CHECKOUT is a worktree of a commit before the rename (package qvl_cli), e.g.
`git worktree add /tmp/oldqvl 8832ef8`; the new side is this checkout (qwenvl_cli).
Each command runs once untimed, then RUNS times, the commands taking turns; medians.
"""
import os, statistics, subprocess, sys, time
py = sys.executable
new = str(__import__("pathlib").Path(__file__).resolve().parents[1])
old = sys.argv[2] if len(sys.argv) > 2 else "/tmp/oldqvl"
cases = {"bare python": ([py, "-c", "pass"], {}),
         "old qvl_cli list-specs": ([py, "-m", "qvl_cli", "list-specs"], {"PYTHONPATH": old}),
         "new qwenvl_cli list-specs": ([py, "-m", "qwenvl_cli", "list-specs"], {"PYTHONPATH": new}),
         "old qvl_cli --help": ([py, "-m", "qvl_cli", "--help"], {"PYTHONPATH": old}),
         "new qwenvl_cli --help": ([py, "-m", "qwenvl_cli", "--help"], {"PYTHONPATH": new})}
times = {k: [] for k in cases}
for k, (cmd, env) in cases.items():
    subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, check=True)
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 11):
    for k, (cmd, env) in cases.items():
        t = time.perf_counter(); subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, check=True)
        times[k].append((time.perf_counter() - t) * 1000)
base = statistics.median(times["bare python"])
for k, v in times.items():
    m = statistics.median(v); print(f"{k:30s} median {m:6.1f} ms  overhead {m - base:6.1f} ms  (min {min(v):.1f})")
print("load average", os.getloadavg())
