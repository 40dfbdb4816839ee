"""`qvl batch --cluster` throughput with 1 and 2 worker nodes, against the local `qvl batch`, in one run.

Starts a local Ray cluster (a head with no CPU for tasks, so every engine actor runs on a
worker; workers on 127.0.0.3, 127.0.0.4, one CPU each), answers the same N requests with
the tiny checkpoint three ways (local, 1 worker, 2 workers) and prints requests/s for each,
the time to the first record (actors loading the model) and the steady rate after it.
Run it in a loopback-only network namespace (Ray binds 0.0.0.0), with Ray installed:

    unshare --net -- bash -c 'ip link set lo up && python scripts/bench_cluster.py --requests 200'
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import raycluster  # noqa: E402


def requests(path: Path, n: int, max_tokens: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": i, "messages": [{"role": "user", "content": f"count {i}"}],
                                "max_tokens": max_tokens}) + "\n")


def timed_batch(source: Path, out: Path, model: str, env: dict[str, str], extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "qwenvl_cli", "batch", str(source), "-o", str(out), "--model-path", model,
           "--device", "cpu", "--temperature", "0", "--batch-size", "4", "--quiet", *extra]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    first = None
    while proc.poll() is None:
        if first is None and out.exists() and out.stat().st_size:
            first = time.perf_counter() - started
        time.sleep(0.05)
    total = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"batch failed: {proc.stderr.read()[-2000:]}")
    n = len(out.read_text().splitlines())
    first = first or total
    return {"requests": n, "seconds": round(total, 1), "req_per_s": round(n / total, 2),
            "first_record_s": round(first, 1), "steady_req_per_s": round((n - 1) / max(1e-9, total - first), 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--model", default=None, help="a tiny checkpoint folder (default: build one)")
    args = parser.parse_args()
    if not raycluster.isolated():
        raise SystemExit("run in a loopback-only network namespace (see the docstring)")
    work = Path(tempfile.mkdtemp(prefix="qvl-bench-cluster-"))
    model = args.model
    if model is None:
        sys.path.insert(0, str(ROOT / "scripts"))
        from make_tiny_model import make_tiny_model

        model = str(make_tiny_model(work / "tiny"))
    source = work / "in.jsonl"
    requests(source, args.requests, args.max_tokens)
    env = dict(os.environ, PYTHONPATH=str(ROOT), QVL_HOME=str(work / "qvl"), OMP_NUM_THREADS="1")
    print(f"# {platform.node()}: {os.cpu_count()} cores, python {platform.python_version()}; "
          f"{args.requests} requests, max_tokens {args.max_tokens}, --batch-size 4, tiny checkpoint, CPU")
    rows = {"local (1 process, OMP_NUM_THREADS=1)": timed_batch(source, work / "local.jsonl", model, env, [])}
    state = raycluster.start(workers=1, cpus=1, head_cpus=0)
    try:
        cenv = {**env, **state["env"]}
        rows["cluster, 1 worker node"] = timed_batch(source, work / "c1.jsonl", model, cenv,
                                                     ["--cluster", state["address"]])
        raycluster.add_worker(state, 1, 1, state["full_env"])
        raycluster.wait_nodes(state, 3, 120)
        rows["cluster, 2 worker nodes"] = timed_batch(source, work / "c2.jsonl", model, cenv,
                                                      ["--cluster", state["address"]])
    finally:
        raycluster.stop(state)
    print("| run | requests/s | seconds | first record (s) | steady requests/s |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['req_per_s']} | {r['seconds']} | {r['first_record_s']} | {r['steady_req_per_s']} |")

    def texts(name: str) -> dict:
        return {json.loads(line)["id"]: json.loads(line)["text"] for line in (work / f"{name}.jsonl").open()}

    same = [name for name in ("c1", "c2") if texts(name) == texts("local")]
    print(f"answers identical to the local run's: {', '.join(same) or 'none'} (of c1, c2)")


if __name__ == "__main__":
    main()
