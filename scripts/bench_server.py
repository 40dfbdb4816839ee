"""Throughput of a launched qvl server under concurrent clients, one request at a time against
decoding waiting requests together (--max-batch), in the same run.

Method: for each --max-batch value, `qvl launch` the model in the background, warm it up with
one request, then C client threads each send R chat requests (greedy, --max-tokens tokens,
ignore_eos so that every answer has the same length) with the official `openai` client; report
requests/s, completion tokens/s and the median latency; `qvl terminate` it.

    python scripts/bench_server.py --model-path DIR [--device cpu] [--clients 8] [--requests 3]
    python scripts/bench_server.py -s 2 --batches 1 8 --clients 16 --max-tokens 128
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import subprocess
import sys
import time


def qvl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwenvl_cli", *args], capture_output=True, text=True)


def run_load(endpoint: str, uid: str, clients: int, requests: int, max_tokens: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=endpoint, api_key=os.environ.get("QVL_API_KEY", "none"), max_retries=0, timeout=600)
    prompts = ["Hello there.", "Tell me a story.", "What is this?", "Describe the sea."]

    def one(i: int) -> tuple[float, int]:
        start = time.perf_counter()
        answer = client.chat.completions.create(
            model=uid, temperature=0, max_tokens=max_tokens, extra_body={"ignore_eos": True},
            messages=[{"role": "user", "content": prompts[i % len(prompts)]}])
        return time.perf_counter() - start, answer.usage.completion_tokens

    one(0)  # warm-up
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients * requests)))
    seconds = time.perf_counter() - start
    tokens = sum(t for _, t in results)
    return {"requests": len(results), "seconds": round(seconds, 2),
            "requests_per_s": round(len(results) / seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "median_latency_s": round(statistics.median(s for s, _ in results), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path")
    parser.add_argument("-s", "--size-in-billions")
    parser.add_argument("-f", "--model-format")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3, help="per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    spec = (["--model-path", args.model_path] if args.model_path else []) + \
        (["-s", args.size_in_billions] if args.size_in_billions else []) + \
        (["-f", args.model_format] if args.model_format else [])
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs; python {platform.python_version()}")
    print(f"load: {args.clients} clients x {args.requests} requests, {args.max_tokens} tokens each, greedy")
    for batch in args.batches:
        uid = f"bench-b{batch}"
        launched = qvl("launch", *spec, "--device", args.device, "--model-uid", uid, "--max-batch", str(batch),
                       "--max-queue", str(args.clients * 2), "--json")
        if launched.returncode != 0:
            print(launched.stderr, file=sys.stderr)
            return 1
        entry = json.loads(launched.stdout)
        try:
            result = run_load(entry["endpoint"], uid, args.clients, args.requests, args.max_tokens)
        finally:
            qvl("terminate", uid)
        print(json.dumps({"max_batch": batch, "device": entry.get("device"), **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
