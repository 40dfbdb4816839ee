#!/usr/bin/env python
"""`qvl batch` throughput: requests/s for image prompts at several batch sizes, against the
sequential baseline (one request at a time, as a loop over `qvl chat` would run them,
minus the process starts) in the same run.

    python scripts/bench_batch.py                        # tiny checkpoint, CPU, 64 prompts
    python scripts/bench_batch.py --model-path DIR --device cuda --sizes 1,8,32,64

Method: the model is loaded once. Each round runs every variant on the same requests
(64 image prompts by default: 4 image sizes, so prompt lengths differ; greedy decoding,
exactly --max-tokens new tokens each, ignore_eos); the rounds alternate the variants,
and the median wall time over the rounds is reported. Batched variants use
qwenvl_cli.batch.local (what `qvl batch` runs: left-padded batches, the next batch prepared
on background threads); "no prefetch" prepares each batch before decoding it. Every
variant's answers are checked against the sequential ones (padding must not change
them).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from benchutil import machine  # noqa: E402
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "scripts"))

SIZES = [(64, 48), (128, 96), (224, 224), (320, 240)]



def requests(folder: Path, count: int, max_tokens: int):
    from media_fixtures import make_image

    from qwenvl_cli import messages as msgs
    from qwenvl_cli.batch.files import Request, length_proxy
    from qwenvl_cli.generation import GenerationParams

    params = GenerationParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    out = []
    for i in range(count):
        w, h = SIZES[i % len(SIZES)]
        image = make_image(folder / f"img{i}.png", w, h, ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256))
        conv = msgs.from_openai([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": str(image)}},
            {"type": "text", "text": f"Describe picture {i} in one sentence."}]}])
        out.append(Request(i, i + 1, conv, params, length_proxy(conv)))
    return out


def sequential(engine, reqs):
    from qwenvl_cli.generation import collect

    return {r.id: collect(engine.stream(r.messages, r.params)).text for r in reqs}


def batched(engine, reqs, size, prefetch=True):
    from qwenvl_cli.batch import local as batch_local
    from qwenvl_cli.batch import plan as batch_plan

    texts = {}
    emit = lambda rec: texts.__setitem__(rec["id"], rec["text"])  # noqa: E731
    batches = batch_plan.plan_batches(reqs, size)
    if prefetch:
        batch_local.run(engine, batches, emit)
    else:
        for batch in batches:
            batch_local.decode(engine, [(r, engine.job(r.messages, r.params)) for r in batch], emit)
    return texts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", help="a checkpoint folder (default: build the tiny one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--sizes", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import torch

    from qwenvl_cli.engine.engine import Engine

    from qwenvl_cli.engine.options import EngineOptions

    tmp = Path(tempfile.mkdtemp(prefix="qvl-bench-batch-"))
    if args.model_path:
        model = Path(args.model_path)
    else:
        from make_tiny_model import make_tiny_model

        model = make_tiny_model(tmp / "tiny")
    engine = Engine.load(model, EngineOptions(device=args.device, dtype=args.dtype))
    reqs = requests(tmp, args.requests, args.max_tokens)
    sizes = [int(s) for s in args.sizes.split(",")]
    variants = [("sequential (engine.stream, one by one)", lambda: sequential(engine, reqs))]
    variants += [(f"qvl batch --batch-size {s}", lambda s=s: batched(engine, reqs, s)) for s in sizes]
    if max(sizes) > 1:
        variants.append((f"--batch-size {max(sizes)} without prefetch",
                         lambda s=max(sizes): batched(engine, reqs, s, prefetch=False)))
    print(f"machine: {machine(torch)}")
    print(f"model: {model} on {engine.plan.describe()} ({engine.plan.dtype_name}, {engine.plan.attn})")
    print(f"method: {args.requests} image prompts ({', '.join(f'{w}x{h}' for w, h in SIZES)}), "
          f"{args.max_tokens} new tokens each (greedy, ignore_eos); median wall time of {args.rounds} "
          f"rounds, variants alternating; answers checked against the sequential ones")
    sequential(engine, reqs[:4])  # warm-up
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    reference = None
    for _ in range(args.rounds):
        for name, fn in variants:
            start = time.perf_counter()
            texts = fn()
            times[name].append(time.perf_counter() - start)
            reference = reference or texts
            if texts != reference:
                bad = [k for k in reference if texts.get(k) != reference[k]]
                print(f"MISMATCH in {name}: ids {bad[:10]}")
                return 1
    base = statistics.median(times[variants[0][0]])
    tokens = args.requests * args.max_tokens
    print("\n| variant | median s (min-max) | requests/s | tokens/s | speed-up |\n|---|---:|---:|---:|---:|")
    for name, _ in variants:
        med, low, high = statistics.median(times[name]), min(times[name]), max(times[name])
        print(f"| {name} | {med:.2f} ({low:.2f}-{high:.2f}) | {args.requests / med:.2f} | "
              f"{tokens / med:.1f} | {base / med:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
