#!/usr/bin/env python3
"""Time qvl's start-up as whole processes against a bare Python start, in the same run.

    python scripts/bench_startup.py [--runs 15]

Each command runs --runs times (after one warm-up run, so the page cache is warm for all
of them alike); the median wall time is reported with the overhead over `python -c pass`.
Target (issue 2): `qvl list-specs` within 150 ms of a bare Python start on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_MS = 150.0


def qvl_command() -> list[str]:
    """The installed console script when it sits next to this Python, else `python -m qwenvl_cli`."""
    script = Path(sys.executable).with_name("qvl")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "qwenvl_cli"]


def time_runs(cmd: list[str], runs: int, env: dict[str, str]) -> list[float]:
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    env = dict(os.environ, COLUMNS="120")
    if not Path(sys.executable).with_name("qvl").exists():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    qvl = qvl_command()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()} "
          f"{platform.release()}; Python {platform.python_version()}")
    print(f"method: median of {args.runs} runs per command after 1 warm-up, wall clock "
          f"(time.perf_counter around subprocess.run), output to /dev/null")
    print(f"qvl command: {' '.join(Path(c).name if i == 0 else c for i, c in enumerate(qvl))}"
          f"{' (' + shutil.which('qvl') + ')' if shutil.which('qvl') else ''}")
    cases = [("python -c pass", [sys.executable, "-c", "pass"]),
             ("qvl --help", [*qvl, "--help"]),
             ("qvl list-specs", [*qvl, "list-specs"]),
             ("qvl list-specs --json", [*qvl, "list-specs", "--json"]),
             ("qvl resolve -s 7 -f awq", [*qvl, "resolve", "-s", "7", "-f", "awq"])]
    results = {name: statistics.median(time_runs(cmd, args.runs, env)) for name, cmd in cases}
    base = results["python -c pass"]
    print(f"\n{'command':28} {'median ms':>10} {'overhead ms':>12}")
    for name, ms in results.items():
        print(f"{name:28} {ms:10.1f} {ms - base:12.1f}")
    worst = max(results["qvl list-specs"], results["qvl list-specs --json"]) - base
    verdict = "meets" if worst <= TARGET_MS else "MISSES"
    print(f"\nqvl list-specs overhead {worst:.1f} ms: {verdict} the {TARGET_MS:.0f} ms target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
